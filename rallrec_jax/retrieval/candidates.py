"""Candidate generation: a vector per user, the unseen items nearest to it, and their quality.

A user's vector is built from their most recent items, which stand for their current taste;
an index (`index.build`) then returns the nearest items the user has not seen
(`eval.metrics.recall_ndcg_at_n` measures how many held-out relevant items they contain and how
high).
"""
import numpy as np

from rallrec_jax import numeric
from rallrec_jax.retrieval.index import as_csr


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
    sums[has] += numeric.unit_rows(items[csr.items[position[has]]])
  return numeric.unit_rows(sums)


def recommend(index, user_vecs, seen, n):
  """int32 [U, n]: each user's n nearest items that are not in `seen` (-1 pads short rows)."""
  return index.search(user_vecs, n, exclude=seen)[0]
