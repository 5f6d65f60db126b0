"""Training throughput and per-device memory across device counts, meshes and processes.

  python benchmarks/scaling.py [--steps=30] [--batch_size=1024] [--out=scaling.json]
      [--compute_dtype=bfloat16] [--platform=gpu]

Each layout trains the default synthetic config in a fresh subprocess (the CPU device count is
fixed when JAX starts): 1, 2, 4 and 8 CPU devices data-parallel, 8 devices with a model axis, and 2
processes under jax.distributed (launch.cluster.local). Examples/s is timed over the steps after
the first `--warmup` ones (compilation), up to the last step, excluding the final checkpoint.
Memory is what one device holds of the parameters and of the optimizer state.

On a CPU host all "devices" share the same cores, so the numbers measure the overhead of sharding
and collectives, not a speed-up; on TPU and GPU each device brings its own compute. With
`--platform=gpu` (or tpu) the layouts run on the host's accelerators instead of forced CPU devices,
and those needing more devices than the host has are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (name, processes, devices per process, mesh overrides)
LAYOUTS = (
    ("1 device", 1, 1, {}),
    ("2 devices", 1, 2, {"data": 2, "model": 1}),
    ("4 devices", 1, 4, {"data": 4, "model": 1}),
    ("8 devices", 1, 8, {"data": 8, "model": 1}),
    ("8 devices, data=4 model=2", 1, 8, {"data": 4, "model": 2}),
    # Rows padded to a multiple of 8 so that every table divides the 8 devices (the synthetic
    # vocabularies, e.g. 4,002 users, do not; unpadded, the small ones would stay replicated).
    ("8 devices, data=4 model=2, tables over all", 1, 8,
     {"data": 4, "model": 2, "shard_tables_over": "all", "table_row_multiple": 8}),
    ("2 processes x 1 device", 2, 1, {"data": 2, "model": 1}),
    ("2 processes x 4 devices", 2, 4, {"data": 8, "model": 1}),
)


def worker(args: argparse.Namespace) -> None:
  """One layout, in this process (started by `main` with the right devices and environment)."""
  from two_tower import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  import jax  # pylint: disable=g-import-not-at-top

  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from two_tower import sharding  # pylint: disable=g-import-not-at-top
  from two_tower.train import train_and_evaluate  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config()
  config.data.data_dir = args.data_dir
  config.train.batch_size = args.batch_size
  config.train.num_steps = args.steps
  config.train.update(eval_every_steps=0, select_by="", early_stopping_evals=0)
  config.train.log_every_steps = args.steps
  config.train.checkpoint_every_steps = args.steps  # only the final one
  config.mesh.update(json.loads(args.mesh))
  config.model.compute_dtype = args.compute_dtype
  marks: dict[str, float] = {}
  memory: dict[str, int] = {}

  def hook(step: int, state) -> None:
    if step in (args.warmup, args.steps):
      jax.block_until_ready(state)
      marks[str(step)] = time.perf_counter()
    if step == args.steps:
      memory["params"] = max(sharding.device_memory(state.params).values())
      memory["opt_state"] = max(sharding.device_memory(state.opt_state).values())
      memory["params_total"] = sum(x.nbytes for x in jax.tree.leaves(state.params))
      memory["opt_state_total"] = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))

  summary = train_and_evaluate(config, args.workdir, hooks=[hook])
  seconds = marks[str(args.steps)] - marks[str(args.warmup)]
  if jax.process_index() == 0:
    result = dict(examples_per_s=(args.steps - args.warmup) * args.batch_size / seconds,
                  step_ms=1000 * seconds / (args.steps - args.warmup), mesh=summary["mesh"],
                  processes=jax.process_count(), devices=jax.device_count(), memory=memory,
                  device_kind=jax.devices()[0].device_kind)
    with open(args.result, "w") as f:
      json.dump(result, f)


def run_layout(name: str, processes: int, devices: int, mesh: dict, args, tmp: str) -> dict:
  from launch.cluster import local  # pylint: disable=g-import-not-at-top
  slug = "".join(c if c.isalnum() else "_" for c in name)
  result = os.path.join(tmp, f"{slug}.json")
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--workdir={os.path.join(tmp, slug)}",
         f"--data_dir={os.path.join(tmp, 'data')}", f"--result={result}", f"--steps={args.steps}",
         f"--warmup={args.warmup}", f"--batch_size={args.batch_size}", f"--mesh={json.dumps(mesh)}",
         f"--compute_dtype={args.compute_dtype}"]
  start = time.perf_counter()
  if processes == 1:
    env = dict(os.environ, JAX_PLATFORMS=args.platform)
    if args.platform == "cpu":
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
  else:
    log = open(os.path.join(tmp, f"{slug}.log"), "w")
    with log:
      code = local.launch(cmd, num_processes=processes, devices_per_process=devices, cwd=ROOT,
                          out=log)
    if code:
      raise RuntimeError(f"{name} failed; see {log.name}")
  with open(result) as f:
    out = json.load(f)
  out.update(name=name, wall_s=time.perf_counter() - start)
  return out


def _accelerator_count(platform: str) -> int:
  if platform == "cpu":
    return 8  # forced host devices: any layout here
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                       env=dict(os.environ, JAX_PLATFORMS=platform), capture_output=True, text=True,
                       check=True)
  return int(out.stdout.strip().splitlines()[-1])


def table(results: list[dict], base: float) -> str:
  mib = lambda b: f"{b / 2**20:.2f}"
  lines = ["| layout | processes x devices | mesh | examples/s | vs 1 device | step ms | "
           "params MiB / device (of total) | optimizer MiB / device (of total) |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
  for r in results:
    m = r["memory"]
    lines.append(
        f"| {r['name']} | {r['processes']} x {r['devices'] // r['processes']} | "
        f"data={r['mesh']['data']} model={r['mesh']['model']} | {r['examples_per_s']:,.0f} | "
        f"{r['examples_per_s'] / base:.2f} | {r['step_ms']:.1f} | "
        f"{mib(m['params'])} ({mib(m['params_total'])}) | "
        f"{mib(m['opt_state'])} ({mib(m['opt_state_total'])}) |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=1024)
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  parser.add_argument("--only", default=None, help="run only layouts whose name contains this")
  parser.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default="float32",
                      help="model.compute_dtype (parameters and optimizer state stay float32)")
  parser.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default="cpu",
                      help="cpu: forced host devices; gpu/tpu: the host's accelerators, one process")
  # Worker mode (internal).
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  for name in ("workdir", "data_dir", "result", "mesh"):
    parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  if not 0 < args.warmup < args.steps:
    parser.error("need 0 < --warmup < --steps")
  available = _accelerator_count(args.platform)
  results = []
  with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
    for name, processes, devices, mesh in LAYOUTS:
      if args.only and args.only not in name:
        continue
      if args.platform != "cpu" and (processes > 1 or devices > available):
        print(f"{name:45s} skipped: {available} {args.platform} device(s) on this host", flush=True)
        continue
      r = run_layout(name, processes, devices, mesh, args, tmp)
      print(f"{name:45s} {r['examples_per_s']:10,.0f} examples/s  ({r['wall_s']:.0f} s wall)",
            flush=True)
      results.append(r)
  base = next((r["examples_per_s"] for r in results if r["name"] == "1 device"),
              results[0]["examples_per_s"])
  print(f"\nsynthetic config, {args.compute_dtype}, global batch {args.batch_size}, {args.steps} "
        f"steps (timed after {args.warmup}), {args.platform}: {results[0]['device_kind']}, "
        f"{os.cpu_count()} CPU cores\n")
  print(table(results, base))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
