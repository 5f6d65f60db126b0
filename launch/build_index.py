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

from launch import common, jobs
from two_tower import index_store

_WORKDIR = common.define_workdir()
_CONFIG = common.define_config(
    None, "Optional: the work directory's training config with --config.index.* overrides "
    "(default: DIR/config.json).")
_ROLLBACK = flags.DEFINE_bool("rollback", False, "Make the previous index version live again.")


def run(workdir: str, config, rollback: bool) -> None:
  root = os.path.join(workdir, "index")
  if rollback:
    common.print_json("rolled back", index_store.rollback(root))
    return
  manifest = jobs.build_index(workdir, config)
  manifest = {k: v for k, v in manifest.items() if k not in ("files", "calibration")}
  common.print_json("index", manifest)
  common.print_artifacts({"index": os.path.join(root, manifest["version"]),
                          "live pointer": os.path.join(root, index_store.LIVE)})


def main(argv):
  del argv
  common.start()
  common.run_cli(lambda: run(_WORKDIR.value, common.loaded_config(_CONFIG), _ROLLBACK.value))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
