"""The README's main job, end to end through the command line."""

import glob
import json
import os

from conftest import run_module


def test_main_job_runs_every_stage_and_reports_artifacts(tmp_path):
  workdir = str(tmp_path / "job")
  result = run_module("launch.run", "--config=tests/tiny_config.py", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  for section in ("train summary:", "test metrics:", "vs the planted oracle", "index:",
                  "candidates:", "artifacts:"):
    assert section in out
  summary = json.load(open(os.path.join(workdir, "train_summary.json")))
  metrics = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  oracle = json.load(open(os.path.join(workdir, "eval", "oracle_metrics.json")))
  assert summary["steps"] > 0 and os.path.isdir(summary["checkpoint"])
  assert 0 < metrics["recall@10"] <= oracle["recall@10"] + 0.05
  assert open(os.path.join(workdir, "index", "LIVE")).read().strip()
  assert glob.glob(os.path.join(workdir, "candidates", "part-*.parquet"))
  assert os.path.exists(os.path.join(workdir, "candidates", "_SUCCESS"))
