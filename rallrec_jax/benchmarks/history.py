"""Benchmark of history retrieval. Prints one JSON line: {"bench", "value", "unit", ...}.

  python -m rallrec_jax.benchmarks.history [--samples 1000000] [--k 30] [--dim 128]

Synthetic ratings of MovieLens-1M shape (6,040 users, 3,706 items) are built into one split of
about `samples` samples; item embeddings are random. `value` is `history.retrieve` (order
rerank) over every sample, compilation included. The competitor is the reference code's
approach: a dense item x item cosine matrix, each row argsorted once, then per sample a Python
walk down the target's row keeping the items found in the user's history, and the rerank in
Python. Its walks run on a random subsample and are extrapolated linearly (its dense matrix
and argsort are timed whole); `agreement` is the share of subsample prompts equal to ours.
"""
import argparse
import json
import time

import numpy as np

from rallrec_jax.data import build, synthetic
from rallrec_jax.retrieval import history

USERS, ITEMS, CLUSTERS = 6040, 3706, 18
MIN_HISTORY = 5


def _dataset(num_samples):
  """One split holding about `num_samples` samples (each rating after the fifth is one)."""
  raw = synthetic.generate(USERS, ITEMS, num_samples + MIN_HISTORY * USERS, CLUSTERS, 0.8, 0)
  return build.build(raw, name="synthetic", sampling="chronological", min_history=MIN_HISTORY,
                     label_threshold=3.0, split=(1.0, 0.0, 0.0))


def reference_ranking(embeddings):
  """Every item's items by decreasing cosine: the reference's dense matrix, argsorted once."""
  e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  return np.argsort(-(e @ e.T), axis=1).astype(np.int32)


def reference_prompt(ranking, history_items, target, k):
  """One sample's rerank prompt, walking the sorted row of its target in Python."""
  position = {item: i for i, item in enumerate(history_items)}
  retrieved = []
  for item in ranking[target]:
    if item in position:
      retrieved.append(position[item])
      if len(retrieved) == k:
        break
  k1 = 2 * k // 3
  newest = sorted(retrieved, reverse=True)[:k1]
  chosen = set(newest)
  recent = []
  for i in range(len(history_items) - 1, -1, -1):
    if len(recent) == k - k1:
      break
    if i not in chosen:
      recent.append(i)
  return [history_items[i] for i in newest + recent[::-1]]


def _timed(fn, *args, **kwargs):
  """(wall seconds, process CPU seconds, result) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn(*args, **kwargs)
  return np.array([time.perf_counter() - wall, time.process_time() - cpu]), result


def _reference_walks(ds, index, ranking, k):
  """Prompts of the reference walks over samples `index`."""
  samples = ds.splits["train"]
  lo, hi = ds.history_bounds(samples)
  items = ds.timelines.item
  return [reference_prompt(ranking, items[lo[i]:hi[i]].tolist(), samples.target[i], k)
          for i in index.tolist()]


def _agreement(ours, index, prompts):
  """Share of subsample prompts equal to ours."""
  same = [ours[i][ours[i] >= 0].tolist() == p for i, p in zip(index.tolist(), prompts)]
  return float(np.mean(same))


def bench_retrieve(num_samples=1_000_000, k=30, d=128, competitor_samples=20_000):
  """Time `retrieve` over every sample, and the reference on a subsample (see module doc).

  Half of the subsample is walked before our run and half after, so that a change in machine
  load during the run weighs on both sides alike. Process CPU seconds are reported beside wall
  seconds: on a shared machine they move less with the load of other processes.
  """
  ds = _dataset(num_samples)
  n = len(ds.splits["train"])
  embeddings = np.random.default_rng(0).normal(size=(ds.num_items, d)).astype(np.float32)
  index = np.sort(np.random.default_rng(1).choice(n, min(n, competitor_samples), replace=False))
  ranked, ranking = _timed(reference_ranking, embeddings)
  before, prompts_before = _timed(_reference_walks, ds, index[0::2], ranking, k)
  ours, result = _timed(history.retrieve, ds, "train", embeddings, k=k, order="rerank")
  after, prompts_after = _timed(_reference_walks, ds, index[1::2], ranking, k)
  competitor = ranked + (before + after) * n / len(index)
  agreement = (_agreement(result["history"], index[0::2], prompts_before)
               + _agreement(result["history"], index[1::2], prompts_after)) / 2
  return {"bench": "retrieve", "value": round(ours[0], 3), "unit": "s", "samples": n, "k": k,
          "dim": d, "competitor": "reference dense argsort + python walk",
          "competitor_value": round(competitor[0], 3),
          "competitor_extrapolated_from": len(index), "competitor_dense_s": round(ranked[0], 3),
          "ratio": round(competitor[0] / ours[0], 2), "cpu_s": round(ours[1], 3),
          "competitor_cpu_s": round(competitor[1], 3),
          "ratio_cpu": round(competitor[1] / ours[1], 2), "agreement": agreement}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--samples", type=int, default=1_000_000)
  parser.add_argument("--k", type=int, default=30)
  parser.add_argument("--dim", type=int, default=128)
  args = parser.parse_args()
  print(json.dumps(bench_retrieve(args.samples, args.k, args.dim)))


if __name__ == "__main__":
  main()
