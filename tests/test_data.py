"""Vocabularies, splits, sources and TFDS preparation."""

import os

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.base import get_base_config
from pipelines import loader, splits, synthetic
from pipelines.prepare import prepare
from pipelines.schema import PAD
from pipelines.sources import DataError, movielens_100k
from pipelines.vocab import Vocabulary


def test_vocabulary_orders_by_frequency_and_hashes_unknowns():
  v = Vocabulary.build(np.array(["b", "a", "b", "c", "b", "a"]), num_oov=2)
  assert v.size == 1 + 2 + 3
  np.testing.assert_array_equal(v.lookup(np.array(["b", "a", "c"])), [3, 4, 5])
  unknown = v.lookup(np.array(["zzz", "zzz", "yyy"]))
  assert unknown[0] == unknown[1] and set(unknown) <= {1, 2}
  bags = v.lookup_bags([["a", "b"], [], ["c", "a", "b"]], length=2)
  np.testing.assert_array_equal(bags, [[4, 3], [PAD, PAD], [5, 4]])


def test_vocabulary_min_count_sends_rare_values_to_oov():
  v = Vocabulary.build(np.array([1, 1, 2]), num_oov=1, min_count=2)
  np.testing.assert_array_equal(v.lookup(np.array([1, 2])), [2, 1])


def _split_cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(
      kind="random", ratios=(0.8, 0.1, 0.1), last_n=1, last_n_validation=1,
      time_quantiles=(0.8, 0.9), seed=0), **kw))


def test_random_split_ratios_and_seed():
  user = np.arange(1000) % 10
  ts = np.arange(1000)
  a = splits.assign(user, ts, _split_cfg())
  assert np.bincount(a).tolist() == [800, 100, 100]
  np.testing.assert_array_equal(a, splits.assign(user, ts, _split_cfg()))
  assert not np.array_equal(a, splits.assign(user, ts, _split_cfg(seed=1)))


def test_per_user_ratio_split_is_per_user():
  user = np.repeat(np.arange(5), [10, 20, 30, 40, 3])
  a = splits.assign(user, np.zeros_like(user), _split_cfg(kind="per_user_ratio"))
  for u, n in enumerate([10, 20, 30, 40, 3]):
    counts = np.bincount(a[user == u], minlength=3)
    assert counts.tolist() == [n - 2 * (n // 10), n // 10, n // 10]


def test_temporal_last_n_holds_out_each_users_latest():
  rng = np.random.default_rng(0)
  user = rng.integers(0, 20, 500)
  ts = rng.permutation(500)
  a = splits.assign(user, ts, _split_cfg(kind="temporal_last_n", last_n=2, last_n_validation=1))
  for u in range(20):
    mine = np.flatnonzero(user == u)
    by_time = mine[np.argsort(ts[mine])]
    assert a[by_time[-2:]].tolist() == [splits.TEST] * 2
    assert a[by_time[-3]] == splits.VALIDATION
    assert (a[by_time[:-3]] == splits.TRAIN).all()


def test_temporal_global_cuts_by_time():
  ts = np.arange(100)
  a = splits.assign(np.zeros(100, int), ts, _split_cfg(kind="temporal_global"))
  assert a[:80].max() == splits.TRAIN and (a[80:90] == splits.VALIDATION).all()
  assert (a[90:] == splits.TEST).all()


def _synthetic_cfg(**kw):
  cfg = get_base_config().data.synthetic
  cfg.update(dict(dict(num_users=200, num_items=300, num_interactions=6000, num_categories=6), **kw))
  return cfg


def test_synthetic_is_deterministic_and_power_law():
  raw1, planted1 = synthetic.generate(_synthetic_cfg())
  raw2, _ = synthetic.generate(_synthetic_cfg())
  raw3, _ = synthetic.generate(_synthetic_cfg(seed=1))
  for key in ("user_id", "item_id", "timestamp"):
    np.testing.assert_array_equal(raw1.interactions[key], raw2.interactions[key])
  assert not np.array_equal(raw1.interactions["item_id"], raw3.interactions["item_id"])
  counts = np.sort(np.bincount(raw1.interactions["item_id"], minlength=300))[::-1]
  assert counts[:30].sum() > 0.3 * counts.sum()  # the top 10% of items take > 30% of events
  assert planted1.scores(np.arange(5)).shape == (5, 300)


def test_synthetic_interactions_follow_the_planted_preferences():
  raw, planted = synthetic.generate(_synthetic_cfg(num_interactions=20000))
  users, items = raw.interactions["user_id"], raw.interactions["item_id"]
  scores = planted.scores(users)
  # The observed item ranks far higher under the oracle than a random item does.
  observed = scores[np.arange(len(users)), items]
  rank = (scores > observed[:, None]).mean(axis=1)
  assert rank.mean() < 0.2


def _write_logs(tmp_path, fmt="csv"):
  rng = np.random.default_rng(0)
  n = 400
  cols = {
      "uid": [f"u{u}" for u in rng.integers(0, 40, n)],
      "iid": [f"i{i}" for i in rng.integers(0, 30, n)],
      "ts": rng.integers(0, 10**6, n).tolist(),
      "country": rng.choice(["fr", "de", "us"], n).tolist(),
      "tags": ["|".join(rng.choice(["x", "y", "z"], 2)) for _ in range(n)],
      "price": rng.random(n).round(3).tolist(),
  }
  table = pa.table(cols)
  path = str(tmp_path / f"log.{fmt}")
  if fmt == "parquet":
    pq.write_table(table, path)
  else:
    sep = "\t" if fmt == "tsv" else ","
    with open(path, "w") as f:
      f.write(sep.join(cols) + "\n")
      for row in zip(*cols.values()):
        f.write(sep.join(map(str, row)) + "\n")
  return path


def _logs_data_cfg(path, fmt="csv", **logs):
  d = get_base_config().data
  d.source = "logs"
  d.split.kind = "temporal_last_n"
  d.history_length = 4
  d.logs.update(files=(path,), format=fmt, user_id="uid", item_id="iid", timestamp="ts",
                user_categorical=("country",), item_multi=("tags",), item_numeric=("price",))
  d.logs.update(**logs)
  return d


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_interaction_logs_prepare_to_array_record(tmp_path, fmt):
  data = prepare(_logs_data_cfg(_write_logs(tmp_path, fmt), fmt), str(tmp_path / "data"))
  schema = data.schema
  assert {f.name: f.kind for f in schema.features} == {
      "user_id": "id", "country": "categorical", "history": "history", "item_id": "id",
      "tags": "multi", "price": "numeric"}
  assert sum(schema.split_sizes.values()) == 400
  assert any(p.endswith(".array_record-00000-of-00001") for p in os.listdir(data.path))
  split = loader.open_split(data.record_source("train"), schema.history_length, "never")
  batch = split.gather(np.arange(len(split)))
  users, items = data.pairs("train")
  assert sorted(zip(batch["user_index"], batch["item_index"])) == sorted(zip(users, items))
  price = data.table("item", "price")
  assert abs(float(np.mean(price))) < 0.5  # standardised
  # A second prepare with the same settings reuses the build.
  assert prepare(_logs_data_cfg(_write_logs(tmp_path, fmt), fmt), str(tmp_path / "data")).path == data.path


def test_user_weight_exponent_gives_every_user_the_same_training_weight(tmp_path):
  cfg = _logs_data_cfg(_write_logs(tmp_path, "csv"), "csv")
  plain = prepare(cfg, str(tmp_path / "data"))
  cfg.user_weight_exponent = 1.0
  balanced = prepare(cfg, str(tmp_path / "data"))
  assert balanced.path != plain.path  # a different build, not a reuse of the unweighted one
  per_user = {}
  for data in (plain, balanced):
    split = loader.open_split(data.record_source("train"), data.schema.history_length, "never")
    batch = split.gather(np.arange(len(split)))
    per_user[data.path] = np.bincount(batch["user_index"], weights=batch["weight"])
    counts = np.bincount(batch["user_index"])
  totals = per_user[balanced.path][counts > 0]
  assert counts.max() > 2 * counts[counts > 0].min()  # users of very different activity
  np.testing.assert_allclose(totals, 1.0, rtol=1e-6)  # each user weighs 1 in all
  np.testing.assert_array_equal(per_user[plain.path], counts)  # unbalanced: one per interaction
  for split_name in ("validation", "test"):  # evaluation examples keep their weights
    split = loader.open_split(balanced.record_source(split_name), 4, "never")
    assert (split.gather(np.arange(len(split)))["weight"] == 1).all()


def _assert_no_build(data_dir):
  leftovers = [os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs
               if f.endswith(".json") or "array_record" in f]
  assert leftovers == []


def test_missing_column_is_named_with_a_suggestion(tmp_path):
  cfg = _logs_data_cfg(_write_logs(tmp_path), item_id="iid_")
  with pytest.raises(DataError, match=r"column 'iid_' .*missing.*Did you mean 'iid'"):
    prepare(cfg, str(tmp_path / "data"))
  _assert_no_build(tmp_path / "data")


def test_non_numeric_value_in_numeric_column(tmp_path):
  path = _write_logs(tmp_path)
  lines = open(path).read().splitlines()
  lines[5] = lines[5].rsplit(",", 1)[0] + ",cheap"
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"'price'.*must be numeric.*row 5.*'cheap'"):
    prepare(_logs_data_cfg(path), str(tmp_path / "data"))
  _assert_no_build(tmp_path / "data")


def test_nan_in_numeric_column(tmp_path):
  path = _write_logs(tmp_path)
  lines = open(path).read().splitlines()
  lines[3] = lines[3].rsplit(",", 1)[0] + ",nan"
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"'price'.*NaN.*row 3"):
    prepare(_logs_data_cfg(path), str(tmp_path / "data"))


def test_empty_file(tmp_path):
  path = tmp_path / "empty.csv"
  path.write_text("")
  with pytest.raises(DataError, match="empty"):
    prepare(_logs_data_cfg(str(path)), str(tmp_path / "data"))
  _assert_no_build(tmp_path / "data")


def test_grouplens_directory_missing_u_item(tmp_path):
  (tmp_path / "u.data").write_text("1\t1\t5\t100\n")
  (tmp_path / "u.user").write_text("1|24|M|technician|85711\n")
  with pytest.raises(DataError, match=r"missing u\.item.*source_dir"):
    movielens_100k(str(tmp_path))


def test_movielens_features(tmp_path):
  (tmp_path / "u.data").write_text("1\t2\t5\t100\n2\t1\t3\t200\n")
  (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
  flags = ["0"] * 19
  action = list(flags)
  action[1] = "1"
  (tmp_path / "u.item").write_text(
      "|".join(["1", "Toy Story (1995)", "01-Jan-1995", "", ""] + flags) + "\n"
      + "|".join(["2", "GoldenEye (1995)", "01-Jan-1995", "", ""] + action) + "\n")
  raw = movielens_100k(str(tmp_path))
  assert raw.items["title_words"] == [["toy", "story"], ["goldeneye"]]
  assert raw.items["genres"] == [[], ["Action"]]
  assert raw.items["year"].tolist() == ["1995", "1995"]
  assert raw.users["zip_prefix"].tolist() == ["85", "94"]
  assert raw.users["age"].tolist() == ["<25", "<56"]


def test_unknown_ids_in_interactions(tmp_path):
  (tmp_path / "u.data").write_text("1\t99\t5\t100\n")
  (tmp_path / "u.user").write_text("1|24|M|technician|85711\n")
  (tmp_path / "u.item").write_text("|".join(["1", "Toy Story (1995)", "", "", ""] + ["0"] * 19) + "\n")
  d = get_base_config().data
  d.update(source="movielens_100k", source_dir=str(tmp_path))
  with pytest.raises(DataError, match=r"item IDs that are not in the item table \(e\.g\. \[99\]\)"):
    prepare(d, str(tmp_path / "data"))


@pytest.mark.parametrize("kind,mode", [("temporal_last_n", "before"), ("per_user_ratio", "others")])
def test_training_history(tmp_path, kind, mode):
  d = get_base_config().data
  d.synthetic.update(num_users=50, num_items=40, num_interactions=1500, num_categories=4)
  d.split.kind = kind
  d.history_length = 6
  data = prepare(d, str(tmp_path / "data"))
  examples = data.builder.as_data_source("train")
  item_id = data.table("item", "item_id")
  user_history = data.table("user", "history")
  users, items = data.pairs("train")
  raw = synthetic.generate(d.synthetic)[0].interactions
  ts_of = {}
  for u, i, t in zip(raw["user_id"], raw["item_id"], raw["timestamp"]):
    ts_of.setdefault((int(u), int(i)), []).append(int(t))
  for k in range(0, len(examples), 37):
    ex = examples[k]
    hist = [h for h in ex["history"].tolist() if h != PAD]
    target = int(item_id[ex["item_index"]])
    if mode == "others":
      expected = [h for h in user_history[ex["user_index"]].tolist() if h not in (PAD, target)]
      assert hist == expected
    else:
      # Every history item was seen by the user no later than this example.
      own = {int(item_id[i]): min(ts_of[(int(ex["user_index"]), int(i))])
             for i in items[users == ex["user_index"]]}
      assert all(own[h] <= ex["timestamp"] for h in hist)


def test_loader_batches_are_the_same_with_worker_processes_and_after_restore(tmp_path):
  d = get_base_config().data
  d.synthetic.update(num_users=60, num_items=50, num_interactions=2000, num_categories=4)
  data = prepare(d, str(tmp_path / "data"))

  def batches(worker_count, cache, restore_after=None):
    split = loader.open_split(data.record_source("train"), data.schema.history_length, cache)
    make = lambda: iter(loader.train_dataset(split, batch_size=64, num_examples=640, seed=3,
                                             worker_count=worker_count))
    it = make()
    out = [next(it) for _ in range(restore_after or 10)]
    if restore_after:
      state = it.get_state()
      it = make()
      it.set_state(state)
      out += list(it)
    return out

  reference = batches(0, "always")
  assert len(reference) == 10
  for other in (batches(0, "never"), batches(1, "always"), batches(0, "always", restore_after=4)):
    assert len(other) == 10
    for a, b in zip(reference, other):
      for key in loader.BATCH_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
  # Each epoch is a new permutation of the whole split.
  n = len(loader.open_split(data.record_source("train"), data.schema.history_length))
  seen = np.concatenate([b["item_index"] * 1000 + b["user_index"] for b in reference])
  assert len(seen) == 640 and not np.array_equal(seen[:64], seen[n:n + 64])


def test_prepare_data_cli(tmp_path):
  import json
  from conftest import run_module
  result = run_module("launch.prepare_data", "--config=tests/tiny_config.py", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout.split("prepared:", 1)[1])
  assert printed["users"] == 300 and printed["items"] == 200
  assert sum(printed["split_sizes"].values()) == 9000
  assert os.path.isfile(os.path.join(printed["path"], "schema.json"))


def test_examples_in_step_counts_the_real_rows_of_a_short_last_batch(tmp_path):
  # What the training loop counts in examples_per_s: the rows of weight > 0 the loader serves,
  # not the padded batch size.
  d = get_base_config().data
  d.synthetic.update(num_users=60, num_items=50, num_interactions=2000, num_categories=4)
  data = prepare(d, str(tmp_path / "data"))
  split = loader.open_split(data.record_source("train"), data.schema.history_length)
  real = np.zeros(3, int)
  for process in (0, 1):
    batches = list(loader.train_dataset(split, batch_size=64, num_examples=150, seed=0,
                                        process_index=process, process_count=2))
    real += [int((b["weight"] > 0).sum()) for b in batches]
  assert real.tolist() == [loader.examples_in_step(s, 64, 150) for s in range(3)] == [64, 64, 22]
