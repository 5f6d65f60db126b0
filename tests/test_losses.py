"""The sampled softmax (deduplicated candidates, blockwise log-sum-exp) against a direct
implementation that materialises the batch x candidates logits with every duplicate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config
from two_tower.losses import dedupe_candidates, sampled_softmax_loss
from two_tower.sharding import make_mesh


def reference_loss(q, table, ids, w, xids, log_q_table, remove_hits, reduction):
  """Columns: every in-batch item (duplicates included) then the extra negatives."""
  col_ids = jnp.concatenate([ids, xids])
  logits = q @ table[col_ids].T - log_q_table[col_ids][None, :]
  b = q.shape[0]
  if remove_hits:
    hit = (ids[:, None] == col_ids[None, :]) & (jnp.arange(len(col_ids))[None, :] != jnp.arange(b)[:, None])
    logits = jnp.where(hit, -jnp.inf, logits)
  per = jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(b), jnp.arange(b)]
  total = jnp.sum(w * per)
  return total if reduction == "sum" else total / jnp.sum(w)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(get_base_config().mesh)


def _ours(q, table, ids, w, xids, log_q_table, mesh, **kw):
  unique, positive, counts = dedupe_candidates(ids, xids, num_items=table.shape[0], num_shards=1,
                                               global_negatives=True)
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
