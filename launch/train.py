"""Trains a two-tower model: python -m launch.train --config=configs/<name>.py --workdir=DIR"""

from absl import app

from launch import common
from two_tower.train import train_and_evaluate

_CONFIG = common.define_config()
_WORKDIR = common.define_workdir()


def main(argv):
  del argv
  common.start()
  common.run_cli(lambda: common.print_json(
      "train summary", train_and_evaluate(common.loaded_config(_CONFIG), _WORKDIR.value)))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
