"""Replay for the nightly lifecycle: a sample of earlier days' training examples, trained on again
with today's (nightly.replay_days, nightly.replay_rate).

An earlier day's prepared training split is read as it is (no raw input is read again) and its
examples are moved into today's indexing: items by their raw IDs to today's catalog rows (an
example whose item is not in today's catalog is dropped: its features are not in today's
tables), history and feature tokens by the ID registry (kept IDs keep their rows; an evicted one
becomes padding or its hashed bucket). Users go to today's catalog rows too, and a user absent
from today's catalog (a day's catalog holds that day's active users only) brings its row of the
earlier day's user tables: training appends those rows to today's catalog, so replay trains the
users idle today as well, as a retrain on all the days would. The sample is a seeded function of
the two dates, so a rerun after a crash trains on exactly the same examples.
"""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np

from pipelines import loader
from pipelines.prepare import PreparedData
from two_tower.registry import Registry
from two_tower.warm_start import table_vocabularies

PAD = 0


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
  """Index of each `wanted` ID in `ids`, -1 where absent."""
  order = np.argsort(ids, kind="stable")
  pos = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
  return np.where(ids[order][pos] == wanted, order[pos], -1)


def row_map(before: Registry, today: Registry, vocab: str) -> np.ndarray:
  """[before's capacity] today's row of each of `before`'s rows of `vocab`: padding and hashed
  buckets stay, an ID's row becomes the ID's row today (its bucket if it no longer owns one), a
  free row padding."""
  old, new = before.vocab(vocab), today.vocab(vocab)
  mapping = np.full(old.capacity, PAD, np.int64)
  mapping[:old.num_oov + 1] = np.arange(old.num_oov + 1)
  mapping[np.asarray(old.rows, np.int64)] = new.lookup(old.ids)
  return mapping


@dataclasses.dataclass(frozen=True)
class Replayed:
  """Replayed examples in today's indexing. A `user_index` of today's user count plus k points at
  row k of `users`: a user absent from today's catalog, with its user tables (the columns of the
  user side's features, and raw_id) in today's indexing."""

  examples: dict[str, np.ndarray]  # loader.BATCH_KEYS columns
  users: dict[str, np.ndarray]

  def __len__(self) -> int:
    return len(self.examples["user_index"])


def sample_day(earlier: PreparedData, earlier_registry: Registry, today: PreparedData,
               today_registry: Registry, rate: float, seed: int, earlier_date: str, date: str
               ) -> Replayed:
  """The replayed examples of one earlier day."""
  history_length = today.schema.history_length
  split = loader.open_split(earlier.record_source("train"), history_length, cache="always")
  n = len(split)
  rng = np.random.default_rng((seed, datetime.date.fromisoformat(date).toordinal(),
                               datetime.date.fromisoformat(earlier_date).toordinal()))
  picked = np.flatnonzero(rng.random(n) < rate)
  columns = split.gather(picked) if len(picked) else {
      k: np.zeros((0, history_length) if k == "history" else 0, np.int32)
      for k in loader.BATCH_KEYS}
  item = _positions(np.asarray(today.table("item", "raw_id")),
                    np.asarray(earlier.table("item", "raw_id"))[columns["item_index"]])
  keep = item >= 0
  earlier_user = columns["user_index"][keep]
  user = _positions(np.asarray(today.table("user", "raw_id")),
                    np.asarray(earlier.table("user", "raw_id"))[earlier_user])
  absent = np.unique(earlier_user[user < 0])  # their rows of the earlier day's user tables
  user = np.where(user >= 0, user,
                  today.schema.num_users + np.searchsorted(absent, earlier_user))
  schema = earlier.schema
  user_tables = [f.name for f in schema.features if f.side == "user"]
  # Today's row of each earlier row, per user-side table with a vocabulary (history included).
  maps = {name: row_map(earlier_registry, today_registry, vocab)
          for name, vocab in table_vocabularies(schema).items() if name in user_tables}
  history = maps["history"][columns["history"][keep]]
  return Replayed(
      examples={"user_index": user.astype(np.int32), "item_index": item[keep].astype(np.int32),
                "history": history.astype(np.int32), "weight": columns["weight"][keep]},
      users=_user_rows(earlier, user_tables, absent, maps))


def _user_rows(earlier: PreparedData, names: list[str], rows: np.ndarray,
               maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`rows` of the earlier day's user tables `names`, the tokens of those in `maps` in today's
  rows."""
  out = {"raw_id": np.asarray(earlier.table("user", "raw_id"))[rows]}
  for name in names:
    column = np.asarray(earlier.table("user", name))[rows]
    out[name] = maps[name][column].astype(column.dtype) if name in maps else column
  return out


def concat(parts: list[Replayed], num_users: int) -> Replayed:
  """The days' samples as one, in date order. A user absent today that several days replay gets
  one row: the latest day's."""
  raw = np.concatenate([p.users["raw_id"] for p in parts])
  last = len(raw) - 1 - np.unique(raw[::-1], return_index=True)[1]
  kept = np.sort(last)
  row_of = _positions(raw[kept], raw)  # each part's row -> its kept row
  examples, offset = [], 0
  for p in parts:
    user = p.examples["user_index"].astype(np.int64)
    absent = user >= num_users
    user[absent] = num_users + row_of[offset + user[absent] - num_users]
    examples.append({**p.examples, "user_index": user.astype(np.int32)})
    offset += len(p.users["raw_id"])
  return Replayed(
      examples={k: np.concatenate([e[k] for e in examples]) for k in loader.BATCH_KEYS},
      users={k: np.concatenate([p.users[k] for p in parts])[kept] for k in parts[0].users})


def with_users(catalog: dict[str, dict[str, np.ndarray]], users: dict[str, np.ndarray]
               ) -> dict[str, dict[str, np.ndarray]]:
  """`catalog` (features.load_catalog's) with `users` (Replayed.users) appended to its user
  tables: the training catalog of a day with replay."""
  return {**catalog, "user": {name: np.concatenate([table, users[name].astype(table.dtype)])
                              for name, table in catalog["user"].items()}}


class ReplaySplit:
  """Today's training split followed by the replayed examples: the loader's view of both."""

  def __init__(self, split, replayed: Replayed):
    self._split = split
    self._replayed = replayed.examples
    self._n = len(split)

  def __len__(self) -> int:
    return self._n + len(self._replayed["user_index"])

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    today = indices < self._n
    parts = self._split.gather(indices[today]) if today.any() else None
    out = {}
    for k, v in self._replayed.items():
      column = np.empty((len(indices),) + v.shape[1:], v.dtype)
      column[~today] = v[indices[~today] - self._n]
      if parts is not None:
        column[today] = parts[k]
      out[k] = column
    return out
