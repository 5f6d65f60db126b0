"""The nightly lifecycle: the synthetic world by day, the ID registry, warm start across growth
and the nightly job (launch/nightly_jobs.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import nightly, synthetic as synthetic_config
from pipelines import prepare, synthetic
from two_tower import config as config_lib
from two_tower import registry as registry_lib
from two_tower.errors import ConfigError


def tiny_nightly_config():
  """configs/nightly.py shrunk so that a day runs in seconds."""
  c = nightly.get_config()
  c.data.synthetic.update(num_users=300, num_items=200, num_categories=8)
  c.data.synthetic.world.update(interactions_per_day=3000, new_items_per_day=0.05)
  c.data.history_length = 8
  c.train.update(batch_size=256, num_epochs=2.0, log_every_steps=5, checkpoint_every_steps=4)
  c.eval.user_batch_size = 128
  c.index.update(calibration_queries=50, validation_queries=50)
  c.score.users_per_shard = 100
  c.nightly.row_chunk = 32
  return c


# ----------------------------------------------------------------------------- the world by day


def test_world_is_deterministic_and_changes_by_day():
  cfg = tiny_nightly_config().data.synthetic
  raw1, planted1 = synthetic.generate_day(cfg, "2026-01-01")
  raw2, planted2 = synthetic.generate_day(cfg, "2026-01-02")
  again, _ = synthetic.generate_day(cfg, "2026-01-02")
  for key in raw2.interactions:
    np.testing.assert_array_equal(raw2.interactions[key], again.interactions[key])
  items1, items2 = raw1.items["item_id"], raw2.items["item_id"]
  born = np.setdiff1d(items2, np.arange(cfg.num_items))
  assert len(born) == round(cfg.world.new_items_per_day * cfg.num_items)  # new items each day
  # An item keeps its features across days, and the new ones come with theirs.
  common = np.intersect1d(items1, items2)
  cat1 = dict(zip(items1.tolist(), raw1.items["category"].tolist()))
  cat2 = dict(zip(items2.tolist(), raw2.items["category"].tolist()))
  assert all(cat1[i] == cat2[i] for i in common.tolist())
  # New users arrive and are active on their first day.
  new_users = np.setdiff1d(raw2.users["user_id"], raw1.users["user_id"])
  assert len(new_users) == round(cfg.world.new_users_per_day * cfg.num_users)
  # Items fade out of the catalog; some of today's items have no interactions yet (cold start).
  later, _ = synthetic.generate_day(cfg, "2026-03-01")
  assert len(np.setdiff1d(items1, later.items["item_id"])) > 0.2 * len(items1)
  assert len(np.setdiff1d(items2, raw2.interactions["item_id"])) > 0
  # The planted oracle covers exactly the day's users and items, and explains the interactions:
  # the observed items score far above the average item.
  assert planted2.scores(np.arange(2)).shape == (2, len(items2))
  user_row = np.searchsorted(raw2.users["user_id"], raw2.interactions["user_id"])
  item_row = np.searchsorted(items2, raw2.interactions["item_id"])
  scores = planted2.scores(user_row[:500])
  observed = scores[np.arange(500), item_row[:500]]
  assert observed.mean() > scores.mean() + 1.0


def test_static_synthetic_data_is_unchanged():
  # The default job's build (and so its name) does not see the world's keys.
  settings = prepare.build_settings(synthetic_config.get_config().data)
  assert "date" not in settings["synthetic"] and "world" not in settings["synthetic"]
  assert "id_registry" not in settings


def test_world_config_is_validated():
  c = tiny_nightly_config()
  c.data.synthetic.date = "2026-13-01"
  c.data.synthetic.world.new_items_per_day = -0.1
  c.gate.metric = "recall@7"
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  for key in ("data.synthetic.date", "new_items_per_day", "gate.metric"):
    assert key in str(e.value)
  with pytest.raises(ConfigError, match="before the synthetic world"):
    synthetic.generate_day(tiny_nightly_config().data.synthetic, "2025-12-31")


# ----------------------------------------------------------------------------- the ID registry


def _advance(vocab, tokens, day, **kw):
  kw = dict(dict(min_count=1, expire_after_days=0, chunk=8), **kw)
  return vocab.advance(np.asarray(tokens), day, **kw)


def test_registry_keeps_rows_and_grows_in_chunks():
  v0 = registry_lib.VocabRegistry.empty(num_oov=1, chunk=8)
  v1, c1 = _advance(v0, ["a", "b", "a", "c"], 0)
  assert v1.capacity == 8 and sorted(c1.added.tolist()) == ["a", "b", "c"]
  rows = dict(zip(v1.ids.tolist(), v1.rows.tolist()))
  assert sorted(rows.values()) == [2, 3, 4]  # after padding (0) and the hashed bucket (1)
  v2, c2 = _advance(v1, ["a"] + [f"n{i}" for i in range(10)], 1)
  assert all(v2.lookup([k])[0] == r for k, r in rows.items())  # seen IDs keep their rows
  assert len(c2.added) == 10 and v2.capacity == 16 and c2.capacity_before == 8  # whole chunks
  assert len(set(v2.rows.tolist())) == len(v2.rows) and v2.rows.max() < v2.capacity
  carried = registry_lib.carried_rows(v1, v2)
  assert carried[:5].all() and not carried[5:].any()


def test_registry_min_count_buckets_and_eviction_reuse(tmp_path):
  v0 = registry_lib.VocabRegistry.empty(num_oov=2, chunk=8)
  v1, _ = _advance(v0, ["a", "a", "b"], 0, min_count=2, expire_after_days=2)
  assert v1.ids.tolist() == ["a"] and v1.pending_ids.tolist() == ["b"]
  assert 1 <= v1.lookup(["b"])[0] <= 2  # until min_count: a shared hashed bucket
  v2, c2 = _advance(v1, ["b"], 1, min_count=2, expire_after_days=2)  # counts add up over days
  assert c2.added.tolist() == ["b"]
  row_a = int(v2.lookup(["a"])[0])
  v3, c3 = _advance(v2, ["z", "z"], 3, min_count=2, expire_after_days=2)  # a unseen since day 0
  assert c3.evicted.tolist() == ["a"] and c3.added.tolist() == ["z"]
  assert v3.lookup(["z"])[0] == row_a and v3.capacity == v2.capacity  # the freed row is reused
  assert not registry_lib.carried_rows(v2, v3)[row_a]  # ... and starts fresh
  registry = registry_lib.Registry({"item_id": v3}, {"price": (1.5, 2.0)}, 3)
  path = str(tmp_path / "registry.npz")
  registry.save(path)
  loaded = registry_lib.Registry.load(path)
  assert loaded.day == 3 and loaded.numeric == {"price": (1.5, 2.0)}
  np.testing.assert_array_equal(loaded.vocab("item_id").lookup(["z", "b", "q"]), v3.lookup(["z", "b", "q"]))
  assert os.listdir(tmp_path) == ["registry.npz"]  # no temporary file left


def test_registry_capacity_is_a_multiple_of_the_row_multiple():
  cfg = tiny_nightly_config()
  raw, _ = synthetic.generate_day(cfg.data.synthetic, "2026-01-01")
  chunk = registry_lib.chunk_rows(24, 16)
  assert chunk == 48
  registry, changes = registry_lib.advance(
      registry_lib.Registry.empty(), raw, 0,
      registry_lib.RegistryConfig(min_count=1, expire_after_days=0, chunk=chunk, num_oov=1))
  for name, vocab in registry.vocabs.items():
    assert vocab.capacity % 16 == 0 and vocab.capacity >= 2 + len(vocab.ids), name
  assert len(changes["item_id"].added) == len(np.unique(raw.interactions["item_id"]))
  with pytest.raises(ValueError, match="already applied"):
    registry_lib.advance(registry, raw, 0, registry_lib.RegistryConfig(1, 0, chunk, 1))
