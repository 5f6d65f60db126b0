"""Evaluates the latest checkpoint of a work directory: python -m launch.evaluate --workdir=DIR

Writes DIR/eval/metrics.json (recall, ndcg, mrr, hit_rate and accuracy at 10/50/100, coverage@100).
"""

from absl import app, flags

from launch import common
from two_tower import distributed
from two_tower.evaluation import evaluate_workdir

_WORKDIR = common.define_workdir()
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: the config's eval.split).")


def main(argv):
  del argv
  common.run_cli(distributed.initialize)  # jax.distributed, before JAX touches devices
  common.run_cli(lambda: common.print_json(
      "metrics", evaluate_workdir(_WORKDIR.value, _SPLIT.value)))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
