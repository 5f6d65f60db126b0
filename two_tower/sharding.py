"""Every sharding decision of the project, in one place.

The mesh has two axes: `data` (the batch is split over it) and `model` (embedding-table rows and
dense-layer outputs are split over it). Parameters name logical axes; `axis_rules` is the one table
that maps those names onto mesh axes:

  logical axis  mesh axes                       what
  batch         data                            examples of a batch
  vocab         model, or (data, model)         embedding-table rows (config.mesh.shard_tables_over)
  embed         -  (replicated)                 embedding columns, dense-layer inputs
  hidden        model                           dense-layer outputs

Optimizer state takes the shardings of the parameters it mirrors (state.py compiles `tx.init` on the
parameter shardings). A dimension whose size does not divide its mesh axes is replicated when the
parameter is small (config.mesh.replicate_uneven_mb) and is an error otherwise; embedding tables can
be padded to a row multiple (config.mesh.table_row_multiple) so that big ones always divide.

Multi-process meshes are laid out process-major: process p holds data-axis rows
[p * data / P, (p + 1) * data / P) with every model column, which is the slice of the global batch
that pipelines/loader.py makes process p read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Mapping

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pipelines.schema import Schema
from two_tower.errors import ConfigError
from two_tower.trees import path_name

DATA, MODEL = "data", "model"

# config.mesh keys and their defaults: a config.json recorded before a key existed still loads.
MESH_DEFAULTS = dict(data=-1, model=1, shard_tables_over="model", table_row_multiple=1,
                     replicate_uneven_mb=16.0)
_TABLE_AXES = {"model": MODEL, "all": (DATA, MODEL)}


def mesh_option(cfg: ml_collections.ConfigDict | Mapping | None, name: str) -> Any:
  if cfg is not None and name in cfg:
    return cfg[name]
  return MESH_DEFAULTS[name]


def axis_rules(cfg: ml_collections.ConfigDict | None = None) -> tuple[tuple[str, Any], ...]:
  """The logical-axis -> mesh-axes table for config.mesh `cfg` (None: the defaults)."""
  over = mesh_option(cfg, "shard_tables_over")
  if over not in _TABLE_AXES:
    raise ConfigError(f"config.mesh.shard_tables_over must be one of {sorted(_TABLE_AXES)}, got {over!r}")
  return (
      ("batch", DATA),
      ("vocab", _TABLE_AXES[over]),  # embedding-table rows
      ("embed", None),  # embedding columns / dense inputs: replicated
      ("hidden", MODEL),  # dense outputs
  )


AXIS_RULES = axis_rules()

# ----------------------------------------------------------------------------- mesh


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, model) sizes from config.mesh; -1 takes the remaining devices."""
  data, model = int(mesh_option(cfg, "data")), int(mesh_option(cfg, "model"))
  if data == -1 and model == -1:
    raise ConfigError("config.mesh: at most one of mesh.data and mesh.model can be -1")
  if data == -1:
    data = num_devices // model if model > 0 and num_devices % model == 0 else 0
  elif model == -1:
    model = num_devices // data if data > 0 and num_devices % data == 0 else 0
  if data < 1 or model < 1 or data * model != num_devices:
    raise ConfigError(
        f"config.mesh (data={mesh_option(cfg, 'data')}, model={mesh_option(cfg, 'model')}) does "
        f"not fit the {num_devices} available devices: choose sizes whose product is {num_devices}, "
        f"e.g. --config.mesh.data={num_devices} --config.mesh.model=1, or -1 for one of them")
  return data, model


def make_mesh(cfg: ml_collections.ConfigDict, devices: Iterable[Any] | None = None) -> Mesh:
  """The (data, model) mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  # Process-major order, so that each process's devices hold one contiguous block of the batch.
  devices.sort(key=lambda d: (d.process_index, d.id))
  data, model = mesh_shape(cfg, len(devices))
  mesh = Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))
  check_process_layout(mesh)
  return mesh


def check_process_layout(mesh: Mesh) -> None:
  """Raises unless process p owns exactly the data rows [p*d, (p+1)*d) (all model columns)."""
  owner = np.vectorize(lambda d: d.process_index)(mesh.devices)
  num_processes = len(np.unique(owner))
  if num_processes == 1:
    return
  data, model = mesh.shape[DATA], mesh.shape[MODEL]
  per_process = mesh.devices.size // num_processes
  expected = np.repeat(np.arange(num_processes), max(1, data // num_processes))[:, None]
  if data % num_processes or not (owner == expected).all():
    raise ConfigError(
        f"mesh (data={data}, model={model}) does not split the batch by process: each of the "
        f"{num_processes} processes reads its own slice of the global batch, so mesh.data must be a "
        f"multiple of {num_processes} and mesh.model at most the {per_process} devices of one process "
        f"(and divide it), e.g. --config.mesh.data={data * model // min(model, per_process)} "
        f"--config.mesh.model={min(model, per_process)}")


def logical_spec(*names: str | None, cfg: ml_collections.ConfigDict | None = None) -> P:
  """The PartitionSpec of an array whose dimensions have these logical names, by `axis_rules`."""
  rules = dict(axis_rules(cfg))
  return P(*(None if name is None else rules[name] for name in names))


def logical_sharding(mesh: Mesh, *names: str | None,
                     cfg: ml_collections.ConfigDict | None = None) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(*names, cfg=cfg))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays whose first dimension is examples of a batch."""
  return logical_sharding(mesh, "batch")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, process_count: int = 1) -> None:
  data = mesh.shape[DATA]
  if batch_size % data:
    raise ConfigError(
        f"train.batch_size={batch_size} is not divisible by the {data} data-parallel devices "
        f"(mesh.data): use a multiple of {data}, e.g. --config.train.batch_size="
        f"{max(data, batch_size // data * data)}")
  if batch_size % process_count:
    raise ConfigError(f"train.batch_size={batch_size} is not divisible by {process_count} processes")

# ----------------------------------------------------------------------------- parameters


def pad_rows(rows: int, cfg: ml_collections.ConfigDict | None) -> int:
  multiple = max(1, int(mesh_option(cfg, "table_row_multiple")))
  return -(-rows // multiple) * multiple


def padded_schema(schema: Schema, cfg: ml_collections.ConfigDict | None) -> Schema:
  """`schema` with every embedding table's rows rounded up to config.mesh.table_row_multiple.

  The extra rows are never looked up (indices come from the vocabularies). The multiple is a
  property of the model, not of the mesh, so a checkpoint restores onto any mesh it divides.
  """
  features = tuple(dataclasses.replace(f, vocab_size=pad_rows(f.vocab_size, cfg))
                   if f.vocab_size > 0 else f for f in schema.features)
  return dataclasses.replace(schema, features=features)


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _fit(name: str, spec: P, shape: tuple[int, ...], itemsize: int, mesh: Mesh,
         replicate_bytes: float) -> P:
  """`spec` made valid for `shape` on `mesh`: axes of size 1 dropped (same placement, and the spec
  stays valid on any mesh), and a dimension its axes do not divide replicated (small parameters)
  or refused (large ones)."""
  out = []
  for dim, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = tuple(a for a in _axes(entry) if mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in axes)
    if axes and shape[dim] % shards:
      nbytes = math.prod(shape) * itemsize
      if nbytes > replicate_bytes:
        divisors = [d for d in range(2, mesh.size + 1) if shape[dim] % d == 0]
        pad = (f"Pad the embedding tables with --config.mesh.table_row_multiple={shards} (or a "
               "multiple of it; keep it for the life of the work directory), "
               if dim == 0 else "Change the layer's size, ")  # only table rows shard dim 0
        raise ConfigError(
            f"parameter {name} of shape {shape} ({nbytes / 2**20:.1f} MiB) cannot be sharded: its "
            f"dimension {dim} ({shape[dim]}) does not divide the {shards} devices of mesh axes "
            f"{axes}. {pad}choose mesh sizes that divide {shape[dim]} (sizes up to the device "
            f"count that do: {divisors or 'none'}), or keep it whole on every device with "
            f"--config.mesh.replicate_uneven_mb={math.ceil(nbytes / 2**20)}")
      logging.info("replicating %s %s: dimension %d does not divide mesh axes %s", name, shape,
                   dim, axes)
      axes = ()
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def param_shardings(abstract_state, mesh: Mesh, cfg: ml_collections.ConfigDict | None = None):
  """NamedShardings for a (possibly abstract) nnx.State, from the parameters' logical names."""
  with nnx.logical_axis_rules(axis_rules(cfg)):
    specs = nnx.get_partition_spec(abstract_state)
  replicate_bytes = float(mesh_option(cfg, "replicate_uneven_mb")) * 2**20

  def fit(path, spec, leaf):
    spec = _fit(path_name(path), spec, tuple(leaf.shape), np.dtype(leaf.dtype).itemsize, mesh,
                replicate_bytes)
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(fit, specs, abstract_state,
                                          is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_sh, mesh: Mesh):
  """Shardings of `tx`'s state: each copy of the parameter tree in it (Adam's moments, Adagrad's
  accumulators) takes the parameters' shardings; a per-row state of an embedding table (row-wise
  Adagrad's one accumulator per row, two_tower/rowsparse.py) takes the table's row sharding, so a
  row and its state live on the same device; the rest (step counts) is replicated.

  Compiling `tx.init` and reading its output shardings does not work: its outputs are constants
  (zeros), which XLA places on a single device rather than following the parameters.
  """
  abstract_opt = jax.eval_shape(tx.init, abstract_params)

  def place(state, sh, param):
    if isinstance(state, optax.MaskedNode):  # a parameter this part of the optimizer leaves alone
      return state
    if len(state.shape) < len(param.shape):  # per row: the table's first dimension
      return NamedSharding(mesh, P(*tuple(sh.spec)[:len(state.shape)]))
    return sh
  return optax.tree_map_params(tx, place, abstract_opt, param_sh, abstract_params,
                               transform_non_params=lambda _: replicated(mesh),
                               is_leaf=lambda x: isinstance(x, optax.MaskedNode))


# ----------------------------------------------------------------------------- memory


def per_device_bytes(x: jax.Array) -> int:
  """Bytes of `x` held by one device (its first addressable shard)."""
  shard = x.addressable_shards[0].data
  return math.prod(shard.shape) * shard.dtype.itemsize


def device_memory(tree) -> dict[int, int]:
  """{device id: bytes of `tree`'s arrays on it}, over this process's devices."""
  out: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return dict(sorted(out.items()))


def describe(params) -> list[str]:
  """One line per parameter: path, global shape, partition spec and per-device shard shape."""
  lines = []
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(x, jax.Array):
      spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else x.sharding
      shard = x.addressable_shards[0].data.shape
      lines.append(f"{path_name(path):60s} {str(tuple(x.shape)):16s} {str(spec):28s} {tuple(shard)}")
  return lines

# ----------------------------------------------------------------------------- export


def to_host(x: jax.Array) -> np.ndarray:
  """The global value of `x` as one numpy array, on every process (gathers the shards)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
