"""Exports a work directory's embedding tables unsharded, whatever mesh trained them:

  python -m launch.export_tables --workdir=DIR --output=OUT

Writes OUT/<user|item>.<feature>.npy ([vocabulary rows, dim], row i = vocabulary index i) and
OUT/export.json (checkpoint step, table shapes), each file through a temporary name.
"""

import os

import numpy as np
from absl import app, flags

from launch import common
from two_tower import distributed, sharding
from two_tower.experiment import load_for_eval, load_workdir_config
from two_tower.reporting import write_json_atomic

_WORKDIR = common.define_workdir()
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.", required=True)


def export(workdir: str, output: str) -> dict:
  s = load_for_eval(load_workdir_config(workdir), workdir)
  tables = sharding.export_tables(s.state.params, s.data.schema)
  os.makedirs(output, exist_ok=True)
  for key, table in tables.items():
    path = os.path.join(output, key.replace("/", ".") + ".npy")
    with open(path + ".tmp", "wb") as f:
      np.save(f, table)
    os.replace(path + ".tmp", path)
  summary = {"step": int(s.state.step), "workdir": os.path.abspath(workdir),
             "tables": {k: list(v.shape) for k, v in tables.items()}}
  write_json_atomic(os.path.join(output, "export.json"), summary)
  return summary


def main(argv):
  del argv
  common.run_cli(distributed.initialize)
  common.run_cli(lambda: common.print_json("exported", export(_WORKDIR.value, _OUTPUT.value)))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
