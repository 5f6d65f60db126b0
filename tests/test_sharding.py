"""Sharding rules, meshes and per-device placement.

Rules and error paths are checked in this process (one CPU device); placement on 8 devices runs
tests/sharding_worker.py in a subprocess, since the device count is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from pipelines.schema import Feature, Schema
from two_tower import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def mesh_cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


def run_worker(case: str, devices: int = 8, timeout: int = 300) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py"), case], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])

# ----------------------------------------------------------------------------- the rules


def test_axis_rules_are_one_table():
  rules = dict(sharding.axis_rules())
  assert rules == {"batch": "data", "vocab": "model", "embed": None, "hidden": "model"}
  assert dict(sharding.axis_rules(mesh_cfg(shard_tables_over="all")))["vocab"] == ("data", "model")
  assert sharding.AXIS_RULES == sharding.axis_rules()
  with pytest.raises(ValueError, match="shard_tables_over must be one of"):
    sharding.axis_rules(mesh_cfg(shard_tables_over="rows"))
  # Batches are placed through the same table as parameters, by logical name.
  assert sharding.logical_spec("batch") == P("data")
  assert sharding.logical_spec("vocab", "embed", cfg=mesh_cfg(shard_tables_over="all")) == P(
      ("data", "model"), None)


@pytest.mark.parametrize("data,model,want", [
    (-1, 1, (8, 1)), (-1, 2, (4, 2)), (4, -1, (4, 2)), (1, -1, (1, 8)), (2, 4, (2, 4))])
def test_mesh_shape_fills_minus_one(data, model, want):
  assert sharding.mesh_shape(mesh_cfg(data=data, model=model), 8) == want


@pytest.mark.parametrize("data,model", [(3, 2), (-1, 3), (-1, -1), (16, 1), (0, 8)])
def test_mesh_shape_rejects_sizes_that_do_not_fit(data, model):
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.mesh_shape(mesh_cfg(data=data, model=model), 8)


def test_mesh_that_does_not_match_the_devices():
  # This process has one CPU device.
  with pytest.raises(ValueError, match=r"does not fit the 1 available devices.*product is 1"):
    sharding.make_mesh(mesh_cfg(data=4, model=2))
  assert dict(sharding.make_mesh(mesh_cfg(data=-1, model=1)).shape) == {"data": 1, "model": 1}


def test_missing_mesh_keys_take_defaults():
  # A config.json recorded before a mesh option existed still loads.
  old = mesh_cfg(data=-1, model=1)
  assert sharding.mesh_option(old, "shard_tables_over") == "model"
  assert sharding.pad_rows(55, old) == 55


def _fake_mesh(owners: list[list[int]]):
  devices = np.array([[types.SimpleNamespace(process_index=p) for p in row] for row in owners])
  return types.SimpleNamespace(devices=devices, shape={"data": devices.shape[0],
                                                       "model": devices.shape[1]})


def test_process_layout_must_split_the_batch_by_process():
  sharding.check_process_layout(_fake_mesh([[0, 0], [1, 1]]))  # data=2 over 2 processes
  sharding.check_process_layout(_fake_mesh([[0], [0], [1], [1]]))
  # The model axis across processes: each process would need the whole batch.
  with pytest.raises(ValueError, match="mesh.data must be a multiple of 2"):
    sharding.check_process_layout(_fake_mesh([[0, 0, 1, 1]]))
  with pytest.raises(ValueError, match="does not split the batch by process"):
    sharding.check_process_layout(_fake_mesh([[0, 1], [0, 1]]))


def test_padded_schema_rounds_table_rows():
  schema = Schema(features=(Feature("item_id", "item", "id", 10_000_002),
                            Feature("tags", "item", "multi", 55, 4),
                            Feature("price", "item", "numeric")),
                  num_users=1, num_items=10_000_000, history_length=4, split_sizes={})
  padded = sharding.padded_schema(schema, mesh_cfg(table_row_multiple=64))
  assert [f.vocab_size for f in padded.features] == [10_000_064, 64, 0]
  assert sharding.padded_schema(schema, mesh_cfg(table_row_multiple=1)) == schema


def test_uneven_small_parameters_are_replicated_large_ones_refused():
  mesh = AbstractMesh((4, 2), ("data", "model"))
  table = "item_tower/embedding/tables/tags/embedding"
  fit = lambda spec, shape, mb, name=table: sharding._fit(name, spec, shape, 4, mesh, mb * 2**20)  # pylint: disable=protected-access
  assert fit(P("model", None), (56, 16), 0) == P("model")
  assert fit(P(("data", "model"), None), (64, 16), 0) == P(("data", "model"))
  assert fit(P("model", None), (55, 16), 1) == P()  # 3.5 KiB: kept whole on every device
  with pytest.raises(ValueError, match=rf"parameter {table} of shape \(55, 16\).*does not divide "
                     r"the 2 devices.*table_row_multiple=2.*replicate_uneven_mb=1"):
    fit(P("model", None), (55, 16), 0)
  with pytest.raises(ValueError, match=r"Change the layer's size, choose mesh sizes that divide 129"):
    fit(P(None, "model"), (64, 129), 0, name="query_tower/layers/0/kernel")
  # Axes of size 1 are dropped: the same spec is valid on any mesh.
  single = AbstractMesh((8, 1), ("data", "model"))
  assert sharding._fit("k", P(None, "model"), (97, 128), 4, single, 0) == P()  # pylint: disable=protected-access

# ----------------------------------------------------------------------------- 8 devices


@pytest.fixture(scope="module")
def placement():
  return run_worker("small")


@pytest.mark.parametrize("over,shards", [("model", 2), ("all", 8)])
def test_tables_and_moments_are_row_sharded(placement, over, shards):
  r = placement[over]
  print(f"\nshard_tables_over={over}, mesh data=4 model=2:\n  " + "\n  ".join(r["describe"]))
  assert r["table_per_device_bytes"] * shards == r["table_bytes"]
  assert set(r["table_bytes_by_device"].values()) == {r["table_bytes"] // shards}
  # Adam's two moments of the table take the table's sharding.
  assert r["moment_specs"] == [r["table_spec"]] * 2
  lines = {line.split()[0]: line.split()[2:] for line in r["describe"]}
  assert "'model')" in "".join(lines["query_tower/layers/0/kernel"])  # dense outputs over model
  # Only the looked-up rows moved, and no [rows, dim] buffer exists on any device in the
  # compiled step (lookups and gradients stay sharded; no table is gathered).
  assert r["looked_up_changed"] and r["untouched_unchanged"]
  assert r["whole_table_instructions"] == []
  assert np.isfinite(r["losses"]).all()


def test_same_losses_whatever_the_table_rule(placement):
  np.testing.assert_allclose(placement["model"]["losses"], placement["all"]["losses"], rtol=1e-5)


def test_unsharded_export_of_the_tables(placement):
  # Gathered from shards over 2 or 8 devices: whole tables, the same values either way.
  for over in ("model", "all"):
    export = placement[over]["export"]
    assert export["item/item_id"]["shape"] == [4096, 64]
    assert export["user/user_id"]["shape"] == [1000, 64]
  for name in ("item/item_id", "user/user_id"):
    np.testing.assert_allclose(placement["model"]["export"][name]["sum"],
                               placement["all"]["export"][name]["sum"], rtol=1e-4)
  # The padding rows of a padded table are not exported: row i is vocabulary index i.
  assert placement["padded"]["export"]["item/item_id"]["shape"] == [4097, 64]


def test_multi_device_bad_inputs(placement):
  errors = placement["errors"]
  assert "does not fit the 8 available devices" in errors["mesh"]
  assert "train.batch_size=250 is not divisible by the 4 data-parallel devices" in errors["batch"]
  assert "item_tower/embedding/tables/item_id/embedding of shape (4097, 64)" in errors["rows"]
  assert "--config.mesh.table_row_multiple=2" in errors["rows"]
  assert placement["fill"] == {"data": 4, "model": 2}


def test_padding_makes_uneven_tables_shardable(placement):
  r = placement["padded"]
  assert r["table_shape"] == [4104, 64] and r["table_per_device_bytes"] * 8 == r["table_bytes"]
  assert np.isfinite(r["losses"]).all() and r["whole_table_instructions"] == []


def _available_gib() -> float:
  try:
    with open("/proc/meminfo") as f:
      info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20
  except (OSError, KeyError, ValueError):
    return float("inf")


def test_10m_row_table_trains_on_8_devices_with_an_eighth_each():
  # Peak host memory ~5.5 GiB: the 2.56 GB table plus its dense gradient, on 8 CPU "devices".
  if _available_gib() < 7:
    pytest.skip(f"needs ~7 GiB of free host memory, {_available_gib():.1f} GiB available")
  r = run_worker("big")
  table_mb, device_mb = r["table_bytes"] / 2**20, r["table_per_device_bytes"] / 2**20
  print(f"\n10M x 64 item table: {table_mb:.0f} MiB in all, {device_mb:.1f} MiB on each device; "
        f"by device (MiB): {[round(b / 2**20, 1) for b in r['table_bytes_by_device'].values()]}; "
        f"step temporaries per device {r['temp_bytes_per_device'] / 2**20:.1f} MiB; "
        f"losses {r['losses']}; init {r['init_s']:.1f} s, steps {r['step_s']}")
  assert r["table_shape"] == [10_000_000, 64] and r["table_spec"] == "P(('data', 'model'),)"
  assert len(r["table_bytes_by_device"]) == 8
  assert set(r["table_bytes_by_device"].values()) == {10_000_000 * 64 * 4 // 8}
  assert r["whole_table_instructions"] == []
  # The step's scratch memory is one shard of the (dense) table gradient, not a table.
  assert r["temp_bytes_per_device"] < 1.1 * r["table_per_device_bytes"]
  assert r["looked_up_changed"] and r["untouched_unchanged"]
  assert np.isfinite(r["losses"]).all() and r["losses"][1] < r["losses"][0]
