"""What every entry point shares: flags, start-up (jax.distributed) and error reporting."""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
from typing import Callable

import jax
from absl import flags, logging
from ml_collections import config_flags

from two_tower import config as config_lib
from two_tower import distributed
from two_tower.errors import UserError
from two_tower.train import Preempted

_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    f"HOST:PORT of process 0's coordinator (default: ${distributed.ENV_ADDRESS}, or detected on "
    "Cloud TPU, SLURM and Kubernetes).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    f"Number of JAX processes of the job (default: ${distributed.ENV_NUM_PROCESSES}).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    f"This process's id in [0, num_processes) (default: ${distributed.ENV_PROCESS_ID}).")
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", None,
    f"Seconds to wait for the coordinator and the other processes (default: "
    f"${distributed.ENV_TIMEOUT} or {distributed.DEFAULT_TIMEOUT_S}).")


def use_compilation_cache(directory: str) -> None:
  """Keeps this process's compiled XLA programs in `directory`, so that a later process compiling
  the same program (the nightly job's next day, a rerun) loads it instead: most of a small day's
  fixed seconds. Call before anything compiles (JAX decides once per process).
  $JAX_COMPILATION_CACHE_DIR, when set, wins."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  jax.config.update("jax_compilation_cache_dir", directory)
  # Cache every program: on CPU most compile in under JAX's default threshold of 1 s, and they
  # add up to seconds per day.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config-override mistakes reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\nPass --helpfull to list the flags.", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _config_error(e)
  sys.exit(2)


def _config_error(e: Exception) -> None:
  # ml_collections reports a bad override as one of these, with an escaped message.
  text = str(e.args[0] if e.args else e)
  text = re.sub(r"\s+", " ", text.replace("\\n", " ").replace("\\", "").replace("'", "")).strip()
  what = "unknown config key" if isinstance(e, (AttributeError, KeyError)) else "bad config value"
  text = text.replace(" Did you mean", ". Did you mean")
  print(f"error: {what} in a --config override: {text} (the keys are in configs/base.py)",
        file=sys.stderr)
  sys.exit(2)


def define_config(default: str | None = "configs/synthetic.py",
                  help_text: str = "ml_collections config file.") -> flags.FlagHolder:
  """--config=FILE plus --config.a.b=value overrides (checked here: the default config file's
  overrides are applied as soon as the flag is defined)."""
  try:
    return config_flags.DEFINE_config_file("config", default, help_text)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _config_error(e)


def define_workdir() -> flags.FlagHolder:
  return flags.DEFINE_string("workdir", None, "Work directory (checkpoints, logs, outputs).",
                             required=True)


def define_beam_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """--beam_runner and --beam_options: prepare data as an Apache Beam pipeline."""
  runner = flags.DEFINE_string(
      "beam_runner", "", "Prepare data as an Apache Beam pipeline on this runner (DirectRunner, "
      "DataflowRunner, FlinkRunner, SparkRunner; pip install -e '.[beam]'); empty: in this "
      "process.")
  options = flags.DEFINE_string(
      "beam_options", "", "The Beam runner's options, as its command line (e.g. "
      "\"--direct_num_workers=2 --direct_running_mode=multi_processing\", or Dataflow's "
      "--project, --region, --temp_location, ...).")
  return runner, options


def start() -> None:
  """Starts jax.distributed when the flags, env vars or the cluster say so: before anything touches
  JAX devices."""
  run_cli(lambda: distributed.initialize(_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                         timeout_s=_TIMEOUT.value))


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_freed_memory() -> None:
  """Keeps freed memory in the process, for the next step to reuse. XLA:CPU allocates a program's
  buffers afresh on every call, and glibc serves large allocations with new mmap'd pages that it
  returns on free: every step then pays a page fault per 4 KiB it touches (on Gowalla 11,500 a
  step, about 5 us each on this VM). Here they come from the one heap, which is never trimmed:
  every thread allocates from it, since a thread that finds it busy would otherwise get an arena of
  its own, whose mmap'd heaps shrink on free again. On accelerators the device buffers come from
  XLA's own allocator, and only the host's freed pages stay in the process. A no-op off glibc."""
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return
  libc.mallopt(_M_MMAP_MAX, 0)
  libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
  libc.mallopt(_M_ARENA_MAX, 1)


def deterministic_gpu_ops() -> None:
  """Asks XLA for deterministic GPU kernels, unless XLA_FLAGS already names the flag: a GPU sums
  the embedding tables' scatter-add gradients with atomics by default, in no fixed order, so a
  seed no longer fixes the trained parameters. Takes effect only before JAX starts its backend.
  CPUs are deterministic either way. Opt out with XLA_FLAGS=--xla_gpu_deterministic_ops=false."""
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_gpu_deterministic_ops" not in xla_flags:
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_gpu_deterministic_ops=true".strip()


def loaded_config(holder: flags.FlagHolder):
  """The config of a --config flag, validated (None when the flag was not given)."""
  return None if holder.value is None else config_lib.validate(holder.value)


def run_cli(main: Callable[[], object]) -> None:
  """Runs `main`; a UserError is printed as one line (exit 2), a preemption exits 143. Any other
  exception is a bug and keeps its traceback."""
  reuse_freed_memory()
  deterministic_gpu_ops()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and absl are chatty at INFO
  try:
    main()
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(143)  # 128 + SIGTERM, so schedulers treat it as a retryable stop
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def print_json(title: str, payload) -> None:
  print(f"{title}:\n{json.dumps(payload, indent=2, sort_keys=True)}")


def print_artifacts(paths: dict[str, str]) -> None:
  print("artifacts:")
  for name, path in paths.items():
    print(f"  {name:14s} {path}")
