"""Index benchmark: ScaNN over 1M synthetic item embeddings of dimension 64 vs exact search.

  python -m benchmarks.index_search                       # 1M x 64, trained-like embeddings
  python -m benchmarks.index_search --distribution=gaussian   # worst case: isotropic noise

Builds the index exactly as `launch.build_index` does (size rules, then calibration of the
automatic search settings on 500 calibration queries), then measures on separate queries:
recall@10 and recall@100 against exact top-K, queries/s of the index, and queries/s of exact
brute force with jax.lax.top_k in the same run, and prints their ratio. Also the build time
(ScaNN training) and the process's peak memory up to the end of the build.

Embeddings ("trained", the default) are shaped like a trained two-tower's: L2-normalised, a strong
common direction, clusters in a low-dimensional subspace and a little isotropic noise. The
parameters were matched to the item embeddings of the default synthetic job's trained model
(participation ratio of the spectrum ~11 of 64 dimensions, norm of the mean ~0.7, spread of the
query-item cosines ~0.15). "gaussian" (isotropic, no structure) is the hardest case for any
quantized or partitioned search and is reported alongside.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import numpy as np

from configs.base import get_base_config
from two_tower import calibration, search


class LatentSpace:
  """Samples embeddings shaped like a trained tower's (see the module docstring)."""

  def __init__(self, dim: int, *, seed: int = 0, latent: int = 24, clusters: int = 1000,
               mean_weight: float = 1.1, noise: float = 0.2, spread: float = 0.6,
               decay: float = 10.0):
    rng = np.random.default_rng(seed)
    scale = np.exp(-np.arange(latent) / decay)
    self.scale = (scale / np.sqrt((scale ** 2).sum())).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:latent + 1].astype(np.float32)
    self.mean, self.basis = basis[0], basis[1:]
    self.centers = rng.standard_normal((clusters, latent)).astype(np.float32) * self.scale
    self.dim, self.latent, self.clusters = dim, latent, clusters
    self.mean_weight, self.noise, self.spread = mean_weight, noise, spread

  def sample(self, n: int, seed: int, chunk: int = 1 << 17) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, dim] unit vectors, cluster of each), generated a chunk at a time."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, self.dim), np.float32)
    cluster = rng.integers(0, self.clusters, n)
    for lo in range(0, n, chunk):
      c = cluster[lo:lo + chunk]
      z = self.centers[c] + self.spread * rng.standard_normal(
          (len(c), self.latent), dtype=np.float32) * self.scale
      x = self.mean_weight * self.mean + z @ self.basis + self.noise / np.sqrt(self.dim) * \
          rng.standard_normal((len(c), self.dim), dtype=np.float32)
      out[lo:lo + chunk] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, cluster


def gaussian(n: int, dim: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, dim), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_items", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--num_queries", type=int, default=10_000, help="timed index queries")
  parser.add_argument("--recall_queries", type=int, default=2000, help="queries with exact truth")
  parser.add_argument("--exact_queries", type=int, default=1000, help="queries timed exactly")
  parser.add_argument("--distribution", choices=("trained", "gaussian"), default="trained")
  parser.add_argument("--threads", type=int, default=0, help="search threads; 0: all cores")
  args = parser.parse_args()

  cfg = get_base_config().index
  n_cal = cfg.calibration_queries
  if args.distribution == "trained":
    space = LatentSpace(args.dim)
    items, _ = space.sample(args.num_items, seed=1)
    queries, _ = space.sample(n_cal + args.num_queries, seed=2)
  else:
    items = gaussian(args.num_items, args.dim, 1)
    queries = gaussian(n_cal + args.num_queries, args.dim, 2)
  cal_q, queries = queries[:n_cal], queries[n_cal:]
  rss_data = peak_rss_gib()

  settings, auto = search.choose_settings(args.num_items, cfg)
  start = time.perf_counter()
  searcher = search.build_searcher(items, settings, args.threads)
  build_s = time.perf_counter() - start
  rss_build = peak_rss_gib()
  print(f"built {settings.mode} over {args.num_items} x {args.dim} in {build_s:.1f}s "
        f"(peak memory so far {rss_build:.2f} GiB)", flush=True)

  start = time.perf_counter()
  floors = {"recall@10": float(cfg.min_recall_at_10), "recall@100": float(cfg.min_recall_at_100)}
  cal_exact, _ = search.exact_top_k(cal_q, items, search.GATE_K)
  settings, trials = calibration.calibrate(searcher, settings, auto, cal_q, items, cal_exact, floors)
  calibrate_s = time.perf_counter() - start
  for t in trials:
    print("  calibration " + ", ".join(f"{k}={v:.4g}" for k, v in t.items()), flush=True)

  # Exact brute force in the same run: jax.lax.top_k over all items, k=10, timed after compiling.
  exact_q = queries[:args.exact_queries]
  search.exact_top_k(exact_q[:8], items, 10)
  start = time.perf_counter()
  search.exact_top_k(exact_q, items, 10)
  exact_qps = len(exact_q) / (time.perf_counter() - start)
  truth, _ = search.exact_top_k(queries[:args.recall_queries], items, search.GATE_K)

  results = {}
  for k in (10, 100):
    search.search(searcher, settings, queries[:256], k)
    start = time.perf_counter()
    rows, _ = search.search(searcher, settings, queries, k)
    qps = len(queries) / (time.perf_counter() - start)
    r = search.recall(rows[:args.recall_queries], queries[:args.recall_queries], items, truth, k)
    results[k] = (r, qps)
  out = {
      "distribution": args.distribution,
      "items": args.num_items, "dim": args.dim, "queries": len(queries),
      "settings": dataclasses.asdict(settings),
      "build_seconds": round(build_s, 2),
      "calibration_seconds": round(calibrate_s, 2),
      "peak_memory_gib_after_data": round(rss_data, 3),
      "peak_memory_gib_after_build": round(rss_build, 3),
      "recall@10": round(results[10][0], 4), "queries_per_s@10": round(results[10][1]),
      "recall@100": round(results[100][0], 4), "queries_per_s@100": round(results[100][1]),
      "exact_jax_top_k_queries_per_s@10": round(exact_qps, 1),
      "speedup_vs_exact@10": round(results[10][1] / exact_qps, 1),
  }
  print(json.dumps(out, indent=2))
  targets = [("recall@10 >= 0.95", out["recall@10"] >= 0.95),
             ("queries/s@10 >= 10,000", out["queries_per_s@10"] >= 10_000),
             ("speedup >= 50x", out["speedup_vs_exact@10"] >= 50),
             ("build < 30 s", build_s < 30), ("peak memory < 4 GiB", rss_build < 4)]
  print("targets: " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in targets))


if __name__ == "__main__":
  main()
