"""Shared flags and error handling of the entry points."""

from __future__ import annotations

import json
import sys
from typing import Callable

from absl import flags

from pipelines.sources import DataError
from two_tower.checkpoint import CheckpointMismatchError

# Errors a user can fix: printed as one clear message, without a traceback.
USER_ERRORS = (DataError, CheckpointMismatchError, FileNotFoundError, ValueError, KeyError)


def run_cli(main: Callable[[], None]) -> None:
  try:
    main()
  except USER_ERRORS as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def print_json(title: str, payload) -> None:
  print(f"{title}:\n{json.dumps(payload, indent=2, sort_keys=True)}")


def define_workdir() -> flags.FlagHolder:
  return flags.DEFINE_string("workdir", None, "Work directory (checkpoints, logs, outputs).",
                             required=True)
