"""Checkpoints (orbax): train state and grain iterator position, saved together.

orbax writes each step into a temporary directory and renames it when complete, so a job killed
mid-save leaves the previous checkpoint as the latest. Before restoring, the saved parameter shapes
are compared with the model's, so a checkpoint of another model fails with the differences named
instead of an opaque shape error.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA_ITER, METRICS = "state", "data_iter", "metrics"


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model being restored."""


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int, save_interval_steps: int):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=max(1, save_interval_steps), create=True),
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITER: grain.checkpoint.CheckpointHandler(),
                       METRICS: ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_iter=None, *, metrics: dict | None = None,
           force: bool = False) -> bool:
    """Saves (asynchronously) if `step` is on the save interval or `force`; `metrics` are stored
    in the same checkpoint, so they are never out of step with it."""
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    if metrics is not None:
      items[METRICS] = ocp.args.JsonSave(metrics)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def metrics(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(**{METRICS: ocp.args.JsonRestore()}))[METRICS]

  def check_compatible(self, step: int, target: Any) -> None:
    """Raises CheckpointMismatchError naming every parameter whose saved shape differs."""
    saved = self._manager.item_metadata(step)[STATE]
    saved_leaves = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    target_leaves = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = []
    for name, want in target_leaves.items():
      have = saved_leaves.get(name)
      if have is None:
        problems.append(f"{name}: missing from the checkpoint")
      elif tuple(have.shape) != tuple(want.shape):
        problems.append(f"{name}: shape {tuple(have.shape)} in the checkpoint, {tuple(want.shape)} in the model")
    problems += [f"{name}: in the checkpoint but not in the model"
                 for name in saved_leaves if name not in target_leaves]
    if problems:
      listing = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
      raise CheckpointMismatchError(
          f"checkpoint {self.path(step)} was written by an incompatible model (different "
          f"vocabulary, features or embedding sizes):\n  {listing}\nTrain into a new --workdir, or "
          "restore it with the config and data it was trained with.")

  def restore(self, step: int, target: Any, data_iter=None) -> Any:
    """Restores the state onto `target`'s shardings (any mesh) and, if given, the iterator."""
    self.check_compatible(step, target)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if hasattr(x, "sharding") else x, target)
    items = {STATE: ocp.args.StandardRestore(abstract)}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
