"""In-batch sampled softmax for retrieval.

Each query's positive is its own item; the other items of the batch (the whole global batch, or the
local shard) and optional uniformly sampled items are the negatives. Options: removal of accidental
hits (a negative that is the query's positive item), logQ correction for the sampling probability
of each candidate, and per-example weights.

The [batch x candidates] logits are never materialised: `_masked_logsumexp` walks blocks of query
rows, and its custom VJP recomputes each block's logits in the backward pass (as flash attention
does), so memory stays at one block and the softmax is computed in two fused passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from two_tower.sharding import DATA

_MASKED = -1e30


def _block_logits(q, cols, col_bias, row_ids, col_ids, pos, remove_hits):
  logits = q @ cols.T + col_bias[None, :]
  if remove_hits:
    hit = (row_ids[:, None] == col_ids[None, :]) & (pos[:, None] != jnp.arange(cols.shape[0])[None, :])
    logits = jnp.where(hit, _MASKED, logits)
  return logits


def _blocks(x, n):
  return x.reshape(n, x.shape[0] // n, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _masked_logsumexp(q, cols, col_bias, row_ids, col_ids, pos, num_blocks, remove_hits):
  return _lse_fwd(q, cols, col_bias, row_ids, col_ids, pos, num_blocks, remove_hits)[0]


def _lse_fwd(q, cols, col_bias, row_ids, col_ids, pos, num_blocks, remove_hits):
  def block(args):
    qb, rb, pb = args
    return jax.nn.logsumexp(_block_logits(qb, cols, col_bias, rb, col_ids, pb, remove_hits), axis=-1)
  lse = jax.lax.map(block, (_blocks(q, num_blocks), _blocks(row_ids, num_blocks),
                            _blocks(pos, num_blocks))).reshape(-1)
  return lse, (q, cols, col_bias, row_ids, col_ids, pos, lse)


def _lse_bwd(num_blocks, remove_hits, residuals, g):
  q, cols, col_bias, row_ids, col_ids, pos, lse = residuals

  def block(d_cols, args):
    qb, rb, pb, lb, gb = args
    logits = _block_logits(qb, cols, col_bias, rb, col_ids, pb, remove_hits)
    d_logits = jnp.exp(logits - lb[:, None]) * gb[:, None]  # softmax * upstream gradient
    return d_cols + d_logits.T @ qb, d_logits @ cols

  d_cols, d_q = jax.lax.scan(
      block, jnp.zeros_like(cols),
      (_blocks(q, num_blocks), _blocks(row_ids, num_blocks), _blocks(pos, num_blocks),
       _blocks(lse, num_blocks), _blocks(g, num_blocks)))
  return d_q.reshape(q.shape), d_cols, None, None, None, None


_masked_logsumexp.defvjp(_lse_fwd, _lse_bwd)


def _num_blocks(rows: int, max_block: int) -> int:
  block = max(d for d in range(1, min(rows, max_block) + 1) if rows % d == 0)
  return rows // block


def sampled_softmax_loss(
    queries: jax.Array,
    items: jax.Array,
    item_ids: jax.Array,
    weights: jax.Array,
    *,
    mesh: Mesh,
    log_q: jax.Array | None = None,
    extra_items: jax.Array | None = None,
    extra_ids: jax.Array | None = None,
    extra_log_q: jax.Array | None = None,
    global_negatives: bool = True,
    remove_accidental_hits: bool = True,
    reduction: str = "mean",
    row_chunk: int = 512,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Softmax cross-entropy of each query against its own item among all candidates.

  Args:
    queries, items: [B, D] embeddings of the positive pairs (batch sharded over `data`).
    item_ids: [B] item rows, used to find accidental hits.
    weights: [B] per-example weights (0 for padding).
    log_q: [B] log sampling probability of each in-batch candidate, subtracted from its logits.
    extra_items, extra_ids, extra_log_q: [M, ...] extra (e.g. uniformly sampled) negatives.
  Returns:
    (loss, metrics): the weighted mean (or sum) of per-example losses.
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"loss.reduction must be 'mean' or 'sum', got {reduction!r}")
  dim = queries.shape[-1]
  if log_q is None:
    log_q = jnp.zeros(items.shape[:1], jnp.float32)
  if extra_items is None:
    extra_items = jnp.zeros((0, dim), items.dtype)
    extra_ids = jnp.full((0,), -1, jnp.int32)
    extra_log_q = jnp.zeros((0,), jnp.float32)
  elif extra_log_q is None:
    extra_log_q = jnp.zeros(extra_items.shape[:1], jnp.float32)
  log_q = jax.lax.stop_gradient(log_q)
  extra_log_q = jax.lax.stop_gradient(extra_log_q)

  def local_loss(q, c, ids, w, lq, xc, xids, xlq):
    rows = q.shape[0]
    if global_negatives:
      cols = jax.lax.all_gather(c, DATA, tiled=True)
      col_ids = jax.lax.all_gather(ids, DATA, tiled=True)
      col_lq = jax.lax.all_gather(lq, DATA, tiled=True)
      offset = jax.lax.axis_index(DATA) * rows
    else:
      cols, col_ids, col_lq, offset = c, ids, lq, 0
    cols = jnp.concatenate([cols, xc.astype(cols.dtype)])
    col_ids = jnp.concatenate([col_ids, xids.astype(col_ids.dtype)])
    col_bias = -jnp.concatenate([col_lq, xlq]).astype(jnp.float32)
    pos = offset + jnp.arange(rows)
    lse = _masked_logsumexp(q.astype(jnp.float32), cols.astype(jnp.float32), col_bias, ids,
                            col_ids, pos, _num_blocks(rows, row_chunk), remove_accidental_hits)
    positive = jnp.sum(q * c, axis=-1).astype(jnp.float32) - lq
    per_example = lse - positive
    total = jax.lax.psum(jnp.sum(w * per_example), DATA)
    weight = jax.lax.psum(jnp.sum(w), DATA)
    return total, weight

  batch, rep = P(DATA), P()
  total, weight = jax.shard_map(
      local_loss, mesh=mesh,
      in_specs=(batch, batch, batch, batch, batch, rep, rep, rep), out_specs=(rep, rep),
  )(queries, items, item_ids, weights, log_q, extra_items, extra_ids, extra_log_q)
  loss = total if reduction == "sum" else total / jnp.maximum(weight, 1e-12)
  return loss, {"loss": loss, "examples": weight}
