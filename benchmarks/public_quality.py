"""Quality on a public benchmark in the NGCF / LightGCN layout (Gowalla and the like), under the
honest protocol: fit on train - valid, choose the epoch on valid only, report test.

  python benchmarks/public_quality.py --data_dir=../shared/data/gowalla --seeds=3 \
      [--config=configs/gowalla.py] [--config.model.temperature=0.05 ...] [--workdir=DIR]

DATA_DIR holds `train.txt.gz`, `valid.txt.gz` (a carve-out of train) and `test.txt.gz`, lines
`user item item ...`. For each seed (0, 1, ...) the config trains with `train.select_by` on the
validation split, and the best-validation state is evaluated on test, the user's training and
validation items masked (recall = hits / |test items|, NDCG with binary gains). Prints one line
per seed and, as its last line, one JSON object: means over seeds of recall/ndcg @10, @20, @50,
the std of each, the validation metric, examples/s and training seconds.

With --refit (the protocol the issue allows: choose on valid, then fit on all of train), each seed
then trains again on the whole of train.txt (valid included) for the chosen number of epochs, with
the same settings, and that model is the one tested; the fit-on-train-minus-valid model's test
numbers are reported beside it as `fit_*`.
"""

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch import common, jobs  # noqa: E402
from two_tower.errors import ConfigError, MissingArtifactError  # noqa: E402
from two_tower.train import train_and_evaluate  # noqa: E402
from two_tower.workdir import Workdir  # noqa: E402

_CONFIG = common.define_config(os.path.join(ROOT, "configs", "gowalla.py"))
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with train/valid/test .txt.gz.",
                                required=True)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Number of seeds (0, 1, ...): model seeds; the split is "
                              "the data's.")
_REFIT = flags.DEFINE_bool("refit", False, "After choosing the epoch on valid, retrain on all of "
                           "train.txt for the same number of epochs and test that model.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go (seed-<n>/ and the prepared "
                               "data); default: a temporary directory, removed at the end.")

REPORTED = tuple(f"{m}@{k}" for k in (10, 20, 50) for m in ("recall", "ndcg"))
FILES = ("train.txt.gz", "valid.txt.gz", "test.txt.gz")


def _config(seed: int, data_dir: str, workdir: str):
  config = common.loaded_config(_CONFIG).copy_and_resolve_references()
  config.seed = seed
  config.data.source_dir = os.path.abspath(data_dir)
  config.data.data_dir = os.path.join(workdir, "data")  # one build shared by the seeds
  config.eval.ks = tuple(sorted(set(config.eval.ks) | {10, 20, 50}))
  if not config.train.select_by or config.train.eval_every_steps <= 0:
    raise ConfigError("the config must choose its state on validation: set train.select_by and "
                     "train.eval_every_steps > 0")
  return config


def _refit_config(config, workdir: str, epochs: float):
  """The same settings fitted on the whole training file for `epochs` epochs, no validation."""
  refit = config.copy_and_resolve_references()
  refit.data.logs.validation_from_train = False
  refit.data.logs.split_files.validation = ()
  refit.data.data_dir = os.path.join(workdir, "data-refit")
  refit.train.update(select_by="", eval_every_steps=0, early_stopping_evals=0, num_steps=-1,
                     num_epochs=epochs)
  return refit


def _run(workdir: str) -> dict:
  data_dir = _DATA_DIR.value
  missing = [f for f in FILES if not os.path.isfile(os.path.join(data_dir, f))]
  if missing:
    raise MissingArtifactError(f"{data_dir} lacks {', '.join(missing)}: --data_dir must hold "
                            f"{', '.join(FILES)} (lines 'user item item ...')")
  start = time.perf_counter()
  data = Workdir(os.path.join(workdir, "seed-0")).prepare_data(_config(0, data_dir, workdir))
  prepare_s = time.perf_counter() - start
  schema = data.schema
  print(f"data: {schema.num_users} users, {schema.num_items} items, splits {schema.split_sizes} "
        f"({prepare_s:.0f} s to prepare)", flush=True)
  runs = []
  for seed in range(_SEEDS.value):
    config = _config(seed, data_dir, workdir)
    run_dir = os.path.join(workdir, f"seed-{seed}")
    start = time.perf_counter()
    summary = train_and_evaluate(config, run_dir)
    train_s = time.perf_counter() - start
    test = jobs.evaluate(run_dir, "test")  # the best state by validation (train.select_by)
    best = summary["best_validation"] or {}
    run = {k: test[k] for k in REPORTED}
    if _REFIT.value:
      # The epoch count chosen on valid, as a step count of the train - valid build.
      epochs = best["step"] * config.train.batch_size / schema.split_sizes["train"]
      refit_dir = os.path.join(workdir, f"seed-{seed}-refit")
      start = time.perf_counter()
      train_and_evaluate(_refit_config(config, workdir, epochs), refit_dir)
      refit_test = jobs.evaluate(refit_dir, "test")
      run = {**{f"fit_{k}": v for k, v in run.items()}, **{k: refit_test[k] for k in REPORTED},
             "refit_epochs": epochs, "refit_seconds": time.perf_counter() - start}
    run.update({f"validation_{config.train.select_by}": best.get(config.train.select_by),
                "best_step": best.get("step"), "steps": summary["steps"],
                "examples_per_s": summary["examples_per_s"], "train_seconds": train_s})
    runs.append(run)
    print(f"seed {seed}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                        for k, v in run.items()}), flush=True)
  out = {"seeds": len(runs), "prepare_seconds": prepare_s}
  for key in runs[0]:
    values = [r[key] for r in runs if r[key] is not None]
    if not values:
      continue
    out[key] = statistics.mean(values)
    if key.removeprefix("fit_") in REPORTED or key.startswith("validation_"):
      out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
  return out


def main(argv):
  del argv
  def run():
    if _WORKDIR.value:
      result = _run(_WORKDIR.value)
    else:
      with tempfile.TemporaryDirectory() as tmp:
        result = _run(tmp)
    print(json.dumps(result, sort_keys=True))
  common.run_cli(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
