"""Interaction logs (CSV, TSV, Parquet or adjacency files) read in bounded batches.

No file is read whole and no raw row becomes a Python object: each batch of rows (a Parquet batch,
a CSV block) turns into compact per-interaction columns (int32 codes of the user, the item and each
categorical / token-bag feature, int64 timestamps, float32 weights and numbers, int8 splits), and
every distinct value (an ID, a category, a token bag) is held once, in a dictionary that grows
with the distinct values. Memory is about 20 bytes per interaction plus 4 per feature, plus the
distinct values. The user and item tables are built from those codes at the end: one row per
entity in ascending ID order, its features from its latest interaction, unless a user or item
table (data.logs.user_table / item_table) gives them, and the entities without interactions.

Every problem is a DataError naming the file, the column and, for a bad value, its row (1-based,
the header not counted), found before anything is written.
"""

from __future__ import annotations

import difflib
import gzip
import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import splits
from pipelines.sources import DataError, RawData, RawFeature

LOG_FORMATS = ("csv", "tsv", "parquet", "adjacency")
BATCH_ROWS = 1 << 20  # Parquet rows per batch
CSV_BLOCK_BYTES = 32 << 20  # CSV bytes per batch
_LIST_SEPARATOR = "\x1f"  # joins the tokens of a list-typed column into one value per row


def _paths(value) -> list[str]:
  return [value] if isinstance(value, str) else list(value)


def resolve_path(path: str, base_dir: str) -> str:
  """`path`, read from `base_dir` (data.source_dir) when relative."""
  return os.path.join(base_dir, path) if base_dir and not os.path.isabs(path) else path


def log_files(cfg, base_dir: str = "") -> list[tuple[str, int | None]]:
  """(path, split) of every file to read, in order: the split is TRAIN / VALIDATION / TEST for
  data.logs.split_files, else None. Relative paths are read from `base_dir` (data.source_dir)."""
  resolve = lambda path: resolve_path(path, base_dir)
  split_files = cfg.get("split_files") or {}
  by_split = {name: _paths(split_files.get(name, ())) for name in splits.SPLIT_NAMES}
  files = _paths(cfg.files)
  if any(by_split.values()):
    if files or cfg.get("split_column"):
      raise DataError(
          "data.logs.split_files gives each split its own files; it cannot be combined with "
          "data.logs.files or data.logs.split_column: keep one way of naming the splits")
    if not by_split["train"]:
      raise DataError("data.logs.split_files.train is empty: list the training files")
    return [(resolve(p), splits.split_id(name)) for name in splits.SPLIT_NAMES for p in by_split[name]]
  if not files:
    raise DataError("data.logs.files is empty: list the CSV, TSV, Parquet or adjacency files to "
                    "read (or data.logs.split_files, one set of files per split)")
  return [(resolve(p), None) for p in files]


# ----------------------------------------------------------------------------- dictionaries


class _Dictionary:
  """Distinct values in order of first appearance; a batch of values -> int32 codes. Integer
  values are kept as integers (hashing them is far cheaper than hashing their text), anything
  else as strings; `values()` gives their text either way, as str() does."""

  def __init__(self):
    self._values: pa.Array | None = None

  def encode(self, values: pa.Array) -> np.ndarray:
    values = values.cast(pa.int64()) if pa.types.is_integer(values.type) else values
    if self._values is None:
      self._values = pa.array([], values.type)
    if values.type != self._values.type:  # integers in one batch, text in another
      self._values, values = self._values.cast(pa.string()), values.cast(pa.string())
    distinct = pc.unique(values)
    new = distinct.filter(pc.invert(pc.is_in(distinct, value_set=self._values)))
    if len(new):
      self._values = pa.concat_arrays([self._values, new])
    return pc.index_in(values, value_set=self._values).to_numpy(zero_copy_only=False).astype(np.int32)

  def values(self) -> np.ndarray:
    if self._values is None:
      return np.array([], str)
    return self._values.cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)


def _sorted_codes(codes: np.ndarray, dictionary: _Dictionary) -> tuple[np.ndarray, np.ndarray]:
  """(codes renumbered so that their order is the values' order, the values in that order)."""
  values = dictionary.values()
  order = np.argsort(values, kind="stable")
  rank = np.empty(len(order), np.int32)
  rank[order] = np.arange(len(order), dtype=np.int32)
  return rank[codes], values[order]


# ----------------------------------------------------------------------------- reading files


def _type_kind(t: pa.DataType) -> str:
  if pa.types.is_integer(t):
    return "integer"
  if pa.types.is_floating(t) or pa.types.is_decimal(t):
    return "floating-point"
  if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
    return "string"
  if pa.types.is_list(t) or pa.types.is_large_list(t):
    return "list"
  return str(t)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
  """The file system of a local path or a URI (gs://, s3://, hdfs://: the cluster paths)."""
  if "://" in path:
    return pafs.FileSystem.from_uri(path)
  return pafs.LocalFileSystem(), os.path.abspath(path)


def _file_schema(path: str, fmt: str, delimiter: str) -> dict[str, pa.DataType]:
  """The columns of a file and their types (CSV: all strings, converted column by column)."""
  fs, inner = _filesystem(path)
  info = fs.get_file_info(inner)
  if info.type != pafs.FileType.File:
    raise DataError(f"input file {path} does not exist: fix data.logs.files")
  if info.size == 0:
    raise DataError(f"input file {path} is empty: remove it from data.logs.files or regenerate it")
  try:
    if fmt == "parquet":
      schema = pq.read_schema(inner, filesystem=fs)
      return {f.name: f.type for f in schema}
    reader = pa_csv.open_csv(fs.open_input_stream(inner),
                             read_options=pa_csv.ReadOptions(block_size=1 << 20),
                             parse_options=pa_csv.ParseOptions(delimiter=delimiter))
    return {name: pa.string() for name in reader.schema.names}
  except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read {path} as {fmt}: the file is corrupt, truncated or not {fmt} "
                    f"(rewrite it, or remove it from data.logs.files). The reader says: {e}") from e


def _check_schemas(schemas: dict[str, dict[str, pa.DataType]], needed: dict[str, str]) -> None:
  """Every file has every needed column (`needed`: column -> the config key naming it), with
  the same kind of type."""
  paths = list(schemas)
  for name, role in needed.items():
    having = [p for p in paths if name in schemas[p]]
    if not having:
      columns = list(schemas[paths[0]])
      close = difflib.get_close_matches(name, columns, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise DataError(
          f"column {name!r} (set by {role}) is missing from {paths[0]}; its columns are "
          f"{columns}.{hint} Fix the schema in the config or the file.")
    if len(having) < len(paths):
      lacking = next(p for p in paths if name not in schemas[p])
      raise DataError(
          f"the input files disagree on their columns: {having[0]} has column {name!r} (set by "
          f"{role}) but {lacking} does not (its columns are {list(schemas[lacking])}): write every "
          "file with the same columns, or remove the odd one from the config")
    kinds = {p: _type_kind(schemas[p][name]) for p in paths}
    odd = [p for p in paths if kinds[p] != kinds[paths[0]]]
    if odd:
      raise DataError(
          f"the input files disagree on the type of column {name!r} (set by {role}): it holds "
          f"{kinds[paths[0]]} values ({schemas[paths[0]][name]}) in {paths[0]} but "
          f"{kinds[odd[0]]} values ({schemas[odd[0]][name]}) in {odd[0]}: write the column with "
          "one type in every file")


def _batches(path: str, fmt: str, delimiter: str, columns: list[str]
             ) -> Iterator[tuple[int, pa.RecordBatch]]:
  """(index of the batch's first row, batch) of the `columns` of a file, in bounded batches."""
  row = 0
  try:
    fs, inner = _filesystem(path)
    if fmt == "parquet":
      reader = pq.ParquetFile(fs.open_input_file(inner)).iter_batches(
          batch_size=BATCH_ROWS, columns=columns)
    else:
      reader = pa_csv.open_csv(
          fs.open_input_stream(inner), read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
          parse_options=pa_csv.ParseOptions(delimiter=delimiter),
          convert_options=pa_csv.ConvertOptions(
              column_types={c: pa.string() for c in columns}, include_columns=columns,
              strings_can_be_null=False))
    for batch in reader:
      yield row, batch
      row += batch.num_rows
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(
        f"cannot read {path} as {fmt} after row {row}: the file is corrupt or truncated (rewrite "
        f"it, or remove it from data.logs.files). The reader says: {e}") from e


def _first_bad(values: list, ok) -> int:
  return next((i for i, v in enumerate(values) if not ok(v)), 0)


def _is_number(v) -> bool:
  try:
    float(v)
    return True
  except (TypeError, ValueError):
    return False


def _is_integer(v) -> bool:
  try:
    int(str(v))
    return v is not None
  except ValueError:
    return False


class _Column:
  """Converts one column of a batch, naming the file, the column and the row on bad values."""

  def __init__(self, batch: pa.RecordBatch, name: str, path: str, row0: int):
    self.values = batch.column(name)
    self.name, self.path, self.row0 = name, path, row0

  def _null_row(self) -> int | None:
    if self.values.null_count:
      return self.row0 + int(np.argmax(self.values.is_null().to_numpy(zero_copy_only=False))) + 1
    return None

  def ids(self, what: str) -> pa.Array:
    row = self._null_row()
    if row is not None:
      raise DataError(f"column {self.name!r} of {self.path} has no value at row {row}: every "
                      f"interaction needs its {what}; fill or drop those rows")
    if pa.types.is_integer(self.values.type) or pa.types.is_string(self.values.type):
      return self.values
    return pc.cast(self.values, pa.string())

  def integers(self) -> np.ndarray:
    try:
      if self._null_row() is None:
        return pc.cast(self.values, pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      pass
    values = self.values.to_pylist()  # one bounded batch, to find the bad row
    row = _first_bad(values, _is_integer)
    raise DataError(
        f"column {self.name!r} of {self.path} must hold integer timestamps (e.g. Unix seconds) but "
        f"row {self.row0 + row + 1} holds {values[row]!r}: convert them before preparing the data")

  def numbers(self) -> np.ndarray:
    try:
      values = pc.cast(self.values, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      text = self.values.to_pylist()
      row = _first_bad(text, _is_number)
      raise DataError(
          f"column {self.name!r} of {self.path} must be numeric but row {self.row0 + row + 1} holds "
          f"{text[row]!r}: fix the value, or declare the column as categorical in the config"
      ) from None
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
      raise DataError(
          f"column {self.name!r} of {self.path} has a missing or non-finite value (NaN/inf) at row "
          f"{self.row0 + bad[0] + 1}: fill or drop those rows before preparing the data")
    return values.astype(np.float32)

  def categories(self) -> pa.Array:
    if pa.types.is_integer(self.values.type) and not self.values.null_count:
      return self.values
    return pc.fill_null(pc.cast(self.values, pa.string()), "None")  # as str(None) always did

  def bags(self) -> pa.Array:
    """Each row's token bag as one string (a list column's tokens joined by _LIST_SEPARATOR)."""
    if pa.types.is_list(self.values.type) or pa.types.is_large_list(self.values.type):
      tokens = pc.cast(self.values, pa.list_(pa.string()))
      return pc.fill_null(pc.binary_join(tokens, _LIST_SEPARATOR), "")
    return pc.fill_null(pc.cast(self.values, pa.string()), "")

  def splits(self) -> np.ndarray:
    text = pc.fill_null(pc.cast(self.values, pa.string()), "")
    out = pc.index_in(text, value_set=pa.array(splits.SPLIT_NAMES))
    if out.null_count:
      row = int(np.argmax(out.is_null().to_numpy(zero_copy_only=False)))
      raise DataError(
          f"column {self.name!r} (data.logs.split_column) of {self.path} must hold train, "
          f"validation or test, but row {self.row0 + row + 1} holds {text[row].as_py()!r}: rename "
          "those values")
    return out.to_numpy(zero_copy_only=False).astype(np.int8)


def _read_adjacency(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(user IDs, item IDs) of an adjacency file: one line per user, `user item item ...`
  (whitespace-separated; the NGCF / LightGCN format), gzipped when the name ends in .gz."""
  if not os.path.isfile(path):
    raise DataError(f"input file {path} does not exist: fix data.logs.files or data.logs.split_files")
  opener = gzip.open if path.endswith(".gz") else open
  users: list[str] = []
  items: list[str] = []
  try:
    with opener(path, "rt") as f:
      for line in f:
        fields = line.split()
        users.extend(fields[:1] * (len(fields) - 1))  # a line with a user only has no interaction
        items.extend(fields[1:])
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read {path} as an adjacency file (user item item ...): {e}") from e
  if not items:
    raise DataError(f"input file {path} holds no interactions: expected lines 'user item item ...'")
  return np.asarray(users), np.asarray(items)


# ----------------------------------------------------------------------------- the logs


def _without_validation_pairs(user: np.ndarray, item: np.ndarray, split: np.ndarray,
                              user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
  """Rows to keep when the validation files are a carve-out of the training files: every training
  row whose (user, item) pair is also a validation pair is dropped (it is fitted on otherwise)."""
  pair = user.astype(np.int64) * (int(item.max()) + 1) + item
  train, valid = split == splits.TRAIN, split == splits.VALIDATION
  missing = ~np.isin(pair[valid], pair[train])
  if missing.any():
    first = np.flatnonzero(valid)[np.argmax(missing)]
    raise DataError(
        f"data.logs.validation_from_train is set, but {int(missing.sum())} validation interactions "
        f"are not in the training files (e.g. user {str(user_ids[user[first]])!r}, item "
        f"{str(item_ids[item[first]])!r}): the validation files are not a carve-out of the "
        "training files; unset data.logs.validation_from_train or fix the files")
  return ~(train & np.isin(pair, pair[valid]))


def columns_to_read(cfg) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
  """(the declared features per side as (kind, column), every column to read -> the config key
  naming it) of config.data.logs."""
  declared = {side: [("categorical", n) for n in cfg[f"{side}_categorical"]]
              + [("multi", n) for n in cfg[f"{side}_multi"]]
              + [("numeric", n) for n in cfg[f"{side}_numeric"]] for side in ("user", "item")}
  needed = {cfg.user_id: "data.logs.user_id", cfg.item_id: "data.logs.item_id",
            cfg.timestamp: "data.logs.timestamp"}
  if cfg.weight:
    needed[cfg.weight] = "data.logs.weight"
  if cfg.get("split_column", ""):
    needed[cfg.split_column] = "data.logs.split_column"
  for side in ("user", "item"):
    for kind, name in declared[side]:
      needed.setdefault(name, f"data.logs.{side}_{kind}")
  return declared, needed


def interaction_logs(cfg, base_dir: str = "") -> RawData:
  """Reads interaction logs described by `cfg` (config.data.logs): CSV, TSV or Parquet files with
  a schema of columns, or adjacency files (users and items only). Relative file names are read
  from `base_dir` (config.data.source_dir). With a split column or files per split, the
  interactions carry their split (`interactions["split"]`, for data.split.kind="predefined")."""
  fmt = cfg.format.lower()
  if fmt not in LOG_FORMATS:
    raise DataError(f"data.logs.format must be one of {', '.join(LOG_FORMATS)}, got {cfg.format!r}")
  files = log_files(cfg, base_dir)
  split_column = cfg.get("split_column", "")
  declared, needed = columns_to_read(cfg)
  if fmt == "adjacency" and (declared["user"] or declared["item"] or cfg.weight or split_column):
    raise DataError(
        "data.logs.format='adjacency' holds only users and items: unset data.logs.weight, "
        "data.logs.split_column and the data.logs.{user,item}_* feature columns (or convert the "
        "data to CSV or Parquet)")

  ids = {"user": _Dictionary(), "item": _Dictionary()}
  values = {name: _Dictionary() for side in declared for kind, name in declared[side]
            if kind != "numeric"}
  cols: dict[str, list[np.ndarray]] = {}
  list_columns: set[str] = set()  # token-bag columns of list type (the others are split strings)

  def add(key: str, value: np.ndarray) -> None:
    cols.setdefault(key, []).append(value)

  empty = []  # files with a header but no rows
  if fmt == "adjacency":
    for path, file_split in files:
      user, item = _read_adjacency(path)
      add("user", ids["user"].encode(pa.array(user, pa.string())))
      add("item", ids["item"].encode(pa.array(item, pa.string())))
      # No time in this format: every interaction gets 0, and ties keep file order downstream.
      add("timestamp", np.zeros(len(user), np.int64))
      if file_split is not None:
        add("split", np.full(len(user), file_split, np.int8))
  else:
    # Each file's format by its extension (a .parquet day among .csv days), else data.logs.format.
    formats = {path: file_format(path, fmt) for path, _ in files}
    delimiters = {path: "\t" if formats[path] == "tsv" else "," for path in formats}
    schemas = {path: _file_schema(path, formats[path], delimiters[path]) for path, _ in files}
    _check_schemas(schemas, needed)
    list_columns = {name for name in values
                    if _type_kind(schemas[files[0][0]][name]) == "list"}
    for path, file_split in files:
      num_rows = 0
      for row0, batch in _batches(path, formats[path], delimiters[path], list(needed)):
        column = lambda name: _Column(batch, name, path, row0)
        add("user", ids["user"].encode(column(cfg.user_id).ids("user ID")))
        add("item", ids["item"].encode(column(cfg.item_id).ids("item ID")))
        add("timestamp", column(cfg.timestamp).integers())
        if cfg.weight:
          add("weight", column(cfg.weight).numbers())
        if split_column:
          add("split", column(split_column).splits())
        for side in ("user", "item"):
          for kind, name in declared[side]:
            if kind == "numeric":
              add(name, column(name).numbers())
            elif kind == "multi":
              add(name, values[name].encode(column(name).bags()))
            else:
              add(name, values[name].encode(column(name).categories()))
        if file_split is not None:
          add("split", np.full(batch.num_rows, file_split, np.int8))
        num_rows += batch.num_rows
      if num_rows == 0:
        empty.append(path)
  if empty and (len(empty) < len(files) or not cfg.get("allow_empty", False)):
    raise DataError(f"input file {empty[0]} has a header but no rows: it holds no interactions; "
                    "remove it from data.logs.files or regenerate it")
  if empty:  # every file is empty: a day with no interactions, its catalog from the tables
    for key, dtype in (("user", np.int32), ("item", np.int32), ("timestamp", np.int64),
                       ("weight", np.float32)):
      add(key, np.zeros(0, dtype))
    if split_column or any(file_split is not None for _, file_split in files):
      add("split", np.zeros(0, np.int8))
    for side in ("user", "item"):
      for kind, name in declared[side]:
        add(name, np.zeros(0, np.float64 if kind == "numeric" else np.int32))

  user, user_ids = _sorted_codes(np.concatenate(cols.pop("user")), ids["user"])
  item, item_ids = _sorted_codes(np.concatenate(cols.pop("item")), ids["item"])
  timestamps = np.concatenate(cols.pop("timestamp"))
  n = len(user)
  weight = np.concatenate(cols.pop("weight")) if cfg.weight else np.ones(n, np.float32)
  split = np.concatenate(cols.pop("split")) if "split" in cols else None
  kept = np.arange(n)  # rows kept, as indices into the rows read
  if cfg.get("validation_from_train", False):
    if split is None:
      raise DataError("data.logs.validation_from_train needs a predefined split: set "
                      "data.logs.split_files or data.logs.split_column")
    kept = np.flatnonzero(_without_validation_pairs(user, item, split, user_ids, item_ids))
    user, item, timestamps, weight, split = (
        user[kept], item[kept], timestamps[kept], weight[kept], split[kept])

  def per_entity(codes: np.ndarray, id_values: np.ndarray, side: str
                 ) -> tuple[dict[str, Any], np.ndarray]:
    # One row per entity, in ID order; its features come from its latest interaction row.
    order = splits.order_by(codes, timestamps)
    last = np.r_[codes[order][1:] != codes[order][:-1], True][:len(order)]
    rows = order[last]
    row_of_code = np.full(len(id_values), -1, np.int32)
    row_of_code[codes[rows]] = np.arange(len(rows), dtype=np.int32)
    table: dict[str, Any] = {f"{side}_id": id_values[codes[rows]]}
    read_rows = kept[rows]  # the same rows among those read (feature columns are not filtered)
    for kind, name in declared[side]:
      column = np.concatenate(cols[name])[read_rows]
      if kind == "numeric":
        table[name] = column
      elif kind == "multi":
        separator = _LIST_SEPARATOR if name in list_columns else cfg.multi_separator
        bags = values[name].values()[column]
        table[name] = [[t for t in bag.split(separator) if t] for bag in bags.tolist()]
      else:
        table[name] = values[name].values()[column]
    return table, row_of_code[codes]

  users, user_row = per_entity(user, user_ids, "user")
  items, item_row = per_entity(item, item_ids, "item")
  interactions = dict(user_row=user_row, item_row=item_row, timestamp=timestamps, weight=weight)
  if split is not None:
    interactions["split"] = split
  features = tuple(RawFeature(n, side, k) for side in ("user", "item") for k, n in declared[side])
  raw = RawData(interactions=interactions, users=users, items=items, features=features)
  for side in ("user", "item"):
    if cfg.get(f"{side}_table", ""):
      raw = with_entity_table(raw, side, entity_table(cfg, side, resolve_path(cfg[f"{side}_table"],
                                                                               base_dir)))
  return raw


# ----------------------------------------------------------------------------- user and item tables


def file_format(path: str, default: str) -> str:
  """csv, tsv or parquet by the file name's extension, else `default` (data.logs.format)."""
  name = path.lower().removesuffix(".gz")
  for ext, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".tsv", "tsv"), (".csv", "csv")):
    if name.endswith(ext):
      return fmt
  return default


def file_columns(path: str, fmt: str) -> dict[str, str]:
  """The columns of a CSV, TSV or Parquet file and the kind of each (CSV columns: string)."""
  return {name: _type_kind(t)
          for name, t in _file_schema(path, fmt, "\t" if fmt == "tsv" else ",").items()}


def entity_table(cfg, side: str, path: str) -> dict[str, Any]:
  """The user or item table of file `path` (data.logs.user_table / item_table): its ID column
  (data.logs.user_id / item_id) and the side's declared feature columns, one row per ID, as
  `RawData.users` / `items` hold them (IDs as text). Raises DataError naming the file for a missing
  column, a missing ID or an ID on more than one row."""
  key = f"data.logs.{side}_table"
  fmt = file_format(path, cfg.format.lower())
  if fmt not in ("csv", "tsv", "parquet"):
    raise DataError(f"{key} {path} must be a CSV, TSV or Parquet file")
  if "://" not in path and not os.path.isfile(path):
    raise DataError(f"{key} {path} does not exist: fix the path, or leave {key} unset")
  declared, _ = columns_to_read(cfg)
  id_column = cfg[f"{side}_id"]
  needed = {id_column: f"data.logs.{side}_id"}
  needed.update({name: f"data.logs.{side}_{kind}" for kind, name in declared[side]})
  _check_schemas({path: _file_schema(path, fmt, "\t" if fmt == "tsv" else ",")}, needed)
  kinds = file_columns(path, fmt)
  parts: dict[str, list] = {}
  for row0, batch in _batches(path, fmt, "\t" if fmt == "tsv" else ",", list(needed)):
    column = lambda name: _Column(batch, name, path, row0)
    parts.setdefault(id_column, []).append(
        pc.cast(column(id_column).ids(f"{side} ID"), pa.string()).to_numpy(zero_copy_only=False))
    for kind, name in declared[side]:
      if kind == "numeric":
        values = column(name).numbers()
      elif kind == "multi":
        separator = _LIST_SEPARATOR if kinds[name] == "list" else cfg.multi_separator
        values = [[t for t in bag.split(separator) if t] for bag in column(name).bags().to_pylist()]
      else:
        values = pc.cast(column(name).categories(), pa.string()).to_numpy(zero_copy_only=False)
      parts.setdefault(name, []).append(values)
  if id_column not in parts:
    raise DataError(f"{key} {path} has a header but no rows: write one row per {side}, or leave "
                    f"{key} unset")
  ids = np.concatenate(parts.pop(id_column)).astype(str)
  unique, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    duplicated = unique[counts > 1]
    raise DataError(
        f"{key} {path} has {len(duplicated)} {side} IDs on more than one row (e.g. {side} "
        f"{str(duplicated[0])!r}, on {int(counts[counts > 1][0])} rows): keep one row per {side}, its "
        "current features")
  table: dict[str, Any] = {f"{side}_id": ids}
  for kind, name in declared[side]:
    table[name] = (sum(parts[name], []) if kind == "multi" else np.concatenate(parts[name]))
  return table


def merge_entities(old: dict[str, Any], table: dict[str, Any], side: str, features
                   ) -> tuple[dict[str, Any], np.ndarray]:
  """The user or item `table` plus the entities of `old` (one row per entity, as RawData holds
  them) it lacks, in ID order, the table's features winning; and each old row's row in it."""
  key = f"{side}_id"
  old_ids, new_ids = np.asarray(old[key]).astype(str), np.asarray(table[key]).astype(str)
  only_old = ~np.isin(old_ids, new_ids)
  ids = np.concatenate([new_ids, old_ids[only_old]])
  order = np.argsort(ids, kind="stable")
  merged: dict[str, Any] = {key: ids[order]}
  for f in features:
    if f.side != side:
      continue
    if f.kind == "multi":
      values = list(table[f.name]) + [bag for bag, keep in zip(old[f.name], only_old) if keep]
      merged[f.name] = [values[i] for i in order]
    else:
      values = np.concatenate([np.asarray(table[f.name]).astype(np.asarray(old[f.name]).dtype
                                                                 if f.kind == "numeric" else str),
                               np.asarray(old[f.name])[only_old]])
      merged[f.name] = values[order]
  return merged, np.searchsorted(merged[key], old_ids).astype(np.int32)


def with_entity_table(raw: RawData, side: str, table: dict[str, Any]) -> RawData:
  """`raw` with its user or item table replaced by `table` plus the entities of the interactions
  the table lacks (with their features from the interactions). An entity of the table without
  interactions (a new item) is in the catalog with its features; the table's features win."""
  merged, rows = merge_entities(raw.users if side == "user" else raw.items, table, side,
                                raw.features)
  interactions = dict(raw.interactions)
  interactions[f"{side}_row"] = rows[raw.interactions[f"{side}_row"]]
  users, items = (merged, raw.items) if side == "user" else (raw.users, merged)
  return RawData(interactions=interactions, users=users, items=items, features=raw.features)
