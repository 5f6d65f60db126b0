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


def load_catalog(data: PreparedData, query_features: Sequence[str], item_features: Sequence[str]
                 ) -> dict[str, dict[str, np.ndarray]]:
  """The host copy of the tables the model reads (history comes with each example instead)."""
  user_names = [n for n in query_features if n != "history"] + ["history"]
  return {
      "user": data.tables("user", user_names),
      "item": data.tables("item", [*item_features, SAMPLING_PROB]),
  }


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
