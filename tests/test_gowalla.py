"""Predefined splits (a split column, files per split) and the adjacency format of the NGCF /
LightGCN benchmarks (Gowalla), on small files written here."""

import gzip
import os

import numpy as np
import pytest

from configs import gowalla
from configs.base import get_base_config
from pipelines import logs, splits
from pipelines.prepare import prepare
from pipelines.schema import PAD
from pipelines.sources import DataError

GOWALLA_DIR = gowalla.DEFAULT_DIR


def _pairs(data, split):
  """(raw user ID, raw item ID) pairs of a prepared split."""
  users, items = data.pairs(split)
  user_raw, item_raw = data.table("user", "raw_id"), data.table("item", "raw_id")
  return sorted(zip(user_raw[users].tolist(), item_raw[items].tolist()))


# ----------------------------------------------------------------------------- split column


def _write_csv(path, rows, header=("uid", "iid", "ts", "part")):
  with open(path, "w") as f:
    f.write(",".join(header) + "\n")
    for row in rows:
      f.write(",".join(map(str, row)) + "\n")
  return str(path)


def _rows(seed=0, n=300):
  rng = np.random.default_rng(seed)
  parts = rng.choice(["train", "validation", "test"], n, p=[0.7, 0.15, 0.15])
  return [(f"u{rng.integers(20)}", f"i{rng.integers(30)}", int(rng.integers(10**6)), p) for p in parts]


def _column_cfg(path, **split):
  d = get_base_config().data
  d.source = "logs"
  d.split.update(dict(dict(kind="predefined"), **split))
  d.history_length = 4
  d.logs.update(files=(path,), user_id="uid", item_id="iid", timestamp="ts", split_column="part")
  return d


def test_split_column_assigns_each_row_its_split(tmp_path):
  rows = _rows()
  data = prepare(_column_cfg(_write_csv(tmp_path / "log.csv", rows)), str(tmp_path / "data"))
  for name in splits.SPLIT_NAMES:
    expected = sorted((u, i) for u, i, _, p in rows if p == name)
    assert _pairs(data, name) == expected
    assert data.schema.split_sizes[name] == len(expected)


def test_split_column_ignores_the_split_settings_of_computed_kinds(tmp_path):
  path = _write_csv(tmp_path / "log.csv", _rows())
  a = prepare(_column_cfg(path), str(tmp_path / "a"))
  b = prepare(_column_cfg(path, seed=7, ratios=(0.5, 0.25, 0.25)), str(tmp_path / "b"))
  assert _pairs(a, "test") == _pairs(b, "test")


def test_bad_split_value_names_the_file_and_the_value(tmp_path):
  rows = _rows()
  rows[7] = rows[7][:3] + ("valid",)
  path = _write_csv(tmp_path / "log.csv", rows)
  with pytest.raises(DataError, match=r"'part'.*log\.csv.*row 8 holds 'valid'"):
    prepare(_column_cfg(path), str(tmp_path / "data"))


def test_predefined_needs_a_split_from_the_data_and_vice_versa(tmp_path):
  path = _write_csv(tmp_path / "log.csv", _rows())
  cfg = _column_cfg(path)
  cfg.logs.split_column = ""
  with pytest.raises(DataError, match="predefined.*split_column.*split_files"):
    prepare(cfg, str(tmp_path / "data"))
  cfg = _column_cfg(path, kind="random")
  with pytest.raises(DataError, match="kind='random'.*set data.split.kind='predefined'"):
    prepare(cfg, str(tmp_path / "data"))


# ----------------------------------------------------------------------------- files per split


def test_split_files_give_each_file_its_split(tmp_path):
  header = ("uid", "iid", "ts")
  parts = {name: [r[:3] for r in _rows(seed)] for seed, name in enumerate(splits.SPLIT_NAMES)}
  d = get_base_config().data
  d.update(source="logs", source_dir=str(tmp_path), history_length=4)  # relative names: source_dir
  d.split.kind = "predefined"
  d.logs.update(user_id="uid", item_id="iid", timestamp="ts")
  for name, rows in parts.items():
    _write_csv(tmp_path / f"{name}.csv", rows, header)
    d.logs.split_files[name] = (f"{name}.csv",)
  data = prepare(d, str(tmp_path / "data"))
  for name, rows in parts.items():
    assert _pairs(data, name) == sorted((u, i) for u, i, _ in rows)
  d.logs.files = ("train.csv",)
  with pytest.raises(DataError, match="cannot be combined with data.logs.files"):
    prepare(d, str(tmp_path / "data"))


# ----------------------------------------------------------------------------- adjacency (Gowalla)

# A slice in the Gowalla layout: user 2's item 7 and user 0's item 9 appear only in valid / test.
TRAIN = {0: [1, 2, 3, 4, 5], 1: [2, 3, 6, 0], 2: [1, 4, 7, 8], 3: [5, 6]}
VALID = {0: [4], 1: [6], 2: [7]}  # a carve-out of TRAIN
TEST = {0: [6, 9], 1: [1], 2: [2, 3], 3: [1, 4]}


def _write_adjacency(directory, lists, name):
  with gzip.open(os.path.join(directory, name), "wt") as f:
    for user, items in lists.items():
      f.write(" ".join(map(str, [user, *items])) + "\n")


def _gowalla_slice(directory, train=TRAIN, valid=VALID, test=TEST):
  os.makedirs(directory, exist_ok=True)
  for lists, name in ((train, "train.txt.gz"), (valid, "valid.txt.gz"), (test, "test.txt.gz")):
    _write_adjacency(directory, lists, name)
  return str(directory)


def _flat(lists):
  return sorted((str(u), str(i)) for u, items in lists.items() for i in items)


def _gowalla_data_cfg(directory):
  d = gowalla.get_config().data
  d.source_dir = directory
  d.history_length = 3
  return d


def test_adjacency_split_fits_on_train_minus_valid(tmp_path):
  data = prepare(_gowalla_data_cfg(_gowalla_slice(tmp_path / "gowalla")), str(tmp_path / "data"))
  fit = sorted(set(_flat(TRAIN)) - set(_flat(VALID)))
  assert _pairs(data, "train") == fit
  assert _pairs(data, "validation") == _flat(VALID)
  assert _pairs(data, "test") == _flat(TEST)
  assert data.schema.split_sizes == {"train": 12, "validation": 3, "test": 7}
  # The catalog holds every user and item of the files, also those with no training interaction.
  assert sorted(data.table("user", "raw_id").tolist()) == ["0", "1", "2", "3"]
  assert sorted(data.table("item", "raw_id").tolist(), key=int) == [str(i) for i in range(10)]
  assert data.schema.num_items == 10
  # Histories hold training items only: never a validation or test item of the user.
  item_raw = data.table("item", "raw_id")
  id_to_raw = {int(data.table("item", "item_id")[r]): item_raw[r] for r in range(len(item_raw))}
  user_raw = data.table("user", "raw_id")
  for row, history in enumerate(data.table("user", "history")):
    user = int(user_raw[row])
    items = {int(id_to_raw[h]) for h in history.tolist() if h != PAD}
    assert items and items <= set(TRAIN[user]) - set(VALID.get(user, []))
  # A training example's history is the user's other training items (random-like split).
  examples = data.builder.as_data_source("train")
  for k in range(len(examples)):
    ex = examples[k]
    assert int(data.table("item", "item_id")[ex["item_index"]]) not in ex["history"].tolist()


def test_adjacency_reader_counts_and_test_only_items(tmp_path):
  directory = _gowalla_slice(tmp_path)
  raw = logs.interaction_logs(_gowalla_data_cfg(directory).logs, directory)
  assert np.bincount(raw.interactions["split"]).tolist() == [12, 3, 7]
  assert (raw.interactions["timestamp"] == 0).all()
  assert "9" in raw.items["item_id"].tolist()  # only in test


def test_validation_that_is_not_a_carve_out_is_refused(tmp_path):
  directory = _gowalla_slice(tmp_path, valid={0: [4], 3: [9]})
  with pytest.raises(DataError, match=r"1 validation interactions are not in the training files "
                                      r"\(e\.g\. user '3', item '9'\)"):
    logs.interaction_logs(_gowalla_data_cfg(directory).logs, directory)


def test_adjacency_refuses_feature_columns(tmp_path):
  directory = _gowalla_slice(tmp_path)
  cfg = _gowalla_data_cfg(directory).logs
  cfg.user_categorical = ("country",)
  with pytest.raises(DataError, match="adjacency.*only users and items"):
    logs.interaction_logs(cfg, directory)


def test_gowalla_config_trains_and_selects_by_recall_at_20(tmp_path):
  from two_tower.train import train_and_evaluate
  rng = np.random.default_rng(0)
  # 60 users over 150 items (coverage@100 needs at least 100), 8 to 15 items each.
  lists = {u: rng.choice(150, rng.integers(8, 16), replace=False).tolist() for u in range(60)}
  train = {u: items[:-2] for u, items in lists.items()}
  directory = _gowalla_slice(tmp_path / "gw", train, {u: items[-3:-2] for u, items in lists.items()},
                             {u: items[-2:] for u, items in lists.items()})
  config = gowalla.get_config()
  config.data.source_dir = directory
  config.train.update(batch_size=64, num_steps=12, eval_every_steps=4, log_every_steps=4)
  summary = train_and_evaluate(config, str(tmp_path / "run"))
  assert set(summary["best_validation"]) == {"recall@20", "step"}
  assert 0 <= summary["best_validation"]["recall@20"] <= 1


@pytest.mark.skipif(not os.path.isdir(GOWALLA_DIR), reason="no Gowalla data at ../shared/data/gowalla")
def test_real_gowalla_counts():
  d = gowalla.get_config().data
  raw = logs.interaction_logs(d.logs, d.source_dir)
  # train.txt has 810,128 interactions, of which valid.txt's 91,047 are carved out.
  assert np.bincount(raw.interactions["split"]).tolist() == [810_128 - 91_047, 91_047, 217_242]
  assert len(raw.users["user_id"]) == 29_858 and len(raw.items["item_id"]) == 40_981
