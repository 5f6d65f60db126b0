"""Prepares (or finds) the dataset of a config: python -m launch.prepare_data --config=... --workdir=DIR"""

from absl import app

from launch import common
from two_tower.workdir import Workdir

_CONFIG = common.define_config()
_WORKDIR = common.define_workdir()


def main(argv):
  del argv

  def run():
    data = Workdir(_WORKDIR.value).prepare_data(common.loaded_config(_CONFIG))
    common.print_json("prepared", {"path": data.path, "split_sizes": data.schema.split_sizes,
                                   "users": data.schema.num_users, "items": data.schema.num_items})
  common.run_cli(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
