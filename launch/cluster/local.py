"""N local JAX processes of one job: multi-host code tested on one machine, with CPU devices.

  python -m launch.cluster.local --num_processes=2 --devices_per_process=2 -- \\
      python -m launch.train --config=configs/synthetic.py --workdir=/tmp/mh \\
      --config.mesh.data=2 --config.mesh.model=2

Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D, so that
`two_tower.distributed.initialize` starts jax.distributed (CPU collectives over gloo). Output lines
are prefixed with [pI]. When one process fails the others are stopped: they would otherwise wait
in a collective until the distributed timeout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int, port: int,
                base: Mapping[str, str] | None = None, timeout_s: int | None = None) -> dict[str, str]:
  env = dict(os.environ if base is None else base)
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(process_id),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=" ".join(xla_flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
      PYTHONUNBUFFERED="1",
  )
  if timeout_s is not None:
    env["JAX_DISTRIBUTED_TIMEOUT"] = str(timeout_s)
  return env


def _pump(stream, prefix: str, out: TextIO, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(prefix + line)
      out.flush()
  stream.close()


def launch(command: Sequence[str], num_processes: int, devices_per_process: int = 1, *,
           port: int = 0, env: Mapping[str, str] | None = None, timeout_s: int | None = None,
           cwd: str | None = None, out: TextIO | None = None, grace_s: float = 10.0) -> int:
  """Runs `command` as `num_processes` processes of one job; the first non-zero exit status, or 0."""
  out = out or sys.stdout
  port = port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  try:
    for pid in range(num_processes):
      proc = subprocess.Popen(
          list(command), cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          env=process_env(pid, num_processes, devices_per_process, port, env, timeout_s))
      procs.append(proc)
      pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{pid}] ", out, lock), daemon=True)
      pump.start()
      pumps.append(pump)
    status = 0
    while None in [p.poll() for p in procs]:  # a list: poll every process, every time
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed:
        status = failed[0]
        _stop(procs, grace_s)
        break
      time.sleep(0.1)
    codes = [p.wait() for p in procs]
    status = status or next((c for c in codes if c), 0)
  except BaseException:
    _stop(procs, grace_s)
    raise
  finally:
    for pump in pumps:
      pump.join(timeout=5)
  return status


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to the processes this launcher started that still run, then SIGKILL after a grace."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="python -m launch.cluster.local [options] -- COMMAND...")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1, help="CPU devices per process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--timeout", type=int, default=None,
                      help="seconds each process waits for the others (JAX_DISTRIBUTED_TIMEOUT)")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --, e.g. -- python -m launch.train --workdir=W")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be at least 1")
  if args.dry_run:
    port = args.port or free_port()
    for pid in range(args.num_processes):
      env = process_env(pid, args.num_processes, args.devices_per_process, port, {}, args.timeout)
      env.pop("PYTHONUNBUFFERED")
      print(" ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())), shlex.join(command),
            "&")
    print("wait")
    return 0
  return launch(command, args.num_processes, args.devices_per_process, port=args.port,
                timeout_s=args.timeout)


if __name__ == "__main__":
  sys.exit(main())
