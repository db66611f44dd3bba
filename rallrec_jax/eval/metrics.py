"""Binary classification metrics: AUC (tie-aware), log loss, accuracy."""
import numpy as np


def _ranks(scores):
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
  rank_sum = _ranks(scores)[labels].sum()
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


def checkpoint_label(checkpoint, step):
  """How a result names the weights it scored: 'best (step 256)', or 'none (zero-shot)'."""
  return f"{checkpoint} (zero-shot)" if step is None else f"{checkpoint} (step {step})"
