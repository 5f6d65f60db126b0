"""The main job: prepare data -> train -> evaluate -> build the item index -> generate candidates,
then print the metrics and the artifacts.

  python -m launch.run --workdir=runs/default                      # built-in synthetic data
  python -m launch.run --config=configs/movielens_100k.py --config.data.source_dir=DIR --workdir=W
"""

import json
import os

from absl import app

from launch import common, jobs
from two_tower.train import train_and_evaluate

_CONFIG = common.define_config()
_WORKDIR = common.define_workdir()


def run(config, workdir: str) -> None:
  summary = train_and_evaluate(config, workdir)
  metrics = jobs.evaluate(workdir, config=config)
  common.print_json("train summary", summary)
  common.print_json(f"{config.eval.split} metrics", metrics)
  oracle = os.path.join(workdir, "eval", "oracle_metrics.json")
  if os.path.exists(oracle):
    with open(oracle) as f:
      planted = json.load(f)
    print("vs the planted oracle (synthetic data): " + ", ".join(
        f"{k} {metrics[k]:.4f} / {planted[k]:.4f}" for k in ("recall@10", "ndcg@10", "recall@100")))
  # A live index of the model's checkpoint is reused, so that rerunning the job changes nothing.
  manifest = jobs.live_index_of_model(workdir) or jobs.build_index(workdir, config)
  common.print_json("index", {k: manifest[k] for k in (
      "version", "model_step", "num_items", "settings", "validation")})
  output = os.path.join(workdir, "candidates")
  scored = jobs.generate_candidates(workdir, output, config=config)
  common.print_json("candidates", scored)
  common.print_artifacts({
      "data": summary["data"],
      "checkpoint": summary["best_checkpoint"] or summary["checkpoint"],
      "train summary": os.path.join(workdir, "train_summary.json"),
      "metrics": os.path.join(workdir, "eval", "metrics.json"),
      "tensorboard": os.path.join(workdir, "tensorboard"),
      "index": os.path.join(workdir, "index", manifest["version"]),
      "candidates": os.path.join(output, "part-*.parquet"),
  })


def main(argv):
  del argv
  common.start()
  common.run_cli(lambda: run(common.loaded_config(_CONFIG), _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
