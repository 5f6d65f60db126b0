"""The blockwise sampled softmax against a direct implementation of the same maths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from two_tower.losses import sampled_softmax_loss
from two_tower.sharding import make_mesh
from configs.base import get_base_config


def reference_loss(q, c, ids, w, log_q, xc, xids, xlq, remove_hits, reduction):
  """Materialises the full logits matrix."""
  cols = jnp.concatenate([c, xc])
  col_ids = jnp.concatenate([ids, xids])
  logits = q @ cols.T - jnp.concatenate([log_q, xlq])[None, :]
  b = q.shape[0]
  if remove_hits:
    hit = (ids[:, None] == col_ids[None, :]) & ~(jnp.arange(cols.shape[0])[None, :] == jnp.arange(b)[:, None])
    logits = jnp.where(hit, -1e30, logits)
  per = jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(b), jnp.arange(b)]
  total = jnp.sum(w * per)
  return total if reduction == "sum" else total / jnp.sum(w)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(get_base_config().mesh)


@pytest.mark.parametrize("remove_hits,reduction,row_chunk",
                         [(True, "mean", 7), (False, "sum", 64), (True, "sum", 64)])
def test_matches_reference_value_and_gradients(mesh, remove_hits, reduction, row_chunk):
  rng = np.random.default_rng(0)
  b, m, d = 56, 9, 8
  q = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 20, b))  # many accidental hits
  w = jnp.asarray(rng.random(b), jnp.float32).at[:5].set(0.0)
  log_q = jnp.asarray(rng.normal(size=b), jnp.float32)
  xc = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
  xids = jnp.asarray(rng.integers(0, 20, m))
  xlq = jnp.asarray(rng.normal(size=m), jnp.float32)

  def ours(q, c, xc):
    return sampled_softmax_loss(q, c, ids, w, mesh=mesh, log_q=log_q, extra_items=xc, extra_ids=xids,
                                extra_log_q=xlq, remove_accidental_hits=remove_hits,
                                reduction=reduction, row_chunk=row_chunk)[0]

  def ref(q, c, xc):
    return reference_loss(q, c, ids, w, log_q, xc, xids, xlq, remove_hits, reduction)

  v1, g1 = jax.value_and_grad(ours, argnums=(0, 1, 2))(q, c, xc)
  v2, g2 = jax.value_and_grad(ref, argnums=(0, 1, 2))(q, c, xc)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b_ in zip(g1, g2):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6)


def test_accidental_hit_removal_changes_the_loss(mesh):
  q = jnp.eye(4, dtype=jnp.float32)
  c = jnp.eye(4, dtype=jnp.float32)
  ids = jnp.array([0, 0, 1, 2])  # rows 0 and 1 share their positive item
  w = jnp.ones(4)
  kept = sampled_softmax_loss(q, c, ids, w, mesh=mesh, remove_accidental_hits=False)[0]
  removed = sampled_softmax_loss(q, c, ids, w, mesh=mesh, remove_accidental_hits=True)[0]
  assert removed < kept


def test_zero_weight_rows_do_not_count(mesh):
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  ids = jnp.arange(8)
  w = jnp.array([1, 1, 1, 1, 0, 0, 0, 0], jnp.float32)
  loss = sampled_softmax_loss(q, c, ids, w, mesh=mesh, reduction="sum")[0]
  grads = jax.grad(lambda q: sampled_softmax_loss(q, c, ids, w, mesh=mesh, reduction="sum")[0])(q)
  assert np.all(np.asarray(grads[4:]) == 0)
  q2 = q.at[4:].set(100.0)
  np.testing.assert_allclose(sampled_softmax_loss(q2, c, ids, w, mesh=mesh, reduction="sum")[0], loss,
                             rtol=1e-6)
