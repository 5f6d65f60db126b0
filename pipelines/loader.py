"""grain loaders over the prepared ArrayRecord splits.

The pipeline shuffles and batches *indices* and reads each batch with one batched ArrayRecord read
and one decode loop, which is several times faster than reading and decoding record by record.
Global batch g is always the same set of examples whatever the number of JAX processes: process p
reads rows [p*b, (p+1)*b) of it, with b = global batch / process count.
"""

from __future__ import annotations

import math

import grain
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

BATCH_KEYS = ("user_index", "item_index", "history", "weight")


def decode(records, history_length: int) -> dict[str, np.ndarray]:
  """Serialized TFDS examples -> a dict of stacked arrays."""
  n = len(records)
  user = np.empty(n, np.int32)
  item = np.empty(n, np.int32)
  weight = np.empty(n, np.float32)
  history = np.empty((n, history_length), np.int32)
  for j, record in enumerate(records):
    f = tf_example_pb2.Example.FromString(record).features.feature
    user[j] = f["user_index"].int64_list.value[0]
    item[j] = f["item_index"].int64_list.value[0]
    weight[j] = f["weight"].float_list.value[0]
    history[j] = f["history"].int64_list.value
  return dict(user_index=user, item_index=item, history=history, weight=weight)


class ReadBatch:
  """Maps a global batch of example indices to this process's decoded, padded local batch."""

  def __init__(self, source, history_length: int, local_batch: int, process_index: int):
    self._source = source
    self._history_length = history_length
    self._local_batch = local_batch
    self._process_index = process_index

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    lo = self._process_index * self._local_batch
    mine = np.asarray(indices)[lo: lo + self._local_batch]
    num_real = len(mine)
    # The last global batch of a run may be short: pad with example 0 at weight 0, so that every
    # step has the same shapes (no recompilation) and padding adds nothing to the loss.
    padded = np.zeros(self._local_batch, np.int64)
    padded[:num_real] = mine
    batch = decode(self._source.__getitems__(padded.tolist()), self._history_length)
    batch["weight"][num_real:] = 0.0
    return batch


def train_length(split_size: int, batch_size: int, num_epochs: float, num_steps: int) -> tuple[int, int]:
  """(steps, examples served): `num_steps` full batches, or `num_epochs` passes over the split."""
  if num_steps > 0:
    return num_steps, num_steps * batch_size
  examples = max(1, round(split_size * num_epochs))
  return math.ceil(examples / batch_size), examples


def train_dataset(
    source,
    *,
    history_length: int,
    batch_size: int,
    num_examples: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    prefetch_buffer_size: int = 2,
) -> grain.IterDataset:
  """Local batches covering `num_examples` shuffled examples (reshuffled every epoch)."""
  if batch_size % process_count:
    raise ValueError(
        f"train.batch_size={batch_size} is not divisible by the {process_count} JAX processes: "
        f"use a multiple of {process_count}"
    )
  n = len(source)
  if n == 0:
    raise ValueError("the training split is empty: nothing to train on")
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(math.ceil(num_examples / n))
  ds = ds[:num_examples].batch(batch_size, drop_remainder=False)
  ds = ds.map(ReadBatch(source, history_length, batch_size // process_count, process_index))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch_buffer_size))
  elif prefetch_buffer_size > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch_buffer_size)
  return it
