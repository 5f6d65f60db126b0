"""Replay for the nightly lifecycle: a sample of earlier days' training examples, trained on again
with today's (nightly.replay_days, nightly.replay_rate).

An earlier day's prepared training split is read as it is (no raw input is read again) and its
examples are moved into today's indexing: users and items by their raw IDs to today's catalog rows
(an example whose user or item is not in today's catalog is dropped: its features are not in
today's tables), history tokens by the ID registry (kept IDs keep their rows; an evicted one
becomes padding). The sample is a seeded function of the two dates, so a rerun after a crash
trains on exactly the same examples.
"""

from __future__ import annotations

import datetime

import numpy as np

from pipelines import loader
from pipelines.prepare import PreparedData
from two_tower.registry import Registry

PAD = 0


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
  """Index of each `wanted` ID in `ids`, -1 where absent."""
  order = np.argsort(ids, kind="stable")
  pos = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
  return np.where(ids[order][pos] == wanted, order[pos], -1)


def history_row_map(before: Registry, today: Registry, vocab: str = "item_id") -> np.ndarray:
  """[before's capacity] today's row of each of `before`'s rows: padding and hashed buckets stay,
  an ID's row becomes the ID's row today (its bucket if it no longer owns one), a free row
  padding."""
  old, new = before.vocab(vocab), today.vocab(vocab)
  mapping = np.full(old.capacity, PAD, np.int64)
  mapping[:old.num_oov + 1] = np.arange(old.num_oov + 1)
  mapping[np.asarray(old.rows, np.int64)] = new.lookup(old.ids)
  return mapping


def sample_day(earlier: PreparedData, earlier_registry: Registry, today: PreparedData,
               today_registry: Registry, rate: float, seed: int, earlier_date: str, date: str
               ) -> dict[str, np.ndarray]:
  """The replayed examples of one earlier day, in today's indexing (loader.BATCH_KEYS columns)."""
  history_length = today.schema.history_length
  split = loader.open_split(earlier.record_source("train"), history_length, cache="always")
  n = len(split)
  rng = np.random.default_rng((seed, datetime.date.fromisoformat(date).toordinal(),
                               datetime.date.fromisoformat(earlier_date).toordinal()))
  picked = np.flatnonzero(rng.random(n) < rate)
  columns = split.gather(picked) if len(picked) else {
      k: np.zeros((0, history_length) if k == "history" else 0, np.int32)
      for k in loader.BATCH_KEYS}
  user = _positions(np.asarray(today.table("user", "raw_id")),
                    np.asarray(earlier.table("user", "raw_id"))[columns["user_index"]])
  item = _positions(np.asarray(today.table("item", "raw_id")),
                    np.asarray(earlier.table("item", "raw_id"))[columns["item_index"]])
  keep = (user >= 0) & (item >= 0)
  history = history_row_map(earlier_registry, today_registry)[columns["history"][keep]]
  return {"user_index": user[keep].astype(np.int32), "item_index": item[keep].astype(np.int32),
          "history": history.astype(np.int32), "weight": columns["weight"][keep]}


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([p[k] for p in parts]) for k in loader.BATCH_KEYS}


class ReplaySplit:
  """Today's training split followed by the replayed examples: the loader's view of both."""

  def __init__(self, split, replayed: dict[str, np.ndarray]):
    self._split = split
    self._replayed = replayed
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
