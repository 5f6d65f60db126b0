"""The train state and its creation, sharded on the mesh from the start."""

from __future__ import annotations

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


def create_train_state(schema: Schema, config: ml_collections.ConfigDict,
                       tx: optax.GradientTransformation, mesh: Mesh):
  """(graphdef, state, state shardings): parameters initialised directly in their shardings."""
  schema = sharding.padded_schema(schema, config.mesh)  # table rows to config.mesh.table_row_multiple
  def init() -> TrainState:
    model = TwoTower(schema, config.model, rngs=nnx.Rngs(config.seed))
    params = nnx.state(model, nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: TwoTower(schema, config.model, rngs=nnx.Rngs(0))))
  abstract = jax.eval_shape(init)
  param_sh = sharding.param_shardings(abstract.params, mesh, config.mesh)
  opt_sh = sharding.opt_state_shardings(tx, abstract.params, param_sh, mesh)
  state_sh = TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh)
  state = jax.jit(init, out_shardings=state_sh)()
  return graphdef, state, state_sh


