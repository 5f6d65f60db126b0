"""Users' latest training items, carried from one day's build to the next (the nightly lifecycle).

A day's build reads only that day's interactions, so without this each user's history would start
empty every day. The carried histories hold, for every user seen so far, their latest
`history_length` training items as raw item IDs (not table rows: an evicted item's row is reused
by another ID, and raw IDs are looked up through the day's registry like any other), each stored
once with an int32 index per slot. A day's
histories are its own training items, most recent first, followed by the carried ones
(`with_carried`); what the next day carries is every user's history after the day (`merged`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pipelines.schema import PAD
from two_tower import atomic
from two_tower.registry import VocabRegistry


@dataclasses.dataclass(frozen=True)
class CarriedHistories:
  user_ids: np.ndarray  # [U] raw user IDs as text, sorted
  item_ids: np.ndarray  # [M] the raw item IDs the histories name, as text, sorted
  items: np.ndarray  # [U, L] int32 indices into item_ids, most recent first; -1 where none

  @classmethod
  def empty(cls, length: int) -> CarriedHistories:
    return cls(np.zeros(0, "<U1"), np.zeros(0, "<U1"), np.zeros((0, length), np.int32))

  @classmethod
  def from_raw(cls, user_ids, items) -> CarriedHistories:
    """From raw IDs: [U] distinct users and [U, L] their items, most recent first ("" where none)."""
    user_ids, items = np.asarray(user_ids).astype(str), np.asarray(items).astype(str)
    item_ids, index = np.unique(items, return_inverse=True)
    index = index.reshape(items.shape).astype(np.int32)
    if len(item_ids) and item_ids[0] == "":  # "" sorts first: it means none
      item_ids, index = item_ids[1:], index - 1
    order = np.argsort(user_ids, kind="stable")
    return cls(user_ids[order], item_ids, index[order])

  def raw_items(self) -> np.ndarray:
    """[U, L] the histories as raw item IDs ("" where none)."""
    if not len(self.item_ids):
      return np.full(self.items.shape, "", "<U1")
    return np.where(self.items >= 0, self.item_ids[np.maximum(self.items, 0)], "")

  @classmethod
  def load(cls, path) -> CarriedHistories:
    """From a path, or a binary file object."""
    with np.load(path, allow_pickle=False) as z:
      return cls(z["user_ids"], z["item_ids"], z["items"])

  def save(self, path: str) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
      np.savez(f, user_ids=self.user_ids, item_ids=self.item_ids, items=self.items)

  def rows(self, user_ids, item_vocab: VocabRegistry, length: int) -> np.ndarray:
    """[len(user_ids), length] the carried items of these users as rows of `item_vocab` (an ID
    without a row of its own gets its hashed bucket, like any unknown ID); PAD where none."""
    user_ids = np.asarray(user_ids).astype(str)
    out = np.full((len(user_ids), length), PAD, np.int32)
    if not len(self.user_ids):
      return out
    pos = np.minimum(np.searchsorted(self.user_ids, user_ids), len(self.user_ids) - 1)
    found = self.user_ids[pos] == user_ids
    items = self.items[pos[found], :length]
    item_rows = item_vocab.lookup(self.item_ids) if len(self.item_ids) else np.zeros(1, np.int32)
    out[found, :items.shape[1]] = np.where(items >= 0, item_rows[np.maximum(items, 0)], PAD)
    return out

  def merged(self, user_ids, history_rows: np.ndarray, item_vocab: VocabRegistry
             ) -> CarriedHistories:
    """These histories with the users of a day replaced by their history after it
    (`history_rows`: the day's `user.history` table, rows of `item_vocab`, carried items
    included). Items without a row of their own (a hashed bucket) have no ID to carry."""
    user_ids = np.asarray(user_ids).astype(str)
    length = history_rows.shape[1]
    raw = item_vocab.owners()[history_rows]
    # Keep each row's items first (a bucket or padding has no ID): most recent first still.
    raw = np.take_along_axis(raw, np.argsort(raw == "", axis=1, kind="stable"), axis=1)
    kept = ~np.isin(self.user_ids, user_ids)
    old = np.full((int(kept.sum()), length), "", dtype=object)
    width = min(length, self.items.shape[1])
    old[:, :width] = self.raw_items()[kept, :width]
    return CarriedHistories.from_raw(np.concatenate([self.user_ids[kept], user_ids]),
                                     np.concatenate([old.astype(str), raw.astype(str)]))


def with_carried(history: np.ndarray, carried: np.ndarray) -> np.ndarray:
  """Each row of `history` (its items a prefix, most recent first, then PAD) followed by the same
  row of `carried` (older items, most recent first), cut to the row length."""
  length = history.shape[1]
  own = (history != PAD).sum(axis=1, keepdims=True)
  slot = np.arange(length)[None, :]
  from_carried = np.take_along_axis(carried, np.clip(slot - own, 0, length - 1), axis=1)
  return np.where(slot < own, history, from_carried).astype(np.int32)
