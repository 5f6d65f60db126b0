"""The nightly job: one day of a work directory's life.

  python -m launch.nightly --workdir=DIR --date=2026-01-01       # the first day: from scratch
  python -m launch.nightly --workdir=DIR --date=2026-01-02       # warm-started from the live day
  python -m launch.nightly --workdir=DIR --date=D --force        # publish even if the gate fails
  python -m launch.nightly --workdir=DIR --date=yesterday        # from a scheduler (UTC)
  python -m launch.nightly --workdir=DIR --date=D --config=configs/my_logs.py \
      --interactions='logs/D/*.parquet' --items=items.parquet    # the day's files (data.source='logs')

It prepares the day's data (the synthetic world's day by default), grows the ID registry, trains
from the live model (parameters and optimizer state) for the day's budget, evaluates the new and
the live model on the day's holdout, gates, builds the item index (cold items included), writes
every user's candidates, publishes the day and writes DIR/days/<date>/summary.json (see
launch/nightly_jobs.py). A rerun after a crash finishes the day; a rerun of a finished day does
nothing. Without --config, the config the work directory started with (or, on its first day,
configs/nightly.py).
"""

import datetime
import glob
import os

from absl import app, flags

from configs import nightly as nightly_config
from launch import common, nightly_jobs
from two_tower.errors import UserError

_CONFIG = common.define_config(default=None,
                               help_text="ml_collections config file (default: the work directory's "
                               "recorded config, or configs/nightly.py on its first day).")
_WORKDIR = common.define_workdir()
_DATE = flags.DEFINE_string("date", None, "The day to run, YYYY-MM-DD, or today / yesterday "
                            "(UTC; what a scheduler passes).", required=True)
_FORCE = flags.DEFINE_bool("force", False, "Publish the day even if the new model fails the gate "
                           "(recorded in its summary).")
_INTERACTIONS = flags.DEFINE_list(
    "interactions", None, "The day's interaction files (data.source='logs'), comma-separated; "
    "each may be a glob. They replace data.logs.files, and --items / --users the tables.")
_ITEMS = flags.DEFINE_string("items", "", "The current item table (CSV/TSV/Parquet: item ID and "
                             "item feature columns); its items without interactions are indexed.")
_USERS = flags.DEFINE_string("users", "", "The current user table (CSV/TSV/Parquet: user ID and "
                             "user feature columns).")
# The day's prepare stage as a Beam pipeline (data.source='logs' with a temporal_last_n or
# predefined split); the other stages run here.
_BEAM_RUNNER, _BEAM_OPTIONS = common.define_beam_flags()


def resolve_date(date: str, today: datetime.date | None = None) -> str:
  """YYYY-MM-DD for `date`, which may also be "today" or "yesterday" (UTC)."""
  today = today or datetime.datetime.now(datetime.timezone.utc).date()
  named = {"today": today, "yesterday": today - datetime.timedelta(days=1)}
  return named[date].isoformat() if date in named else date


def expand_files(flag: str, entries: list[str]) -> list[str]:
  """Absolute paths of comma-separated files and globs (each glob's matches in sorted order)."""
  files = []
  for entry in entries:
    matches = sorted(glob.glob(entry)) if glob.has_magic(entry) else [entry]
    if not matches or not os.path.isfile(matches[0]):
      raise UserError(f"--{flag}={entry}: no such file; give the day's existing files (a "
                      "comma-separated list, each a path or a glob)")
    files.extend(os.path.abspath(m) for m in matches)
  return files


def with_day_files(config, interactions: list[str] | None, items: str, users: str):
  """The config reading the day's files of the flags: interactions and (optional) tables."""
  if interactions is None:
    if items or users:
      raise UserError("--items and --users come with the day's --interactions")
    return config
  if config.data.source != "logs":
    raise UserError(f"--interactions needs a config with data.source='logs' (this one reads "
                    f"{config.data.source!r}): pass --config with the files' schema in data.logs")
  config = config.copy_and_resolve_references()
  config.data.logs.files = tuple(expand_files("interactions", interactions))
  config.data.logs.split_files.update(train=(), validation=(), test=())
  config.data.logs.item_table = expand_files("items", [items])[0] if items else ""
  config.data.logs.user_table = expand_files("users", [users])[0] if users else ""
  return config


def run(config, workdir: str, date: str, force: bool, interactions: list[str] | None = None,
        items: str = "", users: str = "", beam_runner: str = "", beam_options: str = "") -> None:
  date = resolve_date(date)
  config_given = config is not None
  if config is None:
    life = nightly_jobs.Lifecycle(workdir)
    config = (life.config() if os.path.exists(life.path("config.json"))
              else nightly_config.get_config())
  if interactions is None and config.data.source == "logs" and not config_given:
    raise UserError("this work directory reads files (data.source='logs'): give the day's "
                    "--interactions (and --items / --users), or a --config naming them")
  config = with_day_files(config, interactions, items, users)
  summary = nightly_jobs.run_day(workdir, date, config, force=force, beam_runner=beam_runner,
                                 beam_options=beam_options)
  common.print_json(f"day {date}", {k: summary[k] for k in (
      "published", "parent", "model_step", "num_users", "num_items", "new_users", "new_items",
      "cold_items", "evicted", "gate", "index_version", "candidates", "seconds")})
  print(f"summary: {os.path.join(nightly_jobs.Lifecycle(workdir).day_dir(date), 'summary.json')}")


def main(argv):
  del argv
  common.use_compilation_cache(
      os.path.join(os.path.abspath(_WORKDIR.value), nightly_jobs.JAX_CACHE))
  common.start()
  common.run_cli(lambda: run(common.loaded_config(_CONFIG), _WORKDIR.value, _DATE.value,
                             _FORCE.value, _INTERACTIONS.value, _ITEMS.value, _USERS.value,
                             _BEAM_RUNNER.value, _BEAM_OPTIONS.value))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
