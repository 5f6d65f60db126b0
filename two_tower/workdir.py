"""A work directory: its layout, its recorded config, and which checkpoint is the model.

  config.json           the config the directory was created with (see `bind`)
  data/                 prepared datasets (unless data.data_dir points elsewhere)
  checkpoints/<step>/   params + train (optimizer) state + data position, for resuming
  checkpoints_best/<step>/  params + validation metrics of the best state (train.select_by)
  train_summary.json, eval/, index/, candidates/, tensorboard/

The model of a work directory, the one every inference job (evaluate, embed, index, score, export)
uses unless given a step, is the best checkpoint by validation metric when there is one, else the
latest checkpoint. `restore_params` loads only its parameters: inference never builds an optimizer
or reads its moments.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pipelines.prepare import PreparedData, prepare, resolve_data_dir
from two_tower import atomic, distributed, sharding
from two_tower import config as config_lib
from two_tower import features as feats
from two_tower.checkpoint import Checkpointer
from two_tower.errors import MissingArtifactError, UserError
from two_tower.state import abstract_params

# Settings that may change between runs in one work directory: they do not change the model.
RUNTIME_KEYS = ("train.log_every_steps", "train.checkpoint_every_steps",
                "train.max_checkpoints_to_keep", "train.eval_every_steps", "data.worker_count",
                "data.prefetch_buffer_size", "data.data_dir", "data.cache", "loss.row_chunk", "mesh.",
                "eval.", "index.", "score.")


class WorkdirConfigError(UserError):
  """A config that differs from the one the work directory was created with."""


@dataclasses.dataclass(frozen=True)
class Model:
  """What inference needs: the model's structure and parameters, and the catalog it scores."""

  graphdef: Any
  params: Any
  catalog: feats.Catalog  # feature tables on device, replicated over `mesh`
  data: PreparedData
  mesh: Mesh
  step: int

  @property
  def schema(self):
    return self.data.schema


class Workdir:

  def __init__(self, root: str):
    self.root = os.path.abspath(root)

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  @property
  def config_path(self) -> str:
    return self.path("config.json")

  # --------------------------------------------------------------------------- config

  def bind(self, config: ml_collections.ConfigDict) -> None:
    """Validates `config` and records it in config.json, or checks that it matches the recorded
    one (every process of a job must pass the same config and directory)."""
    config_lib.validate(config)
    distributed.assert_same_config(config, self.root)
    os.makedirs(self.root, exist_ok=True)
    current = json.loads(config.to_json())
    if not os.path.exists(self.config_path):
      if jax.process_index() == 0:
        atomic.write_json(self.config_path, current)
      return
    with open(self.config_path) as f:
      recorded = json.load(f)
    # Keys added to configs/base.py since the directory was recorded compare at their defaults.
    recorded = config_lib.with_defaults(ml_collections.ConfigDict(recorded))
    diffs = config_lib.diff(recorded, current, ignore=RUNTIME_KEYS)
    if diffs:
      raise WorkdirConfigError(
          f"work directory {self.root} belongs to another config; it differs in\n  "
          + "\n  ".join(diffs[:20])
          + "\nUse a new --workdir for a new config, or pass the config recorded in "
          f"{self.config_path} to resume it.")

  def config(self) -> ml_collections.ConfigDict:
    """The recorded config, with keys added since it was recorded at their defaults."""
    if not os.path.exists(self.config_path):
      raise MissingArtifactError(
          f"{self.config_path} does not exist: {self.root} is not a training work directory. "
          f"Train first with python -m launch.train --config=configs/<name>.py --workdir={self.root}")
    with open(self.config_path) as f:
      return config_lib.validate(config_lib.with_defaults(ml_collections.ConfigDict(json.load(f))))

  # --------------------------------------------------------------------------- data

  def prepare_data(self, config: ml_collections.ConfigDict, beam_runner: str = "",
                   beam_options: str = "") -> PreparedData:
    """The prepared dataset of `config`, built by process 0 if missing (as an Apache Beam pipeline
    on `beam_runner`, when given), then opened everywhere."""
    data_dir = resolve_data_dir(config.data, self.root)
    if jax.process_index() == 0:
      data = prepare(config.data, data_dir, beam_runner, beam_options)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("two_tower:data_prepared")
    if jax.process_index() != 0:
      data = prepare(config.data, data_dir)
    return data

  # --------------------------------------------------------------------------- checkpoints

  def checkpointer(self, train_cfg: ml_collections.ConfigDict | None = None) -> Checkpointer:
    """checkpoints/: the states training resumes from."""
    if train_cfg is None:
      return Checkpointer(self.path("checkpoints"))
    return Checkpointer(self.path("checkpoints"), max_to_keep=train_cfg.max_checkpoints_to_keep,
                        save_interval_steps=train_cfg.checkpoint_every_steps)

  def best_checkpointer(self) -> Checkpointer:
    """checkpoints_best/: the best parameters by validation metric, with their metrics."""
    return Checkpointer(self.path("checkpoints_best"), max_to_keep=1)

  def _sources(self) -> list[Checkpointer]:
    return [c() for name, c in (("checkpoints_best", self.best_checkpointer),
                                ("checkpoints", self.checkpointer)) if os.path.isdir(self.path(name))]

  def model_checkpoint(self, step: int | None = None) -> tuple[Checkpointer, int]:
    """(checkpoints, step) of the model: checkpoint `step` when given (best or regular), else the
    best checkpoint by validation metric when there is one, else the latest."""
    sources = self._sources()
    for source in sources:
      steps = source.all_steps()
      if steps and (step is None or step in steps):
        return source, steps[-1] if step is None else step
    if step is not None:
      kept = sorted({s for source in sources for s in source.all_steps()})
      raise MissingArtifactError(
          f"checkpoint step {step} is not in {self.root} (kept: {kept}): use one of those steps, "
          "or rebuild what refers to it")
    raise MissingArtifactError(
        f"no checkpoint in {self.path('checkpoints')}: train first with python -m launch.train "
        f"--config=... --workdir={self.root}")

  def restore_params(self, config: ml_collections.ConfigDict, data: PreparedData, mesh: Mesh,
                     step: int | None = None) -> Model:
    """The model's parameters (see `model_checkpoint`) on `mesh`, and the catalog, on device."""
    source, step = self.model_checkpoint(step)
    graphdef, abstract, shardings = abstract_params(data.schema, config, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
    params = source.restore_params(step, target)
    catalog = jax.device_put(
        feats.load_catalog(data, config.model.query_features, config.model.item_features),
        sharding.replicated(mesh))
    return Model(graphdef, params, catalog, data, mesh, step)

  def load_model(self, config: ml_collections.ConfigDict | None = None, step: int | None = None
                 ) -> Model:
    """`restore_params` on a mesh from config.mesh, with the data prepared or found first."""
    config = self.config() if config is None else config
    self.bind(config)
    mesh = sharding.make_mesh(config.mesh)
    return self.restore_params(config, self.prepare_data(config), mesh, step)
