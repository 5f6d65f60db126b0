"""grain loaders over the prepared ArrayRecord splits.

The pipeline maps a step number to the indices of its batch (a seeded permutation per epoch) and
reads each batch with one batched ArrayRecord read and one decode loop, or, for splits that fit in
memory, decodes the split once and gathers batches with numpy. Both are far faster than grain's
per-record path (microseconds of Python per example).
Global batch g is always the same set of examples whatever the number of JAX processes: process p
reads rows [p*b, (p+1)*b) of it, with b = global batch / process count.
"""

from __future__ import annotations

import math

import grain
import numpy as np
from absl import flags
from tensorflow_datasets.proto import tf_example_pb2

from pipelines.sources import DataError
from two_tower.errors import ConfigError

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


class RecordSplit:
  """A split read from its ArrayRecord files batch by batch (any size, bounded memory)."""

  def __init__(self, source, history_length: int):
    self._source = source
    self._history_length = history_length

  def __len__(self) -> int:
    return len(self._source)

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return decode(self._source.__getitems__(indices.tolist()), self._history_length)


class InMemorySplit:
  """A split decoded once into columns; each batch is then a vectorised gather (like tf.data's
  `.cache()`, which TFRS's recipes use). For splits that fit comfortably in memory."""

  def __init__(self, source, history_length: int, chunk: int = 65536):
    parts = [decode(source.__getitems__(list(range(lo, min(lo + chunk, len(source))))), history_length)
             for lo in range(0, len(source), chunk)]
    self._columns = {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}

  def __len__(self) -> int:
    return len(self._columns["user_index"])

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[indices] for k, v in self._columns.items()}


def open_split(source, history_length: int, cache: str = "auto", max_cache_bytes: int = 1 << 30):
  """In memory when `cache` is "always", or "auto" and the decoded split fits in max_cache_bytes."""
  if cache not in ("auto", "always", "never"):
    raise ValueError(f"data.cache must be auto, always or never, got {cache!r}")
  decoded_bytes = len(source) * 4 * (3 + history_length)
  if cache == "always" or (cache == "auto" and decoded_bytes <= max_cache_bytes):
    return InMemorySplit(source, history_length)
  return RecordSplit(source, history_length)


class ReadBatch:
  """Maps a global batch of example indices to this process's decoded, padded local batch."""

  def __init__(self, split, local_batch: int, process_index: int):
    self._split = split
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
    batch = self._split.gather(padded)
    batch["weight"][num_real:] = 0.0
    return batch


def train_length(split_size: int, batch_size: int, num_epochs: float, num_steps: int) -> tuple[int, int]:
  """(steps, examples served): `num_steps` full batches, or `num_epochs` passes over the split."""
  if num_steps > 0:
    return num_steps, num_steps * batch_size
  examples = max(1, round(split_size * num_epochs))
  return math.ceil(examples / batch_size), examples


def examples_in_step(step: int, batch_size: int, num_examples: int) -> int:
  """Real examples of global batch `step`: the last batch of a run may be short (then padded)."""
  return max(0, min(batch_size, num_examples - step * batch_size))


class BatchIndices:
  """Global batch number -> example indices: one seeded permutation per epoch, computed with
  numpy for the whole batch (grain's per-element shuffle costs microseconds per example)."""

  def __init__(self, num_examples: int, split_size: int, batch_size: int, seed: int):
    self._total = num_examples
    self._n = split_size
    self._batch_size = batch_size
    self._seed = seed
    self._cache: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._cache:
      if len(self._cache) > 1:
        self._cache.pop(min(self._cache))
      self._cache[epoch] = np.random.default_rng((self._seed, epoch)).permutation(self._n)
    return self._cache[epoch]

  def __call__(self, step: int) -> np.ndarray:
    start = step * self._batch_size
    pos = np.arange(start, start + examples_in_step(step, self._batch_size, self._total))
    epoch, within = np.divmod(pos, self._n)
    out = np.empty(len(pos), np.int64)
    for e in np.unique(epoch):
      sel = epoch == e
      out[sel] = self._permutation(int(e))[within[sel]]
    return out


def train_dataset(
    split,
    *,
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
    raise ConfigError(
        f"train.batch_size={batch_size} is not divisible by the {process_count} JAX processes: "
        f"use a multiple of {process_count}"
    )
  n = len(split)
  if n == 0:
    raise DataError("the training split is empty: nothing to train on (check the split settings "
                    "and the input data)")
  num_steps = math.ceil(num_examples / batch_size)
  ds = grain.MapDataset.range(num_steps).map(BatchIndices(num_examples, n, batch_size, seed))
  ds = ds.map(ReadBatch(split, batch_size // process_count, process_index))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; outside an absl app: defaults
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch_buffer_size))
  elif prefetch_buffer_size > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch_buffer_size)
  return it
