"""Metrics: binary classification (AUC, tie-aware; log loss; accuracy) and ranking (recall,
NDCG and hit rate at n)."""
import numpy as np


def ranks(scores):
  """1-based ranks with ties given their average rank."""
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], len(scores)]
  average = (starts + ends + 1) / 2.0
  ranks = np.empty(len(scores))
  ranks[order] = np.repeat(average, ends - starts)
  return ranks


def auc(labels, scores):
  """Area under the ROC curve (Mann-Whitney U); tied scores count one half."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  positives = int(labels.sum())
  negatives = len(labels) - positives
  if positives == 0 or negatives == 0:
    raise ValueError("AUC needs both positive and negative labels")
  rank_sum = ranks(scores)[labels].sum()
  return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def logloss(labels, probabilities, eps=1e-7):
  """Mean binary cross-entropy; probabilities are clipped to [eps, 1 - eps]."""
  labels = np.asarray(labels, np.float64)
  p = np.clip(np.asarray(probabilities, np.float64), eps, 1 - eps)
  return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def accuracy(labels, probabilities, threshold=0.5):
  return float(np.mean((np.asarray(probabilities) > threshold) == np.asarray(labels).astype(bool)))


def all_metrics(labels, probabilities):
  return {"auc": auc(labels, probabilities), "logloss": logloss(labels, probabilities),
          "acc": accuracy(labels, probabilities), "n": int(len(labels))}


def ranking_at_n(recommended, offsets, items):
  """Per-user recall@n, NDCG@n and hit rate@n (float64 arrays) of the users that have at least
  one relevant item, in user order, and those users' indices.

  `recommended` [num_users, n] ranks item ids best first (-1 pads short rows and never counts);
  user u's relevant ids are items[offsets[u]:offsets[u + 1]] (duplicates count once, negative
  ids never). Binary relevance: recall = hits / |relevant|; DCG = sum of 1 / log2(rank + 1) over
  the hits at ranks 1..n; the ideal DCG puts min(n, |relevant|) hits first; hit rate is 1 when
  any of the n is relevant.
  """
  recommended = np.asarray(recommended, np.int64)
  if recommended.ndim != 2:
    raise ValueError(f"recommended must be [num_users, n], got shape {recommended.shape}")
  offsets, items = np.asarray(offsets, np.int64), np.asarray(items, np.int64)
  num_users, n = recommended.shape
  if len(offsets) != num_users + 1:
    raise ValueError(f"expected {num_users} rows of relevant ids, got {len(offsets) - 1}")
  width = max(int(recommended.max(initial=0)), int(items.max(initial=0))) + 1
  user_of = np.repeat(np.arange(num_users, dtype=np.int64), np.diff(offsets))
  valid = items >= 0
  wanted = np.unique(user_of[valid] * width + items[valid])
  counts = np.bincount(wanted // width, minlength=num_users)
  rows = np.arange(num_users, dtype=np.int64)[:, None]
  hits = np.isin(rows * width + recommended, wanted) & (recommended >= 0)
  discounts = 1.0 / np.log2(np.arange(2, n + 2))
  ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(counts, n)]
  users = counts > 0
  if not users.any():
    raise ValueError("no user has a relevant item, so recall and NDCG are undefined")
  found = hits[users].sum(axis=1)
  return {"recall": found / counts[users], "ndcg": (hits[users] * discounts).sum(axis=1)
          / ideal[users], "hit_rate": (found > 0).astype(np.float64)}, np.flatnonzero(users)


def recall_ndcg_at_n(recommended, offsets, items):
  """(recall@n, NDCG@n) averaged over the users that have at least one relevant item
  (`ranking_at_n` defines them)."""
  per_user, _ = ranking_at_n(recommended, offsets, items)
  return float(per_user["recall"].mean()), float(per_user["ndcg"].mean())


def checkpoint_label(checkpoint, step):
  """How a result names the weights it scored: 'best (step 256)', or 'none (zero-shot)'."""
  return f"{checkpoint} (zero-shot)" if step is None else f"{checkpoint} (step {step})"
