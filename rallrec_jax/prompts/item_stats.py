"""The target item's like-rate among its earlier raters, as the prompt can state it.

An extension of the paper's prompt (`finetune.item_stats`): the question names the target as
"***{title} (liked by 64% of its earlier raters)***". The rate is the item's share of liked train
samples, smoothed towards the global train like-rate exactly as the item like-rate baseline
(`rallrec_jax.eval.baselines`): (likes + PRIOR * rate) / (count + PRIOR).

Nothing leaks the answer. A valid or test prompt counts every train sample (all of them come
before the valid and test periods on chronological splits), as the baseline does. A train
prompt counts only the train samples before its own one in (timestamp, index) order, so its own
label and later ones never enter; a leave-one-out count would, since with the item's identity in
the title the rate minus one like or one dislike gives the label away.
"""
import numpy as np

PRIOR = 10.0   # pseudo-samples at the global like-rate, as the item like-rate baseline uses


def target_rates(dataset, split, samples):
  """Smoothed like-rate [len(samples)] of each sample's target item, as defined above."""
  train = dataset.splits["train"]
  label = train.label.astype(np.float64)
  global_rate = float(label.mean()) if len(label) else 0.5
  samples = np.asarray(samples, np.int64)
  target = dataset.splits[split].target[samples]
  if split != "train":
    likes = np.bincount(train.target, weights=label, minlength=dataset.num_items)
    count = np.bincount(train.target, minlength=dataset.num_items).astype(np.float64)
    return (likes[target] + PRIOR * global_rate) / (count[target] + PRIOR)
  likes, count = _earlier_counts(train.target, label, train.timestamp)
  return (likes[samples] + PRIOR * global_rate) / (count[samples] + PRIOR)


def _earlier_counts(target, label, timestamp):
  """Per train sample, the liked and total train samples of its target before it."""
  order = np.lexsort((np.arange(len(target)), timestamp))
  t, y = target[order], label[order]
  # Group by item keeping time order (a stable sort), then an exclusive cumulative sum per group.
  by_item = np.argsort(t, kind="stable")
  t_sorted, y_sorted = t[by_item], y[by_item]
  first = np.r_[True, t_sorted[1:] != t_sorted[:-1]]
  group_start = np.maximum.accumulate(np.where(first, np.arange(len(t_sorted)), 0))
  cum_likes = np.cumsum(y_sorted) - y_sorted
  likes_sorted = cum_likes - cum_likes[group_start]
  count_sorted = np.arange(len(t_sorted)) - group_start
  likes, count = np.empty(len(target)), np.empty(len(target))
  likes[order[by_item]] = likes_sorted
  count[order[by_item]] = count_sorted
  return likes, count


def phrase(rate):
  """'liked by 64% of its earlier raters' for a rate in [0, 1]."""
  return f"liked by {int(round(100 * float(rate)))}% of its earlier raters"


def vocabulary_text():
  """Every word and number `phrase` can write, for word-level tokenizers."""
  return f"{phrase(0.0)} " + " ".join(str(p) for p in range(101))
