"""Evaluates the model of a work directory: python -m launch.evaluate --workdir=DIR [--split=S]

The model is the best checkpoint by validation metric when there is one, else the latest. Writes
DIR/eval/metrics.json (recall, ndcg, mrr, hit_rate and accuracy at 10/50/100, coverage@100).
"""

from absl import app, flags

from launch import common, jobs

_WORKDIR = common.define_workdir()
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: the config's eval.split).")


def main(argv):
  del argv
  common.start()
  common.run_cli(lambda: common.print_json("metrics", jobs.evaluate(_WORKDIR.value, _SPLIT.value)))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
