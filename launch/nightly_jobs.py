"""The nightly lifecycle of one work directory: each day, prepare -> warm-start train -> evaluate
(the new model and the live one, on the day's holdout) -> gate -> build the index -> candidates ->
publish, recorded in days/<date>/summary.json.

  DIR/config.json                the config the lifecycle started with (checked every day)
  DIR/inputs.json                with data.source='logs': the first day's interaction columns
                                 (every later day's files must have the same)
  DIR/LIVE.json                  the published day: its date, checkpoint, index and candidates
  DIR/days/<date>/               the day's own work directory (two_tower.workdir.Workdir): its
                                 config (the day's data), data/, checkpoints/, eval/, index/,
                                 candidates/, and
    registry.npz                 the ID registry the day's tables are indexed by (two_tower/registry.py)
    progress.json                the stages done, their seconds and results, and the parent
    summary.json                 written last: the day is finished
  DIR/report/                    index.html, PNG plots and days.json over every finished day
  DIR/jax_cache/                 compiled programs reused by the next days (launch/nightly.py)

Crash safety. Each stage's result is recorded in progress.json (atomically) when it ends, and a
rerun skips recorded stages. Today's state is always computed from the parent's (the day that was
live when today started, recorded before any work): the registry from the parent's registry, the
model from the parent's last checkpoint, or from today's own latest checkpoint once training has
saved one (training resumes, data position included). So no day's data is applied twice, whatever
stage a crash interrupts. Nothing becomes live before the day's index and candidates are complete:
publishing is the atomic replacement of LIVE.json.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
import pyarrow.parquet as pq

from launch import jobs
from pipelines import logs
from pipelines.histories import CarriedHistories
from pipelines.prepare import load_raw
from two_tower import atomic, registry as registry_lib, sharding
from two_tower import replay as replay_lib
from two_tower import report as report_lib
from two_tower import config as config_lib
from two_tower import warm_start as warm_lib
from two_tower.errors import UserError
from two_tower.evaluation import Evaluator
from two_tower.state import init_params
from two_tower.train import WarmStart, carry_over, train_and_evaluate
from two_tower.workdir import RUNTIME_KEYS, Workdir

Hook = Callable[[str], None]  # called with a stage name (and train steps); tests simulate crashes
STAGES = ("prepare", "train", "evaluate", "gate", "index", "candidates", "publish")
# Keys that may differ from the recorded config between days: they do not change the shape of the
# model or of its optimizer state.
DAILY_KEYS = RUNTIME_KEYS + ("train.", "optimizer.learning_rate", "optimizer.schedule",
                             "optimizer.warmup_steps", "optimizer.embedding_learning_rate",
                             "model.id_dropout", "nightly.", "gate.", "data.source_dir",
                             "data.logs.files", "data.logs.split_files", "data.logs.user_table",
                             "data.logs.item_table")
REGISTRY = "registry.npz"
# Every user's latest items after the day (pipelines/histories.py), carried into the next day's data.
HISTORIES = "histories.npz"
JAX_CACHE = "jax_cache"
INPUTS = "inputs.json"


class NightlyError(UserError):
  """A date or a work directory the nightly job cannot run."""


class GateFailed(UserError):
  """The new model is worse than the live one by more than gate.max_regression."""


def _no_hook(stage: str) -> None:
  del stage


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


class Lifecycle:
  """The layout of a nightly work directory and what it records."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def day_dir(self, date: str) -> str:
    return self.path("days", date)

  def live(self) -> dict | None:
    return _read(self.path("LIVE.json"))

  def summary(self, date: str) -> dict | None:
    return _read(os.path.join(self.day_dir(date), "summary.json"))

  def dates(self) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(self.path("days", "*"))
                  if os.path.isdir(p))

  def finished(self) -> list[str]:
    return [d for d in self.dates() if self.summary(d) is not None]

  def histories_before(self, date: str) -> str:
    """The histories of the latest day before `date` that prepared its data (published or not:
    histories are data, not a model), or "" when none did."""
    paths = [os.path.join(self.day_dir(d), HISTORIES) for d in self.dates() if d < date]
    return next((p for p in reversed(paths) if os.path.exists(p)), "")

  def bind(self, config: ml_collections.ConfigDict) -> None:
    """Records the config on the first day; refuses a later config that changes the model."""
    config_lib.validate(config)
    recorded = _read(self.path("config.json"))
    if recorded is None:
      atomic.write_json(self.path("config.json"), json.loads(config.to_json()))
      return
    # Keys added to configs/base.py since the first day compare at their defaults.
    recorded = config_lib.with_defaults(ml_collections.ConfigDict(recorded))
    diffs = config_lib.diff(recorded, json.loads(config.to_json()), ignore=DAILY_KEYS)
    if diffs:
      raise NightlyError(
          f"{self.root} was started with another config; it differs in\n  " + "\n  ".join(diffs[:20])
          + "\nBetween days only these keys may change: " + ", ".join(DAILY_KEYS)
          + f". Start a new --workdir for a new model, or pass the config of {self.path('config.json')}.")

  def config(self) -> ml_collections.ConfigDict:
    recorded = _read(self.path("config.json"))
    if recorded is None:
      raise NightlyError(f"{self.root} has no config.json: run a first day with --config")
    return config_lib.validate(config_lib.with_defaults(ml_collections.ConfigDict(recorded)))


def day_config(config: ml_collections.ConfigDict, day_dir: str, date: str,
               carried_history: str = "") -> ml_collections.ConfigDict:
  """The config of one day's work directory: the day's data, indexed by the day's registry, its
  histories going on with `carried_history` (Lifecycle.histories_before)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.data.source == "synthetic":
    config.data.synthetic.date = date
  elif config.data.source != "logs":
    raise NightlyError("the nightly job reads the synthetic world by day or each day's files "
                       f"(data.source='synthetic' or 'logs'), not data.source={config.data.source!r}")
  if config.data.source == "logs":
    config.data.logs.allow_empty = True  # a day without interactions still refreshes the catalog
  config.data.id_registry = os.path.join(day_dir, REGISTRY)
  config.data.carried_history = carried_history
  config.data.data_dir = ""  # each day's data inside its own directory
  return config


def _registry_config(config: ml_collections.ConfigDict) -> registry_lib.RegistryConfig:
  return registry_lib.RegistryConfig(
      min_count=config.nightly.min_count, expire_after_days=config.nightly.expire_after_days,
      chunk=registry_lib.chunk_rows(config.nightly.row_chunk,
                                    sharding.mesh_option(config.mesh, "table_row_multiple")),
      num_oov=config.data.num_oov_buckets, feature_min_count=config.data.min_count,
      min_growth=config.nightly.min_growth)


def _check_date(life: Lifecycle, date: str) -> None:
  try:
    datetime.date.fromisoformat(date)
  except ValueError:
    raise NightlyError(f"--date={date!r} is not a date: use YYYY-MM-DD") from None
  finished = life.finished()
  if finished and date < finished[-1]:
    raise NightlyError(
        f"{date} is earlier than {finished[-1]}, the last finished day of {life.root}: days run in "
        "order, and a model cannot go back in time. Run a later date.")
  unfinished = [d for d in life.dates() if d not in finished and d != date]
  if unfinished:
    raise NightlyError(
        f"day {unfinished[0]} of {life.root} did not finish: rerun it (--date={unfinished[0]}) "
        f"before starting {date}")


def _check_inputs(life: Lifecycle, config: ml_collections.ConfigDict) -> dict | None:
  """With data.source='logs', refuses (before anything is written) a day's missing file, an
  interaction file whose columns differ from the first day's, and a user or item table that
  cannot be read (a missing column, an ID on two rows). Returns the columns to record on the
  first day (None once recorded, or for other sources)."""
  if config.data.source != "logs":
    return None
  cfg, base = config.data.logs, config.data.source_dir
  files = [path for path, _ in logs.log_files(cfg, base)]
  for side in ("user", "item"):
    if cfg.get(f"{side}_table", ""):
      logs.entity_table(cfg, side, logs.resolve_path(cfg[f"{side}_table"], base))
  if cfg.format.lower() == "adjacency":
    return None
  columns = {p: logs.file_columns(p, logs.file_format(p, cfg.format.lower())) for p in files}
  recorded = _read(life.path(INPUTS))
  first = recorded or {"file": files[0], "columns": columns[files[0]]}
  for path, cols in columns.items():
    missing = [c for c in first["columns"] if c not in cols]
    extra = [c for c in cols if c not in first["columns"]]
    retyped = [f"{c} ({first['columns'][c]} -> {cols[c]})" for c in cols
               if c in first["columns"] and "string" not in (cols[c], first["columns"][c])
               and cols[c] != first["columns"][c]]
    if missing or extra or retyped:
      raise NightlyError(
          f"{path} does not have the columns of {life.root}'s first day (those of {first['file']}, "
          f"recorded in {life.path(INPUTS)}):" + (f" missing {missing}" if missing else "")
          + (f" unexpected {extra}" if extra else "") + (f" retyped {retyped}" if retyped else "")
          + ". Write the day's files with the first day's columns, or start a new --workdir for "
          "a new schema.")
  return None if recorded else first


class _Day:
  """One day's run: its directories, config, parent and recorded progress."""

  def __init__(self, life: Lifecycle, config: ml_collections.ConfigDict, date: str, hook: Hook,
               beam_runner: str = "", beam_options: str = ""):
    self.life, self.date, self.hook = life, date, hook
    self.beam_runner, self.beam_options = beam_runner, beam_options  # the prepare stage's
    self.dir = life.day_dir(date)
    self.config = day_config(config, self.dir, date, life.histories_before(date))
    self.workdir = Workdir(self.dir)
    self.progress_path = os.path.join(self.dir, "progress.json")
    progress = _read(self.progress_path)
    if progress is None:
      # The parent is fixed when the day starts: after a crash past publishing, LIVE.json names
      # today, which must not become its own parent.
      os.makedirs(self.dir, exist_ok=True)
      live = life.live()
      progress = {"date": date, "parent": live, "done": [], "seconds": {}}
      self._save(progress)
    self.progress = progress
    parent = progress["parent"]
    self.parent = parent
    self.parent_dir = life.day_dir(parent["date"]) if parent else None

  @property
  def empty_day(self) -> bool:
    """The day has no interactions (known once prepared)."""
    return bool(self.progress.get("empty_day", False))

  def _save(self, progress: dict) -> None:
    atomic.write_json(self.progress_path, progress)

  def done(self, stage: str) -> bool:
    return stage in self.progress["done"]

  def finish(self, stage: str, seconds: float, **results) -> None:
    self.progress["done"].append(stage)
    self.progress["seconds"][stage] = seconds
    self.progress.update(results)
    self._save(self.progress)

  # ----------------------------------------------------------------------------- stages

  def registries(self) -> tuple[registry_lib.Registry | None, registry_lib.Registry]:
    parent = (registry_lib.Registry.load(os.path.join(self.parent_dir, REGISTRY))
              if self.parent_dir else None)
    return parent, registry_lib.Registry.load(os.path.join(self.dir, REGISTRY))

  def parent_data(self):
    """The parent day's prepared data (already built: opening it reads its schema only)."""
    parent_wd = Workdir(self.parent_dir)
    return parent_wd.prepare_data(parent_wd.config())

  def carried(self, schema) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    parent, today = self.registries()
    tables = warm_lib.table_vocabularies(schema)
    carried = {v: registry_lib.carried_rows(parent.vocabs.get(v) if parent else None,
                                            today.vocab(v)) for v in set(tables.values())}
    return carried, tables

  def prepare(self) -> dict:
    parent = (registry_lib.Registry.load(os.path.join(self.parent_dir, REGISTRY))
              if self.parent_dir else registry_lib.Registry.empty())
    raw, _ = load_raw(self.config.data)
    day = datetime.date.fromisoformat(self.date).toordinal()
    today, changes = registry_lib.advance(parent, raw, day, _registry_config(self.config))
    today.save(os.path.join(self.dir, REGISTRY))
    self.workdir.bind(self.config)
    data = self.workdir.prepare_data(self.config, self.beam_runner, self.beam_options)
    carried = (CarriedHistories.load(self.config.data.carried_history)
               if self.config.data.carried_history
               else CarriedHistories.empty(data.schema.history_length))
    carried.merged(data.table("user", "raw_id"), np.asarray(data.table("user", "history")),
                   today.vocab("item_id")).save(os.path.join(self.dir, HISTORIES))
    item_rows = np.asarray(data.table("item", "item_id"))
    return {
        # No interactions: nothing to train or evaluate; the live model is carried onto today's
        # catalog, whose index is rebuilt only if the catalog changed.
        "empty_day": sum(data.schema.split_sizes.values()) == 0,
        "num_users": data.schema.num_users, "num_items": data.schema.num_items,
        "new_users": int(len(changes["user_id"].added)),
        "new_items": int(len(changes["item_id"].added)),
        "evicted": {side: int(len(changes[f"{side}_id"].evicted)) for side in ("user", "item")},
        # Items of today's catalog without a row of their own (no interactions yet, or fewer than
        # nightly.min_count): embedded from a shared bucket row plus their features.
        "cold_items": int((item_rows <= self.config.data.num_oov_buckets).sum()),
        "registry": {name: {"rows": int(len(v.ids)), "capacity": v.capacity, "pending": int(len(v.pending_ids))}
                     for name, v in today.vocabs.items() if name in ("user_id", "item_id")},
    }

  def train(self) -> dict:
    warm = None
    if self.empty_day and not self.parent:
      raise NightlyError(f"{self.date} is the first day of {self.life.root} and has no "
                         "interactions: there is nothing to train a first model on. Start with "
                         "a day that has interactions.")
    if self.parent:
      parent_schema = self.parent_data().schema
      parent_ckpt = Workdir(self.parent_dir).checkpointer()

      def initial_state(setup):
        carried, tables = self.carried(setup.data.schema)
        return warm_lib.warm_start_state(
            parent_ckpt, self.parent["step"], parent_schema, setup.state, setup.state_sharding,
            setup.config, setup.tx, setup.mesh, carried, tables)
      warm = WarmStart(step=self.parent["step"], initial_state=initial_state)
    if self.empty_day:
      summary = carry_over(self.config, self.dir, warm)
      return {"model_step": summary["steps"], "checkpoint": summary["checkpoint"], "replayed": {}}
    replayed, counts = self.replayed()
    summary = train_and_evaluate(self.config, self.dir, warm_start=warm, replayed=replayed,
                                 hooks=[lambda step, state: self.hook(f"train:{step}")])
    return {"model_step": summary["steps"], "checkpoint": summary["checkpoint"],
            "replayed": counts}

  def replayed(self) -> tuple[replay_lib.Replayed | None, dict[str, int]]:
    """The replay sample in today's indexing, and its size per earlier day: every earlier day
    whole on the lifecycle's first nightly.bootstrap_days days, else nightly.replay_days' days at
    nightly.replay_rate."""
    cfg = self.config.nightly
    earlier_days = [d for d in self.life.finished()
                    if d < self.date and not self.life.summary(d).get("empty_day")]
    if len(earlier_days) < cfg.bootstrap_days:  # today is day len(earlier_days) + 1
      rate = 1.0
    elif cfg.replay_days > 0 and cfg.replay_rate > 0:
      first = (datetime.date.fromisoformat(self.date)
               - datetime.timedelta(days=cfg.replay_days)).isoformat()
      earlier_days, rate = [d for d in earlier_days if d >= first], cfg.replay_rate
    else:
      return None, {}
    if not earlier_days:
      return None, {}
    today = self.workdir.prepare_data(self.config)
    today_registry = registry_lib.Registry.load(os.path.join(self.dir, REGISTRY))
    parts, counts = [], {}
    for date in earlier_days:
      day_dir = self.life.day_dir(date)
      earlier = Workdir(day_dir)
      part = replay_lib.sample_day(
          earlier.prepare_data(earlier.config()),
          registry_lib.Registry.load(os.path.join(day_dir, REGISTRY)), today, today_registry,
          rate, self.config.seed, date, self.date)
      parts.append(part)
      counts[date] = len(part)
    return replay_lib.concat(parts, today.schema.num_users), counts

  def evaluate(self) -> dict:
    if self.empty_day:  # no holdout to score either model on
      return {"metrics": None, "live_metrics": None, "oracle_metrics": None}
    metrics = jobs.evaluate(self.dir, config=self.config)
    live_metrics = None
    if self.parent:
      data = self.workdir.prepare_data(self.config)
      model = self.workdir.restore_params(self.config, data, sharding.make_mesh(self.config.mesh))
      carried, tables = self.carried(data.schema)
      # The live model on today's catalog: its rows where the registry kept them, new IDs at the
      # model's initialisation (as the new model started), so both score the same holdout.
      live_params = warm_lib.warm_start_params(
          Workdir(self.parent_dir).checkpointer(), self.parent["step"], self.parent_data().schema,
          init_params(data.schema, self.config, model.mesh), self.config, model.mesh, carried,
          tables)
      evaluator = Evaluator(data, model.catalog, self.config.eval.split, self.config.eval.ks,
                            self.config.eval.user_batch_size, graphdef=model.graphdef,
                            mesh=model.mesh)
      live_metrics = evaluator(live_params)
      atomic.write_json(os.path.join(self.dir, "eval", "live_metrics.json"), live_metrics)
    oracle = _read(os.path.join(self.dir, "eval", "oracle_metrics.json"))
    return {"metrics": metrics, "live_metrics": live_metrics, "oracle_metrics": oracle}

  def gate(self) -> dict:
    cfg = self.config.gate
    if self.empty_day:  # no holdout, and the model is the live one, carried
      return {"gate": {"metric": cfg.metric, "new": None, "live": None,
                       "max_regression": cfg.max_regression, "passed": True,
                       "skipped": "no interactions: the live model is carried over"}}
    new = self.progress["metrics"][cfg.metric]
    live = (self.progress["live_metrics"] or {}).get(cfg.metric)
    passed = live is None or new >= live * (1.0 - cfg.max_regression)
    return {"gate": {"metric": cfg.metric, "new": new, "live": live,
                     "max_regression": cfg.max_regression, "passed": bool(passed)}}

  def catalog_changed(self) -> bool:
    """Whether today's item catalog (IDs, their rows and features) differs from the live day's.
    A day whose catalog is empty (no interactions, no item table) changes nothing."""
    today, parent = self.workdir.prepare_data(self.config), self.parent_data()
    if today.schema.num_items == 0:
      return False
    names = lambda d: sorted(f for f in os.listdir(os.path.join(d.path, "tables"))
                             if f.startswith("item.") and f != "item.sampling_prob.npy")
    if names(today) != names(parent):
      return True
    return any(not np.array_equal(np.load(os.path.join(today.path, "tables", f)),
                                  np.load(os.path.join(parent.path, "tables", f)))
               for f in names(today))

  def query_day_dir(self) -> str | None:
    """None, or for a day without users (no interactions, no user table): the latest earlier day
    with users, whose queries today's carried model gives as that day's model did (an empty day
    changes no parameter of a user it knew), for the index's calibration and validation."""
    if self.workdir.prepare_data(self.config).schema.num_users:
      return None
    date = self.parent["date"]
    while (summary := self.life.summary(date))["num_users"] == 0:
      date = summary["parent_date"]
    return self.life.day_dir(date)

  def index(self) -> dict:
    if self.empty_day and not self.catalog_changed():
      # The live index serves today's catalog unchanged.
      return {"index_version": os.path.basename(self.parent["index"]),
              "index_path": self.parent["index"],
              "index": self.life.summary(self.parent["date"])["index"]}
    manifest = jobs.build_index(self.dir, self.config, hook=self.hook,
                                queries_from=self.query_day_dir())
    return {"index_version": manifest["version"],
            "index": {k: manifest.get(k) for k in ("validation", "num_items", "model_step")}}

  def candidates(self) -> dict:
    if self.empty_day:
      # No user acted today: their candidates stay yesterday's (the refreshed index serves
      # online queries); tomorrow's candidates include today's new items.
      carried = self.life.summary(self.parent["date"])["candidates"]
      return {"candidates": {**carried, "carried_from": carried.get("carried_from",
                                                                     self.parent["date"])}}
    output = os.path.join(self.dir, "candidates")
    success = jobs.generate_candidates(self.dir, output, config=self.config, hook=self.hook)
    # The share of candidate rows that are today's cold items (no row of their own yet).
    data = self.workdir.prepare_data(self.config)
    item_rows = np.asarray(data.table("item", "item_id"))
    cold_ids = np.asarray(data.table("item", "raw_id"))[item_rows <= self.config.data.num_oov_buckets]
    items = np.concatenate([pq.read_table(p, columns=["item_id"]).column("item_id").to_numpy()
                            for p in sorted(glob.glob(os.path.join(output, "part-*.parquet")))])
    counts = {"users": success["users"], "rows": success["rows"],
              "cold_item_rows": int(np.isin(items, cold_ids).sum())}
    return {"candidates": {"path": output, "counts": counts}}

  def publish(self) -> dict:
    live = {"date": self.date, "step": self.progress["model_step"],
            "checkpoint": self.progress["checkpoint"],
            "index": self.progress.get("index_path") or os.path.join(
                self.dir, "index", self.progress["index_version"]),
            "candidates": self.progress["candidates"]["path"]}
    atomic.write_json(self.life.path("LIVE.json"), live)
    return {"published": True}

  # ----------------------------------------------------------------------------- the day

  def write_summary(self, published: bool) -> dict:
    p = self.progress
    summary = {
        "date": self.date, "published": published, "forced": bool(p.get("forced", False)),
        "empty_day": bool(p.get("empty_day", False)),
        "parent": self.parent["checkpoint"] if self.parent else None,
        "parent_date": self.parent["date"] if self.parent else None,
        "model_step": p.get("model_step"), "num_users": p.get("num_users"),
        "num_items": p.get("num_items"), "new_users": p.get("new_users"),
        "new_items": p.get("new_items"), "cold_items": p.get("cold_items"),
        "evicted": p.get("evicted"), "registry": p.get("registry"),
        "replayed": p.get("replayed"),
        "metrics": p.get("metrics"), "live_metrics": p.get("live_metrics"),
        "oracle_metrics": p.get("oracle_metrics"), "gate": p.get("gate"),
        "index_version": p.get("index_version") if published else None,
        "index": p.get("index") if published else None,
        "candidates": p.get("candidates") if published else None,
        "seconds": p["seconds"],
    }
    atomic.write_json(os.path.join(self.dir, "summary.json"), summary)
    return summary


def run_day(workdir: str, date: str, config: ml_collections.ConfigDict | None = None, *,
            force: bool = False, hook: Hook = _no_hook, log: Callable[[str], None] = print,
            beam_runner: str = "", beam_options: str = "") -> dict:
  """Runs (or finishes, after a crash) day `date` of the nightly work directory `workdir`; returns
  its summary. Raises GateFailed (after recording the day, nothing published) when the new model
  fails the gate and not `force`. With `beam_runner`, the day's data is prepared as a Beam
  pipeline on it (`beam_options`: its command line), giving the same dataset."""
  if jax.process_count() > 1:
    raise NightlyError("the nightly job runs in one process for now")
  life = Lifecycle(workdir)
  if config is None:
    config = life.config()
  config = config_lib.validate(config)
  if config.train.select_by or config.train.eval_every_steps:
    raise NightlyError("the nightly job trains each day's budget and gates on the day's holdout: "
                       "set train.select_by='' and train.eval_every_steps=0")
  summary = life.summary(date)
  if summary is not None and (summary["published"] or not force):
    log(f"{date} is already finished ({'published' if summary['published'] else 'not published'}):"
        " nothing to do" + ("" if summary["published"] else "; rerun with --force to publish it"))
    return summary
  _check_date(life, date)
  first_inputs = _check_inputs(life, config)
  life.bind(config)
  if first_inputs is not None:
    atomic.write_json(life.path(INPUTS), first_inputs)
  day = _Day(life, config, date, hook, beam_runner, beam_options)
  if summary is not None:  # a day that failed its gate, published now with --force
    os.unlink(os.path.join(day.dir, "summary.json"))
  stages = {"prepare": day.prepare, "train": day.train, "evaluate": day.evaluate,
            "gate": day.gate, "index": day.index, "candidates": day.candidates,
            "publish": day.publish}
  for name in STAGES:
    if day.done(name):
      continue
    if name == "index" and not day.progress["gate"]["passed"]:
      gate = day.progress["gate"]
      message = (f"gate failed on {date}: {gate['metric']} of the new model {gate['new']:.4f} vs "
                 f"{gate['live']:.4f} for the live model ({day.parent['date']}), more than "
                 f"{gate['max_regression']:.0%} worse; nothing published, the new model is kept in "
                 f"{day.dir}. Rerun with --force to publish it anyway.")
      if not force:
        day.write_summary(published=False)
        _report(life, config)
        raise GateFailed(message)
      log(f"{message.split(';')[0]}; publishing anyway (--force)")
      day.progress["forced"] = True
    hook(name)
    log(f"{date}: {name}")
    start = time.perf_counter()
    results = stages[name]()
    day.finish(name, round(time.perf_counter() - start, 3), **results)
  hook("summary")
  summary = day.write_summary(published=True)
  _report(life, config)
  return summary


def _report(life: Lifecycle, config: ml_collections.ConfigDict) -> None:
  """DIR/report/ rebuilt from every finished day's summary."""
  report_lib.write_report(life.root, [life.summary(d) for d in life.finished()],
                              config.gate.metric)
