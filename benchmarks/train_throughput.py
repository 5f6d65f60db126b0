"""Training throughput of the TFRS recipe (configs/movielens_100k_tfrs.py), against TFRS itself.

  python benchmarks/train_throughput.py --source_dir=/path/to/ml-100k [--repeats=3]
      [--compute_dtype=bfloat16]

Trains our reproduction of TFRS's basic retrieval recipe and prints its steady-state examples/s.
When tensorflow-recommenders is installed (`pip install -e '.[bench]'`), it also runs TFRS's own
recipe in a child process on the same machine and data and prints both, and the ratio.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

import jax
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import movielens_100k_tfrs  # noqa: E402
from two_tower.train import train_and_evaluate  # noqa: E402

_SOURCE_DIR = flags.DEFINE_string("source_dir", None, "GroupLens ml-100k directory.", required=True)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs of each side; the median is reported.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                                   "Our side's model.compute_dtype.")


def ours(source_dir: str) -> float:
  config = movielens_100k_tfrs.get_config()
  config.data.source_dir = source_dir
  config.model.compute_dtype = _COMPUTE_DTYPE.value
  with tempfile.TemporaryDirectory() as workdir:
    return train_and_evaluate(config, workdir)["examples_per_s"]


def tfrs(source_dir: str) -> dict | None:
  if importlib.util.find_spec("tensorflow_recommenders") is None:
    return None
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tfrs_reference.py")
  out = subprocess.run([sys.executable, script, source_dir], capture_output=True, text=True,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  source_dir = _SOURCE_DIR.value
  if os.path.isdir(os.path.join(source_dir, "ml-100k")):
    source_dir = os.path.join(source_dir, "ml-100k")
  ours_runs = [ours(source_dir) for _ in range(_REPEATS.value)]
  tfrs_runs = [r for r in (tfrs(source_dir) for _ in range(_REPEATS.value)) if r]
  ours_eps = statistics.median(ours_runs)
  print(f"two_tower (JAX) TFRS recipe, {_COMPUTE_DTYPE.value} on {jax.devices()[0].device_kind}: "
        f"{ours_eps:,.0f} examples/s "
        f"(runs: {', '.join(f'{r:,.0f}' for r in ours_runs)})")
  if not tfrs_runs:
    print("tensorflow-recommenders is not installed: pip install -e '.[bench]' to measure TFRS too")
    return
  tfrs_eps = statistics.median(r["examples_per_s"] for r in tfrs_runs)
  tfrs_list = ", ".join(f"{r['examples_per_s']:,.0f}" for r in tfrs_runs)
  print(f"TFRS (TensorFlow) same recipe: {tfrs_eps:,.0f} examples/s (runs: {tfrs_list}); "
        f"TFRS test accuracy@100 {statistics.mean(r['accuracy@100'] for r in tfrs_runs):.4f}, "
        f"accuracy@10 {statistics.mean(r['accuracy@10'] for r in tfrs_runs):.4f}")
  print(f"ratio: {ours_eps / tfrs_eps:.2f}x TFRS")


if __name__ == "__main__":
  app.run(main)
