"""Runs a hyperparameter sweep and selects by a validation metric:

  python -m launch.sweep --config=configs/<name>.py --workdir=DIR --sweep=FILE \
      [--metric=recall@20] [--mode=grid|random --num_trials=N --seed=S] [--trial=I]

FILE (.json, .yaml or .py) maps config keys to the values to try, e.g.
  {"model.temperature": [0.05, 0.1], "optimizer.learning_rate": [1e-3, 3e-3]}
Each trial trains in DIR/trials/<name>/ (serially; `--trial=I` runs only the I-th, e.g. as one task
of a cluster array job) with train.select_by set to the metric, and is finished once its
trial.json exists: a rerun skips finished trials and resumes an interrupted one from its
checkpoint. The prepared data is shared (DIR/data unless data.data_dir is set). Then, from the
finished trials: DIR/leaderboard.{csv,json,png} and DIR/best_config.json (the winner's full
config). Test metrics are never looked at.
"""

import os
import time

from absl import app, flags

from launch import common
from two_tower import atomic, sweep
from two_tower.train import train_and_evaluate

_CONFIG = common.define_config()
_WORKDIR = common.define_workdir()
_SWEEP = flags.DEFINE_string("sweep", None, "Search space: .json, .yaml or .py file.", required=True)
_METRIC = flags.DEFINE_string("metric", None, "Validation metric to select by (e.g. recall@20); "
                              "default: the config's train.select_by.")
_MODE = flags.DEFINE_enum("mode", "grid", ["grid", "random"], "Every combination, or a sample.")
_NUM_TRIALS = flags.DEFINE_integer("num_trials", 10, "Trials of a random search.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of a random search's sample.")
_TRIAL = flags.DEFINE_integer("trial", None, "Run only this trial (0-based), then write the "
                              "leaderboard of the finished ones.")


def _run_trial(trial: sweep.Trial, config, trial_dir: str, metric: str) -> dict:
  start = time.perf_counter()
  summary = train_and_evaluate(config, trial_dir)
  record = sweep.trial_record(trial, metric, summary, time.perf_counter() - start)
  sweep.write_json(os.path.join(trial_dir, sweep.TRIAL_SUMMARY), record)  # marks it finished
  return record


def run_sweep(base, workdir: str, metric: str, trials: list, only: int | None = None) -> list[dict]:
  """Trains every unfinished trial in order (or only trial `only`); returns the records of the
  finished ones."""
  records = []
  for i, trial in enumerate(trials):
    trial_dir = os.path.join(workdir, "trials", trial.name)
    done = os.path.join(trial_dir, sweep.TRIAL_SUMMARY)
    if os.path.exists(done):
      print(f"[{i + 1}/{len(trials)}] {trial.name}: finished, skipped", flush=True)
      records.append(sweep.load_json(done))
      continue
    if only is not None and i != only:
      continue
    print(f"[{i + 1}/{len(trials)}] {trial.name}: training", flush=True)
    record = _run_trial(trial, _trial_config(base, trial, metric, workdir), trial_dir, metric)
    print(f"[{i + 1}/{len(trials)}] {trial.name}: validation {metric} = {record['value']:.4f}",
          flush=True)
    records.append(record)
  return records


def _trial_config(base, trial: sweep.Trial, metric: str, workdir: str):
  config = sweep.apply_overrides(base, trial.overrides)
  config.train.select_by = metric  # the best state and the reported value are by this metric
  if not config.data.data_dir:
    config.data.data_dir = os.path.join(workdir, "data")  # one build for trials with equal data
  return config


def _write_outputs(base, workdir: str, space: dict, metric: str, records: list[dict]) -> dict:
  if not records:
    raise sweep.SweepError("no trial has finished yet: nothing to rank")
  board = sweep.leaderboard(records)
  keys = list(space)
  sweep.write_json(os.path.join(workdir, "leaderboard.json"), board)
  atomic.write_text(os.path.join(workdir, "leaderboard.csv"), sweep.leaderboard_csv(board, keys))
  sweep.plot_leaderboard(board, keys, os.path.join(workdir, "leaderboard.png"))
  best = board[0]
  best_config = _trial_config(base, sweep.Trial(best["name"], best["overrides"]), metric, workdir)
  sweep.write_json(os.path.join(workdir, "best_config.json"), best_config.to_dict())
  return best


def main(argv):
  del argv

  def run():
    base = common.loaded_config(_CONFIG)
    metric = _METRIC.value or base.train.select_by
    if not metric:
      raise sweep.SweepError("no metric to select by: pass --metric=NAME (e.g. recall@20) or set "
                             "train.select_by in the config")
    space = sweep.load_space(_SWEEP.value)
    # Every mistake is reported here, before the first trial trains.
    sweep.check_metric(metric, base)
    sweep.check_space(space, base, _MODE.value)
    trials = sweep.trials(space, _MODE.value, _NUM_TRIALS.value, _SEED.value)
    if _TRIAL.value is not None and not 0 <= _TRIAL.value < len(trials):
      raise sweep.SweepError(f"--trial={_TRIAL.value} is out of range: this sweep has "
                             f"{len(trials)} trials (0..{len(trials) - 1})")
    records = run_sweep(base, _WORKDIR.value, metric, trials, _TRIAL.value)
    best = _write_outputs(base, _WORKDIR.value, space, metric, records)
    print(f"{len(records)}/{len(trials)} trials finished; best by validation {metric}: "
          f"{best['name']} = {best['value']:.4f}")
    common.print_json("best overrides", best["overrides"])
    common.print_artifacts({name: os.path.join(_WORKDIR.value, name) for name in (
        "leaderboard.csv", "leaderboard.json", "leaderboard.png", "best_config.json")})

  common.run_cli(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
