"""The Beam pipeline (pipelines/beam_prepare.py, DirectRunner) prepares the same dataset as the
in-process path: the same vocabularies and tables, the same examples in the same order."""

import glob
import json
import os
import re
import shlex
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

pytest.importorskip("apache_beam")  # the `beam` extra; CI installs it with `test`

from configs.base import get_base_config
from pipelines.prepare import prepare
from two_tower.errors import UserError


def _table(n, seed):
  rng = np.random.default_rng(seed)
  return pa.table({
      "uid": [f"u{u}" for u in rng.integers(0, 60, n)],
      "iid": rng.integers(0, 80, n),
      "ts": rng.integers(0, 50, n),  # few distinct times: ties are broken by read order
      "country": rng.choice(["fr", "de", "us"], n),
      "tags": ["|".join(rng.choice(["x", "y", "z", "w"], 2)) for _ in range(n)],
      "price": rng.random(n).round(3),
      "part": rng.choice(["train", "train", "train", "validation", "test"], n),
  })


def _files(tmp_path, fmt, n=400):
  paths = []
  for seed in range(3):
    path = str(tmp_path / f"part{seed}.{fmt}")
    if fmt == "parquet":
      pq.write_table(_table(n, seed), path, row_group_size=64)
    else:
      pa_csv.write_csv(_table(n, seed), path, pa_csv.WriteOptions(quoting_style="none"))
    paths.append(path)
  return paths


def _adjacency_files(tmp_path):
  """Gowalla's format, one file per split: `user item item ...` lines, no timestamps (ties
  everywhere: the order of reading decides)."""
  rng = np.random.default_rng(0)
  paths = {}
  for name, per_user in (("train", 8), ("validation", 1), ("test", 2)):
    lines = [" ".join([f"{u}"] + [str(i) for i in rng.integers(0, 70, per_user)])
             for u in rng.permutation(40)]
    paths[name] = (str(tmp_path / f"{name}.txt"),)
    with open(paths[name][0], "w") as f:
      f.write("\n".join(lines) + "\n")
  return paths


def _cfg(files, fmt, split_kind, training_history):
  d = get_base_config().data
  d.source = "logs"
  d.split.kind = split_kind
  d.training_history = training_history
  d.history_length = 4
  d.logs.update(files=tuple(files), format=fmt, user_id="uid", item_id="iid", timestamp="ts",
                user_categorical=("country",), item_multi=("tags",), item_numeric=("price",),
                split_column="part" if split_kind == "predefined" else "")
  return d


def _records(data, split):
  source = data.record_source(split)
  return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("fmt,split_kind,training_history", [
    ("parquet", "temporal_last_n", "before"), ("csv", "predefined", "others"),
    ("adjacency", "predefined", "before")])
def test_beam_prepares_the_same_dataset(tmp_path, fmt, split_kind, training_history):
  if fmt == "adjacency":
    cfg = _cfg((), fmt, split_kind, training_history)
    cfg.logs.update(user_categorical=(), item_multi=(), item_numeric=(), split_column="")
    cfg.logs.split_files.update(_adjacency_files(tmp_path))
  else:
    cfg = _cfg(_files(tmp_path, fmt), fmt, split_kind, training_history)
  if split_kind == "predefined":
    cfg.user_weight_exponent = 1.0  # per-user counts: the Beam path has each user whole
  ours, beam = _assert_same_dataset(cfg, tmp_path)
  assert sum(ours.schema.split_sizes.values()) == (440 if fmt == "adjacency" else 1200)
  tables = os.listdir(os.path.join(ours.path, "tables"))
  assert "user.history.npy" in tables and ("item.tags.npy" in tables or fmt == "adjacency")


def test_beam_prepares_the_same_dataset_on_a_nightly_registry_and_histories(tmp_path):
  from pipelines.histories import CarriedHistories
  from pipelines.prepare import load_raw
  from two_tower import registry as registry_lib
  cfg = _cfg(_files(tmp_path, "parquet"), "parquet", "temporal_last_n", "before")
  cfg.history_length = 24  # more than most users' items: histories reach into the carried ones
  raw, _ = load_raw(cfg)
  # min_count=16 (items average 15 interactions): the rarer IDs share a hashed bucket row.
  registry, _ = registry_lib.advance(
      registry_lib.Registry.empty(), raw, 0,
      registry_lib.RegistryConfig(min_count=16, expire_after_days=0, chunk=16, num_oov=1))
  cfg.id_registry = str(tmp_path / "registry.npz")
  registry.save(cfg.id_registry)
  # Earlier days' histories: some of these users and others, raw item IDs with gaps ("").
  rng = np.random.default_rng(0)
  users = np.unique(np.r_[[f"u{u}" for u in range(0, 60, 2)], ["gone1", "gone2"]])
  items = rng.integers(0, 90, (len(users), 24)).astype(str)  # 80..89: not in the registry
  items[rng.random(items.shape) < 0.2] = ""
  cfg.carried_history = str(tmp_path / "histories.npz")
  CarriedHistories.from_raw(users, items).save(cfg.carried_history)
  ours, _ = _assert_same_dataset(cfg, tmp_path)
  cfg.carried_history = ""
  alone = prepare(cfg, str(tmp_path / "alone"))
  filled = lambda d: int((np.load(os.path.join(d.path, "tables", "user.history.npy")) > 0).sum())
  assert filled(ours) > filled(alone)
  item_rows = np.load(os.path.join(ours.path, "tables", "item.item_id.npy"))
  assert ours.schema.feature("item_id").vocab_size == registry.vocab("item_id").capacity
  assert (item_rows == 1).any() and (item_rows > 1).any()  # bucketed and own rows


def test_beam_prepares_the_same_dataset_with_user_and_item_tables(tmp_path):
  cfg = _cfg(_files(tmp_path, "parquet"), "parquet", "predefined", "others")
  rng = np.random.default_rng(1)
  # Items 80..89 have no interactions (tonight's new items); users "u0".."u29" moved country.
  pq.write_table(pa.table({"iid": np.arange(90), "price": rng.random(90).round(3),
                           "tags": [["y", "w"][: 1 + i % 2] for i in range(90)]}),
                 str(tmp_path / "items.parquet"))
  pa_csv.write_csv(pa.table({"uid": [f"u{u}" for u in range(30)] + ["newcomer"],
                             "country": ["jp"] * 31}), str(tmp_path / "users.csv"))
  cfg.logs.update(item_table=str(tmp_path / "items.parquet"), user_table=str(tmp_path / "users.csv"))
  ours, _ = _assert_same_dataset(cfg, tmp_path)
  assert ours.schema.num_items == 90 and ours.schema.num_users == 61


def _assert_same_dataset(cfg, tmp_path):
  """Prepares `cfg` in process and on Beam's DirectRunner, checks the two datasets are the same
  (schema, tables, pairs, serialized examples in order) and returns them."""
  ours = prepare(cfg, str(tmp_path / "in_process"))
  beam = prepare(cfg, str(tmp_path / "beam"), beam_runner="DirectRunner")
  assert list(beam.builder.stage_seconds) == ["beam"]  # built by the pipeline
  assert ours.schema == beam.schema
  assert all(ours.schema.split_sizes[s] > 0 for s in ("train", "validation", "test"))
  tables = sorted(os.listdir(os.path.join(ours.path, "tables")))
  assert tables == sorted(os.listdir(os.path.join(beam.path, "tables")))
  for name in tables:
    a, b = (np.load(os.path.join(d.path, "tables", name)) for d in (ours, beam))
    np.testing.assert_array_equal(a, b, err_msg=name)
    assert a.dtype == b.dtype, name
  for split in ("train", "validation", "test"):
    for a, b in zip(ours.pairs(split), beam.pairs(split)):
      np.testing.assert_array_equal(a, b)
      assert a.dtype == b.dtype
    # The same serialized examples in the same (TFDS md5) order; shards may cut them elsewhere.
    assert _records(ours, split) == _records(beam, split)
    ours_info = ours.builder.info.splits[split]
    beam_info = beam.builder.info.splits[split]
    assert (ours_info.num_examples, ours_info.num_bytes) == (beam_info.num_examples,
                                                             beam_info.num_bytes)
  assert not glob.glob(os.path.join(beam.path, "_beam*"))
  return ours, beam


def test_runner_that_is_not_installed_names_the_extra(tmp_path, monkeypatch):
  cfg = _cfg(_files(tmp_path, "parquet", n=50), "parquet", "temporal_last_n", "auto")
  with pytest.raises(UserError, match="unknown Beam runner 'NoSuchRunner'"):
    prepare(cfg, str(tmp_path / "data"), beam_runner="NoSuchRunner")
  monkeypatch.setitem(sys.modules, "apache_beam.runners", None)  # Beam not installed: no import
  with pytest.raises(UserError, match=re.escape("pip install -e '.[beam]'")):
    prepare(cfg, str(tmp_path / "data"), beam_runner="DirectRunner")
  assert not os.path.exists(tmp_path / "data")


def test_split_that_needs_every_interaction_is_refused(tmp_path):
  cfg = _cfg(_files(tmp_path, "parquet", n=50), "parquet", "random", "auto")
  with pytest.raises(UserError, match="data.split.kind must be one of"):
    prepare(cfg, str(tmp_path / "data"), beam_runner="DirectRunner")


def test_a_day_without_interactions_is_prepared_in_process(tmp_path):
  from pipelines.sources import DataError
  full = _files(tmp_path, "parquet", n=50)
  empty = str(tmp_path / "empty.parquet")
  pq.write_table(_table(50, 0).slice(0, 0), empty)
  pq.write_table(pa.table({"iid": np.arange(5), "price": np.ones(5), "tags": [["x"]] * 5}),
                 str(tmp_path / "items.parquet"))
  cfg = _cfg([empty], "parquet", "temporal_last_n", "auto")
  cfg.logs.update(allow_empty=True, item_table=str(tmp_path / "items.parquet"))
  data = prepare(cfg, str(tmp_path / "data"), beam_runner="DirectRunner")
  assert list(data.builder.stage_seconds) != ["beam"]  # nothing to distribute
  assert data.schema.num_items == 5 and sum(data.schema.split_sizes.values()) == 0
  # An empty file among others is still refused, naming it (a failed export, not an empty day).
  cfg.logs.files = (full[0], empty)
  with pytest.raises(DataError, match=re.escape(f"input file {empty} has a header but no rows")):
    prepare(cfg, str(tmp_path / "mixed"), beam_runner="DirectRunner")
  assert not glob.glob(str(tmp_path / "mixed" / "logs" / "*" / "*" / "*.array_record*"))


def test_bad_value_on_a_worker_names_file_and_row(tmp_path):
  files = _files(tmp_path, "csv", n=50)
  with open(files[1]) as f:
    lines = f.read().splitlines()
  fields = lines[8].split(",")
  fields[2] = "noon"  # ts of row 8 (1-based, header not counted)
  lines[8] = ",".join(fields)
  with open(files[1], "w") as f:
    f.write("\n".join(lines) + "\n")
  cfg = _cfg(files, "csv", "temporal_last_n", "auto")
  with pytest.raises(UserError, match=r"part1.csv must hold integer timestamps.*row 8 holds 'noon'"):
    prepare(cfg, str(tmp_path / "data"), beam_runner="DirectRunner")
  assert not glob.glob(str(tmp_path / "data" / "logs" / "*" / "1.0.0"))


def test_cluster_launch_options_are_beams_own():
  """launch/cluster/dataflow.py's options are read by Beam as the settings they name."""
  from apache_beam.options import pipeline_options as po

  from launch.cluster import dataflow
  from pipelines import beam_prepare
  args = dataflow.parser().parse_args(["--project=proj", "--region=r", "--bucket=gs://b",
                                       "--workdir=gs://b/w", "--max_workers=32"])
  options = beam_prepare.pipeline_options("DataflowRunner", shlex.join(dataflow.beam_options(args)))
  gcp, workers = options.view_as(po.GoogleCloudOptions), options.view_as(po.WorkerOptions)
  assert (gcp.project, gcp.region, gcp.temp_location) == ("proj", "r", "gs://b/tmp")
  assert (workers.num_workers, workers.max_num_workers, workers.machine_type) == (
      4, 32, "n2-standard-4")
  assert options.view_as(po.SetupOptions).extra_packages == [
      "dist/two_tower-0.1.0-py3-none-any.whl"]
  args = dataflow.parser().parse_args(["--runner=flink", "--flink_master=fl:8081",
                                       "--image=reg/tt:1", "--workdir=gs://b/w"])
  options = beam_prepare.pipeline_options("FlinkRunner", shlex.join(dataflow.beam_options(args)))
  assert options.view_as(po.FlinkRunnerOptions).flink_master == "fl:8081"
  assert options.view_as(po.PortableOptions).environment_config == "reg/tt:1"


def test_carried_histories_need_an_id_registry(tmp_path):
  cfg = _cfg(_files(tmp_path, "parquet", n=50), "parquet", "temporal_last_n", "auto")
  cfg.carried_history = str(tmp_path / "histories.npz")
  for runner in ("", "DirectRunner"):
    with pytest.raises(UserError, match=r"data.carried_history .* set data.id_registry too"):
      prepare(cfg, str(tmp_path / "data"), beam_runner=runner)
    assert not glob.glob(str(tmp_path / "data" / "logs" / "*" / "*" / "*.array_record*"))
