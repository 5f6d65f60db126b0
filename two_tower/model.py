"""The two-tower model (Flax NNX): a query tower and an item tower over feature embeddings.

Parameters carry logical sharding names; `two_tower.sharding` maps them onto the mesh:
embedding tables are ("vocab", "embed") so their rows shard, dense kernels are ("embed", "hidden")
so their output axis shards over the model axis.

Mixed precision (`model.compute_dtype="bfloat16"`): parameters (and so the optimizer state) stay
float32; embedding lookups, the towers' matmuls and activations run in bfloat16; each tower's
output is cast back to float32 before its L2 normalisation, so everything downstream (the loss's
logits and log-sum-exp, evaluation, the item index) sees float32 embeddings.
"""

from __future__ import annotations

import functools
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pipelines.schema import PAD, Feature, Schema
from two_tower import sharding
from two_tower.errors import ConfigError

Features = Mapping[str, jax.Array]


def _annotate(init, logical_axes):
  # Logical axis names only: placement happens when the train state is created under jit with
  # explicit shardings (two_tower.state), so building a model never needs a mesh.
  return nnx.with_partitioning(init, logical_axes, eager_sharding=False)


class Embed(nnx.Embed):
  """nnx.Embed that gathers rows first and casts them to `dtype` after.

  nnx.Embed casts the whole table to `dtype` and then gathers: with a bfloat16 `dtype` that reads
  and writes every row of the table on every step, and its gradient is scatter-added into a
  bfloat16 table, rounding the sum over a popular row's many occurrences in a batch. Gathering the
  float32 rows and casting only those keeps the lookup's cost and its gradient's (summed in float32,
  the parameter's dtype) proportional to the batch.
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], inputs, axis=0).astype(self.dtype or self.param_dtype)


def _embed(vocab_size: int, dim: int, scale: float, dtype: jnp.dtype, rngs: nnx.Rngs) -> Embed:
  init = nnx.initializers.uniform(2 * scale)
  return Embed(
      vocab_size, dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
      embedding_init=_annotate(lambda k, s, d: init(k, s, d) - scale, ("vocab", "embed")),
  )


class FeatureEmbedding(nnx.Module):
  """Embeds one tower's features and concatenates (or sums) them: IDs and categories by lookup,
  token bags (multi-valued features and the item history) by masked mean pooling, numbers as they
  are."""

  def __init__(self, features: Sequence[Feature], *, id_dim: int, feature_dim: int,
               init_scale: float, dtype: jnp.dtype, rngs: nnx.Rngs, combine: str = "concat",
               shared: Mapping[str, nnx.Embed] | None = None):
    self.features = tuple(features)
    self.dtype = dtype
    self.combine = combine
    shared = shared or {}
    self.tables = nnx.Dict({
        f.name: shared.get(f.name) or _embed(
            f.vocab_size, id_dim if f.kind in ("id", "history") else feature_dim, init_scale,
            dtype, rngs)
        for f in self.features if f.kind != "numeric"
    })
    dims = [1 if f.kind == "numeric" else self.tables[f.name].features for f in self.features]
    if combine == "sum" and len(set(dims)) > 1:
      raise ConfigError(
          "model.combine_features='sum' adds the features' embeddings, so they must have one size: "
          f"{dict(zip((f.name for f in self.features), dims))}; use only ID and history features "
          "(model.id_embedding_dim), set model.feature_embedding_dim to model.id_embedding_dim, or "
          "combine by 'concat'")
    self.output_dim = dims[0] if combine == "sum" else sum(dims)

  def __call__(self, features: Features) -> jax.Array:
    parts = []
    for f in self.features:
      x = features[f.name]
      if f.kind == "numeric":
        parts.append(x.astype(self.dtype)[:, None])
      elif f.kind in ("multi", "history"):
        mask = (x != PAD).astype(self.dtype)[..., None]
        # The sum over the bag accumulates in float32 (a bfloat16 running sum of 20 tokens keeps
        # about 5 significant bits); the fused reduction costs no extra memory traffic.
        pooled = (self.tables[f.name](x) * mask).sum(axis=1, dtype=jnp.float32)
        parts.append((pooled / jnp.maximum(mask.sum(axis=1, dtype=jnp.float32), 1.0))
                     .astype(self.dtype))
      else:
        parts.append(self.tables[f.name](x))
    if self.combine == "sum":
      return functools.reduce(jnp.add, parts)
    return jnp.concatenate(parts, axis=-1)


class Tower(nnx.Module):
  """Feature embeddings -> MLP (ReLU) -> optional projection -> optional L2 normalisation."""

  def __init__(self, features: Sequence[Feature], cfg: ml_collections.ConfigDict, rngs: nnx.Rngs,
               shared: Mapping[str, nnx.Embed] | None = None):
    dtype = jnp.dtype(cfg.compute_dtype)
    self.embedding = FeatureEmbedding(
        features, id_dim=cfg.id_embedding_dim, feature_dim=cfg.feature_embedding_dim,
        init_scale=cfg.embedding_init_scale, dtype=dtype, rngs=rngs,
        combine=cfg.combine_features, shared=shared)
    dims = [self.embedding.output_dim, *cfg.hidden_dims]
    if cfg.output_dim > 0:
      dims.append(cfg.output_dim)
    kernel_init = _annotate(nnx.initializers.lecun_normal(), ("embed", "hidden"))
    bias_init = _annotate(nnx.initializers.zeros_init(), ("hidden",))
    self.layers = nnx.List([
        # dtype: inputs and the float32 kernel are cast to it for the matmul (whose gradient
        # flows back into the float32 kernel through that cast).
        nnx.Linear(d_in, d_out, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                   param_dtype=jnp.float32, rngs=rngs)
        for d_in, d_out in zip(dims[:-1], dims[1:])
    ])
    self.l2_normalize = cfg.l2_normalize
    self.output_dim = dims[-1]

  def __call__(self, features: Features) -> jax.Array:
    x = self.embedding(features)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = nnx.relu(x)
    # The output in float32 whatever the compute dtype: the normalisation (a sum of squares), the
    # logits the loss takes from it and the embeddings evaluation and the index store.
    x = x.astype(jnp.float32)
    if self.l2_normalize:
      x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))
    return x


def tower_features(schema: Schema, names: Sequence[str], side: str) -> tuple[Feature, ...]:
  features = []
  for name in names:
    f = schema.feature(name)
    if f.side != side:
      raise ConfigError(
          f"feature {name!r} belongs to the {f.side} side and cannot feed the {side} tower: move it "
          f"to model.{'query' if f.side == 'user' else 'item'}_features")
    features.append(f)
  return tuple(features)


class TwoTower(nnx.Module):
  """score(query, item) = <query_tower(query), item_tower(item)> / temperature [+ bias(item)].

  With model.item_bias the embeddings carry the bias as one more dimension (the query's is 1), so
  evaluation, the index and candidate scoring take the score as a plain dot product."""

  def __init__(self, schema: Schema, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.item_tower = Tower(tower_features(schema, cfg.item_features, "item"), cfg, rngs)
    shared = {}
    if cfg.share_item_embeddings:
      # The history bag pools the item tower's own item-ID embeddings: one table, trained by both
      # sides (fewer parameters, and history items live in the space items are scored in).
      if "history" not in cfg.query_features or "item_id" not in cfg.item_features:
        raise ConfigError("model.share_item_embeddings needs 'history' in model.query_features and "
                         "'item_id' in model.item_features")
      shared["history"] = self.item_tower.embedding.tables["item_id"]
    self.query_tower = Tower(tower_features(schema, cfg.query_features, "user"), cfg, rngs, shared)
    if self.query_tower.output_dim != self.item_tower.output_dim:
      raise ConfigError(
          f"the towers' outputs differ in size ({self.query_tower.output_dim} vs "
          f"{self.item_tower.output_dim}): set model.output_dim > 0, or give both towers the same "
          "embedding sizes")
    self.temperature = cfg.temperature
    self.use_item_bias = bool(cfg.item_bias)
    if self.use_item_bias:
      if "item_id" not in cfg.item_features:
        raise ConfigError("model.item_bias is a learned scalar per item-ID row: it needs 'item_id' "
                          "in model.item_features")
      # Named like the towers' tables (".../tables/<feature>/embedding"), so that sharding and the
      # nightly warm start treat it as one: rows over the model axis, grown with the item IDs.
      self.bias_tables = nnx.Dict({"item_id": Embed(
          schema.feature("item_id").vocab_size, 1, param_dtype=jnp.float32, rngs=rngs,
          embedding_init=_annotate(nnx.initializers.zeros_init(), ("vocab", "embed")))})

  @property
  def embedding_dim(self) -> int:
    """The size of the query and item embeddings, whose dot product is the score."""
    return self.item_tower.output_dim + self.use_item_bias

  def embed_queries(self, features: Features) -> jax.Array:
    q = self.query_tower(features) / self.temperature
    if self.use_item_bias:
      q = jnp.concatenate([q, jnp.ones_like(q[:, :1])], axis=-1)
    return q

  def embed_items(self, features: Features) -> jax.Array:
    x = self.item_tower(features)
    if self.use_item_bias:
      x = jnp.concatenate([x, self.bias_tables["item_id"](features["item_id"])], axis=-1)
    return x


def export_tables(params: nnx.State, schema: Schema) -> Iterator[tuple[str, np.ndarray]]:
  """Unsharded host copies of a TwoTower's embedding tables, one at a time (so host memory holds
  one table): ("user/<feature>" | "item/<feature>", [vocabulary rows, dim]). The rows added by
  config.mesh.table_row_multiple are dropped, so row i is vocabulary index i whatever the mesh or
  padding the model trained with. A shared table appears on both sides; the item bias
  (model.item_bias) is "item/item_id_bias", [item-ID rows, 1]."""
  rows = {f.name: f.vocab_size for f in schema.features}
  for tower, side in (("query_tower", "user"), ("item_tower", "item")):
    tables = params[tower]["embedding"]["tables"]
    for name in sorted(tables.keys()):
      yield f"{side}/{name}", sharding.to_host(tables[name]["embedding"][...])[:rows[name]]
  if "bias_tables" in params:
    table = params["bias_tables"]["item_id"]["embedding"][...]
    yield "item/item_id_bias", sharding.to_host(table)[:rows["item_id"]]
