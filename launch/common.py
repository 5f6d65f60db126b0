"""Shared flags and error handling of the entry points."""

from __future__ import annotations

import json
import re
import sys
from typing import Callable

from absl import flags, logging
from ml_collections import config_flags

from pipelines.sources import DataError
from two_tower.checkpoint import CheckpointMismatchError
from two_tower.train import Preempted

# Errors a user can fix: printed as one clear message, without a traceback.
USER_ERRORS = (DataError, CheckpointMismatchError, FileNotFoundError, ValueError, KeyError)


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
  text = str(e.args[0] if e.args else e)
  text = re.sub(r"\s+", " ", text.replace("\\n", " ").replace("\\", "").replace("'", "")).strip()
  what = "unknown config key" if isinstance(e, (AttributeError, KeyError)) else "bad config value"
  text = text.replace(" Did you mean", ". Did you mean")
  print(f"error: {what} in a --config override: {text} (the keys are in configs/base.py)",
        file=sys.stderr)
  sys.exit(2)


def define_config(default: str = "configs/synthetic.py") -> flags.FlagHolder:
  """--config=FILE plus --config.a.b=value overrides (checked here: the default config file's
  overrides are applied as soon as the flag is defined)."""
  try:
    return config_flags.DEFINE_config_file("config", default, "ml_collections config file.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _config_error(e)


def run_cli(main: Callable[[], None]) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and absl are chatty at INFO
  try:
    main()
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(143)  # 128 + SIGTERM, so schedulers treat it as a retryable stop
  except USER_ERRORS as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def print_json(title: str, payload) -> None:
  print(f"{title}:\n{json.dumps(payload, indent=2, sort_keys=True)}")


def print_artifacts(paths: dict[str, str]) -> None:
  print("artifacts:")
  for name, path in paths.items():
    print(f"  {name:14s} {path}")


def define_workdir() -> flags.FlagHolder:
  return flags.DEFINE_string("workdir", None, "Work directory (checkpoints, logs, outputs).",
                             required=True)
