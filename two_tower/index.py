"""Building one index version: train the searcher, calibrate, validate, publish.

Given the item embeddings of a new version (already written into its directory) and samples of real
query embeddings, `build_version` trains the ScaNN searcher, calibrates the automatic search
settings on one query sample (two_tower.calibration), and measures recall@10 and recall@100 against
exact top-K on a second, disjoint sample, together with queries/s. Below index.min_recall_at_10 /
min_recall_at_100 nothing is published, the version is deleted, and the previous version stays live
(IndexValidationError). Otherwise it serializes the searcher, writes the manifest (every file's
size and SHA-256), makes the version live and prunes old versions. The job around it (restoring the
model, embedding the catalog on every process) is launch/jobs.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import time
from typing import Callable

import ml_collections
import numpy as np

from two_tower import atomic
from two_tower import embeddings as emb_lib
from two_tower.calibration import calibrate, measure, sample_users
from two_tower.errors import UserError
from two_tower.index_store import (EMBEDDINGS_DIR, FORMAT, MANIFEST, SCANN_DIR, IndexIntegrityError,
                                   IndexStore, ids_digest, list_files, sha256_file)
from two_tower.search import GATE_K, build_searcher, choose_settings, exact_top_k

Hook = Callable[[str], None]  # called with a stage name; tests use it to simulate crashes


class IndexValidationError(UserError):
  """An index that failed the validation gate (nothing was published)."""


def floors(cfg: ml_collections.ConfigDict) -> dict[str, float]:
  """The validation gate's recall floors, from config.index."""
  return {"recall@10": float(cfg.min_recall_at_10), "recall@100": float(cfg.min_recall_at_100)}


def build_version(store: IndexStore, version: str, *, item_ids: np.ndarray, num_users: int,
                  embed_queries: Callable[[np.ndarray], np.ndarray], cfg: ml_collections.ConfigDict,
                  step: int, data_path: str, embed_seconds: float, hook: Hook = lambda stage: None,
                  log: Callable[[str], None] = print) -> dict:
  """Trains, calibrates, validates and publishes `version`, whose item embeddings (catalog order,
  original IDs `item_ids`) are already written; `embed_queries(user rows)` gives query embeddings.
  Returns the manifest; raises IndexValidationError (and deletes the version) below the floors."""
  start = time.perf_counter()
  settings, auto = choose_settings(len(item_ids), cfg)
  gate = floors(cfg)
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
    cal_users, val_users = sample_users(num_users, cfg.calibration_queries,
                                        cfg.validation_queries, cfg.seed)
    cal_q, val_q = embed_queries(cal_users), embed_queries(val_users)
    k = min(GATE_K, len(items))
    if cfg.calibrate:
      cal_exact, _ = exact_top_k(cal_q, items, k)
      settings, trials = calibrate(searcher, settings, auto, cal_q, items, cal_exact, gate,
                                   len(val_q))
    else:
      trials = []
    val_exact, _ = exact_top_k(val_q, items, k)
    validation = measure(searcher, settings, val_q, items, val_exact)
    validation["num_queries"] = len(val_q)
    validate_seconds = time.perf_counter() - t
    summary = ", ".join(f"{name}={validation[name]:.4f}" for name in ("recall@10", "recall@100"))
    log(f"validation on {len(val_q)} queries: {summary}, "
        f"{validation['queries_per_s@100']:.0f} queries/s at 100 neighbours")
    failed = [f"{name} {validation[name]:.4f} < {floor}" for name, floor in gate.items()
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
        "data": data_path,
        "settings": dataclasses.asdict(settings),
        "floors": gate,
        "calibration": trials,
        "validation": validation,
        "build_seconds": {"embed": embed_seconds, "train": train_seconds,
                          "validate": validate_seconds,
                          "total": embed_seconds + time.perf_counter() - start},
        "scann_version": _scann_version(),
        "files": files,
    }
    atomic.write_json(os.path.join(directory, MANIFEST), manifest)
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
