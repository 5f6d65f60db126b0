"""Raw sources, read into one in-memory layout (`RawData`) that the preparation step consumes.

Every source yields interactions (user ID, item ID, timestamp, weight) plus one row of features per
user and per item. Feature values stay raw here (strings, token lists, floats); vocabularies and
standardisation come later, from the training split only.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import os
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipelines import splits
from pipelines.schema import Kind, Side
from two_tower.errors import UserError


class DataError(UserError):
  """Input data that cannot be used, with a message naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class RawFeature:
  name: str
  side: Side
  kind: Kind  # categorical | multi | numeric


@dataclasses.dataclass
class RawData:
  # user_id, item_id, timestamp (int64), weight (float32); optional split (int8, TRAIN /
  # VALIDATION / TEST) when the data gives it.
  interactions: dict[str, np.ndarray]
  users: dict[str, Any]  # user_id (unique) + one column per user feature
  items: dict[str, Any]  # item_id (unique) + one column per item feature
  features: tuple[RawFeature, ...]

  def __post_init__(self):
    n = len(self.interactions["user_id"])
    if n == 0:
      raise DataError("the source holds no interactions: check the input files or the source config")


# ----------------------------------------------------------------------------- MovieLens-100K

_ML_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
_AGE_BUCKETS = (18, 25, 35, 45, 50, 56)


def _age_bucket(age: int) -> str:
  for edge in _AGE_BUCKETS:
    if age < edge:
      return f"<{edge}"
  return f"{_AGE_BUCKETS[-1]}+"


def _read_lines(path: str, what: str, encoding: str = "latin-1") -> list[str]:
  with open(path, encoding=encoding) as f:
    lines = [l.rstrip("\n") for l in f if l.strip()]
  if not lines:
    raise DataError(f"{path} is empty: it should hold {what}. Re-download MovieLens-100K.")
  return lines


def movielens_100k(source_dir: str) -> RawData:
  """Reads a GroupLens `ml-100k` directory (u.data, u.item, u.user)."""
  if not source_dir:
    raise DataError(
        "data.source_dir is not set: pass --config.data.source_dir=DIR, where DIR is the GroupLens "
        "ml-100k directory holding u.data, u.item and u.user"
    )
  if os.path.isdir(os.path.join(source_dir, "ml-100k")):
    source_dir = os.path.join(source_dir, "ml-100k")
  missing = [n for n in ("u.data", "u.item", "u.user") if not os.path.isfile(os.path.join(source_dir, n))]
  if missing:
    raise DataError(
        f"GroupLens directory {source_dir} is missing {', '.join(missing)}: point "
        "--config.data.source_dir at an unpacked ml-100k directory (u.data, u.item, u.user)"
    )
  rows = [l.split("\t") for l in _read_lines(os.path.join(source_dir, "u.data"), "ratings")]
  try:
    data = np.array(rows, dtype=np.int64)
  except ValueError as e:
    raise DataError(f"{source_dir}/u.data: expected 'user<TAB>item<TAB>rating<TAB>timestamp' integers: {e}")
  users = [l.split("|") for l in _read_lines(os.path.join(source_dir, "u.user"), "users")]
  items = [l.split("|") for l in _read_lines(os.path.join(source_dir, "u.item"), "movies")]
  titles, years, genres = [], [], []
  for row in items:
    if len(row) < 5 + len(_ML_GENRES):
      raise DataError(f"{source_dir}/u.item: line for movie {row[0]} has {len(row)} fields, expected 24")
    title = re.sub(r"\s*\(\d{4}\)\s*$", "", row[1])
    titles.append(re.findall(r"[a-z0-9']+", title.lower()))
    year = re.search(r"(\d{4})", row[2] or row[1])
    years.append(year.group(1) if year else "")
    genres.append([g for g, flag in zip(_ML_GENRES, row[5:5 + len(_ML_GENRES)]) if flag == "1"])
  return RawData(
      interactions=dict(
          user_id=data[:, 0], item_id=data[:, 1], timestamp=data[:, 3],
          weight=np.ones(len(data), np.float32), rating=data[:, 2].astype(np.float32),
      ),
      users=dict(
          user_id=np.array([int(u[0]) for u in users]),
          age=np.array([_age_bucket(int(u[1])) for u in users]),
          gender=np.array([u[2] for u in users]),
          occupation=np.array([u[3] for u in users]),
          zip_prefix=np.array([u[4][:2] for u in users]),
      ),
      items=dict(
          item_id=np.array([int(r[0]) for r in items]),
          title_words=titles, year=np.array(years), genres=genres,
      ),
      features=(
          RawFeature("age", "user", "categorical"), RawFeature("gender", "user", "categorical"),
          RawFeature("occupation", "user", "categorical"),
          RawFeature("zip_prefix", "user", "categorical"),
          RawFeature("title_words", "item", "multi"), RawFeature("year", "item", "categorical"),
          RawFeature("genres", "item", "multi"),
      ),
  )


# ----------------------------------------------------------------------------- interaction logs


def _read_table(path: str, fmt: str, delimiter: str) -> pa.Table:
  if not os.path.isfile(path):
    raise DataError(f"input file {path} does not exist: fix data.logs.files")
  if os.path.getsize(path) == 0:
    raise DataError(f"input file {path} is empty: remove it from data.logs.files or regenerate it")
  try:
    if fmt == "parquet":
      table = pq.read_table(path)
    else:
      table = pa_csv.read_csv(
          path,
          parse_options=pa_csv.ParseOptions(delimiter=delimiter),
          convert_options=pa_csv.ConvertOptions(strings_can_be_null=False),
      )
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(f"cannot read {path} as {fmt}: {e}") from e
  if table.num_rows == 0:
    raise DataError(f"input file {path} has a header but no rows: it holds no interactions")
  return table


def _column(table: pa.Table, name: str, path: str, role: str) -> pa.ChunkedArray:
  if name not in table.column_names:
    close = difflib.get_close_matches(name, table.column_names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DataError(
        f"column {name!r} (set by {role}) is missing from {path}; its columns are "
        f"{table.column_names}.{hint} Fix the schema in the config or the file."
    )
  return table.column(name)


def _numeric(col: pa.ChunkedArray, name: str, path: str, dtype) -> np.ndarray:
  try:
    values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    text = col.to_pylist()
    for row, v in enumerate(text):
      try:
        float(v)
      except (TypeError, ValueError):
        raise DataError(
            f"column {name!r} of {path} must be numeric but row {row + 1} holds {v!r}: fix the "
            "value, or declare the column as categorical in the config"
        ) from None
    raise
  bad = np.flatnonzero(~np.isfinite(values))
  if len(bad):
    raise DataError(
        f"column {name!r} of {path} has a missing or non-finite value (NaN/inf) at row {bad[0] + 1} "
        f"({len(bad)} rows in all): fill or drop those rows before preparing the data"
    )
  return values.astype(dtype)


def _tokens(col: pa.ChunkedArray, separator: str) -> list[list[str]]:
  values = col.to_pylist()
  if pa.types.is_list(col.type):
    return [[str(t) for t in (v or [])] for v in values]
  return [[t for t in str(v).split(separator) if t] if v is not None else [] for v in values]


LOG_FORMATS = ("csv", "tsv", "parquet", "adjacency")


def _paths(value) -> list[str]:
  return [value] if isinstance(value, str) else list(value)


def log_files(cfg, base_dir: str = "") -> list[tuple[str, int | None]]:
  """(path, split) of every file to read, in order: the split is TRAIN / VALIDATION / TEST for
  data.logs.split_files, else None. Relative paths are read from `base_dir` (data.source_dir)."""
  def resolve(path: str) -> str:
    return os.path.join(base_dir, path) if base_dir and not os.path.isabs(path) else path

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


def _split_values(col: pa.ChunkedArray, name: str, path: str) -> np.ndarray:
  """TRAIN / VALIDATION / TEST of each row of a split column."""
  values = np.asarray(["" if v is None else str(v) for v in col.to_pylist()])
  out = np.full(len(values), -1, np.int8)
  for k, split_name in enumerate(splits.SPLIT_NAMES):
    out[values == split_name] = k
  bad = np.flatnonzero(out < 0)
  if len(bad):
    raise DataError(
        f"column {name!r} (data.logs.split_column) of {path} must hold train, validation or test, "
        f"but row {bad[0] + 1} holds {str(values[bad[0]])!r} ({len(bad)} rows in all): rename those "
        "values")
  return out


def _without_validation_pairs(user_ids: np.ndarray, item_ids: np.ndarray, split: np.ndarray) -> np.ndarray:
  """Rows to keep when the validation files are a carve-out of the training files: every training
  row whose (user, item) pair is also a validation pair is dropped (it is fitted on otherwise)."""
  _, user = np.unique(user_ids, return_inverse=True)
  items, item = np.unique(item_ids, return_inverse=True)
  pair = user.astype(np.int64) * len(items) + item
  train, valid = split == splits.TRAIN, split == splits.VALIDATION
  missing = ~np.isin(pair[valid], pair[train])
  if missing.any():
    first = np.flatnonzero(valid)[np.argmax(missing)]
    raise DataError(
        f"data.logs.validation_from_train is set, but {int(missing.sum())} validation interactions "
        f"are not in the training files (e.g. user {str(user_ids[first])!r}, item {str(item_ids[first])!r}): "
        "the validation files are not a carve-out of the training files; unset "
        "data.logs.validation_from_train or fix the files")
  return ~(train & np.isin(pair, pair[valid]))


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
  delimiter = "\t" if fmt == "tsv" else ","
  declared = [("categorical", n) for n in cfg.user_categorical] + [("multi", n) for n in cfg.user_multi]
  declared += [("numeric", n) for n in cfg.user_numeric]
  item_declared = [("categorical", n) for n in cfg.item_categorical] + [("multi", n) for n in cfg.item_multi]
  item_declared += [("numeric", n) for n in cfg.item_numeric]
  if fmt == "adjacency" and (declared or item_declared or cfg.weight or split_column):
    raise DataError(
        "data.logs.format='adjacency' holds only users and items: unset data.logs.weight, "
        "data.logs.split_column and the data.logs.{user,item}_* feature columns (or convert the "
        "data to CSV or Parquet)")
  cols: dict[str, list] = {}
  for path, file_split in files:
    if fmt == "adjacency":
      user, item = _read_adjacency(path)
      cols.setdefault("data.logs.user_id", []).append(user)
      cols.setdefault("data.logs.item_id", []).append(item)
      # No time in this format: every interaction gets 0, and ties keep file order downstream.
      cols.setdefault("data.logs.timestamp", []).append(np.zeros(len(user), np.int64))
      num_rows = len(user)
    else:
      table = _read_table(path, fmt, delimiter)
      num_rows = table.num_rows
      for role, name in (("data.logs.user_id", cfg.user_id), ("data.logs.item_id", cfg.item_id),
                         ("data.logs.timestamp", cfg.timestamp)):
        cols.setdefault(role, []).append(np.asarray(_column(table, name, path, role).to_pylist()))
      if cfg.weight:
        cols.setdefault("weight", []).append(
            _numeric(_column(table, cfg.weight, path, "data.logs.weight"), cfg.weight, path, np.float32))
      if split_column:
        cols.setdefault("split", []).append(_split_values(
            _column(table, split_column, path, "data.logs.split_column"), split_column, path))
      for side, decl in (("user", declared), ("item", item_declared)):
        for kind, name in decl:
          col = _column(table, name, path, f"data.logs.{side}_{kind}")
          if kind == "numeric":
            value = _numeric(col, name, path, np.float32)
          elif kind == "multi":
            value = _tokens(col, cfg.multi_separator)
          else:
            value = np.asarray([str(v) for v in col.to_pylist()])
          cols.setdefault(f"{side}:{name}", []).append(value)
    if file_split is not None:
      cols.setdefault("split", []).append(np.full(num_rows, file_split, np.int8))
  user_ids = np.concatenate(cols["data.logs.user_id"]).astype(str)
  item_ids = np.concatenate(cols["data.logs.item_id"]).astype(str)
  ts_col = np.concatenate(cols["data.logs.timestamp"])
  try:
    timestamps = ts_col.astype(np.int64)
  except (TypeError, ValueError):
    raise DataError(
        f"column {cfg.timestamp!r} must hold integer timestamps (e.g. Unix seconds); found values "
        f"like {ts_col[:3].tolist()}: convert them before preparing the data"
    ) from None
  n = len(user_ids)
  weight = np.concatenate(cols["weight"]) if cfg.weight else np.ones(n, np.float32)
  split = np.concatenate(cols["split"]) if "split" in cols else None
  kept = np.arange(n)  # rows kept, as indices into the rows read
  if cfg.get("validation_from_train", False):
    if split is None:
      raise DataError("data.logs.validation_from_train needs a predefined split: set "
                      "data.logs.split_files or data.logs.split_column")
    kept = np.flatnonzero(_without_validation_pairs(user_ids, item_ids, split))
    user_ids, item_ids, timestamps = user_ids[kept], item_ids[kept], timestamps[kept]
    weight, split = weight[kept], split[kept]

  def per_entity(ids: np.ndarray, side: str, decl) -> dict[str, Any]:
    # Features of an entity come from its latest interaction row.
    order = np.lexsort((timestamps, ids))
    last = np.r_[ids[order][1:] != ids[order][:-1], True]
    rows = order[last]
    out: dict[str, Any] = {f"{side}_id": ids[rows]}
    read_rows = kept[rows]  # the same rows among those read (feature columns are not filtered)
    for kind, name in decl:
      parts = cols[f"{side}:{name}"]
      if kind == "multi":
        flat = [b for p in parts for b in p]
        out[name] = [flat[r] for r in read_rows]
      else:
        out[name] = np.concatenate(parts)[read_rows]
    return out

  features = tuple(RawFeature(n, "user", k) for k, n in declared)
  features += tuple(RawFeature(n, "item", k) for k, n in item_declared)
  interactions = dict(user_id=user_ids, item_id=item_ids, timestamp=timestamps, weight=weight)
  if split is not None:
    interactions["split"] = split
  return RawData(
      interactions=interactions,
      users=per_entity(user_ids, "user", declared),
      items=per_entity(item_ids, "item", item_declared),
      features=features,
  )
