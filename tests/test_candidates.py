"""Batch candidate generation: exclusion with over-fetch, Parquet shards, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_module
from launch import jobs
from two_tower import candidates, index_store, search
from two_tower.index_store import IndexMismatchError
from two_tower.workdir import Workdir


class Crash(BaseException):
  """A hard crash: not an Exception, so no cleanup handler runs (like a killed process)."""


def _config(workdir, **score_overrides):
  config = Workdir(workdir).config()
  config.score.update(score_overrides)
  return config


def _read(output):
  return pq.read_table(sorted(
      os.path.join(output, n) for n in os.listdir(output) if n.endswith(".parquet")))


@pytest.fixture(scope="module")
def indexed(trained_workdir, tmp_path_factory):
  """A copy of the trained work directory with a live (exact, brute-force) index."""
  path = str(tmp_path_factory.mktemp("indexed") / "work")
  shutil.copytree(trained_workdir, path, ignore=shutil.ignore_patterns("index", "candidates"))
  jobs.build_index(path)
  return path


@pytest.fixture(scope="module")
def scored(indexed, tmp_path_factory):
  """Candidates of every user, from one uninterrupted run."""
  output = str(tmp_path_factory.mktemp("scored") / "out")
  success = jobs.generate_candidates(indexed, output, config=_config(indexed))
  return output, success


# ----------------------------------------------------------------------------- units


def test_select_skips_excluded_and_pads():
  rows = np.array([[5, 3, 9, 1], [2, -1, -1, -1]])
  scores = np.array([[4., 3., 2., 1.], [9., -np.inf, -np.inf, -np.inf]], np.float32)
  drop = np.array([[False, True, False, False], [False, False, False, False]])
  out_rows, out_scores, counts = candidates.select(rows, scores, drop, 3)
  np.testing.assert_array_equal(out_rows, [[5, 9, 1], [2, -1, -1]])
  np.testing.assert_array_equal(counts, [3, 1])
  assert out_scores[0].tolist() == [4., 2., 1.]


def test_overfetch_then_refetch_gives_every_user_k():
  """Users whose training items crowd their top ranks still get K, exactly the best K."""
  rng = np.random.default_rng(0)
  num_items, dim, k = 500, 16, 10
  items = rng.standard_normal((num_items, dim)).astype(np.float32)
  queries = rng.standard_normal((6, dim)).astype(np.float32)
  exact = np.argsort(-(queries @ items.T), axis=1)
  # User u trained on its 4 * u best items (user 5: 20 of them), and on a few random ones.
  users, hist = [], []
  for u in range(6):
    for item in list(exact[u, :4 * u]) + list(rng.integers(0, num_items, 3)):
      users.append(u)
      hist.append(item)
  exclusions = candidates.Exclusions.from_pairs(np.array(users), np.array(hist), 6, num_items)
  settings = search.Settings("brute_force")
  loaded = index_store.LoadedIndex("memory", {"num_items": num_items, "version": "test"}, settings,
                             search.build_searcher(items, settings), np.arange(num_items), items)
  stream = lambda rows: iter([(rows, queries[rows])])  # noqa: E731
  generator = candidates.Generator(loaded, stream, exclusions, k, overfetch=4)
  (_, rows, scores, counts), = list(generator(np.arange(6)))
  assert (counts == k).all()
  for u in range(6):
    want = [i for i in exact[u] if i not in set(hist[j] for j in range(len(hist)) if users[j] == u)]
    assert rows[u].tolist() == want[:k]
  assert generator.refetched > 0  # the users with long histories needed a second search


def test_int8_brute_force_reports_exact_scores():
  rng = np.random.default_rng(1)
  items = rng.standard_normal((300, 16)).astype(np.float32)
  queries = rng.standard_normal((4, 16)).astype(np.float32)
  settings = search.Settings("brute_force", int8=True)
  loaded = index_store.LoadedIndex("memory", {"num_items": 300, "version": "test"}, settings,
                             search.build_searcher(items, settings), np.arange(300), items)
  generator = candidates.Generator(loaded, lambda rows: iter([(rows, queries[rows])]),
                                   candidates.Exclusions.none(4, 300), 20, overfetch=0)
  (_, rows, scores, counts), = list(generator(np.arange(4)))
  assert (counts == 20).all()
  exact = np.einsum("bd,bkd->bk", queries, items[rows])
  np.testing.assert_allclose(scores, exact, rtol=1e-6, atol=1e-6)
  assert (np.diff(scores, axis=1) <= 0).all()  # re-sorted by the exact scores


def test_read_user_ids_reports_unknown_and_duplicates(tmp_path):
  path = tmp_path / "ids.txt"
  path.write_text("# users\n7\n3\n\nnope\n7\n9999\n")
  users = candidates.read_user_ids(str(path), np.arange(100))
  assert users.rows.tolist() == [7, 3] and users.unknown == ["nope", "9999"]
  assert users.duplicates == 1
  strings = candidates.read_user_ids(str(path), np.array(["a", "7", "3"]))
  assert strings.rows.tolist() == [1, 2]


# ----------------------------------------------------------------------------- job


def test_candidates_are_the_exact_top_k_without_training_items(indexed, scored):
  output, success = scored
  wd = Workdir(indexed)
  config = wd.config()
  data = wd.prepare_data(config)
  num_users, num_items = data.schema.num_users, data.schema.num_items
  table = _read(output)
  assert table.schema.names == ["user_id", "rank", "item_id", "score", "model_step", "index_version"]
  assert [str(t) for t in table.schema.types] == ["int64", "int32", "int64", "float", "int64", "string"]
  # Every user gets 100 unless their training items leave fewer in the catalog.
  train_users, train_items = data.pairs("train")
  history = np.bincount(np.unique(np.stack([train_users, train_items], 1), axis=0)[:, 0],
                        minlength=num_users)
  expected = np.minimum(100, num_items - history)
  assert success["users"] == num_users and success["rows"] == expected.sum() == table.num_rows
  assert success["users_with_fewer_than_k"] == (expected < 100).sum()
  assert success["unknown_user_ids"] == 0
  assert os.path.exists(os.path.join(output, candidates.SUCCESS))

  loaded = index_store.open_live(os.path.join(indexed, "index"))
  assert set(table.column("index_version").to_pylist()) == {loaded.version}
  assert set(table.column("model_step").to_pylist()) == {loaded.manifest["model_step"]}
  df = {name: table.column(name).to_numpy() for name in ("user_id", "rank", "item_id", "score")}
  user_raw = np.asarray(data.table("user", "raw_id"))
  item_raw = np.asarray(data.table("item", "raw_id"))
  trained = set(zip(user_raw[train_users].tolist(), item_raw[train_items].tolist()))
  assert not any((u, i) in trained for u, i in zip(df["user_id"].tolist(), df["item_id"].tolist()))
  # Check a few users against brute force over the index's embeddings and the query tower.
  from two_tower.embeddings import Embedder
  m = Workdir(indexed).load_model(config, step=loaded.manifest["model_step"])
  queries = Embedder(m.graphdef, m.catalog, m.mesh, 64).embed(m.params, "query", np.arange(5))
  scores = queries @ np.asarray(loaded.item_embeddings).T
  for u in range(5):
    mine = df["user_id"] == user_raw[u]
    assert df["rank"][mine].tolist() == list(range(1, expected[u] + 1))
    order = [i for i in np.argsort(-scores[u], kind="stable") if (user_raw[u], item_raw[i]) not in trained]
    np.testing.assert_allclose(df["score"][mine], scores[u][order[:expected[u]]], rtol=1e-4,
                               atol=1e-5)
    assert set(df["item_id"][mine][:90].tolist()) <= set(item_raw[order[:expected[u]]].tolist())
  assert num_items == len(item_raw)


def test_resume_after_crash_skips_finished_shards_and_matches(indexed, scored, tmp_path):
  output = str(tmp_path / "out")
  config = _config(indexed, users_per_shard=100)  # 300 users: 3 shards

  def crash_after_second(stage):
    if stage == "shard:1":
      raise Crash(stage)

  with pytest.raises(Crash):
    jobs.generate_candidates(indexed, output, config=config, hook=crash_after_second)
  assert sorted(n for n in os.listdir(output) if n.endswith(".parquet")) == [
      "part-00000.parquet", "part-00001.parquet"]
  assert not os.path.exists(os.path.join(output, candidates.SUCCESS))
  first_mtime = os.path.getmtime(os.path.join(output, "part-00000.parquet"))
  stages = []
  success = jobs.generate_candidates(indexed, output, config=config, hook=stages.append)
  assert stages == ["shard:2"]  # only the missing shard was written
  assert os.path.getmtime(os.path.join(output, "part-00000.parquet")) == first_mtime
  assert success["shards"] == 3 and success["users"] == scored[1]["users"]
  uninterrupted = str(tmp_path / "uninterrupted")
  jobs.generate_candidates(indexed, uninterrupted, config=config)
  assert _read(output).equals(_read(uninterrupted))  # identical to an uninterrupted run
  resumed, other = _read(output), _read(scored[0])  # and, up to float rounding, to other batchings
  for name in ("user_id", "item_id", "rank"):
    assert resumed.column(name).equals(other.column(name))
  np.testing.assert_allclose(resumed.column("score").to_numpy(), other.column("score").to_numpy(),
                             rtol=1e-5, atol=1e-5)
  again = jobs.generate_candidates(indexed, output, config=config)
  assert again == success  # a finished job is not redone


def test_output_of_another_job_is_refused(indexed, scored, tmp_path):
  output = str(tmp_path / "out")
  os.makedirs(output)
  with open(os.path.join(scored[0], candidates.JOB)) as f:
    job = json.load(f)
  job["model_step"] += 1
  with open(os.path.join(output, candidates.JOB), "w") as f:
    json.dump(job, f)
  with pytest.raises(candidates.OutputMismatchError, match="model step"):
    jobs.generate_candidates(indexed, output, config=_config(indexed))
  with pytest.raises(candidates.OutputMismatchError, match="top_k"):  # same step, other K
    jobs.generate_candidates(indexed, scored[0], config=_config(indexed), top_k=5)
  foreign = str(tmp_path / "foreign")
  os.makedirs(foreign)
  shutil.copy(os.path.join(scored[0], "part-00000.parquet"), foreign)
  with pytest.raises(candidates.OutputMismatchError, match="without a _job.json"):
    jobs.generate_candidates(indexed, foreign, config=_config(indexed))
  assert sorted(os.listdir(foreign)) == ["part-00000.parquet"]  # nothing written


def test_user_id_list_with_unknown_ids(indexed, tmp_path):
  ids = tmp_path / "users.txt"
  ids.write_text("3\n1\nghost\n3\n123456789\n")
  output = str(tmp_path / "out")
  success = jobs.generate_candidates(indexed, output, user_ids_file=str(ids), top_k=7,
                                           config=_config(indexed))
  assert (success["users"], success["unknown_user_ids"], success["duplicate_user_ids"]) == (2, 2, 1)
  table = _read(output)
  assert table.column("user_id").to_pylist() == [3] * 7 + [1] * 7  # in the order given
  with open(os.path.join(output, candidates.UNKNOWN_IDS)) as f:
    assert f.read().split() == ["ghost", "123456789"]


def test_bad_input_errors(indexed, trained_workdir, tmp_path):
  with pytest.raises(ValueError, match="larger than the catalog"):
    jobs.generate_candidates(indexed, str(tmp_path / "a"), top_k=201, config=_config(indexed))
  assert not os.path.exists(tmp_path / "a")

  # An index whose manifest names another dimension / a checkpoint that does not exist.
  work = str(tmp_path / "work")
  shutil.copytree(indexed, work)
  root = os.path.join(work, "index")
  live = index_store.IndexStore(root).live()
  manifest_path = os.path.join(root, live, index_store.MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  with open(manifest_path, "w") as f:
    json.dump({**manifest, "dim": 32}, f)
  with pytest.raises(IndexMismatchError, match="dimension 32 in the index, 64 in the model"):
    jobs.generate_candidates(work, str(tmp_path / "b"), config=_config(work))
  with open(manifest_path, "w") as f:
    json.dump({**manifest, "model_step": 123456}, f)
  with pytest.raises(IndexMismatchError, match="step 123456"):
    jobs.generate_candidates(work, str(tmp_path / "b"), config=_config(work))

  # No checkpoint at all.
  shutil.rmtree(os.path.join(work, "checkpoints"))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    jobs.generate_candidates(work, str(tmp_path / "b"), config=_config(work))
  assert not os.path.exists(tmp_path / "b")  # nothing written for any of these


def test_cli(indexed, tmp_path, capsys):
  output = str(tmp_path / "out")
  proc = run_module("launch.score", f"--workdir={indexed}", f"--output={output}", "--top_k=5")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '"users": 300' in proc.stdout and "part-*.parquet" in proc.stdout
  assert _read(output).num_rows == 1500
  from launch import common
  with pytest.raises(SystemExit) as exit_info:
    common.run_cli(lambda: jobs.generate_candidates(indexed, str(tmp_path / "x"), top_k=1000))
  assert exit_info.value.code == 2 and "larger than the catalog" in capsys.readouterr().err


def test_two_processes_write_their_own_shards(indexed, scored, tmp_path):
  """2 JAX processes (launch.cluster.local): shards split between them, same candidates."""
  import io
  from launch.cluster import local
  config_file = tmp_path / "workdir_config.py"  # the work directory's own config, as a config file
  config_file.write_text(
      "import json, ml_collections\n"
      "def get_config():\n"
      f"  return ml_collections.ConfigDict(json.load(open({os.path.join(indexed, 'config.json')!r})))\n")
  output = str(tmp_path / "out")
  log = io.StringIO()
  code = local.launch(
      [sys.executable, "-m", "launch.score", f"--workdir={indexed}", f"--output={output}",
       f"--config={config_file}", "--config.score.users_per_shard=100"],
      num_processes=2, cwd=ROOT, out=log, timeout_s=120)
  assert code == 0, log.getvalue()[-4000:]
  assert sorted(n for n in os.listdir(output) if n.endswith(".parquet")) == [
      "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
  with open(os.path.join(output, candidates.SUCCESS)) as f:
    assert json.load(f)["users"] == 300
  got, want = _read(output), _read(scored[0])
  for name in ("user_id", "rank", "item_id"):
    assert got.column(name).equals(want.column(name))
