"""Raw sources, read into one in-memory layout (`RawData`) that the preparation step consumes.

Every source yields interactions (user ID, item ID, timestamp, weight) plus one row of features per
user and per item. Feature values stay raw here (strings, token lists, floats); vocabularies and
standardisation come later, from the training split only.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

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
  interactions: dict[str, np.ndarray]  # user_id, item_id, timestamp (int64), weight (float32)
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


def interaction_logs(cfg) -> RawData:
  """Reads CSV, TSV or Parquet interaction logs described by `cfg` (config.data.logs)."""
  fmt = cfg.format.lower()
  if fmt not in ("csv", "tsv", "parquet"):
    raise DataError(f"data.logs.format must be csv, tsv or parquet, got {cfg.format!r}")
  files = [cfg.files] if isinstance(cfg.files, str) else list(cfg.files)
  if not files:
    raise DataError("data.logs.files is empty: list the CSV, TSV or Parquet files to read")
  delimiter = "\t" if fmt == "tsv" else ","
  declared = [("categorical", n) for n in cfg.user_categorical] + [("multi", n) for n in cfg.user_multi]
  declared += [("numeric", n) for n in cfg.user_numeric]
  item_declared = [("categorical", n) for n in cfg.item_categorical] + [("multi", n) for n in cfg.item_multi]
  item_declared += [("numeric", n) for n in cfg.item_numeric]
  cols: dict[str, list] = {}
  for path in files:
    table = _read_table(path, fmt, delimiter)
    for role, name in (("data.logs.user_id", cfg.user_id), ("data.logs.item_id", cfg.item_id),
                       ("data.logs.timestamp", cfg.timestamp)):
      cols.setdefault(role, []).append(np.asarray(_column(table, name, path, role).to_pylist()))
    if cfg.weight:
      cols.setdefault("weight", []).append(
          _numeric(_column(table, cfg.weight, path, "data.logs.weight"), cfg.weight, path, np.float32))
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

  def per_entity(ids: np.ndarray, side: str, decl) -> dict[str, Any]:
    # Features of an entity come from its latest interaction row.
    order = np.lexsort((timestamps, ids))
    last = np.r_[ids[order][1:] != ids[order][:-1], True]
    rows = order[last]
    out: dict[str, Any] = {f"{side}_id": ids[rows]}
    for kind, name in decl:
      parts = cols[f"{side}:{name}"]
      if kind == "multi":
        flat = [b for p in parts for b in p]
        out[name] = [flat[r] for r in rows]
      else:
        out[name] = np.concatenate(parts)[rows]
    return out

  features = tuple(RawFeature(n, "user", k) for k, n in declared)
  features += tuple(RawFeature(n, "item", k) for k, n in item_declared)
  return RawData(
      interactions=dict(user_id=user_ids, item_id=item_ids, timestamp=timestamps, weight=weight),
      users=per_entity(user_ids, "user", declared),
      items=per_entity(item_ids, "item", item_declared),
      features=features,
  )
