"""Names of pytree leaves, for messages and comparisons."""

from __future__ import annotations

from typing import Any

import jax


def path_name(path) -> str:
  """'query_tower/embedding/tables/user_id/embedding' for the pytree path of a leaf."""
  name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  return name.removesuffix("/value")  # nnx.Variable's own leaf


def named_leaves(tree: Any) -> dict[str, Any]:
  """{path name: leaf} of a pytree."""
  return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
