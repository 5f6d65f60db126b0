"""Every sharding decision of the project, in one place.

The mesh has two axes: `data` (the batch is split over it) and `model` (embedding-table rows and
dense-layer outputs are split over it). Parameters name logical axes; AXIS_RULES maps those names
onto mesh axes. Optimizer state takes the shardings of the parameters it mirrors.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

AXIS_RULES = (
    ("batch", DATA),
    ("vocab", MODEL),  # embedding-table rows
    ("embed", None),  # embedding columns / dense inputs: replicated
    ("hidden", MODEL),  # dense outputs
)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Builds the (data, model) mesh from config.mesh; -1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data, model = int(cfg.data), int(cfg.model)
  if data == -1 and model == -1:
    raise ValueError("config.mesh: at most one of mesh.data and mesh.model can be -1")
  if data == -1:
    data = n // model if model > 0 and n % model == 0 else 0
  elif model == -1:
    model = n // data if data > 0 and n % data == 0 else 0
  if data < 1 or model < 1 or data * model != n:
    raise ValueError(
        f"config.mesh (data={cfg.data}, model={cfg.model}) does not fit the {n} available devices: "
        f"choose sizes whose product is {n}, e.g. --config.mesh.data={n} --config.mesh.model=1")
  return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, process_count: int = 1) -> None:
  data = mesh.shape[DATA]
  if batch_size % data:
    raise ValueError(
        f"train.batch_size={batch_size} is not divisible by the {data} data-parallel devices "
        f"(mesh.data): use a multiple of {data}, e.g. --config.train.batch_size="
        f"{max(data, batch_size // data * data)}")
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by {process_count} processes")


def param_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for a (possibly abstract) nnx.State, from the parameters' logical names."""
  with nnx.logical_axis_rules(AXIS_RULES):
    specs = nnx.get_partition_spec(abstract_state)
  specs = jax.tree.map(lambda s: _fit(s, mesh), specs, is_leaf=lambda x: isinstance(x, P))
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _fit(spec: P, mesh: Mesh) -> P:
  # Drop mesh axes of size 1: same placement, and specs stay valid on any mesh.
  def keep(axis):
    if axis is None:
      return None
    axes = axis if isinstance(axis, tuple) else (axis,)
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes
  return P(*(keep(a) for a in spec))


def per_device_bytes(x: jax.Array) -> int:
  shard = x.addressable_shards[0].data
  return math.prod(shard.shape) * shard.dtype.itemsize
