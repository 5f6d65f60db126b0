"""Calibration of the automatic search settings, and the measurements the validation gate uses.

On a sample of real query embeddings, the search settings chosen by rule are replaced by the
cheapest ones (fewest leaves, then shallowest re-ordering, on ladders around the rule) whose recall
reaches the validation floors plus a margin; values set in the config are never changed. The
margin is statistical: the validation gate measures the chosen settings on another sample, so the
calibration sample's recall must clear the floor by `_MARGIN_Z` standard errors of the difference
between the two samples' means (from the per-query spread of recall). A small sample thus
calibrates conservatively, and a large one close to the floor, where queries/s are highest.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from two_tower.search import GATE_K, Settings, recall_per_query, search

# Standard errors above the floor: the gate, on an independent sample, then passes the calibrated
# settings about 98% of the time even at their worst (recall exactly at the calibrated target).
_MARGIN_Z = 2.0
# Calibration ladders, as multiples of the rule's leaves_to_search and reorder_multiplier: steps of
# 2^(1/4) (19%), fine enough that the chosen point is rarely more than a step's cost above the
# cheapest one meeting the target (coarser 1.5x steps cost 15-30% of queries/s at 1M items).
# Leaves go down to 1/8 of the rule: at 10M items the rule's 2% of 3,162 leaves (64) is 4x what a
# deep re-ordering needs for recall@10 >= 0.95 (measured: 16 leaves, benchmarks/index_search.py).
_LEAVES_LADDER = tuple(2 ** (i / 4) for i in range(-12, 21))  # 1/8 ... 32
_REORDER_LADDER = tuple(2 ** (i / 4) for i in range(-4, 9))  # 0.5 ... 4


def sample_users(num_users: int, n_cal: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint calibration and validation user samples (overlapping only if users are too few)."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(num_users)
  if num_users >= n_cal + n_val:
    return np.sort(order[:n_cal]), np.sort(order[n_cal:n_cal + n_val])
  val = np.sort(order[:min(n_val, num_users)])
  return np.sort(order[:min(n_cal, num_users)]), val


def measure(searcher, settings: Settings, queries: np.ndarray, items: np.ndarray,
            exact_scores: np.ndarray, ks: tuple[int, ...] = (10, GATE_K)) -> dict[str, float]:
  """recall@k (mean over queries, and its per-query standard deviation `recall@k_std`) and
  queries/s with k neighbours requested, for each k of `ks`."""
  out = {}
  for k in ks:
    k_eff = min(k, len(items))
    search(searcher, settings, queries[:64], k_eff)  # warm up thread pool and caches
    start = time.perf_counter()
    rows, _ = search(searcher, settings, queries, k_eff)
    seconds = time.perf_counter() - start
    per_query = recall_per_query(rows, queries, items, exact_scores, k_eff)
    out[f"recall@{k}"] = float(per_query.mean()) if len(per_query) else 1.0
    out[f"recall@{k}_std"] = float(per_query.std()) if len(per_query) else 0.0
    out[f"queries_per_s@{k}"] = len(queries) / max(seconds, 1e-9)
  return out


def calibrate(searcher, settings: Settings, auto: tuple[str, ...], queries: np.ndarray,
              items: np.ndarray, exact_scores: np.ndarray, floors: dict[str, float],
              num_validation_queries: int) -> tuple[Settings, list[dict]]:
  """The cheapest automatic search settings whose recall meets the floors on `queries` by the
  statistical margin (module docstring) against a validation sample of `num_validation_queries`.

  Leaves searched bound the recall (an item in an unsearched leaf is never found); the re-order
  depth decides how much of that the quantized scores give away. So: first the fewest leaves that
  reach the target with the deepest re-ordering of the ladder, then the shallowest re-ordering that
  still reaches it with those leaves. Returns the settings and every trial (for the manifest).
  """
  targets = {name: floor for name, floor in floors.items() if floor > 0}
  if settings.mode != "tree_ah" or not auto or not targets:
    return settings, []
  trials = []
  # Standard error of (calibration mean - validation mean) per unit of per-query spread.
  spread_to_error = math.sqrt(1 / len(queries) + 1 / max(num_validation_queries, 1))

  def meets(candidate: Settings) -> bool:
    m = measure(searcher, candidate, queries, items, exact_scores,
                ks=tuple(int(name.split("@")[1]) for name in targets))
    margins = {name: _MARGIN_Z * m[f"{name}_std"] * spread_to_error for name in targets}
    trials.append({"leaves_to_search": candidate.leaves_to_search,
                   "reorder_multiplier": candidate.reorder_multiplier, **m,
                   **{f"{name}_margin": v for name, v in margins.items()}})
    return all(m[name] >= floor + margins[name] for name, floor in targets.items())

  def ladder(base: float, steps, cap: float, integer: bool) -> list:
    values = sorted({min(cap, max(1, round(base * f)) if integer else base * f) for f in steps})
    return values

  leaves = (ladder(settings.leaves_to_search, _LEAVES_LADDER, settings.num_leaves, True)
            if "leaves_to_search" in auto else [settings.leaves_to_search])
  multipliers = (ladder(settings.reorder_multiplier, _REORDER_LADDER, math.inf, False)
                 if "reorder_multiplier" in auto else [settings.reorder_multiplier])
  chosen = dataclasses.replace(settings, leaves_to_search=leaves[-1],
                               reorder_multiplier=multipliers[-1])
  for value in leaves:
    candidate = dataclasses.replace(chosen, leaves_to_search=value)
    if meets(candidate):
      chosen = candidate
      break
  for value in multipliers[:-1]:
    candidate = dataclasses.replace(chosen, reorder_multiplier=value)
    if meets(candidate):
      chosen = candidate
      break
  return chosen, trials
