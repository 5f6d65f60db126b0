"""The two-tower model: towers, normalisation, shared tables and sharding annotations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.base import get_base_config
from pipelines.schema import Feature, Schema
from two_tower.model import TwoTower, export_tables
from two_tower.sharding import AXIS_RULES

SCHEMA = Schema(
    features=(
        Feature("user_id", "user", "id", vocab_size=12), Feature("age", "user", "categorical", 5),
        Feature("score", "user", "numeric"), Feature("history", "user", "history", 20, length=4),
        Feature("item_id", "item", "id", vocab_size=20), Feature("tags", "item", "multi", 7, length=3),
    ),
    num_users=10, num_items=18, history_length=4, split_sizes={"train": 1})


def _cfg(**kw):
  m = get_base_config().model
  m.update(dict(dict(query_features=("user_id", "age", "score", "history"),
                     item_features=("item_id", "tags"), hidden_dims=(16,), output_dim=8), **kw))
  return m


def _batch():
  query = dict(user_id=jnp.array([2, 3]), age=jnp.array([1, 4]), score=jnp.array([0.5, -1.0]),
               history=jnp.array([[3, 4, 0, 0], [0, 0, 0, 0]]))
  items = dict(item_id=jnp.array([5, 6]), tags=jnp.array([[1, 2, 0], [3, 0, 0]]))
  return query, items


def test_towers_output_normalised_embeddings_scaled_by_temperature():
  model = TwoTower(SCHEMA, _cfg(temperature=0.5), rngs=nnx.Rngs(0))
  query, items = _batch()
  q, c = model.embed_queries(query), model.embed_items(items)
  assert q.shape == c.shape == (2, 8)
  np.testing.assert_allclose(jnp.linalg.norm(q, axis=-1), 2.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(c, axis=-1), 1.0, rtol=1e-5)


def test_shared_item_embeddings_are_one_table():
  separate = TwoTower(SCHEMA, _cfg(), rngs=nnx.Rngs(0))
  shared = TwoTower(SCHEMA, _cfg(share_item_embeddings=True), rngs=nnx.Rngs(0))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(separate) - count(shared) == 20 * 32
  assert shared.query_tower.embedding.tables["history"] is shared.item_tower.embedding.tables["item_id"]


def test_feature_on_the_wrong_tower_is_refused():
  with pytest.raises(ValueError, match=r"'item_id' belongs to the item side"):
    TwoTower(SCHEMA, _cfg(query_features=("user_id", "item_id")), rngs=nnx.Rngs(0))


def test_tables_shard_by_rows_and_kernels_by_output():
  model = nnx.eval_shape(lambda: TwoTower(SCHEMA, _cfg(), rngs=nnx.Rngs(0)))
  with nnx.logical_axis_rules(AXIS_RULES):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert specs["item_tower"]["embedding"]["tables"]["item_id"]["embedding"].get_value() == P("model", None)
  assert specs["query_tower"]["layers"][0]["kernel"].get_value() == P(None, "model")


def test_a_bag_is_the_masked_mean_of_its_tokens():
  model = TwoTower(SCHEMA, _cfg(), rngs=nnx.Rngs(0))
  query, _ = _batch()
  # The same two tokens with and without PAD entries (other lengths, other positions), and a
  # bag of PAD only: the history part of the query features is the mean over real tokens.
  short = dict(query, history=jnp.array([[3, 4], [0, 0]]))
  padded = dict(query, history=jnp.array([[0, 3, 0, 0, 4, 0], [0, 0, 0, 0, 0, 0]]))
  np.testing.assert_allclose(model.embed_queries(short), model.embed_queries(padded), rtol=1e-6)
  table = np.asarray(model.query_tower.embedding.tables["history"].embedding.get_value())
  want = np.stack([(table[3] + table[4]) / 2, np.zeros(table.shape[1])])
  history = model.query_tower.embedding(padded)[:, -table.shape[1]:]  # history is the last feature
  np.testing.assert_allclose(history, want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- mixed precision


def _eqns(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (jit, custom_vjp, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _eqns(sub.jaxpr)


def test_bfloat16_computes_in_bfloat16_from_float32_parameters():
  model = TwoTower(SCHEMA, _cfg(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  query, items = _batch()
  for side, features in (("embed_queries", query), ("embed_items", items)):
    fn = lambda p: getattr(nnx.merge(graphdef, p), side)(features)
    jaxpr = jax.make_jaxpr(fn)(params).jaxpr
    dots = [e for e in _eqns(jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 2  # the hidden layer and the output projection
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in (*e.invars, *e.outvars))
    # Lookups gather float32 rows and cast only those: no table is cast whole.
    tables = {x.shape for tower in ("query_tower", "item_tower")
              for x in jax.tree.leaves(params[tower]["embedding"]["tables"])}
    casts = [e for e in _eqns(jaxpr) if e.primitive.name == "convert_element_type"]
    assert not [e for e in casts if e.invars[0].aval.shape in tables]
    # The output, normalised in float32.
    out = fn(params)
    assert out.dtype == jnp.float32
    norm = 1.0 if side == "embed_items" else 1 / model.temperature
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), norm, rtol=1e-5)


def test_bfloat16_loss_and_gradients_are_close_to_float32():
  from two_tower.losses import dedupe_candidates, sampled_softmax_loss
  from two_tower.sharding import make_mesh
  mesh = make_mesh(get_base_config().mesh)
  rng = np.random.default_rng(0)
  b = 64
  query = dict(user_id=jnp.asarray(rng.integers(1, 12, b)), age=jnp.asarray(rng.integers(1, 5, b)),
               score=jnp.asarray(rng.normal(size=b), jnp.float32),
               history=jnp.asarray(rng.integers(0, 20, (b, 4))))
  item_ids = jnp.asarray(rng.integers(1, 18, b))
  tags = jnp.asarray(rng.integers(0, 7, (20, 3)))
  unique, positive, counts = dedupe_candidates(item_ids, None, num_items=20, num_shards=1,
                                               global_negatives=True)
  weights = jnp.ones(b, jnp.float32)

  def loss_and_grads(compute_dtype):
    # The same seed gives the same float32 parameters whatever the compute dtype.
    graphdef, params = nnx.split(
        TwoTower(SCHEMA, _cfg(compute_dtype=compute_dtype), rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params):
      model = nnx.merge(graphdef, params)
      q = model.embed_queries(query)
      c = model.embed_items(dict(item_id=unique, tags=tags[unique]))
      return sampled_softmax_loss(q, c, positive, counts, weights, mesh=mesh)[0]
    return jax.jit(jax.value_and_grad(loss))(params)

  loss32, grads32 = loss_and_grads("float32")
  loss16, grads16 = loss_and_grads("bfloat16")
  assert loss16.dtype == jnp.float32
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%), compounded over a few
  # layers: 1% for the loss, 5% for each gradient as a whole.
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  flat32, flat16 = jax.tree.leaves(grads32), jax.tree.leaves(grads16)
  assert len(flat32) == len(flat16) > 0
  for g32, g16 in zip(flat32, flat16):
    assert g16.dtype == jnp.float32
    error = float(jnp.linalg.norm(g16 - g32) / jnp.maximum(jnp.linalg.norm(g32), 1e-12))
    assert error < 5e-2, (g32.shape, error)


def test_sum_combiner_adds_the_user_vector_and_the_history_mean():
  cfg = _cfg(query_features=("user_id", "history"), item_features=("item_id",), hidden_dims=(),
             output_dim=0, l2_normalize=False, temperature=1.0, share_item_embeddings=True,
             combine_features="sum")
  model = TwoTower(SCHEMA, cfg, rngs=nnx.Rngs(0))
  query, _ = _batch()
  users = np.asarray(model.query_tower.embedding.tables["user_id"].embedding.get_value())
  items = np.asarray(model.item_tower.embedding.tables["item_id"].embedding.get_value())
  want = users[[2, 3]] + np.stack([(items[3] + items[4]) / 2, np.zeros(items.shape[1])])
  np.testing.assert_allclose(model.embed_queries(query), want, rtol=1e-6, atol=1e-7)
  assert model.query_tower.output_dim == model.item_tower.output_dim == cfg.id_embedding_dim


def test_sum_combiner_refuses_features_of_different_sizes():
  with pytest.raises(ValueError, match=r"combine_features='sum'.*'age': 16"):
    TwoTower(SCHEMA, _cfg(combine_features="sum", query_features=("user_id", "age"),
                         item_features=("item_id",)),
             rngs=nnx.Rngs(0))


def test_item_bias_adds_a_learned_scalar_per_item_to_the_dot_product():
  plain = TwoTower(SCHEMA, _cfg(temperature=0.5), rngs=nnx.Rngs(0))
  biased = TwoTower(SCHEMA, _cfg(temperature=0.5, item_bias=True), rngs=nnx.Rngs(0))
  assert biased.embedding_dim == plain.embedding_dim + 1 == 9
  bias = jnp.arange(20.0)[:, None] / 10
  biased.bias_tables["item_id"].embedding[...] = bias
  query, items = _batch()
  scores = biased.embed_queries(query) @ biased.embed_items(items).T
  want = plain.embed_queries(query) @ plain.embed_items(items).T + bias[items["item_id"], 0]
  np.testing.assert_allclose(scores, want, rtol=1e-5)
  # Rows shard like the item-ID table's (so a nightly warm start grows it with the item IDs).
  abstract = nnx.eval_shape(lambda: TwoTower(SCHEMA, _cfg(item_bias=True), rngs=nnx.Rngs(0)))
  with nnx.logical_axis_rules(AXIS_RULES):
    specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
  assert specs["bias_tables"]["item_id"]["embedding"].get_value() == P("model", None)
  exported = dict(export_tables(nnx.state(biased, nnx.Param), SCHEMA))
  np.testing.assert_array_equal(exported["item/item_id_bias"], bias)
  assert "item/item_id_bias" not in dict(export_tables(nnx.state(plain, nnx.Param), SCHEMA))
  with pytest.raises(ValueError, match="item_bias.*needs 'item_id'"):
    TwoTower(SCHEMA, _cfg(item_bias=True, item_features=("tags",)), rngs=nnx.Rngs(0))
