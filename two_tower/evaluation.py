"""Exact retrieval evaluation over the whole catalog.

Per user (one query built from the user's features and latest training history):
  * recall@K, ndcg@K, mrr@K, hit_rate@K: the usual full-ranking protocol. Items the user had in
    training (and in validation, when evaluating test) are masked; the targets are the user's
    distinct items in the evaluated split minus the masked ones (a masked item can never be
    retrieved, so counting it in recall's denominator or the ideal DCG would cap every model below
    1). Averaged over the users with at least one target.
  * accuracy@K: TFRS's factorized top-K accuracy. Nothing masked; one hit per evaluated interaction
    whose item is in the user's top K. Averaged over interactions.
  * coverage@100: the share of the catalog that appears in some user's (masked) top 100.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pipelines.prepare import PreparedData
from two_tower import features as feats
from two_tower.embeddings import Embedder
from two_tower.errors import UserError

COVERAGE_K = 100


def _padded_lists(owner: np.ndarray, values: np.ndarray, rows: np.ndarray, unique: bool) -> np.ndarray:
  """Groups `values` by `owner` into a [len(rows), max] matrix padded with -1 (row r = rows[r])."""
  if unique and len(owner):
    pairs = np.unique(np.stack([owner, values], 1), axis=0)
    owner, values = pairs[:, 0], pairs[:, 1]
  order = np.argsort(owner, kind="stable")
  owner, values = owner[order], values[order]
  slot = np.searchsorted(rows, owner)
  keep = (slot < len(rows)) & (rows[np.minimum(slot, len(rows) - 1)] == owner)
  owner, values, slot = owner[keep], values[keep], slot[keep]
  counts = np.bincount(slot, minlength=len(rows))
  out = np.full((len(rows), max(1, counts.max(initial=0))), -1, np.int32)
  starts = np.r_[0, np.cumsum(counts)[:-1]]
  out[slot, np.arange(len(slot)) - starts[slot]] = values
  return out


def _isin_pairs(owner: np.ndarray, values: np.ndarray, other_owner: np.ndarray,
                other_values: np.ndarray) -> np.ndarray:
  """Whether each (owner, value) pair is one of the (other_owner, other_values) pairs."""
  width = int(max(values.max(initial=0), other_values.max(initial=0))) + 1
  key = lambda o, v: o.astype(np.int64) * width + v
  return np.isin(key(owner, values), key(other_owner, other_values))


def _pad_rows(x: np.ndarray, rows: int, fill: int) -> np.ndarray:
  """Pads the first axis to `rows` (fixed shapes: one compilation for every chunk)."""
  return np.pad(x, ((0, rows - len(x)),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)


@functools.partial(jax.jit, static_argnames=("ks", "max_k"))
def _chunk_metrics(scores, targets, exclude, interactions, valid, *, ks, max_k):
  num_items = scores.shape[1]
  rows = jnp.arange(scores.shape[0])[:, None]
  masked = scores.at[rows, jnp.where(exclude < 0, num_items, exclude)].set(-jnp.inf, mode="drop")
  top_values, top_masked = jax.lax.top_k(masked, max_k)
  ranked = jnp.isfinite(top_values)  # masked items can only fill the tail of a tiny catalog
  # The unmasked top K (for accuracy@K) is the top K of the masked top K and the masked items' own
  # scores: a top_k over K + |masked| columns instead of a second one over the whole catalog.
  masked_scores = jnp.where(
      exclude >= 0, jnp.take_along_axis(scores, jnp.maximum(exclude, 0), axis=1), -jnp.inf)
  merged = jax.lax.top_k(jnp.concatenate([top_values, masked_scores], 1), max_k)[1]
  top_raw = jnp.take_along_axis(jnp.concatenate([top_masked, exclude], 1), merged, axis=1)
  hits = (top_masked[:, :, None] == targets[:, None, :]).any(-1) & ranked  # [b, max_k]
  num_pos = (targets >= 0).sum(-1)
  discount = 1.0 / jnp.log2(jnp.arange(max_k) + 2.0)
  first_hit = jnp.where(hits.any(-1), jnp.argmax(hits, -1), max_k)
  inter_rank = jnp.where(top_raw[:, None, :] == interactions[:, :, None], jnp.arange(max_k), max_k)
  inter_rank = inter_rank.min(-1)  # [b, T]: rank of each interaction's item in the unmasked top
  out = {}
  # Users left without a target (all their items masked) are not averaged: see Evaluator.
  has_target = num_pos > 0
  for k in ks:
    h = hits[:, :k].sum(-1)
    idcg = jnp.cumsum(discount[:k])[jnp.clip(jnp.minimum(num_pos, k) - 1, 0, k - 1)]
    out[f"recall@{k}"] = h / jnp.maximum(num_pos, 1)
    out[f"ndcg@{k}"] = (hits[:, :k] * discount[:k]).sum(-1) / idcg
    out[f"mrr@{k}"] = jnp.where(first_hit < k, 1.0 / (first_hit + 1.0), 0.0)
    out[f"hit_rate@{k}"] = (h > 0).astype(jnp.float32)
    out[f"accuracy@{k}"] = ((inter_rank < k) & (interactions >= 0)).sum(-1)
  out = {name: jnp.where(valid & (has_target | name.startswith("accuracy@")), v, 0)
         for name, v in out.items()}
  coverage = jnp.zeros(num_items, jnp.int32).at[
      jnp.where(valid[:, None] & ranked[:, :COVERAGE_K], top_masked[:, :COVERAGE_K], num_items)
  ].add(1, mode="drop")
  return out, coverage


class Evaluator:
  """Evaluates a model on one split; the targets and masks are computed once."""

  def __init__(self, data: PreparedData, catalog: feats.Catalog | None, split: str,
               ks: Sequence[int], user_batch: int = 512, *, graphdef: Any = None,
               mesh: Mesh | None = None, item_batch: int = 8192,
               target_items: np.ndarray | None = None):
    """`catalog`, `graphdef` and `mesh` are the model's, for `__call__`; without them the
    evaluator scores only what `evaluate_scores` is given. `target_items` (catalog rows): only
    the split's interactions with these items are targets (e.g. cold-start items); the ranking is
    still over the whole catalog."""
    schema = data.schema
    if schema.split_sizes.get(split, 0) == 0:
      raise UserError(f"split {split!r} is empty in this dataset: evaluate another split (eval.split)")
    self.ks = tuple(sorted(ks))
    self.max_k = max(max(self.ks), COVERAGE_K)
    if self.max_k > schema.num_items:
      raise UserError(f"K={self.max_k} is larger than the catalog ({schema.num_items} items): lower eval.ks")
    self.num_items = schema.num_items
    self.user_batch = user_batch
    self._catalog = catalog
    if graphdef is not None:
      # Built once: every call (each periodic validation) reuses the compiled functions.
      self._embedder = Embedder(graphdef, catalog, mesh, item_batch)

      def scores(params, catalog, item_embeddings, users):
        model = nnx.merge(graphdef, params)
        queries = model.embed_queries(feats.query_features(catalog, users))
        # Full float32 (a GPU's default, TF32, reorders near-ties), as the exact search's scores.
        return jnp.matmul(queries, item_embeddings.T, precision=jax.lax.Precision.HIGHEST)
      self._scores = jax.jit(scores)
    users, items = data.pairs(split)
    if target_items is not None:
      keep = np.isin(items, target_items)
      users, items = users[keep], items[keep]
    self.users = np.unique(users)
    masked = ["train"] + (["validation"] if split == "test" else [])
    owners, values = zip(*(data.pairs(s) for s in masked))
    owners, values = np.concatenate(owners), np.concatenate(values)
    self.exclude = _padded_lists(owners, values, self.users, unique=True)
    # Targets: the user's distinct items of the split that are not masked. A user may have had an
    # item in training too (data sampled with replacement): masked, so not a target either.
    target = ~_isin_pairs(users, items, owners, values)
    self.targets = _padded_lists(users[target], items[target], self.users, unique=True)
    self.num_target_users = int((self.targets >= 0).any(1).sum())
    self.interactions = _padded_lists(users, items, self.users, unique=False)
    self.num_interactions = len(users)
    self.metric_names = sorted(
        [f"{m}@{k}" for m in ("recall", "ndcg", "mrr", "hit_rate", "accuracy") for k in self.ks]
        + [f"coverage@{COVERAGE_K}"])

  def __call__(self, params) -> dict[str, float]:
    """Metrics of the model's parameters: scores are dot products of the towers' outputs."""
    items = self._embedder.embed_on_device(params, "item", np.arange(self.num_items))
    return self.evaluate_scores(lambda users: self._scores(params, self._catalog, items, users))

  def evaluate_scores(self, score_fn: Callable[[np.ndarray], jax.Array]) -> dict[str, float]:
    """Metrics of any scorer: `score_fn(user_rows)` -> [len(user_rows), num_items] scores."""
    sums: dict[str, float] = {}
    coverage = np.zeros(self.num_items, np.int64)
    b = self.user_batch
    for lo in range(0, len(self.users), b):
      sl = slice(lo, lo + b)
      n = len(self.users[sl])
      out, cov = _chunk_metrics(
          jnp.asarray(score_fn(_pad_rows(self.users[sl], b, 0))),
          _pad_rows(self.targets[sl], b, -1), _pad_rows(self.exclude[sl], b, -1),
          _pad_rows(self.interactions[sl], b, -1), np.arange(b) < n, ks=self.ks, max_k=self.max_k)
      for name, v in out.items():
        sums[name] = sums.get(name, 0.0) + float(np.asarray(v, np.float64).sum())
      coverage += np.asarray(cov)
    metrics = {}
    for name, total in sums.items():
      denom = self.num_interactions if name.startswith("accuracy@") else self.num_target_users
      metrics[name] = total / max(denom, 1)
    metrics[f"coverage@{COVERAGE_K}"] = float((coverage > 0).mean())
    return dict(sorted(metrics.items()))
