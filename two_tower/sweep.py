"""Hyperparameter sweeps over config overrides: the search space, its trials (a grid or a seeded
random sample), their names, and the leaderboard that selects by a validation metric.

Pure logic: `launch/sweep.py` runs the trials. A search space maps dotted config keys to what to
try:

  {"model.temperature": [0.05, 0.1],                  # a list: these values (grid or random)
   "optimizer.learning_rate": {"log_uniform": [1e-4, 1e-2]},   # random search only
   "loss.num_uniform_negatives": {"int_uniform": [0, 1024]}}   # random search only

read from JSON, YAML or a Python file (a module-level `SWEEP` dict or a `get_sweep()` function).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from two_tower import atomic
from two_tower import config as config_lib
from two_tower.errors import ConfigError

DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
TRIAL_SUMMARY = "trial.json"  # in a trial's directory: written once the trial has finished


class SweepError(ConfigError):
  """A sweep that cannot run as given, with a message naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  overrides: dict[str, Any]  # dotted config key -> value, sorted by key


# ----------------------------------------------------------------------------- search space


def load_space(path: str) -> dict[str, Any]:
  """The search space of a JSON, YAML or Python sweep file."""
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path} does not exist: pass --sweep=FILE (.json, .yaml or .py)")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".json":
    with open(path) as f:
      try:
        space = json.load(f)
      except json.JSONDecodeError as e:
        raise SweepError(f"sweep file {path} is not valid JSON: {e}") from None
  elif ext in (".yaml", ".yml"):
    import yaml  # only needed for YAML sweep files
    with open(path) as f:
      try:
        space = yaml.safe_load(f)
      except yaml.YAMLError as e:
        raise SweepError(f"sweep file {path} is not valid YAML: {e}") from None
  elif ext == ".py":
    spec = importlib.util.spec_from_file_location("sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    space = module.get_sweep() if hasattr(module, "get_sweep") else getattr(module, "SWEEP", None)
    if space is None:
      raise SweepError(f"sweep file {path} defines neither SWEEP nor get_sweep()")
  else:
    raise SweepError(f"sweep file {path}: use a .json, .yaml/.yml or .py file")
  if not isinstance(space, Mapping) or not space:
    raise SweepError(f"sweep file {path} must hold a non-empty mapping of config key -> values, "
                     'e.g. {"model.temperature": [0.05, 0.1]}')
  return dict(space)


def _config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_config_keys(v, f"{prefix}{k}."))
    else:
      keys.append(f"{prefix}{k}")
  return keys


def _as_config_value(value):
  # YAML and JSON have lists only; the config's sequences are tuples.
  if isinstance(value, list):
    return tuple(_as_config_value(v) for v in value)
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the dotted keys set (type-checked by ConfigDict)."""
  out = ml_collections.ConfigDict(config.to_dict())
  known = set(_config_keys(out))
  for key, value in overrides.items():
    if key not in known:
      close = difflib.get_close_matches(key, sorted(known), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise SweepError(f"unknown config key {key!r} in the sweep.{hint} (the keys are in configs/base.py)")
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
      node = node[p]
    try:
      node[leaf] = _as_config_value(value)
    except (TypeError, ValueError) as e:
      raise SweepError(f"sweep value {value!r} does not fit config key {key!r}: {e}") from None
  return out


def check_space(space: Mapping[str, Any], config: ml_collections.ConfigDict, mode: str) -> None:
  """Refuses a space with unknown keys, empty value lists, values of the wrong type, or
  distributions in a grid, before any trial runs."""
  for key, spec in space.items():
    if isinstance(spec, Mapping):
      if mode == "grid":
        raise SweepError(f"{key!r}: a distribution ({', '.join(spec)}) needs --mode=random; a grid "
                         "takes a list of values")
      if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise SweepError(f"{key!r}: a distribution is one of {DISTRIBUTIONS} with [low, high], got {spec!r}")
      (kind, bounds), = spec.items()
      if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and bounds[0] <= bounds[1]):
        raise SweepError(f"{key!r}: {kind} needs [low, high] with low <= high, got {bounds!r}")
      if kind == "log_uniform" and bounds[0] <= 0:
        raise SweepError(f"{key!r}: log_uniform needs low > 0, got {bounds!r}")
      values = [bounds[0], bounds[1]]
      if kind == "int_uniform":
        values = [int(v) for v in values]
    elif isinstance(spec, (list, tuple)):
      if not spec:
        raise SweepError(f"{key!r} has an empty list of values: list at least one value to try")
      values = list(spec)
    else:
      raise SweepError(f"{key!r}: give a list of values to try (e.g. [{spec!r}]), or a distribution")
    for value in values:
      apply_overrides(config, {key: value})


# ----------------------------------------------------------------------------- trials


def _format(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, (list, tuple)):
    return "x".join(_format(v) for v in value) or "none"
  return str(value)


def trial_name(overrides: Mapping[str, Any]) -> str:
  """A stable, readable directory name: the overrides (last key component = value), plus a hash
  of the exact overrides so that names never collide."""
  canonical = json.dumps({k: overrides[k] for k in sorted(overrides)}, sort_keys=True, default=list)
  digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
  readable = ",".join(f"{k.rsplit('.', 1)[-1]}={_format(overrides[k])}" for k in sorted(overrides))
  readable = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", readable)[:100]
  return f"{readable}-{digest}"


def _trial(overrides: Mapping[str, Any]) -> Trial:
  ordered = {k: overrides[k] for k in sorted(overrides)}
  return Trial(trial_name(ordered), ordered)


def grid(space: Mapping[str, Sequence]) -> list[Trial]:
  """Every combination of the listed values, in the order of the file."""
  keys = list(space)
  return [_trial(dict(zip(keys, combo))) for combo in itertools.product(*(space[k] for k in keys))]


def _sample(spec, rng: np.random.Generator):
  if not isinstance(spec, Mapping):
    return spec[rng.integers(len(spec))]
  (kind, (low, high)), = spec.items()
  if kind == "int_uniform":
    return int(rng.integers(int(low), int(high) + 1))
  if kind == "log_uniform":
    value = math.exp(rng.uniform(math.log(low), math.log(high)))
  else:
    value = rng.uniform(low, high)
  return float(f"{value:.3g}")  # 3 significant digits: readable names, no false precision


def random_search(space: Mapping[str, Any], num_trials: int, seed: int) -> list[Trial]:
  """`num_trials` distinct trials sampled with `seed` (fewer if the space has fewer points). The
  first n trials of a larger sample are the same, so a sweep can be extended by raising n."""
  if num_trials < 1:
    raise SweepError(f"--num_trials must be >= 1, got {num_trials}")
  rng = np.random.default_rng(seed)
  trials: dict[str, Trial] = {}
  for _ in range(num_trials * 20):  # bounded: a small discrete space runs out of new points
    trial = _trial({k: _sample(spec, rng) for k, spec in space.items()})
    trials.setdefault(trial.name, trial)
    if len(trials) == num_trials:
      break
  return list(trials.values())


def trials(space: Mapping[str, Any], mode: str, num_trials: int = 0, seed: int = 0) -> list[Trial]:
  if mode == "grid":
    return grid(space)
  if mode == "random":
    return random_search(space, num_trials, seed)
  raise SweepError(f"--mode must be grid or random, got {mode!r}")


# ----------------------------------------------------------------------------- selection


def check_metric(metric: str, config: ml_collections.ConfigDict) -> None:
  """The metric must be one the periodic validation of `config` computes: the rule config.validate
  applies to train.select_by, which each trial is given."""
  candidate = ml_collections.ConfigDict(config.to_dict())
  candidate.train.select_by = metric
  try:
    config_lib.validate(candidate)
  except ConfigError as e:
    raise SweepError(f"--metric={metric!r}: {e}") from None


def trial_record(trial: Trial, metric: str, train_summary: Mapping[str, Any],
                 train_seconds: float) -> dict[str, Any]:
  """What a finished trial leaves in its TRIAL_SUMMARY: its best validation value, from training."""
  best = train_summary.get("best_validation") or {}
  if metric not in best:
    raise SweepError(f"trial {trial.name} recorded no validation {metric}: the config must validate "
                     "(train.eval_every_steps > 0) on a non-empty validation split")
  return {"name": trial.name, "overrides": trial.overrides, "metric": metric,
          "value": float(best[metric]), "best_step": best.get("step"),
          "steps": train_summary.get("steps"), "examples_per_s": train_summary.get("examples_per_s"),
          "train_seconds": train_seconds}


def leaderboard(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Finished trials, best first (every validation metric here is better when higher); ties
  keep the sweep's order."""
  ranked = sorted(enumerate(records), key=lambda ir: (-ir[1]["value"], ir[0]))
  return [dict(r, rank=rank) for rank, (_, r) in enumerate(ranked, 1)]


# ----------------------------------------------------------------------------- outputs


def write_json(path: str, payload: Any) -> None:
  atomic.write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=list) + "\n")


def leaderboard_csv(board: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(["rank", "name", "metric", "value", "best_step", "steps", "examples_per_s",
                   "train_seconds", *keys])
  for r in board:
    writer.writerow([r["rank"], r["name"], r["metric"], r["value"], r["best_step"], r["steps"],
                     r["examples_per_s"], r["train_seconds"],
                     *(json.dumps(r["overrides"].get(k), default=list) for k in keys)])
  return out.getvalue()


def plot_leaderboard(board: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str) -> None:
  """One panel per swept key: the validation metric of every trial against that key's value
  (the best trial in red). Numeric values on a log axis when they span 10x or more."""
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  metric = board[0]["metric"] if board else ""
  for ax, key in zip(axes[0], keys):
    values = [r["overrides"].get(key) for r in board]
    ys = [r["value"] for r in board]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
      xs = values
      positive = [v for v in values if v > 0]
      if len(positive) == len(values) and max(values) >= 10 * min(values):
        ax.set_xscale("log")
    else:
      labels = sorted({_format(v) for v in values})
      xs = [labels.index(_format(v)) for v in values]
      ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.scatter(xs, ys, color=["tab:red" if r["rank"] == 1 else "tab:blue" for r in board])
    ax.set_xlabel(key)
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  atomic.write_bytes(path, buffer.getvalue())


def load_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
