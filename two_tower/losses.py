"""In-batch sampled softmax for retrieval.

Each query's positive is its own item; the other items of the batch (the whole global batch, or the
query's data-parallel shard) and optional uniformly sampled items are the negatives. Options:
removal of accidental hits (a negative that is the query's positive item), logQ correction for the
sampling probability of each candidate, and per-example weights.

Two things keep it fast:
  * Candidates are deduplicated: a batch holds each distinct item once, with its multiplicity as a
    log-count bias on its logit. The loss and gradients are exactly those of the batch with its
    duplicates (duplicates have identical logits), and with a small catalog the logits shrink from
    batch x batch to batch x catalog. Removing accidental hits is then just giving the positive's
    own column a multiplicity of one.
  * The logits are never materialised whole: `_logsumexp` walks blocks of query rows, and its
    custom VJP recomputes each block in the backward pass (as flash attention does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from two_tower import sharding
from two_tower.sharding import DATA


def dedupe_candidates(item_ids: jax.Array, extra_ids: jax.Array | None, *, num_items: int,
                      num_shards: int, global_negatives: bool, valid: jax.Array | None = None):
  """Distinct candidates of a batch and their multiplicities.

  Args:
    item_ids: [B] positive item of every example (rows split evenly over `num_shards` shards).
    extra_ids: [M] extra negatives, shared by every shard, or None.
    valid: [B] bool, False for padding rows (the loader's weight-0 filler of a short last batch):
      they are nobody's negatives. None: every row is real.
  Returns:
    (unique_ids [U], positive [B] index of each example's item in unique_ids,
     counts [num_shards, U] how often each candidate occurs among the negatives of each shard).
    U is static (jit); its unused slots hold item 0 with a count of 0 in every shard.
  """
  all_ids = item_ids if extra_ids is None else jnp.concatenate([item_ids, extra_ids])
  size = min(all_ids.shape[0], num_items)
  unique_ids, inverse = jnp.unique(all_ids, size=size, fill_value=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  b = item_ids.shape[0]
  positive = inverse[:b]
  real = jnp.ones(b, jnp.float32) if valid is None else valid.astype(jnp.float32)
  # Shard s sees its own rows' items (or, with global negatives, every row's) plus the extras.
  shard_of_row = jnp.arange(b) // (b // num_shards)
  per_shard = jnp.zeros((num_shards, size), jnp.float32).at[shard_of_row, positive].add(real)
  if global_negatives:
    per_shard = jnp.broadcast_to(per_shard.sum(0), per_shard.shape)
  if extra_ids is not None:
    per_shard = per_shard + jnp.zeros(size, jnp.float32).at[inverse[b:]].add(1.0)[None]
  return unique_ids, positive, per_shard


def expected_counts(sampling_prob: jax.Array, valid: jax.Array, *, num_shards: int,
                    global_negatives: bool, num_uniform_negatives: int, num_items: int) -> jax.Array:
  """Expected count of each candidate among one query's negatives: the logQ correction's Q.

  The in-batch negatives of a query in shard s are the real rows of its shard (of the whole batch
  with global negatives), each drawn from the training item distribution, plus
  `num_uniform_negatives` drawn uniformly from the catalog.

  Args:
    sampling_prob: [U] training frequency of each candidate.
    valid: [B] bool, False for padding rows (they are not negatives, so they do not count).
  Returns:
    [num_shards, U]. It is 0 only for a candidate that cannot be drawn (never in training, no
    uniform negatives), which the loss then ignores (see `_block_logits`).
  """
  rows = valid.reshape(num_shards, -1).sum(1).astype(jnp.float32)
  if global_negatives:
    rows = jnp.broadcast_to(rows.sum(), rows.shape)
  return rows[:, None] * sampling_prob[None, :] + num_uniform_negatives / num_items


def _block_logits(q, cols, log_count, log_q, pos, remove_hits):
  # A candidate absent from this shard's negatives (count 0: padding slot, padding row, another
  # shard's item) must weigh exp(-inf) = 0 whatever its log_q, which is itself -inf for an item
  # never seen in training: -inf - (-inf) would be NaN.
  bias = jnp.where(log_count > -jnp.inf, log_count - log_q, -jnp.inf)
  if remove_hits:
    # The positive's column stands for all its copies in the batch: keep the positive alone.
    own = pos[:, None] == jnp.arange(cols.shape[0])[None, :]
    return q @ cols.T + jnp.where(own, -log_q[None, :], bias[None, :])
  return q @ cols.T + bias[None, :]


def _blocks(x, n):
  return x.reshape(n, x.shape[0] // n, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _logsumexp(q, cols, log_count, log_q, pos, num_blocks, remove_hits):
  """Row-wise log-sum-exp of the (implicit) [rows, candidates] logits."""
  return _lse_fwd(q, cols, log_count, log_q, pos, num_blocks, remove_hits)[0]


def _lse_fwd(q, cols, log_count, log_q, pos, num_blocks, remove_hits):
  def block(args):
    qb, pb = args
    return jax.nn.logsumexp(_block_logits(qb, cols, log_count, log_q, pb, remove_hits), axis=-1)
  lse = jax.lax.map(block, (_blocks(q, num_blocks), _blocks(pos, num_blocks))).reshape(-1)
  return lse, (q, cols, log_count, log_q, pos, lse)


def _lse_bwd(num_blocks, remove_hits, residuals, g):
  q, cols, log_count, log_q, pos, lse = residuals

  def block(d_cols, args):
    qb, pb, lb, gb = args
    logits = _block_logits(qb, cols, log_count, log_q, pb, remove_hits)
    # softmax * upstream gradient; rows without gradient (padding) may have an infinite lse.
    d_logits = jnp.where(gb[:, None] != 0, jnp.exp(logits - lb[:, None]) * gb[:, None], 0.0)
    return d_cols + d_logits.T @ qb, d_logits @ cols

  d_cols, d_q = jax.lax.scan(
      block, jnp.zeros_like(cols),
      (_blocks(q, num_blocks), _blocks(pos, num_blocks), _blocks(lse, num_blocks),
       _blocks(g, num_blocks)))
  return d_q.reshape(q.shape), d_cols, None, None, None


_logsumexp.defvjp(_lse_fwd, _lse_bwd)


def _num_blocks(rows: int, max_block: int) -> int:
  block = max(d for d in range(1, min(rows, max_block) + 1) if rows % d == 0)
  return rows // block


def sampled_softmax_loss(
    queries: jax.Array,
    candidates: jax.Array,
    positive: jax.Array,
    counts: jax.Array,
    weights: jax.Array,
    *,
    mesh: Mesh,
    log_q: jax.Array | None = None,
    remove_accidental_hits: bool = True,
    reduction: str = "mean",
    row_chunk: int = 512,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Softmax cross-entropy of each query against its positive among the batch's candidates.

  Args:
    queries: [B, D] query embeddings (sharded over `data`).
    candidates: [U, D] embeddings of the distinct candidates (see `dedupe_candidates`).
    positive: [B] index of each query's positive in `candidates`.
    counts: [S, U] multiplicity of each candidate among the negatives of each of the S data shards.
    weights: [B] per-example weights; 0 for padding rows, whose loss is not computed (pass the
      same rows as `valid` to `dedupe_candidates` so that they are not negatives either).
    log_q: [U] or [S, U] (per data shard, see `expected_counts`) log expected count of each
      candidate among a query's negatives, subtracted from its logits (logQ correction), or None.
  Returns:
    (loss, metrics): the weighted mean (or sum) of per-example losses.
  """
  if log_q is None:
    log_q = jnp.zeros(candidates.shape[:1], jnp.float32)
  log_q = jax.lax.stop_gradient(jnp.broadcast_to(log_q.astype(jnp.float32), counts.shape))
  log_count = jnp.log(counts)  # -inf where a candidate is absent from a shard

  def local_loss(q, cols, pos, log_count, log_q, w):
    # The logits, their log-sum-exp and its custom backward pass run in float32 whatever the
    # towers' compute dtype: with a temperature of 0.1 the logits span [-10, 10], where bfloat16's
    # spacing (up to 0.06) is larger than the differences the softmax ranks by. The casts are
    # no-ops for float32 embeddings (the towers' outputs are float32), and otherwise their
    # transposes return the gradients in the embeddings' own dtype.
    q = q.astype(jnp.float32)
    log_q = log_q[0]
    # Each shard scores its rows against the same candidates; as a per-shard (varying) value,
    # their gradient is summed over shards by autodiff.
    cols = jax.lax.pcast(cols.astype(jnp.float32), DATA, to="varying")
    lse = _logsumexp(q, cols, log_count[0], log_q, pos, _num_blocks(q.shape[0], row_chunk),
                     remove_accidental_hits)
    per_example = lse - (jnp.sum(q * cols[pos], axis=-1) - log_q[pos])
    # A padding row's loss may be infinite (e.g. a shard of padding only has no negatives): keep
    # it out rather than multiply it by its weight of 0.
    per_example = jnp.where(w != 0, per_example, 0.0)
    return jax.lax.psum(jnp.sum(w * per_example), DATA), jax.lax.psum(jnp.sum(w), DATA)

  rows, rep = sharding.logical_spec("batch"), P()
  total, weight = jax.shard_map(
      local_loss, mesh=mesh, in_specs=(rows, rep, rows, rows, rows, rows), out_specs=(rep, rep),
  )(queries, candidates, positive, log_count, log_q, weights)
  loss = total if reduction == "sum" else total / jnp.maximum(weight, 1e-12)
  return loss, {"loss": loss, "examples": weight}
