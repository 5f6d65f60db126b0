"""Row-sparse embedding updates (`optimizer.embeddings="rowwise_adagrad"`).

With `optimizer.embeddings="dense"` an embedding table is a parameter like any other: its gradient
is a dense [rows, dim] array and the optimizer reads and writes every row and every row's state on
every step, which past a million rows costs more than the model. Here a step instead

  1. collects the row ids each table is looked up with (every feature of both towers that reads
     it, so a table shared by the history bag and the item tower is one set of ids) and
     deduplicates them (`jnp.unique` with a static size; free slots hold an out-of-range id);
  2. gathers those rows into a small table and differentiates the loss with respect to it: the
     gradient of a row is the sum over its occurrences in the batch, a [unique ids, dim] array;
  3. updates the gathered rows by row-wise Adagrad, one accumulator per row (TorchRec's and TPU
     embedding's default):  acc += mean(g_row ** 2);  row -= lr * g_row / sqrt(acc + EPSILON),
     and scatters rows and accumulators back (out-of-range ids dropped). On a mesh the table and
     its accumulators are row-sharded alike, so each device writes only the rows it owns.

Rows the batch does not touch, and their accumulators, are not read or written. The dense layers
keep their optax optimizer (`optimizer.name`). Everything is one optax `partition` (see
`two_tower.optim`), so the optimizer state is an ordinary pytree: checkpoints, resumption,
restoring onto another mesh and warm starts treat it like any other optimizer's.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from two_tower.trees import path_name

EPSILON = 1e-10  # in the square root: keeps the step finite for a row whose gradients were all zero
TOWERS = ("query_tower", "item_tower")
DENSE, ROWS = "dense", "rows"  # optax partition labels


def is_table(path: str) -> bool:
  """Whether the parameter at `path` is an embedding table (".../tables/<feature>/embedding")."""
  parts = path.split("/")
  return len(parts) >= 3 and parts[-1] == "embedding" and parts[-3] == "tables"


def labels(params: Any) -> Any:
  """The optax partition label of each parameter: embedding tables are updated by rows."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: ROWS if is_table(path_name(p)) else DENSE, params)


# ----------------------------------------------------------------------------- the lookups


def table_of_feature(model: nnx.Module) -> dict[tuple[str, str], str]:
  """{(tower, feature): path, in the model's parameter state, of the table that feature looks
  up}. A shared table (model.share_item_embeddings) has one path, the one `nnx.state` gives it."""
  paths = {id(node): "/".join(map(str, p)) for p, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Param)}
  return {(tower, name): paths[id(embed.embedding)]
          for tower in TOWERS for name, embed in getattr(model, tower).embedding.tables.items()}


class SparseLookups(NamedTuple):
  rows: dict[str, jax.Array]  # table path -> [U] distinct row ids (free slots: out of range)
  gathered: dict[str, jax.Array]  # table path -> [U, dim] those rows (zeros in free slots)
  inputs: dict[str, dict[str, jax.Array]]  # tower -> features, table ids as slots of `rows`


def gather_rows(params: Any, inputs: Mapping[str, Mapping[str, jax.Array]],
                where: Mapping[tuple[str, str], str]) -> SparseLookups:
  """The distinct rows each table is looked up with by `inputs` ({tower: {feature: ids}})."""
  tables = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if is_table(path_name(p))}
  readers: dict[str, list[tuple[str, str]]] = {}
  for (tower, name), path in where.items():
    if name in inputs[tower]:
      readers.setdefault(path, []).append((tower, name))
  rows, gathered = {}, {}
  remapped = {tower: dict(features) for tower, features in inputs.items()}
  for path, users in readers.items():
    table = tables[path]
    num_rows = table.shape[0]
    ids = jnp.concatenate([inputs[t][n].reshape(-1) for t, n in users])
    unique, slot = jnp.unique(ids, size=min(ids.size, num_rows), fill_value=num_rows,
                              return_inverse=True)
    slot = slot.reshape(-1)
    offset = 0
    for t, n in users:
      shape = inputs[t][n].shape
      size = inputs[t][n].size
      remapped[t][n] = slot[offset:offset + size].reshape(shape)
      offset += size
    rows[path] = unique
    gathered[path] = table.at[unique].get(mode="fill", fill_value=0)
  return SparseLookups(rows, gathered, remapped)


def replace_tables(params: Any, tables: Mapping[str, jax.Array]) -> Any:
  """`params` with the leaves at the paths of `tables` replaced."""
  return jax.tree_util.tree_map_with_path(lambda p, x: tables.get(path_name(p), x), params)


def apply_updates(params: Any, updates: Any, rows: Mapping[str, jax.Array]) -> Any:
  """optax.apply_updates, except that a table's update holds only the rows `rows[path]`, which are
  added where they belong (ids out of range, the free slots, dropped)."""
  def one(path, p, u):
    name = path_name(path)
    if name in rows:
      return p.at[rows[name]].add(u.astype(p.dtype), mode="drop")
    return jnp.asarray(p + u).astype(p.dtype)
  return jax.tree_util.tree_map_with_path(one, params, updates)


# ----------------------------------------------------------------------------- the optimizer


class RowwiseAdagradState(NamedTuple):
  accumulators: Any  # one float32 per table row, the tables' tree structure


def scale_by_rowwise_adagrad() -> optax.GradientTransformationExtraArgs:
  """Row-wise Adagrad's direction for gathered table rows: g / sqrt(acc + EPSILON), with each
  touched row's accumulator first increased by the mean of its squared gradient.

  `init` takes the tables; `update` takes the gradients of the gathered rows ([U, dim] per table)
  and, as the extra argument `rows`, {table path: [U] row ids} (free slots out of range).
  """
  def init(params):
    return RowwiseAdagradState(jax.tree.map(lambda t: jnp.zeros(t.shape[:1], jnp.float32), params))

  def update(updates, state, params=None, *, rows, **extra):
    del params, extra
    ids = lambda path: rows[path_name(path)]  # noqa: E731
    acc_rows = jax.tree_util.tree_map_with_path(
        lambda p, g, acc: acc.at[ids(p)].get(mode="fill", fill_value=0)
        + jnp.mean(jnp.square(g), axis=1), updates, state.accumulators)
    directions = jax.tree.map(lambda g, a: g * jax.lax.rsqrt(a + EPSILON)[:, None],
                              updates, acc_rows)
    accumulators = jax.tree_util.tree_map_with_path(
        lambda p, acc, a: acc.at[ids(p)].set(a, mode="drop"), state.accumulators, acc_rows)
    return directions, RowwiseAdagradState(accumulators)

  return optax.GradientTransformationExtraArgs(init, update)


def rowwise_adagrad(dense: optax.GradientTransformation,
                    embedding_learning_rate: optax.ScalarOrSchedule
                    ) -> optax.GradientTransformation:
  """`dense` for every parameter but the embedding tables, row-wise Adagrad for the tables."""
  rows = optax.chain(scale_by_rowwise_adagrad(),
                     optax.scale_by_learning_rate(embedding_learning_rate))
  return optax.partition({DENSE: dense, ROWS: rows}, labels)


# ----------------------------------------------------------------------------- the step


LossFn = Callable[[Any, Mapping[str, Mapping[str, jax.Array]]], tuple[jax.Array, dict]]


def value_grad_and_update(loss_fn: LossFn, params: Any, opt_state: Any,
                          inputs: Mapping[str, Mapping[str, jax.Array]], *, graphdef,
                          tx: optax.GradientTransformation):
  """One row-sparse optimizer step: (new params, new optimizer state, loss metrics, gradient
  norm). `loss_fn(params, inputs)` is the model's loss for features `inputs` ({tower: {feature:
  ids}}); `tx` is `rowwise_adagrad(...)`."""
  where = table_of_feature(nnx.merge(graphdef, params))
  lookups = gather_rows(params, inputs, where)
  sparse_params = replace_tables(params, lookups.gathered)
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(sparse_params, lookups.inputs)
  updates, opt_state = tx.update(grads, opt_state, sparse_params, rows=lookups.rows)
  # The gradient of a gathered row is the sum over its occurrences, so this is the norm of the
  # dense gradient.
  return (apply_updates(params, updates, lookups.rows), opt_state, metrics,
          optax.tree.norm(grads))
