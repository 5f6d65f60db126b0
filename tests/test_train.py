"""End-to-end training: outputs, determinism, resumption, evaluation and bad input."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_module, tiny_config
from two_tower.checkpoint import CheckpointMismatchError
from launch import jobs
from two_tower.evaluation import Evaluator
from two_tower.train import train_and_evaluate
from two_tower.workdir import Workdir


def final_params(config, workdir):
  model = Workdir(workdir).load_model(config)
  return jax.tree.map(np.asarray, model.params), model


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_training_writes_summary_checkpoints_and_tensorboard(trained_workdir):
  summary = json.load(open(os.path.join(trained_workdir, "train_summary.json")))
  assert summary["steps"] > 10
  assert summary["examples_per_s"] > 0
  assert np.isfinite(summary["final_loss"])
  assert os.path.isdir(summary["checkpoint"]) and summary["checkpoint"].endswith(f"/{summary['steps']}")
  assert glob.glob(os.path.join(trained_workdir, "tensorboard", "events.out.tfevents.*"))
  kept = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(trained_workdir, "checkpoints", "*"))
                if os.path.basename(p).isdigit())
  assert len(kept) <= tiny_config().train.max_checkpoints_to_keep and kept[-1] == summary["steps"]


def test_evaluate_writes_every_metric(trained_workdir, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained_workdir, workdir)
  metrics = jobs.evaluate(workdir)
  on_disk = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert on_disk == pytest.approx(metrics)
  for k in (10, 50, 100):
    for name in ("recall", "ndcg", "mrr", "hit_rate", "accuracy"):
      assert 0.0 <= metrics[f"{name}@{k}"] <= 1.0
  assert metrics["recall@10"] <= metrics["recall@50"] <= metrics["recall@100"]
  assert 0 < metrics["coverage@100"] <= 1


def test_training_recovers_the_planted_preferences(trained_workdir):
  config = tiny_config()
  _, s = final_params(config, trained_workdir)
  evaluator = Evaluator(s.data, s.catalog, "test", (10,), user_batch=128, graphdef=s.graphdef,
                        mesh=s.mesh)
  model = evaluator(s.params)
  planted = s.data.planted()
  oracle = evaluator.evaluate_scores(lambda users: planted.scores(users))
  popularity = s.data.table("item", "sampling_prob")
  popular = evaluator.evaluate_scores(lambda users: np.tile(np.log(popularity + 1e-9), (len(users), 1)))
  assert model["recall@10"] > 0.7 * oracle["recall@10"]
  assert model["recall@10"] > 1.5 * popular["recall@10"]


def test_same_seed_same_parameters(trained_workdir, tmp_path):
  config = tiny_config()
  train_and_evaluate(config, str(tmp_path / "again"))
  assert_trees_equal(final_params(config, trained_workdir)[0], final_params(config, str(tmp_path / "again"))[0])


class Crash(Exception):
  pass


@pytest.mark.parametrize("logq_estimator,embeddings", [
    ("static", "dense"), ("streaming", "dense"), ("static", "rowwise_adagrad"),
    ("static", "sparse_adam")])
def test_resumed_run_ends_with_the_same_parameters(tmp_path, logq_estimator, embeddings):
  config = tiny_config()
  config.train.num_epochs = 1.0  # 29 steps; checkpoints every 10
  # The row accumulators and moments are resumed too; sparse Adam settles its rows at every save,
  # the step-10 checkpoint included, in both runs alike.
  config.optimizer.embeddings = embeddings
  if logq_estimator == "streaming":  # the item counts are resumed from the checkpoint too
    config.loss.update(logq_correction=True, logq_estimator="streaming", logq_half_life_steps=5.0)
  straight = str(tmp_path / "straight")
  train_and_evaluate(config, straight)

  resumed = str(tmp_path / "resumed")

  def crash_at_15(step, state):
    if step == 15:
      raise Crash()
  with pytest.raises(Crash):
    train_and_evaluate(config, resumed, hooks=[crash_at_15])
  seen = []
  train_and_evaluate(config, resumed, hooks=[lambda step, state: seen.append(step)])
  assert seen[0] == 11  # restarted after the step-10 checkpoint, data position included
  assert_trees_equal(final_params(config, straight)[0], final_params(config, resumed)[0])


def test_workdir_of_another_config_is_refused(trained_workdir, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained_workdir, workdir)
  config = tiny_config()
  config.model.id_embedding_dim = 8
  with pytest.raises(ValueError, match=r"(?s)belongs to another config.*model\.id_embedding_dim: 32 -> 8"):
    train_and_evaluate(config, workdir)


def test_checkpoint_of_an_incompatible_model_is_refused(trained_workdir, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained_workdir, workdir)
  os.remove(os.path.join(workdir, "config.json"))  # e.g. a checkpoint copied in by hand
  config = tiny_config()
  config.model.id_embedding_dim = 8
  with pytest.raises(CheckpointMismatchError, match=r"(?s)incompatible model.*user_id.*\(\d+, 32\) in the checkpoint, \(\d+, 8\)"):
    train_and_evaluate(config, workdir)


def test_cli_reports_bad_config_key_and_uneven_batch(tmp_path):
  bad_key = run_module("launch.train", f"--workdir={tmp_path}/a", "--config.train.batchsize=5")
  assert bad_key.returncode == 2
  assert 'unknown config key' in bad_key.stderr and 'Did you mean "batch_size"' in bad_key.stderr
  uneven = run_module("launch.train", f"--workdir={tmp_path}/b", "--config.train.batch_size=255",
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                           "JAX_PLATFORMS": "cpu"})
  assert uneven.returncode == 2
  assert "batch_size=255 is not divisible by the 2 data-parallel devices" in uneven.stderr
  assert not os.path.exists(f"{tmp_path}/b/checkpoints")


def test_best_checkpoint_and_early_stopping(tmp_path):
  config = tiny_config()
  config.train.update(num_epochs=30.0, eval_every_steps=10, select_by="ndcg@10", early_stopping_evals=2)
  workdir = str(tmp_path / "w")
  summary = train_and_evaluate(config, workdir)
  best = summary["best_validation"]
  assert summary["best_checkpoint"].endswith(f"checkpoints_best/{best['step']}")
  # Stopped two validations after the best one, long before 30 epochs.
  assert summary["steps"] == best["step"] + 20 < 30 * 29
  assert Workdir(workdir).load_model(config).step == best["step"]  # evaluation uses the best state
  # A rerun sees the finished early stop and trains no further.
  assert train_and_evaluate(config, workdir)["steps"] == summary["steps"]


def test_select_by_must_be_a_validation_metric(tmp_path):
  config = tiny_config()
  config.train.update(eval_every_steps=10, select_by="ndcg@5")
  with pytest.raises(ValueError, match=r"select_by='ndcg@5' is not a validation metric"):
    train_and_evaluate(config, str(tmp_path / "w"))


def test_export_tables_writes_unsharded_tables(trained_workdir, tmp_path):
  out = tmp_path / "export"
  result = run_module("launch.export_tables", f"--workdir={trained_workdir}", f"--output={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.load(open(out / "export.json"))
  params, s = final_params(tiny_config(), trained_workdir)
  table = np.load(out / "item.item_id.npy")
  assert summary["tables"]["item/item_id"] == list(table.shape)
  expected = params["item_tower"]["embedding"]["tables"]["item_id"]["embedding"]
  np.testing.assert_array_equal(table, np.asarray(expected.get_value())[:table.shape[0]])


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
  """SIGTERM at a known step (the worker pauses there until signalled): a checkpoint of that
  step, off the checkpoint schedule, exit code 143; the rerun resumes right after it and ends
  with exactly the parameters of a run that was never stopped."""
  import sys
  import train_worker
  from conftest import ROOT
  steps, stop = 12, 5

  def args(name, *extra):
    return [f"--workdir={tmp_path / name}", f"--data_dir={tmp_path / 'data'}",
            f"--out={tmp_path / name}.npz", f"--steps={steps}", *extra]
  train_worker.main(args("straight"))
  pause_dir = tmp_path / "pause"
  pause_dir.mkdir()
  worker = [sys.executable, os.path.join(ROOT, "tests", "train_worker.py"),
            *args("resumed", f"--pause_at={stop}", f"--pause_dir={pause_dir}")]
  [(code, output)] = train_worker.preempt([(worker, dict(os.environ))], str(pause_dir), 0)
  assert code == 143, output[-3000:]
  assert f"preempted: stopped by SIGTERM at step {stop};" in output
  checkpoints = tmp_path / "resumed" / "checkpoints"
  # Saved at the stop, off the checkpoint schedule (every 12 steps here).
  assert max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == stop
  train_worker.main(args("resumed"))

  def saved(name):  # {step: parameters after it} and the final optimizer state, as saved
    with np.load(tmp_path / f"{name}.npz") as f:
      arrays = {k: f[k] for k in f.files if k != "meta"}
    by_step = {}
    for key, value in arrays.items():
      if key.startswith("params/"):
        _, step, param = key.split("/", 2)
        by_step.setdefault(int(step), {})[param] = value
    return by_step, {k: v for k, v in arrays.items() if k.startswith("opt_state/")}
  (straight, straight_opt), (resumed, resumed_opt) = saved("straight"), saved("resumed")
  assert sorted(resumed) == list(range(stop + 1, steps + 1))  # resumed right after the signal
  assert_trees_equal(resumed[steps], straight[steps])
  assert_trees_equal(resumed_opt, straight_opt)


def test_logq_without_uniform_negatives_when_the_first_item_is_not_in_training(tmp_path):
  # Catalog row 0 ("a", the first item ID in sorted order) only occurs after the temporal split's
  # training cut. Its sampling probability is 0, and it fills the unused candidate slots of every
  # batch: the logQ-corrected loss must stay finite (it was NaN: -inf - -inf).
  from configs.base import get_base_config
  rng = np.random.default_rng(0)
  n = 1500
  ts = rng.integers(0, 10**6, n)
  items = np.array([f"i{i:02d}" for i in rng.integers(0, 40, n)])
  late = np.flatnonzero(ts > np.quantile(ts, 0.95))[:10]
  items[late] = "a"
  path = tmp_path / "log.csv"
  with open(path, "w") as f:
    f.write("uid,iid,ts\n")
    for u, i, t in zip(rng.integers(0, 60, n), items, ts):
      f.write(f"u{u},{i},{t}\n")
  config = get_base_config()
  config.data.update(source="logs", history_length=4)
  config.data.logs.update(files=(str(path),), user_id="uid", item_id="iid", timestamp="ts")
  config.data.split.kind = "temporal_global"
  config.loss.update(logq_correction=True, num_uniform_negatives=0)
  config.train.update(batch_size=64, num_steps=10, log_every_steps=5)
  config.eval.ks = (10,)
  workdir = str(tmp_path / "w")
  data = Workdir(workdir).prepare_data(config)
  assert data.table("item", "raw_id")[0] == "a" and data.table("item", "sampling_prob")[0] == 0
  summary = train_and_evaluate(config, workdir)
  assert np.isfinite(summary["final_loss"])


def test_bfloat16_training_keeps_float32_state_and_reaches_float32_quality(trained_workdir, tmp_path):
  config = tiny_config()
  config.model.compute_dtype = "bfloat16"
  dtypes = set()

  def record_dtypes(step, state):
    del step
    dtypes.update(x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
                  if jnp.issubdtype(x.dtype, jnp.floating))

  workdir = str(tmp_path / "bf16")
  summary = train_and_evaluate(config, workdir, hooks=[record_dtypes])
  assert np.isfinite(summary["final_loss"])
  # Parameters and optimizer state (Adam's moments) stay float32 after every step.
  assert dtypes == {jnp.dtype(jnp.float32)}
  quality = {}
  for name, (cfg, path) in {"float32": (tiny_config(), trained_workdir),
                            "bfloat16": (config, workdir)}.items():
    _, s = final_params(cfg, path)
    evaluator = Evaluator(s.data, s.catalog, "test", (10,), user_batch=128, graphdef=s.graphdef,
                          mesh=s.mesh)
    quality[name] = evaluator(s.params)["recall@10"]
  # Within the noise of a tiny run (its recall@10 is about 0.3).
  assert abs(quality["bfloat16"] - quality["float32"]) < 0.1 * quality["float32"], quality


def test_a_padded_catalog_trains_exactly_like_the_real_one():
  # The nightly job's catalog grows a little every day: padded to a bucketed size, consecutive
  # days have the same shapes (so the same compiled step), and a step does not change.
  from test_rowsparse import small_model
  from two_tower import features as feats
  _, _, _, state, step, batch, catalog = small_model(num_uniform_negatives=8, logq_correction=True)

  def first_rows(n):  # the catalog of a day with n items (the item table keeps its rows)
    return {"user": catalog["user"], "item": {k: v[:n] for k, v in catalog["item"].items()}}

  shapes = lambda c: jax.tree.map(np.shape, c)
  assert shapes(feats.pad_catalog(first_rows(37))) == shapes(feats.pad_catalog(first_rows(39)))
  padded = feats.pad_catalog(first_rows(37))
  assert padded["item"]["item_id"].shape[0] == 48 and int(padded[feats.SIZES]["item"]) == 37
  # The nightly job pads to the ID table's rows (which grow only in chunks) while the catalog fits.
  to_table = feats.pad_catalog(first_rows(37), {"item": 64})
  assert to_table["item"]["item_id"].shape[0] == 64 and int(to_table[feats.SIZES]["item"]) == 37
  assert feats.pad_catalog(first_rows(40), {"item": 32})["item"]["item_id"].shape[0] == 48
  want_state, want = step(state, batch, first_rows(37))
  # Bit-exact on CPU. A GPU tiles its reductions by shape, so there the padded sums round apart:
  # 1e-7 relative in the metrics on an H100, and up to 5e-7 in parameters after one 0.01 Adam
  # step (Adam's first step divides each gradient by its own size, near-zero ones included).
  exact = jax.default_backend() == "cpu"
  for padded in (padded, to_table):
    got_state, got = step(state, batch, padded)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(x, y, rtol=0 if exact else 1e-5, atol=0)
    for x, y in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params),
                    strict=True):
      np.testing.assert_allclose(x, y, rtol=0, atol=0 if exact else 1e-4)
  # The uniform negatives are drawn from the 37 real items, not the padding.
  assert not jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), want_state.params,
                                       step(state, batch, first_rows(40))[0].params))
