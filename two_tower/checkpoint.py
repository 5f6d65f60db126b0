"""Checkpoints (orbax): parameters, training state and grain iterator position, as separate items.

A checkpoint step holds up to four items:

  params     the model parameters: all that inference (evaluate, embed, index, score, export) reads
  train      the optimizer state and step: read only to resume training
  data_iter  the grain iterator position: read only to resume training
  metrics    validation metrics of that state (the best-by-validation checkpoints)

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
import orbax.checkpoint as ocp

from two_tower.errors import UserError
from two_tower.state import TrainState
from two_tower.trees import named_leaves

PARAMS, TRAIN, DATA_ITER, METRICS = "params", "train", "data_iter", "metrics"


class CheckpointMismatchError(UserError):
  """A checkpoint that does not fit the model being restored."""


def _train_item(state: TrainState) -> dict[str, Any]:
  """The `train` item: what resuming needs besides the parameters."""
  item = {"step": state.step, "opt_state": state.opt_state}
  if state.item_counts is not None:
    item["item_counts"] = state.item_counts
  return item


def _abstract(tree: Any) -> Any:
  """Shape, dtype and sharding of each array of `tree`: where orbax restores to (any mesh)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if hasattr(x, "sharding") else x, tree)


class Checkpointer:
  """One directory of checkpoints (`checkpoints/` or `checkpoints_best/` of a work directory)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=max(1, save_interval_steps), create=True),
        item_handlers={PARAMS: ocp.StandardCheckpointHandler(),
                       TRAIN: ocp.StandardCheckpointHandler(),
                       DATA_ITER: grain.checkpoint.CheckpointHandler(),
                       METRICS: ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: TrainState, data_iter=None, *, metrics: dict | None = None,
           params_only: bool = False, force: bool = False) -> bool:
    """Saves (asynchronously) if `step` is on the save interval or `force`. `params_only` skips
    the optimizer state (a model to serve, not to resume); `metrics` are stored in the same
    checkpoint, so they are never out of step with it."""
    items = {PARAMS: ocp.args.StandardSave(state.params)}
    if not params_only:
      items[TRAIN] = ocp.args.StandardSave(_train_item(state))
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    if metrics is not None:
      items[METRICS] = ocp.args.JsonSave(metrics)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def should_save(self, step: int) -> bool:
    """Whether save(step) without `force` would save."""
    return self._manager.should_save(step)

  def metrics(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(**{METRICS: ocp.args.JsonRestore()}))[METRICS]

  def check_compatible(self, step: int, params: Any) -> None:
    """Raises CheckpointMismatchError naming every parameter whose saved shape differs."""
    saved = named_leaves(self._manager.item_metadata(step)[PARAMS])
    target = named_leaves(params)
    problems = []
    for name, want in target.items():
      have = saved.get(name)
      if have is None:
        problems.append(f"{name}: missing from the checkpoint")
      elif tuple(have.shape) != tuple(want.shape):
        problems.append(f"{name}: shape {tuple(have.shape)} in the checkpoint, {tuple(want.shape)} in the model")
    problems += [f"{name}: in the checkpoint but not in the model" for name in saved if name not in target]
    if problems:
      listing = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
      raise CheckpointMismatchError(
          f"checkpoint {self.path(step)} was written by an incompatible model (different "
          f"vocabulary, features or embedding sizes):\n  {listing}\nTrain into a new --workdir, or "
          "restore it with the config and data it was trained with.")

  def restore_params(self, step: int, params: Any) -> Any:
    """The parameters of `step`, placed like `params` (arrays or ShapeDtypeStructs with shardings,
    on any mesh). Reads neither the optimizer state nor the data position."""
    self.check_compatible(step, params)
    return self._manager.restore(
        step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(_abstract(params))}))[PARAMS]

  def restore_train_state(self, step: int, state: TrainState, data_iter=None) -> TrainState:
    """The whole train state of `step`, placed like `state`, and the iterator's position."""
    if TRAIN not in (self._manager.item_metadata(step) or {}):
      raise CheckpointMismatchError(
          f"checkpoint {self.path(step)} holds parameters only (a best-by-validation checkpoint): "
          "training resumes from the checkpoints/ directory")
    self.check_compatible(step, state.params)
    items = {PARAMS: ocp.args.StandardRestore(_abstract(state.params)),
             TRAIN: ocp.args.StandardRestore(_abstract(_train_item(state)))}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return TrainState(step=out[TRAIN]["step"], params=out[PARAMS], opt_state=out[TRAIN]["opt_state"],
                      item_counts=out[TRAIN].get("item_counts"))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
