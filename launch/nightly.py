"""The nightly job: one day of a work directory's life.

  python -m launch.nightly --workdir=DIR --date=2026-01-01       # the first day: from scratch
  python -m launch.nightly --workdir=DIR --date=2026-01-02       # warm-started from the live day
  python -m launch.nightly --workdir=DIR --date=D --force        # publish even if the gate fails
  python -m launch.nightly --workdir=DIR --date=yesterday        # from a scheduler (UTC)

It prepares the day's data (the synthetic world's day by default), grows the ID registry, trains
from the live model (parameters and optimizer state) for the day's budget, evaluates the new and
the live model on the day's holdout, gates, builds the item index (cold items included), writes
every user's candidates, publishes the day and writes DIR/days/<date>/summary.json (see
launch/nightly_jobs.py). A rerun after a crash finishes the day; a rerun of a finished day does
nothing. Without --config, the config the work directory started with (or, on its first day,
configs/nightly.py).
"""

import datetime
import os

from absl import app, flags

from configs import nightly as nightly_config
from launch import common, nightly_jobs

_CONFIG = common.define_config(default=None,
                               help_text="ml_collections config file (default: the work directory's "
                               "recorded config, or configs/nightly.py on its first day).")
_WORKDIR = common.define_workdir()
_DATE = flags.DEFINE_string("date", None, "The day to run, YYYY-MM-DD, or today / yesterday "
                            "(UTC; what a scheduler passes).", required=True)
_FORCE = flags.DEFINE_bool("force", False, "Publish the day even if the new model fails the gate "
                           "(recorded in its summary).")


def resolve_date(date: str, today: datetime.date | None = None) -> str:
  """YYYY-MM-DD for `date`, which may also be "today" or "yesterday" (UTC)."""
  today = today or datetime.datetime.now(datetime.timezone.utc).date()
  named = {"today": today, "yesterday": today - datetime.timedelta(days=1)}
  return named[date].isoformat() if date in named else date


def run(config, workdir: str, date: str, force: bool) -> None:
  date = resolve_date(date)
  if config is None:
    life = nightly_jobs.Lifecycle(workdir)
    config = (life.config() if os.path.exists(life.path("config.json"))
              else nightly_config.get_config())
  summary = nightly_jobs.run_day(workdir, date, config, force=force)
  common.print_json(f"day {date}", {k: summary[k] for k in (
      "published", "parent", "model_step", "num_users", "num_items", "new_users", "new_items",
      "cold_items", "evicted", "gate", "index_version", "candidates", "seconds")})
  print(f"summary: {os.path.join(nightly_jobs.Lifecycle(workdir).day_dir(date), 'summary.json')}")


def main(argv):
  del argv
  common.start()
  common.run_cli(lambda: run(common.loaded_config(_CONFIG), _WORKDIR.value, _DATE.value,
                             _FORCE.value))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
