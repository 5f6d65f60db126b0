"""Multi-host start-up: JAX's multi-controller runtime (`jax.distributed`) and config agreement.

Every entry point calls `initialize()` before anything touches JAX devices. The coordinator address,
process count and process id come from, first match wins:

  1. arguments (the entry points' --coordinator_address, --num_processes, --process_id flags)
  2. env vars JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (launch/cluster/ sets them)
  3. JAX's own cluster detection: Cloud TPU VMs and GKE TPU pods, SLURM (`srun`), Open MPI, and
     Kubernetes Jobs (with the `kubernetes` package and pod-read RBAC)
  4. none of these: one process, and jax.distributed is not started.

Then `assert_same_config` (called when a work directory is bound) checks that all processes run the same
config and work directory: processes that disagree would otherwise hang in a collective or train
silently different models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import sys
import time
from typing import Mapping, Sequence

import jax
import ml_collections
import numpy as np

from two_tower import config as config_lib
from two_tower.errors import UserError

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"  # also read by jax.distributed itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_TIMEOUT = "JAX_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 300

class CoordinatorUnreachableError(TimeoutError, UserError):
  """The coordinator did not answer in time."""


class ConfigMismatchError(UserError):
  """Processes of one job run different configs."""


@dataclasses.dataclass(frozen=True)
class Settings:
  coordinator_address: str | None
  num_processes: int
  process_id: int
  local_device_ids: Sequence[int] | None
  source: str  # flags | env | the detected cluster's name | single


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"${name}={value!r} is not an integer") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, *, env: Mapping[str, str] | None = None
            ) -> Settings | None:
  """Where this process sits in the job, from the arguments, else the env vars; None when neither
  says anything (then JAX's own cluster detection decides)."""
  env = os.environ if env is None else env
  address = coordinator_address or env.get(ENV_ADDRESS) or None
  count = num_processes if num_processes is not None else _env_int(env, ENV_NUM_PROCESSES)
  pid = process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID)
  given = {"coordinator address": address, "process count": count, "process id": pid}
  if all(v is None for v in given.values()):
    return None
  if count == 1 and pid in (None, 0):
    return Settings(address, 1, 0, None, "flags/env")
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise UserError(
        f"incomplete multi-process settings: missing the {' and the '.join(missing)}. Give all "
        f"three: --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or "
        f"${ENV_ADDRESS}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID})")
  if count < 1 or not 0 <= pid < count:
    raise UserError(f"process id {pid} is not in [0, {count}): ids run from 0 to num_processes - 1")
  _split_address(address)
  return Settings(address, count, pid, None, "flags/env")


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"coordinator address {address!r} is not HOST:PORT, e.g. 10.0.0.1:1234")
  return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Polls a TCP connection to `address` until it opens; raises, naming it, after `timeout_s`.

  jax.distributed itself aborts the process (a C++ fatal error, without the address) when the
  coordinator never answers, so the non-coordinator processes probe it first. DNS failures are
  retried too: on Kubernetes a headless service's names appear a little after the pods.
  """
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout_s
  last_error: Exception | None = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(2.0, timeout_s))):
        return
    except OSError as e:
      last_error = e
    if time.monotonic() >= deadline:
      raise CoordinatorUnreachableError(
          f"could not reach the JAX coordinator at {address} within {timeout_s:g} s ({last_error}). "
          f"Check that process 0 of the job is running and listening on {address}, that this "
          "host can reach it (firewall, Kubernetes headless service, HTTP proxy variables), and "
          f"that every process was given the same address; raise the wait with "
          f"--distributed_timeout or ${ENV_TIMEOUT}.")
    time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def check_port_free(address: str) -> None:
  """Process 0 binds the coordinator's port: say so clearly when something else holds it."""
  _, port = _split_address(address)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise UserError(
          f"process 0 cannot start the JAX coordinator on port {port} ({e}): another program (or a "
          f"previous run of this job) holds it. Pick another port in --coordinator_address.") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int | None = None) -> Settings:
  """Starts jax.distributed for a multi-process job; a no-op for one process or when started."""
  if jax.distributed.is_initialized():
    return Settings(None, jax.process_count(), jax.process_index(), None, "already initialized")
  if timeout_s is None:
    timeout_s = _env_int(os.environ, ENV_TIMEOUT) or DEFAULT_TIMEOUT_S
  settings = resolve(coordinator_address, num_processes, process_id)
  if settings is None:
    return _initialize_detected(timeout_s)
  if settings.num_processes == 1:
    return settings
  # CPU processes exchange collectives over gloo (TCP); GPU and TPU backends ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  start = time.monotonic()
  address = settings.coordinator_address
  if settings.process_id == 0:
    check_port_free(address)
  else:
    wait_for_coordinator(address, timeout_s)
  # Logged before connecting: if the other processes never come, jax.distributed aborts the process
  # with a message that does not name the address.
  print(f"[jax.distributed] process {settings.process_id} of {settings.num_processes} joining the "
        f"coordinator at {address} ({settings.source}; timeout {timeout_s} s)", file=sys.stderr,
        flush=True)
  jax.distributed.initialize(
      address, settings.num_processes, settings.process_id,
      local_device_ids=settings.local_device_ids,
      initialization_timeout=max(1, int(timeout_s - (time.monotonic() - start))))
  return settings

def _initialize_detected(timeout_s: int) -> Settings:
  """jax.distributed on a cluster JAX detects by itself, or nothing when it detects none."""
  # $JAX_LOCAL_DEVICE_IDS (e.g. all GPUs of a node for one process per node under SLURM) wins
  # over the detected one-device-per-process default.
  local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
  local = [int(i) for i in local.split(",")] if local else None
  try:
    jax.distributed.initialize(local_device_ids=local, initialization_timeout=timeout_s)
  except ValueError as e:
    if "coordinator_address" not in str(e):  # JAX's words when it detects no cluster
      raise
    return Settings(None, 1, 0, None, "single")
  except RuntimeError as e:
    if "must be called before" not in str(e):
      raise
    # JAX is already in use in this process (a notebook, a test, a library caller): too late to
    # join a cluster, so this process runs alone, as it already does.
    logging.warning("jax.distributed not started: JAX was used before initialize(); running as "
                    "a single process")
    return Settings(None, 1, 0, None, "single")
  return Settings(None, jax.process_count(), jax.process_index(), local, "detected")


# ----------------------------------------------------------------------------- config agreement


def config_payload(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
  """The canonical JSON that must be identical on every process of a job."""
  payload = {"config": json.loads(config.to_json()), "workdir": workdir and os.path.abspath(workdir)}
  return json.dumps(payload, sort_keys=True)


def config_hash(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
  return hashlib.sha256(config_payload(config, workdir).encode()).hexdigest()


def _allgather_bytes(data: bytes) -> list[bytes]:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32)))
  sizes = sizes.reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [bytes(row[:n]) for row, n in zip(rows, sizes)]


def assert_same_config(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """Raises ConfigMismatchError on every process unless all run the same config and workdir.

  The processes exchange their config hashes (and, when they differ, the configs, to name the
  differing keys) with multihost_utils; a no-op for a single process.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = config_payload(config, workdir)
  digest = np.frombuffer(hashlib.sha256(mine.encode()).digest(), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  if (digests == digests[0]).all():
    return
  payloads = [json.loads(p) for p in _allgather_bytes(mine.encode())]
  lines = []
  for pid, payload in enumerate(payloads[1:], start=1):
    diffs = config_lib.diff(payloads[0], payload,
                            describe=lambda k, a, b: f"{k}: {a!r} on process 0, {b!r}")
    lines += [f"process {pid}: {d}" for d in diffs[:10]]
  raise ConfigMismatchError(
      f"the {jax.process_count()} processes of this job do not run the same config:\n  "
      + "\n  ".join(lines) + "\nStart every process with the same --config, overrides and --workdir.")
