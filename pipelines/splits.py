"""Train / validation / test assignment of interactions: computed by a rule (`random`,
`per_user_ratio`, `temporal_*`) or given by the data (`predefined`: a split column or one set of
files per split, read by the source)."""

from __future__ import annotations

import numpy as np

TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "validation", "test")
KINDS = ("random", "per_user_ratio", "temporal_last_n", "temporal_global", "predefined")


def split_id(name: str) -> int:
  """TRAIN / VALIDATION / TEST of a split name; ValueError for any other name."""
  if name not in SPLIT_NAMES:
    raise ValueError(f"unknown split {name!r}: expected one of {SPLIT_NAMES}")
  return SPLIT_NAMES.index(name)


def order_by(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
  """The indices that sort rows by (major, minor), ties in row order: np.lexsort((minor, major))
  at a fraction of the cost. `major` holds non-negative integers (rows of a table)."""
  major = np.asarray(major)
  if len(major) and minor.dtype.kind in "iu":
    low, span = int(minor.min()), int(minor.max()) - int(minor.min()) + 1
    if span * (int(major.max()) + 1) < 1 << 62:  # one integer key
      key = major.astype(np.int64) * span + (minor.astype(np.int64) - low)
      return np.argsort(key, kind="stable")
  order = np.argsort(minor, kind="stable")
  return order[np.argsort(major[order], kind="stable")]


def _ratio_counts(n: np.ndarray, ratios) -> tuple[np.ndarray, np.ndarray]:
  """Per-group validation and test counts for a train:valid:test ratio (RecBole's rounding)."""
  r = np.asarray(ratios, np.float64) / np.sum(ratios)
  n_valid = np.floor(n * r[1]).astype(np.int64)
  n_test = np.floor(n * r[2]).astype(np.int64)
  return n_valid, n_test


def assign(user: np.ndarray, timestamp: np.ndarray, cfg, given: np.ndarray | None = None) -> np.ndarray:
  """Returns the split (TRAIN / VALIDATION / TEST) of every interaction. `cfg` is data.split;
  `given` is the split the source read from the data (a split column or files per split), which
  only kind "predefined" uses, and which it requires."""
  if cfg.kind == "predefined" or given is not None:
    return _predefined(cfg.kind, given)
  n = len(user)
  rng = np.random.default_rng(cfg.seed)
  out = np.full(n, TRAIN, np.int8)
  if cfg.kind == "random":
    n_valid, n_test = _ratio_counts(np.array([n]), cfg.ratios)
    perm = rng.permutation(n)
    out[perm[: n_valid[0]]] = VALIDATION
    out[perm[n_valid[0]: n_valid[0] + n_test[0]]] = TEST
    return out
  if cfg.kind == "temporal_global":
    q_valid, q_test = cfg.time_quantiles
    if not 0 < q_valid <= q_test <= 1:
      raise ValueError(f"data.split.time_quantiles must satisfy 0 < valid <= test <= 1, got {cfg.time_quantiles}")
    t_valid, t_test = np.quantile(timestamp, [q_valid, q_test], method="higher")
    out[timestamp >= t_valid] = VALIDATION
    out[timestamp >= t_test] = TEST
    return out
  # Per-user kinds: order each user's interactions (randomly or by time), then cut from the end.
  if cfg.kind == "per_user_ratio":
    order = order_by(user, rng.random(n))
  elif cfg.kind == "temporal_last_n":
    order = order_by(user, timestamp)
  else:
    raise ValueError(f"data.split.kind must be one of {KINDS}, got {cfg.kind!r}")
  sorted_user = user[order]
  starts = np.r_[0, np.flatnonzero(sorted_user[1:] != sorted_user[:-1]) + 1]
  sizes = np.diff(np.r_[starts, n])
  if cfg.kind == "per_user_ratio":
    n_valid, n_test = _ratio_counts(sizes, cfg.ratios)
  else:
    # Keep at least one training interaction per user.
    n_test = np.minimum(cfg.last_n, np.maximum(sizes - 1, 0))
    n_valid = np.minimum(cfg.last_n_validation, np.maximum(sizes - 1 - n_test, 0))
  rank_from_end = np.repeat(starts + sizes, sizes) - 1 - np.arange(n)
  split_sorted = np.where(rank_from_end < np.repeat(n_test, sizes), TEST,
                          np.where(rank_from_end < np.repeat(n_test + n_valid, sizes), VALIDATION, TRAIN))
  out[order] = split_sorted
  return out


def _predefined(kind: str, given: np.ndarray | None) -> np.ndarray:
  # Imported here: pipelines.sources imports this module (split names).
  from pipelines.sources import DataError
  if given is None:
    raise DataError(
        "data.split.kind='predefined' takes each interaction's split from the data, but the "
        "source gives none: use data.source='logs' with data.logs.split_column (a column of "
        "train / validation / test) or data.logs.split_files (files per split)")
  if kind != "predefined":
    raise DataError(
        f"the data gives each interaction's split (data.logs.split_column or data.logs.split_files "
        f"is set) but data.split.kind={kind!r} would compute another: set "
        "data.split.kind='predefined', or unset the split column / split files")
  return np.asarray(given, np.int8)
