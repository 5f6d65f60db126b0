"""Training examples/s and memory as the catalog grows: dense Adam against row-sparse updates.

  python benchmarks/catalog_scale.py [--items=2000,1000000,10000000] [--steps=8] [--warmup=2]
      [--batch_size=8192] [--compute_dtype=bfloat16]

The default synthetic config's model (configs/synthetic.py: every user and item feature, 256
uniform negatives with logQ correction) and its jitted train step (two_tower/train.py, placed on
the mesh like `train_and_evaluate` places it), at each catalog size, with
`optimizer.embeddings="dense"` (Adam updates every row of every table and its moments each step)
and `"rowwise_adagrad"` (only the rows the batch looks up; two_tower/rowsparse.py).

The step is fed in-memory synthetic batches of the prepared data's shapes (items and histories
drawn by a Zipf-like popularity, as pipelines/synthetic.py draws them): preparing a dataset
whose item vocabulary really holds 10M items would need more than 10M interactions, and what is
measured here is the step. Each (size, optimizer) runs in a fresh process, so its peak memory is
its own. Memory printed per device: the train state (parameters and optimizer state), the
compiled step's temporaries, and the peak of the process (CPU) or of the device (GPU).

Prints a table, the ratios the issue sets targets for (row-sparse at the largest size vs its own
at 1M; row-sparse vs dense at the largest size), and one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OPTIMIZERS = ("dense", "rowwise_adagrad")
NUM_USERS = 4000  # the synthetic config's
TAGS_PER_ITEM = 4
DISTINCT_BATCHES = 4  # cycled, so the step never sees the same batch twice in a row


def worker(args: argparse.Namespace) -> dict:
  """One (catalog size, optimizer): compile, warm up, time; returns the measurements."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from pipelines.schema import PAD, Feature, Schema  # pylint: disable=g-import-not-at-top
  from two_tower import sharding  # pylint: disable=g-import-not-at-top
  from two_tower.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from two_tower.reporting import Stopwatch  # pylint: disable=g-import-not-at-top
  from two_tower.state import create_train_state  # pylint: disable=g-import-not-at-top
  from two_tower.train import train_step  # pylint: disable=g-import-not-at-top

  # rbg keys: threefry spends tens of seconds generating a 10M-row table's initial values on a
  # small CPU host; the random stream does not change the step's cost.
  jax.config.update("jax_default_prng_impl", "rbg")
  num_items = int(args.items)
  config = synthetic.get_config()
  config.train.batch_size = args.batch_size
  config.optimizer.embeddings = args.embeddings
  config.model.compute_dtype = args.compute_dtype
  items, users, length = num_items + 2, NUM_USERS + 2, config.data.history_length  # + PAD, OOV
  schema = Schema(
      features=(Feature("user_id", "user", "id", users),
                Feature("segment", "user", "categorical", 6),
                Feature("age", "user", "categorical", 8), Feature("account_age", "user", "numeric"),
                Feature("history", "user", "history", items, length=length),
                Feature("item_id", "item", "id", items),
                Feature("category", "item", "categorical", 42),
                Feature("tags", "item", "multi", 62, length=TAGS_PER_ITEM),
                Feature("price", "item", "numeric")),
      num_users=NUM_USERS, num_items=num_items, history_length=length, split_sizes={"train": 1})
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(args.batch_size, mesh)
  tx = make_optimizer(config.optimizer, args.steps)
  start = time.perf_counter()
  graphdef, state, state_sh = create_train_state(schema, config, tx, mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start

  rng = np.random.default_rng(0)
  popularity = 1.0 / np.arange(1, num_items + 1) ** config.data.synthetic.popularity_exponent
  popularity /= popularity.sum()
  catalog = {
      "user": {"user_id": np.arange(users, dtype=np.int32),
               "segment": rng.integers(1, 6, users, dtype=np.int32),
               "age": rng.integers(1, 8, users, dtype=np.int32),
               "account_age": rng.random(users, dtype=np.float32),
               "history": np.zeros((users, length), np.int32)},
      "item": {"item_id": np.arange(items, dtype=np.int32),
               "category": rng.integers(1, 42, items, dtype=np.int32),
               "tags": rng.integers(PAD, 62, (items, TAGS_PER_ITEM), dtype=np.int32),
               "price": rng.random(items, dtype=np.float32),
               "sampling_prob": np.concatenate([[0.0], popularity, [0.0]]).astype(np.float32)}}
  catalog = jax.device_put(catalog, sharding.replicated(mesh))

  def draw_items(shape):  # rows 1..items of the vocabulary, by popularity
    return (rng.choice(num_items, size=shape, p=popularity) + 1).astype(np.int32)

  batch_sh = sharding.batch_sharding(mesh)
  batches = []
  for _ in range(DISTINCT_BATCHES):
    history = draw_items((args.batch_size, length))
    history[np.arange(length)[None, :] >= rng.integers(1, length + 1, (args.batch_size, 1))] = PAD
    batches.append(jax.device_put(dict(
        user_index=rng.integers(1, NUM_USERS + 1, args.batch_size, dtype=np.int32),
        item_index=draw_items(args.batch_size), history=history,
        weight=np.ones(args.batch_size, np.float32)), batch_sh))

  step_fn = jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, config=config, mesh=mesh),
      in_shardings=(state_sh, batch_sh, sharding.replicated(mesh)),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  compiled = step_fn.lower(state, batches[0], catalog).compile()
  stopwatch = Stopwatch(warmup_steps=args.warmup)
  for i in range(args.steps):
    state, metrics = compiled(state, batches[i % DISTINCT_BATCHES], catalog)
    stopwatch.tick(args.batch_size, sync=metrics)
  examples_per_s = stopwatch.examples_per_s(sync=state)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return dict(
      items=num_items, embeddings=args.embeddings, examples_per_s=examples_per_s,
      loss=float(metrics["loss"]), init_s=init_s, device=device.device_kind,
      state_bytes_per_device=max(sharding.device_memory(state).values()),
      step_temp_bytes_per_device=compiled.memory_analysis().temp_size_in_bytes,
      peak_bytes=stats.get("peak_bytes_in_use",
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
      peak_of="device" if "peak_bytes_in_use" in stats else "process (host RSS)")


def run(items: int, embeddings: str, args: argparse.Namespace) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--items={items}",
         f"--embeddings={embeddings}", f"--steps={args.steps}", f"--warmup={args.warmup}",
         f"--batch_size={args.batch_size}", f"--compute_dtype={args.compute_dtype}"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    # Out of memory (killed) or an error: reported, and the other sizes still run.
    return dict(items=items, embeddings=embeddings, error=(proc.stderr.strip().splitlines()
                                                           or [f"exit code {proc.returncode}"])[-1])
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  out["wall_s"] = time.perf_counter() - start
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--items", default="2000,1000000,10000000",
                      help="catalog sizes, comma-separated (1,000,000 is the ratios' reference)")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2, help="steps before the clock starts")
  parser.add_argument("--batch_size", type=int, default=8192)
  parser.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default="float32",
                      help="model.compute_dtype (parameters and optimizer state stay float32)")
  # Worker mode (internal).
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--embeddings", choices=OPTIMIZERS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not 0 < args.warmup < args.steps:
    parser.error("need 0 < --warmup < --steps")
  if args.worker:
    print(json.dumps(worker(args)))
    return
  sizes = [int(s) for s in args.items.split(",")]
  results = []
  gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
  print("| items | embeddings | examples/s | state GiB / device | step temporaries GiB | peak GiB |"
        "\n|---:|---|---:|---:|---:|---:|", flush=True)
  for items in sizes:
    for embeddings in OPTIMIZERS:
      r = run(items, embeddings, args)
      results.append(r)
      if "error" in r:
        print(f"| {items:,} | {embeddings} | failed: {r['error'][:80]} | | | |", flush=True)
      else:
        print(f"| {items:,} | {embeddings} | {r['examples_per_s']:,.0f} | "
              f"{gib(r['state_bytes_per_device'])} | {gib(r['step_temp_bytes_per_device'])} | "
              f"{gib(r['peak_bytes'])} |", flush=True)
  speed = {(r["items"], r["embeddings"]): r.get("examples_per_s") for r in results}
  done = [n for n in sizes if speed.get((n, "rowwise_adagrad")) and speed.get((n, "dense"))]
  largest = max(done) if done else None
  ratios = {}
  if largest is not None and speed.get((1_000_000, "rowwise_adagrad")):
    ratios["rowwise_largest_vs_own_1m"] = (speed[(largest, "rowwise_adagrad")]
                                           / speed[(1_000_000, "rowwise_adagrad")])
  if largest is not None:
    ratios["rowwise_vs_dense_at_largest"] = (speed[(largest, "rowwise_adagrad")]
                                             / speed[(largest, "dense")])
  ok = next((r for r in results if "error" not in r), {})
  print(f"\nsynthetic config's model, {args.compute_dtype}, batch {args.batch_size}, {args.steps} "
        f"steps (timed after {args.warmup}), device {ok.get('device')}, {os.cpu_count()} CPU cores; peak: "
        f"{ok.get('peak_of')}")
  for name, value in ratios.items():
    print(f"{name} (largest: {largest:,} items): {value:.2f}x")
  print(json.dumps(dict(results=results, largest_items=largest, **ratios,
                        batch_size=args.batch_size, compute_dtype=args.compute_dtype,
                        steps=args.steps, warmup=args.warmup)))


if __name__ == "__main__":
  main()
