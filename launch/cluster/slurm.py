"""GPU clusters with SLURM: renders an sbatch script for a multi-node job and submits it.

  python -m launch.cluster.slurm --nodes=4 --gpus_per_node=8 --partition=a100 --time=12:00:00 \\
      --workdir=/shared/runs/tt --set mesh.model=8 --set train.batch_size=16384 [--dry-run]

`srun` starts the processes; jax.distributed reads the coordinator (first node of the job, a port
derived from the job id, or $JAX_COORDINATOR_PORT), process count and id from SLURM's variables
(two_tower.distributed). By default one process drives all GPUs of its node (one input pipeline
per host, the model axis inside a node on NVLink); --processes_per_node=<gpus> runs one process per
GPU instead, JAX's SLURM default. --dry-run prints the script; otherwise it is written next to the
logs and passed to sbatch.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Sequence

from launch.cluster import common
from launch.cluster.common import Command, env_pairs


def render(args: argparse.Namespace) -> str:
  """The sbatch script."""
  per_node = args.processes_per_node or 1
  if args.gpus_per_node % per_node:
    raise SystemExit(f"--processes_per_node={per_node} must divide --gpus_per_node={args.gpus_per_node}")
  gpus_per_process = args.gpus_per_node // per_node
  directives = [
      f"--job-name={args.name}",
      f"--nodes={args.nodes}",
      f"--ntasks-per-node={per_node}",
      f"--gpus-per-node={args.gpus_per_node}",
      f"--cpus-per-task={args.cpus_per_task}",
      f"--time={args.time}",
      f"--output={os.path.join(args.log_dir, '%x-%j.out')}",
      "--exclusive",
  ]
  directives += [f"--partition={args.partition}"] if args.partition else []
  directives += [f"--account={args.account}"] if args.account else []
  directives += [f"--mem={args.mem}"] if args.mem else []
  lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + [
      "",
      f"# {args.nodes} node(s) x {per_node} process(es) x {gpus_per_process} GPU(s): "
      f"{args.nodes * args.gpus_per_node} GPUs, {args.nodes * per_node} JAX processes.",
      "set -euo pipefail",
      f"cd {shlex.quote(args.repo)}",
  ]
  if args.venv:
    lines.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
  if per_node == 1:
    # JAX's SLURM detection gives each process one GPU (SLURM_LOCALID); this process drives all.
    lines.append("export JAX_LOCAL_DEVICE_IDS=" + ",".join(map(str, range(args.gpus_per_node))))
  if args.port:
    lines.append(f"export JAX_COORDINATOR_PORT={args.port}")
  lines += [f"export {k}={shlex.quote(v)}" for k, v in _env(args)]
  lines += [
      "echo \"job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: coordinator on "
      "$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\"",
      # --kill-on-bad-exit: a failed process stops the job instead of leaving the others waiting.
      "srun --kill-on-bad-exit=1 --cpu-bind=none " + shlex.join(common.job_argv(args, args.python)),
      "",
  ]
  return "\n".join(lines)


def _env(args: argparse.Namespace) -> list[tuple[str, str]]:
  return [("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.mem_fraction))] + env_pairs(args.env)


def script_path(args: argparse.Namespace) -> str:
  return args.script or os.path.join(args.log_dir, f"{args.name}.sbatch")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--name", default="two_tower")
  p.add_argument("--nodes", type=int, default=2)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--processes_per_node", type=int, default=1,
                 help="1: one process drives all GPUs of a node; = gpus_per_node: one per GPU")
  p.add_argument("--cpus_per_task", type=int, default=16, help="input pipeline threads per process")
  p.add_argument("--time", default="24:00:00")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--mem", default=None, help="host memory per node, e.g. 400G (default: SLURM's)")
  p.add_argument("--mem_fraction", type=float, default=0.9, help="GPU memory JAX may preallocate")
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: from job id)")
  p.add_argument("--repo", default=common.REPO_ROOT, help="the code, on a shared file system")
  p.add_argument("--venv", default=None, help="virtual environment to activate on every node")
  p.add_argument("--python", default="python")
  p.add_argument("--log_dir", default="slurm_logs")
  p.add_argument("--script", default=None, help="where to write the script (default: log_dir)")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
  common.add_job_flags(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if args.nodes < 1 or args.gpus_per_node < 1:
    raise SystemExit("--nodes and --gpus_per_node must be at least 1")
  script = render(args)
  if args.dry_run:
    print(script, end="")
    return 0
  path = script_path(args)
  os.makedirs(args.log_dir, exist_ok=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(script)
  print(f"wrote {path}")
  return common.execute([Command(("sbatch", path), description="submit the job")], dry_run=False)


if __name__ == "__main__":
  sys.exit(main())
