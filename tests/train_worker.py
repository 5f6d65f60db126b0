"""A tiny training job whose results the multi-device tests compare.

  python tests/train_worker.py --workdir=W --data_dir=D --out=OUT.npz --steps=4 \
      [--mesh_data=4 --mesh_model=2] [--checkpoint_every=2] [--set loss.global_negatives=false] \
      [--pause_at=STEP --pause_dir=P]

The tests start it in a subprocess, because XLA_FLAGS (the CPU device count) must be set before
JAX starts, and as several processes through `launch.cluster.local`, which sets the
jax.distributed variables. Process 0 saves to OUT.npz the parameters after every step (gathered
from all processes), the final optimizer state, the per-step losses that train_and_evaluate logged,
and the per-device bytes of the parameters.

With --pause_at, each process, once it has trained step STEP, writes its pid to P/paused.pI and
waits for the file P/resume: a test can then send SIGTERM at a known step, with no timing
guesswork. Stopped by SIGTERM, the worker exits with 143 like launch.train.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tensorboardX.proto import event_pb2  # noqa: E402

from conftest import tiny_config  # noqa: E402
from two_tower import distributed, sharding  # noqa: E402
from two_tower.train import Preempted, train_and_evaluate  # noqa: E402
from two_tower.trees import path_name  # noqa: E402


def read_scalars(logdir: str, tag: str) -> dict[int, float]:
  """{step: value} of one scalar from the TensorBoard event files (TFRecord framing)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.tag == tag:
          out[int(event.step)] = float(value.simple_value)
  return out


def preempt(commands: list[tuple[list[str], dict]], pause_dir: str, signalled: int,
            timeout_s: float = 300) -> list[tuple[int, str]]:
  """Starts one worker process per (argv, env), all with --pause_at and --pause_dir=pause_dir;
  once every process has paused, sends SIGTERM to process `signalled` only and lets them go on.
  Returns each process's (exit code, output)."""
  logs = [open(os.path.join(pause_dir, f"log.p{i}"), "w+") for i in range(len(commands))]
  procs = [subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
           for (argv, env), log in zip(commands, logs)]
  try:
    marker = os.path.join(pause_dir, f"paused.p{signalled}")
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(os.path.join(pause_dir, f"paused.p{i}")) for i in range(len(procs))):
      if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
        break  # the outputs below say why
      time.sleep(0.1)
    else:
      with open(marker) as f:
        os.kill(int(f.read()), signal.SIGTERM)
      open(os.path.join(pause_dir, "resume"), "w").close()
    codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = []
  for code, log in zip(codes, logs):
    log.seek(0)
    out.append((code, log.read()))
    log.close()
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--mesh_data", type=int, default=-1)
  parser.add_argument("--mesh_model", type=int, default=1)
  parser.add_argument("--checkpoint_every", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], help="key=json_value config override")
  parser.add_argument("--pause_at", type=int, default=0)
  parser.add_argument("--pause_dir", default="")
  args = parser.parse_args(argv)

  distributed.initialize()
  config = configure(tiny_config(), args)
  params_by_step: dict[int, dict[str, np.ndarray]] = {}

  def flat(tree) -> dict[str, np.ndarray]:
    return {path_name(p): sharding.to_host(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

  last_state = {}

  def hook(step: int, state) -> None:
    params_by_step[step] = flat(state.params)
    last_state["state"] = state

  def pause(step: int, state) -> None:
    del state
    if step != args.pause_at:
      return
    mine = os.path.join(args.pause_dir, f"paused.p{jax.process_index()}")
    with open(mine + ".tmp", "w") as f:
      f.write(str(os.getpid()))
    os.replace(mine + ".tmp", mine)
    # A SIGTERM that arrives meanwhile runs the training's handler here, in the main thread.
    while not os.path.exists(os.path.join(args.pause_dir, "resume")):
      time.sleep(0.05)

  summary = train_and_evaluate(config, args.workdir, hooks=[hook, pause])
  state = last_state["state"]
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  memory = {path_name(p): sharding.per_device_bytes(x) for p, x in leaves}
  opt = flat(state.opt_state)
  if jax.process_index() != 0:
    return
  arrays = {f"params/{step}/{k}": v for step, tree in params_by_step.items() for k, v in tree.items()}
  arrays.update({f"opt_state/{k}": v for k, v in opt.items()})
  losses = read_scalars(os.path.join(args.workdir, "tensorboard"), "train/loss")
  meta = dict(summary=summary, losses=losses, per_device_bytes=memory,
              process_count=jax.process_count(), device_count=jax.device_count(),
              specs={path_name(p): str(x.sharding.spec) for p, x in leaves})
  np.savez(args.out, meta=np.asarray(json.dumps(meta)), **arrays)


def configure(config, args):
  config.data.data_dir = args.data_dir
  config.train.num_steps = args.steps
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = args.checkpoint_every or args.steps
  config.mesh.data = args.mesh_data
  config.mesh.model = args.mesh_model
  for item in args.set:
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = json.loads(value)
  return config


if __name__ == "__main__":
  try:
    main()
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(143)
