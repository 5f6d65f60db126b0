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
from two_tower import sharding
from two_tower.model import TwoTower


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


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


def create_train_state(schema: Schema, config: ml_collections.ConfigDict,
                       tx: optax.GradientTransformation, mesh: Mesh):
  """(graphdef, state, state shardings): parameters initialised directly in their shardings."""
  def init() -> TrainState:
    params = nnx.state(_model(schema, config, config.seed), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  graphdef, abstract, param_sh = abstract_params(schema, config, mesh)
  opt_sh = sharding.opt_state_shardings(tx, abstract, param_sh, mesh)
  state_sh = TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh)
  state = jax.jit(init, out_shardings=state_sh)()
  return graphdef, state, state_sh


def init_params(schema: Schema, config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
  """Freshly initialised parameters (config.seed), in their shardings: exactly the parameters
  `create_train_state` starts from."""
  _, abstract, param_sh = abstract_params(schema, config, mesh)
  del abstract
  return jax.jit(lambda: nnx.state(_model(schema, config, config.seed), nnx.Param),
                 out_shardings=param_sh)()
