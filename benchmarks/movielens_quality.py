"""MovieLens-100K quality of the project's configs, as mean ± std over seeds (the README table).

  python benchmarks/movielens_quality.py --source_dir=/path/to/ml-100k [--seeds=0,1,2]
      [--configs=movielens_100k_user_split] [--compute_dtype=bfloat16]
      [--embeddings=rowwise_adagrad --embedding_learning_rate=0.05]

Each seed changes both the model seed and the split seed. Prints a Markdown table.
"""

import os
import statistics
import sys
import tempfile

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import movielens_100k, movielens_100k_tfrs, movielens_100k_user_split  # noqa: E402
from launch import jobs  # noqa: E402
from two_tower.train import train_and_evaluate  # noqa: E402

_SOURCE_DIR = flags.DEFINE_string("source_dir", None, "GroupLens ml-100k directory.", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_CONFIGS = flags.DEFINE_list("configs", [], "Config modules to run (e.g. movielens_100k_user_split); "
                             "default: all.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                                   "model.compute_dtype of every run.")
_EMBEDDINGS = flags.DEFINE_enum("embeddings", "dense", ["dense", "rowwise_adagrad"],
                                "optimizer.embeddings of every run.")
_EMBEDDING_LR = flags.DEFINE_float("embedding_learning_rate", None,
                                   "optimizer.embedding_learning_rate (default: the config's).")

CONFIGS = {
    "movielens_100k_tfrs (random 80/20)": (movielens_100k_tfrs, ("accuracy@10", "accuracy@100")),
    "movielens_100k (random 80/20)": (movielens_100k, ("accuracy@10", "accuracy@100", "recall@10", "ndcg@10")),
    "movielens_100k_user_split (per-user 8:1:1)": (
        movielens_100k_user_split, ("ndcg@10", "recall@10", "mrr@10", "accuracy@100")),
}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, (module, keys) in CONFIGS.items():
      if _CONFIGS.value and module.__name__.split(".")[-1] not in _CONFIGS.value:
        continue
      runs = []
      for seed in map(int, _SEEDS.value):
        config = module.get_config()
        config.seed = seed
        config.data.split.seed = seed
        config.data.source_dir = _SOURCE_DIR.value
        config.model.compute_dtype = _COMPUTE_DTYPE.value
        config.optimizer.embeddings = _EMBEDDINGS.value
        if _EMBEDDING_LR.value is not None:
          config.optimizer.embedding_learning_rate = _EMBEDDING_LR.value
        config.data.data_dir = os.path.join(tmp, "data")
        workdir = os.path.join(tmp, f"{module.__name__}-{seed}")
        summary = train_and_evaluate(config, workdir)
        metrics = jobs.evaluate(workdir)
        metrics["examples_per_s"] = summary["examples_per_s"]
        runs.append(metrics)
        print(name, seed, {k: round(metrics[k], 4) for k in keys},
              "best validation:", summary["best_validation"], flush=True)
      cells = [f"{statistics.mean(r[k] for r in runs):.4f} ± {statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0:.4f}"
               for k in keys]
      rows.append(f"| {name} | " + " | ".join(f"{k} {c}" for k, c in zip(keys, cells)) + " |")
  print(f"\n| config ({_COMPUTE_DTYPE.value}, embeddings {_EMBEDDINGS.value}) | test metrics, "
        f"mean ± std over seeds "
        f"{','.join(_SEEDS.value)} |\n| --- | --- |")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
