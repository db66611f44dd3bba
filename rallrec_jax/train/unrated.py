"""Unrated negatives for the fine-tune (`finetune.unrated`): prompts about items a user never
rated, answered "No", so that P(yes) also separates the items a user goes on to rate and like
from those they never rate, the question a top-n list asks (`eval/recommend.py`).

Each negative copies a pool sample's user, timeline position and timestamp (so its history,
user statistics and the target's earlier like-rate are those of that moment) and swaps the
target for a random one of the user's `candidates` nearest items by the mixed vectors (the mean
of their last `recent` items before that position, as the recommend stage's candidates) among
the items the user never rates in their whole timeline: hard negatives like the candidates the
model reranks, never a later positive.
"""
import numpy as np

from rallrec_jax import numeric
from rallrec_jax.data.schema import Samples
from rallrec_jax.prompts import item_stats
from rallrec_jax.retrieval import candidates as candidates_lib
from rallrec_jax.retrieval import index as index_lib

SPLIT = item_stats.UNRATED   # the name under which the negatives are retrieved and rendered


def samples(dataset, train_rows, vectors, *, candidates=50, recent=20, seed=0):
  """Samples of one unrated negative per train sample in `train_rows` (label 0, rating 0)."""
  train = dataset.splits["train"].take(np.asarray(train_rows, np.int64))
  t = dataset.timelines
  start, end = dataset.history_bounds(train)
  before = index_lib.as_csr([t.item[a:b] for a, b in zip(start, end)])
  queries = candidates_lib.user_vectors(vectors, before, recent=recent)
  scores = queries @ numeric.unit_rows(np.asarray(vectors, np.float32)).T
  rng = np.random.default_rng(seed)
  target = np.empty(len(train), np.int32)
  for row, user in enumerate(train.user):
    rated = t.item[t.offsets[user]:t.offsets[user + 1]]
    order = np.argsort(-scores[row], kind="stable")
    unrated = order[~np.isin(order, rated)][:candidates]
    if not len(unrated):
      raise ValueError(f"user {int(user)} rated every item, so there is no unrated negative")
    target[row] = unrated[rng.integers(len(unrated))]
  return Samples(user=train.user, pos=train.pos, target=target,
                 rating=np.zeros(len(train), np.float32), label=np.zeros(len(train), np.int8),
                 timestamp=train.timestamp)
