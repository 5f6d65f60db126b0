"""The sweep tool: search spaces, trial names, selection by a validation metric, and the
`launch.sweep` CLI on a tiny grid (leaderboard, best config, resume)."""

import csv
import json
import os

import pytest

from conftest import run_module, tiny_config
from two_tower import sweep


def _validating_config():
  c = tiny_config()
  c.train.eval_every_steps = 10
  return c


def test_grid_is_every_combination_with_stable_distinct_names():
  space = {"model.temperature": [0.05, 0.1, 0.2], "optimizer.learning_rate": [1e-3, 3e-3]}
  trials = sweep.grid(space)
  assert len(trials) == 6
  assert len({t.name for t in trials}) == 6
  assert [t.name for t in trials] == [t.name for t in sweep.grid(space)]  # stable
  # A name depends on the overrides only, not on the order of the keys.
  assert sweep.trial_name({"a.x": 1, "b.y": 2.5}) == sweep.trial_name({"b.y": 2.5, "a.x": 1})
  assert sweep.trial_name({"a.x": 1}) != sweep.trial_name({"a.x": 2})
  assert trials[0].name.startswith("temperature=0.05,learning_rate=0.001-")


def test_random_search_is_seeded_distinct_and_extendable():
  space = {"model.temperature": {"log_uniform": [0.02, 0.5]}, "train.batch_size": [128, 256]}
  a = sweep.random_search(space, 5, seed=0)
  assert [t.name for t in a] == [t.name for t in sweep.random_search(space, 5, seed=0)]
  assert [t.name for t in a] != [t.name for t in sweep.random_search(space, 5, seed=1)]
  assert len({t.name for t in a}) == 5
  assert all(0.02 <= t.overrides["model.temperature"] <= 0.5 for t in a)
  assert [t.name for t in sweep.random_search(space, 8, seed=0)][:5] == [t.name for t in a]
  # A small discrete space runs out: fewer trials, never duplicates.
  assert len(sweep.random_search({"model.temperature": [0.1, 0.2]}, 10, seed=0)) == 2


@pytest.mark.parametrize("space,mode,message", [
    ({"model.temperatur": [0.1]}, "grid", r"unknown config key 'model.temperatur'.*Did you mean 'model.temperature'"),
    ({"model.temperature": []}, "grid", r"'model.temperature' has an empty list"),
    ({"train.batch_size": [256, "big"]}, "grid", r"'big' does not fit config key 'train.batch_size'"),
    ({"model.temperature": 0.1}, "grid", r"give a list of values"),
    ({"model.temperature": {"log_uniform": [0.01, 0.5]}}, "grid", r"needs --mode=random"),
    ({"model.temperature": {"log_uniform": [0, 0.5]}}, "random", r"low > 0"),
])
def test_bad_search_spaces_are_refused(space, mode, message):
  with pytest.raises(sweep.SweepError, match=message):
    sweep.check_space(space, _validating_config(), mode)


def test_metric_must_be_a_validation_metric():
  config = _validating_config()
  sweep.check_metric("ndcg@10", config)
  with pytest.raises(sweep.SweepError, match=r"'ndcg@20' is not a validation metric; choose one of"):
    sweep.check_metric("ndcg@20", config)
  with pytest.raises(sweep.SweepError, match="not a validation metric"):
    sweep.check_metric("loss", config)
  config.train.eval_every_steps = 0
  with pytest.raises(sweep.SweepError, match="eval_every_steps > 0"):
    sweep.check_metric("ndcg@10", config)


def test_apply_overrides_copies_and_converts_lists():
  base = _validating_config()
  config = sweep.apply_overrides(base, {"model.hidden_dims": [64, 32], "model.temperature": 0.3})
  assert config.model.hidden_dims == (64, 32) and config.model.temperature == 0.3
  assert base.model.temperature != 0.3


def test_leaderboard_ranks_by_value():
  records = [{"name": n, "value": v} for n, v in (("a", 0.1), ("b", 0.3), ("c", 0.2), ("d", 0.3))]
  board = sweep.leaderboard(records)
  assert [(r["name"], r["rank"]) for r in board] == [("b", 1), ("d", 2), ("c", 3), ("a", 4)]


def test_load_space_reads_json_yaml_and_python(tmp_path):
  expected = {"model.temperature": [0.05, 0.1]}
  (tmp_path / "s.json").write_text(json.dumps(expected))
  (tmp_path / "s.yaml").write_text("model.temperature: [0.05, 0.1]\n")
  (tmp_path / "s.py").write_text("SWEEP = {'model.temperature': [0.05, 0.1]}\n")
  for name in ("s.json", "s.yaml", "s.py"):
    assert sweep.load_space(str(tmp_path / name)) == expected
  (tmp_path / "s.txt").write_text("")
  with pytest.raises(sweep.SweepError, match=r"\.json, \.yaml/\.yml or \.py"):
    sweep.load_space(str(tmp_path / "s.txt"))


def _sweep_cli(workdir, space_file, *extra):
  return run_module("launch.sweep", "--config=tests/tiny_config.py", f"--workdir={workdir}",
                    f"--sweep={space_file}", "--metric=ndcg@10", "--config.train.num_steps=12",
                    "--config.train.eval_every_steps=4", *extra)


def test_sweep_cli_ranks_selects_and_resumes(tmp_path):
  space_file = tmp_path / "space.json"
  space_file.write_text(json.dumps({"model.temperature": [0.05, 1.0]}))
  workdir = tmp_path / "sweep"
  result = _sweep_cli(workdir, space_file)
  assert result.returncode == 0, result.stderr[-3000:]
  trial_dirs = sorted(os.listdir(workdir / "trials"))
  assert len(trial_dirs) == 2
  records = {}
  for name in trial_dirs:
    record = json.loads((workdir / "trials" / name / "trial.json").read_text())
    summary = json.loads((workdir / "trials" / name / "train_summary.json").read_text())
    # The trial's value is the best validation value recorded by training, by the sweep's metric.
    assert record["value"] == summary["best_validation"]["ndcg@10"]
    records[name] = record
  best = max(records.values(), key=lambda r: r["value"])
  board = json.loads((workdir / "leaderboard.json").read_text())
  assert [r["name"] for r in board] == sorted(records, key=lambda n: -records[n]["value"])
  with open(workdir / "leaderboard.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == [r["name"] for r in board]
  assert rows[0]["model.temperature"] == json.dumps(best["overrides"]["model.temperature"])
  best_config = json.loads((workdir / "best_config.json").read_text())
  assert best_config["model"]["temperature"] == best["overrides"]["model.temperature"]
  assert best_config["train"]["select_by"] == "ndcg@10"
  assert (workdir / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
  assert len(os.listdir(workdir / "data" / "synthetic")) == 1  # the trials share one build

  # A rerun trains nothing: both trials are finished.
  stamps = {p: os.stat(p).st_mtime_ns for p in (workdir / "trials").glob("*/*.json")}
  again = _sweep_cli(workdir, space_file)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished, skipped") == 2 and ": training" not in again.stdout
  assert {p: os.stat(p).st_mtime_ns for p in (workdir / "trials").glob("*/*.json")} == stamps


def test_sweep_cli_refuses_bad_input_before_training(tmp_path):
  space_file = tmp_path / "space.json"
  space_file.write_text(json.dumps({"model.temperature": [0.1], "optimizer.lr": [1e-3]}))
  result = _sweep_cli(tmp_path / "sweep", space_file)
  assert result.returncode == 2
  assert "unknown config key 'optimizer.lr'" in result.stderr
  assert not (tmp_path / "sweep" / "trials").exists()
