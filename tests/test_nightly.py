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
  c.data.history_length = 32  # more than a user's items of a day: histories reach back a day
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


def test_world_window_holds_the_days_up_to_the_date():
  cfg = tiny_nightly_config().data.synthetic
  day2, _ = synthetic.generate_day(cfg, "2026-01-02")
  day3, _ = synthetic.generate_day(cfg, "2026-01-03")
  cfg.world.window_days = 2
  window, planted = synthetic.generate_day(cfg, "2026-01-03")
  assert planted is None
  for key in day3.interactions:
    np.testing.assert_array_equal(
        window.interactions[key], np.concatenate([day2.interactions[key], day3.interactions[key]]))
  np.testing.assert_array_equal(window.users["user_id"],
                                np.union1d(day2.users["user_id"], day3.users["user_id"]))
  np.testing.assert_array_equal(window.items["item_id"],
                                np.union1d(day2.items["item_id"], day3.items["item_id"]))
  # A user of both days has day 3's features (its account is a day older), one of day 2 only, day 2's.
  both = np.intersect1d(day2.users["user_id"], day3.users["user_id"])[0]
  only2 = np.setdiff1d(day2.users["user_id"], day3.users["user_id"])[0]
  age = lambda raw, u: raw.users["account_age"][np.searchsorted(raw.users["user_id"], u)]  # noqa: E731
  assert age(window, both) == age(day3, both) != age(day2, both)
  assert age(window, only2) == age(day2, only2)
  tags = dict(zip(window.items["item_id"].tolist(), window.items["tags"]))
  assert all(tags[i] == t for i, t in zip(day3.items["item_id"].tolist(), day3.items["tags"]))
  # The first day has no earlier days.
  first, _ = synthetic.generate_day(cfg, "2026-01-01")
  assert len(first.interactions["item_id"]) == len(day2.interactions["item_id"])


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
  c.model.id_dropout = 1.5
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  for key in ("data.synthetic.date", "new_items_per_day", "gate.metric", "model.id_dropout"):
    assert key in str(e.value)
  c = tiny_nightly_config()
  c.model.id_dropout, c.data.num_oov_buckets = 0.2, 0
  with pytest.raises(ConfigError, match="model.id_dropout .* data.num_oov_buckets >= 1"):
    config_lib.validate(c)
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


def test_registry_grows_by_at_least_min_growth():
  v, _ = _advance(registry_lib.VocabRegistry.empty(num_oov=1, chunk=8), range(60), 0)
  assert v.capacity == 64
  grown, change = _advance(v, range(70), 1, min_growth=0.25)  # 8 new IDs, 2 free rows
  assert change.capacity_before == 64 and grown.capacity == 80  # 64 * 1.25, not 64 + 8
  same, _ = _advance(grown, range(78), 2, min_growth=0.25)  # 8 more fill it: no growth
  assert same.capacity == 80
  assert _advance(v, range(70), 1)[0].capacity == 72  # without: the chunks needed


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


def test_carried_histories_name_items_by_id_so_a_reused_row_is_not_confused():
  from pipelines.histories import CarriedHistories
  v1, _ = _advance(registry_lib.VocabRegistry.empty(num_oov=1, chunk=8), ["a", "b"], 0,
                   expire_after_days=1)
  # The user's day-0 history [b, a] (rows), plus a bucket row (1) and padding.
  day0 = np.array([[v1.lookup(["b"])[0], v1.lookup(["a"])[0], 1, 0]], np.int32)
  carried = CarriedHistories.empty(4).merged(["u"], day0, v1)
  assert carried.raw_items().tolist() == [["b", "a", "", ""]]  # the bucket has no ID to carry
  # Day 2: "a" was evicted and its row reused by "c"; "b" keeps its row.
  v2, change = _advance(v1, ["b", "c"], 2, expire_after_days=1)
  assert change.evicted.tolist() == ["a"] and v2.lookup(["c"])[0] == v1.lookup(["a"])[0]
  rows = carried.rows(["u", "stranger"], v2, 4)
  assert rows[0].tolist() == [v2.lookup(["b"])[0], 1, 0, 0]  # "a" is now unknown: its bucket
  assert rows[1].tolist() == [0, 0, 0, 0]
  # A later day keeps users it did not see and replaces those it did.
  later = carried.merged(["w"], np.array([[v2.lookup(["c"])[0], 0, 0, 0]], np.int32), v2)
  assert later.user_ids.tolist() == ["u", "w"]
  assert later.raw_items().tolist() == [["b", "a", "", ""], ["c", "", "", ""]]


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


# ----------------------------------------------------------------------------- warm start


def _prepare_day(root, date, config, parent_registry):
  """A day's work directory as the nightly job lays it out: its registry, config and data."""
  from launch import nightly_jobs
  from two_tower.workdir import Workdir
  day_dir = os.path.join(root, "days", date)
  day_cfg = nightly_jobs.day_config(config, day_dir, date)
  raw, _ = prepare.load_raw(day_cfg.data)
  import datetime
  registry, _ = registry_lib.advance(parent_registry, raw, datetime.date.fromisoformat(date).toordinal(),
                                     nightly_jobs._registry_config(day_cfg))
  registry.save(day_cfg.data.id_registry)
  Workdir(day_dir).bind(day_cfg)
  return day_dir, day_cfg, registry


class _Trainer:
  """The training step of a setup over fixed batches (the loop's pieces, without its files)."""

  def __init__(self, setup):
    import functools
    import jax
    from pipelines import loader
    from two_tower import sharding
    from two_tower.train import train_step
    self.setup = setup
    self.step_fn = jax.jit(functools.partial(train_step, graphdef=setup.graphdef, tx=setup.tx,
                                             config=setup.config, mesh=setup.mesh),
                           out_shardings=(setup.state_sharding, sharding.replicated(setup.mesh)))
    split = loader.open_split(setup.data.record_source("train"), setup.data.schema.history_length)
    cfg = setup.config.train
    self.batches = list(loader.train_dataset(split, batch_size=cfg.batch_size,
                                             num_examples=setup.num_examples, seed=setup.config.seed,
                                             prefetch_buffer_size=0))
    self.batch_sharding = sharding.batch_sharding(setup.mesh)

  def run(self, state, steps):
    import jax
    for i in steps:
      batch = {k: jax.device_put(v, self.batch_sharding) for k, v in self.batches[i].items()}
      state, _ = self.step_fn(state, batch, self.setup.catalog)
    return state


def _numpy(tree):
  import jax
  from two_tower.trees import named_leaves
  return {k: np.asarray(v) for k, v in named_leaves(jax.device_get(tree)).items()}


def _two_days(root, config):
  """Day 1 trained for 4 steps (checkpointed) and day 2 prepared, in a nightly layout."""
  from two_tower.checkpoint import Checkpointer
  from two_tower.train import setup_training
  config.nightly.row_chunk = 8  # small chunks: day 2's new IDs grow the tables
  day1, cfg1, reg1 = _prepare_day(root, "2026-01-01", config, registry_lib.Registry.empty())
  setup1 = setup_training(cfg1, day1)
  trainer1 = _Trainer(setup1)
  state = trainer1.run(setup1.state, range(4))
  checkpointer = Checkpointer(os.path.join(day1, "checkpoints"))
  checkpointer.save(4, state, force=True)
  checkpointer.wait()
  day2, cfg2, reg2 = _prepare_day(root, "2026-01-02", config, reg1)
  return dict(setup1=setup1, trainer1=trainer1, state=state, checkpointer=checkpointer,
              reg1=reg1, reg2=reg2, setup2=setup_training(cfg2, day2))


@pytest.fixture(scope="module")
def two_days(tmp_path_factory):
  config = tiny_nightly_config()
  config.model.item_bias = True  # a table outside the towers, grown with the item IDs too
  return _two_days(str(tmp_path_factory.mktemp("warm")), config)


@pytest.fixture(scope="module")
def two_days_streaming(tmp_path_factory):
  config = tiny_nightly_config()
  config.model.item_bias = True  # as two_days: the two differ only in the logQ estimator
  config.loss.update(logq_estimator="streaming", logq_half_life_steps=3.0)
  return _two_days(str(tmp_path_factory.mktemp("warm_streaming")), config)


def test_warm_start_without_new_ids_continues_exactly(two_days):
  from two_tower import warm_start
  s = two_days["setup1"]
  trainer = two_days["trainer1"]
  uninterrupted = trainer.run(two_days["state"], range(4, 7))
  # The same day's registry on both sides: no new IDs, every owned row carried.
  tables = warm_start.table_vocabularies(s.data.schema)
  carried = {v: registry_lib.carried_rows(two_days["reg1"].vocab(v), two_days["reg1"].vocab(v))
             for v in set(tables.values())}
  fresh = s.state  # a freshly initialised state of the same shapes
  warm = warm_start.warm_start_state(two_days["checkpointer"], 4, s.data.schema, fresh,
                                     s.state_sharding, s.config, s.tx, s.mesh, carried, tables)
  assert int(warm.step) == 4
  continued = trainer.run(warm, range(4, 7))
  a, b = _numpy(uninterrupted.params), _numpy(continued.params)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  moments_a, moments_b = _numpy(uninterrupted.opt_state), _numpy(continued.opt_state)
  for name in moments_a:
    if "/mu/" in name or "/nu/" in name or name.endswith("/0/count"):
      np.testing.assert_array_equal(moments_a[name], moments_b[name], err_msg=name)
  # The day's learning-rate schedule starts over; the parameters moved from the warm start.
  counts = [v for k, v in moments_b.items() if k.endswith("count") and v.ndim == 0]
  assert sorted(int(c) for c in counts) == [3, 7]
  assert any(not np.array_equal(a[n], _numpy(warm.params)[n]) for n in a)


def test_warm_start_growth_keeps_old_rows_and_slots_bit_identical(two_days):
  from two_tower import warm_start
  s1, s2 = two_days["setup1"], two_days["setup2"]
  reg1, reg2 = two_days["reg1"], two_days["reg2"]
  tables = warm_start.table_vocabularies(s2.data.schema)
  carried = {v: registry_lib.carried_rows(reg1.vocab(v), reg2.vocab(v)) for v in set(tables.values())}
  assert reg2.vocab("item_id").capacity > reg1.vocab("item_id").capacity  # the tables grew
  grown = warm_start.warm_start_state(two_days["checkpointer"], 4, s1.data.schema, s2.state,
                                      s2.state_sharding, s2.config, s2.tx, s2.mesh, carried, tables)
  old, new, fresh = _numpy(two_days["state"]), _numpy(grown), _numpy(s2.state)
  checked = set()
  for name, value in new.items():
    table = next((t for t in tables if f"tables/{t}/embedding" in name), None)
    if table is None or value.ndim != 2:
      if name != "step" and not name.endswith("count"):
        np.testing.assert_array_equal(value, old[name], err_msg=name)  # dense layers carry over
      continue
    rows = carried[tables[table]]
    assert value.shape[0] == len(rows) >= old[name].shape[0]
    keep = np.flatnonzero(rows)
    np.testing.assert_array_equal(value[keep], old[name][keep], err_msg=name)
    new_rows = np.flatnonzero(~rows)
    if name.startswith("params/"):
      np.testing.assert_array_equal(value[new_rows], fresh[name][new_rows], err_msg=name)
    else:
      assert not value[new_rows].any(), name  # Adam's moments of new rows start at zero
    checked.add(name)
  assert len(checked) >= 6 and "params/bias_tables/item_id/embedding" in checked
  # Old IDs kept their rows, and trained rows really differ from a fresh model's.
  old_item, new_item = reg1.vocab("item_id"), reg2.vocab("item_id")
  kept = np.intersect1d(old_item.ids, new_item.ids)
  np.testing.assert_array_equal(old_item.lookup(kept), new_item.lookup(kept))
  name = "params/item_tower/embedding/tables/item_id/embedding"
  assert not np.array_equal(new[name][old_item.lookup(kept)], fresh[name][old_item.lookup(kept)])


# ----------------------------------------------------------------------------- ID dropout


def test_drop_ids_replaces_own_rows_by_buckets_at_the_rate():
  import jax
  import jax.numpy as jnp
  from two_tower import features as feats
  rows = jnp.asarray(np.r_[0, 1, 2, np.arange(3, 4003)], jnp.int32)  # padding, 2 buckets, IDs
  features = {"user_id": rows, "segment": rows}
  key = jax.random.key(0)
  out = feats.drop_ids(features, key, 0.3, num_oov=2)
  dropped = np.asarray(out["user_id"]) != np.asarray(rows)
  assert 0.27 < dropped[3:].mean() < 0.33  # own rows, at the rate
  assert not dropped[:3].any()  # padding and bucket rows stay
  np.testing.assert_array_equal(np.asarray(out["user_id"])[dropped], 1 + np.asarray(rows)[dropped] % 2)
  np.testing.assert_array_equal(out["segment"], rows)  # other features untouched
  np.testing.assert_array_equal(feats.drop_ids(features, key, 0.3, 2)["user_id"], out["user_id"])
  assert not np.array_equal(feats.drop_ids(features, jax.random.key(1), 0.3, 2)["user_id"],
                            out["user_id"])


def test_id_dropout_trains_the_bucket_row_instead_of_the_ids(two_days):
  import dataclasses
  s = two_days["setup1"]
  name = {"user": "query_tower/embedding/tables/user_id/embedding",
          "item": "item_tower/embedding/tables/item_id/embedding"}
  before = _numpy(s.state.params)
  moved = {}
  for rate in (0.0, 0.5, 1.0):
    config = s.config.copy_and_resolve_references()
    config.model.id_dropout = rate
    trainer = _Trainer(dataclasses.replace(s, config=config))
    after = _numpy(trainer.run(s.state, range(2)).params)
    moved[rate] = {side: np.abs(after[n] - before[n]).sum(1) > 0 for side, n in name.items()}
    if rate == 0.5:  # deterministic given the seed and the step
      again = _numpy(trainer.run(s.state, range(2)).params)
      for n in name.values():
        np.testing.assert_array_equal(after[n], again[n])
  assert not moved[0.0]["user"][1]  # every user has a row of its own: no dropout, no bucket
  for side in name:
    own = slice(2, None)  # rows past padding and the bucket (data.num_oov_buckets=1)
    assert moved[0.0][side][own].sum() > 50
    assert moved[1.0][side][1] and not moved[1.0][side][own].any()  # only the bucket learns
    assert moved[0.5][side][1] and 0 < moved[0.5][side][own].sum() <= moved[0.0][side][own].sum()


# ----------------------------------------------------------------------------- streaming logQ


def test_streaming_frequency_follows_a_changing_stream():
  import jax
  import jax.numpy as jnp
  from two_tower import item_frequency
  num_rows, batch, half_life = 50, 256, 20.0
  first = np.random.default_rng(0).dirichlet(np.ones(num_rows))
  second = np.roll(first, 17)  # the same popularity levels on other items
  rng = np.random.default_rng(1)
  stream = np.concatenate([rng.choice(num_rows, (200, batch), p=first),
                           rng.choice(num_rows, (200, batch), p=second)])
  valid = np.ones(batch, bool)
  valid[-6:] = False  # padding rows do not count

  @jax.jit
  def run(rows):
    def step(counts, r):
      counts = item_frequency.update(counts, r, jnp.asarray(valid), half_life_steps=half_life)
      return counts, counts
    return jax.lax.scan(step, item_frequency.initial(num_rows), rows)[1]

  history = run(jnp.asarray(stream))
  at = lambda t: np.asarray(item_frequency.probability(  # noqa: E731
      history[t - 1], jnp.asarray(t), half_life_steps=half_life, batch_size=batch))
  scale = valid.mean()  # the estimate is per row of the batch, padding rows included
  # Early (bias-corrected) and at the end of each phase, the estimate is that phase's frequency.
  for t, truth, tolerance in ((5, first, 0.3), (200, first, 0.1), (400, second, 0.1)):
    assert np.abs(at(t) / scale - truth).sum() < tolerance, t
  assert np.abs(at(400) / scale - first).sum() > 1.0  # and not the first phase's any more


def test_streaming_counts_resume_bit_exactly(two_days_streaming, tmp_path):
  from two_tower.checkpoint import Checkpointer
  s = two_days_streaming["setup1"]
  trainer = two_days_streaming["trainer1"]
  state = two_days_streaming["state"]
  counts = np.asarray(state.item_counts)
  item_rows = np.asarray(s.catalog["item"]["item_id"])
  trained = np.unique(item_rows[np.concatenate([b["item_index"] for b in trainer.batches[:4]])])
  assert (counts[trained] > 0).all() and (np.delete(counts, trained) == 0).all()
  checkpointer = Checkpointer(str(tmp_path / "ckpt"))
  checkpointer.save(4, state, force=True)
  checkpointer.wait()
  restored = checkpointer.restore_train_state(4, s.state)
  np.testing.assert_array_equal(restored.item_counts, counts)
  a, b = trainer.run(state, range(4, 7)), trainer.run(restored, range(4, 7))
  np.testing.assert_array_equal(a.item_counts, b.item_counts)
  pa, pb = _numpy(a.params), _numpy(b.params)
  for name in pa:
    np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
  assert not np.array_equal(np.asarray(a.item_counts), counts)


def test_streaming_counts_change_the_loss_and_follow_the_registry(two_days_streaming, two_days):
  from two_tower import warm_start
  s1, s2 = two_days_streaming["setup1"], two_days_streaming["setup2"]
  reg1, reg2 = two_days_streaming["reg1"], two_days_streaming["reg2"]
  # Streaming Q trains another model than the static one from the same start.
  static = _numpy(two_days["state"].params)
  streaming = _numpy(two_days_streaming["state"].params)
  assert any(not np.array_equal(static[n], streaming[n]) for n in static)
  tables = warm_start.table_vocabularies(s2.data.schema)
  carried = {v: registry_lib.carried_rows(reg1.vocab(v), reg2.vocab(v)) for v in set(tables.values())}
  grown = warm_start.warm_start_state(two_days_streaming["checkpointer"], 4, s1.data.schema,
                                      s2.state, s2.state_sharding, s2.config, s2.tx, s2.mesh,
                                      carried, tables)
  old, new = np.asarray(two_days_streaming["state"].item_counts), np.asarray(grown.item_counts)
  rows = carried["item_id"]
  assert len(new) == len(rows) > len(old)
  np.testing.assert_array_equal(new[rows], old[np.flatnonzero(rows)])
  assert not new[~rows].any()  # new rows (and grown capacity) start uncounted
  kept = np.intersect1d(reg1.vocab("item_id").ids, reg2.vocab("item_id").ids)
  np.testing.assert_array_equal(new[reg2.vocab("item_id").lookup(kept)],
                                old[reg1.vocab("item_id").lookup(kept)])
  assert old[reg1.vocab("item_id").lookup(kept)].any()


# ----------------------------------------------------------------------------- replay


def test_replay_sample_moves_earlier_examples_into_todays_indexing(two_days):
  from pipelines import loader
  from two_tower import replay
  d1, d2 = two_days["setup1"].data, two_days["setup2"].data
  reg1, reg2 = two_days["reg1"], two_days["reg2"]
  sample = replay.sample_day(d1, reg1, d2, reg2, 0.5, 0, "2026-01-01", "2026-01-02")
  again = replay.sample_day(d1, reg1, d2, reg2, 0.5, 0, "2026-01-01", "2026-01-02")
  other = replay.sample_day(d1, reg1, d2, reg2, 0.5, 0, "2026-01-01", "2026-01-03")
  for k in loader.BATCH_KEYS:
    np.testing.assert_array_equal(sample.examples[k], again.examples[k])  # a rerun: the same
  assert not np.array_equal(sample.examples["item_index"], other.examples["item_index"])
  earlier = loader.open_split(d1.record_source("train"), d1.schema.history_length, "always")
  n = len(sample)
  raw = lambda data, side, rows: np.asarray(data.table(side, "raw_id"))[rows]  # noqa: E731
  all_earlier = earlier.gather(np.arange(len(earlier)))
  # Half of the earlier examples whose item is in today's catalog, whatever their user.
  replayable = np.isin(raw(d1, "item", all_earlier["item_index"]), d2.table("item", "raw_id"))
  assert 0.4 * replayable.sum() < n < 0.6 * replayable.sum()
  # Each replayed example is an earlier example: the same user, item and history, by raw ID. A
  # user absent from today's catalog (the world's users are not all active every day) is today's
  # user count plus its row of sample.users.
  num_users = d2.schema.num_users
  users_today = np.concatenate([np.asarray(d2.table("user", "raw_id")), sample.users["raw_id"]])
  absent = sample.examples["user_index"] >= num_users
  assert 0 < absent.sum() < n
  assert not np.isin(sample.users["raw_id"], d2.table("user", "raw_id")).any()
  earlier_keys = set(zip(raw(d1, "user", all_earlier["user_index"]).tolist(),
                         raw(d1, "item", all_earlier["item_index"]).tolist()))
  replayed_keys = set(zip(users_today[sample.examples["user_index"]].tolist(),
                          raw(d2, "item", sample.examples["item_index"]).tolist()))
  assert replayed_keys <= earlier_keys
  item_id_of = {int(r): i for i, r in zip(reg2.vocab("item_id").ids.tolist(), reg2.vocab("item_id").rows)}
  tokens = sample.examples["history"][sample.examples["history"] > 1]
  assert len(tokens) and all(item_id_of[int(t)] in set(reg1.vocab("item_id").ids.tolist())
                             for t in tokens[:200])
  # The absent users' rows: day 1's features, their tokens in today's registry rows.
  day1_row = replay._positions(np.asarray(d1.table("user", "raw_id")), sample.users["raw_id"])
  np.testing.assert_array_equal(sample.users["user_id"],
                                reg2.vocab("user_id").lookup(sample.users["raw_id"]))
  num_oov = two_days["setup2"].config.data.num_oov_buckets
  assert (sample.users["user_id"] > num_oov).all()  # their own rows, kept
  np.testing.assert_array_equal(sample.users["age"], np.asarray(d1.table("user", "age"))[day1_row])
  segment_of = lambda reg, rows: reg.vocab("segment").owners()[rows]  # noqa: E731
  np.testing.assert_array_equal(
      segment_of(reg2, sample.users["segment"]),
      segment_of(reg1, np.asarray(d1.table("user", "segment"))[day1_row]))
  # Training's catalog holds them after today's users: the towers read the absent users'
  # features at those indices.
  from two_tower import features as feats
  from two_tower.train import setup_training
  setup = setup_training(two_days["setup2"].config, two_days["setup2"].workdir.path(), sample)
  batch = {k: v[absent] for k, v in sample.examples.items()}
  query = feats.query_features(setup.catalog, batch["user_index"], batch["history"])
  np.testing.assert_array_equal(
      np.asarray(query["user_id"]),
      reg2.vocab("user_id").lookup(users_today[batch["user_index"]]))
  # The loader's view: today's split, then the replayed examples.
  today = loader.open_split(d2.record_source("train"), d2.schema.history_length, "always")
  both = replay.ReplaySplit(today, sample)
  assert len(both) == len(today) + n
  picked = both.gather(np.array([len(today) + 1, 0, len(today)]))
  np.testing.assert_array_equal(
      picked["item_index"], [sample.examples["item_index"][1],
                             today.gather(np.array([0]))["item_index"][0],
                             sample.examples["item_index"][0]])


def test_replay_of_several_days_gives_a_user_absent_today_one_row(two_days):
  from two_tower import replay
  d1, d2 = two_days["setup1"].data, two_days["setup2"].data
  reg1, reg2 = two_days["reg1"], two_days["reg2"]
  # Day 1 replayed twice (as two earlier days would be): its absent users appear in both parts.
  parts = [replay.sample_day(d1, reg1, d2, reg2, 0.5, 0, "2026-01-01", date)
           for date in ("2026-01-02", "2026-01-03")]
  both = replay.concat(parts, d2.schema.num_users)
  assert len(both) == sum(len(p) for p in parts)
  raw = both.users["raw_id"]
  assert len(np.unique(raw)) == len(raw) == len(np.union1d(*[p.users["raw_id"] for p in parts]))
  num_users = d2.schema.num_users
  for part, first in zip(parts, (0, len(parts[0]))):
    user = part.examples["user_index"]
    absent = user >= num_users
    merged = both.examples["user_index"][first:first + len(part)]
    np.testing.assert_array_equal(merged[~absent], user[~absent])
    np.testing.assert_array_equal(raw[merged[absent] - num_users],
                                  part.users["raw_id"][user[absent] - num_users])


def test_nightly_replay_trains_on_the_day_and_the_sample(after_day1, tmp_path):
  import math
  from launch import nightly_jobs
  root = _copy(after_day1, tmp_path / "w")
  config = tiny_nightly_config()
  config.nightly.update(replay_days=3, replay_rate=0.5, bootstrap_days=0)
  summary = nightly_jobs.run_day(root, DAY2, config, log=lambda m: None)
  (replayed,) = summary["replayed"].values()
  assert list(summary["replayed"]) == [DAY1] and replayed > 0
  day_dir = os.path.join(root, "days", DAY2)
  with open(os.path.join(day_dir, "train_summary.json")) as f:
    assert json.load(f)["replayed_examples"] == replayed
  from two_tower.workdir import Workdir
  day = Workdir(day_dir)
  train_size = day.prepare_data(day.config()).schema.split_sizes["train"]
  steps = math.ceil(round((train_size + replayed) * config.train.num_epochs) / config.train.batch_size)
  assert summary["model_step"] - _summary(root, DAY1)["model_step"] == steps


def test_bootstrap_days_train_on_every_earlier_day_whole(after_day2, tmp_path):
  """configs/nightly.py's bootstrap_days=2: day 2 also trains on day 1 whole, day 3 on no replay."""
  from pipelines import loader
  from launch import nightly_jobs
  from two_tower.workdir import Workdir
  assert tiny_nightly_config().nightly.bootstrap_days == 2

  def prepared(date):
    day = Workdir(os.path.join(after_day2, "days", date))
    return day.prepare_data(day.config())
  day1, day2 = prepared(DAY1), prepared(DAY2)
  split = loader.open_split(day1.record_source("train"), day1.schema.history_length, "always")
  examples = split.gather(np.arange(len(split)))
  # Every training example of day 1 whose item is in day 2's catalog: those of users idle on day
  # 2 too (day 2's catalog holds the day's active users only).
  replayable = int(np.isin(np.asarray(day1.table("item", "raw_id"))[examples["item_index"]],
                           day2.table("item", "raw_id")).sum())
  assert replayable > 0.9 * len(split)
  assert _summary(after_day2, DAY2)["replayed"] == {DAY1: replayable} and replayable > 0
  root = _copy(after_day2, tmp_path / "w")
  assert nightly_jobs.run_day(root, DAY3, log=lambda m: None)["replayed"] == {}  # replay_days=0


# ----------------------------------------------------------------------------- the nightly job

DAY1, DAY2, DAY3, DAY4, DAY5 = (f"2026-01-0{d}" for d in range(1, 6))


class Crash(Exception):
  """A simulated crash (kill) at a stage of the nightly job."""


def crash_at(point):
  def hook(stage):
    if stage == point:
      raise Crash(stage)
  return hook


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst, symlinks=True)
  return str(dst)


@pytest.fixture(scope="module")
def after_day1(tmp_path_factory):
  from launch import nightly_jobs
  root = str(tmp_path_factory.mktemp("nightly") / "day1")
  nightly_jobs.run_day(root, DAY1, tiny_nightly_config())
  return root


@pytest.fixture(scope="module")
def after_day2(after_day1, tmp_path_factory):
  from launch import nightly_jobs
  root = _copy(after_day1, tmp_path_factory.mktemp("nightly2") / "day2")
  nightly_jobs.run_day(root, DAY2)
  return root


def _summary(root, date):
  with open(os.path.join(root, "days", date, "summary.json")) as f:
    return json.load(f)


def _final_params(root, date):
  from two_tower.workdir import Workdir
  return _numpy(Workdir(os.path.join(root, "days", date)).load_model().params)


def test_days_are_recorded_published_and_warm_started(after_day1, after_day2):
  first, second = _summary(after_day1, DAY1), _summary(after_day2, DAY2)
  for key in ("published", "parent", "model_step", "num_users", "num_items", "new_users",
              "new_items", "evicted", "metrics", "live_metrics", "index_version", "candidates",
              "seconds"):
    assert key in second, key
  assert first["parent"] is None and first["live_metrics"] is None and first["published"]
  assert second["published"] and second["parent"].endswith(f"days/{DAY1}/checkpoints/{first['model_step']}")
  day_steps = second["model_step"] - first["model_step"]
  assert day_steps > 0  # steps numbered on from the parent's
  assert second["new_items"] > 0 and second["new_users"] > 0
  assert second["metrics"].keys() == second["live_metrics"].keys()
  assert second["metrics"]["recall@10"] != second["live_metrics"]["recall@10"]
  assert set(second["seconds"]) == {"prepare", "train", "evaluate", "gate", "index", "candidates",
                                    "publish"}
  # Cold start: the index holds the whole catalog, items without interactions included.
  assert second["cold_items"] > 0 and second["index"]["num_items"] == second["num_items"]
  counts = second["candidates"]["counts"]
  assert counts["users"] == second["num_users"] and counts["rows"] == 100 * counts["users"]
  with open(os.path.join(after_day2, "LIVE.json")) as f:
    live = json.load(f)
  assert live["date"] == DAY2 and live["step"] == second["model_step"]
  assert os.path.exists(os.path.join(live["candidates"], "_SUCCESS"))
  # The report covers both days, with its plots as PNG files.
  with open(os.path.join(after_day2, "report", "days.json")) as f:
    assert [d["date"] for d in json.load(f)] == [DAY1, DAY2]
  for name in ("index.html", "quality.png", "catalog.png", "seconds.png"):
    with open(os.path.join(after_day2, "report", name), "rb") as f:
      head = f.read(9)
    assert head.startswith(b"\x89PNG" if name.endswith(".png") else b"<!doctype"), name


def test_histories_go_on_with_the_users_items_of_earlier_days(after_day2):
  from pipelines.histories import CarriedHistories
  from two_tower.registry import Registry
  from two_tower.workdir import Workdir
  from launch import nightly_jobs
  day1, day2 = (os.path.join(after_day2, "days", d) for d in (DAY1, DAY2))
  config2 = Workdir(day2).config()
  assert config2.data.carried_history == os.path.join(day1, nightly_jobs.HISTORIES)
  data2 = Workdir(day2).prepare_data(config2)
  carried1 = CarriedHistories.load(os.path.join(day1, nightly_jobs.HISTORIES))
  items2 = Registry.load(os.path.join(day2, nightly_jobs.REGISTRY)).vocab("item_id")
  length = data2.schema.history_length
  users = np.asarray(data2.table("user", "raw_id"))
  history = np.asarray(data2.table("user", "history"))
  train_user, train_item = data2.pairs("train")
  own = np.minimum(np.bincount(train_user, minlength=len(users)), length)
  earlier = carried1.rows(users, items2, length)
  item_rows = np.asarray(data2.table("item", "item_id"))
  checked = 0
  for u in range(len(users)):
    k = own[u]
    # The day's own training items first (most recent first), then the carried ones.
    assert set(history[u, :k]) <= set(item_rows[train_item[train_user == u]]), u
    np.testing.assert_array_equal(history[u, k:], earlier[u, :length - k], err_msg=str(u))
    checked += bool(k < length and (earlier[u] > 0).any())
  assert checked > 10  # users active both days whose history reaches back into day 1
  # What day 3 carries: day 2's users as above, day 1's other users unchanged.
  carried2 = CarriedHistories.load(os.path.join(day2, nightly_jobs.HISTORIES))
  assert set(carried2.user_ids) == set(carried1.user_ids) | set(users.astype(str))
  only1 = np.setdiff1d(carried1.user_ids, users.astype(str))
  assert len(only1) > 0
  np.testing.assert_array_equal(carried2.raw_items()[np.searchsorted(carried2.user_ids, only1)],
                                carried1.raw_items()[np.searchsorted(carried1.user_ids, only1)])


def test_carried_histories_follow_each_training_examples_own_in_before_mode():
  from pipelines import histories, splits
  from pipelines.histories import CarriedHistories
  cfg = tiny_nightly_config().data
  cfg.split.kind = "temporal_last_n"  # training_history "before": each example's earlier items
  rcfg = registry_lib.RegistryConfig(min_count=1, expire_after_days=0, chunk=32, num_oov=1)
  raw1, _ = synthetic.generate_day(cfg.synthetic, DAY1)
  registry1, _ = registry_lib.advance(registry_lib.Registry.empty(), raw1, 1, rcfg)
  prep1 = prepare.prepare_arrays(raw1, cfg, registry1)
  carried = CarriedHistories.empty(cfg.history_length).merged(
      raw1.users["user_id"], prep1.tables["user.history"], registry1.vocab("item_id"))
  raw2, _ = synthetic.generate_day(cfg.synthetic, DAY2)
  registry2, _ = registry_lib.advance(registry1, raw2, 2, rcfg)
  alone = prepare.prepare_arrays(raw2, cfg, registry2)
  went_on = prepare.prepare_arrays(raw2, cfg, registry2, carried)
  train = np.flatnonzero(alone.split == splits.TRAIN)
  own = prepare._example_columns(alone, splits.TRAIN, "before", train)["history"]
  got = prepare._example_columns(went_on, splits.TRAIN, "before", train)["history"]
  earlier = carried.rows(raw2.users["user_id"], registry2.vocab("item_id"), cfg.history_length)
  np.testing.assert_array_equal(got, histories.with_carried(own, earlier[alone.user[train]]))
  # A user's first example of the day has only earlier days' items.
  first = (own == 0).all(axis=1) & (earlier[alone.user[train]] > 0).any(axis=1)
  assert first.sum() > 10
  np.testing.assert_array_equal(got[first], earlier[alone.user[train]][first])


def test_rerunning_a_finished_day_does_nothing_and_earlier_dates_are_refused(after_day2, tmp_path):
  from conftest import run_module
  from launch import nightly_jobs
  root = _copy(after_day2, tmp_path / "w")
  before = _summary(root, DAY2)
  messages = []
  assert nightly_jobs.run_day(root, DAY2, log=messages.append) == before
  assert "already finished" in messages[0]
  assert sorted(os.listdir(os.path.join(root, "days"))) == [DAY1, DAY2]
  result = run_module("launch.nightly", f"--workdir={root}", "--date=2025-12-31", timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "earlier than 2026-01-02" in result.stderr and "Traceback" not in result.stderr
  # A config that changes the model's shape is refused, naming the key.
  config = tiny_nightly_config()
  config.model.id_embedding_dim = 8
  with pytest.raises(nightly_jobs.NightlyError, match="model.id_embedding_dim"):
    nightly_jobs.run_day(root, "2026-01-03", config)


def test_a_crash_in_every_stage_then_reruns_finish_the_day_once(after_day1, after_day2, tmp_path):
  """Killed at the start of every stage and inside those with steps of their own (training after a
  checkpoint, the index after its searcher is trained, the candidates after a shard), then rerun:
  each rerun goes on from where the last one stopped, nothing is live before the day is, and the
  day ends exactly as an uninterrupted run's, its data applied once."""
  from launch import nightly_jobs
  from two_tower import index_store
  root = _copy(after_day1, tmp_path / "w")
  crash_step = _summary(after_day1, DAY1)["model_step"] + 6  # past the day's checkpoint at step +4
  points = ["prepare", "train", f"train:{crash_step}", "evaluate", "gate", "index", "trained",
            "candidates", "shard:1", "publish"]
  for point in points:
    with pytest.raises(Crash):
      nightly_jobs.run_day(root, DAY2, hook=crash_at(point), log=lambda m: None)
    with open(os.path.join(root, "LIVE.json")) as f:
      assert json.load(f)["date"] == DAY1, point  # nothing published yet
    assert not os.path.exists(os.path.join(root, "days", DAY2, "summary.json")), point
  # Killed after publishing, before the summary: live, but the day is not finished yet.
  with pytest.raises(Crash):
    nightly_jobs.run_day(root, DAY2, hook=crash_at("summary"), log=lambda m: None)
  with open(os.path.join(root, "LIVE.json")) as f:
    live = json.load(f)
  assert live["date"] == DAY2
  assert not os.path.exists(os.path.join(root, "days", DAY2, "summary.json"))

  summary = nightly_jobs.run_day(root, DAY2, log=lambda m: None)
  expected = _summary(after_day2, DAY2)
  # Still warm-started from day 1 (the day's parent is fixed when it starts), and the same model:
  # training resumed from the day's own checkpoint, so no example was applied twice.
  assert summary["published"] and summary["parent"] == expected["parent"].replace(after_day2, root)
  assert summary["model_step"] == expected["model_step"]
  assert summary["metrics"] == expected["metrics"]
  assert summary["live_metrics"] == expected["live_metrics"]
  a, b = _final_params(root, DAY2), _final_params(after_day2, DAY2)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  # The index killed after training its searcher left an incomplete version that never went live;
  # the live one is complete, and the candidates were written once per user.
  assert index_store.open_live(os.path.join(root, "days", DAY2, "index")).version == \
      summary["index_version"]
  assert summary["candidates"]["counts"] == expected["candidates"]["counts"]


def test_gate_failure_publishes_nothing_until_forced(after_day1, tmp_path):
  from launch import nightly_jobs
  root = _copy(after_day1, tmp_path / "w")
  config = tiny_nightly_config()
  config.optimizer.learning_rate = 1000.0  # allowed between days; wrecks today's model
  with pytest.raises(nightly_jobs.GateFailed) as e:
    nightly_jobs.run_day(root, DAY2, config)
  summary = _summary(root, DAY2)
  gate = summary["gate"]
  assert not gate["passed"] and f"{gate['new']:.4f}" in str(e.value) and f"{gate['live']:.4f}" in str(e.value)
  assert not summary["published"] and summary["index_version"] is None
  with open(os.path.join(root, "LIVE.json")) as f:
    assert json.load(f)["date"] == DAY1
  day_dir = os.path.join(root, "days", DAY2)
  assert os.listdir(os.path.join(day_dir, "checkpoints")) and not os.path.exists(os.path.join(day_dir, "index"))
  # A rerun is a no-op; --force publishes it and says so.
  assert not nightly_jobs.run_day(root, DAY2, config, log=lambda m: None)["published"]
  forced = nightly_jobs.run_day(root, DAY2, config, force=True, log=lambda m: None)
  assert forced["published"] and forced["forced"]
  with open(os.path.join(root, "LIVE.json")) as f:
    assert json.load(f)["date"] == DAY2


# ----------------------------------------------------------------------------- the day's files


def logs_nightly_config():
  """tiny_nightly_config() reading each day's files (data.source='logs') of the synthetic world."""
  c = tiny_nightly_config()
  c.data.synthetic.update(num_users=150, num_items=100)
  c.data.synthetic.world.interactions_per_day = 800
  c.data.source = "logs"
  c.data.logs.update(user_categorical=("segment", "age"), user_numeric=("account_age",),
                     item_categorical=("category",), item_multi=("tags",), item_numeric=("price",))
  c.index.update(calibration_queries=20, validation_queries=20)
  return c


def write_day_files(directory, date, fmt):
  """The synthetic world's day `date` as the files a user gives: interactions with the logs
  schema (each row carries its user's and item's features) and the item table, which holds
  items without interactions too. Returns (interaction file, item table, the day's raw data)."""
  import pyarrow as pa
  import pyarrow.csv as pa_csv
  import pyarrow.parquet as pq
  raw, _ = synthetic.generate_day(logs_nightly_config().data.synthetic, date)
  inter = raw.interactions
  user_row = np.searchsorted(raw.users["user_id"], inter["user_id"])
  item_row = np.searchsorted(raw.items["item_id"], inter["item_id"])

  def tags(rows):
    bags = [raw.items["tags"][r] for r in rows]
    return pa.array(bags) if fmt == "parquet" else pa.array(["|".join(b) for b in bags])

  interactions = pa.table({
      "user_id": inter["user_id"], "item_id": inter["item_id"], "timestamp": inter["timestamp"],
      "segment": raw.users["segment"][user_row], "age": raw.users["age"][user_row],
      "account_age": raw.users["account_age"][user_row],
      "category": raw.items["category"][item_row], "tags": tags(item_row),
      "price": raw.items["price"][item_row]})
  items = pa.table({"item_id": raw.items["item_id"], "category": raw.items["category"],
                    "tags": tags(np.arange(len(raw.items["item_id"]))),
                    "price": raw.items["price"]})
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(str(directory), f"{name}-{date}.{fmt}") for name in ("interactions", "items")]
  for table, path in zip((interactions, items), paths):
    pq.write_table(table, path) if fmt == "parquet" else pa_csv.write_csv(table, path)
  return paths[0], paths[1], raw


def _tree(root):
  """Every file under `root` with its size and modification time: what a refused day must keep."""
  return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size,
                               os.stat(os.path.join(d, f)).st_mtime_ns)
          for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def logs_days(tmp_path_factory):
  """A work directory after day 1 read from CSV files and day 2 from Parquet files given by the
  nightly command's flags; (its root after day 1 (a copy), its root after day 2, day 2's raw data,
  the input directory)."""
  from conftest import run_module
  from launch import nightly
  inputs = tmp_path_factory.mktemp("inputs")
  root = str(tmp_path_factory.mktemp("logs") / "w")
  config = logs_nightly_config()
  inter1, items1, _ = write_day_files(inputs, DAY1, "csv")
  nightly.run(config, root, DAY1, False, [inter1], items1)
  after_day1 = _copy(root, tmp_path_factory.mktemp("logs1") / "w")
  inter2, items2, raw2 = write_day_files(inputs, DAY2, "parquet")
  result = run_module("launch.nightly", f"--workdir={root}", f"--date={DAY2}",
                      f"--interactions={inputs}/interactions-{DAY2}.*", f"--items={items2}",
                      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  # The command keeps its compiled programs for the next days.
  assert os.listdir(os.path.join(root, "jax_cache"))
  return after_day1, root, raw2, str(inputs)


def test_day_files_grow_the_registry_and_index_new_items(logs_days):
  from two_tower.workdir import Workdir
  after_day1, root, raw2, _ = logs_days
  first, second = _summary(after_day1, DAY1), _summary(root, DAY2)
  assert first["published"] and second["published"] and second["parent_date"] == DAY1
  # Day 2's catalog is its item table: items without interactions (none on day 1 or 2) included.
  catalog = np.asarray(raw2.items["item_id"]).astype(str)
  seen = np.union1d(np.asarray(raw2.interactions["item_id"]).astype(str),
                    np.asarray(_day_items_seen(after_day1, DAY1)))
  cold = np.setdiff1d(catalog, seen)
  assert len(cold) > 0 and second["num_items"] == len(catalog)
  assert second["new_items"] > 0 and second["cold_items"] >= len(cold)
  assert second["index"]["num_items"] == len(catalog)
  # The cold items are in the day's prepared catalog on a shared bucket row, with their features.
  day = Workdir(os.path.join(root, "days", DAY2))
  data = day.prepare_data(day.config())
  raw_ids = np.asarray(data.table("item", "raw_id")).astype(str)
  rows = np.asarray(data.table("item", "item_id"))
  at = np.searchsorted(raw_ids, cold)
  np.testing.assert_array_equal(raw_ids[at], cold)
  assert (rows[at] <= day.config().data.num_oov_buckets).all()
  # Registry rows: day 1's items keep theirs, and day 2's newly seen items got new ones.
  registry = registry_lib.Registry.load(os.path.join(root, "days", DAY2, "registry.npz"))
  before = registry_lib.Registry.load(os.path.join(after_day1, "days", DAY1, "registry.npz"))
  kept = np.intersect1d(before.vocab("item_id").ids, registry.vocab("item_id").ids)
  assert len(kept) > 0 and len(registry.vocab("item_id").ids) > len(before.vocab("item_id").ids)


def test_a_day_without_interactions_trains_nothing_and_refreshes_a_changed_catalog(logs_days,
                                                                                  tmp_path):
  import pyarrow.parquet as pq
  from launch import nightly
  _, after_day2, _, inputs = logs_days
  root = _copy(after_day2, tmp_path / "w")
  no_rows = str(tmp_path / "no-interactions.parquet")
  pq.write_table(pq.read_table(os.path.join(inputs, f"interactions-{DAY2}.parquet")).slice(0, 0),
                 no_rows)
  day2 = _summary(root, DAY2)
  live2 = _live(root)

  # Day 3: no interactions, yesterday's item table: nothing to train, nothing changed.
  nightly.run(None, root, DAY3, False, [no_rows], os.path.join(inputs, f"items-{DAY2}.parquet"))
  day3 = _summary(root, DAY3)
  assert day3["published"] and day3["empty_day"] and day3["parent_date"] == DAY2
  assert day3["model_step"] == day2["model_step"]  # no step trained
  assert day3["metrics"] is None and day3["gate"]["passed"] and "skipped" in day3["gate"]
  assert day3["seconds"]["evaluate"] < 0.1  # neither model was scored
  np.testing.assert_array_equal(_flat(_final_params(root, DAY3)), _flat(_final_params(root, DAY2)))
  live3 = _live(root)
  assert live3["date"] == DAY3 and live3["index"] == live2["index"]  # the same catalog: reused
  assert live3["candidates"] == live2["candidates"]  # no user acted: their lists stay
  assert day3["candidates"]["carried_from"] == DAY2
  assert not os.path.exists(os.path.join(root, "days", DAY3, "index"))

  # Day 4: still no interactions, but an item table with new items: the index is rebuilt from
  # the carried model, new items in it on the cold-start path.
  _, items4, raw4 = write_day_files(tmp_path / "day4", DAY4, "parquet")
  nightly.run(None, root, DAY4, False, [no_rows], items4)
  day4 = _summary(root, DAY4)
  assert day4["empty_day"] and day4["model_step"] == day2["model_step"]
  assert day4["index"]["num_items"] == len(raw4.items["item_id"]) == day4["num_items"]
  new_items = np.setdiff1d(np.asarray(raw4.items["item_id"]).astype(str),
                           np.asarray(_day_items_seen(root, DAY3)))
  assert len(new_items) > 0 and day4["cold_items"] >= len(new_items)
  live4 = _live(root)
  assert live4["index"] == os.path.join(root, "days", DAY4, "index", day4["index_version"])
  assert live4["candidates"] == live2["candidates"]
  # A rerun does nothing; the next day with interactions warm-starts from the carried model.
  nightly.run(None, root, DAY4, False, [no_rows], items4)
  assert _summary(root, DAY4) == day4
  inter5, items5, _ = write_day_files(tmp_path / "day5", DAY5, "parquet")
  # --force: the gate is tested elsewhere; this world's holdout of a day is a few dozen
  # interactions, on which the two models' recall@10 differ by chance.
  nightly.run(None, root, DAY5, True, [inter5], items5)
  day5 = _summary(root, DAY5)
  assert not day5["empty_day"] and day5["parent_date"] == DAY4
  assert day5["model_step"] > day4["model_step"] and day5["metrics"] is not None


def _live(root):
  with open(os.path.join(root, "LIVE.json")) as f:
    return json.load(f)


def _flat(params):
  import jax
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])


def _day_items_seen(root, date):
  registry = registry_lib.Registry.load(os.path.join(root, "days", date, "registry.npz"))
  vocab = registry.vocab("item_id")
  return np.concatenate([vocab.ids, vocab.pending_ids]).astype(str)


def test_bad_day_files_are_refused_and_change_nothing(logs_days, tmp_path):
  import pyarrow.parquet as pq
  from launch import nightly
  from two_tower.errors import UserError
  after_day1, _, _, inputs = logs_days
  root = _copy(after_day1, tmp_path / "w")
  before = _tree(root)
  inter2, items2 = (os.path.join(inputs, f"{n}-{DAY2}.parquet") for n in ("interactions", "items"))
  # A day whose interaction columns differ from the first day's.
  renamed = str(tmp_path / "renamed.parquet")
  table = pq.read_table(inter2)
  pq.write_table(table.rename_columns(["ts" if c == "timestamp" else c for c in table.column_names]),
                 renamed)
  with pytest.raises(UserError, match=r"renamed.parquet.*missing \['timestamp'\].*unexpected \['ts'\]"):
    nightly.run(None, root, DAY2, False, [renamed], items2)
  # An item table with an item on two rows, named.
  items = pq.read_table(items2)
  duplicated = str(tmp_path / "duplicated.parquet")
  pq.write_table(items.take(np.r_[np.arange(items.num_rows), [3]]), duplicated)
  item3 = str(items.column("item_id")[3].as_py())
  with pytest.raises(UserError, match=rf"duplicated.parquet.*item '{item3}'.*one row per item"):
    nightly.run(None, root, DAY2, False, [inter2], duplicated)
  # Missing files: the day's interactions, the item table, a table given in the config.
  with pytest.raises(UserError, match=r"--interactions=.*absent.csv: no such file"):
    nightly.run(None, root, DAY2, False, [str(tmp_path / "absent.csv")])
  with pytest.raises(UserError, match=r"--items=.*absent.parquet: no such file"):
    nightly.run(None, root, DAY2, False, [inter2], str(tmp_path / "absent.parquet"))
  config = logs_nightly_config()
  config.data.logs.update(files=(inter2,), item_table=str(tmp_path / "gone.parquet"))
  with pytest.raises(UserError, match=r"data.logs.item_table .*gone.parquet does not exist"):
    nightly.run(config, root, DAY2, False)
  # No files at all for a work directory that reads files.
  with pytest.raises(UserError, match="give the day's --interactions"):
    nightly.run(None, root, DAY2, False)
  assert _tree(root) == before


def test_user_and_item_tables_replace_features_and_add_entities(tmp_path):
  import pyarrow as pa
  import pyarrow.csv as pa_csv
  from pipelines import logs
  config = logs_nightly_config()
  inter, items_path, raw = write_day_files(tmp_path, DAY1, "csv")
  users = raw.users
  # Today's user table: user 0 moved segment, and user "new" has features but no interactions.
  segment = np.asarray(users["segment"]).astype(object)
  segment[0] = "moved"
  pa_csv.write_csv(pa.table({
      "user_id": np.r_[np.asarray(users["user_id"]).astype(str), ["new"]],
      "segment": np.r_[segment.astype(str), ["c1"]], "age": np.r_[users["age"], ["a1"]],
      "account_age": np.r_[users["account_age"], [3.0]]}), str(tmp_path / "users.csv"))
  cfg = config.data.logs
  cfg.update(files=(inter,), item_table=items_path, user_table=str(tmp_path / "users.csv"))
  merged = logs.interaction_logs(cfg)
  cfg.update(item_table="", user_table="")
  plain = logs.interaction_logs(cfg)
  user_ids = np.asarray(merged.users["user_id"])
  assert len(user_ids) == len(plain.users["user_id"]) + 1 and "new" in user_ids
  assert merged.users["segment"][list(user_ids).index(str(users["user_id"][0]))] == "moved"
  # The interactions still point at the same users and items; the item catalog is the table's.
  np.testing.assert_array_equal(merged.ids("user"), plain.ids("user"))
  np.testing.assert_array_equal(merged.ids("item"), plain.ids("item"))
  assert sorted(merged.items["item_id"].tolist()) == sorted(np.asarray(raw.items["item_id"]).astype(str).tolist())
  assert len(merged.items["item_id"]) > len(plain.items["item_id"])


def test_a_day_prepared_on_beam_is_the_day_prepared_in_process(tmp_path, monkeypatch):
  pytest.importorskip("apache_beam")  # the `beam` extra; CI installs it with `test`
  from launch import nightly
  from pipelines import beam_prepare
  from two_tower.workdir import Workdir
  built = []  # the pipelines really built (a day prepared in process would pass the checks too)
  build = beam_prepare.build_pipeline
  monkeypatch.setattr(beam_prepare, "build_pipeline",
                      lambda *args, **kw: built.append(args[2]) or build(*args, **kw))
  config = logs_nightly_config()
  config.data.split.kind = "temporal_last_n"  # a split the Beam path computes per user
  config.train.num_epochs = 1.0
  days = [write_day_files(tmp_path / "inputs", d, "parquet")[:2] for d in (DAY1, DAY2)]
  roots = {runner: str(tmp_path / (runner or "in_process")) for runner in ("", "DirectRunner")}
  for runner, root in roots.items():
    for date, (interactions, items) in zip((DAY1, DAY2), days):
      nightly.run(config, root, date, True, [interactions], items, beam_runner=runner)
  data = {}
  for runner, root in roots.items():
    wd = Workdir(os.path.join(root, "days", DAY2))
    data[runner] = wd.prepare_data(wd.config())
  ours, beam = data[""], data["DirectRunner"]
  assert len(built) == 2 and all(p.startswith(roots["DirectRunner"]) for p in built)
  assert ours.schema == beam.schema
  assert ours.schema.split_sizes["train"] > 0
  for name in sorted(os.listdir(os.path.join(ours.path, "tables"))):
    np.testing.assert_array_equal(*(np.load(os.path.join(d.path, "tables", name))
                                    for d in (ours, beam)), err_msg=name)
  for split in ("train", "validation", "test"):
    source = lambda d: d.record_source(split)
    assert [source(ours)[i] for i in range(len(source(ours)))] == [
        source(beam)[i] for i in range(len(source(beam)))]
  # The two lifecycles trained on the same data: the same model.
  for name, value in _final_params(roots[""], DAY2).items():
    np.testing.assert_array_equal(value, _final_params(roots["DirectRunner"], DAY2)[name],
                                  err_msg=name)
