"""Interaction logs read in bounded batches, and bad input files refused with the file, column and
row named, leaving the data directory as it was."""

import hashlib
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from configs.base import get_base_config
from pipelines import logs, splits
from pipelines.prepare import prepare
from pipelines.sources import DataError


def _table(n, seed):
  rng = np.random.default_rng(seed)
  return pa.table({
      "uid": [f"u{u}" for u in rng.integers(0, 50, n)],
      "iid": rng.integers(0, 40, n),
      "ts": rng.integers(0, 10**6, n),
      "country": rng.choice(["fr", "de", "us"], n),
      "tags": ["|".join(rng.choice(["x", "y", "z"], 2)) for _ in range(n)],
      "price": rng.random(n).round(3),
  })


def _write(table, path):
  if path.endswith(".parquet"):
    pq.write_table(table, path, row_group_size=50)
  else:
    pa_csv.write_csv(table, path, pa_csv.WriteOptions(
        delimiter="\t" if path.endswith(".tsv") else ",", quoting_style="none"))
  return path


def _files(tmp_path, fmt, n=300):
  return [_write(_table(n, seed), str(tmp_path / f"part{seed}.{fmt}")) for seed in range(2)]


def _cfg(files, fmt):
  d = get_base_config().data
  d.source = "logs"
  d.split.kind = "temporal_last_n"
  d.history_length = 4
  d.logs.update(files=tuple(files), format=fmt, user_id="uid", item_id="iid", timestamp="ts",
                user_categorical=("country",), item_multi=("tags",), item_numeric=("price",))
  return d


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_batches_give_the_same_data_as_one_read(tmp_path, monkeypatch, fmt):
  cfg = _cfg(_files(tmp_path, fmt), fmt)
  whole = logs.interaction_logs(cfg.logs)
  monkeypatch.setattr(logs, "BATCH_ROWS", 7)  # Parquet: 7 rows a batch
  monkeypatch.setattr(logs, "CSV_BLOCK_BYTES", 512)  # CSV: about 15 rows a block
  batched = logs.interaction_logs(cfg.logs)
  assert sum(len(b) for _, b in logs._batches(cfg.logs.files[0], fmt, "\t" if fmt == "tsv" else ",",
                                               ["uid"])) == 300
  assert len(list(logs._batches(cfg.logs.files[0], fmt, "\t" if fmt == "tsv" else ",", ["uid"]))) > 10
  for part in ("interactions", "users", "items"):
    a, b = getattr(whole, part), getattr(batched, part)
    assert a.keys() == b.keys()
    for key in a:
      assert np.array_equal(np.asarray(a[key], object), np.asarray(b[key], object)), (part, key)
  # Users in ID order, each with the features of its latest interaction.
  table = pa.concat_tables(pq.read_table(p) if fmt == "parquet" else
                           pa_csv.read_csv(p, parse_options=pa_csv.ParseOptions(
                               delimiter="\t" if fmt == "tsv" else ","))
                           for p in cfg.logs.files).to_pydict()
  latest = {}
  for u, t, c in zip(table["uid"], table["ts"], table["country"]):
    if u not in latest or t >= latest[u][0]:
      latest[u] = (t, c)
  assert batched.users["user_id"].tolist() == sorted(latest)
  assert batched.users["country"].tolist() == [latest[u][1] for u in sorted(latest)]
  assert len(batched.interactions["timestamp"]) == 600


def _tree(root):
  """path -> content hash of every file under root."""
  out = {}
  for r, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(r, name), "rb") as f:
        out[os.path.relpath(os.path.join(r, name), root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def existing_build(tmp_path_factory):
  """A data directory holding a finished build of other logs."""
  root = tmp_path_factory.mktemp("existing")
  prepare(_cfg(_files(root, "parquet", n=100), "parquet"), str(root / "data"))
  return root / "data"


def _refused(tmp_path, existing_build, cfg, match):
  data_dir = tmp_path / "data"
  shutil.copytree(existing_build, data_dir)
  before = _tree(data_dir)
  with pytest.raises(DataError, match=match):
    prepare(cfg, str(data_dir))
  assert _tree(data_dir) == before  # nothing half-written, the existing build untouched


def test_files_whose_columns_disagree(tmp_path, existing_build):
  a, b = _files(tmp_path, "parquet")
  _write(pq.read_table(b).drop_columns(["country"]), b)
  _refused(tmp_path, existing_build, _cfg([a, b], "parquet"),
           rf"disagree on their columns: {a} has column 'country' .* but {b} does not")


def test_files_whose_column_types_disagree(tmp_path, existing_build):
  a, b = _files(tmp_path, "parquet")
  table = pq.read_table(b)
  _write(table.set_column(2, "ts", table["ts"].cast(pa.string())), b)
  _refused(tmp_path, existing_build, _cfg([a, b], "parquet"),
           rf"disagree on the type of column 'ts' .*integer values \(int64\) in {a} but string "
           rf"values \(string\) in {b}")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_parquet_file_is_named(tmp_path, existing_build, damage):
  a, b = _files(tmp_path, "parquet")
  data = open(b, "rb").read()
  garbage = np.random.default_rng(0).bytes(500)
  open(b, "wb").write(data[: len(data) // 2] if damage == "truncated" else b"PAR1" + garbage)
  _refused(tmp_path, existing_build, _cfg([a, b], "parquet"),
           rf"cannot read {b} as parquet: the file is corrupt, truncated or not parquet")


def test_corrupt_page_inside_a_parquet_file_is_named(tmp_path, existing_build):
  a, b = _files(tmp_path, "parquet")
  data = bytearray(open(b, "rb").read())
  data[200:1200] = np.random.default_rng(0).bytes(1000)  # pages; the footer stays readable
  open(b, "wb").write(bytes(data))
  _refused(tmp_path, existing_build, _cfg([a, b], "parquet"),
           rf"cannot read {b} as parquet after row \d+: the file is corrupt or truncated")


def _edit_csv_row(path, row, column, value):
  lines = open(path).read().splitlines()
  header = [h.strip("\"") for h in lines[0].split(",")]
  fields = lines[row].split(",")
  fields[header.index(column)] = value
  lines[row] = ",".join(fields)
  open(path, "w").write("\n".join(lines) + "\n")


@pytest.mark.parametrize("column,value,match", [
    ("price", "cheap", "'price' of {b} must be numeric but row 250 holds 'cheap'"),
    ("ts", "yesterday", "'ts' of {b} must hold integer timestamps .* row 250 holds 'yesterday'"),
    ("uid", "", None),  # an empty string is a valid (if odd) ID
])
def test_wrong_type_in_one_file_names_file_column_and_row(tmp_path, existing_build, monkeypatch,
                                                         column, value, match):
  monkeypatch.setattr(logs, "CSV_BLOCK_BYTES", 1024)  # the bad row is in a later batch
  a, b = _files(tmp_path, "csv")
  _edit_csv_row(b, 250, column, value)
  cfg = _cfg([a, b], "csv")
  if match is None:
    assert "" in logs.interaction_logs(cfg.logs).users["user_id"].tolist()
    return
  _refused(tmp_path, existing_build, cfg, match.format(b=b))


@pytest.mark.parametrize("content", ["", "uid,iid,ts,country,tags,price\n"])
@pytest.mark.parametrize("allow_empty", [False, True])
def test_empty_file_among_valid_ones_is_refused(tmp_path, existing_build, content, allow_empty):
  # Even where a day may hold no interactions at all (the nightly job), one empty file among
  # others is a failed export, not an empty day.
  a, b = _files(tmp_path, "csv")
  empty = tmp_path / "empty.csv"
  empty.write_text(content)
  cfg = _cfg([a, str(empty), b], "csv")
  cfg.logs.allow_empty = allow_empty
  _refused(tmp_path, existing_build, cfg,
           rf"input file {empty} (is empty|has a header but no rows)")


@pytest.mark.parametrize("minor", ["small_ints", "huge_ints", "floats"])
def test_order_by_is_lexsort(minor):
  rng = np.random.default_rng(0)
  major = rng.integers(0, 30, 2000)
  values = dict(small_ints=rng.integers(-5, 5, 2000), huge_ints=rng.integers(-2**62, 2**62, 2000),
                floats=rng.random(2000).round(2))[minor]
  np.testing.assert_array_equal(splits.order_by(major, values), np.lexsort((values, major)))
