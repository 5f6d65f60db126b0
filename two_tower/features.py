"""Feature tables of the catalog on device, and the gathers that turn row indices into features.

Training examples carry only row indices (plus the history bag, which depends on the example's
time); user and item features are looked up here, on device, which keeps the input pipeline light
and gives negatives sampled on device their features for free.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pipelines.prepare import PreparedData

Catalog = Mapping[str, Mapping[str, jax.Array]]  # {"user": {name: [U, ...]}, "item": {name: [I, ...]}}

SAMPLING_PROB = "sampling_prob"
# catalog[SIZES][side]: the real number of rows of a catalog padded by `pad_catalog`.
SIZES = "sizes"
# The features that are an entity's own ID (pipelines/prepare.py names them "<side>_id").
ID_FEATURES = ("user_id", "item_id")


def load_catalog(data: PreparedData, query_features: Sequence[str], item_features: Sequence[str]
                 ) -> dict[str, dict[str, np.ndarray]]:
  """The host copy of the tables the model reads (history comes with each example instead)."""
  user_names = [n for n in query_features if n != "history"] + ["history"]
  return {
      "user": data.tables("user", user_names),
      "item": data.tables("item", [*item_features, SAMPLING_PROB]),
  }


def padded_rows(n: int) -> int:
  """`n` rounded up to a multiple of 2^(floor(log2 n) - 1): at most 50% more rows (of a few
  integer columns: small beside the embedding tables), and the same for every n between two such
  multiples, which a catalog growing a few percent a day crosses every week or two."""
  step = 1 << max(0, n.bit_length() - 2)
  return -(-n // step) * step


def pad_catalog(catalog: Mapping[str, Mapping[str, np.ndarray]],
                rows_at_least: Mapping[str, int] | None = None) -> dict[str, dict[str, np.ndarray]]:
  """`catalog` with each side's tables padded with rows of zeros (never looked up), and its real
  row counts under SIZES. A side is padded to `rows_at_least[side]` rows when it has no more,
  else to `padded_rows`. A catalog that grows a little, as the nightly job's does from one day to
  the next, keeps its shapes, so the training step compiled for it is reused (from the persistent
  compilation cache) instead of compiled again."""
  rows_at_least = rows_at_least or {}
  out: dict[str, dict] = {SIZES: {}}
  for side, tables in catalog.items():
    rows = len(next(iter(tables.values())))
    size = rows_at_least.get(side, 0)
    size = size if rows <= size else padded_rows(rows)
    out[side] = {name: np.pad(t, [(0, size - rows)] + [(0, 0)] * (t.ndim - 1))
                 for name, t in tables.items()}
    out[SIZES][side] = np.int32(rows)
  return out


def num_rows(catalog: Catalog, side: str):
  """The real number of rows of a side of the catalog (a traced scalar when padded)."""
  if SIZES in catalog:
    return catalog[SIZES][side]
  return next(iter(catalog[side].values())).shape[0]


def query_features(catalog: Catalog, user_index: jax.Array, history: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
  """Features of users; `history` overrides the users' latest training history."""
  out = {name: jnp.take(table, user_index, axis=0) for name, table in catalog["user"].items()
         if not (name == "history" and history is not None)}
  if history is not None:
    out["history"] = history
  return out


def item_features(catalog: Catalog, item_index: jax.Array) -> dict[str, jax.Array]:
  return {name: jnp.take(table, item_index, axis=0) for name, table in catalog["item"].items()
          if name != SAMPLING_PROB}


def drop_ids(features: dict[str, jax.Array], key: jax.Array, rate: float, num_oov: int
             ) -> dict[str, jax.Array]:
  """ID dropout (config.model.id_dropout): each example's own ID row (user_id, item_id) is
  replaced with probability `rate` by a hashed-bucket row (1 + row % num_oov), the kind of row a
  cold ID (one without interactions yet) is looked up to. The bucket rows learn "an ID the model
  does not know", and the other features must carry the signal for such examples, as they do for
  tonight's new items. Rows that are already padding or buckets stay."""
  out = dict(features)
  for i, name in enumerate(n for n in ID_FEATURES if n in features):
    rows = features[name]
    drop = jax.random.bernoulli(jax.random.fold_in(key, i), rate, rows.shape) & (rows > num_oov)
    out[name] = jnp.where(drop, 1 + rows % num_oov, rows).astype(rows.dtype)
  return out
