"""The work directory: config validated at load, which checkpoint is the model, params-only
restores, jitted evaluation built once, one user-error class, atomic outputs."""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, run_module, tiny_config
from launch import common, jobs
from two_tower import atomic
from two_tower import config as config_lib
from two_tower.checkpoint import CheckpointMismatchError
from two_tower.errors import ConfigError, MissingArtifactError, UserError
from two_tower.evaluation import Evaluator
from two_tower.workdir import Workdir


def test_every_bad_choice_is_refused_at_load_with_the_valid_values():
  config = tiny_config()
  config.optimizer.name = "adm"
  config.data.split.kind = "by_time"
  config.train.update(select_by="ndcg@7", eval_every_steps=5)
  with pytest.raises(ConfigError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert "optimizer.name='adm' is not one of adam, adamw, adagrad, sgd" in message
  assert "data.split.kind='by_time' is not one of random" in message
  assert "train.select_by='ndcg@7' is not a validation metric" in message


def test_cli_refuses_a_bad_choice_before_any_work(tmp_path):
  proc = run_module("launch.train", f"--workdir={tmp_path}/w", "--config.loss.reduction=avg")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("The keys and their meaning")
  assert "loss.reduction='avg' is not one of mean, sum" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w")  # no data prepared, nothing recorded


def test_config_diff_names_each_changed_key_and_skips_ignored_prefixes():
  a, b = tiny_config(), tiny_config()
  b.model.temperature = 0.5
  b.train.log_every_steps = 1
  b.eval.ks = (5,)
  assert config_lib.diff(a, b, ignore=("eval.",)) == [
      "model.temperature: 0.1 -> 0.5", "train.log_every_steps: 5 -> 1"]


def test_the_model_is_the_best_checkpoint_else_the_latest(tmp_path):
  config = tiny_config()
  config.train.update(num_epochs=3.0, eval_every_steps=10, select_by="ndcg@10",
                      checkpoint_every_steps=10)
  workdir = str(tmp_path / "w")
  from two_tower.train import train_and_evaluate
  summary = train_and_evaluate(config, workdir)
  wd = Workdir(workdir)
  best_step = summary["best_validation"]["step"]
  source, step = wd.model_checkpoint()
  assert step == best_step and source.directory.endswith("checkpoints_best")
  other = [s for s in wd.checkpointer().all_steps() if s != best_step][0]
  source, step = wd.model_checkpoint(other)
  assert step == other and source.directory.endswith("checkpoints")
  with pytest.raises(MissingArtifactError, match=r"checkpoint step 99999 is not in .* \(kept: \["):
    wd.model_checkpoint(99999)
  shutil.rmtree(wd.path("checkpoints_best"))
  assert wd.model_checkpoint()[1] == summary["steps"]  # no best: the latest


def test_inference_reads_parameters_only(workdir):
  """Every checkpoint's optimizer item deleted: evaluation, indexing and export still work."""
  removed = glob.glob(os.path.join(workdir, "checkpoints", "*", "train"))
  assert removed
  for path in removed:
    shutil.rmtree(path)
  metrics = jobs.evaluate(workdir)
  assert 0 < metrics["recall@10"] <= 1
  assert jobs.build_index(workdir)["model_step"] == Workdir(workdir).model_checkpoint()[1]
  with pytest.raises(Exception):  # training, which needs the optimizer state, cannot resume
    from two_tower.train import train_and_evaluate
    train_and_evaluate(tiny_config(), workdir)


def test_resuming_from_a_params_only_checkpoint_is_refused(tmp_path):
  config = tiny_config()
  config.train.update(num_epochs=1.0, eval_every_steps=10, select_by="ndcg@10")
  workdir = str(tmp_path / "w")
  from two_tower.train import setup_training, train_and_evaluate
  train_and_evaluate(config, workdir)
  best = Workdir(workdir).best_checkpointer()
  state = setup_training(config, workdir).state
  with pytest.raises(CheckpointMismatchError, match="holds parameters only"):
    best.restore_train_state(best.latest_step(), state)


def test_evaluation_scores_in_full_float32_whatever_the_default_precision(workdir):
  # As the exact search (test_index.py): a GPU's default TF32 would reorder near-ties.
  model = Workdir(workdir).load_model()
  evaluator = Evaluator(model.data, model.catalog, "validation", (10,), 128,
                        graphdef=model.graphdef, mesh=model.mesh)
  items = evaluator._embedder.embed_on_device(model.params, "item", np.arange(evaluator.num_items))
  with jax.default_matmul_precision("tensorfloat32"):
    program = evaluator._scores.lower(model.params, model.catalog, items,
                                      evaluator.users[:4]).as_text()
  scores = [line for line in program.splitlines()
            if "dot_general" in line and f"x{evaluator.num_items}xf32>" in line.split("->")[-1]]
  assert len(scores) == 1 and "precision = [HIGHEST, HIGHEST]" in scores[0]


def test_evaluator_compiles_once_for_every_call(workdir):
  model = Workdir(workdir).load_model()
  evaluator = Evaluator(model.data, model.catalog, "validation", (10,), 128,
                        graphdef=model.graphdef, mesh=model.mesh)
  first = evaluator(model.params)
  other = jax.block_until_ready(jax.tree.map(lambda x: x * 0.5, model.params))  # same shapes
  compiles = []

  def on_event(event, seconds, **kw):
    del seconds, kw
    if "backend_compile" in event:
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    second = evaluator(other)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert compiles == []
  assert first["recall@10"] != second["recall@10"] or first["ndcg@10"] != second["ndcg@10"]


def test_user_errors_print_one_line_and_bugs_keep_their_traceback(capsys):
  def bad_input():
    raise ConfigError("mesh.data=3 does not fit: choose 1")
  with pytest.raises(SystemExit) as exit_info:
    common.run_cli(bad_input)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: mesh.data=3 does not fit: choose 1\n"

  def bug():
    raise ValueError("a bug, not bad input")
  with pytest.raises(ValueError, match="a bug"):
    common.run_cli(bug)
  assert issubclass(MissingArtifactError, FileNotFoundError) and issubclass(ConfigError, UserError)


_PAGE_FAULTS_PER_STEP = """
import resource, statistics, sys
import jax, jax.numpy as jnp
from launch import common
if sys.argv[1] == "reuse":
  common.reuse_freed_memory()
# A step like train_step: the state donated, a [8192, 1024] temporary (32 MiB) in XLA's buffers.
w = jnp.full((1024, 64), 1e-4)
step = jax.jit(lambda x: x + jnp.tanh(x @ w) @ w.T, donate_argnums=0)
x = jnp.ones((8192, 1024))
faults = []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  x = step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[2:]))
"""


def test_cli_processes_reuse_the_pages_of_each_steps_buffers():
  """Without reuse_freed_memory (run_cli calls it) every step faults its temporaries in again."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA:CPU's buffers live in the process's heap
  faults = {mode: float(subprocess.run(
      [sys.executable, "-c", _PAGE_FAULTS_PER_STEP, mode], capture_output=True, text=True,
      check=True, cwd=ROOT, env=env).stdout) for mode in ("default", "reuse")}
  assert faults["default"] > 4000  # 8,192 pages of 4 KiB
  assert faults["reuse"] < faults["default"] / 20


def test_cli_processes_ask_a_gpu_for_deterministic_kernels(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  common.run_cli(lambda: None)  # every entry point passes through it before JAX starts a backend
  assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                             "--xla_gpu_deterministic_ops=true"]
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")  # a user's choice stays
  common.deterministic_gpu_ops()
  assert os.environ["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"


def test_atomic_writes_keep_the_old_file_on_failure(tmp_path):
  path = str(tmp_path / "out" / "summary.json")
  atomic.write_json(path, {"a": 1})
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
  with pytest.raises(TypeError):
    atomic.write_json(path, {"a": object()})  # fails halfway through serialising
  assert json.load(open(path)) == {"a": 1}
  assert os.listdir(tmp_path / "out") == ["summary.json"]  # no temporary file left
  atomic.save_npy(str(tmp_path / "out" / "t.npy"), np.arange(3))
  np.testing.assert_array_equal(np.load(tmp_path / "out" / "t.npy"), np.arange(3))


def test_a_key_added_since_a_workdir_was_recorded_compares_at_its_default(tmp_path):
  config = tiny_config()
  Workdir(str(tmp_path)).bind(config)
  # A work directory recorded before model.compute_dtype existed still binds to the default...
  recorded = json.load(open(tmp_path / "config.json"))
  del recorded["model"]["compute_dtype"]
  json.dump(recorded, open(tmp_path / "config.json", "w"))
  Workdir(str(tmp_path)).bind(config)
  # ... and, as it changes the trained model, another compute dtype is refused.
  config.model.compute_dtype = "bfloat16"
  with pytest.raises(UserError, match=r"model.compute_dtype: 'float32' -> 'bfloat16'"):
    Workdir(str(tmp_path)).bind(config)
