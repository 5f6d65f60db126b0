"""The main job: prepare data -> train -> evaluate, then print the metrics and the artifacts.

  python -m launch.run --workdir=runs/default                      # built-in synthetic data
  python -m launch.run --config=configs/movielens_100k.py --config.data.source_dir=DIR --workdir=W
"""

import os

from absl import app

from launch import common
from two_tower import distributed
from two_tower.evaluation import evaluate_workdir
from two_tower.train import train_and_evaluate

_CONFIG = common.define_config()
_WORKDIR = common.define_workdir()


def run(config, workdir: str) -> None:
  summary = train_and_evaluate(config, workdir)
  metrics = evaluate_workdir(workdir)
  common.print_json("train summary", summary)
  common.print_json(f"{config.eval.split} metrics", metrics)
  print("artifacts:")
  for name, path in (
      ("data", summary["data"]),
      ("checkpoint", summary["checkpoint"]),
      ("train summary", os.path.join(workdir, "train_summary.json")),
      ("metrics", os.path.join(workdir, "eval", "metrics.json")),
      ("tensorboard", os.path.join(workdir, "tensorboard")),
  ):
    print(f"  {name:14s} {path}")


def main(argv):
  del argv
  common.run_cli(distributed.initialize)  # jax.distributed, before JAX touches devices
  common.run_cli(lambda: run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
