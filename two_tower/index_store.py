"""Published item-index versions: the version store, the LIVE pointer, manifests and loading.

Layout of WORKDIR/index:

  LIVE                       the name of the live version (a one-line file, replaced atomically)
  v000007/manifest.json      written last: a version without it is incomplete and never used
  v000007/embeddings/...     item embeddings with their original IDs (two_tower.embeddings)
  v000007/scann/...          the serialized ScaNN searcher

Readers only follow LIVE, and version directories are never renamed: a version is complete once its
manifest exists. LIVE is replaced by writing a temporary file and renaming it over the old one
(`os.replace`, atomic on POSIX file systems), so a crash at any moment leaves either the old or the
new version live. On an object store, which has no rename, the same design holds if LIVE is written
as a single small object PUT (atomic there) after the manifest. The last index.keep_versions
complete versions are kept (the live one always); `rollback` makes the newest complete version older
than the live one live again. Loading checks every file against the manifest's sizes and SHA-256
checksums.

One build at a time per work directory: a build deletes incomplete versions it finds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np

from two_tower import atomic
from two_tower import embeddings as emb_lib
from two_tower.errors import MissingArtifactError, UserError
from two_tower.search import Settings, scann_ops, search

MANIFEST = "manifest.json"
LIVE = "LIVE"
EMBEDDINGS_DIR = "embeddings"
SCANN_DIR = "scann"
FORMAT = 1


class IndexIntegrityError(UserError):
  """An index version whose files are missing, truncated or corrupt."""


class IndexMismatchError(UserError):
  """An index that does not belong to the model or catalog it is used with."""


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


def list_files(directory: str) -> list[str]:
  """Files under `directory` (relative paths) that a manifest lists: all but itself and temps."""
  out = []
  for root, _, names in os.walk(directory):
    for name in names:
      if name != MANIFEST and not name.startswith("."):  # not temporary files
        out.append(os.path.relpath(os.path.join(root, name), directory))
  return sorted(out)


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
    atomic.write_text(os.path.join(self.root, LIVE), version + "\n")

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
    searcher = scann_ops().load_searcher(os.path.join(directory, SCANN_DIR))
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
    raise MissingArtifactError(
        f"no live index in {store.root}: build one with python -m launch.build_index "
        f"--workdir={os.path.dirname(store.root)}")
  return open_version(store.path(live), num_threads=num_threads)


def rollback(root: str) -> dict:
  """Makes the newest complete version older than the live one live again (verified first)."""
  store = IndexStore(root)
  live = store.live()
  if live is None:
    raise MissingArtifactError(f"no live index in {store.root}: nothing to roll back")
  older = [v for v in store.versions() if v < live]
  if not older:
    raise UserError(f"no version older than the live {live} is kept in {store.root}: nothing to "
                     "roll back to (config.index.keep_versions sets how many are kept)")
  target = older[-1]
  manifest = read_manifest(store.path(target))
  verify_files(store.path(target), manifest)
  store.set_live(target)
  return {"live": target, "previous": live, "model_step": manifest["model_step"],
          "validation": manifest["validation"]}
