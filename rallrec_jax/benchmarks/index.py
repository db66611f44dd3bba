"""Nearest-neighbour throughput: the ScaNN index against the exact JAX backend.

  python -m rallrec_jax.benchmarks.index [--n 1000000] [--d 128] [--queries 10000]

The catalogue is `n` unit vectors drawn around `clusters` random unit centres (Gaussian noise
of norm about `spread`), as item embeddings group by genre or taste; the queries are fresh
draws from the same mixture. ScaNN uses the default `IndexConfig` with its backend forced to
"scann" (its partitions and reordering follow the catalogue size); the exact backend searches
batches of `EXACT_BATCH` queries. Both answer the same queries in this process: the exact
answers are the ground truth for ScaNN's recall@k, and their speed is the competitor. Each
side is timed after a warm-up search.
"""
import argparse
import dataclasses
import json
import resource
import time

import jax
import numpy as np

from rallrec_jax import numeric
from rallrec_jax.retrieval import index as index_lib

EXACT_BATCH = 512  # as fast as 4096 on the CPU here, and its warm-up is cheap


def clustered_vectors(rng, n, d, centres, spread, piece=100_000):
  """float32 [n, d] unit vectors: a random centre plus noise of norm about `spread`."""
  out = np.empty((n, d), np.float32)
  for start in range(0, n, piece):
    stop = min(start + piece, n)
    noise = rng.standard_normal((stop - start, d), dtype=np.float32) * (spread / np.sqrt(d))
    out[start:stop] = numeric.unit_rows(
        centres[rng.integers(0, len(centres), stop - start)] + noise)
  return out


def _timed_search(index, queries, k, batch):
  """(ids of all queries, seconds for them) after warming up on the first and last batches.

  The warm-up compiles the exact backend's batch shapes (a full batch and the padded last
  one), so the timed search measures searching, not compiling.
  """
  index.search(queries[:batch], k)
  index.search(queries[len(queries) - (len(queries) % batch or batch):], k)
  start = time.perf_counter()
  ids, _ = index.search(queries, k)
  return ids, time.perf_counter() - start


def bench_scann(n=1_000_000, d=128, queries=10_000, k=10, seed=0, clusters=1000, spread=1.0):
  """{"bench": "scann", "value": queries/s, ...} with the exact JAX backend as competitor."""
  rng = np.random.default_rng(seed)
  centres = numeric.unit_rows(rng.standard_normal((clusters, d), dtype=np.float32))
  vectors = clustered_vectors(rng, n, d, centres, spread)
  query_vectors = clustered_vectors(rng, queries, d, centres, spread)
  cfg = index_lib.IndexConfig(backend="scann")
  start = time.perf_counter()
  scann_index = index_lib.build(vectors, cfg, normalize=False)
  build_seconds = time.perf_counter() - start
  found, scann_seconds = _timed_search(scann_index, query_vectors, k, cfg.batch_size)
  exact_cfg = dataclasses.replace(cfg, backend="exact", batch_size=EXACT_BATCH)
  exact_index = index_lib.build(vectors, exact_cfg, normalize=False)
  truth, exact_seconds = _timed_search(exact_index, query_vectors, k, EXACT_BATCH)
  value, competitor = queries / scann_seconds, queries / exact_seconds
  device = jax.devices()[0]
  return {"bench": "scann", "value": round(value, 1), "unit": "queries/s",
          f"recall@{k}": round(index_lib.recall_at_k(found, truth), 4),
          "competitor": "exact jax matmul+top_k", "competitor_value": round(competitor, 1),
          "ratio": round(value / competitor, 2), "n": n, "d": d, "queries": queries, "k": k,
          "build_seconds": round(build_seconds, 1), **scann_index.settings(k),
          "clusters": clusters, "spread": spread,
          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
          "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}"}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=1_000_000)
  parser.add_argument("--d", type=int, default=128)
  parser.add_argument("--queries", type=int, default=10_000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(json.dumps(bench_scann(args.n, args.d, args.queries, args.k, args.seed)))


if __name__ == "__main__":
  main()
