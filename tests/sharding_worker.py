"""Sharding checks that need several devices; tests/test_sharding.py runs this in a subprocess.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py small|big

Builds the real train state (two_tower.state) and the real jitted train step (two_tower.train) over
a hand-made schema, so no dataset has to be prepared: `small` checks the placement of every
parameter and optimizer moment for both table rules, that the compiled step never holds a table
whole, and the errors that need a multi-device mesh; `big` trains a 10M x 64 item table on 8 devices.
Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.base import get_base_config
from pipelines.schema import Feature, Schema
from two_tower import sharding
from two_tower.model import export_tables
from two_tower.optim import make_optimizer
from two_tower.state import create_train_state
from two_tower.train import train_step


def build(rows: int, *, dim: int, hidden: tuple[int, ...], optimizer: str,
          embeddings: str = "dense", **mesh):
  c = get_base_config()
  c.model.query_features, c.model.item_features = ("user_id",), ("item_id",)
  c.model.id_embedding_dim, c.model.hidden_dims = dim, hidden
  c.model.output_dim = 16 if hidden else 0
  c.optimizer.name, c.optimizer.learning_rate = optimizer, 0.5
  c.optimizer.embeddings = embeddings
  c.loss.row_chunk = 64
  c.mesh.update(mesh)
  users = 1000
  schema = Schema(
      features=(Feature("user_id", "user", "id", users), Feature("item_id", "item", "id", rows)),
      num_users=users - 2, num_items=rows - 2, history_length=4, split_sizes={"train": 1})
  mesh_ = sharding.make_mesh(c.mesh)
  tx = make_optimizer(c.optimizer, 10)
  graphdef, state, state_sh = create_train_state(schema, c, tx, mesh_)
  # The catalog's item columns are sharded like the table (a replicated copy of a 10M-row
  # column on each of 8 CPU devices would cost more host memory than it tests).
  rep = sharding.replicated(mesh_)
  rows_sh = NamedSharding(mesh_, P(sharding.axis_rules(c.mesh)[1][1]))
  rows_sh = rows_sh if rows % (mesh_.size if c.mesh.shard_tables_over == "all" else mesh_.shape["model"]) == 0 else rep
  catalog = {
      "user": {"user_id": jax.device_put(np.arange(users, dtype=np.int32), rep),
               "history": jax.device_put(np.zeros((users, 4), np.int32), rep)},
      "item": {"item_id": jax.device_put(np.arange(rows, dtype=np.int32), rows_sh),
               "sampling_prob": jax.device_put(np.full(rows, 1.0 / rows, np.float32), rows_sh)},
  }
  batch_size = 64
  rng = np.random.default_rng(0)
  batch = dict(user_index=rng.integers(1, users, batch_size).astype(np.int32),
               item_index=rng.integers(1, rows - 2, batch_size).astype(np.int32),
               history=np.zeros((batch_size, 4), np.int32), weight=np.ones(batch_size, np.float32))
  bsh = sharding.batch_sharding(mesh_)
  batch = {k: jax.device_put(v, bsh) for k, v in batch.items()}
  step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, config=c, mesh=mesh_),
                 in_shardings=(state_sh, bsh, jax.tree.map(lambda x: x.sharding, catalog)),
                 out_shardings=(state_sh, rep), donate_argnums=0)
  return c, mesh_, state, step, batch, catalog


def item_table(params):
  return params["item_tower"]["embedding"]["tables"]["item_id"]["embedding"][...]


def step_report(rows: int, dim: int, state, step, batch, catalog, steps: int):
  """Trains `steps` steps: (a report of losses, per-device memory and whole-table buffers in the
  compiled step, the trained state)."""

  compiled = step.lower(state, batch, catalog).compile()
  hlo = compiled.as_text()
  # Per-device HLO: a [rows, dim] buffer anywhere in it would be a whole table on one device.
  whole = [l.strip()[:200] for l in hlo.splitlines() if re.search(rf"\[{rows},{dim}\]", l)]
  table = item_table(state.params)
  looked_up = np.asarray(batch["item_index"])[:4]
  untouched = np.setdiff1d(np.arange(1, 50), np.asarray(batch["item_index"]))[:4]
  before = np.asarray(table[looked_up]), np.asarray(table[untouched])
  losses, times = [], []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, catalog)
    losses.append(float(metrics["loss"]))
    times.append(time.perf_counter() - start)
  table = item_table(state.params)
  moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", ()) == table.shape]
  report = dict(
      losses=losses, step_s=times, table_shape=list(table.shape), table_spec=str(table.sharding.spec),
      table_bytes=table.nbytes, table_per_device_bytes=sharding.per_device_bytes(table),
      table_bytes_by_device={str(d): s.data.nbytes for d, s in
                             ((s.device.id, s) for s in table.addressable_shards)},
      param_bytes_by_device=sharding.device_memory(state.params),
      opt_bytes_by_device=sharding.device_memory(state.opt_state),
      moment_specs=[str(m.sharding.spec) for m in moments],
      describe=sharding.describe(state.params),
      whole_table_instructions=whole,
      temp_bytes_per_device=compiled.memory_analysis().temp_size_in_bytes,
      looked_up_changed=bool(np.abs(np.asarray(table[looked_up]) - before[0]).max() > 0),
      untouched_unchanged=bool(np.array_equal(np.asarray(table[untouched]), before[1])),
  )
  return report, state


def export_report(state, schema_rows: int) -> dict:
  schema = Schema(features=(Feature("user_id", "user", "id", 1000),
                            Feature("item_id", "item", "id", schema_rows)),
                  num_users=998, num_items=schema_rows - 2, history_length=4, split_sizes={})
  tables = dict(export_tables(state.params, schema))
  return {name: dict(shape=list(t.shape), sum=float(np.asarray(t, np.float64).sum()))
          for name, t in tables.items()}


def error_of(fn) -> str | None:
  try:
    fn()
  except ValueError as e:
    return str(e)
  return None


def small() -> dict:
  out = {}
  for over in ("model", "all"):
    c, mesh, state, step, batch, catalog = build(
        4096, dim=64, hidden=(32,), optimizer="adam", data=4, model=2, shard_tables_over=over)
    out[over], state = step_report(4096, 64, state, step, batch, catalog, steps=2)
    out[over]["export"] = export_report(state, 4096)
  out["fill"] = dict(sharding.make_mesh(_mesh_cfg(data=-1, model=2)).shape)
  out["errors"] = dict(
      mesh=error_of(lambda: sharding.make_mesh(_mesh_cfg(data=3, model=2))),
      batch=error_of(lambda: sharding.check_batch(
          250, sharding.make_mesh(_mesh_cfg(data=4, model=2)))),
      rows=error_of(lambda: build(4097, dim=64, hidden=(), optimizer="sgd", data=4, model=2,
                                  replicate_uneven_mb=0.0)),
  )
  # The same 4097-row table, padded to a multiple of 8 rows, shards over all 8 devices and trains.
  c, mesh, state, step, batch, catalog = build(
      4097, dim=64, hidden=(), optimizer="sgd", data=4, model=2, shard_tables_over="all",
      table_row_multiple=8, replicate_uneven_mb=0.0)
  out["padded"], state = step_report(4104, 64, state, step, batch, catalog, steps=1)
  out["padded"]["export"] = export_report(state, 4097)
  return out


def big() -> dict:
  # rbg keys: threefry would spend ~30 s and three tables' worth of temporaries generating the
  # 640M initial values on 2 CPU cores; what is checked here is placement, not the random stream.
  jax.config.update("jax_default_prng_impl", "rbg")
  start = time.perf_counter()
  rows, dim = 10_000_000, 64
  _, _, state, step, batch, catalog = build(rows, dim=dim, hidden=(), optimizer="sgd", data=4,
                                            model=2, shard_tables_over="all")
  init_s = time.perf_counter() - start
  report, _ = step_report(rows, dim, state, step, batch, catalog, steps=2)
  report["init_s"] = init_s
  return report


def _mesh_cfg(**kw):
  return ml_collections.ConfigDict(kw)


if __name__ == "__main__":
  result = {"small": small, "big": big}[sys.argv[1]]()
  print(json.dumps(result))
