"""A blended reranking of each user's candidates: a weighted sum of per-row rank scores of the
LLM's P(yes), the index order and the items' popularity, its weights chosen on held-out users.

P(yes) answers "would the user like this item, given they rate it", the question the CTR
fine-tune asks; a top-n list is judged on items the user goes on to rate and like, which also
depends on how likely the item is to be rated at all (how popular it is, how near the user's
recent items). Each feature is turned into a rank score within its row (1 = the row's best,
0 = its worst, ties share their mean), so the weights mean the same whatever the features'
scales; the weights are the point of a simplex grid with the best mean NDCG@n on the users they
are chosen on (`choose`), never on the users they are reported on.
"""
import itertools

import numpy as np

from rallrec_jax.eval import metrics

FEATURES = ("llm", "index", "popularity")


def row_ranks(scores, filled):
  """float64 [U, M]: each row's scores as rank scores in [0, 1] (higher score, higher rank;
  ties share their mean rank) over the `filled` entries; NaN where not filled."""
  scores = np.asarray(scores, np.float64)
  out = np.full(scores.shape, np.nan)
  for row in range(len(scores)):
    keep = np.flatnonzero(filled[row])
    if len(keep) == 1:
      out[row, keep] = 1.0
    elif len(keep) > 1:
      out[row, keep] = (metrics.ranks(scores[row, keep]) - 1) / (len(keep) - 1)
  return out


def grid(step=0.25):
  """The weight vectors (one weight per feature of FEATURES, each a multiple of `step`, summing
  to 1), the pure LLM first."""
  count = round(1 / step)
  if not np.isclose(count * step, 1.0):
    raise ValueError(f"step must divide 1, got {step}")
  points = [tuple(w * step for w in (a, b, count - a - b))
            for a, b in itertools.product(range(count, -1, -1), range(count + 1))
            if a + b <= count]
  return points


def features(candidates, p_yes, popularity):
  """{feature: rank scores [U, M]} of candidates [U, M] (index order, -1 padding), their P(yes)
  [U, M] and the items' popularity [num_items]."""
  candidates = np.asarray(candidates, np.int64)
  filled = candidates >= 0
  position = np.broadcast_to(-np.arange(candidates.shape[1], dtype=np.float64), candidates.shape)
  popular = np.where(filled, np.asarray(popularity, np.float64)[np.maximum(candidates, 0)], 0.0)
  return {"llm": row_ranks(p_yes, filled), "index": row_ranks(position, filled),
          "popularity": row_ranks(popular, filled)}


def order(candidates, found, weights):
  """int64 [U, M]: the column order that sorts each row's candidates by the weighted sum of the
  feature rank scores `found` (`features`), best first; ties keep the index order and -1
  padding stays last."""
  candidates = np.asarray(candidates, np.int64)
  score = sum(w * found[name] for name, w in zip(FEATURES, weights))
  return np.argsort(-np.where(candidates >= 0, score, -np.inf), axis=1, kind="stable")


def rank(candidates, found, weights):
  """int64 [U, M]: each row's candidates in `order`."""
  candidates = np.asarray(candidates, np.int64)
  return np.take_along_axis(candidates, order(candidates, found, weights), axis=1)


def as_weights(weights):
  """The weight tuple (FEATURES' order) of a {feature: weight} dict such as the recommend
  stage's chosen `blend.weights`; features left out weigh 0. ValueError on an unknown feature,
  a negative weight or all zero."""
  unknown = sorted(set(weights) - set(FEATURES))
  if unknown:
    raise ValueError(f"unknown blend feature {unknown[0]!r}; the features are {FEATURES}")
  out = tuple(float(weights.get(name, 0.0)) for name in FEATURES)
  if min(out) < 0 or not sum(out) > 0:
    raise ValueError(f"blend weights must be >= 0 and not all 0, got {dict(weights)}")
  return out


def choose(candidates, found, offsets, items, n, points=None):
  """(the weights of `points` (default `grid()`) whose ranking has the best mean NDCG@n
  against each row's relevant items items[offsets[u]:offsets[u + 1]], {weights as text: mean
  NDCG@n}); ties go to the earlier point."""
  points = grid() if points is None else points
  table = {}
  for weights in points:
    per_user, _ = metrics.ranking_at_n(rank(candidates, found, weights)[:, :n], offsets, items)
    table[weights] = float(per_user["ndcg"].mean())
  best = max(points, key=lambda w: (table[w], -points.index(w)))
  return best, {label(w): v for w, v in table.items()}


def label(weights):
  """'llm 0.50 index 0.25 popularity 0.25'."""
  return " ".join(f"{name} {w:.2f}" for name, w in zip(FEATURES, weights))
