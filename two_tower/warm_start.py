"""Warm start across vocabulary growth: yesterday's state placed into today's (larger) tables.

Every embedding table is indexed by a vocabulary of the ID registry (`two_tower/registry.py`).
A row whose owner is the same on both days keeps its embedding and its optimizer slots bit for
bit; every other row (a new ID, a reused row of an evicted ID, the rows a growth chunk added) is
what a freshly initialised model and optimizer hold there (the model's initialiser; Adam's zero
moments, Adagrad's initial accumulator, row-wise Adagrad's zero row accumulators). Dense layers and
scalar optimizer state (counts) carry over whole.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pipelines.schema import Schema
from two_tower import sharding
from two_tower.checkpoint import Checkpointer
from two_tower.state import TrainState, abstract_params, item_id_rows, streams_item_counts
from two_tower.trees import named_leaves, path_name

# The name of an embedding table's leaf (a tower's, or TwoTower.bias_tables'), in the parameters
# and in every copy the optimizer keeps.
_TABLE = re.compile(r"tables/([^/]+)/embedding$")
_ITEM_COUNTS = "item_counts"  # TrainState.item_counts (two_tower/item_frequency.py)


def table_vocabularies(schema: Schema) -> dict[str, str]:
  """Embedding table (feature name) -> the registry vocabulary its rows index."""
  return {f.name: "item_id" if f.kind == "history" else f.name
          for f in schema.features if f.vocab_size > 0}


def grow(fresh: Any, parent: Any, carried: Mapping[str, np.ndarray],
         tables: Mapping[str, str]) -> Any:
  """`fresh` (today's shapes, freshly initialised) with the leaves of `parent` (yesterday's)
  carried over: whole for non-table leaves, and the rows marked in `carried[vocabulary]` for
  embedding tables (and their optimizer copies). Jittable; the trees must have the same
  structure, which the model and optimizer config guarantee."""
  old_leaves = named_leaves(parent)

  def one(path, new):
    name = path_name(path)
    old = old_leaves[name]
    if name == _ITEM_COUNTS:  # per item-ID row, like the item-ID table's rows
      rows = carried["item_id"]
      return jnp.where(jnp.asarray(rows), jnp.zeros_like(new).at[:old.shape[0]].set(old), new)
    match = _TABLE.search(name)
    # 2-D: a table, or its moments; 1-D: a per-row state (row-wise Adagrad's accumulators).
    if match is None or getattr(new, "ndim", 0) not in (1, 2):
      if tuple(jnp.shape(old)) != tuple(jnp.shape(new)):
        raise ValueError(f"{name}: shape {jnp.shape(old)} yesterday, {jnp.shape(new)} today; "
                         "only embedding tables may grow")
      return old
    rows = carried[tables[match.group(1)]]
    if rows.shape[0] != new.shape[0] or old.shape[0] > new.shape[0]:
      raise ValueError(f"{name}: {old.shape[0]} rows yesterday, {new.shape[0]} today, "
                       f"{rows.shape[0]} in the registry: tables only grow, by the registry")
    widened = jnp.zeros_like(new).at[:old.shape[0]].set(old)
    return jnp.where(jnp.asarray(rows).reshape((-1,) + (1,) * (new.ndim - 1)), widened, new)

  return jax.tree_util.tree_map_with_path(one, fresh)


def restart_schedule(opt_state: Any) -> Any:
  """The optimizer state with its learning-rate schedule back at step 0 (each day runs the
  config's schedule over its own steps); moments and Adam's bias-correction count carry on."""
  def reset(x):
    if isinstance(x, optax.ScaleByScheduleState):
      return x._replace(count=jnp.zeros_like(x.count))
    return x
  return jax.tree.map(reset, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


def abstract_train_state(schema: Schema, config: ml_collections.ConfigDict,
                         tx: optax.GradientTransformation, mesh) -> TrainState:
  """Shapes, dtypes and shardings of the train state of a model over `schema` (nothing
  allocated): what restoring another day's checkpoint onto `mesh` needs."""
  _, params, param_sh = abstract_params(schema, config, mesh)
  opt_sh = sharding.opt_state_shardings(tx, params, param_sh, mesh)
  place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  counts = None
  if streams_item_counts(config):
    counts = jax.ShapeDtypeStruct((item_id_rows(params),), jnp.float32,
                                  sharding=sharding.replicated(mesh))
  return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
      params=jax.tree.map(place, params, param_sh),
      opt_state=jax.tree.map(place, jax.eval_shape(tx.init, params), opt_sh),
      item_counts=counts)


def warm_start_state(parent: Checkpointer, parent_step: int, parent_schema: Schema,
                     fresh: TrainState, state_sharding: Any, config: ml_collections.ConfigDict,
                     tx: optax.GradientTransformation, mesh, carried: Mapping[str, np.ndarray],
                     tables: Mapping[str, str]) -> TrainState:
  """Yesterday's whole train state (parameters, optimizer state, step) from `parent`, grown into
  `fresh`'s shapes and placed like it, with the schedule restarted."""
  old = parent.restore_train_state(
      parent_step, abstract_train_state(parent_schema, config, tx, mesh))

  def combine(fresh, old):
    state = grow(fresh, old, carried, tables)
    return state.replace(opt_state=restart_schedule(state.opt_state))
  return jax.jit(combine, out_shardings=state_sharding)(fresh, old)


def warm_start_params(parent: Checkpointer, parent_step: int, parent_schema: Schema,
                      fresh_params: Any, config: ml_collections.ConfigDict, mesh,
                      carried: Mapping[str, np.ndarray], tables: Mapping[str, str]) -> Any:
  """Yesterday's parameters only, grown into `fresh_params`' shapes (the live model scored on
  today's catalog: new rows as initialised)."""
  _, params, param_sh = abstract_params(parent_schema, config, mesh)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, param_sh)
  old = parent.restore_params(parent_step, target)
  out_sh = jax.tree.map(lambda x: x.sharding, fresh_params)
  return jax.jit(lambda f, o: grow(f, o, carried, tables), out_shardings=out_sh)(fresh_params, old)
