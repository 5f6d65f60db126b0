"""The model's parameters and the train state, created directly in their shardings on the mesh."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from pipelines.schema import Schema
from two_tower import item_frequency, sharding
from two_tower.model import TwoTower


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  # loss.logq_estimator="streaming": decayed positive counts per item-ID row
  # (two_tower/item_frequency.py); None otherwise.
  item_counts: jax.Array | None = None


def _model(schema: Schema, config: ml_collections.ConfigDict, seed: int) -> TwoTower:
  # Table rows padded to config.mesh.table_row_multiple.
  return TwoTower(sharding.padded_schema(schema, config.mesh), config.model, rngs=nnx.Rngs(seed))


def abstract_params(schema: Schema, config: ml_collections.ConfigDict, mesh: Mesh
                    ) -> tuple[Any, Any, Any]:
  """(graphdef, parameter shapes and dtypes, parameter shardings), with nothing allocated: what
  restoring parameters onto `mesh` needs."""
  abstract = nnx.eval_shape(lambda: _model(schema, config, 0))
  graphdef, params = nnx.split(abstract, nnx.Param)
  return graphdef, params, sharding.param_shardings(params, mesh, config.mesh)


def item_id_rows(params: Any) -> int:
  """Rows of the item tower's item-ID table (padding included)."""
  return params["item_tower"]["embedding"]["tables"]["item_id"]["embedding"].shape[0]


def streams_item_counts(config: ml_collections.ConfigDict) -> bool:
  return config.loss.get("logq_estimator", "static") == "streaming"


def create_train_state(schema: Schema, config: ml_collections.ConfigDict,
                       tx: optax.GradientTransformation, mesh: Mesh):
  """(graphdef, state, state shardings): parameters initialised directly in their shardings."""
  streaming = streams_item_counts(config)

  def init() -> TrainState:
    params = nnx.state(_model(schema, config, config.seed), nnx.Param)
    counts = item_frequency.initial(item_id_rows(params)) if streaming else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      item_counts=counts)

  graphdef, abstract, param_sh = abstract_params(schema, config, mesh)
  opt_sh = sharding.opt_state_shardings(tx, abstract, param_sh, mesh)
  state_sh = TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh,
                        item_counts=sharding.replicated(mesh) if streaming else None)
  state = jax.jit(init, out_shardings=state_sh)()
  return graphdef, state, state_sh


def init_params(schema: Schema, config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
  """Freshly initialised parameters (config.seed), in their shardings: exactly the parameters
  `create_train_state` starts from."""
  _, abstract, param_sh = abstract_params(schema, config, mesh)
  del abstract
  return jax.jit(lambda: nnx.state(_model(schema, config, config.seed), nnx.Param),
                 out_shardings=param_sh)()
