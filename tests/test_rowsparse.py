"""Row-sparse embedding updates (optimizer.embeddings="rowwise_adagrad" or "sparse_adam",
two_tower/rowsparse.py): one step against row-wise Adagrad computed densely, sparse Adam against
dense Adam over steps that miss rows, duplicate ids summed, 8 devices against 1,
restoring onto another mesh, warm-start growth and the config checks (bit-exact resumption is
in tests/test_train.py)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from configs.base import get_base_config
from pipelines.schema import Feature, Schema
from two_tower import config as config_lib
from two_tower import rowsparse, sharding
from two_tower.errors import ConfigError
from two_tower.optim import make_optimizer
from two_tower.state import create_train_state
from two_tower.train import batch_loss, train_step
from two_tower.trees import named_leaves
from two_tower.warm_start import grow

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
USERS, ITEMS, CATEGORIES, BATCH, HISTORY = 30, 40, 6, 16, 4
ITEM_TABLE = "item_tower/embedding/tables/item_id/embedding"  # shared with the history bag
BIAS_TABLE = "bias_tables/item_id/embedding"  # model.item_bias


def small_model(embeddings="rowwise_adagrad", item_bias=False, **loss):
  """A row-sparse config, train state, jitted step, batch and catalog over a hand-made schema
  with every kind of lookup: ids, a category, a history bag sharing the item table, and with
  `item_bias` the item bias, read with the item IDs. `loss`: config.loss overrides."""
  c = get_base_config()
  c.loss.update(**loss)
  c.model.update(query_features=("user_id", "history"), item_features=("item_id", "category"),
                 share_item_embeddings=True, id_embedding_dim=8, feature_embedding_dim=4,
                 hidden_dims=(8,), output_dim=8, item_bias=item_bias)
  c.optimizer.update(embeddings=embeddings, learning_rate=0.01, embedding_learning_rate=0.1)
  c.loss.row_chunk = 8
  schema = Schema(
      features=(Feature("user_id", "user", "id", USERS),
                Feature("history", "user", "history", ITEMS, length=HISTORY),
                Feature("item_id", "item", "id", ITEMS),
                Feature("category", "item", "categorical", CATEGORIES)),
      num_users=USERS - 2, num_items=ITEMS - 2, history_length=HISTORY, split_sizes={"train": 1})
  mesh = sharding.make_mesh(c.mesh)
  tx = make_optimizer(c.optimizer, 10)
  graphdef, state, _ = create_train_state(schema, c, tx, mesh)
  rng = np.random.default_rng(0)
  catalog = {
      "user": {"user_id": np.arange(USERS, dtype=np.int32),
               "history": np.zeros((USERS, HISTORY), np.int32)},
      "item": {"item_id": np.arange(ITEMS, dtype=np.int32),
               "category": rng.integers(1, CATEGORIES, ITEMS).astype(np.int32),
               "sampling_prob": np.full(ITEMS, 1.0 / ITEMS, np.float32)}}
  # Items 1-11 only (rows 12-39 of the item table untouched); users repeat; 0 pads histories.
  batch = dict(user_index=rng.integers(1, 12, BATCH).astype(np.int32),
               item_index=rng.integers(1, 8, BATCH).astype(np.int32),
               history=rng.integers(0, 12, (BATCH, HISTORY)).astype(np.int32),
               weight=np.ones(BATCH, np.float32))
  step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, config=c, mesh=mesh))
  return c, mesh, graphdef, state, step, batch, catalog


def tables_of(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in named_leaves(params).items() if rowsparse.is_table(k)}


def accumulators_of(opt_state) -> dict[str, np.ndarray]:
  return {k.split("/accumulators/")[1]: np.asarray(v) for k, v in named_leaves(opt_state).items()
          if "/accumulators/" in k}


def dense_loss_and_grads(c, mesh, graphdef, state, batch, catalog):
  """The loss's value and its gradient with respect to every parameter, tables whole."""
  loss_fn, inputs, _ = batch_loss(state, batch, catalog, graphdef=graphdef, config=c, mesh=mesh)
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, inputs)
  return float(loss), grads, inputs


def looked_up(inputs, item_bias=False) -> dict[str, np.ndarray]:
  """The distinct rows each table is read by in `inputs`. The item bias's rows are the item
  table's: the sparse step gathers them together."""
  ids = {
      ITEM_TABLE: [inputs["item_tower"]["item_id"], inputs["query_tower"]["history"]],
      "item_tower/embedding/tables/category/embedding": [inputs["item_tower"]["category"]],
      "query_tower/embedding/tables/user_id/embedding": [inputs["query_tower"]["user_id"]]}
  if item_bias:
    ids[BIAS_TABLE] = ids[ITEM_TABLE]
  return {k: np.unique(np.concatenate([np.asarray(x).ravel() for x in v])) for k, v in ids.items()}


def test_one_step_is_rowwise_adagrad_on_the_touched_rows_only():
  c, mesh, graphdef, state, step, batch, catalog = small_model()
  before_tables, before_acc = tables_of(state.params), accumulators_of(state.opt_state)
  _, grads, inputs = dense_loss_and_grads(c, mesh, graphdef, state, batch, catalog)
  dense_grads = tables_of(grads)
  after, _ = step(state, batch, catalog)
  after_tables, after_acc = tables_of(after.params), accumulators_of(after.opt_state)
  touched = looked_up(inputs)
  assert sorted(after_tables) == sorted(touched)  # the shared table appears once
  lr = c.optimizer.embedding_learning_rate
  for name, rows in touched.items():
    g, table, acc = dense_grads[name].astype(np.float64), before_tables[name], before_acc[name]
    untouched = np.setdiff1d(np.arange(table.shape[0]), rows)
    assert len(untouched) and np.abs(g[rows]).max() > 0
    # Reference row-wise Adagrad, densely on the touched rows.
    want_acc = acc[rows] + np.mean(g[rows] ** 2, axis=1)
    want_rows = table[rows] - lr * g[rows] / np.sqrt(want_acc + rowsparse.EPSILON)[:, None]
    np.testing.assert_allclose(after_acc[name][rows], want_acc, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(after_tables[name][rows], want_rows, rtol=1e-5, atol=1e-7)
    # Untouched rows and their accumulators: bit for bit.
    np.testing.assert_array_equal(after_tables[name][untouched], table[untouched])
    np.testing.assert_array_equal(after_acc[name][untouched], acc[untouched])
  # The dense layers keep their optax optimizer (Adam).
  adam = optax.adam(c.optimizer.learning_rate)
  updates, _ = adam.update(grads, adam.init(state.params), state.params)
  want = named_leaves(optax.apply_updates(state.params, updates))
  for name, x in named_leaves(after.params).items():
    if not rowsparse.is_table(name):
      np.testing.assert_allclose(np.asarray(x), np.asarray(want[name]), rtol=1e-5, atol=1e-7)


def test_sparse_adam_follows_dense_adam():
  """Batches A, B, B, A over disjoint users and items: after each step, the rows a step looks up
  are where dense Adam puts them, including A's rows after missing two steps (their momentum
  caught up in closed form); rows a step misses are left alone. With the item bias, which is
  read with the item IDs (and so gathered with the item table's rows)."""
  c, mesh, graphdef, sparse, sparse_step, batch_a, catalog = small_model("sparse_adam", True)
  dense_config, _, _, dense, dense_step, _, _ = small_model("dense", True)
  assert dense_config.optimizer.learning_rate == c.optimizer.learning_rate
  rng = np.random.default_rng(1)
  batch_b = dict(batch_a, user_index=rng.integers(12, 20, BATCH).astype(np.int32),
                 item_index=rng.integers(20, 30, BATCH).astype(np.int32),
                 history=rng.integers(20, 30, (BATCH, HISTORY)).astype(np.int32))
  np.testing.assert_array_equal(np.asarray(sparse.params["item_tower"]["embedding"]["tables"][
      "item_id"]["embedding"]), np.asarray(dense.params["item_tower"]["embedding"]["tables"][
      "item_id"]["embedding"]))
  for batch in (batch_a, batch_b, batch_b, batch_a):
    touched = looked_up(batch_loss(sparse, batch, catalog, graphdef=graphdef, config=c,
                                   mesh=mesh)[1], item_bias=True)
    assert BIAS_TABLE in tables_of(sparse.params)
    before = tables_of(sparse.params)
    sparse, _ = sparse_step(sparse, batch, catalog)
    dense, _ = dense_step(dense, batch, catalog)
    got, want = tables_of(sparse.params), tables_of(dense.params)
    for name, rows in touched.items():
      scale = np.abs(want[name][rows] - before[name][rows]).max()
      assert scale > 0
      np.testing.assert_allclose(got[name][rows], want[name][rows], rtol=0, atol=1e-3 * scale)
      untouched = np.setdiff1d(np.arange(got[name].shape[0]), rows)
      np.testing.assert_array_equal(got[name][untouched], before[name][untouched])
    for name, x in named_leaves(dense.params).items():
      if not rowsparse.is_table(name):
        np.testing.assert_allclose(np.asarray(named_leaves(sparse.params)[name]), np.asarray(x),
                                   rtol=1e-5, atol=1e-7)
  # Settled (what training evaluates and saves), every row is where dense Adam has it, the rows
  # the last step missed included.
  settled, _ = rowsparse.settle(sparse.params, sparse.opt_state)
  got, want = tables_of(settled), tables_of(dense.params)
  for name in want:
    scale = np.abs(want[name] - before[name]).max()
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-3 * scale)
    assert np.abs(want[name] - tables_of(sparse.params)[name]).max() > 0.1 * scale, name
  # A's rows did miss steps: dense Adam moved them meanwhile, by their momentum.
  user_table = "query_tower/embedding/tables/user_id/embedding"
  assert not np.isin(looked_up(batch_loss(sparse, batch_b, catalog, graphdef=graphdef, config=c,
                                          mesh=mesh)[1])[user_table],
                     np.unique(batch_a["user_index"])).any()


def test_duplicate_ids_are_summed_like_the_dense_gradient():
  c, mesh, graphdef, state, _, batch, catalog = small_model()
  loss, grads, inputs = dense_loss_and_grads(c, mesh, graphdef, state, batch, catalog)
  loss_fn, _, _ = batch_loss(state, batch, catalog, graphdef=graphdef, config=c, mesh=mesh)
  where = rowsparse.table_of_feature(nnx.merge(graphdef, state.params))
  assert where[("query_tower", "history")] == where[("item_tower", "item_id")] == ITEM_TABLE
  lookups = rowsparse.gather_rows(state.params, inputs, where)
  sparse = rowsparse.replace_tables(state.params, lookups.gathered)
  (sparse_loss, _), sparse_grads = jax.value_and_grad(loss_fn, has_aux=True)(sparse, lookups.inputs)
  assert float(sparse_loss) == pytest.approx(loss, rel=1e-6)
  dense_grads, sparse_grads = tables_of(grads), tables_of(sparse_grads)
  for name, rows in lookups.rows.items():
    rows = np.asarray(rows)
    num_rows = dense_grads[name].shape[0]
    real = rows < num_rows
    # Distinct ids; the free slots hold an out-of-range id and get no gradient.
    assert len(np.unique(rows[real])) == real.sum()
    np.testing.assert_array_equal(np.sort(rows[real]), looked_up(inputs)[name])
    np.testing.assert_array_equal(sparse_grads[name][~real], 0.0)
    np.testing.assert_allclose(sparse_grads[name][real], dense_grads[name][rows[real]],
                               rtol=1e-5, atol=1e-9)
  # The batch does repeat ids: item rows read by several examples (and histories), users twice.
  ids = np.concatenate([np.asarray(inputs["item_tower"]["item_id"]).ravel(),
                        np.asarray(inputs["query_tower"]["history"]).ravel()])
  assert np.bincount(ids).max() > 2
  assert np.bincount(batch["user_index"]).max() > 1


def run_worker(out_dir: str, devices: int, mesh: dict) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, os.path.join(HERE, "rowsparse_worker.py"), out_dir,
                         json.dumps(mesh)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_devices_match_one_and_restore_onto_another_mesh(tmp_path):
  one, eight = tmp_path / "one", tmp_path / "eight"
  one.mkdir()
  eight.mkdir()
  run_worker(str(one), 1, {"data": 1, "model": 1})
  r = run_worker(str(eight), 8, {"data": 4, "model": 2})
  # Tables and their accumulators row-sharded alike over the model axis; no table whole anywhere.
  assert r["table_spec"] == r["accumulator_spec"] == "P('model',)"
  assert r["accumulator_shard_rows"] == 4096 // 2
  assert r["whole_table_instructions"] == []
  # The checkpoint restores, bit for bit, onto a mesh without a model axis.
  assert r["restored_equal"] and r["restored_accumulator_shard_rows"] == 4096
  for name in ("state.npz", "step4.npz"):
    a, b = np.load(one / name), np.load(eight / name)
    assert sorted(a) == sorted(b) and any("accumulators" in k for k in a)
    for k in a:
      scale = max(float(np.abs(a[k]).max()), 1e-6)
      assert np.abs(a[k] - b[k]).max() <= 1e-4 * scale, k


def test_warm_start_grows_row_accumulators_like_tables():
  fresh = {"acc": {"tables": {"item_id": {"embedding": np.zeros(6, np.float32)}}}}
  parent = {"acc": {"tables": {"item_id": {"embedding": np.arange(1, 5, dtype=np.float32)}}}}
  carried = {"item_id": np.array([True, False, True, True, False, False])}
  out = grow(fresh, parent, carried, {"item_id": "item_id"})
  np.testing.assert_array_equal(out["acc"]["tables"]["item_id"]["embedding"], [1, 0, 3, 4, 0, 0])


def test_config_checks():
  c = get_base_config()
  c.optimizer.embeddings = "lazy"
  with pytest.raises(ConfigError,
                     match="optimizer.embeddings='lazy' is not one of dense, rowwise_adagrad, "
                     "sparse_adam"):
    config_lib.validate(c)
  c = get_base_config()
  c.optimizer.update(embeddings="rowwise_adagrad", grad_clip_norm=1.0, embedding_learning_rate=0.0)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  assert "set optimizer.grad_clip_norm=0" in str(e.value)
  assert "optimizer.embedding_learning_rate=0.0 must be > 0" in str(e.value)
  c = get_base_config()
  c.optimizer.update(embeddings="sparse_adam", grad_clip_norm=1.0)
  with pytest.raises(ConfigError, match="optimizer.embeddings='sparse_adam'.*set optimizer.grad_cl"):
    config_lib.validate(c)
  for embeddings in ("rowwise_adagrad", "sparse_adam"):
    c = get_base_config()
    c.optimizer.embeddings = embeddings
    assert config_lib.validate(c) is c
