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
