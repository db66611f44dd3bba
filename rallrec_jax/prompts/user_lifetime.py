"""The user's statistics over every earlier rating, as the prompt can state them.

An extension of the paper's prompt (`finetune.user_lifetime_stats`): after the history list,
"Of all 87 movies he rated before, he liked 52% of them, 3.6 stars on average." The counts
cover every rating of the user's timeline before the sample (the items the prompt lists and all
older ones), so nothing at or after the sample's own rating enters. The K listed items give a
recent, noisy view of the user's taste; these numbers give the long-run one.
"""
import numpy as np


def counts(dataset, split, samples, threshold):
  """(count, liked, mean rating) [len(samples)] over each sample's earlier ratings; the mean is
  NaN where the user has none."""
  s = dataset.splits[split].take(np.asarray(samples, np.int64))
  start, end = dataset.history_bounds(s)
  rating = dataset.timelines.rating.astype(np.float64)
  total = np.concatenate([[0.0], np.cumsum(rating)])
  liked = np.concatenate([[0], np.cumsum(rating > threshold)])
  count = (end - start).astype(np.int64)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = np.where(count > 0, (total[end] - total[start]) / count, np.nan)
  return count, (liked[end] - liked[start]).astype(np.int64), mean
