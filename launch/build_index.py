"""Builds, validates and publishes the item index of a work directory's latest checkpoint:

  python -m launch.build_index --workdir=DIR               # new version under DIR/index, made live
  python -m launch.build_index --workdir=DIR --rollback    # the previous version live again

Settings come from config.index of the work directory's config (DIR/config.json); to change them
without retraining, pass the training config with overrides, e.g.
  --config=configs/synthetic.py --config.index.leaves_to_search=40
The build fails (exit code 2, the previous version stays live) if the index misses the recall
floors of its validation gate. See docs/serving.md.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from launch import common
from two_tower import distributed
from two_tower import index

_WORKDIR = common.define_workdir()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional: the work directory's training config with --config.index.* "
    "overrides (default: DIR/config.json).")
_ROLLBACK = flags.DEFINE_bool("rollback", False, "Make the previous index version live again.")


def run(workdir: str, config, rollback: bool) -> None:
  if rollback:
    common.print_json("rolled back", index.rollback(workdir))
    return
  manifest = index.build_index(workdir, config)
  manifest = {k: v for k, v in manifest.items() if k not in ("files", "calibration")}
  common.print_json("index", manifest)
  root = os.path.join(workdir, "index")
  common.print_artifacts({"index": os.path.join(root, manifest["version"]),
                          "live pointer": os.path.join(root, index.LIVE)})


def main(argv):
  del argv
  common.run_cli(distributed.initialize)  # jax.distributed, before JAX touches devices
  common.run_cli(lambda: run(_WORKDIR.value, _CONFIG.value, _ROLLBACK.value))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
