"""The target item's like-rate among its earlier raters, as the prompt can state it.

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


def target_rates(dataset, split, samples):
  """Smoothed like-rate [len(samples)] of each sample's target item, as defined above."""
  samples = np.asarray(samples, np.int64)
  likes, count, global_rate = train_counts(dataset)
  if split == UNRATED:
    found = dataset.splits[split].take(samples)
    return smoothed(*_counts_before(dataset.splits["train"], found.target, found.timestamp),
                    global_rate)
  if split != "train":
    target = dataset.splits[split].target[samples]
    return smoothed(likes[target], count[target], global_rate)
  train = dataset.splits["train"]
  likes, count = _earlier_counts(train.target, train.label.astype(np.float64), train.timestamp)
  return smoothed(likes[samples], count[samples], global_rate)


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


def phrase(rate):
  """'liked by 64% of its earlier raters' for a rate in [0, 1]."""
  return f"liked by {int(round(100 * float(rate)))}% of its earlier raters"


def vocabulary_text():
  """Every word and number `phrase` can write, for word-level tokenizers."""
  return f"{phrase(0.0)} " + " ".join(str(p) for p in range(101))
