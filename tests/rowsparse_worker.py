"""Row-sparse embedding updates on a mesh; tests/test_rowsparse.py runs this in subprocesses, since
the device count is fixed when JAX starts.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/rowsparse_worker.py OUT_DIR \
      '{"data": 4, "model": 2}'

Trains the real jitted train step (optimizer.embeddings="rowwise_adagrad") over the hand-made
schema of tests/sharding_worker.py for 3 steps on the given mesh and writes every parameter and
optimizer-state leaf to OUT_DIR/state.npz, then one more step to OUT_DIR/step4.npz. With more than
one device that 4th step runs after saving the train state to a checkpoint and restoring it onto a
(data=devices, model=1) mesh. Reports the placements.
Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import numpy as np

from sharding_worker import build, item_table
from two_tower.checkpoint import Checkpointer
from two_tower.trees import named_leaves

ROWS, DIM = 4096, 16


def accumulator(opt_state):
  """Row-wise Adagrad's accumulator of the item table."""
  return next(x for name, x in named_leaves(opt_state).items()
              if name.endswith("tables/item_id/embedding") and x.ndim == 1)


def train(mesh: dict, steps: int):
  c, _, state, step, batch, catalog = build(ROWS, dim=DIM, hidden=(16,), optimizer="adam",
                                            embeddings="rowwise_adagrad", **mesh)
  hlo = step.lower(state, batch, catalog).compile().as_text()
  for _ in range(steps):
    state, _ = step(state, batch, catalog)
  return c, state, step, batch, catalog, hlo


def save(path: str, tree) -> None:
  np.savez(path, **{k: np.asarray(v) for k, v in named_leaves(tree).items() if hasattr(v, "shape")})


def main(out_dir: str, mesh: dict) -> dict:
  _, state, step, batch, catalog, hlo = train(mesh, steps=3)
  save(os.path.join(out_dir, "state.npz"), {"params": state.params, "opt_state": state.opt_state})
  table, acc = item_table(state.params), accumulator(state.opt_state)
  report = dict(
      table_spec=str(table.sharding.spec), accumulator_spec=str(acc.sharding.spec),
      accumulator_shard_rows=acc.addressable_shards[0].data.shape[0],
      # A [rows, dim] buffer in the per-device program would be a whole table on one device.
      whole_table_instructions=[l.strip()[:200] for l in hlo.splitlines()
                                if re.search(rf"\[{ROWS},{DIM}\]", l)])
  if jax.device_count() > 1:
    # The train state saved, restored onto another mesh (tables whole on every device), and
    # trained one more step there.
    checkpointer = Checkpointer(os.path.join(out_dir, "checkpoints"))
    checkpointer.save(3, state, force=True)
    checkpointer.wait()
    other = dict(data=jax.device_count(), model=1)
    _, _, target, step, batch, catalog = build(
        ROWS, dim=DIM, hidden=(16,), optimizer="adam", embeddings="rowwise_adagrad", **other)
    restored = checkpointer.restore_train_state(3, target)
    checkpointer.close()
    restored_acc = accumulator(restored.opt_state)
    report.update(
        restored_equal=all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                           zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True)),
        restored_accumulator_spec=str(restored_acc.sharding.spec),
        restored_accumulator_shard_rows=restored_acc.addressable_shards[0].data.shape[0])
    state = restored
  state, _ = step(state, batch, catalog)
  save(os.path.join(out_dir, "step4.npz"), {"params": state.params, "opt_state": state.opt_state})
  return report


if __name__ == "__main__":
  print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
