"""The item index: ScaNN search over the item tower's outputs, validated and published atomically.

Search. Scores are the model's own: the dot product of a query embedding (temperature folded in)
with an item embedding. The configuration is chosen from the catalog size N (every value can be
set in config.index; 0 means "by the rule"):

  * N <= brute_force_max_items (20,000): exact brute force (float32, or int8 with
    brute_force_int8). Exact search over a small catalog is as fast as a tree and never misses.
  * otherwise tree partitioning + asymmetric hashing (AH) with anisotropic quantization, then exact
    float32 re-ordering of the best AH candidates:
      num_leaves           round(sqrt(N))                  ~sqrt(N) points per leaf
      leaves_to_search     max(8, ceil(2% of num_leaves))  then calibrated
      reorder depth        reorder_multiplier (4) x max(neighbours requested, 30), calibrated
      training_sample_size min(N, max(100,000, 64 x num_leaves))
      dims_per_block 2, anisotropic_quantization_threshold 0.2 (ScaNN's recommendations)
    Calibration: on a sample of real query embeddings, the search settings chosen by rule are
    replaced by the cheapest ones (fewest leaves, then shallowest re-ordering, on ladders around
    the rule) whose recall reaches the validation floors plus a margin; values set in the config
    are never changed.

Validation gate. Recall@10 and recall@100 against exact top-K (jax.lax.top_k over the same
embeddings) are measured on a second sample of query embeddings, disjoint from the calibration
one, together with queries/s. Below index.min_recall_at_10 / min_recall_at_100 nothing is
published, the build fails and the previous version stays live. Recall is tie-aware: a returned item
counts as a hit when its exact score reaches the K-th exact score.

Publishing. Layout of WORKDIR/index:

  LIVE                       the name of the live version (a one-line file, replaced atomically)
  v000007/manifest.json      written last: a version without it is incomplete and never used
  v000007/embeddings/...     item embeddings with their original IDs (two_tower.embeddings)
  v000007/scann/...          the serialized ScaNN searcher

No directory is ever renamed and readers only follow LIVE, so the design also works on object
stores, where replacing one small object is atomic: a crash at any moment leaves either the old or
the new version live. The last index.keep_versions complete versions are kept (the live one
always); `rollback` makes the newest complete version older than the live one live again. Loading
checks every file against the manifest's sizes and SHA-256 checksums.

One build at a time per work directory: a build deletes incomplete versions it finds.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from configs.base import get_base_config
from two_tower import embeddings as emb_lib
from two_tower.experiment import load_for_eval, load_workdir_config
from two_tower.reporting import Reporter, write_json_atomic

MANIFEST = "manifest.json"
LIVE = "LIVE"
EMBEDDINGS_DIR = "embeddings"
SCANN_DIR = "scann"
FORMAT = 1
GATE_K = 100  # the depth recall@100 (the default gate) is measured at
MIN_REORDER_K = 30
_CALIBRATION_MARGIN = 0.01  # calibrate above the floor: the gate measures on another sample
# Calibration ladders, as multiples of the rule's leaves_to_search and reorder_multiplier.
_LEAVES_LADDER = (0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_REORDER_LADDER = (0.5, 0.75, 1, 1.5, 2, 3, 4)

Hook = Callable[[str], None]  # called with a stage name; tests use it to simulate crashes


class IndexIntegrityError(ValueError):
  """An index version whose files are missing, truncated or corrupt."""


class IndexMismatchError(ValueError):
  """An index that does not belong to the model or catalog it is used with."""


class IndexValidationError(ValueError):
  """An index that failed the validation gate (nothing was published)."""


def serving_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the index / score sections completed from the defaults.

  A work directory trained before these sections existed records a config.json without them.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  base = get_base_config()
  for section in ("index", "score"):
    if section not in config:
      config[section] = base[section]
    else:
      for key, value in base[section].items():
        if key not in config[section]:
          config[section][key] = value
  return config


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the index searches; stored in the manifest."""

  mode: str  # brute_force | tree_ah
  num_leaves: int = 0
  leaves_to_search: int = 0
  reorder_multiplier: float = 0.0
  training_sample_size: int = 0
  dims_per_block: int = 2
  anisotropic_threshold: float = 0.2
  int8: bool = False  # brute force over int8-quantized embeddings

  def reorder_depth(self, k: int) -> int:
    """AH candidates re-scored exactly when `k` neighbours are requested: multiplier x k, but
    never fewer than multiplier x MIN_REORDER_K (with few neighbours, the quantized scores' errors
    among near-ties would otherwise decide the order)."""
    return max(k, int(math.ceil(self.reorder_multiplier * max(k, MIN_REORDER_K))))

  @property
  def exact_scores(self) -> bool:
    """Whether the scores the searcher returns are exact float32 dot products."""
    return not self.int8


def choose_settings(num_items: int, cfg: ml_collections.ConfigDict) -> tuple[Settings, tuple[str, ...]]:
  """The settings for a catalog of `num_items` (see the module docstring), and the names of the
  search settings chosen by rule (which calibration may raise)."""
  if num_items < 1:
    raise ValueError("the catalog is empty: there is nothing to index")
  if num_items <= cfg.brute_force_max_items:
    return Settings("brute_force", int8=bool(cfg.brute_force_int8)), ()
  num_leaves = cfg.num_leaves or max(1, round(math.sqrt(num_items)))
  if num_leaves > num_items:
    raise ValueError(f"index.num_leaves={num_leaves} is larger than the catalog ({num_items} items)")
  leaves = cfg.leaves_to_search or max(8, math.ceil(0.02 * num_leaves))
  multiplier = cfg.reorder_multiplier or 4.0
  sample = cfg.training_sample_size or min(num_items, max(100_000, 64 * num_leaves))
  auto = tuple(name for name, value in (("leaves_to_search", cfg.leaves_to_search),
                                        ("reorder_multiplier", cfg.reorder_multiplier)) if not value)
  settings = Settings("tree_ah", num_leaves=num_leaves, leaves_to_search=min(leaves, num_leaves),
                      reorder_multiplier=float(multiplier),
                      training_sample_size=min(sample, num_items),
                      dims_per_block=int(cfg.dims_per_block),
                      anisotropic_threshold=float(cfg.anisotropic_threshold))
  return settings, auto


def _scann():
  """ScaNN's pybind API, imported without running scann/__init__.py.

  That file also imports TensorFlow, when installed, to load ScaNN's TensorFlow ops: slow, and an
  import error whenever the installed TensorFlow is not the one the scann wheel was built for.
  Nothing here uses those ops, so the package is entered as a plain namespace.
  """
  if "scann" not in sys.modules:
    spec = importlib.util.find_spec("scann")
    if spec is None or not spec.submodule_search_locations:
      raise ModuleNotFoundError("the item index needs ScaNN: pip install 'scann>=1.4,<1.5'")
    package = types.ModuleType("scann")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["scann"] = package
    from scann.scann_ops.py import scann_builder, scann_ops_pybind  # pylint: disable=g-import-not-at-top
    # What scann/__init__.py exports, for code that imports scann after us.
    package.scann_ops_pybind = scann_ops_pybind
    package.ScannBuilder, package.ReorderType = scann_builder.ScannBuilder, scann_builder.ReorderType
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  return scann_ops_pybind


def build_searcher(items: np.ndarray, settings: Settings, num_threads: int = 0):
  """A ScaNN searcher over float32 [N, D] `items`, scored by dot product."""
  scann_ops_pybind = _scann()
  from scann.scann_ops.py.scann_builder import ReorderType  # pylint: disable=g-import-not-at-top
  items = np.ascontiguousarray(items, np.float32)
  k = min(GATE_K, len(items))
  builder = scann_ops_pybind.builder(items, k, "dot_product")
  if settings.mode == "brute_force":
    builder = builder.score_brute_force(ReorderType.INT8 if settings.int8 else ReorderType.FLOAT32)
  elif settings.mode == "tree_ah":
    builder = builder.tree(
        num_leaves=settings.num_leaves, num_leaves_to_search=settings.leaves_to_search,
        training_sample_size=settings.training_sample_size)
    builder = builder.score_ah(
        settings.dims_per_block, anisotropic_quantization_threshold=settings.anisotropic_threshold,
        training_sample_size=settings.training_sample_size)
    builder = builder.reorder(settings.reorder_depth(k))
  else:
    raise ValueError(f"unknown index mode {settings.mode!r}")
  builder = builder.set_n_training_threads(num_threads or os.cpu_count() or 1)
  searcher = builder.build()
  if num_threads:
    searcher.set_num_threads(num_threads)
  return searcher


def search(searcher, settings: Settings, queries: np.ndarray, k: int, *, precise_k: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
  """(item rows int64 [B, k], scores float32 [B, k]), best first; row -1 where fewer than k exist.

  `precise_k` < k: only the first precise_k neighbours need the calibrated precision, the others
  are a buffer (for exclusions), so the re-order depth grows by one per extra neighbour instead of
  by reorder_multiplier.
  """
  queries = np.ascontiguousarray(queries, np.float32)
  if settings.mode == "tree_ah":
    precise_k = k if precise_k is None else min(precise_k, k)
    idx, dist = searcher.search_batched_parallel(
        queries, final_num_neighbors=k, leaves_to_search=settings.leaves_to_search,
        pre_reorder_num_neighbors=settings.reorder_depth(precise_k) + k - precise_k)
  else:
    idx, dist = searcher.search_batched_parallel(queries, final_num_neighbors=k)
  idx = np.asarray(idx, np.int64)
  dist = np.asarray(dist, np.float32)
  missing = ~np.isfinite(dist)  # ScaNN pads short results with index 0 and a NaN distance
  idx[missing] = -1
  dist[missing] = -np.inf
  return idx, dist


# ----------------------------------------------------------------------------- exact search


@functools.partial(jax.jit, static_argnames="k")
def _block_top_k(queries, items, valid, best_scores, best_rows, offset, *, k):
  scores = jnp.where(valid[None, :], queries @ items.T, -jnp.inf)
  scores, rows = jax.lax.top_k(scores, k)
  scores = jnp.concatenate([best_scores, scores], axis=1)
  rows = jnp.concatenate([best_rows, rows + offset], axis=1)
  scores, pick = jax.lax.top_k(scores, k)
  return scores, jnp.take_along_axis(rows, pick, axis=1)


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int, *, item_block: int = 1 << 20,
                max_score_bytes: int = 128 << 20) -> tuple[np.ndarray, np.ndarray]:
  """Exact (scores, rows) of the top `k` items by dot product, with jax.lax.top_k.

  Items go to the device a block at a time and queries a chunk at a time, so memory stays bounded
  for any catalog; the running top-k is merged block by block.
  """
  n = len(items)
  k = min(k, n)
  block = min(item_block, n)
  chunk = max(1, min(len(queries), max_score_bytes // (4 * block)))
  out_scores, out_rows = [], []
  q_all = np.asarray(queries, np.float32)
  num_chunks = -(-len(q_all) // chunk)
  best_s = [jnp.full((chunk, k), -jnp.inf, jnp.float32) for _ in range(num_chunks)]
  best_r = [jnp.zeros((chunk, k), jnp.int32) for _ in range(num_chunks)]
  for lo in range(0, n, block):
    part = np.asarray(items[lo:lo + block], np.float32)
    valid = np.arange(block) < len(part)
    part = jnp.asarray(np.pad(part, ((0, block - len(part)), (0, 0))))
    for c in range(num_chunks):
      q = q_all[c * chunk:(c + 1) * chunk]
      q = np.pad(q, ((0, chunk - len(q)), (0, 0)))
      best_s[c], best_r[c] = _block_top_k(q, part, valid, best_s[c], best_r[c], lo, k=k)
  for c in range(num_chunks):
    rows_here = len(q_all[c * chunk:(c + 1) * chunk])
    out_scores.append(np.asarray(best_s[c])[:rows_here])
    out_rows.append(np.asarray(best_r[c])[:rows_here].astype(np.int64))
  if not out_scores:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  return np.concatenate(out_scores), np.concatenate(out_rows)


def recall(rows: np.ndarray, queries: np.ndarray, items: np.ndarray, exact_scores: np.ndarray,
           k: int) -> float:
  """Tie-aware recall@k: the share of the first k returned items whose exact score reaches the
  k-th best exact score (items tied with the k-th are equally correct answers)."""
  k = min(k, exact_scores.shape[1])
  rows = rows[:, :k]
  valid = rows >= 0
  got = np.einsum("bd,bkd->bk", queries, np.asarray(items)[np.where(valid, rows, 0)])
  kth = exact_scores[:, k - 1:k]
  tol = 1e-5 * np.maximum(1.0, np.abs(kth))
  hits = valid & (got >= kth - tol)
  return float(hits.sum() / (len(rows) * k)) if len(rows) else 1.0


def measure(searcher, settings: Settings, queries: np.ndarray, items: np.ndarray,
            exact_scores: np.ndarray, ks: tuple[int, ...] = (10, GATE_K)) -> dict[str, float]:
  """recall@k and queries/s with k neighbours requested, for each k of `ks`."""
  out = {}
  for k in ks:
    k_eff = min(k, len(items))
    search(searcher, settings, queries[:64], k_eff)  # warm up thread pool and caches
    start = time.perf_counter()
    rows, _ = search(searcher, settings, queries, k_eff)
    seconds = time.perf_counter() - start
    out[f"recall@{k}"] = recall(rows, queries, items, exact_scores, k_eff)
    out[f"queries_per_s@{k}"] = len(queries) / max(seconds, 1e-9)
  return out


def calibrate(searcher, settings: Settings, auto: tuple[str, ...], queries: np.ndarray,
              items: np.ndarray, exact_scores: np.ndarray, floors: dict[str, float]
              ) -> tuple[Settings, list[dict]]:
  """The cheapest automatic search settings whose recall meets the floors (+ margin) on `queries`.

  Leaves searched bound the recall (an item in an unsearched leaf is never found); the re-order
  depth decides how much of that the quantized scores give away. So: first the fewest leaves that
  reach the target with the deepest re-ordering of the ladder, then the shallowest re-ordering that
  still reaches it with those leaves. Returns the settings and every trial (for the manifest).
  """
  targets = {name: floor + _CALIBRATION_MARGIN for name, floor in floors.items() if floor > 0}
  if settings.mode != "tree_ah" or not auto or not targets:
    return settings, []
  trials = []

  def meets(candidate: Settings) -> bool:
    m = measure(searcher, candidate, queries, items, exact_scores,
                ks=tuple(int(name.split("@")[1]) for name in targets))
    trials.append({"leaves_to_search": candidate.leaves_to_search,
                   "reorder_multiplier": candidate.reorder_multiplier, **m})
    return all(m[name] >= target for name, target in targets.items())

  def ladder(base: float, steps, cap: float, integer: bool) -> list:
    values = sorted({min(cap, max(1, round(base * f)) if integer else base * f) for f in steps})
    return values

  leaves = (ladder(settings.leaves_to_search, _LEAVES_LADDER, settings.num_leaves, True)
            if "leaves_to_search" in auto else [settings.leaves_to_search])
  multipliers = (ladder(settings.reorder_multiplier, _REORDER_LADDER, math.inf, False)
                 if "reorder_multiplier" in auto else [settings.reorder_multiplier])
  chosen = dataclasses.replace(settings, leaves_to_search=leaves[-1],
                               reorder_multiplier=multipliers[-1])
  for value in leaves:
    candidate = dataclasses.replace(chosen, leaves_to_search=value)
    if meets(candidate):
      chosen = candidate
      break
  for value in multipliers[:-1]:
    candidate = dataclasses.replace(chosen, reorder_multiplier=value)
    if meets(candidate):
      chosen = candidate
      break
  return chosen, trials


# ----------------------------------------------------------------------------- files


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def ids_digest(ids: np.ndarray) -> str:
  """A digest of an ID array (values and dtype kind), to tell catalogs apart."""
  ids = np.asarray(ids)
  h = hashlib.sha256(ids.dtype.kind.encode())
  h.update(np.ascontiguousarray(ids.astype(str) if ids.dtype.kind == "O" else ids).tobytes())
  return h.hexdigest()


def _write_text_atomic(path: str, text: str) -> None:
  """Temporary file + rename over `path` (on an object store: one PUT of a small object)."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; readers may be other users
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def list_files(directory: str) -> list[str]:
  """Files under `directory` (relative paths) that a manifest lists: all but itself and temps."""
  out = []
  for root, _, names in os.walk(directory):
    for name in names:
      if name != MANIFEST and not name.startswith(".tmp-"):
        out.append(os.path.relpath(os.path.join(root, name), directory))
  return sorted(out)


# ----------------------------------------------------------------------------- versions


class IndexStore:
  """The versions under WORKDIR/index and the LIVE pointer."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)

  def path(self, version: str) -> str:
    return os.path.join(self.root, version)

  def _all(self) -> list[str]:
    if not os.path.isdir(self.root):
      return []
    return sorted(d for d in os.listdir(self.root)
                  if d.startswith("v") and d[1:].isdigit() and os.path.isdir(self.path(d)))

  def versions(self) -> list[str]:
    """Complete versions (with a manifest), oldest first."""
    return [v for v in self._all() if os.path.exists(os.path.join(self.path(v), MANIFEST))]

  def incomplete(self) -> list[str]:
    return [v for v in self._all() if not os.path.exists(os.path.join(self.path(v), MANIFEST))]

  def live(self) -> str | None:
    path = os.path.join(self.root, LIVE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return f.read().strip() or None

  def new_version(self) -> str:
    """Claims the next version name (mkdir fails if another build took it first)."""
    os.makedirs(self.root, exist_ok=True)
    while True:
      existing = self._all()
      number = int(existing[-1][1:]) + 1 if existing else 1
      name = f"v{number:06d}"
      try:
        os.mkdir(self.path(name))
        return name
      except FileExistsError:
        continue

  def set_live(self, version: str) -> None:
    if version not in self.versions():
      raise IndexIntegrityError(f"index version {version} in {self.root} is not complete")
    _write_text_atomic(os.path.join(self.root, LIVE), version + "\n")

  def remove_incomplete(self, keep: str | None = None) -> list[str]:
    """Deletes versions left incomplete by crashed builds (all but `keep`)."""
    removed = [v for v in self.incomplete() if v not in (keep, self.live())]
    for v in removed:
      shutil.rmtree(self.path(v), ignore_errors=True)
    return removed

  def prune(self, keep: int) -> list[str]:
    """Deletes complete versions beyond the newest `keep`, never the live one."""
    live = self.live()
    versions = self.versions()
    doomed = [v for v in versions[:max(0, len(versions) - max(1, keep))] if v != live]
    for v in doomed:
      shutil.rmtree(self.path(v), ignore_errors=True)
    return doomed


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise IndexIntegrityError(f"{path} does not exist: {directory} is not a complete index version")
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise IndexIntegrityError(f"{path} is corrupt ({e}): rebuild the index "
                              "(python -m launch.build_index) or roll back (--rollback)")
  if manifest.get("format") != FORMAT:
    raise IndexIntegrityError(f"{path} has format {manifest.get('format')!r}, this code reads {FORMAT}")
  return manifest


def verify_files(directory: str, manifest: dict) -> None:
  """Raises IndexIntegrityError unless every file matches the manifest's size and checksum."""
  problems = []
  for name, want in sorted(manifest["files"].items()):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      problems.append(f"{name}: missing")
    elif os.path.getsize(path) != want["bytes"]:
      problems.append(f"{name}: {os.path.getsize(path)} bytes, the manifest says {want['bytes']}")
    elif sha256_file(path) != want["sha256"]:
      problems.append(f"{name}: checksum differs from the manifest")
  if problems:
    raise IndexIntegrityError(
        f"index version {directory} is damaged:\n  " + "\n  ".join(problems[:10])
        + "\nRebuild it (python -m launch.build_index) or roll back (--rollback).")


@dataclasses.dataclass
class LoadedIndex:
  """A verified index version, ready to search."""

  directory: str
  manifest: dict
  settings: Settings
  searcher: Any
  item_ids: np.ndarray  # original IDs; datapoint r is item row r of the catalog
  item_embeddings: np.ndarray  # float32 [N, D], memory-mapped

  @property
  def version(self) -> str:
    return self.manifest["version"]

  @property
  def num_items(self) -> int:
    return int(self.manifest["num_items"])

  def search(self, queries: np.ndarray, k: int, *, precise_k: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    return search(self.searcher, self.settings, queries, min(k, self.num_items),
                  precise_k=precise_k)

  def check_model(self, *, dim: int, step: int, item_ids: np.ndarray) -> None:
    """Raises IndexMismatchError unless this index was built for this model and catalog."""
    m = self.manifest
    problems = []
    if m["dim"] != dim:
      problems.append(f"embedding dimension {m['dim']} in the index, {dim} in the model")
    if m["model_step"] != step:
      problems.append(f"built from checkpoint step {m['model_step']}, the model is at step {step}")
    if m["num_items"] != len(item_ids):
      problems.append(f"{m['num_items']} items in the index, {len(item_ids)} in the catalog")
    elif m["item_ids_sha256"] != ids_digest(item_ids):
      problems.append("the item IDs differ from the catalog's")
    if problems:
      raise IndexMismatchError(
          f"index {self.directory} does not match the model:\n  " + "\n  ".join(problems)
          + "\nRebuild the index for this model: python -m launch.build_index --workdir=...")


def open_version(directory: str, *, num_threads: int = 0, verify: bool = True) -> LoadedIndex:
  """Loads one index version, checking its files against the manifest first."""
  manifest = read_manifest(directory)
  if verify:
    verify_files(directory, manifest)
  settings = Settings(**manifest["settings"])
  try:
    searcher = _scann().load_searcher(os.path.join(directory, SCANN_DIR))
  except Exception as e:  # ScaNN raises assorted errors on unreadable assets
    raise IndexIntegrityError(f"the ScaNN searcher in {directory} cannot be loaded: {e}") from e
  if num_threads:
    searcher.set_num_threads(num_threads)
  ids, items, _ = emb_lib.read_embeddings(os.path.join(directory, EMBEDDINGS_DIR), "item")
  return LoadedIndex(directory, manifest, settings, searcher, ids, items)


def live_manifest(root: str) -> dict | None:
  """The manifest of the live version under `root` if there is one and its files verify."""
  store = IndexStore(root)
  live = store.live()
  if live is None:
    return None
  try:
    manifest = read_manifest(store.path(live))
    verify_files(store.path(live), manifest)
  except IndexIntegrityError:
    return None
  return manifest


def open_live(root: str, *, num_threads: int = 0) -> LoadedIndex:
  store = IndexStore(root)
  live = store.live()
  if live is None:
    raise FileNotFoundError(
        f"no live index in {store.root}: build one with python -m launch.build_index "
        f"--workdir={os.path.dirname(store.root)}")
  return open_version(store.path(live), num_threads=num_threads)


# ----------------------------------------------------------------------------- jobs


def _require_checkpoint(workdir: str) -> None:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not any(d.isdigit() for d in os.listdir(directory)):
    raise FileNotFoundError(
        f"no checkpoint in {directory}: train first with python -m launch.train --config=... "
        f"--workdir={workdir}")


def _broadcast_name(name: str | None) -> str:
  """Process 0's version name on every process."""
  if jax.process_count() == 1:
    return name
  number = np.asarray(int(name[1:]) if name else 0, np.int64)
  return f"v{int(multihost_utils.broadcast_one_to_all(number)):06d}"


def _sample_users(num_users: int, n_cal: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint calibration and validation user samples (overlapping only if users are too few)."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(num_users)
  if num_users >= n_cal + n_val:
    return np.sort(order[:n_cal]), np.sort(order[n_cal:n_cal + n_val])
  val = np.sort(order[:min(n_val, num_users)])
  return np.sort(order[:min(n_cal, num_users)]), val


def build_index(workdir: str, config: ml_collections.ConfigDict | None = None, *,
                hook: Hook | None = None) -> dict:
  """Builds, validates and publishes a new index version for the latest checkpoint of `workdir`.

  Returns the manifest. Raises IndexValidationError (nothing published) below the recall floors.
  """
  # Imported here: the experiment modules pull in orbax, grain and TFDS, which searching an index
  # (benchmarks, scoring) does not need.
  hook = hook or (lambda stage: None)
  start = time.perf_counter()
  config = serving_config(config if config is not None else load_workdir_config(workdir))
  cfg = config.index
  floors = {"recall@10": float(cfg.min_recall_at_10), "recall@100": float(cfg.min_recall_at_100)}
  _require_checkpoint(workdir)
  s = load_for_eval(config, workdir)
  step = int(s.state.step)
  schema = s.data.schema
  num_items = schema.num_items
  settings, auto = choose_settings(num_items, cfg)  # fail on bad settings before any work
  params, catalog, mesh = emb_lib.local_view(s.state.params, s.catalog, s.mesh)
  embedder = emb_lib.Embedder(s.graphdef, params, catalog, mesh, cfg.embed_batch_size)
  item_ids = np.asarray(s.data.table("item", "raw_id"))

  store = IndexStore(os.path.join(workdir, "index"))
  version = None
  if jax.process_index() == 0:
    version = store.new_version()  # numbered after every existing version, complete or not
    store.remove_incomplete(keep=version)
  version = _broadcast_name(version)
  directory = store.path(version)
  block = emb_lib.process_block(num_items)  # this process's items
  reporter = Reporter(os.path.join(workdir, "tensorboard", "index"),
                      total_steps=block.stop - block.start, initial_step=0, desc="embed items",
                      unit="item")
  embed_start = time.perf_counter()
  try:
    emb_lib.write_embeddings(os.path.join(directory, EMBEDDINGS_DIR), "item", embedder,
                             np.arange(num_items), item_ids, step, on_batch=reporter.step)
  finally:
    reporter.close()
  embed_seconds = time.perf_counter() - embed_start
  hook("embedded")

  status, manifest, error = 0, None, None
  if jax.process_index() == 0:
    try:
      manifest = _train_validate_publish(
          store, version, embedder, s, settings, auto, floors, cfg, step, item_ids, hook,
          start, embed_seconds, reporter.write)
    except BaseException as e:  # reported to the other processes, then raised here
      status, error = 1, e
  if jax.process_count() > 1:
    status = int(multihost_utils.broadcast_one_to_all(np.asarray(status, np.int32)))
  if error is not None:
    raise error
  if status:
    raise RuntimeError("building the index failed on process 0: see its log")
  if manifest is None:
    manifest = read_manifest(directory)
  return manifest


def _train_validate_publish(store: IndexStore, version: str, embedder: emb_lib.Embedder, s,
                            settings: Settings, auto: tuple[str, ...], floors: dict[str, float],
                            cfg: ml_collections.ConfigDict, step: int, item_ids: np.ndarray,
                            hook: Hook, start: float, embed_seconds: float, log) -> dict:
  directory = store.path(version)
  published = False
  try:
    ids, items, _ = emb_lib.read_embeddings(os.path.join(directory, EMBEDDINGS_DIR), "item")
    if ids_digest(ids) != ids_digest(item_ids):
      raise IndexIntegrityError(f"the item embeddings in {directory} are not in catalog order")
    items = np.ascontiguousarray(items)  # ScaNN and the exact search read it all anyway
    t = time.perf_counter()
    searcher = build_searcher(items, settings, cfg.num_threads)
    train_seconds = time.perf_counter() - t
    log(f"built a {settings.mode} index over {len(items)} items x {items.shape[1]} dims in "
        f"{train_seconds:.1f}s")
    hook("trained")

    t = time.perf_counter()
    cal_users, val_users = _sample_users(s.data.schema.num_users, cfg.calibration_queries,
                                         cfg.validation_queries, cfg.seed)
    cal_q = embedder.embed("query", cal_users)
    val_q = embedder.embed("query", val_users)
    k = min(GATE_K, len(items))
    if cfg.calibrate:
      cal_exact, _ = exact_top_k(cal_q, items, k)
      settings, trials = calibrate(searcher, settings, auto, cal_q, items, cal_exact, floors)
    else:
      trials = []
    val_exact, _ = exact_top_k(val_q, items, k)
    validation = measure(searcher, settings, val_q, items, val_exact)
    validation["num_queries"] = len(val_q)
    validate_seconds = time.perf_counter() - t
    summary = ", ".join(f"{name}={validation[name]:.4f}" for name in ("recall@10", "recall@100"))
    log(f"validation on {len(val_q)} queries: {summary}, "
        f"{validation['queries_per_s@100']:.0f} queries/s at 100 neighbours")
    failed = [f"{name} {validation[name]:.4f} < {floor}" for name, floor in floors.items()
              if validation[name] < floor]
    if failed:
      raise IndexValidationError(
          f"the new index failed validation ({'; '.join(failed)}) with settings "
          f"{dataclasses.asdict(settings)}; nothing was published and "
          f"{store.live() or 'no version'} stays live. Raise config.index.leaves_to_search / "
          "reorder_multiplier / num_leaves, or lower config.index.min_recall_at_* .")

    os.makedirs(os.path.join(directory, SCANN_DIR), exist_ok=True)
    searcher.serialize(os.path.join(directory, SCANN_DIR), relative_path=True)
    hook("serialized")
    files = {name: {"bytes": os.path.getsize(os.path.join(directory, name)),
                    "sha256": sha256_file(os.path.join(directory, name))}
             for name in list_files(directory)}
    manifest = {
        "format": FORMAT,
        "version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_step": step,
        "num_items": int(len(items)),
        "dim": int(items.shape[1]),
        "distance": "dot_product",
        "item_ids_sha256": ids_digest(item_ids),
        "data": s.data.path,
        "settings": dataclasses.asdict(settings),
        "floors": floors,
        "calibration": trials,
        "validation": validation,
        "build_seconds": {"embed": embed_seconds, "train": train_seconds,
                          "validate": validate_seconds,
                          "total": time.perf_counter() - start},
        "scann_version": _scann_version(),
        "files": files,
    }
    write_json_atomic(os.path.join(directory, MANIFEST), manifest)
    published = True  # complete from here on: a crash leaves a valid, unpublished version
    hook("manifest")
    store.set_live(version)
    hook("live")
    removed = store.prune(cfg.keep_versions)
    if removed:
      log(f"removed old index versions {', '.join(removed)}")
    return manifest
  except Exception:
    # A failed or refused build leaves nothing behind. (A hard crash cannot clean up: the next
    # build removes the incomplete version, which nothing reads since it has no manifest.)
    if not published:
      shutil.rmtree(directory, ignore_errors=True)
    raise


def _scann_version() -> str:
  try:
    from importlib.metadata import version  # pylint: disable=g-import-not-at-top
    return version("scann")
  except Exception:  # pylint: disable=broad-except
    return "unknown"


def rollback(workdir: str) -> dict:
  """Makes the newest complete version older than the live one live again (verified first)."""
  store = IndexStore(os.path.join(workdir, "index"))
  live = store.live()
  if live is None:
    raise FileNotFoundError(f"no live index in {store.root}: nothing to roll back")
  older = [v for v in store.versions() if v < live]
  if not older:
    raise ValueError(f"no version older than the live {live} is kept in {store.root}: nothing to "
                     "roll back to (config.index.keep_versions sets how many are kept)")
  target = older[-1]
  manifest = read_manifest(store.path(target))
  verify_files(store.path(target), manifest)
  store.set_live(target)
  return {"live": target, "previous": live, "model_step": manifest["model_step"],
          "validation": manifest["validation"]}
