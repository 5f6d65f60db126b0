"""Nearest-neighbour search over item embeddings: ScaNN, and exact top-k as the reference.

Scores are the model's own: the dot product of a query embedding (temperature folded in) with an
item embedding. The configuration is chosen from the catalog size N (every value can be set in
config.index; 0 means "by the rule"):

  * N <= brute_force_max_items (20,000): exact brute force (float32, or int8 with
    brute_force_int8). Exact search over a small catalog is as fast as a tree and never misses.
  * otherwise tree partitioning + asymmetric hashing (AH) with anisotropic quantization, then exact
    float32 re-ordering of the best AH candidates:
      num_leaves           round(sqrt(N))                  ~sqrt(N) points per leaf
      leaves_to_search     max(8, ceil(2% of num_leaves))  then calibrated (two_tower.calibration)
      reorder depth        reorder_multiplier (4) x max(neighbours requested, 30), calibrated
      training_sample_size min(N, max(100,000, 64 x num_leaves))
      dims_per_block 2, anisotropic_quantization_threshold 0.2 (ScaNN's recommendations)

Recall is tie-aware: a returned item counts as a hit when its exact score reaches the K-th exact
score.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from two_tower.errors import ConfigError

GATE_K = 100  # the depth recall@100 (the default gate) is measured at
MIN_REORDER_K = 30

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
    raise ConfigError("the catalog is empty: there is nothing to index")
  if num_items <= cfg.brute_force_max_items:
    return Settings("brute_force", int8=bool(cfg.brute_force_int8)), ()
  num_leaves = cfg.num_leaves or max(1, round(math.sqrt(num_items)))
  if num_leaves > num_items:
    raise ConfigError(f"index.num_leaves={num_leaves} is larger than the catalog ({num_items} items)")
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


def scann_ops():
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
  scann_ops_pybind = scann_ops()
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
  # Full float32: the exact top K is the index gate's ground truth, and a GPU's default (TF32,
  # about 1e-3 relative) reorders near-ties (on an H100 it moved a gate's recall@10 by 0.025).
  scores = jnp.matmul(queries, items.T, precision=jax.lax.Precision.HIGHEST)
  scores = jnp.where(valid[None, :], scores, -jnp.inf)
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


def recall_per_query(rows: np.ndarray, queries: np.ndarray, items: np.ndarray,
                     exact_scores: np.ndarray, k: int) -> np.ndarray:
  """Tie-aware recall@k of each query: the share of the first k returned items whose exact score
  reaches the k-th best exact score (items tied with the k-th are equally correct answers)."""
  k = min(k, exact_scores.shape[1])
  rows = rows[:, :k]
  valid = rows >= 0
  got = np.einsum("bd,bkd->bk", queries, np.asarray(items)[np.where(valid, rows, 0)])
  kth = exact_scores[:, k - 1:k]
  tol = 1e-5 * np.maximum(1.0, np.abs(kth))
  return (valid & (got >= kth - tol)).mean(1)


def recall(rows: np.ndarray, queries: np.ndarray, items: np.ndarray, exact_scores: np.ndarray,
           k: int) -> float:
  """Tie-aware recall@k over all queries (see `recall_per_query`)."""
  per_query = recall_per_query(rows, queries, items, exact_scores, k)
  return float(per_query.mean()) if len(per_query) else 1.0
