"""The sampled softmax (deduplicated candidates, blockwise log-sum-exp) against a direct
implementation that materialises the batch x candidates logits with every duplicate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config
from two_tower.losses import dedupe_candidates, expected_counts, sampled_softmax_loss
from two_tower.sharding import make_mesh


def reference_loss(q, table, ids, w, xids, log_q_table, remove_hits, reduction, num_shards=1,
                   global_negatives=True):
  """Columns: every in-batch item (duplicates included) then the extra negatives.

  A query's negatives are the real (weight > 0) rows of its shard (of the whole batch with global
  negatives) and the extras; padding rows (weight 0) are neither queries nor negatives.
  `log_q_table` is [num_items], or [num_shards, num_items] for a per-shard correction.
  """
  b = q.shape[0]
  col_ids = jnp.concatenate([ids, xids])
  cols = np.arange(len(col_ids))
  shard = np.arange(b) // (b // num_shards)
  real = np.asarray(w) > 0
  col_real = np.r_[real, np.ones(len(xids), bool)]
  col_shard = np.r_[shard, np.full(len(xids), -1)]
  rows = np.flatnonzero(real)
  log_q = jnp.broadcast_to(log_q_table, (num_shards, table.shape[0]))[shard[rows]][:, col_ids]
  logits = q[rows] @ table[col_ids].T - log_q
  own = cols[None, :] == rows[:, None]
  visible = global_negatives | (col_shard[None, :] == shard[rows][:, None]) | (col_shard[None, :] < 0)
  negative = col_real[None, :] & visible & ~own
  if remove_hits:
    negative &= ~(np.asarray(ids)[rows][:, None] == np.asarray(col_ids)[None, :])
  logits = jnp.where(own | negative, logits, -jnp.inf)
  per = jax.nn.logsumexp(logits, axis=-1) - logits[np.arange(len(rows)), rows]
  total = jnp.sum(w[rows] * per)
  return total if reduction == "sum" else total / jnp.sum(w)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(get_base_config().mesh)


def _ours(q, table, ids, w, xids, log_q_table, mesh, **kw):
  unique, positive, counts = dedupe_candidates(ids, xids, num_items=table.shape[0], num_shards=1,
                                               global_negatives=True, valid=w > 0)
  return sampled_softmax_loss(q, table[unique], positive, counts, w, mesh=mesh,
                              log_q=log_q_table[unique], **kw)[0]


@pytest.mark.parametrize("remove_hits,reduction,row_chunk,num_items",
                         [(True, "mean", 7, 20), (False, "sum", 64, 20), (True, "sum", 64, 500)])
def test_matches_reference_value_and_gradients(mesh, remove_hits, reduction, row_chunk, num_items):
  rng = np.random.default_rng(0)
  b, m, d = 56, 9, 8
  q = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(num_items, d)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, num_items, b))  # with 20 items: many duplicates
  w = jnp.asarray(rng.random(b), jnp.float32).at[:5].set(0.0)
  xids = jnp.asarray(rng.integers(0, num_items, m))
  log_q_table = jnp.asarray(rng.normal(size=num_items), jnp.float32)

  def ours(q, table):
    return _ours(q, table, ids, w, xids, log_q_table, mesh, remove_accidental_hits=remove_hits,
                 reduction=reduction, row_chunk=row_chunk)

  def ref(q, table):
    return reference_loss(q, table, ids, w, xids, log_q_table, remove_hits, reduction)

  v1, g1 = jax.value_and_grad(ours, argnums=(0, 1))(q, table)
  v2, g2 = jax.value_and_grad(ref, argnums=(0, 1))(q, table)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b_ in zip(g1, g2):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_local_negatives_only_see_their_shard():
  ids = jnp.array([0, 1, 2, 2, 3, 3, 3, 4])
  unique, positive, counts = dedupe_candidates(ids, None, num_items=10, num_shards=2,
                                               global_negatives=False)
  by_item = {int(u): counts[:, k].tolist() for k, u in enumerate(unique) if counts[:, k].sum() > 0}
  assert by_item == {0: [1, 0], 1: [1, 0], 2: [2, 0], 3: [0, 3], 4: [0, 1]}
  np.testing.assert_array_equal(unique[positive], ids)


def test_accidental_hit_removal_changes_the_loss(mesh):
  q = jnp.eye(4, dtype=jnp.float32)
  table = jnp.eye(4, dtype=jnp.float32)
  ids = jnp.array([0, 0, 1, 2])  # rows 0 and 1 share their positive item
  w = jnp.ones(4)
  zeros = jnp.zeros(4)
  kept = _ours(q, table, ids, w, None, zeros, mesh, remove_accidental_hits=False)
  removed = _ours(q, table, ids, w, None, zeros, mesh, remove_accidental_hits=True)
  assert removed < kept


def test_zero_weight_rows_do_not_count(mesh):
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  ids = jnp.arange(8)
  w = jnp.array([1, 1, 1, 1, 0, 0, 0, 0], jnp.float32)
  zeros = jnp.zeros(8)
  loss = lambda q: _ours(q, table, ids, w, None, zeros, mesh, reduction="sum")
  assert np.all(np.asarray(jax.grad(loss)(q)[4:]) == 0)
  np.testing.assert_allclose(loss(q.at[4:].set(100.0)), loss(q), rtol=1e-6)


# ----------------------------------------------------------------------------- padding, logQ


def _loss_and_grads(q, table, ids, w, xids, log_q, mesh, *, num_shards=1, global_negatives=True,
                    **kw):
  """Value and (q, table) gradients of ours, with log_q given per item ([N] or [S, N])."""
  def loss(q, table):
    unique, positive, counts = dedupe_candidates(
        ids, xids, num_items=table.shape[0], num_shards=num_shards,
        global_negatives=global_negatives, valid=w > 0)
    return sampled_softmax_loss(q, table[unique], positive, counts, w, mesh=mesh,
                                log_q=jnp.broadcast_to(log_q, counts.shape[:1] + log_q.shape[-1:])
                                [:, unique], **kw)[0]
  return jax.value_and_grad(loss, argnums=(0, 1))(q, table)


def _assert_close(got, want):
  (v1, g1), (v2, g2) = got, want
  assert np.isfinite(v1) and all(np.isfinite(g).all() for g in g1)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b_ in zip(g1, g2):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_item_never_in_training_without_uniform_negatives_gives_a_finite_loss(mesh):
  # Item 0 has sampling probability 0 and is not in the batch; it still fills the unused
  # candidate slots (count 0), whose log_q is log(0) = -inf: it must weigh 0, not NaN.
  rng = np.random.default_rng(2)
  b, n, d = 16, 30, 8
  q = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 6, b))  # 5 distinct items, 16 candidate slots
  w = jnp.ones(b)
  prob = jnp.asarray(np.r_[0.0, rng.random(n - 1)], jnp.float32)
  prob /= prob.sum()
  log_q = jnp.log(b * prob)  # -inf for item 0
  xids = jnp.zeros(0, jnp.int32)
  for remove_hits in (True, False):
    got = _loss_and_grads(q, table, ids, w, None, log_q, mesh, remove_accidental_hits=remove_hits)
    want = jax.value_and_grad(
        lambda q, t: reference_loss(q, t, ids, w, xids, log_q, remove_hits, "mean"),
        argnums=(0, 1))(q, table)
    _assert_close(got, want)


def test_padding_rows_change_neither_loss_nor_gradients(mesh):
  # The loader pads a short last batch with copies of example 0 at weight 0: the loss, its
  # gradients and the logQ expected counts must be those of the batch without them.
  rng = np.random.default_rng(3)
  real, pad, n, d = 40, 16, 25, 8
  q = jnp.asarray(rng.normal(size=(real, d)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, n, real))
  w = jnp.asarray(rng.random(real) + 0.5, jnp.float32)
  prob = jnp.asarray(rng.random(n), jnp.float32)
  prob /= prob.sum()
  xids = jnp.asarray(rng.integers(0, n, 5))

  def log_q(valid):
    return jnp.log(expected_counts(prob, valid, num_shards=1, global_negatives=True,
                                   num_uniform_negatives=5, num_items=n))

  padded_q = jnp.concatenate([q, jnp.repeat(q[:1], pad, 0)])
  padded_ids = jnp.concatenate([ids, jnp.repeat(ids[:1], pad)])
  padded_w = jnp.concatenate([w, jnp.zeros(pad)])
  for remove_hits in (True, False):
    kw = dict(remove_accidental_hits=remove_hits, row_chunk=8)
    value, (g_q, g_table) = _loss_and_grads(padded_q, table, padded_ids, padded_w, xids,
                                            log_q(padded_w > 0), mesh, **kw)
    want = jax.value_and_grad(
        lambda q, t: reference_loss(q, t, ids, w, xids, log_q(w > 0), remove_hits, "mean"),
        argnums=(0, 1))(q, table)
    _assert_close((value, (g_q[:real], g_table)), want)
    assert not np.asarray(g_q[real:]).any()


def test_expected_counts():
  # 2 shards of 4 rows; row 3 and rows 5-7 are padding. Two candidates, probabilities 0.5 and 0.
  valid = jnp.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
  prob = jnp.array([0.5, 0.0])
  local = expected_counts(prob, valid, num_shards=2, global_negatives=False,
                          num_uniform_negatives=0, num_items=10)
  np.testing.assert_allclose(local, [[1.5, 0.0], [0.5, 0.0]])  # 3 and 1 real rows
  both = expected_counts(prob, valid, num_shards=2, global_negatives=True,
                         num_uniform_negatives=6, num_items=10)
  np.testing.assert_allclose(both, [[2.6, 0.6], [2.6, 0.6]])  # 4 real rows; 6 / 10 uniform
  full = expected_counts(prob, jnp.ones(8, bool), num_shards=1, global_negatives=True,
                         num_uniform_negatives=0, num_items=10)
  np.testing.assert_allclose(full, [[4.0, 0.0]])


def check_local_negatives_on_8_devices():
  """Per-shard (local) negatives on an 8-way data mesh against the full-matrix reference, with
  padding rows (shard 7 holds nothing else) and a per-shard logQ correction. Run by the test below
  in a subprocess with 8 CPU devices."""
  mesh = make_mesh(get_base_config().mesh)
  assert mesh.shape["data"] == 8, mesh.shape
  rng = np.random.default_rng(4)
  b, n, d = 56, 20, 8
  q = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, n, b))
  w = jnp.asarray(rng.random(b) + 0.5, jnp.float32).at[47:].set(0.0)
  prob = jnp.asarray(np.r_[0.0, rng.random(n - 1)], jnp.float32)
  prob /= prob.sum()
  for m, remove_hits, reduction in ((0, True, "mean"), (3, False, "sum")):
    xids = jnp.asarray(rng.integers(0, n, m))
    valid = w > 0
    log_q = jnp.log(expected_counts(prob, valid, num_shards=8, global_negatives=False,
                                    num_uniform_negatives=m, num_items=n))  # [8, n]
    kw = dict(remove_accidental_hits=remove_hits, reduction=reduction)
    value, (g_q, g_table) = _loss_and_grads(q, table, ids, w, xids, log_q, mesh, num_shards=8,
                                            global_negatives=False, row_chunk=4, **kw)
    rows = np.flatnonzero(np.asarray(valid))
    want = jax.value_and_grad(
        lambda q, t: reference_loss(q, t, ids, w, xids, log_q, remove_hits, reduction,
                                    num_shards=8, global_negatives=False), argnums=(0, 1))(q, table)
    _assert_close((value, (g_q, g_table)), want)
    assert not np.asarray(g_q[47:]).any() and np.asarray(g_q[rows]).all()
  # The comparison has teeth: with global negatives the reference differs.
  assert abs(float(want[0]) - float(reference_loss(q, table, ids, w, xids, log_q, remove_hits,
                                                   reduction, num_shards=8))) > 1e-3


def test_local_negatives_match_the_reference_on_8_devices():
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  code = ("import sys; sys.path.insert(0, 'tests'); import test_losses; "
          "test_losses.check_local_negatives_on_8_devices()")
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
