"""Prepares a dataset: raw source -> splits -> vocabularies -> TFDS ArrayRecord + feature tables.

One TFDS builder per source (`synthetic`, `movielens_100k`, `logs`). Each build lives in
`<data_dir>/<source>/<config hash>/1.0.0/`: the config hash covers every setting that changes the
data, so a changed setting means a new build and an unchanged one reuses the old. TFDS builds into
an `incomplete.*` directory and renames it when done, so a crash never leaves a build that looks
complete; the feature tables are written inside that same directory. The examples are written by
pipelines/records.py (the files TFDS's own writer makes, serialized in numpy blocks).

What a build holds:
  * ArrayRecord splits `train` / `validation` / `test`: one example per interaction with
    `user_index`, `item_index` (rows of the user and item tables), `timestamp`, `weight` and
    `history` (item-ID vocabulary indices of the user's recent training items: those before this
    one, or the latest ones except this one, see `training_history_mode`).
  * `tables/{user,item}.<feature>.npy`: one row per user / item of the catalog, with vocabulary
    indices, padded token bags, standardised numbers, the item sampling probability on the training
    split, each user's latest training history, and the original IDs (`raw_id`).
  * `pairs/<split>.npz`: (user_index, item_index) of every interaction, for fast evaluation.
  * `schema.json`: features, vocabulary sizes and counts; `planted.npz` for the synthetic source.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from pipelines import histories, logs, records, sources, splits, synthetic
from pipelines.histories import CarriedHistories
from pipelines.schema import PAD, Feature, Schema
from pipelines.sources import DataError, RawData
from pipelines.vocab import Vocabulary
from two_tower.errors import ConfigError, UserError
from two_tower.registry import Registry

VERSION = "1.0.0"
# The parts of config.data that change the prepared data (the rest only changes how it is read).
_BUILD_KEYS = ("source", "source_dir", "synthetic", "logs", "split", "history_length",
               "training_history", "num_oov_buckets", "min_count", "max_bag_length",
               "weight_column", "user_weight_exponent", "id_registry", "carried_history")


def example_features(history_length: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "user_index": np.int32,
      "item_index": np.int32,
      "timestamp": np.int64,
      "weight": np.float32,
      "history": tfds.features.Tensor(shape=(history_length,), dtype=np.int32),
  })


def build_settings(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  settings = {k: data_cfg[k] for k in _BUILD_KEYS if k in data_cfg}
  settings = json.loads(json.dumps(ml_collections.ConfigDict(settings).to_dict(), sort_keys=True))
  if settings["source"] != "synthetic":
    settings.pop("synthetic")
  elif not settings["synthetic"]["date"]:
    # The static dataset: the world's keys do not change it (nor the name of its build).
    del settings["synthetic"]["date"], settings["synthetic"]["world"]
  if settings["source"] != "logs":
    settings.pop("logs")
  for key in ("id_registry", "carried_history"):  # nightly-only: unset, build names are unchanged
    if not settings.get(key):
      settings.pop(key, None)
  # Keys added since builds were first named, at their defaults: the names of existing builds hold.
  if not settings.get("user_weight_exponent"):
    settings.pop("user_weight_exponent", None)
  if "logs" in settings and not settings["logs"].get("allow_empty"):
    settings["logs"].pop("allow_empty", None)
  if settings["source"] in ("movielens_100k", "logs"):
    settings["source_dir"] = os.path.abspath(settings["source_dir"]) if settings["source_dir"] else ""
  return settings


# ----------------------------------------------------------------------------- preparation


class _Catalog:
  """Exact ID -> row lookup for the user or item table."""

  def __init__(self, ids: np.ndarray, side: str):
    ids = np.asarray(ids)
    uniq, first = np.unique(ids, return_index=True)
    if len(uniq) != len(ids):
      raise DataError(f"the {side} table lists some {side} IDs twice: each {side} needs one row")
    self._sorted, self._rows, self.side = uniq, first, side

  def rows(self, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids).astype(self._sorted.dtype)
    pos = np.searchsorted(self._sorted, ids).clip(0, len(self._sorted) - 1)
    unknown = self._sorted[pos] != ids
    if unknown.any():
      examples = np.unique(ids[unknown])[:5].tolist()
      raise DataError(
          f"{unknown.sum()} interactions reference {self.side} IDs that are not in the {self.side} "
          f"table (e.g. {examples}): add those {self.side}s to the table or drop the interactions"
      )
    return self._rows[pos].astype(np.int32)


@dataclasses.dataclass
class _Prepared:
  schema: Schema
  tables: dict[str, np.ndarray]  # "user.<name>" / "item.<name>"
  user: np.ndarray  # per interaction: user row
  item: np.ndarray  # per interaction: item row
  timestamp: np.ndarray
  weight: np.ndarray
  split: np.ndarray
  train_order: np.ndarray  # training interactions sorted by (user, time)
  train_user_start: np.ndarray  # per position of train_order: where that user's run starts
  train_position: np.ndarray  # per interaction: its position in train_order (training ones only)
  item_id_index: np.ndarray  # item row -> item-ID vocabulary index
  # [num_users, history_length] items carried from earlier days (data.carried_history), older than
  # any of this build's; None without.
  carried: np.ndarray | None = None


def _feature_table(raw_col, entity_in_train: np.ndarray, kind: str, cfg, name: str,
                   registry: Registry | None = None):
  """Builds one feature column from the training entities' values, or with the rows and
  statistics of an ID registry (a nightly model's: stable across days); returns (table, Feature
  args)."""
  if kind == "numeric":
    col = np.asarray(raw_col, np.float64)
    if registry is not None:
      mean, std = registry.numeric[name]
    else:
      train_vals = col[entity_in_train]
      mean = float(train_vals.mean()) if len(train_vals) else 0.0
      std = float(train_vals.std()) if len(train_vals) else 1.0
    return ((col - mean) / (std if std > 0 else 1.0)).astype(np.float32), dict(vocab_size=0, length=1)
  if kind == "multi":
    bags = list(raw_col)
    if registry is not None:
      vocab = registry.vocab(name)
    else:
      train_tokens = [t for r in np.flatnonzero(entity_in_train) for t in bags[r]]
      vocab = Vocabulary.build(np.asarray(train_tokens if train_tokens else [""]),
                               num_oov=cfg.num_oov_buckets, min_count=cfg.min_count)
    length = max(1, min(cfg.max_bag_length, max((len(b) for b in bags), default=1)))
    if registry is not None:
      length = cfg.max_bag_length  # fixed: the bag length is part of the model's input shape
    return vocab.lookup_bags(bags, length), dict(vocab_size=vocab.size, length=length)
  col = np.asarray(raw_col).astype(str)
  if registry is not None:
    vocab = registry.vocab(name)
  else:
    vocab = Vocabulary.build(col[entity_in_train], num_oov=cfg.num_oov_buckets,
                             min_count=cfg.min_count)
  return vocab.lookup(col), dict(vocab_size=vocab.size, length=1)


_NOT_WEIGHTS = ("user_id", "item_id", "user_row", "item_row", "split")


def catalog_tables(users: dict[str, Any], items: dict[str, Any], raw_features, user_in_train,
                   item_train_counts: np.ndarray, cfg: ml_collections.ConfigDict,
                   registry: Registry | None = None) -> tuple[dict[str, np.ndarray], list[Feature]]:
  """The user and item tables (IDs, features, the item sampling probability) and their Features,
  from one row per entity, whether it is in the training split, and each item's training count."""
  tables: dict[str, np.ndarray] = {}
  features: list[Feature] = []
  item_in_train = item_train_counts > 0
  for side, raw_table, in_train in (("user", users, user_in_train), ("item", items, item_in_train)):
    if registry is not None:
      id_vocab = registry.vocab(f"{side}_id")
    else:
      id_vocab = Vocabulary.build(np.asarray(raw_table[f"{side}_id"])[in_train],
                                  num_oov=cfg.num_oov_buckets)
    tables[f"{side}.{side}_id"] = id_vocab.lookup(np.asarray(raw_table[f"{side}_id"]))
    features.append(Feature(f"{side}_id", side, "id", vocab_size=id_vocab.size))
    tables[f"{side}.raw_id"] = np.asarray(raw_table[f"{side}_id"])
    for f in raw_features:
      if f.side != side:
        continue
      table, sizes = _feature_table(raw_table[f.name], in_train, f.kind, cfg, f.name, registry)
      tables[f"{side}.{f.name}"] = table
      features.append(Feature(f.name, side, f.kind, **sizes))
  tables["item.sampling_prob"] = (item_train_counts / max(item_train_counts.sum(), 1)
                                  ).astype(np.float32)  # all 0 on a day without interactions
  features.append(Feature("history", "user", "history",
                          vocab_size=next(f.vocab_size for f in features if f.name == "item_id"),
                          length=cfg.history_length))
  return tables, features


def history_order(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, train: np.ndarray,
                  num_users: int, item_id_index: np.ndarray, length: int):
  """The training interactions by (user, time), the source of every history bag: (their indices
  in that order, where each one's user run starts, each interaction's position in that order, and
  each user's latest `length` training items: the history used to query for that user)."""
  train_idx = np.flatnonzero(train)
  train_order = train_idx[splits.order_by(user[train_idx], timestamp[train_idx])]
  sorted_user = user[train_order]
  starts = np.r_[0, np.flatnonzero(sorted_user[1:] != sorted_user[:-1]) + 1]
  sizes = np.diff(np.r_[starts, len(train_order)])
  train_user_start = np.repeat(starts, sizes)
  user_history = np.full((num_users, length), PAD, np.int32)
  ends = starts + sizes
  sorted_items = item_id_index[item[train_order]]
  for lag in range(length):
    pos = ends - 1 - lag
    ok = pos >= starts
    user_history[sorted_user[starts[ok]], lag] = sorted_items[pos[ok]]
  train_position = np.zeros(len(user), np.int64)
  train_position[train_order] = np.arange(len(train_order))
  return train_order, train_user_start, train_position, user_history


def balance_users(weight: np.ndarray, user: np.ndarray, train: np.ndarray,
                  exponent: float) -> np.ndarray:
  """`weight` with each training interaction's weight times its user's number of training
  interactions ** -exponent (config.data.user_weight_exponent). Only the relative weights matter
  to the default weighted-mean loss; with loss.reduction="sum" this also scales the loss."""
  if exponent < 0:
    raise ConfigError(f"data.user_weight_exponent must be >= 0, got {exponent}")
  if not exponent:
    return weight
  counts = np.bincount(user[train]).astype(np.float64)
  weight = weight.copy()
  weight[train] *= (counts[user[train]] ** -exponent).astype(np.float32)
  return weight


def prepare_arrays(raw: RawData, cfg: ml_collections.ConfigDict,
                   registry: Registry | None = None,
                   carried: CarriedHistories | None = None) -> _Prepared:
  """Everything except writing: split, vocabularies, tables and history order. With an ID
  registry (config.data.id_registry), IDs and tokens take its rows instead of vocabularies of
  this data alone; with carried histories (config.data.carried_history), every history goes on
  with the user's items of earlier days."""
  inter = raw.interactions
  if "user_row" in inter:  # the source gives table rows (pipelines.logs)
    user, item = inter["user_row"], inter["item_row"]
  else:
    user = _Catalog(raw.users["user_id"], "user").rows(inter["user_id"])
    item = _Catalog(raw.items["item_id"], "item").rows(inter["item_id"])
  timestamp = np.asarray(inter["timestamp"], np.int64)
  weight = np.asarray(inter["weight"], np.float32)
  if cfg.weight_column:
    if cfg.weight_column not in inter:
      raise DataError(f"data.weight_column={cfg.weight_column!r} is not a column of this source; "
                      f"available: {sorted(k for k in inter if k not in _NOT_WEIGHTS)}")
    weight = np.asarray(inter[cfg.weight_column], np.float32)
  split = splits.assign(user, timestamp, cfg.split, given=inter.get("split"))
  train = split == splits.TRAIN
  if not len(user) and not (cfg.source == "logs" and cfg.logs.get("allow_empty", False)):
    raise DataError("the source holds no interactions: check the input files or the source config")
  if len(user) and not train.any():
    raise DataError("the split left no training interactions: check data.split")
  weight = balance_users(weight, user, train, cfg.get("user_weight_exponent", 0.0))
  num_users, num_items = len(raw.users["user_id"]), len(raw.items["item_id"])
  user_in_train = np.bincount(user[train], minlength=num_users) > 0
  item_train_counts = np.bincount(item[train], minlength=num_items)
  tables, features = catalog_tables(raw.users, raw.items, raw.features, user_in_train,
                                    item_train_counts, cfg, registry)
  item_id_index = tables["item.item_id"]
  if cfg.history_length < 1:
    raise ConfigError("data.history_length must be >= 1")
  train_order, train_user_start, train_position, tables["user.history"] = history_order(
      user, item, timestamp, train, num_users, item_id_index, cfg.history_length)
  carried_rows = None
  if carried is not None:
    carried_rows = carried.rows(raw.users["user_id"], registry.vocab("item_id"), cfg.history_length)
    tables["user.history"] = histories.with_carried(tables["user.history"], carried_rows)
  split_sizes = {name: int((split == k).sum()) for k, name in enumerate(splits.SPLIT_NAMES)}
  schema = Schema(tuple(features), num_users, num_items, cfg.history_length, split_sizes)
  return _Prepared(schema, tables, user, item, timestamp, weight, split, train_order,
                   train_user_start, train_position, item_id_index, carried_rows)


def _example_columns(prep: _Prepared, split_id: int, training_history: str,
                     idx: np.ndarray) -> records.Columns:
  """The examples of interactions `idx` (all of split `split_id`), as columns."""
  user, item = prep.user[idx], prep.item[idx]
  if split_id == splits.TRAIN and training_history == "before":
    # History of a training interaction: the same user's training items strictly before it.
    pos = prep.train_position[idx]
    src = pos[:, None] - np.arange(1, prep.schema.history_length + 1)[None, :]
    valid = src >= prep.train_user_start[pos][:, None]
    sorted_items = prep.item_id_index[prep.item[prep.train_order[np.maximum(src, 0)]]]
    history = np.where(valid, sorted_items, PAD).astype(np.int32)
    if prep.carried is not None:  # the user's items of earlier days come before all of these
      history = histories.with_carried(history, prep.carried[user])
  else:
    history = prep.tables["user.history"][user]
    if split_id == splits.TRAIN:  # "others"
      # The query the model is evaluated with (the user's latest training items), minus the target.
      history = np.where(history == prep.item_id_index[item][:, None], PAD, history)
  return dict(user_index=user, item_index=item, timestamp=prep.timestamp[idx],
              weight=prep.weight[idx], history=history.astype(np.int32))


def _write_side_files(prep: _Prepared, path: str, planted) -> None:
  os.makedirs(os.path.join(path, "tables"), exist_ok=True)
  os.makedirs(os.path.join(path, "pairs"), exist_ok=True)
  for key, value in prep.tables.items():
    np.save(os.path.join(path, "tables", f"{key}.npy"), value, allow_pickle=False)
  for k, name in enumerate(splits.SPLIT_NAMES):
    mask = prep.split == k
    np.savez(os.path.join(path, "pairs", f"{name}.npz"), user=prep.user[mask], item=prep.item[mask])
  if planted is not None:
    planted.save(os.path.join(path, "planted.npz"))
  with open(os.path.join(path, "schema.json"), "w") as f:
    f.write(prep.schema.to_json())


def check_carried_history(cfg: ml_collections.ConfigDict) -> None:
  if cfg.get("carried_history") and not cfg.get("id_registry"):
    raise ConfigError("data.carried_history holds raw item IDs that only an ID registry maps to "
                      "stable rows: set data.id_registry too (python -m launch.nightly sets both)")


def training_history_mode(cfg: ml_collections.ConfigDict) -> str:
  """"before": a training example's history is the user's items before it (next-item
  prediction, right for temporal splits). "others": the user's latest training items except the
  target, which is exactly the query used at evaluation, right when test items are sampled from
  the whole timeline (random splits). A predefined split counts as random: set "before" when it
  is a split in time."""
  mode = cfg.training_history
  if mode == "auto":
    mode = "before" if cfg.split.kind.startswith("temporal") else "others"
  if mode not in ("before", "others"):
    raise ValueError(f"data.training_history must be auto, before or others, got {mode!r}")
  return mode


# ----------------------------------------------------------------------------- TFDS builders


@dataclasses.dataclass
class DataConfig(tfds.core.BuilderConfig):
  settings: str = "{}"  # JSON of build_settings(config.data)


class _InteractionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Interactions of one source as ArrayRecord, plus the catalog's feature tables."""

  VERSION = tfds.core.Version(VERSION)

  @property
  def _settings(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(self.builder_config.settings))

  @abc.abstractmethod
  def _load(self, cfg: ml_collections.ConfigDict) -> tuple[RawData, Any]:
    """Returns the raw data and, for synthetic data, its planted parameters."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=example_features(self._settings.history_length))

  def _generate_splits(self, dl_manager, download_config):
    """Writes the splits with pipelines.records (TFDS's files, serialized in blocks) instead of
    TFDS's per-example writer; `stage_seconds` records where the time went."""
    del dl_manager
    cfg = self._settings
    clock = _Stopwatch()
    if download_config.beam_runner:
      from pipelines import beam_prepare  # pylint: disable=g-import-not-at-top (an optional extra)
      infos = beam_prepare.run(
          cfg, os.fspath(self.data_dir),
          {name: self._get_filename_template(split_name=name) for name in splits.SPLIT_NAMES},
          download_config.beam_runner, download_config.beam_options)
      clock.lap("beam")
      self.stage_seconds = clock.seconds
      return infos
    raw, planted = self._load(cfg)
    clock.lap("read")
    registry = Registry.load(cfg.id_registry) if cfg.get("id_registry") else None
    check_carried_history(cfg)
    carried = CarriedHistories.load(cfg.carried_history) if cfg.get("carried_history") else None
    prep = prepare_arrays(raw, cfg, registry, carried)
    del raw
    clock.lap("arrays")
    _write_side_files(prep, self.data_dir, planted)  # self.data_dir is the incomplete.* directory
    clock.lap("tables")
    mode = training_history_mode(cfg)
    infos = []
    for k, name in enumerate(splits.SPLIT_NAMES):
      if prep.schema.split_sizes[name] > 0:
        infos.append(records.write_split(
            self._get_filename_template(split_name=name), name, np.flatnonzero(prep.split == k),
            functools.partial(_example_columns, prep, k, mode)))
    clock.lap("examples")
    self.stage_seconds = clock.seconds
    return infos

  def _split_generators(self, dl_manager):  # _generate_splits writes the splits
    raise NotImplementedError

  def _generate_examples(self, *args):
    raise NotImplementedError


class _Stopwatch:
  """Seconds spent in each named stage."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._last = time.perf_counter()

  def lap(self, stage: str) -> None:
    now = time.perf_counter()
    self.seconds[stage] = now - self._last
    self._last = now


def load_raw(cfg: ml_collections.ConfigDict) -> tuple[RawData, Any]:
  """The raw data a build of `cfg` (config.data) prepares and, for synthetic data, its planted
  parameters (one day's, with data.synthetic.date)."""
  if cfg.source == "synthetic":
    if cfg.synthetic.get("date"):
      return synthetic.generate_day(cfg.synthetic, cfg.synthetic.date)
    return synthetic.generate(cfg.synthetic)
  if cfg.source == "movielens_100k":
    return sources.movielens_100k(cfg.source_dir), None
  return logs.interaction_logs(cfg.logs, cfg.source_dir), None


class Synthetic(_InteractionBuilder, skip_registration=True):
  """Synthetic interactions with planted preferences (the built-in default data)."""

  name = "synthetic"

  def _load(self, cfg):
    return load_raw(cfg)


class MovieLens100K(_InteractionBuilder, skip_registration=True):
  """MovieLens-100K read from a local GroupLens `ml-100k` directory."""

  name = "movielens_100k"

  def _load(self, cfg):
    return load_raw(cfg)


class InteractionLogs(_InteractionBuilder, skip_registration=True):
  """Interaction logs from CSV, TSV, Parquet or adjacency files described by config.data.logs."""

  name = "logs"

  def _load(self, cfg):
    return load_raw(cfg)


BUILDERS = {b.name: b for b in (Synthetic, MovieLens100K, InteractionLogs)}


# ----------------------------------------------------------------------------- reading a build


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """A finished build: its schema, tables and splits."""

  path: str
  builder: tfds.core.DatasetBuilder

  @property
  def schema(self) -> Schema:
    with open(os.path.join(self.path, "schema.json")) as f:
      return Schema.from_json(f.read())

  def table(self, side: str, name: str) -> np.ndarray:
    return np.load(os.path.join(self.path, "tables", f"{side}.{name}.npy"), mmap_mode="r")

  def tables(self, side: str, names) -> dict[str, np.ndarray]:
    return {n: np.asarray(self.table(side, n)) for n in names}

  def pairs(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(os.path.join(self.path, "pairs", f"{split}.npz")) as z:
      return z["user"], z["item"]

  def record_source(self, split: str):
    """Random-access source of the split's serialized examples (bytes)."""
    return self.builder.as_data_source(split).data_source

  def has_planted(self) -> bool:
    return os.path.exists(os.path.join(self.path, "planted.npz"))

  def planted(self) -> synthetic.Planted:
    return synthetic.Planted.load(os.path.join(self.path, "planted.npz"))


def resolve_data_dir(data_cfg: ml_collections.ConfigDict, workdir: str) -> str:
  return data_cfg.data_dir or os.path.join(workdir, "data")


def beam_runner_check(runner: str) -> None:
  """A UserError naming the extra to install when Apache Beam or `runner` is not available."""
  try:
    from apache_beam.runners import runner as runner_lib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"--beam_runner={runner} needs Apache Beam, which is not installed: "
                    f"pip install -e '.[beam]' ({e})") from None
  try:
    runner_lib.create_runner(runner)
    if runner == "DataflowRunner":
      import apitools.base.py  # pylint: disable=g-import-not-at-top,unused-import (Dataflow's client)
  except ImportError as e:
    extra = "apache-beam[gcp]" if runner == "DataflowRunner" else "apache-beam with its extras"
    raise UserError(f"the Beam runner {runner} is not installed: pip install '{extra}' ({e})"
                    ) from None
  except ValueError as e:
    raise UserError(f"unknown Beam runner {runner!r}: use DirectRunner, DataflowRunner, "
                    f"FlinkRunner or SparkRunner ({e})") from None


def prepare(data_cfg: ml_collections.ConfigDict, data_dir: str, beam_runner: str = "",
            beam_options: str = "") -> PreparedData:
  """Builds the dataset described by `data_cfg` (config.data) unless that build already exists;
  with `beam_runner`, as an Apache Beam pipeline (pipelines/beam_prepare.py) on that runner, with
  `beam_options` (its command-line options, e.g. "--direct_num_workers=2")."""
  if data_cfg.source not in BUILDERS:
    raise DataError(f"data.source must be one of {sorted(BUILDERS)}, got {data_cfg.source!r}")
  if beam_runner:
    beam_runner_check(beam_runner)
    from pipelines import beam_prepare  # pylint: disable=g-import-not-at-top (an optional extra)
    beam_prepare.check_supported(data_cfg)
    if beam_prepare.holds_no_interactions(data_cfg):
      beam_runner = ""  # a day without interactions: only the catalog, prepared in process
  settings = build_settings(data_cfg)
  text = json.dumps(settings, sort_keys=True)
  name = hashlib.sha256(text.encode()).hexdigest()[:12]
  builder = BUILDERS[data_cfg.source](
      data_dir=data_dir, config=DataConfig(name=name, settings=text), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP, beam_runner=beam_runner or None,
      beam_options=beam_options or None))
  return PreparedData(path=os.fspath(builder.data_path), builder=builder)
