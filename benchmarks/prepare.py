"""Data preparation throughput and peak memory: synthetic logs of N interactions and Gowalla.

  python benchmarks/prepare.py [--sizes=1000000,10000000] [--format=parquet] \
      [--gowalla_dir=../shared/data/gowalla] [--reference_size=200000] [--profile=200000] \
      [--beam_size=1000000]

First the reference: the same synthetic input of --reference_size interactions prepared by the
code of --reference_commit (the last commit before streaming and block serialization, exported with
`git archive`) and by this code, and the speed-up between the two. Then, for each size, writes synthetic interaction logs (Parquet or CSV files, power-law item popularity,
N/10 users and N/20 items, an item category column) to a temporary directory, then prepares them
in a fresh child process (so that each case's peak RSS is its own) and prints examples/s, seconds
per stage and peak RSS. Gowalla (the NGCF/LightGCN adjacency files, about 1M interactions) is
prepared the same way with configs/gowalla.py. `--profile=N` prints a cProfile of one N-interaction
run instead. `--beam_size=N` (needs the `beam` extra) prepares one synthetic input of N interactions
in-process and as the Beam pipeline on the DirectRunner with 1 and 2 worker processes
(multi_processing), with data.split.kind="temporal_last_n" (a split Beam computes per user), and
prints the 2-worker / 1-worker scaling ratio. Each case also reports the bytes of its ArrayRecord
files per example. The last line is one JSON object.
"""

import cProfile
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from absl import app, flags, logging

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from configs import gowalla  # noqa: E402
from configs.base import get_base_config  # noqa: E402
from pipelines import prepare as prepare_lib  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["1000000", "10000000"], "Synthetic interaction counts.")
_FORMAT = flags.DEFINE_enum("format", "parquet", ["parquet", "csv"], "File format of the logs.")
_FILES = flags.DEFINE_integer("files", 4, "Files the synthetic logs are written as.")
_GOWALLA_DIR = flags.DEFINE_string("gowalla_dir", gowalla.DEFAULT_DIR,
                                   "Gowalla directory ('' to skip).")
_PROFILE = flags.DEFINE_integer("profile", 0, "Profile one run of this many interactions instead.")
_REFERENCE_COMMIT = flags.DEFINE_string(
    "reference_commit", "b9f4841",
    "The reference: this commit's preparation (before pipelines/records.py and pipelines/logs.py), "
    "run from `git archive` of it on the same input; '' to skip.")
_REFERENCE_SIZE = flags.DEFINE_integer(
    "reference_size", 200_000, "Synthetic interactions prepared by both the reference and this "
    "code (the reference takes about 20 s per 100k here).")
_BEAM_SIZE = flags.DEFINE_integer(
    "beam_size", 0, "Interactions of the Beam DirectRunner comparison (1 and 2 workers, and "
    "in-process, on the same input); 0 skips it.")
_CASE = flags.DEFINE_string("case", "", "Internal: prepare this JSON case in this process.")


def write_logs(directory: str, n: int, fmt: str, num_files: int, seed: int = 0) -> list[str]:
  """Synthetic logs: N/10 users, N/20 items with power-law popularity, timestamps over 30 days."""
  rng = np.random.default_rng(seed)
  num_users, num_items = max(1, n // 10), max(1, n // 20)
  popularity = 1.0 / (np.arange(num_items) + 10.0) ** 0.9
  item_of_rank = rng.permutation(num_items)
  paths = []
  bounds = np.linspace(0, n, num_files + 1).astype(np.int64)
  for k in range(num_files):
    m = int(bounds[k + 1] - bounds[k])
    item = item_of_rank[rng.choice(num_items, m, p=popularity / popularity.sum())]
    table = pa.table({
        "user_id": rng.integers(0, num_users, m),
        "item_id": item,
        "timestamp": rng.integers(1_700_000_000, 1_700_000_000 + 30 * 86400, m),
        "category": item % 200,
    })
    path = os.path.join(directory, f"part-{k:05d}.{fmt}")
    if fmt == "parquet":
      pq.write_table(table, path, row_group_size=262_144)
    else:
      pa_csv.write_csv(table, path)
    paths.append(path)
  return paths


def synthetic_config(paths: list[str], fmt: str):
  c = get_base_config()
  c.data.update(source="logs", history_length=20)
  c.data.logs.update(files=tuple(paths), format=fmt, item_categorical=("category",))
  return c


class PeakRss:
  """Peak resident memory of this process: getrusage's high-water mark, cross-checked by a thread
  sampling /proc/self/statm (what the kernel reports can lag on some systems)."""

  def __init__(self, every_s: float = 0.05):
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)
    self._thread.start()

  def _sample(self, every_s):
    page = os.sysconf("SC_PAGE_SIZE")
    while not self._stop.wait(every_s):
      with open("/proc/self/statm") as f:
        self.peak = max(self.peak, int(f.read().split()[1]) * page)

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run_case(case: dict) -> dict:
  """Prepares one case in this process; returns its measurements."""
  if case["kind"] == "gowalla":
    config = gowalla.get_config()
    config.data.source_dir = case["dir"]
  else:
    config = synthetic_config(case["paths"], case["format"])
    if "beam_workers" in case:
      config.data.split.kind = "temporal_last_n"
  beam = {}
  if case.get("beam_workers"):
    beam = dict(beam_runner="DirectRunner", beam_options=(
        f"--direct_num_workers={case['beam_workers']} --direct_running_mode=multi_processing"))
  rss = PeakRss()
  cpu_start = _cpu_seconds()
  with tempfile.TemporaryDirectory() as data_dir:
    start = time.perf_counter()
    data = prepare_lib.prepare(config.data, data_dir, **beam)
    seconds = time.perf_counter() - start
    examples = sum(data.schema.split_sizes.values())
    stages = dict(getattr(data.builder, "stage_seconds", {}))
    shard_bytes = sum(os.path.getsize(os.path.join(data.path, f)) for f in os.listdir(data.path)
                      if ".array_record-" in f)
  peak = rss.stop()  # this process only: Beam's worker processes are not counted
  cpu = _cpu_seconds() - cpu_start  # this process and its finished children (Beam's workers)
  if stages and not beam:
    stages["write_examples"] = seconds - sum(stages.values())
  return dict(name=case["name"], examples=examples, seconds=seconds,
              examples_per_s=examples / seconds, stage_seconds=stages, peak_rss_gib=peak / 2**30,
              shard_bytes_per_example=shard_bytes / examples, cpu_seconds=cpu,
              examples_per_cpu_s=examples / cpu)


def _cpu_seconds() -> float:
  """CPU seconds used by this process and its reaped children: unlike wall time, not inflated by
  other jobs sharing the machine."""
  return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def in_child(case: dict, root: str = _ROOT) -> dict:
  """Runs one case in a fresh process, with the code of the repository at `root`."""
  script = os.path.join(root, "benchmarks", "prepare.py")
  out = subprocess.run([sys.executable, script, f"--case={json.dumps(case)}"], cwd=root,
                       env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"case {case['name']} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def reference_tree(commit: str, directory: str) -> str:
  """The repository at `commit`, with this benchmark added to it (to run its cases)."""
  os.makedirs(directory)
  archive = subprocess.run(["git", "-C", _ROOT, "archive", commit], check=True, capture_output=True)
  subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
  os.makedirs(os.path.join(directory, "benchmarks"), exist_ok=True)
  with open(os.path.abspath(__file__)) as src, \
      open(os.path.join(directory, "benchmarks", "prepare.py"), "w") as dst:
    dst.write(src.read())
  return directory


def report(r: dict) -> None:
  stages = ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_seconds"].items())
  print(f"{r['name']}: {r['examples']:,} examples in {r['seconds']:.1f} s = "
        f"{r['examples_per_s']:,.0f} examples/s, peak RSS {r['peak_rss_gib']:.2f} GiB, "
        f"{r['shard_bytes_per_example']:.1f} shard bytes/example, "
        f"{r['examples_per_cpu_s']:,.0f} examples per CPU-second"
        + (f" ({stages})" if stages else ""), flush=True)


def beam_scaling(tmp: str) -> dict:
  """The same input prepared in-process and on Beam's DirectRunner with 1 and 2 workers."""
  directory = os.path.join(tmp, "beam_logs")
  os.makedirs(directory)
  n = _BEAM_SIZE.value
  case = dict(kind="synthetic", paths=write_logs(directory, n, _FORMAT.value, _FILES.value),
              format=_FORMAT.value)
  results = {}
  for workers in (0, 1, 2):
    name = f"beam_{workers}_workers_{n}" if workers else f"in_process_temporal_{n}"
    results[workers] = in_child(dict(case, name=name, beam_workers=workers))
    report(results[workers])
  scaling = results[2]["examples_per_s"] / results[1]["examples_per_s"]
  print(f"Beam DirectRunner, 2 workers / 1 worker: {scaling:.2f}x; 2-worker Beam / in-process: "
        f"{results[2]['examples_per_s'] / results[0]['examples_per_s']:.2f}x", flush=True)
  return dict(in_process=results[0], beam_1_worker=results[1], beam_2_workers=results[2],
              beam_scaling_2_over_1=scaling)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _CASE.value:
    print(json.dumps(run_case(json.loads(_CASE.value))))
    return
  with tempfile.TemporaryDirectory() as tmp:
    if _PROFILE.value:
      paths = write_logs(tmp, _PROFILE.value, _FORMAT.value, _FILES.value)
      profile = cProfile.Profile()
      result = profile.runcall(run_case, dict(kind="synthetic", name="profile", paths=paths,
                                              format=_FORMAT.value))
      pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
      print(json.dumps(result))
      return
    summary = dict(format=_FORMAT.value)
    if _BEAM_SIZE.value:
      summary["beam"] = beam_scaling(tmp)
    if _REFERENCE_COMMIT.value and _REFERENCE_SIZE.value:
      directory = os.path.join(tmp, "reference_logs")
      os.makedirs(directory)
      case = dict(kind="synthetic", name=f"synthetic_{_REFERENCE_SIZE.value}",
                  paths=write_logs(directory, _REFERENCE_SIZE.value, _FORMAT.value, _FILES.value),
                  format=_FORMAT.value)
      root = reference_tree(_REFERENCE_COMMIT.value, os.path.join(tmp, "reference_code"))
      reference = in_child(dict(case, name=f"reference ({_REFERENCE_COMMIT.value}) {case['name']}"),
                           root)
      ours = in_child(case)
      report(reference)
      report(ours)
      ratio = ours["examples_per_s"] / reference["examples_per_s"]
      print(f"speed-up over the reference on the same input: {ratio:.1f}x", flush=True)
      summary.update(reference=reference, reference_ours=ours, speedup=ratio)
    cases = []
    for size in map(int, _SIZES.value):
      directory = os.path.join(tmp, f"logs_{size}")
      os.makedirs(directory)
      paths = write_logs(directory, size, _FORMAT.value, _FILES.value)
      cases.append(dict(kind="synthetic", name=f"synthetic_{size}", paths=paths,
                        format=_FORMAT.value))
    if _GOWALLA_DIR.value:
      cases.append(dict(kind="gowalla", name="gowalla", dir=os.path.abspath(_GOWALLA_DIR.value)))
    results = []
    for case in cases:
      r = in_child(case)
      report(r)
      results.append(r)
      for path in case.get("paths", ()):
        os.remove(path)  # the next case's files need the room
    summary["results"] = results
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
