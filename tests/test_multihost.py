"""Multi-device and multi-process training give the results of one device; checkpoints move
between meshes; multi-process start-up fails clearly.

Every run trains the same tiny job (conftest.tiny_config, 4 steps, one shared prepared dataset):
the reference on this process's single CPU device, the others in subprocesses with 8 CPU devices,
2 devices, or 2 processes x 2 devices under jax.distributed (launch.cluster.local).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train_worker
from conftest import ROOT, run_module, tiny_config
from launch.cluster import local
from two_tower import distributed
from two_tower.checkpoint import Checkpointer
from two_tower.train import setup_training
from two_tower.trees import path_name

STEPS = 4
PARAMS_TOL = dict(rtol=1e-4, atol=5e-5)  # a step moves parameters by ~lr = 3e-3
LOSS_TOL = dict(rtol=1e-5)


@dataclasses.dataclass
class Run:
  losses: dict[int, float]
  params: dict[int, dict[str, np.ndarray]]  # step -> name -> value
  opt_state: dict[str, np.ndarray]
  meta: dict


def load_run(path: str) -> Run:
  with np.load(path) as f:
    meta = json.loads(str(f["meta"]))
    params, opt = {}, {}
    for key in f.files:
      if key.startswith("params/"):
        _, step, name = key.split("/", 2)
        params.setdefault(int(step), {})[name] = f[key]
      elif key.startswith("opt_state/"):
        opt[key[len("opt_state/"):]] = f[key]
  return Run({int(k): v for k, v in meta["losses"].items()}, params, opt, meta)


def worker_args(workdir, data_dir, out, *extra) -> list[str]:
  return [f"--workdir={workdir}", f"--data_dir={data_dir}", f"--out={out}", f"--steps={STEPS}",
          "--checkpoint_every=2", *extra]


def run_worker_subprocess(devices: int, *args: str) -> None:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_worker.py"), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def assert_same_params(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
  assert sorted(got) == sorted(want), what
  for name in want:
    np.testing.assert_allclose(got[name], want[name], err_msg=f"{what}: {name}", **PARAMS_TOL)


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], **LOSS_TOL)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def data_dir(root):
  return str(root / "data")


@pytest.fixture(scope="module")
def reference(root, data_dir) -> Run:
  """One device, in this process: the run every other layout must reproduce."""
  out = str(root / "reference.npz")
  train_worker.main(worker_args(root / "reference", data_dir, out))
  run = load_run(out)
  assert run.meta["device_count"] == 1 and sorted(run.params) == list(range(1, STEPS + 1))
  return run


@pytest.fixture(scope="module")
def eight_devices(root, data_dir, reference) -> Run:
  del reference  # prepares the shared dataset first
  out = str(root / "mesh_4x2.npz")
  run_worker_subprocess(8, *worker_args(root / "mesh_4x2", data_dir, out, "--mesh_data=4",
                                        "--mesh_model=2"))
  return load_run(out)


def test_8_devices_data4_model2_match_1_device(reference, eight_devices):
  assert eight_devices.meta["summary"]["mesh"] == {"data": 4, "model": 2}
  assert eight_devices.meta["device_count"] == 8
  # The item-ID table (202 rows) is split over the model axis: each device holds half.
  table = "item_tower/embedding/tables/item_id/embedding"
  assert eight_devices.meta["specs"][table] == "P('model',)"
  assert eight_devices.meta["per_device_bytes"][table] * 2 == reference.meta["per_device_bytes"][table]
  assert_same_losses(eight_devices.losses, reference.losses, range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert_same_params(eight_devices.params[step], reference.params[step], f"step {step}")
  assert_same_params(eight_devices.opt_state, reference.opt_state, "optimizer state")


@pytest.fixture(scope="module")
def single_device_state(root, data_dir, reference):
  """A train state of the reference job on this process's device: a target to restore onto."""
  del reference  # its work directory
  config = tiny_config()
  config.data.data_dir = data_dir
  config.train.num_steps = STEPS
  return setup_training(config, str(root / "reference")).state


def test_2_processes_x_2_devices_match_1_device(root, data_dir, reference, single_device_state):
  """The documented local multi-process command, end to end: launch.train under jax.distributed."""
  workdir = root / "processes_2x2"
  cmd = [sys.executable, "-m", "launch.train", "--config=tests/tiny_config.py",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         f"--config.train.num_steps={STEPS}", "--config.train.log_every_steps=1",
         "--config.train.checkpoint_every_steps=1", "--config.train.max_checkpoints_to_keep=10",
         "--config.mesh.data=2", "--config.mesh.model=2"]
  log = io.StringIO()
  code = local.launch(cmd, num_processes=2, devices_per_process=2, cwd=ROOT, out=log, timeout_s=120)
  assert code == 0, log.getvalue()[-6000:]
  summary = json.loads((workdir / "train_summary.json").read_text())
  assert summary["mesh"] == {"data": 2, "model": 2} and summary["steps"] == STEPS
  losses = train_worker.read_scalars(str(workdir / "tensorboard"), "train/loss")
  assert_same_losses(losses, reference.losses, range(1, STEPS + 1))
  # What the two processes wrote together, read back on this process's single device.
  for step in range(1, STEPS + 1):
    state = _restore(workdir, step, single_device_state)
    assert_same_params(_flat(state.params), reference.params[step], f"step {step}")
  assert_same_params(_flat(state.opt_state), reference.opt_state, "optimizer state")


@pytest.mark.parametrize("devices,mesh", [(2, ("--mesh_data=2", "--mesh_model=1")), (1, ())])
def test_checkpoint_from_mesh_4x2_continues_on_other_meshes(root, data_dir, reference,
                                                            eight_devices, devices, mesh):
  """Saved on data=4, model=2 at step 2; restored on data=2, model=1 and on 1 device; trained on."""
  del eight_devices  # its work directory holds the checkpoints
  workdir = root / f"resume_{devices}"
  shutil.copytree(root / "mesh_4x2", workdir)
  for later in (workdir / "checkpoints").iterdir():
    if later.name.isdigit() and int(later.name) > 2:
      shutil.rmtree(later)
  out = str(root / f"resume_{devices}.npz")
  args = worker_args(workdir, data_dir, out, *mesh)
  if devices == 1:
    train_worker.main(args)
  else:
    run_worker_subprocess(devices, *args)
  run = load_run(out)
  assert sorted(run.params) == [3, 4]  # it resumed at step 2
  assert run.meta["device_count"] == devices
  assert_same_losses(run.losses, reference.losses, (3, 4))
  for step in (3, 4):
    assert_same_params(run.params[step], reference.params[step], f"step {step}")
  assert_same_params(run.opt_state, reference.opt_state, "optimizer state")

# ----------------------------------------------------------------------------- bad input


def test_processes_that_disagree_on_the_config_stop(root, data_dir, reference):
  del reference
  # Each process gets its own seed: the config check must stop both, naming the difference.
  cmd = ["sh", "-c", f"exec {sys.executable} -m launch.train --config=tests/tiny_config.py "
         f"--workdir={root / 'mismatch'} --config.data.data_dir={data_dir} "
         "--config.seed=$JAX_PROCESS_ID"]
  log = io.StringIO()
  code = local.launch(cmd, num_processes=2, cwd=ROOT, out=log, timeout_s=60)
  assert code == 2, log.getvalue()[-4000:]
  for pid in (0, 1):
    assert f"[p{pid}] error: the 2 processes of this job do not run the same config" in log.getvalue()
  assert "process 1: config.seed: 0 on process 0, 1" in log.getvalue()


def test_unreachable_coordinator_times_out_naming_the_address(tmp_path):
  address = f"127.0.0.1:{local.free_port()}"  # nothing listens there
  start = time.monotonic()
  proc = run_module("launch.train", f"--workdir={tmp_path}", f"--coordinator_address={address}",
                    "--num_processes=2", "--process_id=1", "--distributed_timeout=2", timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f"error: could not reach the JAX coordinator at {address} within 2 s" in proc.stderr
  assert time.monotonic() - start < 60


def test_incomplete_multiprocess_settings():
  with pytest.raises(ValueError, match="missing the coordinator address and the process id"):
    distributed.resolve(env={"JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="process id 2 is not in"):
    distributed.resolve("h:1", 2, 2, env={})
  with pytest.raises(ValueError, match="not HOST:PORT"):
    distributed.resolve("h", 2, 1, env={})
  settings = distributed.resolve(env={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                                      "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"})
  assert (settings.coordinator_address, settings.num_processes, settings.process_id) == (
      "10.0.0.1:1234", 4, 3)
  assert distributed.resolve(env={}) is None  # nothing given: JAX's cluster detection decides


def test_coordinator_port_in_use_is_named():
  with socket.socket() as s:
    s.bind(("", 0))
    s.listen()
    port = s.getsockname()[1]
    with pytest.raises(ValueError, match=f"cannot start the JAX coordinator on port {port}"):
      distributed.check_port_free(f"127.0.0.1:{port}")


def test_config_hash_covers_config_and_workdir():
  a, b = tiny_config(), tiny_config()
  assert distributed.config_hash(a, "/w") == distributed.config_hash(b, "/w")
  b.seed = 1
  assert distributed.config_hash(a, "/w") != distributed.config_hash(b, "/w")
  assert distributed.config_hash(a, "/w") != distributed.config_hash(a, "/v")
  distributed.assert_same_config(a, "/w")  # one process: nothing to compare

# ----------------------------------------------------------------------------- helpers


def _flat(tree) -> dict[str, np.ndarray]:
  return {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _restore(workdir, step: int, target):
  """The checkpoint of `workdir` at `step`, restored onto `target`'s shardings."""
  checkpointer = Checkpointer(str(workdir / "checkpoints"), max_to_keep=10, save_interval_steps=1)
  try:
    return checkpointer.restore_train_state(step, target)
  finally:
    checkpointer.close()


def test_sigterm_to_one_of_2_processes_stops_both_at_the_same_step(root, data_dir, reference):
  """Both processes pause after step 3 (agreement is every step here: log_every_steps=1); only
  process 1 gets SIGTERM. Both must save step 3 together and exit with 143; the rerun resumes there
  and ends where an uninterrupted run does."""
  stop = 3
  workdir, pause_dir = root / "preempted_2x1", root / "preempted_pause"
  pause_dir.mkdir()
  out = str(root / "preempted_2x1.npz")
  argv = [sys.executable, os.path.join(ROOT, "tests", "train_worker.py"),
          *worker_args(workdir, data_dir, out, f"--checkpoint_every={STEPS}")]
  port = local.free_port()
  results = train_worker.preempt(
      [(argv + [f"--pause_at={stop}", f"--pause_dir={pause_dir}"],
        local.process_env(pid, 2, 1, port, timeout_s=120)) for pid in range(2)],
      str(pause_dir), signalled=1)
  for pid, (code, output) in enumerate(results):
    assert code == 143, f"process {pid}:\n{output[-4000:]}"
    assert f"preempted: stopped by SIGTERM at step {stop};" in output, output[-4000:]
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == stop and STEPS not in saved
  log = io.StringIO()
  code = local.launch(argv, num_processes=2, cwd=ROOT, out=log, timeout_s=120)
  assert code == 0, log.getvalue()[-6000:]
  run = load_run(out)
  assert sorted(run.params) == list(range(stop + 1, STEPS + 1))  # resumed from the signal's step
  assert_same_losses(run.losses, reference.losses, range(stop + 1, STEPS + 1))
  assert_same_params(run.params[STEPS], reference.params[STEPS], f"step {STEPS}")
  assert_same_params(run.opt_state, reference.opt_state, "optimizer state")
