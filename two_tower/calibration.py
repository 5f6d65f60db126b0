"""Calibration of the automatic search settings, and the measurements the validation gate uses.

On a sample of real query embeddings, the search settings chosen by rule are replaced by the
cheapest ones (fewest leaves, then shallowest re-ordering, on ladders around the rule) whose recall
reaches the validation floors plus a margin; values set in the config are never changed.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from two_tower.search import GATE_K, Settings, recall, search

_CALIBRATION_MARGIN = 0.01  # calibrate above the floor: the gate measures on another sample
# Calibration ladders, as multiples of the rule's leaves_to_search and reorder_multiplier.
_LEAVES_LADDER = (0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_REORDER_LADDER = (0.5, 0.75, 1, 1.5, 2, 3, 4)


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
  """recall@k and queries/s with k neighbours requested, for each k of `ks`."""
  out = {}
  for k in ks:
    k_eff = min(k, len(items))
    search(searcher, settings, queries[:64], k_eff)  # warm up thread pool and caches
    start = time.perf_counter()
    rows, _ = search(searcher, settings, queries, k_eff)
    seconds = time.perf_counter() - start
    out[f"recall@{k}"] = recall(rows, queries, items, exact_scores, k_eff)
    out[f"queries_per_s@{k}"] = len(queries) / max(seconds, 1e-9)
  return out


def calibrate(searcher, settings: Settings, auto: tuple[str, ...], queries: np.ndarray,
              items: np.ndarray, exact_scores: np.ndarray, floors: dict[str, float]
              ) -> tuple[Settings, list[dict]]:
  """The cheapest automatic search settings whose recall meets the floors (+ margin) on `queries`.

  Leaves searched bound the recall (an item in an unsearched leaf is never found); the re-order
  depth decides how much of that the quantized scores give away. So: first the fewest leaves that
  reach the target with the deepest re-ordering of the ladder, then the shallowest re-ordering that
  still reaches it with those leaves. Returns the settings and every trial (for the manifest).
  """
  targets = {name: floor + _CALIBRATION_MARGIN for name, floor in floors.items() if floor > 0}
  if settings.mode != "tree_ah" or not auto or not targets:
    return settings, []
  trials = []

  def meets(candidate: Settings) -> bool:
    m = measure(searcher, candidate, queries, items, exact_scores,
                ks=tuple(int(name.split("@")[1]) for name in targets))
    trials.append({"leaves_to_search": candidate.leaves_to_search,
                   "reorder_multiplier": candidate.reorder_multiplier, **m})
    return all(m[name] >= target for name, target in targets.items())

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
