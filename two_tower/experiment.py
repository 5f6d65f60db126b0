"""A work directory's setup: config binding, data, mesh, model state, catalog and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pipelines import loader
from pipelines.prepare import PreparedData, prepare, resolve_data_dir
from two_tower import features as feats
from two_tower import distributed, sharding
from two_tower.checkpoint import Checkpointer
from two_tower.optim import make_optimizer
from two_tower.reporting import write_json_atomic
from two_tower.state import TrainState, create_train_state

# Settings that may change between runs in one work directory: they do not change the result.
RUNTIME_KEYS = ("train.log_every_steps", "train.checkpoint_every_steps",
                "train.max_checkpoints_to_keep", "train.eval_every_steps", "data.worker_count",
                "data.prefetch_buffer_size", "data.data_dir", "data.cache", "loss.row_chunk", "mesh.",
                "eval.", "index.", "score.")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def bind_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the config in `workdir/config.json`, or checks that it matches the recorded one."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    ours, theirs = _flatten(current), _flatten(recorded)
    keys = sorted(k for k in set(ours) | set(theirs) if not any(k.startswith(r) for r in RUNTIME_KEYS))
    diffs = [f"{k}: {theirs.get(k, '<unset>')!r} -> {ours.get(k, '<unset>')!r}"
             for k in keys if ours.get(k) != theirs.get(k)]
    if diffs:
      raise ValueError(
          f"work directory {workdir} belongs to another config; it differs in\n  "
          + "\n  ".join(diffs[:20])
          + "\nUse a new --workdir for a new config, or pass the config recorded in "
          f"{path} to resume it.")
  elif jax.process_index() == 0:
    write_json_atomic(path, current)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a work directory was trained with (its config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: {workdir} is not a training work directory. Train first with "
        f"python -m launch.train --config=configs/<name>.py --workdir={workdir}")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class Setup:
  """Everything a job needs to run or evaluate a model of one work directory."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  data: PreparedData
  graphdef: Any
  state: TrainState
  state_sharding: Any
  catalog: dict
  tx: optax.GradientTransformation
  num_steps: int
  num_examples: int
  checkpointer: Checkpointer
  best: Checkpointer | None  # the best state by validation metric, when train.select_by is set


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
  data_dir = resolve_data_dir(config.data, workdir)
  if jax.process_index() == 0:
    data = prepare(config.data, data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("two_tower:data_prepared")
  if jax.process_index() != 0:
    data = prepare(config.data, data_dir)
  return data


def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  distributed.assert_same_config(config, workdir)  # all processes: one config, one workdir
  os.makedirs(workdir, exist_ok=True)
  bind_workdir(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train.batch_size, mesh, jax.process_count())
  data = prepare_data(config, workdir)
  schema = data.schema
  num_steps, num_examples = loader.train_length(
      schema.split_sizes["train"], config.train.batch_size, config.train.num_epochs,
      config.train.num_steps)
  tx = make_optimizer(config.optimizer, num_steps)
  graphdef, state, state_sh = create_train_state(schema, config, tx, mesh)
  catalog = jax.device_put(
      feats.load_catalog(data, config.model.query_features, config.model.item_features),
      sharding.replicated(mesh))
  best = None
  if config.train.select_by:
    best = Checkpointer(os.path.join(workdir, "checkpoints_best"), max_to_keep=1, save_interval_steps=1)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              max_to_keep=config.train.max_checkpoints_to_keep,
                              save_interval_steps=config.train.checkpoint_every_steps)
  return Setup(config, workdir, mesh, data, graphdef, state, state_sh, catalog, tx, num_steps,
               num_examples, checkpointer, best)


def load_for_eval(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> Setup:
  """The setup of a work directory with a checkpoint restored: the given step (from the regular
  or the best checkpoints), else the best one by validation metric when train.select_by is set,
  else the latest."""
  s = setup(config, workdir)
  if step is None:
    use_best = s.best is not None and s.best.latest_step() is not None
    source = s.best if use_best else s.checkpointer
    step = source.latest_step()
  else:
    source = s.best if s.best is not None and step in s.best.all_steps() else s.checkpointer
  if step is None:
    raise FileNotFoundError(
        f"no checkpoint in {s.checkpointer.directory}: train first with "
        f"python -m launch.train --config=... --workdir={workdir}")
  s.state = source.restore(step, s.state)
  return s
