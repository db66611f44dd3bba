"""Recommendation with the tuned LLM, and how well its top n finds a user's liked items.

A user's known history is their timeline before their first test sample (`known_counts`; the
whole timeline for a user without one, or with until="end"). Candidates are the nearest items
of the mixed-vector index to the user's vector (`retrieval.candidates.user_vectors` of their
`index.recent` last known items) that the known history does not hold. Each (user, candidate)
pair is asked the CTR question of the fine-tune: the candidate as the target, its own K history
items retrieved from the known history by `retrieval.history.retrieve` (K, order and max_history
from the config), the prompt built by `prompts.render.build_examples` with the fine-tune's
wording, and P(yes) read by `evaluate.score_examples`; candidates rank by P(yes). A pair whose
user's first test sample is that item gets exactly the prompt, and so the P(yes), of that test
sample in the `evaluate` stage.

`Recommender` is the Python API on raw ids (as in the dataset files); the `recommend` stage
uses it, and `ranking_rows` for its metrics: most-popular, index order, LLM rerank and the
oracle ceiling of the candidates.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from rallrec_jax import config as config_lib
from rallrec_jax import data, workdir_model
from rallrec_jax.data.schema import Samples
from rallrec_jax.eval import blend, bootstrap, evaluate, metrics, weights as weights_lib
from rallrec_jax.prompts import render
from rallrec_jax.retrieval import candidates as candidates_lib
from rallrec_jax.retrieval import history, index as index_lib

SPLIT = "recommend"   # the name under which the (user, candidate) pairs are retrieved and rendered
UNTIL = ("valid", "test", "end")
ROWS = ("most_popular", "index", "llm_rerank", "blend", "oracle")


def known_counts(dataset, until="test"):
  """int64 [num_users]: how many of each user's first timeline rows are known: those before the
  user's first sample of the `until` split or a later one ("valid": before validation and test,
  "test": before test; all for a user without one), or all of them ("end")."""
  if until not in UNTIL:
    raise ValueError(f"until must be one of {UNTIL}, got {until!r}")
  count = np.diff(dataset.timelines.offsets).astype(np.int64)
  for split in UNTIL[UNTIL.index(until):-1]:
    found = dataset.splits.get(split)
    if found is not None and len(found.user):
      np.minimum.at(count, found.user.astype(np.int64), found.pos.astype(np.int64))
  return count


def seen_csr(dataset, known):
  """Each user's known items (a `retrieval.index.Csr`), oldest first."""
  t = dataset.timelines
  return index_lib.as_csr([t.item[t.offsets[u]:t.offsets[u] + known[u]]
                           for u in range(dataset.num_users)])


def train_likes(dataset):
  """float64 [num_items]: each item's liked train samples, the popularity of `most_popular`."""
  train = dataset.splits["train"]
  return np.bincount(train.target, weights=train.label.astype(np.float64),
                     minlength=dataset.num_items)


def most_popular(dataset, seen, users, n):
  """int64 [len(users), n]: the items with the most liked train samples (ties: more train
  samples, then the lower id), each user's known items left out; -1 pads short rows."""
  count = np.bincount(dataset.splits["train"].target, minlength=dataset.num_items)
  ranked = np.lexsort((np.arange(dataset.num_items), -count, -train_likes(dataset)))
  out = np.full((len(users), n), -1, np.int64)
  for row, user in enumerate(users):
    skip = seen.items[seen.offsets[user]:seen.offsets[user + 1]]
    kept = ranked[~np.isin(ranked, skip)][:n]
    out[row, :len(kept)] = kept
  return out


def oracle(candidates, offsets, items, n):
  """int64 [U, n]: each row's relevant candidates first (in candidate order), then the rest: the
  best any reranking of the candidates can do at n."""
  candidates = np.asarray(candidates, np.int64)
  out = np.empty((len(candidates), n), np.int64)
  for row, found in enumerate(candidates):
    relevant = np.isin(found, items[offsets[row]:offsets[row + 1]]) & (found >= 0)
    out[row] = np.concatenate([found[relevant], found[~relevant]])[:n]
  return out


def ranking_rows(rows, offsets, items, resamples=1000, seed=0):
  """{row name: {recall@n, ndcg@n, hit_rate@n, each with a 95% bootstrap CI over users
  (`..._ci`), users}} of each ranking [U, n] in `rows`; user u's relevant items are
  items[offsets[u]:offsets[u + 1]]. The users are resampled together across rows (paired)."""
  out = {}
  for name, ranked in rows.items():
    n = np.shape(ranked)[1]
    per_user, users = metrics.ranking_at_n(ranked, offsets, items)
    keys = ("recall", "ndcg", "hit_rate")
    cis = bootstrap.mean_cis(np.stack([per_user[k] for k in keys]), resamples, seed)
    out[name] = {"users": int(len(users))}
    for key, ci in zip(keys, cis):
      out[name][f"{key}@{n}"] = float(per_user[key].mean())
      out[name][f"{key}@{n}_ci"] = list(ci)
  return out


def by_score(candidates, scores):
  """(candidates, scores) of each row sorted by score, best first (ties keep the given order);
  -1 padding (score NaN) stays last."""
  order = np.argsort(np.where(candidates >= 0, -scores, np.inf), axis=1, kind="stable")
  return (np.take_along_axis(candidates, order, axis=1),
          np.take_along_axis(scores, order, axis=1))


def load_index(cfg, workdir, vectors):
  """The `index` stage's ScaNN index when it saved one, else the configured index built anew
  (exact search of a small catalogue takes no training)."""
  folder = Path(workdir) / "index" / "scann"
  if folder.is_dir():
    return index_lib.ScannIndex.load(folder)
  return index_lib.build(vectors, config_lib.index_config(cfg))


def _raw_ids(rows, kind):
  """{str(raw id): canonical id} of users.jsonl or items.jsonl rows."""
  out = {}
  for i, row in enumerate(rows):
    if str(row["raw_id"]) in out:
      raise ValueError(f"two {kind}s share the raw id {row['raw_id']!r}")
    out[str(row["raw_id"])] = i
  return out


class Recommender:
  """P(yes) of (user, item) pairs and top-n recommendations of the tuned LLM, on raw ids.

    rec = Recommender.from_workdir("workdirs/quickstart", checkpoint="best")
    rec.score("17", ["3", "42"])       # P(yes) per item, float64 [2]
    rec.recommend("17", n=10)          # [(raw item id, P(yes)), ...], best first
  """

  def __init__(self, cfg, dataset, lm, vectors, index, trained, step=None, until="test"):
    self.cfg, self.dataset, self.lm, self.vectors, self.index = cfg, dataset, lm, vectors, index
    self.trained, self.step, self.until = trained, step, until
    self.known = known_counts(dataset, until)
    self.seen = seen_csr(dataset, self.known)
    self._users, self._items = _raw_ids(dataset.users, "user"), _raw_ids(dataset.items, "item")

  @classmethod
  def from_workdir(cls, workdir, checkpoint="best", until="test", cfg=None):
    """The recommender of a workdir that has run the stages up to `index` and `finetune` (or
    `retrieve` for checkpoint="none", the zero-shot model). `checkpoint` is read as
    eval.checkpoint; `cfg` defaults to the workdir's config.json (the config of its last run)."""
    workdir = Path(workdir)
    if cfg is None:
      path = workdir / "config.json"
      if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the pipeline on {workdir} first, or "
                                f"pass cfg")
      cfg = config_lib.from_resolved(json.loads(path.read_text()))
    cfg = config_lib.apply_overrides(cfg, {"recommend.checkpoint": str(checkpoint)})
    config_lib.validate(cfg)
    dataset = data.load_dataset(workdir)
    lm = workdir_model.load_model(cfg, workdir, dataset)
    trained, step = weights_lib.restore_checkpoint(cfg, workdir, lm, str(checkpoint))
    vectors = np.load(workdir / "embeddings" / "mixed.npy")
    return cls(cfg, dataset, lm, vectors, load_index(cfg, workdir, vectors), trained, step,
               until)

  def at(self, until):
    """The same recommender (model, weights, index) with the known history cut at `until`."""
    if until == self.until:
      return self
    return Recommender(self.cfg, self.dataset, self.lm, self.vectors, self.index, self.trained,
                       self.step, until)

  def user_index(self, user_id):
    """The canonical id of a raw user id; ValueError naming it when unknown."""
    if str(user_id) not in self._users:
      raise ValueError(f"unknown user id {user_id!r} (not in data/users.jsonl)")
    return self._users[str(user_id)]

  def item_index(self, item_id):
    """The canonical id of a raw item id; ValueError naming it when unknown."""
    if str(item_id) not in self._items:
      raise ValueError(f"unknown item id {item_id!r} (not in data/items.jsonl)")
    return self._items[str(item_id)]

  def raw_item(self, item):
    return self.dataset.items[int(item)]["raw_id"]

  def examples(self, users, items):
    """Prompt-only examples of canonical (user, item) pairs, in pair order (module doc)."""
    users = np.asarray(users, np.int64)
    items = np.asarray(items, np.int64)
    pairs = Samples(user=users.astype(np.int32), pos=self.known[users].astype(np.int32),
                    target=items.astype(np.int32), rating=np.zeros(len(users), np.float32),
                    label=np.zeros(len(users), np.int8), timestamp=np.zeros(len(users), np.int64))
    dataset = dataclasses.replace(self.dataset, splits={**self.dataset.splits, SPLIT: pairs})
    cfg = self.cfg
    r = cfg.retrieval
    result = history.retrieve_configured(dataset, SPLIT, self.vectors, r, cfg.data.max_history)
    return render.build_examples(dataset, result, self.lm.tokenizer, split=SPLIT, labels=False,
                                 max_length=cfg.finetune.max_length, order=r.order,
                                 close=render.close_option(cfg.finetune, self.vectors),
                                 **render.wording(cfg.finetune))

  def score_pairs(self, users, items, progress=True):
    """P(yes) (float64) of canonical (user, item) pairs: the one scoring path of this module.

    With recommend.prefix_cache each user's prompts share one run of their common token
    prefix (`evaluate.score_groups`), else every prompt is scored whole (`score_examples`)."""
    if not len(users):
      return np.zeros(0)
    yes, no = self.lm.yes_no_tokens()
    examples = self.examples(users, items)
    options = dict(batch_size=self.cfg.eval.batch_size, progress=progress, **self.trained)
    if self.cfg.recommend.prefix_cache:
      logits = evaluate.score_groups(self.lm, examples, users, yes, no, **options)
    else:
      logits = evaluate.score_examples(self.lm, examples, yes, no, **options)
    return evaluate.p_yes(logits)

  def candidates(self, users, m, exclude_seen=True):
    """int64 [len(users), m]: the index's m nearest items to each user's vector, best first,
    without their known items when `exclude_seen`; -1 pads short rows."""
    users = np.asarray(users, np.int64)
    mine = index_lib.as_csr([self.seen.items[self.seen.offsets[u]:self.seen.offsets[u + 1]]
                             for u in users])
    queries = candidates_lib.user_vectors(self.vectors, mine, recent=self.cfg.index.recent)
    m = min(int(m), self.dataset.num_items)
    found, _ = self.index.search(queries, m, exclude=mine if exclude_seen else None)
    return np.asarray(found, np.int64)

  def candidate_scores(self, users, candidates, progress=True):
    """float64 [U, M]: P(yes) of each row's candidates for that row's user (NaN for -1)."""
    candidates = np.asarray(candidates, np.int64)
    filled = candidates >= 0
    scores = np.full(candidates.shape, np.nan)
    pair_users = np.broadcast_to(np.asarray(users, np.int64)[:, None], candidates.shape)
    scores[filled] = self.score_pairs(pair_users[filled], candidates[filled], progress)
    return scores

  def rerank(self, users, candidates, progress=True):
    """(items [U, M], P(yes) [U, M]): each row's candidates sorted by P(yes), best first (ties
    keep the index order); -1 padding stays last with score NaN."""
    candidates = np.asarray(candidates, np.int64)
    return by_score(candidates, self.candidate_scores(users, candidates, progress))

  def score(self, user_id, item_ids):
    """P(yes) (float64 [len(item_ids)]) of a raw user id for each raw item id."""
    user = self.user_index(user_id)
    items = np.array([self.item_index(i) for i in item_ids], np.int64)
    return self.score_pairs(np.full(len(items), user, np.int64), items, progress=False)

  def recommend(self, user_id, n=10, exclude_seen=True, weights=None):
    """The n best of the user's recommend.candidates index candidates (at least n) by P(yes),
    or with `weights` ({"llm": a, "index": b, "popularity": c}, e.g. the `blend.weights` the
    recommend stage chose in recommend/metrics.json) by that blend (`blend`):
    [(raw item id, P(yes)), ...], best first."""
    user = self.user_index(user_id)
    found = self.candidates([user], max(int(n), self.cfg.recommend.candidates), exclude_seen)
    scores = self.candidate_scores([user], found, progress=False)
    if weights is None:
      items, scores = by_score(found, scores)
    else:
      found_features = blend.features(found, scores, train_likes(self.dataset))
      columns = blend.order(found, found_features, blend.as_weights(weights))
      items = np.take_along_axis(found, columns, axis=1)
      scores = np.take_along_axis(scores, columns, axis=1)
    return [(self.raw_item(i), float(s)) for i, s in zip(items[0], scores[0]) if i >= 0][:n]


def evaluated_users(dataset, max_users, split="test"):
  """Users with a liked sample in `split` (ascending id), `max_users` of them spread over the
  list (0: all), and their liked items of that split (a Csr, one row per chosen user)."""
  samples = dataset.splits[split]
  liked = samples.label.astype(bool)
  user, target = samples.user[liked].astype(np.int64), samples.target[liked].astype(np.int64)
  order = np.lexsort((target, user))
  user, target = user[order], target[order]
  users = np.unique(user)
  users = users[evaluate.capped_rows(len(users), max_users, "spread")]
  start, end = np.searchsorted(user, users, "left"), np.searchsorted(user, users, "right")
  return users, index_lib.as_csr([np.unique(target[a:b]) for a, b in zip(start, end)])


def _ranked_period(rec, split, max_users, m):
  """(users, their liked `split` items, candidates [U, m], P(yes) [U, m] in candidate order)
  of a recommender whose known history is cut before `split` (`rec.at(split)`)."""
  users, relevant = evaluated_users(rec.dataset, max_users, split)
  if not len(users):
    raise ValueError(f"no user has a liked {split} sample, so there is nothing to recommend "
                     "against")
  found = rec.candidates(users, m)
  return users, relevant, found, rec.candidate_scores(users, found)


def _blend_weights(rec, likes, max_users, m, n):
  """(weights, summary) of the blend (`recommend.blend`) chosen on the users with a liked
  validation sample, their history cut before validation; `likes`: `train_likes`."""
  users, relevant, found, scores = _ranked_period(rec.at("valid"), "valid", max_users, m)
  found_features = blend.features(found, scores, likes)
  weights, table = blend.choose(found, found_features, relevant.offsets, relevant.items, n)
  return weights, {"weights": dict(zip(blend.FEATURES, weights)), "chosen_on": "valid",
                   "valid_users": int(len(users)), f"valid_ndcg@{n}": table}


def evaluate_recommendations(rec, max_users, m, n, resamples=1000, seed=0, blended=True):
  """(lists, metrics) of the `recommend` stage: each evaluated user's reranked candidates with
  their P(yes), and the rows' ranking metrics at n (`ranking_rows`), with `blended` the blend
  of weights chosen on validation users (`blend`), reported with the metrics."""
  likes = train_likes(rec.dataset)
  chosen = _blend_weights(rec, likes, max_users, m, n) if blended else None
  rec = rec.at("test")
  users, relevant, found, scores = _ranked_period(rec, "test", max_users, m)
  reranked, sorted_scores = by_score(found, scores)
  rows = {"most_popular": most_popular(rec.dataset, rec.seen, users, n),
          "index": found[:, :n], "llm_rerank": reranked[:, :n]}
  if chosen:
    found_features = blend.features(found, scores, likes)
    rows["blend"] = blend.rank(found, found_features, chosen[0])[:, :n]
  rows["oracle"] = oracle(found, relevant.offsets, relevant.items, n)
  table = ranking_rows(rows, relevant.offsets, relevant.items, resamples, seed)
  lists = [{"user": rec.dataset.users[u]["raw_id"],
            "items": [rec.raw_item(i) for i in row if i >= 0],
            "scores": [round(float(s), 6) for s in score[row >= 0]]}
           for u, row, score in zip(users, reranked, sorted_scores)]
  summary = {"n": n, "candidates": int(found.shape[1]), "users": int(len(users)),
             "step": rec.step, "rows": table}
  if chosen:
    summary["blend"] = chosen[1]
  return lists, summary
