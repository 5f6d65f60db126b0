"""Exports a work directory's embedding tables unsharded, whatever mesh trained them:

  python -m launch.export_tables --workdir=DIR --output=OUT

Writes OUT/<user|item>.<feature>.npy ([vocabulary rows, dim], row i = vocabulary index i) and
OUT/export.json (checkpoint step, table shapes), each file atomically.
"""

import os

from absl import app, flags

from launch import common
from two_tower import atomic
from two_tower.model import export_tables
from two_tower.workdir import Workdir

_WORKDIR = common.define_workdir()
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.", required=True)


def export(workdir: str, output: str) -> dict:
  model = Workdir(workdir).load_model()
  shapes = {}
  for key, table in export_tables(model.params, model.schema):
    atomic.save_npy(os.path.join(output, key.replace("/", ".") + ".npy"), table)
    shapes[key] = list(table.shape)
  summary = {"step": model.step, "workdir": os.path.abspath(workdir), "tables": shapes}
  atomic.write_json(os.path.join(output, "export.json"), summary)
  return summary


def main(argv):
  del argv
  common.start()
  common.run_cli(lambda: common.print_json("exported", export(_WORKDIR.value, _OUTPUT.value)))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
