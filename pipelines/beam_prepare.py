"""The preparation of interaction logs as an Apache Beam pipeline (DirectRunner here; Dataflow,
Flink or Spark on a cluster), giving the same dataset as the in-process path (pipelines/prepare.py).

The stages, each a Beam transform over blocks of rows (dicts of numpy columns, never one element
per interaction):

  files ─ read ─► blocks ─ by user bucket ─► groups of whole users
    groups ─ count, split ─► one row per user, per-item partial counts ─ by item bucket ─► one row
      per item
    users + items ─ one worker ─► the catalog: vocabularies (or the ID registry's rows), feature
      tables (catalog_tables)
    groups + catalog ─► examples (history_order, _example_columns: the in-process functions),
      each user's latest history, the evaluation pairs
    examples ─ by shard (a range of TFDS's md5 order) ─► ArrayRecord shards (records.write_shard)

The split is computed per user (temporal_last_n) or read (predefined): the kinds that need no
global view. Rows keep their read position (file, row), which breaks timestamp ties as the
in-process path does and gives each example the same key, hence the same md5 order: each shard
holds one range of md5 values, sorted, so the concatenated shards are in exactly TFDS's order;
only where the shard boundaries fall differs. Memory per worker grows with the users of a bucket
(user groups), the shard it writes, and the catalog (the distinct users and items), not with the
number of interactions.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import tempfile
import zlib
from typing import Any, Iterator

import apache_beam as beam
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.core.utils import shard_utils

from pipelines import logs, records, splits
from pipelines import prepare as prepare_lib
from pipelines.histories import CarriedHistories, with_carried
from pipelines.schema import PAD, Schema
from pipelines.sources import DataError, RawFeature
from two_tower.errors import UserError
from two_tower.registry import Registry

# Groups of whole users, the unit of the per-user work: at least USER_BUCKETS, and about
# ROWS_PER_BUCKET interactions each (estimated from the input), so that a group fits a worker.
USER_BUCKETS = 64
ROWS_PER_BUCKET = 2_000_000
_CSV_BYTES_PER_ROW = 24  # the estimate for text files: a few short fields
ITEM_BUCKETS = 16
_POSITION_BITS = 40  # position = file index << 40 | row in the file
_SUPPORTED_SPLITS = ("temporal_last_n", "predefined")
Block = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- checks


def check_supported(cfg: ml_collections.ConfigDict) -> None:
  """The settings the Beam path prepares; anything else needs the whole data in one process."""
  if cfg.source != "logs":
    raise UserError(f"the Beam path prepares data.source='logs', not {cfg.source!r}: run without "
                    "--beam_runner to prepare this source in one process")
  if cfg.split.kind not in _SUPPORTED_SPLITS:
    raise UserError(
        f"the Beam path computes the split per user or reads it, so data.split.kind must be one "
        f"of {_SUPPORTED_SPLITS}, not {cfg.split.kind!r} (which needs every interaction in one "
        "process): change the split or run without --beam_runner")
  unsupported = [key for key, on in (("data.weight_column", cfg.weight_column),
                                     ("data.logs.validation_from_train",
                                      cfg.logs.get("validation_from_train"))) if on]
  prepare_lib.check_carried_history(cfg)
  if unsupported:
    raise UserError(f"the Beam path does not support {', '.join(unsupported)}: unset it or run "
                    "without --beam_runner")


# ----------------------------------------------------------------------------- reading


def _text(values: pa.Array) -> np.ndarray:
  """Each value's text, as the in-process dictionaries give it (integers in decimal)."""
  if pa.types.is_integer(values.type):
    values = values.cast(pa.int64())
  return values.cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)


def _concat(blocks) -> Block:
  blocks = list(blocks)
  return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _take(block: Block, idx: np.ndarray) -> Block:
  return {k: v[idx] for k, v in block.items()}


def read_file(entry: tuple[int, str, int | None], logs_cfg: dict) -> Iterator[Block]:
  """The rows of one log file in bounded blocks: IDs and categories as text, numbers, the read
  position; bad values raise logs' DataErrors naming the file and row."""
  file_index, path, file_split = entry
  cfg = ml_collections.ConfigDict(logs_cfg)
  fmt = _file_format(path, cfg)
  base = np.int64(file_index) << _POSITION_BITS
  if fmt == "adjacency":
    users, items = logs._read_adjacency(path)
    for lo in range(0, len(users), logs.BATCH_ROWS):
      n = len(users[lo:lo + logs.BATCH_ROWS])
      block = dict(user_id=users[lo:lo + n].astype(str), item_id=items[lo:lo + n].astype(str),
                   timestamp=np.zeros(n, np.int64), weight=np.ones(n, np.float32),
                   position=base + lo + np.arange(n, dtype=np.int64))
      if file_split is not None:
        block["split"] = np.full(n, file_split, np.int8)
      yield block
    return
  declared, needed = logs.columns_to_read(cfg)
  num_rows = 0
  for row0, batch in logs._batches(path, fmt, "\t" if fmt == "tsv" else ",", list(needed)):
    column = lambda name: logs._Column(batch, name, path, row0)
    n = batch.num_rows
    block = dict(user_id=_text(column(cfg.user_id).ids("user ID")),
                 item_id=_text(column(cfg.item_id).ids("item ID")),
                 timestamp=column(cfg.timestamp).integers().astype(np.int64),
                 weight=column(cfg.weight).numbers() if cfg.weight else np.ones(n, np.float32),
                 position=base + row0 + np.arange(n, dtype=np.int64))
    if cfg.get("split_column", ""):
      block["split"] = column(cfg.split_column).splits()
    elif file_split is not None:
      block["split"] = np.full(n, file_split, np.int8)
    for side in ("user", "item"):
      for kind, name in declared[side]:
        if kind == "numeric":
          block[f"f:{name}"] = column(name).numbers()
        elif kind == "multi":
          block[f"f:{name}"] = _text(column(name).bags())
        else:
          block[f"f:{name}"] = _text(column(name).categories())
    num_rows += n
    yield block
  if num_rows == 0:
    raise DataError(f"input file {path} has a header but no rows: it holds no interactions; "
                    "remove it from data.logs.files or regenerate it")


def holds_no_interactions(cfg: ml_collections.ConfigDict) -> bool:
  """Whether every interaction file of config.data `cfg` is empty (data.logs.allow_empty: a
  nightly day without interactions, which has nothing to distribute). Reads at most one batch of
  each file."""
  logs_cfg = cfg.logs
  if not logs_cfg.get("allow_empty") or logs_cfg.format.lower() == "adjacency":
    return False
  for path, _ in logs.log_files(logs_cfg, cfg.source_dir):
    fmt = _file_format(path, logs_cfg)
    for _, batch in logs._batches(path, fmt, "\t" if fmt == "tsv" else ",", [logs_cfg.user_id]):
      if batch.num_rows:
        return False
  return True


def _file_format(path: str, logs_cfg) -> str:
  """A file's format, as the in-process reader takes it: by its extension, else data.logs.format."""
  fmt = logs_cfg.format.lower()
  return fmt if fmt == "adjacency" else logs.file_format(path, fmt)


def num_user_buckets(files: list[tuple[str, Any]], logs_cfg) -> int:
  """USER_BUCKETS, or more for an input of more than USER_BUCKETS * ROWS_PER_BUCKET rows (Parquet:
  the footers' row counts; text: the file sizes)."""
  rows = 0
  for path, _ in files:
    fs, inner = logs._filesystem(path)
    if _file_format(path, logs_cfg) == "parquet":
      rows += pq.read_metadata(inner, filesystem=fs).num_rows
    else:
      rows += fs.get_file_info(inner).size // _CSV_BYTES_PER_ROW
  return max(USER_BUCKETS, -(-rows // ROWS_PER_BUCKET))


def _buckets(ids: np.ndarray, num_buckets: int) -> np.ndarray:
  """A stable bucket of each ID (crc32 of its text), computed once per distinct ID."""
  uniq, inverse = np.unique(ids, return_inverse=True)
  return np.array([zlib.crc32(u.encode()) % num_buckets for u in uniq.tolist()],
                  np.int64)[inverse]


def _by_bucket(block: Block, key: str, num_buckets: int) -> Iterator[tuple[int, Block]]:
  bucket = _buckets(block[key], num_buckets)
  for b in np.unique(bucket).tolist():
    yield b, _take(block, np.flatnonzero(bucket == b))


def _in_read_order(blocks) -> Block:
  block = _concat(blocks)
  return _take(block, np.argsort(block["position"], kind="stable"))


def _latest(codes: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
  """Per code (ascending), the index of its latest row: greatest timestamp, then the last read
  (rows in read order), as pipelines.logs picks an entity's features."""
  order = splits.order_by(codes, timestamp)
  return order[np.r_[codes[order][1:] != codes[order][:-1], True]]


def _split(block: Block, user: np.ndarray, split_cfg) -> np.ndarray:
  return splits.assign(user, block["timestamp"], split_cfg, given=block.get("split"))


# ----------------------------------------------------------------------------- counting


def summarize_users(item: tuple[int, Any], split_cfg, feature_keys: dict[str, list[str]]):
  """One bucket of whole users → (one row per user: ID, in training, its latest features), and
  per-item partial rows (item bucket, {ID, training count, latest row and features})."""
  _, blocks = item
  block = _in_read_order(blocks)
  user_ids, user = np.unique(block["user_id"], return_inverse=True)
  split = _split(block, user, split_cfg)
  train = split == splits.TRAIN
  last = _latest(user, block["timestamp"])
  users = {"user_id": user_ids, "in_train": np.bincount(user[train], minlength=len(user_ids)) > 0}
  users.update({k: block[k][last] for k in feature_keys["user"]})
  yield beam.pvalue.TaggedOutput("users", users)
  yield beam.pvalue.TaggedOutput("counts", np.bincount(split, minlength=len(splits.SPLIT_NAMES)))
  item_ids, item = np.unique(block["item_id"], return_inverse=True)
  last = _latest(item, block["timestamp"])
  items = {"item_id": item_ids, "train_count": np.bincount(item[train], minlength=len(item_ids)),
           "timestamp": block["timestamp"][last], "position": block["position"][last]}
  items.update({k: block[k][last] for k in feature_keys["item"]})
  yield from (beam.pvalue.TaggedOutput("items", kv) for kv in _by_bucket(items, "item_id", ITEM_BUCKETS))


def summarize_items(item: tuple[int, Any]) -> Block:
  """The partial rows of one bucket of items → one row per item."""
  _, blocks = item
  block = _in_read_order(blocks)
  item_ids, item = np.unique(block["item_id"], return_inverse=True)
  last = _latest(item, block["timestamp"])
  out = {k: v[last] for k, v in block.items() if k not in ("train_count", "timestamp", "position")}
  out["train_count"] = np.bincount(item, weights=block["train_count"], minlength=len(item_ids))
  return out


def _raw_table(rows: Block, side: str, raw_features, multi_separators: dict[str, str]) -> dict:
  table: dict[str, Any] = {f"{side}_id": rows[f"{side}_id"]}
  for f in raw_features:
    if f.side != side:
      continue
    values = rows[f"f:{f.name}"]
    if f.kind == "multi":
      sep = multi_separators[f.name]
      values = [[t for t in bag.split(sep) if t] for bag in values.tolist()]
    table[f.name] = values
  return table


def _read(path: str) -> io.BytesIO:
  """A whole file, read where the worker runs (local, GCS, ...) through Beam's file systems."""
  with FileSystems.open(path) as f:
    return io.BytesIO(f.read())


def _entity_table(cfg: ml_collections.ConfigDict, side: str) -> dict[str, Any]:
  """The user or item table file of config.data `cfg`, read on this worker (through pyarrow's
  file systems, like the interaction files; its size grows with the catalog, as this stage's)."""
  return logs.entity_table(cfg.logs, side, logs.resolve_path(cfg.logs[f"{side}_table"],
                                                             cfg.source_dir))


def build_catalog(user_rows: list[Block], item_rows: list[Block], split_counts, cfg_json: str,
                  raw_features, multi_separators) -> dict[str, Any]:
  """The catalog from one row per user and item (on one worker: it grows with the distinct users
  and items): the tables and Features of catalog_tables, as in-process."""
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  users = _concat(user_rows)
  users = _take(users, np.argsort(users["user_id"], kind="stable"))
  items = _concat(item_rows)
  items = _take(items, np.argsort(items["item_id"], kind="stable"))
  counts = np.sum(split_counts, axis=0)
  if counts[splits.TRAIN] == 0:
    raise DataError("the split left no training interactions: check data.split")
  # A nightly day's registry and carried histories: read where the worker runs (local, GCS, ...).
  registry = Registry.load(_read(cfg.id_registry)) if cfg.get("id_registry") else None
  user_table = _raw_table(users, "user", raw_features, multi_separators)
  item_table = _raw_table(items, "item", raw_features, multi_separators)
  in_train, train_count = users["in_train"], items["train_count"].astype(np.int64)
  # Today's user and item tables (data.logs.user_table / item_table): their features win, and
  # their entities without interactions (tonight's new items) join the catalog, as in process.
  if cfg.logs.get("user_table"):
    user_table, rows = logs.merge_entities(user_table, _entity_table(cfg, "user"), "user",
                                           raw_features)
    in_train = np.zeros(len(user_table["user_id"]), bool)
    in_train[rows] = users["in_train"]
  if cfg.logs.get("item_table"):
    item_table, rows = logs.merge_entities(item_table, _entity_table(cfg, "item"), "item",
                                           raw_features)
    train_count = np.zeros(len(item_table["item_id"]), np.int64)
    train_count[rows] = items["train_count"]
  tables, features = prepare_lib.catalog_tables(user_table, item_table, raw_features, in_train,
                                                train_count, cfg, registry)
  schema = Schema(tuple(features), len(user_table["user_id"]), len(item_table["item_id"]),
                  cfg.history_length,
                  {name: int(counts[k]) for k, name in enumerate(splits.SPLIT_NAMES)})
  carried = None
  if cfg.get("carried_history"):
    carried = CarriedHistories.load(_read(cfg.carried_history)).rows(
        user_table["user_id"], registry.vocab("item_id"), cfg.history_length)
  return dict(tables=tables, schema=schema, carried=carried)


# ----------------------------------------------------------------------------- examples


def _rows(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
  return np.searchsorted(sorted_ids, ids).astype(np.int32)


def user_examples(item: tuple[int, Any], catalog: dict, file_offsets: dict[int, int], split_cfg,
                  mode: str, user_weight_exponent: float):
  """One bucket of whole users → its examples per split (blocks with their TFDS key), its users'
  latest histories and its evaluation pairs, with the in-process functions on local arrays."""
  _, blocks = item
  block = _in_read_order(blocks)
  tables, schema = catalog["tables"], catalog["schema"]
  user_rows = _rows(tables["user.raw_id"], block["user_id"])
  local_rows, user = np.unique(user_rows, return_inverse=True)
  item_rows = _rows(tables["item.raw_id"], block["item_id"])
  split = _split(block, user, split_cfg)
  item_id_index = tables["item.item_id"]
  order, user_start, position, history = prepare_lib.history_order(
      user, item_rows, block["timestamp"], split == splits.TRAIN, len(local_rows), item_id_index,
      schema.history_length)
  carried = None
  if catalog["carried"] is not None:
    carried = catalog["carried"][local_rows]
    history = with_carried(history, carried)
  prep = prepare_lib._Prepared(
      schema=schema, tables={"user.history": history}, user=user, item=item_rows,
      timestamp=block["timestamp"],
      # A bucket holds its users whole, so their training counts are complete here.
      weight=prepare_lib.balance_users(block["weight"], user, split == splits.TRAIN,
                                       user_weight_exponent),
      split=split, train_order=order,
      train_user_start=user_start, train_position=position, item_id_index=item_id_index,
      carried=carried)
  file_index = block["position"] >> _POSITION_BITS
  offsets = np.array([file_offsets[f] for f in range(int(file_index.max()) + 1)], np.int64)
  keys = offsets[file_index] + (block["position"] & ((1 << _POSITION_BITS) - 1))
  yield beam.pvalue.TaggedOutput("histories", (local_rows, history))
  for k, name in enumerate(splits.SPLIT_NAMES):
    idx = np.flatnonzero(split == k)
    if not len(idx):
      continue
    yield beam.pvalue.TaggedOutput("pairs", (k, keys[idx], local_rows[user[idx]], item_rows[idx]))
    for lo in range(0, len(idx), records.BLOCK):
      part = idx[lo:lo + records.BLOCK]
      columns = prepare_lib._example_columns(prep, k, mode, part)
      columns["user_index"] = local_rows[columns["user_index"]]
      columns["key"] = keys[part]
      yield name, columns


def _size(item: tuple[str, Block]) -> tuple[str, np.ndarray]:
  name, columns = item
  return name, np.array([len(columns["key"]), int(records.record_sizes(columns).sum())], np.int64)


def num_shards(n_and_bytes: np.ndarray) -> int:
  n, total = (int(v) for v in n_and_bytes)
  return shard_utils.ShardConfig().get_number_shards(total, n)


def _by_shard(item: tuple[str, Block], sizes: dict[str, np.ndarray]):
  """Cuts a block by shard: shard s holds the s-th of num_shards equal ranges of md5 values."""
  name, columns = item
  words = records.tfds_hashes(columns["key"], name)
  shards = ((words[:, 0] >> np.uint64(32)) * np.uint64(num_shards(sizes[name]))) >> np.uint64(32)
  columns["hash_high"], columns["hash_low"] = words[:, 0], words[:, 1]
  for s in np.unique(shards).tolist():
    yield (name, s), _take(columns, np.flatnonzero(shards == s))


def _destination(path: str):
  """Writes bytes to a local path or, through Beam's file systems, to a remote one (gs://...)."""
  if "://" not in path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "wb")
  return FileSystems.create(path)


def write_shard(item, templates: dict, sizes: dict[str, np.ndarray]) -> tuple[str, int, int, int]:
  """Sorts a shard's examples by md5 and writes them; returns (split, shard, examples, bytes)."""
  (name, shard), blocks = item
  columns = _concat(blocks)
  columns = _take(columns, records.hash_order(np.stack([columns.pop("hash_high"),
                                                         columns.pop("hash_low")], axis=1)))
  del columns["key"]
  blocks = [{k: v[lo:lo + records.BLOCK] for k, v in columns.items()}
            for lo in range(0, len(columns["user_index"]), records.BLOCK)]
  _write_records(_shard_path(templates[name], shard, num_shards(sizes[name])), blocks)
  return name, shard, len(columns["user_index"]), int(records.record_sizes(columns).sum())


def _write_records(path: str, blocks) -> None:
  """records.write_shard to a local path, or to a local file then copied to a remote one."""
  if "://" not in path:
    records.write_shard(path, blocks)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "shard")
    records.write_shard(local, blocks)
    with open(local, "rb") as src, _destination(path) as dst:
      dst.write(src.read())


def _shard_path(template, shard: int, count: int) -> str:
  return os.fspath(template.sharded_filepath(shard_index=shard, num_shards=count))


def _npy_bytes(value: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, value, allow_pickle=False)
  return buf.getvalue()


def finish(catalog: dict, histories: list, pairs: list, shards: list, sizes: dict, templates: dict,
           path: str) -> None:
  """Writes the tables (with each user's latest history), the pairs, schema.json, any shard that
  received no example, and the shard lengths for the launcher (`_beam_splits.json`)."""
  schema = catalog["schema"]
  tables = dict(catalog["tables"])
  # Users without interactions here keep their carried history, as in process.
  history = (np.full((schema.num_users, schema.history_length), PAD, np.int32)
             if catalog["carried"] is None else catalog["carried"].copy())
  for rows, values in histories:
    history[rows] = values
  tables["user.history"] = history
  for key, value in tables.items():
    with _destination(f"{path}/tables/{key}.npy") as f:
      f.write(_npy_bytes(value))
  for k, name in enumerate(splits.SPLIT_NAMES):
    parts = [p for p in pairs if p[0] == k]
    keys = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    user = np.concatenate([p[2] for p in parts])[order] if parts else np.zeros(0, np.int32)
    item = np.concatenate([p[3] for p in parts])[order] if parts else np.zeros(0, np.int32)
    buf = io.BytesIO()
    np.savez(buf, user=user.astype(np.int32), item=item.astype(np.int32))
    with _destination(f"{path}/pairs/{name}.npz") as f:
      f.write(buf.getvalue())
  with _destination(f"{path}/schema.json") as f:
    f.write(schema.to_json().encode())
  lengths = {}
  for name, n_and_bytes in sizes.items():
    count = num_shards(n_and_bytes)
    lengths[name] = [0] * count
    for split_name, shard, n, _ in shards:
      if split_name == name:
        lengths[name][shard] = n
    for shard in range(count):
      if lengths[name][shard] == 0:  # a range of md5 values that no key fell in
        _write_records(_shard_path(templates[name], shard, count), [])
  summary = {name: {"shard_lengths": lengths[name], "num_bytes": int(sizes[name][1])}
             for name in lengths}
  with _destination(f"{path}/_beam_splits.json") as f:
    f.write(json.dumps(summary).encode())


# ----------------------------------------------------------------------------- the pipeline


def build_pipeline(pipeline: beam.Pipeline, cfg: ml_collections.ConfigDict, path: str,
                   templates: dict) -> None:
  """Adds the preparation of `cfg` (config.data), written into `path`, to `pipeline`."""
  check_supported(cfg)
  files = logs.log_files(cfg.logs, cfg.source_dir)
  declared, needed = logs.columns_to_read(cfg.logs)
  list_columns: set[str] = set()
  if cfg.logs.format.lower() != "adjacency":  # schemas (footers, headers) checked before running
    formats = {p: _file_format(p, cfg.logs) for p, _ in files}
    schemas = {p: logs._file_schema(p, formats[p], "\t" if formats[p] == "tsv" else ",")
               for p, _ in files}
    logs._check_schemas(schemas, needed)
    list_columns = {name for side in declared for kind, name in declared[side]
                    if kind == "multi" and logs._type_kind(schemas[files[0][0]][name]) == "list"}
  raw_features = tuple(RawFeature(n, side, k) for side in ("user", "item") for k, n in declared[side])
  separators = {f.name: logs._LIST_SEPARATOR if f.name in list_columns else cfg.logs.multi_separator
                for f in raw_features if f.kind == "multi"}
  feature_keys = {side: [f"f:{f.name}" for f in raw_features if f.side == side]
                  for side in ("user", "item")}
  cfg_json = json.dumps(cfg.to_dict())
  user_buckets = num_user_buckets(files, cfg.logs)
  mode = prepare_lib.training_history_mode(cfg)
  logs_cfg = cfg.logs.to_dict()

  blocks = (pipeline
            | "Files" >> beam.Create([(i, p, s) for i, (p, s) in enumerate(files)])
            | "ReshuffleFiles" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(read_file, logs_cfg))
  file_rows = (blocks
               | "RowsPerFile" >> beam.Map(lambda b: (int(b["position"][0] >> _POSITION_BITS),
                                                      len(b["position"])))
               | "SumRows" >> beam.CombinePerKey(sum)
               | "Offsets" >> beam.combiners.ToList()
               | "Cumulative" >> beam.Map(_offsets, len(files)))
  groups = (blocks
            | "ByUser" >> beam.FlatMap(_by_bucket, "user_id", user_buckets)
            | "GroupUsers" >> beam.GroupByKey())
  summary = groups | "Count" >> beam.FlatMap(
      summarize_users, cfg.split, feature_keys).with_outputs("users", "counts", "items")
  items = (summary.items
           | "GroupItems" >> beam.GroupByKey()
           | "CountItems" >> beam.Map(summarize_items))
  catalog = (pipeline
             | "One" >> beam.Create([None])
             | "Catalog" >> beam.Map(
                 lambda _, users, items, counts: build_catalog(
                     users, items, counts, cfg_json, raw_features, separators),
                 beam.pvalue.AsList(summary.users), beam.pvalue.AsList(items),
                 beam.pvalue.AsList(summary.counts)))
  examples = groups | "Examples" >> beam.FlatMap(
      user_examples, beam.pvalue.AsSingleton(catalog), beam.pvalue.AsSingleton(file_rows),
      cfg.split, mode, cfg.get("user_weight_exponent", 0.0)
  ).with_outputs("histories", "pairs", main="examples")
  sizes = (examples.examples
           | "Sizes" >> beam.Map(_size)
           | "SumSizes" >> beam.CombinePerKey(lambda values: np.sum(list(values), axis=0)))
  sizes = beam.pvalue.AsDict(sizes)
  shards = (examples.examples
            | "ByShard" >> beam.FlatMap(_by_shard, sizes)
            | "GroupShards" >> beam.GroupByKey()
            | "Write" >> beam.Map(write_shard, templates, sizes))
  _ = (pipeline
       | "Last" >> beam.Create([None])
       | "Finish" >> beam.Map(
           lambda _, catalog, histories, pairs, shards, sizes: finish(
               catalog, histories, pairs, shards, sizes, templates, path),
           beam.pvalue.AsSingleton(catalog), beam.pvalue.AsList(examples.histories),
           beam.pvalue.AsList(examples.pairs), beam.pvalue.AsList(shards), sizes))


def _offsets(rows_per_file: list[tuple[int, int]], num_files: int) -> dict[int, int]:
  """The key of each file's first row: the rows read before it (files in order)."""
  rows = dict(rows_per_file)
  offsets, total = {}, 0
  for f in range(num_files):
    offsets[f] = total
    total += rows.get(f, 0)
  return offsets


def pipeline_options(runner: str, options: str) -> PipelineOptions:
  return PipelineOptions(shlex.split(options or ""), runner=runner)


def run(cfg: ml_collections.ConfigDict, path: str, templates: dict, runner: str,
        options: str) -> list[splits_lib.SplitInfo]:
  """Runs the preparation of `cfg` into `path` (the build's incomplete.* directory) on `runner`
  and returns the SplitInfos TFDS records."""
  pipeline = beam.Pipeline(options=pipeline_options(runner, options))
  build_pipeline(pipeline, cfg, path, templates)
  try:
    pipeline.run().wait_until_finish()
  except Exception as e:  # a DataError raised on a worker comes back wrapped by the runner
    message = str(e)
    if "DataError: " in message:
      raise DataError(message.split("DataError: ", 1)[1].splitlines()[0]) from None
    raise
  with FileSystems.open(f"{path}/_beam_splits.json") as f:
    summary = json.loads(f.read().decode())
  FileSystems.delete([f"{path}/_beam_splits.json"])
  return [splits_lib.SplitInfo(name=name, shard_lengths=summary[name]["shard_lengths"],
                               num_bytes=summary[name]["num_bytes"],
                               filename_template=templates[name])
          for name in splits.SPLIT_NAMES if name in summary]
