"""pipelines.records writes the examples TFDS's own writer writes, in the same order."""

import numpy as np
import pytest
from array_record.python import array_record_data_source
from tensorflow_datasets.core import example_serializer, file_adapters, naming
from tensorflow_datasets.core import writer as writer_lib
from tensorflow_datasets.proto import tf_example_pb2

from configs.base import get_base_config
from pipelines import prepare as prepare_lib
from pipelines import records, splits
from pipelines.schema import PAD


def _tfds_serializer(history_length):
  features = prepare_lib.example_features(history_length)
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  return lambda example: serializer.serialize_example(features.encode_example(example))


def test_serialize_matches_tfds_on_extreme_values():
  rng = np.random.default_rng(0)
  n, length = 500, 7
  shift = lambda high, size: rng.integers(0, high, size) >> rng.integers(0, 62, size)
  columns = dict(
      user_index=shift(2**31 - 1, n).astype(np.int32),
      item_index=np.r_[0, 127, 128, 16383, 16384, 2**31 - 1, shift(2**31, n - 6)].astype(np.int32),
      timestamp=np.r_[-1, -(2**63), 2**63 - 1, shift(2**62, n - 3) * rng.choice([-1, 1], n - 3)],
      weight=rng.standard_normal(n).astype(np.float32),
      history=shift(2**31 - 1, (n, length)).astype(np.int32))
  serialized = records.serialize(columns)
  tfds_serialize = _tfds_serializer(length)
  for i in range(n):
    ours = tf_example_pb2.Example.FromString(serialized[i])
    theirs = tfds_serialize({k: v[i] for k, v in columns.items()})
    assert ours == tf_example_pb2.Example.FromString(theirs)
    assert len(serialized[i]) == len(theirs)
  np.testing.assert_array_equal(records.record_sizes(columns), [len(s) for s in serialized])


def _reference_examples(prep, split_id, training_history):
  """The per-example generator the TFDS writer was fed before pipelines.records."""
  length = prep.schema.history_length
  user_history = prep.tables["user.history"]
  example = lambda idx, history: dict(
      user_index=int(prep.user[idx]), item_index=int(prep.item[idx]),
      timestamp=int(prep.timestamp[idx]), weight=float(prep.weight[idx]), history=history)
  if split_id == splits.TRAIN and training_history == "others":
    for idx in np.flatnonzero(prep.split == split_id).tolist():
      history = user_history[prep.user[idx]].copy()
      history[history == prep.item_id_index[prep.item[idx]]] = PAD
      yield idx, example(idx, history)
  elif split_id == splits.TRAIN:
    order = prep.train_order
    sorted_items = prep.item_id_index[prep.item[order]]
    for pos, idx in enumerate(order.tolist()):
      start = prep.train_user_start[pos]
      history = np.full(length, PAD, np.int32)
      for lag in range(1, length + 1):
        if pos - lag >= start:
          history[lag - 1] = sorted_items[pos - lag]
      yield idx, example(idx, history)
  else:
    for idx in np.flatnonzero(prep.split == split_id).tolist():
      yield idx, example(idx, user_history[prep.user[idx]])


def _read(paths):
  source = array_record_data_source.ArrayRecordDataSource([str(p) for p in paths])
  return [tf_example_pb2.Example.FromString(r) for r in source.__getitems__(range(len(source)))]


@pytest.mark.parametrize("split_kind", ["temporal_last_n", "per_user_ratio"])  # before / others
def test_prepared_splits_equal_tfds_writer_output(tmp_path, split_kind):
  cfg = get_base_config().data
  cfg.synthetic.update(num_users=60, num_items=40, num_interactions=3000)
  cfg.split.kind = split_kind
  cfg.history_length = 5
  data = prepare_lib.prepare(cfg, str(tmp_path / "data"))
  settings = data.builder._settings
  raw, _ = prepare_lib.load_raw(settings)
  prep = prepare_lib.prepare_arrays(raw, settings)
  mode = prepare_lib.training_history_mode(settings)
  serialize = _tfds_serializer(cfg.history_length)
  for k, name in enumerate(splits.SPLIT_NAMES):
    template = naming.ShardedFileTemplate(
        data_dir=tmp_path, dataset_name="reference", split=name,
        filetype_suffix="array_record")
    writer = writer_lib.Writer(
        serializer=type("S", (), {"serialize_example": lambda self, example: example})(),
        filename_template=template, hash_salt=name, disable_shuffling=False,
        example_writer=writer_lib.ExampleWriter(file_adapters.FileFormat.ARRAY_RECORD))
    for key, example in _reference_examples(prep, k, mode):
      writer.write(key, serialize(example))
    shard_lengths, num_bytes = writer.finalize()
    info = data.builder.info.splits[name]
    assert (info.shard_lengths, info.num_bytes) == (shard_lengths, num_bytes)
    ours = _read(sorted(tmp_path.glob("data/**/synthetic-" + name + ".array_record-*")))
    theirs = _read(sorted(tmp_path.glob(f"reference-{name}.array_record-*")))
    assert len(ours) == len(theirs) == data.schema.split_sizes[name] > 0
    assert ours == theirs
