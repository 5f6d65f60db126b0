"""Cloud TPU VM pods: create, copy the code, start the job on every worker, stream logs, delete.

  python -m launch.cluster.tpu_pod up     --name=tt --zone=us-central2-b --accelerator=v4-32 \\
      --workdir=/mnt/shared/runs/tt --set mesh.model=4 --set train.batch_size=8192
  python -m launch.cluster.tpu_pod logs   --name=tt --zone=us-central2-b
  python -m launch.cluster.tpu_pod stop   --name=tt --zone=us-central2-b
  python -m launch.cluster.tpu_pod delete --name=tt --zone=us-central2-b

`up` = create + copy + start. Add --dry-run to print the gcloud commands instead of running them.
Every worker of the pod runs the same command; jax.distributed finds the coordinator, process
count and id from the TPU metadata (two_tower.distributed), and each host reads its own part of
every batch. The work directory (checkpoints, data, logs) must be on storage all workers share,
e.g. a Filestore/NFS mount or a gcsfuse-mounted bucket.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shlex
import sys
from typing import Sequence

from launch.cluster import common
from launch.cluster.common import Command, env_pairs

ACTIONS = ("create", "copy", "start", "logs", "stop", "delete", "up")
ARCHIVE = "two_tower-src.tar.gz"
EXCLUDES = (".venv", ".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache")


def _gcloud(args: argparse.Namespace, *argv: str) -> tuple[str, ...]:
  scope = (f"--zone={args.zone}",) + ((f"--project={args.project}",) if args.project else ())
  return ("gcloud", "compute", "tpus", "tpu-vm", *argv, *scope)


def _ssh(args: argparse.Namespace, command: str, worker: str = "all") -> tuple[str, ...]:
  return _gcloud(args, "ssh", args.name, f"--worker={worker}", f"--command={command}")


def _remote(args: argparse.Namespace, path: str = "") -> str:
  return f"{args.remote_dir}/{path}" if path else args.remote_dir


def create(args: argparse.Namespace) -> list[Command]:
  argv = ["create", args.name, f"--accelerator-type={args.accelerator}", f"--version={args.version}"]
  if args.spot:
    argv.append("--spot")
  return [Command(_gcloud(args, *argv), description=f"create TPU VM pod {args.name} ({args.accelerator})")]


def copy(args: argparse.Namespace) -> list[Command]:
  local_archive = f"/tmp/{args.name}-{ARCHIVE}"
  excludes = [f"--exclude={e}" for e in EXCLUDES]
  jax_version = args.jax_version or _installed("jax")
  jax_req = f"jax[tpu]=={jax_version}" if jax_version else "jax[tpu]"
  install = (f"mkdir -p {_remote(args)} && tar -xzf ~/{ARCHIVE} -C {_remote(args)} && "
             f"cd {_remote(args)} && {args.python} -m pip install -q -e . {shlex.quote(jax_req)}")
  return [
      Command(("tar", "-czf", local_archive, *excludes, "-C", args.repo, "."),
              description="pack the code"),
      Command(_gcloud(args, "scp", local_archive, f"{args.name}:~/{ARCHIVE}", "--worker=all"),
              description="copy it to every worker"),
      Command(_ssh(args, install), description=f"unpack and install it (with {jax_req}) on every worker"),
  ]


def start(args: argparse.Namespace) -> list[Command]:
  job = shlex.join(common.job_argv(args, python=args.python))
  log, pid = _remote(args, "job.log"), _remote(args, "job.pid")
  env = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_pairs(args.env))
  # setsid + nohup + </dev/null: the job outlives the ssh session that starts it.
  script = (f"cd {_remote(args)} && ({env + ' ' if env else ''}setsid nohup {job} > {log} 2>&1 "
            f"< /dev/null & echo $! > {pid})")
  return [Command(_ssh(args, script), description="start the job on every worker at once")]


def logs(args: argparse.Namespace) -> list[Command]:
  log = _remote(args, "job.log")
  return [Command(_ssh(args, f"tail -n +1 -F {log}", worker=args.worker),
                  description=f"stream worker {args.worker}'s log (process 0 reports progress)")]


def stop(args: argparse.Namespace) -> list[Command]:
  pid = _remote(args, "job.pid")
  return [Command(_ssh(args, f"test -f {pid} && kill $(cat {pid}) 2>/dev/null; rm -f {pid}; true"),
                  description="stop the job on every worker (it resumes from its last checkpoint)")]


def delete(args: argparse.Namespace) -> list[Command]:
  return [Command(_gcloud(args, "delete", args.name, "--quiet"), description=f"delete {args.name}")]


def _installed(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def commands(args: argparse.Namespace) -> list[Command]:
  steps = {"create": create, "copy": copy, "start": start, "logs": logs, "stop": stop,
           "delete": delete}
  if args.action == "up":
    return create(args) + copy(args) + start(args)
  return steps[args.action](args)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("action", choices=ACTIONS)
  p.add_argument("--name", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None)
  p.add_argument("--accelerator", default="v4-32", help="e.g. v4-32, v5litepod-16, v5p-64")
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software version")
  p.add_argument("--spot", action="store_true", help="spot capacity (jobs resume from checkpoints)")
  p.add_argument("--repo", default=common.REPO_ROOT, help="local checkout to copy")
  p.add_argument("--remote_dir", default="~/two_tower", help="where the code goes on each worker")
  p.add_argument("--python", default="python3")
  p.add_argument("--jax_version", default=None, help="jax[tpu] version (default: the local jax's)")
  p.add_argument("--worker", default="0", help="logs: which worker's log to stream")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment of the job, e.g. --env XLA_FLAGS=... (repeatable)")
  common.add_job_flags(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  return common.execute(commands(args), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
