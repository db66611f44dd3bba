"""The target item's like-rate and popularity among its earlier raters, as the prompt can state it.

An extension of the paper's prompt (`finetune.item_stats`): the question names the target as
"***{title} (liked by 64% of its earlier raters)***". The rate is the item's share of liked train
samples, smoothed towards the global train like-rate (`smoothed`), the item like-rate baseline
of `rallrec_jax.eval.baselines`: (likes + PRIOR * rate) / (count + PRIOR).

Nothing leaks the answer. A valid or test prompt counts every train sample (all of them come
before the valid and test periods on chronological splits), as the baseline does. A train
prompt counts only the train samples before its own one in (timestamp, index) order, so its own
label and later ones never enter; a leave-one-out count would, since with the item's identity in
the title the rate minus one like or one dislike gives the label away. The fine-tune's unrated
negatives (split UNRATED, `rallrec_jax/train/unrated.py`) are train-period prompts too: they count
the train samples before their timestamp.

The popularity (`finetune.item_popularity`) adds ", more liked than 60% of movies": the
target's number of earlier likes (counted by the same rules) placed among the deciles of the
rated items' train-period like counts (`popularity_levels`), the most-popular ranking's own
score. It is what lets P(yes) rank candidates once the fine-tune sees unrated negatives: a user
rates popular items more often, which the like-rate does not say. A train prompt early in the
period reads a lower level than a test prompt for the same item; dividing by the earlier train
samples, to make the levels alike over time, ranked no better on the quickstart's validation
users, and the count of raters instead of likes ranked as well with lower validation AUC (README,
recommending).
"""
import numpy as np

PRIOR = 10.0   # pseudo-samples at the global train like-rate added to every item's counts
UNRATED = "unrated"   # the split name of the fine-tune's unrated negatives


def smoothed(likes, count, global_rate):
  """The like-rate of `likes` liked samples out of `count`, smoothed towards `global_rate`."""
  return (likes + PRIOR * global_rate) / (count + PRIOR)


def train_counts(dataset):
  """(likes, count) [num_items] of each item's train samples, and the global train like-rate."""
  train = dataset.splits["train"]
  label = train.label.astype(np.float64)
  likes = np.bincount(train.target, weights=label, minlength=dataset.num_items)
  count = np.bincount(train.target, minlength=dataset.num_items).astype(np.float64)
  return likes, count, float(label.mean()) if len(label) else 0.5


def target_counts(dataset, split, samples):
  """(likes, count) [len(samples)] of the train samples each sample's prompt may count."""
  samples = np.asarray(samples, np.int64)
  train = dataset.splits["train"]
  if split == UNRATED:
    found = dataset.splits[split].take(samples)
    return _counts_before(train, found.target, found.timestamp)
  if split == "train":
    likes, count = _earlier_counts(train.target, train.label.astype(np.float64), train.timestamp)
    return likes[samples], count[samples]
  likes, count, _ = train_counts(dataset)
  target = dataset.splits[split].target[samples]
  return likes[target], count[target]


def target_rates(dataset, split, samples):
  """Smoothed like-rate [len(samples)] of each sample's target item, as defined above."""
  return smoothed(*target_counts(dataset, split, samples), train_counts(dataset)[2])


LEVELS = tuple(f"more liked than {p}% of movies" for p in range(0, 100, 10))   # deciles


def _levels(dataset, likes_before):
  """Index into LEVELS of each count of earlier likes: its decile among the rated items' like
  counts over the whole train split."""
  likes, count, _ = train_counts(dataset)
  edges = np.quantile(likes[count > 0], np.arange(1, len(LEVELS)) / len(LEVELS))
  return np.searchsorted(edges, likes_before, "right")


def popularity_levels(dataset, split, samples):
  """Index into LEVELS of each sample's target: its number of earlier likes (the liked train
  samples its prompt may count, as for the like-rate) against the deciles of the rated items'
  like counts over the whole train split."""
  return _levels(dataset, target_counts(dataset, split, samples)[0])


def target_phrases(dataset, split, samples, rate=True, level=True):
  """`phrase` of each sample's target with its like-rate and/or popularity level, both from
  one count of the train samples its prompt may count."""
  likes, count = target_counts(dataset, split, samples)
  none = [None] * len(likes)
  rates = smoothed(likes, count, train_counts(dataset)[2]) if rate else none
  levels = _levels(dataset, likes) if level else none
  return [phrase(r, v) for r, v in zip(rates, levels)]


def _earlier_counts(target, label, timestamp):
  """Per train sample, the liked and total train samples of its target before it."""
  order = np.lexsort((np.arange(len(target)), timestamp, target))  # by item, then (time, index)
  t, y = target[order], label[order]
  start = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])             # each item's first row
  first = np.repeat(start, np.diff(np.r_[start, len(t)]))
  likes_before = np.cumsum(y) - y
  likes, count = np.empty(len(t)), np.empty(len(t))
  likes[order] = likes_before - likes_before[first]
  count[order] = np.arange(len(t)) - first
  return likes, count


def _counts_before(train, target, timestamp):
  """(likes, count) of the train samples of each `target` item older than its `timestamp`."""
  order = np.lexsort((train.timestamp, train.target))   # by item, then time
  items, times = train.target[order], train.timestamp[order]
  liked = np.concatenate([[0.0], np.cumsum(train.label[order].astype(np.float64))])
  first = np.searchsorted(items, target, "left")
  last = np.searchsorted(items, target, "right")
  end = np.array([a + np.searchsorted(times[a:b], ts, "left")
                  for a, b, ts in zip(first, last, timestamp)], np.int64)
  return liked[end] - liked[first], (end - first).astype(np.float64)


def phrase(rate=None, level=None):
  """'liked by 64% of its earlier raters' for a rate in [0, 1], followed by ', more liked than
  60% of movies' for popularity level 6 (an index into LEVELS); either part may be None."""
  parts = [] if rate is None else [
      f"liked by {int(round(100 * float(rate)))}% of its earlier raters"]
  return ", ".join(parts + ([] if level is None else [LEVELS[level]]))


def vocabulary_text():
  """Every word and number `phrase` can write, for word-level tokenizers."""
  return f"{phrase(0.0)} " + " ".join(str(p) for p in range(101))
