"""Trains a two-tower model: python -m launch.train --config=configs/<name>.py --workdir=DIR"""

from absl import app
from ml_collections import config_flags

from launch import common
from two_tower.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Config file.")
_WORKDIR = common.define_workdir()


def main(argv):
  del argv
  common.run_cli(lambda: common.print_json(
      "train summary", train_and_evaluate(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  app.run(main)
