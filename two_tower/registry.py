"""The ID registry: raw IDs and feature tokens -> embedding-table rows, stable across days.

A model trained every night sees new users, items and tokens each day. The registry gives each of
them a row of its embedding table that it keeps for as long as it lives, so yesterday's rows (and
their optimizer state) stay valid today:

  * row 0 is padding and rows 1..num_oov are hashed buckets, as in `pipelines.vocab.Vocabulary`;
  * an ID gets its own row once it has occurred `min_count` times (counted over days); until then
    it shares a hashed bucket (so a brand-new item with features but no interactions is embedded
    from the shared bucket row plus its real features: cold start);
  * an ID unseen for more than `expire_after_days` days is evicted: its row is freed and reused by
    a later new ID (the warm start re-initialises the row and its optimizer slots);
  * a table's capacity (its row count) only grows, in whole chunks, so every size stays a multiple
    of config.mesh.table_row_multiple and tables stay row-sharded over the model axis; and when it
    grows, by at least `min_growth` of itself, so that a table growing a little every day changes
    shape (and makes the next training step compile again) only every few days.

`Registry.advance` is a pure function of yesterday's registry and today's data; the nightly job
saves the result with the day's checkpoints (`save`, atomic).
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from typing import Mapping

import numpy as np

from two_tower import atomic

PAD = 0


def _hashed_bucket(ids: np.ndarray, num_oov: int) -> np.ndarray:
  # The same buckets as pipelines.vocab.Vocabulary.lookup, so both layouts agree on OOV rows.
  return np.asarray([1 + zlib.crc32(str(t).encode()) % num_oov for t in ids.tolist()], np.int32)


def _counts(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  uniq, counts = np.unique(np.asarray(tokens).astype(str), return_counts=True)
  return uniq, counts.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Change:
  """What one day did to one vocabulary."""

  added: np.ndarray  # IDs that got their own row today
  evicted: np.ndarray  # IDs whose row was freed today
  capacity_before: int
  capacity: int


@dataclasses.dataclass(frozen=True)
class VocabRegistry:
  """One vocabulary: the IDs that own rows, and those still counting towards `min_count`."""

  ids: np.ndarray  # [n] str, sorted: the IDs that own a row
  rows: np.ndarray  # [n] int64: their rows
  counts: np.ndarray  # [n] occurrences so far
  last_seen: np.ndarray  # [n] day number of the latest occurrence
  pending_ids: np.ndarray  # [m] str, sorted: seen, but fewer than min_count times (no row yet)
  pending_counts: np.ndarray
  pending_last_seen: np.ndarray
  capacity: int  # table rows (padding and hashed buckets included)
  num_oov: int

  @classmethod
  def empty(cls, num_oov: int, chunk: int) -> VocabRegistry:
    none = np.zeros(0, np.int64)
    return cls(np.zeros(0, "<U1"), none, none, none, np.zeros(0, "<U1"), none, none,
               capacity=-(-(1 + num_oov) // chunk) * chunk, num_oov=num_oov)

  @property
  def size(self) -> int:
    return self.capacity

  def lookup(self, tokens) -> np.ndarray:
    """Rows of `tokens`: their own row when registered, else a hashed bucket."""
    tokens = np.asarray(tokens).astype(str)
    out = np.empty(tokens.shape, np.int32)
    if len(self.ids):
      pos = np.searchsorted(self.ids, tokens).clip(0, len(self.ids) - 1)
      found = self.ids[pos] == tokens
      out[found] = self.rows[pos[found]]
    else:
      found = np.zeros(tokens.shape, bool)
    if (~found).any():
      out[~found] = _hashed_bucket(tokens[~found], self.num_oov)
    return out

  def lookup_bags(self, bags, length: int) -> np.ndarray:
    """Token bags -> a [len(bags), length] row matrix padded with PAD."""
    out = np.full((len(bags), length), PAD, np.int32)
    for i, bag in enumerate(bags):
      bag = list(bag)[:length]
      if bag:
        out[i, :len(bag)] = self.lookup(np.asarray(bag))
    return out

  def owners(self) -> np.ndarray:
    """[capacity] the ID owning each row ("" for padding, buckets and free rows)."""
    out = np.full(self.capacity, "", dtype=self.ids.dtype if len(self.ids) else "<U1")
    out[self.rows] = self.ids
    return out

  def advance(self, tokens, day: int, *, min_count: int, expire_after_days: int, chunk: int,
              min_growth: float = 0.0) -> tuple[VocabRegistry, Change]:
    """The registry after day `day`, whose occurrences are `tokens` (with repetition)."""
    seen, seen_counts = _counts(tokens)
    ids, rows, counts, last = self.ids, self.rows, self.counts.copy(), self.last_seen.copy()
    # Registered IDs seen today.
    pos = np.searchsorted(ids, seen).clip(0, max(len(ids) - 1, 0))
    known = (ids[pos] == seen) if len(ids) else np.zeros(len(seen), bool)
    np.add.at(counts, pos[known], seen_counts[known])
    last[pos[known]] = day
    # The others join (or stay in) the pending list.
    p_ids = np.concatenate([self.pending_ids, seen[~known]])
    p_counts = np.concatenate([self.pending_counts, seen_counts[~known]])
    p_last = np.concatenate([self.pending_last_seen, np.full((~known).sum(), day, np.int64)])
    p_ids, inverse = np.unique(p_ids, return_inverse=True)
    p_counts = np.bincount(inverse, weights=p_counts, minlength=len(p_ids)).astype(np.int64)
    latest = np.full(len(p_ids), np.iinfo(np.int64).min)
    np.maximum.at(latest, inverse, p_last)
    p_last = latest
    # Eviction: unseen for more than expire_after_days days.
    evicted = np.zeros(0, ids.dtype)
    if expire_after_days > 0:
      stale = last < day - expire_after_days
      evicted = ids[stale]
      ids, rows, counts, last = ids[~stale], rows[~stale], counts[~stale], last[~stale]
      fresh = p_last >= day - expire_after_days
      p_ids, p_counts, p_last = p_ids[fresh], p_counts[fresh], p_last[fresh]
    # Promotion: IDs that reached min_count take the lowest free rows (freed rows of evicted IDs
    # included), and the table grows by whole chunks only when no free row is left.
    promote = p_counts >= min_count
    order = np.lexsort((p_ids[promote], -p_counts[promote]))  # frequent first, then by ID
    new_ids = p_ids[promote][order]
    capacity = self.capacity
    taken = np.zeros(capacity, bool)
    taken[:1 + self.num_oov] = True
    taken[rows] = True
    free = np.flatnonzero(~taken)
    if len(free) < len(new_ids):
      needed = max(capacity + len(new_ids) - len(free), math.ceil(capacity * (1 + min_growth)))
      capacity = -(-needed // chunk) * chunk
      free = np.r_[free, np.arange(self.capacity, capacity)]
    new_rows = free[:len(new_ids)]
    all_ids = np.concatenate([ids, new_ids])
    sort = np.argsort(all_ids, kind="stable")
    registry = VocabRegistry(
        ids=all_ids[sort],
        rows=np.concatenate([rows, new_rows]).astype(np.int64)[sort],
        counts=np.concatenate([counts, p_counts[promote][order]])[sort],
        last_seen=np.concatenate([last, p_last[promote][order]])[sort],
        pending_ids=p_ids[~promote], pending_counts=p_counts[~promote],
        pending_last_seen=p_last[~promote], capacity=capacity, num_oov=self.num_oov)
    return registry, Change(new_ids, evicted, self.capacity, capacity)


@dataclasses.dataclass(frozen=True)
class Registry:
  """Every vocabulary of a model (`user_id`, `item_id` and each categorical or multi-valued
  feature), the numeric features' standardisation (fixed on the first day, so a number means the
  same to the model every day) and the last day applied."""

  vocabs: Mapping[str, VocabRegistry]
  numeric: Mapping[str, tuple[float, float]]  # feature -> (mean, std)
  day: int  # -1: no day applied yet

  @classmethod
  def empty(cls) -> Registry:
    return cls({}, {}, -1)

  def vocab(self, name: str) -> VocabRegistry:
    return self.vocabs[name]

  def save(self, path: str) -> None:
    arrays = {"meta": np.asarray(json.dumps(
        {"day": self.day, "numeric": self.numeric,
         "vocabs": {n: {"capacity": v.capacity, "num_oov": v.num_oov} for n, v in self.vocabs.items()}}))}
    for name, v in self.vocabs.items():
      for field in ("ids", "rows", "counts", "last_seen", "pending_ids", "pending_counts",
                    "pending_last_seen"):
        arrays[f"{name}/{field}"] = getattr(v, field)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
      np.savez(f, **arrays)

  @classmethod
  def load(cls, path) -> Registry:
    """From a path, or a binary file object."""
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      vocabs = {name: VocabRegistry(
          **{f: z[f"{name}/{f}"] for f in ("ids", "rows", "counts", "last_seen", "pending_ids",
                                          "pending_counts", "pending_last_seen")}, **sizes)
                for name, sizes in meta["vocabs"].items()}
    return cls(vocabs, {k: tuple(v) for k, v in meta["numeric"].items()}, meta["day"])


@dataclasses.dataclass(frozen=True)
class RegistryConfig:
  min_count: int  # occurrences of an ID before it gets its own row
  expire_after_days: int  # 0: never evict
  chunk: int  # capacity grows by multiples of this (already a multiple of the row multiple)
  num_oov: int
  feature_min_count: int = 1
  min_growth: float = 0.0  # a table that must grow grows by at least this share of its capacity


def chunk_rows(row_chunk: int, table_row_multiple: int) -> int:
  """The growth unit: a multiple of both the configured chunk and the mesh's row multiple."""
  return math.lcm(max(1, int(row_chunk)), max(1, int(table_row_multiple)))


def advance(registry: Registry, raw, day: int, cfg: RegistryConfig
            ) -> tuple[Registry, dict[str, Change]]:
  """Yesterday's registry + today's raw data (`pipelines.sources.RawData`) -> today's registry.

  IDs count their occurrences in the day's interactions; feature tokens count the entities of the
  day's user and item tables that carry them (features are known for items without interactions).
  Only IDs expire: a token of a feature is part of the feature's meaning."""
  if day <= registry.day:
    raise ValueError(f"day {day} was already applied to this registry (last day {registry.day})")
  vocabs, changes = dict(registry.vocabs), {}

  def step(name: str, tokens, *, min_count: int, expire: int) -> None:
    before = vocabs.get(name) or VocabRegistry.empty(cfg.num_oov, cfg.chunk)
    vocabs[name], changes[name] = before.advance(
        tokens, day, min_count=min_count, expire_after_days=expire, chunk=cfg.chunk,
        min_growth=cfg.min_growth)

  for side in ("user", "item"):
    step(f"{side}_id", raw.ids(side), min_count=cfg.min_count,
         expire=cfg.expire_after_days)
  numeric = dict(registry.numeric)
  for f in raw.features:
    table = raw.users if f.side == "user" else raw.items
    if f.kind == "numeric":
      if f.name not in numeric:
        values = np.asarray(table[f.name], np.float64)
        std = float(values.std())
        numeric[f.name] = (float(values.mean()), std if std > 0 else 1.0)
    elif f.kind == "multi":
      step(f.name, np.asarray([str(t) for bag in table[f.name] for t in bag], dtype=str),
           min_count=cfg.feature_min_count, expire=0)
    else:
      step(f.name, table[f.name], min_count=cfg.feature_min_count, expire=0)
  return Registry(vocabs, numeric, day), changes


def carried_rows(before: VocabRegistry | None, after: VocabRegistry) -> np.ndarray:
  """[after.capacity] bool: rows whose embedding (and optimizer slots) carry over from `before`:
  padding and hashed buckets, and rows owned by the same ID on both days. Every other row (a new
  ID, a reused row of an evicted ID, a free row) starts as the model initialises it."""
  out = np.zeros(after.capacity, bool)
  if before is None:
    return out
  out[:1 + after.num_oov] = True
  n = min(before.capacity, after.capacity)
  owners_before, owners_after = before.owners()[:n], after.owners()[:n]
  out[:n] |= (owners_before == owners_after) & (owners_after != "")
  return out
