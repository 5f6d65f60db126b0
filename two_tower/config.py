"""Config checks and comparisons: every config is validated once, when it is loaded.

`validate` refuses a config with an unknown choice, an out-of-range number or an inconsistent pair
of keys, listing every problem with the valid values, before any data is read or any device is
touched. `flatten` and `diff` are the one way configs are compared (a work directory's recorded
config, the configs of a job's processes).
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Iterable, Mapping

import ml_collections

from configs.base import get_base_config
from pipelines import logs, splits
from two_tower.errors import ConfigError

# Every string option and its valid values.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("synthetic", "movielens_100k", "logs"),
    "data.logs.format": logs.LOG_FORMATS,
    "data.split.kind": splits.KINDS,
    "data.training_history": ("auto", "before", "others"),
    "data.cache": ("auto", "always", "never"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.combine_features": ("concat", "sum"),
    "loss.reduction": ("mean", "sum"),
    "loss.logq_estimator": ("static", "streaming"),
    "optimizer.name": ("adam", "adamw", "adagrad", "sgd"),
    "optimizer.schedule": ("constant", "cosine", "warmup_cosine"),
    "optimizer.embeddings": ("dense", "rowwise_adagrad", "sparse_adam"),
    "mesh.shard_tables_over": ("model", "all"),
    "eval.split": ("validation", "test"),
}

# Ranges of the nightly keys: (key, low, high), inclusive.
_RANGES = (("nightly.min_count", 1, None), ("nightly.expire_after_days", 0, None),
           ("nightly.row_chunk", 1, None), ("nightly.min_growth", 0.0, None),
           ("gate.max_regression", 0.0, 1.0),
           ("nightly.replay_days", 0, None), ("nightly.replay_rate", 0.0, 1.0),
           ("nightly.bootstrap_days", 0, None),
           ("model.id_dropout", 0.0, 1.0),
           ("data.synthetic.world.interactions_per_day", 1, None),
           ("data.synthetic.world.new_users_per_day", 0.0, None),
           ("data.synthetic.world.new_items_per_day", 0.0, None),
           ("data.synthetic.world.daily_active_users", 0.0, 1.0),
           ("data.synthetic.world.item_lifetime_days", 1e-3, None),
           ("data.synthetic.world.popularity_drift", 0.0, None),
           ("data.synthetic.world.window_days", 1, None))

_POSITIVE = ("train.batch_size", "model.temperature", "optimizer.learning_rate",
             "optimizer.embedding_learning_rate",
             "data.history_length", "train.log_every_steps", "eval.user_batch_size",
             "score.top_k", "score.batch_size", "score.users_per_shard", "index.embed_batch_size",
             "loss.row_chunk", "loss.logq_half_life_steps")
_NON_NEGATIVE = ("train.eval_every_steps", "train.early_stopping_evals", "loss.num_uniform_negatives",
                 "optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.grad_clip_norm",
                 "data.num_oov_buckets", "data.worker_count", "index.keep_versions")
RANKING_METRICS = ("recall", "ndcg", "mrr", "hit_rate", "accuracy")


def flatten(tree: Mapping | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{"a.b.c": value} for a nested config or dict; tuples become lists (as in JSON)."""
  if isinstance(tree, ml_collections.ConfigDict):
    tree = tree.to_dict()
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def diff(before: Mapping, after: Mapping, *, ignore: Iterable[str] = (),
         describe: Callable[[str, Any, Any], str] | None = None) -> list[str]:
  """One line per flattened key whose value differs, skipping keys that start with an `ignore`
  prefix; `describe(key, before, after)` formats a line (default `key: before -> after`)."""
  ignore = tuple(ignore)
  ours, theirs = flatten(before), flatten(after)
  describe = describe or (lambda k, a, b: f"{k}: {a!r} -> {b!r}")
  unset = "<unset>"
  return [describe(k, ours.get(k, unset), theirs.get(k, unset))
          for k in sorted(set(ours) | set(theirs))
          if not k.startswith(ignore) and ours.get(k, unset) != theirs.get(k, unset)]


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with keys it lacks taken from `configs/base.py` (a work directory recorded
  before a key existed still loads, with that key at its default)."""
  def merge(base: dict, ours: dict) -> dict:
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict)
                       else v for k, v in ours.items()}}
  return ml_collections.ConfigDict(merge(get_base_config().to_dict(), config.to_dict()))


def _metric_names(ks: Iterable[int]) -> list[str]:
  return [f"{m}@{k}" for m in RANKING_METRICS for k in sorted(ks)] + ["coverage@100"]


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns `config` if it is valid; raises ConfigError listing every problem otherwise."""
  values = flatten(config)
  problems = []
  for key, valid in CHOICES.items():
    if key in values and values[key] not in valid:
      problems.append(f"{key}={values[key]!r} is not one of {', '.join(valid)}")
  for key in _POSITIVE:
    if key in values and not values[key] > 0:
      problems.append(f"{key}={values[key]!r} must be > 0")
  for key in _NON_NEGATIVE:
    if key in values and not values[key] >= 0:
      problems.append(f"{key}={values[key]!r} must be >= 0")
  for key, low, high in _RANGES:
    if key in values and not (values[key] >= low and (high is None or values[key] <= high)):
      problems.append(f"{key}={values[key]!r} must be >= {low}"
                      + (f" and <= {high}" if high is not None else ""))
  for key in ("data.synthetic.date", "data.synthetic.world.start_date"):
    if values.get(key):
      try:
        datetime.date.fromisoformat(values[key])
      except ValueError:
        problems.append(f"{key}={values[key]!r} must be a date, YYYY-MM-DD")
  if "gate.metric" in values and values["gate.metric"] not in _metric_names(config.eval.ks):
    problems.append(f"gate.metric={values['gate.metric']!r} is not an evaluation metric; choose one "
                    f"of {', '.join(_metric_names(config.eval.ks))}")
  if values.get("model.id_dropout", 0) > 0 and values.get("data.num_oov_buckets", 1) < 1:
    problems.append("model.id_dropout replaces IDs by a hashed-bucket row: set "
                    "data.num_oov_buckets >= 1 (or model.id_dropout=0)")
  if values.get("loss.logq_estimator") == "streaming":
    if not values.get("loss.logq_correction"):
      problems.append("loss.logq_estimator='streaming' estimates the logQ correction's Q: set "
                      "loss.logq_correction=True (or loss.logq_estimator='static')")
    if "item_id" not in values.get("model.item_features", ()):
      problems.append("loss.logq_estimator='streaming' counts items by their item_id rows: add "
                      "'item_id' to model.item_features (or use loss.logq_estimator='static')")
  split = config.data.split
  if split.kind in ("random", "per_user_ratio"):
    ratios = tuple(split.ratios)
    if len(ratios) != 3 or min(ratios) < 0 or ratios[0] <= 0:
      problems.append(f"data.split.ratios={ratios!r} must be three non-negative train:validation:"
                      "test weights with a positive train weight, e.g. (0.8, 0.1, 0.1)")
  if split.kind == "temporal_global":
    q = tuple(split.time_quantiles)
    if len(q) != 2 or not 0 < q[0] <= q[1] <= 1:
      problems.append(f"data.split.time_quantiles={q!r} must be (validation, test) cuts with "
                      "0 < validation <= test <= 1")
  row_sparse = values.get("optimizer.embeddings", "dense") != "dense"
  if row_sparse and values.get("optimizer.grad_clip_norm", 0) > 0:
    problems.append("optimizer.grad_clip_norm would clip only the dense layers' gradients with "
                    f"optimizer.embeddings={values['optimizer.embeddings']!r} (whose row steps "
                    "are bounded by the learning rate already): set optimizer.grad_clip_norm=0")
  ks = tuple(config.eval.ks)
  if not ks or min(ks) < 1:
    problems.append(f"eval.ks={ks!r} must be one or more positive cut-offs, e.g. (10, 50, 100)")
  select_by = config.train.select_by
  if select_by:
    if select_by not in _metric_names(ks):
      problems.append(f"train.select_by={select_by!r} is not a validation metric; choose one of "
                      f"{', '.join(_metric_names(ks))}")
    if config.train.eval_every_steps <= 0:
      problems.append("train.select_by needs periodic validation: set train.eval_every_steps > 0")
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems)
                      + "\nThe keys and their meaning are in configs/base.py.")
  return config
