"""Prepares (or finds) the dataset of a config: python -m launch.prepare_data --config=... --workdir=DIR

With --beam_runner, as an Apache Beam pipeline (pip install -e '.[beam]'), e.g.
  --beam_runner=DirectRunner --beam_options="--direct_num_workers=2 --direct_running_mode=multi_processing"
and DataflowRunner, FlinkRunner or SparkRunner on a cluster (launch/cluster/dataflow.py).
"""

from absl import app

from launch import common
from two_tower.workdir import Workdir

_CONFIG = common.define_config()
_WORKDIR = common.define_workdir()
_BEAM_RUNNER, _BEAM_OPTIONS = common.define_beam_flags()

def main(argv):
  del argv

  def run():
    data = Workdir(_WORKDIR.value).prepare_data(
        common.loaded_config(_CONFIG), _BEAM_RUNNER.value, _BEAM_OPTIONS.value)
    common.print_json("prepared", {"path": data.path, "split_sizes": data.schema.split_sizes,
                                   "users": data.schema.num_users, "items": data.schema.num_items})
  common.run_cli(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
