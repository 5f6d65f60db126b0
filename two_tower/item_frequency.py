"""Streaming item frequency for the logQ correction (loss.logq_estimator="streaming").

The static estimator (features.SAMPLING_PROB) is each item's share of the prepared training split:
frozen at preparation, so in the nightly lifecycle it is the day's alone and forgets the days
before. The streaming one follows the stream the model is trained on, as the estimator of Yi et al.
(RecSys 2019, "Sampling-bias-corrected neural modeling for large corpus item recommendations")
does, here with exponentially decayed counts: per item-ID row r,

  c_r <- d * c_r + (1 - d) * (occurrences of r among the step's positives),   d = 0.5 ** (1 / h)

with h = loss.logq_half_life_steps. c_r / (1 - d ** t) (bias-corrected as Adam's moments, t steps
so far) estimates r's expected occurrences per batch, and divided by the batch size its
probability per example, the Q of the correction. Unlike the last-seen-step / mean-gap estimator
it counts an item occurring several times in one batch several times.

The counts are indexed by the item-ID table's rows (the ID registry's rows in the nightly
lifecycle), live in the train state and its checkpoint (resume is bit-exact), and follow the
registry across days as embedding rows do (two_tower/warm_start.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decay(half_life_steps: float) -> float:
  return 0.5 ** (1.0 / half_life_steps)


def update(counts: jax.Array, rows: jax.Array, weight: jax.Array, *, half_life_steps: float
           ) -> jax.Array:
  """One step: `counts` [R] decayed, plus `weight` [B] (0 for padding) at `rows` [B]."""
  d = decay(half_life_steps)
  return d * counts + (1.0 - d) * jnp.zeros_like(counts).at[rows].add(weight.astype(counts.dtype))


def probability(counts: jax.Array, steps: jax.Array, *, half_life_steps: float,
                batch_size: int) -> jax.Array:
  """Per-example probability of each row after `steps` (>= 1) updates."""
  correction = 1.0 - decay(half_life_steps) ** steps.astype(jnp.float32)
  return counts / (correction * batch_size)


def initial(num_rows: int) -> jax.Array:
  return jnp.zeros((num_rows,), jnp.float32)
