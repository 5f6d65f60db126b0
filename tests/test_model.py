"""The two-tower model: towers, normalisation, shared tables and sharding annotations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.base import get_base_config
from pipelines.schema import Feature, Schema
from two_tower.model import TwoTower
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
