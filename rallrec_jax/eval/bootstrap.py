"""Bootstrap confidence intervals of AUC and of means (per-user ranking metrics), vectorised
over resamples.

A resample draws n sample indices with replacement; every score vector given together is
resampled with the same indices, so differences between them are paired. AUC is computed from
per-score-level counts of positives and negatives in integer arithmetic, tied scores counting
one half, so it equals `metrics.auc` on the resampled data.
"""
import numpy as np

CHUNK_ELEMENTS = 2_000_000  # resampled indices held at once (memory bound, not a result)


def resample_aucs(labels, scores, resamples=1000, seed=0):
  """[R, resamples] AUCs of each row of `scores` ([R, n] or [n]) on shared bootstrap resamples.

  A resample with only one class has no AUC: its entries are NaN.
  """
  labels = np.asarray(labels).astype(np.int64)
  scores = np.atleast_2d(np.asarray(scores, np.float64))
  n = len(labels)
  if n == 0 or scores.shape[1] != n:
    raise ValueError(f"need matching non-empty labels and scores, got {n} and {scores.shape}")
  keys, widths = [], []
  for row in scores:
    levels, level_of = np.unique(row, return_inverse=True)
    keys.append(2 * level_of.astype(np.int64) + labels)
    widths.append(2 * len(levels))
  rng = np.random.default_rng(seed)
  out = np.empty((len(scores), resamples))
  chunk = max(1, CHUNK_ELEMENTS // n)
  for begin in range(0, resamples, chunk):
    size = min(chunk, resamples - begin)
    idx = rng.integers(0, n, (size, n))
    for r, (key, width) in enumerate(zip(keys, widths)):
      offsets = (np.arange(size, dtype=np.int64) * width)[:, None]
      counts = np.bincount((key[idx] + offsets).ravel(), minlength=size * width)
      out[r, begin:begin + size] = _auc_from_counts(counts.reshape(size, width // 2, 2))
  return out


def _auc_from_counts(counts):
  """AUC per row of [B, levels, (neg, pos)] counts, levels in ascending score order."""
  neg, pos = counts[..., 0], counts[..., 1]
  neg_below = np.cumsum(neg, axis=1) - neg
  twice_wins = (pos * (2 * neg_below + neg)).sum(axis=1)
  pairs = 2 * pos.sum(axis=1) * neg.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(pairs > 0, twice_wins / np.maximum(pairs, 1), np.nan)


def percentile_ci(values, level=0.95):
  """(low, high) percentile interval of `values`, NaNs (undefined resamples) left out."""
  values = np.asarray(values, np.float64)
  if np.isnan(values).all():
    raise ValueError("every bootstrap resample was undefined (a single class)")
  tail = 50.0 * (1.0 - level)
  low, high = np.nanpercentile(values, [tail, 100.0 - tail])
  return float(low), float(high)


def mean_cis(values, resamples=1000, seed=0, level=0.95):
  """(low, high) percentile intervals of the mean of each row of `values` ([R, n] or [n]),
  every row resampled with the same n indices (paired, like `resample_aucs`)."""
  values = np.atleast_2d(np.asarray(values, np.float64))
  n = values.shape[1]
  if n == 0:
    raise ValueError("need at least one value to resample")
  rng = np.random.default_rng(seed)
  means = np.empty((len(values), resamples))
  chunk = max(1, CHUNK_ELEMENTS // n)
  for begin in range(0, resamples, chunk):
    idx = rng.integers(0, n, (min(chunk, resamples - begin), n))
    means[:, begin:begin + len(idx)] = values[:, idx].mean(axis=2)
  return [percentile_ci(row, level) for row in means]
