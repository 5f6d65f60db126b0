"""Writes a split's examples as TFDS ArrayRecord shards, serialized with numpy in blocks.

The files are the ones TFDS's GeneratorBasedBuilder writes for the same (key, example) pairs: the
same `tf.train.Example` encoding, the same order (ascending md5 of the key salted with the split
name, TFDS's shuffle), the same shard count and names. Two differences: the order of the features
inside an example is fixed here (TFDS's varies between processes), and records are not compressed
(see _ARRAY_RECORD_OPTIONS). TFDS encodes and serializes each example in Python (about 100 us
each); here a block of examples is one set of array operations, which leaves writing the records
as the main cost.

An example holds, per `pipelines.prepare.example_features`: user_index, item_index, timestamp
(int64 lists), weight (a float list) and history (an int64 list of history_length values).
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import numpy as np
from array_record.python import array_record_module
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.core.utils import shard_utils

# The order of the Features map entries. TFDS leaves it to the protobuf runtime, which varies it
# from one process to the next (a hash map); a fixed order makes the files deterministic.
FEATURE_ORDER = ("user_index", "item_index", "timestamp", "weight", "history")
_INT_FEATURE, _FLOAT_FEATURE = 0x1A, 0x12  # Feature.int64_list (field 3) / float_list (field 2)
# One record per chunk for random access, as TFDS writes; uncompressed, unlike TFDS's default zstd:
# compressing each ~160-byte record on its own takes ~60 us and gives a larger file, not a smaller
# one (chunk overhead). Readers take either: the chunk header names its compression.
_ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
BLOCK = 65536  # examples serialized at once

Columns = dict[str, np.ndarray]  # FEATURE_ORDER -> [n] (history: [n, history_length])
Segment = tuple[np.ndarray, np.ndarray]  # bytes [n, width] uint8, and which of them are used


def _unsigned(values: np.ndarray) -> np.ndarray:
  """The values as the unsigned integers protobuf encodes (negative int64: two's complement), in
  32 bits when they fit (half the work)."""
  v = values.astype(np.int64).view(np.uint64)
  return v.astype(np.uint32) if v.size == 0 or int(v.max()) < 1 << 32 else v


def _varint_sizes(values: np.ndarray) -> np.ndarray:
  """Bytes of each value as a protobuf varint (negative int64: 10)."""
  v = _unsigned(values)
  sizes = np.ones(v.shape, np.int64)
  largest = int(v.max()) if v.size else 0
  for k in range(1, 10):
    if largest < 1 << (7 * k):
      break
    sizes += v >= v.dtype.type(1 << (7 * k))
  return sizes


def _varint(values: np.ndarray) -> Segment:
  """Varints of [n, m] values, laid out [n, m * width] (width: the longest) with a mask of the
  bytes used."""
  values = values.reshape(len(values), -1)
  sizes = _varint_sizes(values)[..., None]
  width = int(sizes.max()) if sizes.size else 1
  byte = np.arange(width)
  v = _unsigned(values)[..., None]
  shifts = (byte * 7).astype(v.dtype)
  groups = ((v >> shifts) & v.dtype.type(0x7F)).astype(np.uint8)
  groups |= np.where(byte < sizes - 1, 0x80, 0).astype(np.uint8)
  n = len(values)
  return groups.reshape(n, -1), (byte < sizes).reshape(n, -1)


def _const(n: int, data: bytes) -> Segment:
  row = np.frombuffer(data, np.uint8)
  return np.broadcast_to(row, (n, len(row))), np.ones((n, len(row)), bool)


def _field_size(payload: np.ndarray) -> np.ndarray:
  """Bytes of a length-delimited protobuf field (tag, varint length, payload) of `payload` bytes."""
  return 1 + _varint_sizes(payload) + payload


def _payload(column: np.ndarray) -> tuple[np.ndarray, int]:
  """(bytes per row of the column's packed values, Feature kind)."""
  n = len(column)
  if column.dtype.kind == "f":
    return np.full(n, 4 * (column.size // max(n, 1)), np.int64), _FLOAT_FEATURE
  return _varint_sizes(column.reshape(n, -1)).sum(axis=1), _INT_FEATURE


def _entry_sizes(name: str, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Sizes of a Features map entry holding `payload` bytes of packed values: (value list,
  Feature, entry body)."""
  value_list = _field_size(payload)  # List{value: packed}
  feature = _field_size(value_list)  # Feature{int64_list | float_list: List}
  body = _field_size(np.full(len(payload), len(name))) + _field_size(feature)  # {key, value}
  return value_list, feature, body


def record_sizes(columns: Columns) -> np.ndarray:
  """len(serialize(columns)[i]) for every row, without serializing."""
  features = 0
  for name in FEATURE_ORDER:
    payload, _ = _payload(columns[name])
    features = features + _field_size(_entry_sizes(name, payload)[2])
  return _field_size(features)


def serialize(columns: Columns) -> list[bytes]:
  """The serialized tf.train.Example of each row of `columns`: every row's bytes are laid out in
  one [n, width] matrix of segments (headers, varints, floats) with a mask of the bytes used, and
  the records are the masked bytes in row order."""
  n = len(columns[FEATURE_ORDER[0]])
  segments: list[Segment] = []
  features = 0
  for name in FEATURE_ORDER:
    column = columns[name]
    payload, kind = _payload(column)
    if kind == _FLOAT_FEATURE:
      raw = np.ascontiguousarray(column.reshape(n, -1), dtype="<f4").view(np.uint8)
      values = (raw, np.ones(raw.shape, bool))
    else:
      values = _varint(column)
    value_list, feature, body = _entry_sizes(name, payload)
    features = features + _field_size(body)
    segments += [_const(n, b"\x0a"), _varint(body),  # map entry
                 _const(n, bytes([0x0A, len(name)]) + name.encode() + b"\x12"), _varint(feature),
                 _const(n, bytes([kind])), _varint(value_list),
                 _const(n, b"\x0a"), _varint(payload), values]
  segments = [_const(n, b"\x0a"), _varint(features)] + segments  # Example{features: Features}
  data = np.concatenate([s[0] for s in segments], axis=1)
  used = np.concatenate([s[1] for s in segments], axis=1)
  flat = data[used].tobytes()
  ends = np.cumsum(used.sum(axis=1)).tolist()
  return [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]


def tfds_hashes(keys: np.ndarray, split_name: str) -> np.ndarray:
  """[n, 2] uint64: the md5 of split name + str(key) of each key as a 128-bit big-endian integer
  (tensorflow_datasets.core.hashing), high word first: TFDS writes examples in its order."""
  salted = hashlib.md5(split_name.encode())
  digests = bytearray()
  for key in keys.tolist():
    md5 = salted.copy()
    md5.update(str(key).encode())
    digests += md5.digest()
  return np.frombuffer(bytes(digests), ">u8").reshape(-1, 2).astype(np.uint64)


def hash_order(words: np.ndarray) -> np.ndarray:
  """The permutation that sorts tfds_hashes `words` ascending."""
  order = np.argsort(words[:, 0], kind="stable")
  high = words[order, 0]
  if (high[1:] == high[:-1]).any():  # equal first 64 bits: a 1 in 2^64 chance per pair
    return np.lexsort((words[:, 1], words[:, 0]))
  return order


def tfds_order(keys: np.ndarray, split_name: str) -> np.ndarray:
  """The permutation of `keys` (ints) in which TFDS writes their examples."""
  return hash_order(tfds_hashes(keys, split_name))


def write_shard(path: str, blocks) -> None:
  """Writes the serialized examples of each block of columns, in order, as one ArrayRecord file."""
  writer = array_record_module.ArrayRecordWriter(path, _ARRAY_RECORD_OPTIONS)
  for columns in blocks:
    for record in serialize(columns):
      writer.write(record)
  writer.close()


def write_split(filename_template, split_name: str, keys: np.ndarray,
                columns: Callable[[np.ndarray], Columns]) -> splits_lib.SplitInfo:
  """Writes the examples of `keys` (the examples' distinct int keys; `columns(keys[i:j])` gives
  their features) as TFDS would, and returns the split's SplitInfo."""
  keys = keys[tfds_order(keys, split_name)]
  n = len(keys)
  total_size = sum(int(record_sizes(columns(keys[lo:lo + BLOCK])).sum())
                   for lo in range(0, n, BLOCK))
  num_shards = shard_utils.ShardConfig().get_number_shards(total_size, n)
  ends = shard_utils.get_shard_boundaries(n, num_shards)
  for shard, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
    path = os.fspath(filename_template.sharded_filepath(shard_index=shard, num_shards=num_shards))
    write_shard(path, (columns(keys[start:min(start + BLOCK, hi)]) for start in range(lo, hi, BLOCK)))
  return splits_lib.SplitInfo(
      name=split_name, shard_lengths=[hi - lo for lo, hi in zip([0] + ends[:-1], ends)],
      num_bytes=total_size, filename_template=filename_template)
