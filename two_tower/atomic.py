"""Atomic file outputs: written to a temporary name in the same directory, then renamed.

A reader sees either the previous file or the complete new one, never a partial one: the rename is
atomic on POSIX file systems. (On an object store, where there is no rename, the same call is a
single PUT of the finished object, which is atomic too.) Files are made world-readable (0644), like
files written with `open()`, since serving jobs may run as other users.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np

MODE = 0o644


@contextlib.contextmanager
def atomic_path(path: str, tag: str = "") -> Iterator[str]:
  """Yields a temporary path to write; on success it is synced and renamed over `path`.

  The temporary name is `.<name>.tmp<tag>-XXXX`, so a job can find and delete the leftovers of its
  own crashed runs (by `tag`) without touching other writers' files in flight.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp{tag}-")
  os.close(fd)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.chmod(tmp, MODE)  # mkstemp makes the file private
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_bytes(path: str, data: bytes) -> None:
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_json(path: str, payload: Any) -> None:
  write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def save_npy(path: str, array: np.ndarray) -> None:
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.save(f, array, allow_pickle=False)
