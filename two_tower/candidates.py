"""Batch candidate generation: every user's top K items from the live index, as Parquet shards.

Output directory OUT:

  _job.json            what the shards are (model step, index version, K, users), written first
  part-NNNNN.parquet   users [N * users_per_shard, (N + 1) * users_per_shard) of the user list
  _unknown_user_ids.txt  user IDs of --user_ids that are not in the catalog (skipped)
  _SUCCESS             counts, written last, once every shard exists

Parquet columns: user_id and item_id (the original IDs of the data, not vocabulary indices), rank
(int32, 1 = best), score (float32, the model's logit: query embedding . item embedding with the
temperature folded in), model_step (int64) and index_version (string). Rows are grouped by user in
rank order.

Training-history exclusion: a user's training items are dropped from their list. The search asks
for K + overfetch neighbours (overfetch: the 90th percentile of the users' training-item counts
by default); a user who still ends up with fewer than K is searched again with K + their
training-item count neighbours, which is always enough, and then, if the approximate search returns
too few, exactly. Only a user whose history covers nearly the whole catalog gets fewer than K.

Shards are written to a temporary name and renamed, so a shard that exists is complete; a rerun
after a crash skips them. A shard's batches are fixed by the job (users, users_per_shard,
batch_size, over-fetch: all recorded in _job.json, and a rerun with other values is refused), and
searching the same batch gives the same result, so a resumed job writes exactly what an
uninterrupted one would. (Float results can differ in the last bit between differently composed
batches, so another batching may order near-ties differently.)
With several JAX processes, shard N is written by process N % process_count.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Callable, Iterator

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from two_tower import atomic
from two_tower.errors import MissingArtifactError, UserError
from two_tower.index_store import LoadedIndex
from two_tower.search import exact_top_k

JOB = "_job.json"
SUCCESS = "_SUCCESS"
UNKNOWN_IDS = "_unknown_user_ids.txt"
METADATA_KEY = b"two_tower"
_SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")

Hook = Callable[[str], None]


class OutputMismatchError(UserError):
  """An output directory that holds results of another job."""


def shard_name(i: int) -> str:
  return f"part-{i:05d}.parquet"


# ----------------------------------------------------------------------------- users


@dataclasses.dataclass(frozen=True)
class UserList:
  rows: np.ndarray  # catalog rows to score, in output order
  unknown: list[str]  # IDs not in the catalog (skipped)
  duplicates: int  # repeated IDs (scored once)


def _lookup(raw_ids: np.ndarray, wanted: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(rows, found) of the string IDs `wanted` in the catalog's `raw_ids` (any dtype)."""
  raw_ids = np.asarray(raw_ids)
  if raw_ids.dtype.kind in "iu":
    parsed = np.zeros(len(wanted), np.int64)
    ok = np.zeros(len(wanted), bool)
    for j, text in enumerate(wanted):
      try:
        parsed[j], ok[j] = int(text), True
      except ValueError:
        pass
    keys = parsed
  else:
    keys, ok = np.asarray(wanted, dtype=str), np.ones(len(wanted), bool)
    raw_ids = raw_ids.astype(str)
  order = np.argsort(raw_ids, kind="stable")
  sorted_ids = raw_ids[order]
  pos = np.searchsorted(sorted_ids, keys).clip(0, max(len(sorted_ids) - 1, 0))
  found = ok & (len(sorted_ids) > 0) & (sorted_ids[pos] == keys)
  return np.where(found, order[pos], -1), found


def read_user_ids(path: str, raw_ids: np.ndarray) -> UserList:
  """The users listed in `path` (one ID per line; blank lines and # comments skipped)."""
  if not os.path.exists(path):
    raise MissingArtifactError(f"--user_ids file {path} does not exist: pass an existing file of "
                               "user IDs, one per line")
  with open(path) as f:
    wanted = [line.strip() for line in f]
  wanted = [w for w in wanted if w and not w.startswith("#")]
  rows, found = _lookup(raw_ids, wanted)
  unknown = [w for w, ok in zip(wanted, found) if not ok]
  rows = rows[found]
  _, first = np.unique(rows, return_index=True)
  keep = np.sort(first)
  return UserList(rows[keep].astype(np.int64), unknown, int(len(rows) - len(keep)))


# ----------------------------------------------------------------------------- exclusion


@dataclasses.dataclass(frozen=True)
class Exclusions:
  """Each user's training items, as sorted keys user_row * num_items + item_row."""

  keys: np.ndarray
  counts: np.ndarray  # distinct training items per user row
  num_items: int

  @classmethod
  def from_pairs(cls, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
                 ) -> Exclusions:
    keys = np.unique(np.asarray(users, np.int64) * num_items + np.asarray(items, np.int64))
    counts = np.bincount(keys // num_items, minlength=num_users)
    return cls(keys, counts, num_items)

  @classmethod
  def none(cls, num_users: int, num_items: int) -> Exclusions:
    return cls(np.zeros(0, np.int64), np.zeros(num_users, np.int64), num_items)

  def mask(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """bool [B, k]: items[b, j] is one of users[b]'s training items."""
    if not len(self.keys):
      return np.zeros(items.shape, bool)
    keys = users[:, None].astype(np.int64) * self.num_items + items
    pos = np.searchsorted(self.keys, keys).clip(0, len(self.keys) - 1)
    return self.keys[pos] == keys


def select(rows: np.ndarray, scores: np.ndarray, drop: np.ndarray, k: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The first k kept neighbours of each row: (rows [B, k] (-1 pad), scores [B, k], counts [B])."""
  keep = ~drop & (rows >= 0)
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept positions first, in rank order
  counts = np.minimum(keep.sum(1), k)
  out_rows = np.take_along_axis(rows, order, 1)
  out_scores = np.take_along_axis(scores, order, 1)
  pad = np.arange(out_rows.shape[1])[None, :] >= counts[:, None]
  out_rows[pad] = -1
  out_scores[pad] = -np.inf
  if out_rows.shape[1] < k:
    extra = k - out_rows.shape[1]
    out_rows = np.pad(out_rows, ((0, 0), (0, extra)), constant_values=-1)
    out_scores = np.pad(out_scores, ((0, 0), (0, extra)), constant_values=-np.inf)
  return out_rows, out_scores, counts


# ----------------------------------------------------------------------------- generation


def rescore(queries: np.ndarray, items: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact float32 scores of the selected items, re-sorted (best first, ties by item row)."""
  valid = rows >= 0
  gathered = np.asarray(items)[np.where(valid, rows, 0)]
  scores = np.einsum("bd,bkd->bk", queries, gathered).astype(np.float32)
  scores[~valid] = -np.inf
  order = np.lexsort((np.where(valid, rows, np.iinfo(np.int64).max), -scores.astype(np.float64)))
  return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


class Generator:
  """Top-K candidates for batches of users: query embeddings -> index search -> exclusion."""

  def __init__(self, index: LoadedIndex, query_stream: Callable[[np.ndarray], Iterator],
               exclusions: Exclusions, top_k: int, overfetch: int):
    self.index = index
    self.query_stream = query_stream
    self.exclusions = exclusions
    self.top_k = top_k
    self.num_items = index.num_items
    self.fetch = min(self.num_items, top_k + max(0, overfetch))
    self.refetched = 0  # users searched a second time
    self.exact_fallbacks = 0  # users searched exactly after that

  def _finish(self, users, queries, rows, scores):
    k = self.top_k
    rows, scores, counts = select(rows, scores, self.exclusions.mask(users, rows), k)
    # What a user can get at most: the catalog minus their training items.
    achievable = np.minimum(k, self.num_items - self.exclusions.counts[users])
    short = np.flatnonzero(counts < achievable)
    if len(short):
      self.refetched += len(short)
      need = np.minimum(self.num_items, k + self.exclusions.counts[users[short]])
      buckets = np.minimum(self.num_items, 2 ** np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))
      for fetch in np.unique(buckets):
        group = short[buckets == fetch]
        r, s = self.index.search(queries[group], int(fetch), precise_k=k)
        r, s, c = select(r, s, self.exclusions.mask(users[group], r), k)
        still = c < achievable[group]
        if still.any():  # the approximate search returned too few: search these users exactly
          self.exact_fallbacks += int(still.sum())
          lost = group[still]
          es, er = exact_top_k(queries[lost], self.index.item_embeddings, int(fetch))
          r2, s2, c2 = select(er, es, self.exclusions.mask(users[lost], er), k)
          r[still], s[still], c[still] = r2, s2, c2
        rows[group], scores[group], counts[group] = r, s, c
    if not self.index.settings.exact_scores:  # int8 brute force: report exact scores
      rows, scores = rescore(queries, self.index.item_embeddings, rows)
    return rows, scores, counts

  def __call__(self, users: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (user rows, item rows [B, K] (-1 pad), scores [B, K], counts [B]) batch by batch."""
    for batch_users, queries in self.query_stream(users):
      rows, scores = self.index.search(queries, self.fetch, precise_k=self.top_k)
      yield (batch_users,) + self._finish(batch_users.astype(np.int64), queries, rows, scores)


def default_overfetch(exclusions: Exclusions, users: np.ndarray, setting: int) -> int:
  """config.score.overfetch, or (-1) the 90th percentile of the users' training-item counts,
  rounded up to a multiple of 8."""
  if setting >= 0:
    return int(setting)
  if not len(users) or not len(exclusions.keys):
    return 0
  p90 = float(np.percentile(exclusions.counts[users], 90))
  return int(-(-int(np.ceil(p90)) // 8) * 8)


# ----------------------------------------------------------------------------- shards


def _arrow_ids(ids: np.ndarray) -> pa.Array:
  ids = np.asarray(ids)
  if ids.dtype.kind in "iu":
    return pa.array(ids.astype(np.int64), pa.int64())
  return pa.array(ids.astype(str), pa.string())


def shard_table(user_ids: np.ndarray, item_ids: np.ndarray, rows: np.ndarray, scores: np.ndarray,
                counts: np.ndarray, *, model_step: int, index_version: str) -> pa.Table:
  """The Parquet rows of a batch of users (`rows` are item rows, -1 past each user's count)."""
  valid = rows >= 0
  flat_rows = rows[valid]
  num = len(flat_rows)
  rank = (np.arange(rows.shape[1], dtype=np.int32)[None, :] + 1)
  table = pa.table({
      "user_id": _arrow_ids(np.repeat(user_ids, counts)),
      "rank": pa.array(np.broadcast_to(rank, rows.shape)[valid], pa.int32()),
      "item_id": _arrow_ids(np.asarray(item_ids)[flat_rows]),
      "score": pa.array(scores[valid].astype(np.float32), pa.float32()),
      "model_step": pa.array(np.full(num, model_step, np.int64), pa.int64()),
      # A one-entry dictionary expanded in C++: much cheaper than a Python list of num strings.
      "index_version": pa.DictionaryArray.from_arrays(
          pa.array(np.zeros(num, np.int32)), pa.array([index_version])).cast(pa.string()),
  })
  return table


def temp_tag() -> str:
  """The tag of this process's temporary shard files (see `remove_stale_temps`)."""
  return f"-p{jax.process_index()}"


def write_shard(path: str, table: pa.Table) -> None:
  """Writes atomically: a shard that exists is whole."""
  with atomic.atomic_path(path, tag=temp_tag()) as tmp:
    pq.write_table(table, tmp)


def remove_stale_temps(output: str) -> None:
  """Deletes the temporary shards a crashed run of this process left (other processes' are theirs)."""
  for stale in glob.glob(os.path.join(output, f".part-*.tmp{temp_tag()}-*")):
    os.unlink(stale)


def shard_metadata(path: str) -> dict | None:
  """The job metadata of a finished shard, or None if it cannot be read."""
  try:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[METADATA_KEY])
  except Exception:  # pylint: disable=broad-except  (unreadable: rewrite it)
    return None


def check_output(output: str, job: dict) -> dict | None:
  """Raises OutputMismatchError if `output` holds another job's results; returns its _SUCCESS."""
  job_path = os.path.join(output, JOB)
  if os.path.exists(job_path):
    with open(job_path) as f:
      theirs = json.load(f)
    if theirs.get("model_step") != job["model_step"]:
      raise OutputMismatchError(
          f"{output} holds candidates of model step {theirs.get('model_step')}, this job scores "
          f"step {job['model_step']}: write to a new --output (or delete that directory)")
    diffs = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in job.items() if theirs.get(k) != v]
    if diffs:
      raise OutputMismatchError(
          f"{output} holds candidates of another job:\n  " + "\n  ".join(diffs)
          + "\nWrite to a new --output (or delete that directory).")
  else:
    shards = sorted(n for n in os.listdir(output) if _SHARD_RE.match(n)) if os.path.isdir(output) else []
    if shards:
      meta = shard_metadata(os.path.join(output, shards[0])) or {}
      step = meta.get("model_step", "unknown")
      raise OutputMismatchError(
          f"{output} holds Parquet shards of another job (model step {step}) without a {JOB}: "
          "write to a new --output (or delete those files)")
  success = os.path.join(output, SUCCESS)
  if os.path.exists(success):
    with open(success) as f:
      return json.load(f)
  return None


def write_shards(generator: Generator, output: str, job: dict, shards: dict[int, np.ndarray], *,
                 user_raw: np.ndarray, item_ids: np.ndarray, on_users: Callable[[int], None],
                 hook: Hook) -> int:
  """Scores and writes shards {shard number: user rows}; returns the number of users scored."""
  scored = 0
  for i, shard_users in shards.items():
    tables = []
    short = 0
    refetched, exact = generator.refetched, generator.exact_fallbacks
    for batch_users, rows, scores, counts in generator(shard_users):
      short += int((counts < generator.top_k).sum())
      tables.append(shard_table(user_raw[batch_users], item_ids, rows, scores, counts,
                                model_step=job["model_step"], index_version=job["index_version"]))
      on_users(len(batch_users))
      scored += len(batch_users)
    meta = {"job": job, "shard": i, "num_users": int(len(shard_users)),
            "num_rows": int(sum(t.num_rows for t in tables)), "users_with_fewer_than_k": short,
            "users_searched_again": generator.refetched - refetched,
            "users_searched_exactly": generator.exact_fallbacks - exact}
    table = pa.concat_tables(tables).replace_schema_metadata(
        {METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    write_shard(os.path.join(output, shard_name(i)), table)
    hook(f"shard:{i}")
  return scored


# ----------------------------------------------------------------------------- summary


def write_success(output: str, job: dict, num_shards: int, users: UserList, overfetch: int,
                   seconds: float, users_per_s: float | None) -> dict:
  totals = dict.fromkeys(("users", "rows", "users_with_fewer_than_k", "users_searched_again",
                          "users_searched_exactly"), 0)
  for i in range(num_shards):
    meta = shard_metadata(os.path.join(output, shard_name(i)))
    if meta is None or meta.get("job") != job:
      raise RuntimeError(f"shard {shard_name(i)} of {output} is missing or unreadable after the "
                         "run: rerun the job to write it")
    totals["users"] += meta["num_users"]
    totals["rows"] += meta["num_rows"]
    for key in ("users_with_fewer_than_k", "users_searched_again", "users_searched_exactly"):
      totals[key] += meta[key]
  success = {
      **totals,
      "shards": num_shards,
      "unknown_user_ids": len(users.unknown),
      "duplicate_user_ids": users.duplicates,
      "top_k": job["top_k"],
      "model_step": job["model_step"],
      "index_version": job["index_version"],
      "exclude_history": job["exclude_history"],
      "overfetch": overfetch,
      "seconds": seconds,
      "users_per_s": users_per_s,
      "output": os.path.abspath(output),
  }
  atomic.write_json(os.path.join(output, SUCCESS), success)
  return success
