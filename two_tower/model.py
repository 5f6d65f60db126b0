"""The two-tower model (Flax NNX): a query tower and an item tower over feature embeddings.

Parameters carry logical sharding names; `two_tower.sharding` maps them onto the mesh:
embedding tables are ("vocab", "embed") so their rows shard, dense kernels are ("embed", "hidden")
so their output axis shards over the model axis.
"""

from __future__ import annotations

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


def _embed(vocab_size: int, dim: int, scale: float, rngs: nnx.Rngs) -> nnx.Embed:
  init = nnx.initializers.uniform(2 * scale)
  return nnx.Embed(
      vocab_size, dim, rngs=rngs,
      embedding_init=_annotate(lambda k, s, d: init(k, s, d) - scale, ("vocab", "embed")),
  )


class FeatureEmbedding(nnx.Module):
  """Embeds one tower's features and concatenates them: IDs and categories by lookup, token bags
  (multi-valued features and the item history) by masked mean pooling, numbers as they are."""

  def __init__(self, features: Sequence[Feature], *, id_dim: int, feature_dim: int,
               init_scale: float, rngs: nnx.Rngs, shared: Mapping[str, nnx.Embed] | None = None):
    self.features = tuple(features)
    shared = shared or {}
    self.tables = nnx.Dict({
        f.name: shared.get(f.name) or _embed(
            f.vocab_size, id_dim if f.kind in ("id", "history") else feature_dim, init_scale, rngs)
        for f in self.features if f.kind != "numeric"
    })
    self.output_dim = sum(
        1 if f.kind == "numeric" else self.tables[f.name].features for f in self.features)

  def __call__(self, features: Features) -> jax.Array:
    parts = []
    for f in self.features:
      x = features[f.name]
      if f.kind == "numeric":
        parts.append(x.astype(jnp.float32)[:, None])
      elif f.kind in ("multi", "history"):
        mask = (x != PAD).astype(jnp.float32)[..., None]
        pooled = (self.tables[f.name](x) * mask).sum(axis=1)
        parts.append(pooled / jnp.maximum(mask.sum(axis=1), 1.0))
      else:
        parts.append(self.tables[f.name](x))
    return jnp.concatenate(parts, axis=-1)


class Tower(nnx.Module):
  """Feature embeddings -> MLP (ReLU) -> optional projection -> optional L2 normalisation."""

  def __init__(self, features: Sequence[Feature], cfg: ml_collections.ConfigDict, rngs: nnx.Rngs,
               shared: Mapping[str, nnx.Embed] | None = None):
    self.embedding = FeatureEmbedding(
        features, id_dim=cfg.id_embedding_dim, feature_dim=cfg.feature_embedding_dim,
        init_scale=cfg.embedding_init_scale, rngs=rngs, shared=shared)
    dims = [self.embedding.output_dim, *cfg.hidden_dims]
    if cfg.output_dim > 0:
      dims.append(cfg.output_dim)
    kernel_init = _annotate(nnx.initializers.lecun_normal(), ("embed", "hidden"))
    bias_init = _annotate(nnx.initializers.zeros_init(), ("hidden",))
    self.layers = nnx.List([
        nnx.Linear(d_in, d_out, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
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
  """score(query, item) = <query_tower(query), item_tower(item)> / temperature."""

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

  def embed_queries(self, features: Features) -> jax.Array:
    return self.query_tower(features) / self.temperature

  def embed_items(self, features: Features) -> jax.Array:
    return self.item_tower(features)


def export_tables(params: nnx.State, schema: Schema) -> Iterator[tuple[str, np.ndarray]]:
  """Unsharded host copies of a TwoTower's embedding tables, one at a time (so host memory holds
  one table): ("user/<feature>" | "item/<feature>", [vocabulary rows, dim]). The rows added by
  config.mesh.table_row_multiple are dropped, so row i is vocabulary index i whatever the mesh or
  padding the model trained with. A shared table appears on both sides."""
  rows = {f.name: f.vocab_size for f in schema.features}
  for tower, side in (("query_tower", "user"), ("item_tower", "item")):
    tables = params[tower]["embedding"]["tables"]
    for name in sorted(tables.keys()):
      yield f"{side}/{name}", sharding.to_host(tables[name]["embedding"][...])[:rows[name]]
