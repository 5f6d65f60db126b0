"""Candidate-generation benchmark: 100,000 users x 1M items, top 100, end to end.

  python -m benchmarks.candidates
  python -m benchmarks.candidates --num_users=20000 --num_items=200000     # quicker

End to end is what `launch.score` does per user: query-tower embedding (jitted, batched), index
search, training-history exclusion with over-fetch (and re-search of the users who need it), exact
re-scoring, and atomic Parquet shards, through the same code (two_tower.candidates). Setup is timed
separately: item-tower embeddings written to disk, the ScaNN build, calibration and validation as in
`launch.build_index`, and loading the index with its checksums verified.

The model is a real two-tower TwoTower (user-ID + history query tower, item-ID item tower, one
64-wide projection each, L2-normalised, temperature 0.1) whose parameters are planted instead of
trained: ID embeddings come from the trained-like latent space of benchmarks/index_search.py, and
both projections map that space the same way, so a user's queries point at their cluster's items.
Each user's training history (lognormal length, median 20; 80% from the user's own cluster) is
both the history feature and the exclusion list, so exclusions really remove top-ranked items.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from benchmarks.index_search import LatentSpace
from configs.base import get_base_config
from pipelines.schema import Feature, Schema
from two_tower import candidates
from two_tower import embeddings as emb_lib
from two_tower import index as index_lib
from two_tower.index_store import EMBEDDINGS_DIR, IndexStore, LoadedIndex, open_live
from two_tower.search import exact_top_k
from two_tower.model import TwoTower
from two_tower.reporting import Reporter

LATENT_DIM = 32  # ID-embedding width
OUT_DIM = 64  # tower output width
HISTORY = 20  # history feature length


def _histories(user_cluster: np.ndarray, item_cluster: np.ndarray, num_items: int, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """(user rows, item rows) of every training interaction: mostly items of the user's cluster."""
  rng = np.random.default_rng(seed)
  n = len(user_cluster)
  lengths = np.clip(np.round(np.exp(rng.normal(np.log(20), 0.9, n))), 1, 1000).astype(np.int64)
  users = np.repeat(np.arange(n), lengths)
  by_cluster = np.argsort(item_cluster, kind="stable")
  starts = np.searchsorted(item_cluster[by_cluster], np.arange(item_cluster.max() + 2))
  c = user_cluster[users]
  size = starts[c + 1] - starts[c]
  own = by_cluster[starts[c] + (rng.random(len(users)) * size).astype(np.int64)]
  anywhere = rng.integers(0, num_items, len(users))
  items = np.where((rng.random(len(users)) < 0.8) & (size > 0), own, anywhere)
  pairs = np.unique(np.stack([users, items], 1), axis=0)
  return pairs[:, 0], pairs[:, 1]


def planted_model(num_users: int, num_items: int, seed: int = 0):
  """(graphdef, params, host catalog, training pairs) of a two-tower with planted parameters."""
  features = (Feature("user_id", "user", "id", vocab_size=num_users + 2),
              Feature("history", "user", "history", vocab_size=num_items + 2, length=HISTORY),
              Feature("item_id", "item", "id", vocab_size=num_items + 2))
  schema = Schema(features, num_users, num_items, HISTORY, {"train": 1})
  cfg = get_base_config().model
  cfg.update(query_features=("user_id", "history"), item_features=("item_id",),
             id_embedding_dim=LATENT_DIM, hidden_dims=(), output_dim=OUT_DIM, l2_normalize=True,
             temperature=0.1)
  model = TwoTower(schema, cfg, rngs=nnx.Rngs(seed))
  space = LatentSpace(LATENT_DIM, seed=seed)
  item_latent, item_cluster = space.sample(num_items, seed=seed + 1)
  user_latent, user_cluster = space.sample(num_users, seed=seed + 2)
  # Vocabulary row = catalog row + 2 (0 is padding, 1 the out-of-vocabulary bucket).
  pad = lambda x: jnp.asarray(np.concatenate([np.zeros((2, x.shape[1]), np.float32), x]))  # noqa: E731
  q_tables, i_tables = model.query_tower.embedding.tables, model.item_tower.embedding.tables
  i_tables["item_id"].embedding[...] = pad(item_latent)
  q_tables["history"].embedding[...] = pad(item_latent)
  q_tables["user_id"].embedding[...] = pad(user_latent)
  basis = np.linalg.qr(np.random.default_rng(seed).standard_normal((OUT_DIM, OUT_DIM)))[0]
  basis = basis[:LATENT_DIM].astype(np.float32)  # orthonormal rows: [32, 64]
  model.item_tower.layers[0].kernel[...] = jnp.asarray(basis)
  model.query_tower.layers[0].kernel[...] = jnp.asarray(np.concatenate([basis, basis]))  # user + history
  del item_latent, user_latent

  train_users, train_items = _histories(user_cluster, item_cluster, num_items, seed + 3)
  history = np.zeros((num_users, HISTORY), np.int32)
  starts = np.searchsorted(train_users, np.arange(num_users))
  counts = np.bincount(train_users, minlength=num_users)
  for lag in range(HISTORY):  # the first HISTORY items of each user (the pairs are unordered)
    ok = counts > lag
    history[ok, lag] = train_items[starts[ok] + lag] + 2
  catalog = {"user": {"user_id": np.arange(num_users, dtype=np.int32) + 2, "history": history},
             "item": {"item_id": np.arange(num_items, dtype=np.int32) + 2}}
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params, catalog, (train_users, train_items)


def candidate_recall(output: str, embedder: emb_lib.Embedder, params, loaded: LoadedIndex,
                     exclusions: candidates.Exclusions, k: int, num_users: int = 500) -> float:
  """Share of the exact top-k (training items excluded) that the written candidates hold, over
  the first `num_users` users (brute force with jax.lax.top_k)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pq.read_table(os.path.join(output, candidates.shard_name(0)), columns=["user_id", "item_id"])
  users = np.arange(num_users)
  queries = embedder.embed(params, "query", users)
  fetch = k + int(exclusions.counts[users].max())
  _, rows = exact_top_k(queries, loaded.item_embeddings, fetch)
  rows, _, _ = candidates.select(rows, np.zeros(rows.shape, np.float32),
                                 exclusions.mask(users, rows), k)
  got_user = table.column("user_id").to_numpy()
  got_item = table.column("item_id").to_numpy()
  hits = 0
  for u in users:
    hits += len(set(got_item[got_user == u].tolist()) & set(rows[u][rows[u] >= 0].tolist()))
  return hits / (num_users * k)


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_users", type=int, default=100_000)
  parser.add_argument("--num_items", type=int, default=1_000_000)
  parser.add_argument("--top_k", type=int, default=100)
  parser.add_argument("--users_per_shard", type=int, default=50_000)
  parser.add_argument("--workdir", default=None,
                      help="scratch directory, kept (default: a temporary one, deleted)")
  args = parser.parse_args()
  scratch = args.workdir or tempfile.mkdtemp(prefix="bench_candidates_")
  try:
    run(args, scratch)
  finally:
    if not args.workdir:  # ~350 MB at full size
      shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: str) -> None:
  base = get_base_config()
  icfg, scfg = base.index, base.score
  times = {}

  start = time.perf_counter()
  graphdef, params, host_catalog, (train_users, train_items) = planted_model(
      args.num_users, args.num_items)
  mesh = Mesh(np.asarray(jax.devices()).reshape(-1, 1), ("data", "model"))
  catalog = jax.device_put(host_catalog)
  embedder = emb_lib.Embedder(graphdef, catalog, mesh, scfg.batch_size)
  item_embedder = emb_lib.Embedder(graphdef, catalog, mesh, icfg.embed_batch_size)
  times["model_and_data"] = time.perf_counter() - start

  # ---- setup: what launch.build_index does
  start = time.perf_counter()
  store = IndexStore(os.path.join(scratch, "index"))
  version = store.new_version()
  emb_lib.write_embeddings(os.path.join(store.path(version), EMBEDDINGS_DIR), "item", item_embedder,
                           params, np.arange(args.num_items), np.arange(args.num_items), step=0)
  times["item_embeddings"] = time.perf_counter() - start
  manifest = index_lib.build_version(
      store, version, item_ids=np.arange(args.num_items), num_users=args.num_users,
      embed_queries=lambda rows: embedder.embed(params, "query", rows), cfg=icfg, step=0,
      data_path="planted", embed_seconds=times["item_embeddings"])
  times["index_build"] = manifest["build_seconds"]["train"]
  times["calibration_and_validation"] = manifest["build_seconds"]["validate"]
  settings, validation = manifest["settings"], manifest["validation"]
  start = time.perf_counter()
  loaded = open_live(store.root)
  times["index_load_and_verify"] = time.perf_counter() - start
  rss_setup = peak_rss_gib()

  # ---- end to end: what launch.score does
  exclusions = candidates.Exclusions.from_pairs(train_users, train_items, args.num_users,
                                                args.num_items)
  users = np.arange(args.num_users, dtype=np.int64)
  overfetch = candidates.default_overfetch(exclusions, users, scfg.overfetch)
  generator = candidates.Generator(loaded, lambda rows: embedder.stream(params, "query", rows), exclusions,
                                   args.top_k, overfetch)
  output = os.path.join(scratch, "candidates")
  os.makedirs(output, exist_ok=True)
  per_shard = args.users_per_shard
  shards = {i: users[i * per_shard:(i + 1) * per_shard]
            for i in range(-(-args.num_users // per_shard))}
  job = {"model_step": 0, "index_version": loaded.version, "top_k": args.top_k}
  reporter = Reporter(os.path.join(scratch, "tensorboard"), total_steps=args.num_users,
                      initial_step=0, desc="score", unit="user")
  start = time.perf_counter()
  try:
    candidates.write_shards(generator, output, job, shards, user_raw=users,
                            item_ids=loaded.item_ids, on_users=reporter.step, hook=lambda _: None)
  finally:
    reporter.close()
  seconds = time.perf_counter() - start
  rows = sum(candidates.shard_metadata(os.path.join(output, candidates.shard_name(i)))["num_rows"]
             for i in shards)
  quality = candidate_recall(output, embedder, params, loaded, exclusions, args.top_k)
  out = {
      "users": args.num_users, "items": args.num_items, "top_k": args.top_k,
      "training_interactions": int(len(train_users)),
      "overfetch": overfetch,
      "users_searched_again": generator.refetched,
      "users_searched_exactly": generator.exact_fallbacks,
      "rows_written": int(rows),
      "candidate_recall_vs_exact": round(quality, 4),
      "index_settings": settings,
      "index_validation": {k: round(v, 4) for k, v in validation.items()},
      "setup_seconds": {k: round(v, 2) for k, v in times.items()},
      "end_to_end_seconds": round(seconds, 2),
      "users_per_s": round(args.num_users / seconds),
      "peak_memory_gib_setup": round(rss_setup, 2),
      "peak_memory_gib": round(peak_rss_gib(), 2),
  }
  print(json.dumps(out, indent=2))
  print(f"target: >= 5,000 users/s end to end: {'met' if out['users_per_s'] >= 5000 else 'MISSED'}")


if __name__ == "__main__":
  main()
