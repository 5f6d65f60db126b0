"""Raw sources, read into one in-memory layout (`RawData`) that the preparation step consumes
(interaction logs: pipelines/logs.py).

Every source yields interactions (user ID, item ID, timestamp, weight) plus one row of features per
user and per item. Feature values stay raw here (strings, token lists, floats); vocabularies and
standardisation come later, from the training split only.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

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
  # user_id, item_id (or user_row, item_row: int32 rows of the user and item tables), timestamp
  # (int64), weight (float32); optional split (int8, TRAIN / VALIDATION / TEST) when the data
  # gives it.
  interactions: dict[str, np.ndarray]
  users: dict[str, Any]  # user_id (unique) + one column per user feature
  items: dict[str, Any]  # item_id (unique) + one column per item feature
  features: tuple[RawFeature, ...]

  def ids(self, side: Side) -> np.ndarray:
    """The user or item ID of every interaction."""
    if f"{side}_row" in self.interactions:
      table = self.users if side == "user" else self.items
      return np.asarray(table[f"{side}_id"])[self.interactions[f"{side}_row"]]
    return self.interactions[f"{side}_id"]


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
