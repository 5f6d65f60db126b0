"""A synthetic interaction log with planted preferences, so that the best possible ranking is known.

Generative story (all seeded):
  * item i belongs to category c(i) and has a power-law popularity pop(i);
  * user u has a latent vector p_u, category c a latent vector v_c, and u prefers categories with
    probability pi_u(c) = softmax_c(sharpness * p_u . v_c);
  * an interaction of u draws a category from pi_u, then an item of that category in proportion to
    its popularity.
So P(i | u) = pi_u(c(i)) * pop(i) / Z_c(i), and ranking items by it is the oracle ranking.
Items carry their category, tags (mostly from tags typical of the category) and a price; users carry
a noisy "segment" (their favourite category), an age bucket and the account age.
Interactions are generated a chunk of users at a time: memory grows with the output only, so 1M
items and 10M interactions fit in a few GiB.
"""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np

from pipelines.sources import RawData, RawFeature
from two_tower.errors import ConfigError

_START_TIME = 1_600_000_000  # seconds
_SPAN = 365 * 24 * 3600


@dataclasses.dataclass(frozen=True)
class Planted:
  """The hidden parameters of the generator: enough to score any (user, item) pair exactly."""

  user_vectors: np.ndarray  # [U, k]
  category_vectors: np.ndarray  # [C, k]
  item_category: np.ndarray  # [I]
  item_popularity: np.ndarray  # [I], normalised within each category
  sharpness: float

  def category_preferences(self, users: np.ndarray) -> np.ndarray:
    logits = self.sharpness * self.user_vectors[users] @ self.category_vectors.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)

  def scores(self, users: np.ndarray) -> np.ndarray:
    """log P(item | user) for every item: the oracle ranking, [len(users), I]."""
    prefs = self.category_preferences(users)
    return np.log(prefs[:, self.item_category] + 1e-30) + np.log(self.item_popularity)[None]

  def save(self, path: str) -> None:
    np.savez(path, **{k: np.asarray(v) for k, v in dataclasses.asdict(self).items()})

  @classmethod
  def load(cls, path: str) -> Planted:
    with np.load(path) as z:
      return cls(**{k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files})


def generate(cfg) -> tuple[RawData, Planted]:
  """`cfg` is config.data.synthetic."""
  rng = np.random.default_rng(cfg.seed)
  num_users, num_items, num_cat = cfg.num_users, cfg.num_items, cfg.num_categories
  if min(num_users, num_items, num_cat, cfg.num_interactions) <= 0:
    raise ConfigError("data.synthetic sizes (users, items, categories, interactions) must be positive")
  k = cfg.latent_dim
  user_vec = rng.normal(size=(num_users, k)) / np.sqrt(k)
  cat_vec = rng.normal(size=(num_cat, k)) / np.sqrt(k)
  item_cat = rng.integers(0, num_cat, num_items)
  popularity = (rng.permutation(num_items) + 1.0) ** -cfg.popularity_exponent
  # Normalise popularity within each category and lay out per-category CDFs end to end (offset by
  # the category id) so that one searchsorted samples an item of any category.
  by_cat = np.argsort(item_cat, kind="stable")
  cat_sizes = np.bincount(item_cat, minlength=num_cat)
  cat_total = np.bincount(item_cat, weights=popularity, minlength=num_cat)
  pop_norm = popularity / np.where(cat_total > 0, cat_total, 1)[item_cat]
  cdf = np.cumsum(pop_norm[by_cat])
  starts = np.r_[0, np.cumsum(cat_sizes)[:-1]]
  cdf -= np.repeat(np.r_[0, cdf[starts[1:] - 1]] if num_cat > 1 else [0.0], cat_sizes)
  cdf += np.repeat(np.arange(num_cat), cat_sizes)
  planted = Planted(user_vec.astype(np.float32), cat_vec.astype(np.float32), item_cat,
                    pop_norm.astype(np.float64), float(cfg.sharpness))
  # Empty categories must never be drawn.
  cat_mask = np.where(cat_sizes > 0, 0.0, -np.inf)

  activity = rng.pareto(1.5, num_users) + 1.0
  counts = rng.multinomial(cfg.num_interactions - num_users * cfg.min_per_user,
                           activity / activity.sum()) + cfg.min_per_user
  users_out, items_out, ts_out = [], [], []
  favourite = np.empty(num_users, np.int64)
  chunk = max(1, 2_000_000 // max(num_cat, 1))
  for lo in range(0, num_users, chunk):
    users = np.arange(lo, min(lo + chunk, num_users))
    logits = cfg.sharpness * user_vec[users] @ cat_vec.T + cat_mask
    prefs = np.exp(logits - logits.max(axis=1, keepdims=True))
    prefs /= prefs.sum(axis=1, keepdims=True)
    favourite[users] = prefs.argmax(axis=1)
    row_cdf = np.cumsum(prefs, axis=1)
    row_cdf[:, -1] = 1.0
    row_cdf += np.arange(len(users))[:, None]
    n = counts[users]
    owner = np.repeat(np.arange(len(users)), n)
    cats = np.searchsorted(row_cdf.ravel(), owner + rng.random(len(owner)) * (1 - 1e-12))
    cats = cats - owner * num_cat
    pos = np.searchsorted(cdf, cats + rng.random(len(owner)) * (1 - 1e-12))
    items_out.append(by_cat[np.minimum(pos, num_items - 1)])
    users_out.append(users[owner])
    # Each user is active over a window; events are uniform inside it.
    begin = rng.integers(0, _SPAN // 2, len(users))
    ts = _START_TIME + begin[owner] + rng.integers(0, _SPAN // 2, len(owner))
    ts_out.append(ts)
  user_idx = np.concatenate(users_out)
  item_idx = np.concatenate(items_out)
  timestamps = np.concatenate(ts_out).astype(np.int64)

  tags_per_cat = rng.integers(0, cfg.num_tags, (num_cat, 3))
  n_tags = rng.integers(1, 5, num_items)
  typical = rng.random((num_items, 4)) < 0.8
  tag_choice = np.where(typical, tags_per_cat[item_cat][:, rng.integers(0, 3, 4)],
                        rng.integers(0, cfg.num_tags, (num_items, 4)))
  tags = [[f"t{t}" for t in row[:m]] for row, m in zip(tag_choice.tolist(), n_tags.tolist())]
  price = np.exp(rng.normal(item_cat % 7 * 0.3, 0.5)).astype(np.float32)

  noisy = rng.random(num_users) < 0.3
  segment = np.where(noisy, rng.integers(0, num_cat, num_users), favourite)
  raw = RawData(
      interactions=dict(user_id=user_idx, item_id=item_idx, timestamp=timestamps,
                        weight=np.ones(len(user_idx), np.float32)),
      users=dict(
          user_id=np.arange(num_users),
          segment=np.array([f"c{s}" for s in segment]),
          age=np.array([f"a{a}" for a in rng.integers(0, 6, num_users)]),
          account_age=rng.exponential(400, num_users).astype(np.float32),
      ),
      items=dict(item_id=np.arange(num_items), category=np.array([f"c{c}" for c in item_cat]),
                 tags=tags, price=price),
      features=(
          RawFeature("segment", "user", "categorical"), RawFeature("age", "user", "categorical"),
          RawFeature("account_age", "user", "numeric"), RawFeature("category", "item", "categorical"),
          RawFeature("tags", "item", "multi"), RawFeature("price", "item", "numeric"),
      ),
  )
  return raw, planted


# ----------------------------------------------------------------------------- a world by day
#
# A world that changes over time, for the nightly lifecycle: day t (its date minus
# world.start_date) has the users and items born up to t. Every entity's attributes come from the
# random generator of the day it was born, keyed by (seed, day), so they never depend on which
# day is asked for, and any day can be generated directly, in any order:
#   * day 0 holds num_users users and num_items items (with ages spread over their lifetimes);
#   * each later day adds new_users_per_day x num_users users and new_items_per_day x num_items
#     items, with categories, tags and prices drawn from the same planted structure;
#   * an item's popularity is its power-law base x a fade with age (exp(-age / lifetime)) x a
#     periodic drift; it leaves the catalog at twice its lifetime;
#   * on day t, the users born that day and a share (daily_active_users) of the others interact,
#     interactions_per_day in all, each drawn as in the static generator: a category from the
#     user's planted preferences, then an item of it by today's popularity.
# New items appear in the catalog on their first day, most of them without interactions yet.

_DAY = 24 * 3600


def day_number(date: str, start_date: str) -> int:
  """Days from `start_date` to `date` (both YYYY-MM-DD); a ConfigError for a malformed date or a
  date before the world starts."""
  try:
    day = datetime.date.fromisoformat(date)
    start = datetime.date.fromisoformat(start_date)
  except ValueError:
    raise ConfigError(f"dates are YYYY-MM-DD, got {date!r} (world starts {start_date!r})") from None
  if day < start:
    raise ConfigError(f"date {date} is before the synthetic world's first day "
                      f"data.synthetic.world.start_date={start_date}")
  return (day - start).days


@dataclasses.dataclass(frozen=True)
class _Births:
  """The users and items born on one day, with everything that never changes about them."""

  user_vectors: np.ndarray  # [u, k]
  user_activity: np.ndarray  # [u] relative activity
  user_age: np.ndarray  # [u] age bucket
  user_account_age: np.ndarray  # [u] days of account age on the day of birth
  item_category: np.ndarray  # [i]
  item_base_popularity: np.ndarray  # [i]
  item_birth: np.ndarray  # [i] day of birth (day 0 items: spread into the past)
  item_lifetime: np.ndarray  # [i] days
  item_drift_period: np.ndarray  # [i] days
  item_drift_phase: np.ndarray  # [i]
  item_tags: list  # [i] token lists
  item_price: np.ndarray  # [i]


def _category_vectors(cfg) -> np.ndarray:
  rng = np.random.default_rng((cfg.seed, 0xCA7))
  return (rng.normal(size=(cfg.num_categories, cfg.latent_dim)) / np.sqrt(cfg.latent_dim))


def _tags_per_category(cfg) -> np.ndarray:
  return np.random.default_rng((cfg.seed, 0x7A6)).integers(0, cfg.num_tags, (cfg.num_categories, 3))


def _births(cfg, day: int) -> _Births:
  world = cfg.world
  rng = np.random.default_rng((cfg.seed, 0xB1, day))
  if day == 0:
    num_users, num_items = cfg.num_users, cfg.num_items
  else:
    num_users = int(round(world.new_users_per_day * cfg.num_users))
    num_items = int(round(world.new_items_per_day * cfg.num_items))
  k = cfg.latent_dim
  item_cat = rng.integers(0, cfg.num_categories, num_items)
  # Power-law popularity over the ranks of the initial catalog, so new items have the same spread.
  base = (rng.integers(0, cfg.num_items, num_items) + 1.0) ** -cfg.popularity_exponent
  lifetime = world.item_lifetime_days * np.exp(rng.normal(0.0, 0.5, num_items))
  # Day 0's items have been in the catalog for a while already: ages over their whole life.
  birth = -rng.uniform(0, 2, num_items) * lifetime if day == 0 else np.full(num_items, float(day))
  n_tags = rng.integers(1, 5, num_items)
  typical = rng.random((num_items, 4)) < 0.8
  tag_choice = np.where(typical, _tags_per_category(cfg)[item_cat][:, rng.integers(0, 3, 4)],
                        rng.integers(0, cfg.num_tags, (num_items, 4)))
  return _Births(
      user_vectors=rng.normal(size=(num_users, k)) / np.sqrt(k),
      user_activity=rng.pareto(1.5, num_users) + 1.0,
      user_age=rng.integers(0, 6, num_users),
      user_account_age=rng.exponential(400, num_users) if day == 0 else np.zeros(num_users),
      item_category=item_cat,
      item_base_popularity=base,
      item_birth=birth,
      item_lifetime=lifetime,
      item_drift_period=rng.uniform(7, 60, num_items),
      item_drift_phase=rng.uniform(0, 2 * np.pi, num_items),
      item_tags=[[f"t{t}" for t in row[:m]] for row, m in zip(tag_choice.tolist(), n_tags.tolist())],
      item_price=np.exp(rng.normal(item_cat % 7 * 0.3, 0.5)),
  )


def _concat(parts: list[_Births]) -> _Births:
  return _Births(**{f.name: (sum((getattr(p, f.name) for p in parts), []) if f.name == "item_tags"
                             else np.concatenate([getattr(p, f.name) for p in parts]))
                    for f in dataclasses.fields(_Births)})


def generate_day(cfg, date: str) -> tuple[RawData, Planted | None]:
  """Day `date` of the world of `cfg` (config.data.synthetic): the day's interactions, the users
  active that day and the whole live catalog (new items included, with or without interactions),
  and the planted parameters over exactly those users and items (the day's oracle).

  With world.window_days = n > 1: the interactions of the n days up to `date` (from the world's
  first day at the earliest), the users and items of any of them (features as of their latest
  day), and no oracle (the days' oracles differ). What a full retrain on everything so far reads."""
  day = day_number(date, cfg.world.start_date)
  window = int(cfg.world.get("window_days", 1))
  if window <= 1 or day == 0:
    return _one_day(cfg, day)
  days = [_one_day(cfg, d)[0] for d in range(max(0, day - window + 1), day + 1)]
  return RawData(
      interactions={k: np.concatenate([r.interactions[k] for r in days]) for k in days[-1].interactions},
      users=_latest_rows([r.users for r in days], "user_id"),
      items=_latest_rows([r.items for r in days], "item_id"),
      features=_FEATURES), None


def _latest_rows(tables: list[dict], key: str) -> dict:
  """The union of the tables' rows by `key` (sorted), each row from the last table holding it."""
  ids = np.concatenate([t[key] for t in tables])
  # np.unique keeps the first occurrence: look from the newest table backwards.
  order = np.arange(len(ids))[::-1]
  _, first = np.unique(ids[order], return_index=True)
  pick = order[first]

  def column(name):
    values = [t[name] for t in tables]
    if isinstance(values[0], list):
      flat = sum(values, [])
      return [flat[i] for i in pick.tolist()]
    return np.concatenate(values)[pick]
  return {name: column(name) for name in tables[-1]}


def _one_day(cfg, day: int) -> tuple[RawData, Planted]:
  world = cfg.world
  births = [_births(cfg, d) for d in range(day + 1)]
  everyone = _concat(births)
  user_birth = np.concatenate([np.full(len(b.user_activity), d) for d, b in enumerate(births)])
  num_cat = cfg.num_categories
  cat_vec = _category_vectors(cfg)

  # Today's catalog and its popularity.
  age = day - everyone.item_birth
  live = np.flatnonzero((age >= 0) & (age < 2 * everyone.item_lifetime))
  drift = np.exp(world.popularity_drift * np.sin(
      2 * np.pi * day / everyone.item_drift_period[live] + everyone.item_drift_phase[live]))
  popularity = (everyone.item_base_popularity[live] * np.exp(-age[live] / everyone.item_lifetime[live])
                * drift)
  item_cat = everyone.item_category[live]
  cat_total = np.bincount(item_cat, weights=popularity, minlength=num_cat)
  pop_norm = popularity / cat_total[item_cat]

  # Today's users: those born today, and a seeded share of the others.
  rng = np.random.default_rng((cfg.seed, 0xDA7, day))
  active = (user_birth == day) | (rng.random(len(user_birth)) < world.daily_active_users)
  users = np.flatnonzero(active)
  user_vec = everyone.user_vectors[users]
  min_per_user = cfg.min_per_user
  total = max(world.interactions_per_day, min_per_user * len(users))
  activity = everyone.user_activity[users]
  counts = rng.multinomial(total - min_per_user * len(users), activity / activity.sum()) + min_per_user

  logits = cfg.sharpness * user_vec @ cat_vec.T
  logits = np.where(cat_total > 0, logits, -np.inf)  # a category without live items is never drawn
  prefs = np.exp(logits - logits.max(axis=1, keepdims=True))
  prefs /= prefs.sum(axis=1, keepdims=True)
  owner = np.repeat(np.arange(len(users)), counts)
  cats = _draw(rng, prefs, owner)
  # An item of the drawn category by popularity: the same draw, over the category's items.
  # Per-category CDFs laid end to end, each offset by its category id (as in `generate`).
  by_cat = np.argsort(item_cat, kind="stable")
  sizes = np.bincount(item_cat, minlength=num_cat)
  cumulative = np.cumsum(pop_norm[by_cat])
  before = np.r_[0.0, cumulative][np.r_[0, np.cumsum(sizes)[:-1]]]
  cdf = cumulative - np.repeat(before, sizes) + np.repeat(np.arange(num_cat), sizes)
  pos = np.searchsorted(cdf, cats + rng.random(len(owner)) * (1 - 1e-12))
  items = by_cat[np.minimum(pos, len(live) - 1)]
  timestamps = (_START_TIME + day * _DAY + rng.integers(0, _DAY, len(owner))).astype(np.int64)

  favourite = prefs.argmax(axis=1)
  noisy = rng.random(len(users)) < 0.3
  segment = np.where(noisy, rng.integers(0, num_cat, len(users)), favourite)
  planted = Planted(user_vec.astype(np.float32), cat_vec.astype(np.float32), item_cat,
                    pop_norm.astype(np.float64), float(cfg.sharpness))
  raw = RawData(
      interactions=dict(user_id=users[owner], item_id=live[items], timestamp=timestamps,
                        weight=np.ones(len(owner), np.float32)),
      users=dict(
          user_id=users,
          segment=np.array([f"c{s}" for s in segment]),
          age=np.array([f"a{a}" for a in everyone.user_age[users]]),
          account_age=(everyone.user_account_age[users] + day - user_birth[users]).astype(np.float32),
      ),
      items=dict(item_id=live, category=np.array([f"c{c}" for c in item_cat]),
                 tags=[everyone.item_tags[i] for i in live.tolist()],
                 price=everyone.item_price[live].astype(np.float32)),
      features=_FEATURES,
  )
  return raw, planted


def _draw(rng: np.random.Generator, probs: np.ndarray, owner: np.ndarray) -> np.ndarray:
  """One category per entry of `owner`, drawn from row `owner` of `probs` (one searchsorted)."""
  row_cdf = np.cumsum(probs, axis=1)
  row_cdf[:, -1] = 1.0
  row_cdf += np.arange(len(probs))[:, None]
  cats = np.searchsorted(row_cdf.ravel(), owner + rng.random(len(owner)) * (1 - 1e-12))
  return cats - owner * probs.shape[1]


_FEATURES = (
    RawFeature("segment", "user", "categorical"), RawFeature("age", "user", "categorical"),
    RawFeature("account_age", "user", "numeric"), RawFeature("category", "item", "categorical"),
    RawFeature("tags", "item", "multi"), RawFeature("price", "item", "numeric"),
)
