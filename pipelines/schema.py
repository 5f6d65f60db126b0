"""The prepared dataset's schema: which features exist, on which tower, and their sizes.

The schema is written as `schema.json` next to the ArrayRecord files and is all the model needs to
size its embedding tables.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

from two_tower.errors import ConfigError

Side = Literal["user", "item"]
# id: the user or item ID; categorical: one token; multi: a bag of tokens (mean-pooled);
# numeric: one standardised float; history: the user's recent items (a bag over the item-ID vocab).
Kind = Literal["id", "categorical", "multi", "numeric", "history"]

PAD = 0  # index 0 of every vocabulary is padding / missing; OOV buckets follow, then known values.


@dataclasses.dataclass(frozen=True)
class Feature:
  name: str
  side: Side
  kind: Kind
  vocab_size: int = 0  # id / categorical / multi / history: rows of the embedding table
  length: int = 1  # multi / history: fixed bag length (padded with PAD)


@dataclasses.dataclass(frozen=True)
class Schema:
  features: tuple[Feature, ...]
  num_users: int
  num_items: int
  history_length: int
  split_sizes: dict[str, int]

  def feature(self, name: str) -> Feature:
    for f in self.features:
      if f.name == name:
        return f
    raise ConfigError(
        f"feature {name!r} is not in this dataset; available: {[f.name for f in self.features]}"
    )

  def side(self, side: Side) -> tuple[Feature, ...]:
    return tuple(f for f in self.features if f.side == side)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> Schema:
    raw = json.loads(text)
    raw["features"] = tuple(Feature(**f) for f in raw["features"])
    return cls(**raw)
