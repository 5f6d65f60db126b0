"""Vocabularies built on the training split, with hashed out-of-vocabulary buckets.

Index layout of every vocabulary: 0 is padding / missing, 1..num_oov are OOV buckets, then the known
values in order of decreasing training frequency (ties broken by value, so the layout is
deterministic).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from pipelines.schema import PAD


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  values: np.ndarray  # known values, in index order (index = position + 1 + num_oov)
  num_oov: int
  _sorted: np.ndarray = dataclasses.field(repr=False)
  _order: np.ndarray = dataclasses.field(repr=False)

  @classmethod
  def build(
      cls, tokens: np.ndarray, *, num_oov: int = 1, min_count: int = 1, max_size: int = 0
  ) -> Vocabulary:
    if num_oov < 1:
      raise ValueError(f"num_oov_buckets must be >= 1, got {num_oov}")
    uniq, counts = np.unique(np.asarray(tokens), return_counts=True)
    keep = counts >= min_count
    uniq, counts = uniq[keep], counts[keep]
    order = np.lexsort((uniq, -counts))  # frequency desc, then value asc
    values = uniq[order]
    if max_size > 0:
      values = values[:max_size]
    sort_idx = np.argsort(values, kind="stable")
    return cls(values=values, num_oov=num_oov, _sorted=values[sort_idx], _order=sort_idx)

  @property
  def size(self) -> int:
    """Rows of an embedding table over this vocabulary (padding and OOV buckets included)."""
    return 1 + self.num_oov + len(self.values)

  def lookup(self, tokens: np.ndarray) -> np.ndarray:
    """Maps tokens to indices; unknown tokens hash into the OOV buckets."""
    tokens = np.asarray(tokens)
    out = np.empty(tokens.shape, np.int32)
    if len(self._sorted) == 0:
      found = np.zeros(tokens.shape, bool)
    else:
      pos = np.searchsorted(self._sorted, tokens).clip(0, len(self._sorted) - 1)
      found = self._sorted[pos] == tokens
      out[found] = self._order[pos[found]] + 1 + self.num_oov
    if (~found).any():
      out[~found] = [1 + zlib.crc32(str(t).encode()) % self.num_oov for t in tokens[~found]]
    return out

  def lookup_bags(self, bags: Sequence[Sequence], length: int) -> np.ndarray:
    """Maps variable-length token bags to a [len(bags), length] index matrix padded with PAD."""
    out = np.full((len(bags), length), PAD, np.int32)
    lengths = np.array([min(len(b), length) for b in bags], np.int64)
    flat = [t for b in bags for t in list(b)[:length]]
    if flat:
      rows = np.repeat(np.arange(len(bags)), lengths)
      starts = np.cumsum(lengths) - lengths
      cols = np.arange(len(flat)) - np.repeat(starts, lengths)
      out[rows, cols] = self.lookup(np.asarray(flat))
    return out
