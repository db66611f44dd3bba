"""Candidate generation: a vector per user, the unseen items nearest to it, and their quality.

A user's vector is built from their most recent items, which stand for their current taste;
an index (`index.build`) then returns the nearest items the user has not seen, and recall and
NDCG measure how many held-out relevant items those candidates contain and how high.
"""
import numpy as np

from rallrec_jax.retrieval.index import as_csr, normalize_rows


def user_vectors(item_vectors, histories, recent=20):
  """float32 [U, d]: the normalised mean of each user's last `recent` normalised item vectors.

  `histories` holds each user's item ids oldest first (a `Csr` or one array per user).
  Normalising every item first keeps a few long vectors from dominating the mean; a user with
  an empty history gets the zero vector, which scores 0 against every item.
  """
  if not isinstance(recent, (int, np.integer)) or isinstance(recent, bool) or recent < 1:
    raise ValueError(f"recent must be an int >= 1, got {recent!r}")
  items = np.asarray(item_vectors, np.float32)
  csr = as_csr(histories)
  if len(csr.items) and (csr.items.min() < 0 or csr.items.max() >= len(items)):
    raise ValueError(f"history item ids must lie in [0, {len(items)})")
  ends = csr.offsets[1:]
  starts = np.maximum(csr.offsets[:-1], ends - recent)
  sums = np.zeros((len(ends), items.shape[1]), np.float32)
  for step in range(recent):
    position = starts + step
    has = position < ends
    sums[has] += normalize_rows(items[csr.items[position[has]]])
  return normalize_rows(sums)


def recommend(index, user_vecs, seen, n):
  """int32 [U, n]: each user's n nearest items that are not in `seen` (-1 pads short rows)."""
  return index.search(user_vecs, n, exclude=seen)[0]


def recall_ndcg_at_n(recommended, relevant):
  """(recall@n, NDCG@n) averaged over the users that have at least one relevant item.

  Binary relevance: recall = hits / |relevant|; DCG = sum of 1 / log2(rank + 1) over the hits
  at ranks 1..n; the ideal DCG puts min(n, |relevant|) hits first. Duplicate relevant ids count
  once; negative ids (-1 pads recommendations) never count.
  """
  recommended = np.asarray(recommended, np.int64)
  if recommended.ndim != 2:
    raise ValueError(f"recommended must be [num_users, n], got shape {recommended.shape}")
  num_users, n = recommended.shape
  rel = as_csr(relevant, num_users)
  width = max(int(recommended.max(initial=0)), int(rel.items.max(initial=0))) + 1
  user_of = np.repeat(np.arange(num_users, dtype=np.int64), np.diff(rel.offsets))
  valid = rel.items >= 0
  wanted = np.unique(user_of[valid] * width + rel.items[valid])
  counts = np.bincount(wanted // width, minlength=num_users)
  rows = np.arange(num_users, dtype=np.int64)[:, None]
  hits = np.isin(rows * width + recommended, wanted) & (recommended >= 0)
  discounts = 1.0 / np.log2(np.arange(2, n + 2))
  ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(counts, n)]
  users = counts > 0
  if not users.any():
    raise ValueError("no user has a relevant item, so recall and NDCG are undefined")
  recall = hits[users].sum(axis=1) / counts[users]
  ndcg = (hits[users] * discounts).sum(axis=1) / ideal[users]
  return float(recall.mean()), float(ndcg.mean())
