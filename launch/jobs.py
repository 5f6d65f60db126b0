"""The inference jobs of a work directory, in order: evaluate, build the item index, score users.

Each job restores the model's parameters only (Workdir.restore_params: the best checkpoint by
validation metric when there is one, else the latest), never an optimizer, and sequences the
library pieces across JAX processes: every process embeds its own block of rows, process 0 does
the single-writer steps (publishing an index version, the _SUCCESS file), and the others wait at a
barrier. The entry points (`launch.evaluate`, `launch.build_index`, `launch.score`, `launch.run`)
add flags and printing around these functions.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from two_tower import atomic, sharding
from two_tower import candidates as cand
from two_tower import embeddings as emb_lib
from two_tower import index as index_lib
from two_tower.errors import UserError
from two_tower.evaluation import Evaluator
from two_tower.index_store import (EMBEDDINGS_DIR, IndexMismatchError, IndexStore, ids_digest,
                                   live_manifest, open_live, read_manifest)
from two_tower.reporting import Reporter
from two_tower.search import choose_settings
from two_tower.workdir import Model, Workdir

Hook = Callable[[str], None]  # called with a stage name; tests use it to simulate crashes


def _no_hook(stage: str) -> None:
  del stage


def evaluate(workdir: str, split: str | None = None, config: ml_collections.ConfigDict | None = None
             ) -> dict[str, float]:
  """Evaluates the model on `split` (default eval.split); writes eval/metrics[_<split>].json.

  For synthetic data, the planted oracle's metrics go to eval/oracle_metrics[_<split>].json, the
  ceiling the model is measured against."""
  wd = Workdir(workdir)
  config = wd.config() if config is None else config
  model = wd.load_model(config)
  split = split or config.eval.split
  evaluator = Evaluator(model.data, model.catalog, split, config.eval.ks, config.eval.user_batch_size,
                        graphdef=model.graphdef, mesh=model.mesh)
  metrics = evaluator(model.params)
  suffix = "" if split == config.eval.split else f"_{split}"
  if jax.process_index() == 0:
    atomic.write_json(wd.path("eval", f"metrics{suffix}.json"), metrics)
    if model.data.has_planted():
      atomic.write_json(wd.path("eval", f"oracle_metrics{suffix}.json"),
                        evaluator.evaluate_scores(model.data.planted().scores))
  return metrics


def _local_embedder(model: Model, batch_size: int) -> tuple[emb_lib.Embedder, object]:
  """An embedder over this process's devices alone, and the parameters it uses (see local_view)."""
  params, catalog, mesh = emb_lib.local_view(model.params, model.catalog, model.mesh)
  return emb_lib.Embedder(model.graphdef, catalog, mesh, batch_size), params


def _broadcast_version(name: str | None) -> str:
  """Process 0's version name on every process."""
  if jax.process_count() == 1:
    return name
  number = np.asarray(int(name[1:]) if name else 0, np.int64)
  return f"v{int(multihost_utils.broadcast_one_to_all(number)):06d}"


def build_index(workdir: str, config: ml_collections.ConfigDict | None = None, *,
                hook: Hook = _no_hook, queries_from: str | None = None) -> dict:
  """Builds, validates and publishes a new index version of the model; returns its manifest.
  `queries_from`: another work directory whose model and users give the calibration and
  validation queries (the nightly job's day without users carries its parent's model).

  Raises IndexValidationError (nothing published, the previous version stays live) below the
  recall floors of config.index."""
  wd = Workdir(workdir)
  config = wd.config() if config is None else config
  cfg = config.index
  model = wd.load_model(config)
  num_items = model.schema.num_items
  choose_settings(num_items, cfg)  # fail on bad settings before any work
  embedder, params = _local_embedder(model, cfg.embed_batch_size)
  query_model, query_embedder, query_params = model, embedder, params
  if queries_from is not None:
    query_model = Workdir(queries_from).load_model()
    query_embedder, query_params = _local_embedder(query_model, cfg.embed_batch_size)
  item_ids = np.asarray(model.data.table("item", "raw_id"))

  store = IndexStore(wd.path("index"))
  version = None
  if jax.process_index() == 0:
    version = store.new_version()  # numbered after every existing version, complete or not
    store.remove_incomplete(keep=version)
  version = _broadcast_version(version)
  block = emb_lib.process_block(num_items)  # this process's items
  reporter = Reporter(wd.path("tensorboard", "index"), total_steps=block.stop - block.start,
                      initial_step=0, desc="embed items", unit="item")
  embed_start = time.perf_counter()
  try:
    emb_lib.write_embeddings(os.path.join(store.path(version), EMBEDDINGS_DIR), "item", embedder,
                             params, np.arange(num_items), item_ids, model.step,
                             on_batch=reporter.step)
  finally:
    reporter.close()
  embed_seconds = time.perf_counter() - embed_start
  hook("embedded")

  status, manifest, error = 0, None, None
  if jax.process_index() == 0:
    try:
      manifest = index_lib.build_version(
          store, version, item_ids=item_ids, num_users=query_model.schema.num_users,
          embed_queries=lambda users: query_embedder.embed(query_params, "query", users), cfg=cfg,
          step=model.step, data_path=model.data.path, embed_seconds=embed_seconds, hook=hook,
          log=reporter.write)
    except BaseException as e:  # reported to the other processes, then raised here
      status, error = 1, e
  if jax.process_count() > 1:
    status = int(multihost_utils.broadcast_one_to_all(np.asarray(status, np.int32)))
  if error is not None:
    raise error
  if status:
    raise RuntimeError("building the index failed on process 0: see its log")
  return manifest if manifest is not None else read_manifest(store.path(version))


def live_index_of_model(workdir: str) -> dict | None:
  """The live index's manifest if it was built from the model's checkpoint (a rerun of the main
  job then reuses it), else None."""
  wd = Workdir(workdir)
  manifest = live_manifest(wd.path("index"))
  _, step = wd.model_checkpoint()
  return manifest if manifest is not None and manifest["model_step"] == step else None


def generate_candidates(workdir: str, output: str, *, user_ids_file: str | None = None,
                        top_k: int | None = None, config: ml_collections.ConfigDict | None = None,
                        hook: Hook = _no_hook) -> dict:
  """Writes every user's (or the listed users') top-K candidates from the live index to `output`
  (see two_tower.candidates); returns the _SUCCESS summary."""
  start = time.perf_counter()
  wd = Workdir(workdir)
  config = wd.config() if config is None else config
  cfg = config.score
  top_k = int(top_k or cfg.top_k)
  if top_k < 1:
    raise UserError(f"top-K must be at least 1, got {top_k}")
  wd.model_checkpoint()  # "no checkpoint" (train first) before anything about the index
  index = open_live(wd.path("index"), num_threads=config.index.num_threads)
  step = int(index.manifest["model_step"])
  # The live index and the query tower must come from one checkpoint: score with the index's.
  try:
    wd.model_checkpoint(step)
  except UserError:
    raise IndexMismatchError(
        f"the live index {index.version} was built from checkpoint step {step}, which is no longer "
        f"in {workdir}: rebuild the index with python -m launch.build_index --workdir={workdir}"
    ) from None
  latest = wd.checkpointer().latest_step()
  if cfg.require_latest_checkpoint and step != latest:
    raise IndexMismatchError(
        f"the live index {index.version} was built from step {step} but the latest checkpoint is "
        f"step {latest} (score.require_latest_checkpoint): rebuild the index")
  # Everything that can be refused is checked before the model is loaded.
  wd.bind(config)
  data = wd.prepare_data(config)
  schema = data.schema
  if top_k > schema.num_items:
    raise UserError(f"top-K={top_k} is larger than the catalog ({schema.num_items} items): "
                    "lower --top_k / config.score.top_k")
  item_ids = np.asarray(data.table("item", "raw_id"))
  user_raw = np.asarray(data.table("user", "raw_id"))
  if user_ids_file:
    users = cand.read_user_ids(user_ids_file, user_raw)
  else:
    users = cand.UserList(np.arange(schema.num_users, dtype=np.int64), [], 0)
  if users.unknown and jax.process_index() == 0:
    print(f"warning: {len(users.unknown)} user IDs of {user_ids_file} are not in the catalog and "
          f"are skipped (e.g. {users.unknown[:5]}); listed in {os.path.join(output, cand.UNKNOWN_IDS)}")
  if cfg.exclude_history:
    exclusions = cand.Exclusions.from_pairs(*data.pairs("train"), schema.num_users, schema.num_items)
  else:
    exclusions = cand.Exclusions.none(schema.num_users, schema.num_items)
  overfetch = cand.default_overfetch(exclusions, users.rows, cfg.overfetch)
  per_shard = max(1, int(cfg.users_per_shard))
  num_shards = -(-len(users.rows) // per_shard)
  # Everything the shards' contents depend on (batch_size: XLA's float results can differ in the
  # last bit between batch shapes), so that a resumed job equals an uninterrupted one.
  job = {"model_step": step, "index_version": index.version, "top_k": top_k,
         "exclude_history": bool(cfg.exclude_history), "num_users": int(len(users.rows)),
         "users_sha256": ids_digest(users.rows), "users_per_shard": per_shard,
         "num_shards": num_shards, "overfetch": overfetch, "batch_size": int(cfg.batch_size)}
  done = cand.check_output(output, job) if os.path.isdir(output) else None
  if done is not None:
    return done

  model = wd.restore_params(config, data, sharding.make_mesh(config.mesh), step)
  dim = nnx.merge(model.graphdef, model.params).embedding_dim
  index.check_model(dim=dim, step=model.step, item_ids=item_ids)

  os.makedirs(output, exist_ok=True)
  if jax.process_index() == 0:
    if not os.path.exists(os.path.join(output, cand.JOB)):
      atomic.write_json(os.path.join(output, cand.JOB), job)
    if users.unknown:
      atomic.write_text(os.path.join(output, cand.UNKNOWN_IDS), "\n".join(users.unknown) + "\n")
  cand.remove_stale_temps(output)

  mine = [i for i in range(num_shards) if i % jax.process_count() == jax.process_index()]
  shard_users = lambda i: users.rows[i * per_shard:(i + 1) * per_shard]  # noqa: E731
  pending = [i for i in mine if (cand.shard_metadata(os.path.join(output, cand.shard_name(i)))
                                 or {}).get("job") != job]
  done_users = sum(len(shard_users(i)) for i in mine if i not in pending)
  total_users = sum(len(shard_users(i)) for i in mine)
  embedder, params = _local_embedder(model, cfg.batch_size)
  generator = cand.Generator(index, lambda rows: embedder.stream(params, "query", rows), exclusions,
                             top_k, overfetch)
  reporter = Reporter(wd.path("tensorboard", "score"), total_steps=total_users,
                      initial_step=done_users, desc="score", unit="user")
  if pending and len(pending) < len(mine):
    reporter.write(f"resuming: {len(mine) - len(pending)} of {len(mine)} shards already written")
  run_start = time.perf_counter()
  try:
    scored = cand.write_shards(generator, output, job, {i: shard_users(i) for i in pending},
                               user_raw=user_raw, item_ids=item_ids, on_users=reporter.step,
                               hook=hook)
    seconds = time.perf_counter() - run_start
    if scored:
      reporter.scalars(step, {"users_per_s": scored / max(seconds, 1e-9)}, "score/")
  finally:
    reporter.close()

  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"two_tower:candidates:{output}")
  success = None
  if jax.process_index() == 0:
    success = cand.write_success(output, job, num_shards, users, overfetch,
                                 time.perf_counter() - start,
                                 scored / max(seconds, 1e-9) if scored else None)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"two_tower:candidates_done:{output}")
  if success is None:
    with open(os.path.join(output, cand.SUCCESS)) as f:
      success = json.load(f)
  return success
