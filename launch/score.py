"""Generates every user's top-K candidates from the live index, as Parquet shards:

  python -m launch.score --workdir=DIR --output=OUT [--user_ids=FILE] [--top_k=K]

OUT/part-NNNNN.parquet holds user_id, rank, item_id, score, model_step, index_version; OUT/_SUCCESS
(written last) the counts. Rerun the same command after a crash: finished shards are skipped.
--user_ids: a text file with one user ID per line (unknown IDs are reported and skipped).
Settings come from config.score of DIR/config.json (or --config with overrides). See
docs/serving.md.
"""

import os

from absl import app, flags

from launch import common, jobs
from two_tower import candidates

_WORKDIR = common.define_workdir()
_OUTPUT = flags.DEFINE_string("output", None, "Output directory for the Parquet shards.",
                              required=True)
_USER_IDS = flags.DEFINE_string("user_ids", None, "Optional file of user IDs, one per line.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Candidates per user (default: config.score.top_k).")
_CONFIG = common.define_config(
    None, "Optional: the work directory's training config with --config.score.* overrides "
    "(default: DIR/config.json).")


def run(workdir: str, output: str, user_ids: str | None, top_k: int | None, config) -> None:
  success = jobs.generate_candidates(workdir, output, user_ids_file=user_ids, top_k=top_k,
                                     config=config)
  common.print_json("candidates", success)
  common.print_artifacts({"candidates": os.path.join(output, "part-*.parquet"),
                          "success": os.path.join(output, candidates.SUCCESS)})


def main(argv):
  del argv
  common.start()
  common.run_cli(lambda: run(_WORKDIR.value, _OUTPUT.value, _USER_IDS.value, _TOP_K.value,
                             common.loaded_config(_CONFIG)))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
