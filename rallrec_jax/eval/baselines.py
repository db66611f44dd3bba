"""Non-LLM baselines scored on the rows the LLM is evaluated on, fitted on the train split only.

  item_like_rate       the target item's like-rate over the train samples, smoothed towards the
                       global train like-rate: (likes + PRIOR * rate) / (count + PRIOR), as
                       `finetune.item_stats` states it (`rallrec_jax.prompts.item_stats`).
  user_like_rate       the share of the sample's retrieved history items (the K items of its
                       prompt, `retrieval/{split}.npz`) that the user liked (rating above the
                       dataset's label threshold); the global train like-rate when it has none.
  user_mean_rating     the mean rating of those items; the global train mean rating when none.
                       Not a probability: only its AUC is reported (log loss and accuracy None).
  logistic_regression  the three features above, standardised, into a logistic regression
                       fitted on at most FIT_SAMPLES train samples (a seeded random subset).

A run whose prompts state more (`EXTRA`) is compared with baselines that read it too:

  user_lifetime_like_rate    (`finetune.user_lifetime_stats`) the user's like-rate over every
  user_lifetime_mean_rating  rating before the sample, and their mean rating
  user_genre_mean_rating     (`finetune.genres`) the mean rating of the shown items that share a
                             genre with the target; the global train mean rating when none do
  item_popularity_level      (`finetune.item_popularity`) the target's popularity level (0-9) as
                             the prompt states it
  user_close_mean_rating     (`finetune.mark_close`) the mean rating of the shown items the
                             prompt marks as close to the target; the global train mean rating
                             when it marks none
  logistic_regression_all    the regression on the three features and all of these

The history features count every retrieved item, including any a prompt dropped to fit
finetune.max_length. The regression's training rows use leave-one-out item like-rates (their
own label taken out of their item's counts), so the coefficient of the item feature is not
inflated by seeing each row's answer; the scored rows use the full train counts. Nothing is
read from the validation or test labels.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rallrec_jax import atomic
from rallrec_jax.eval import bootstrap, metrics, results
from rallrec_jax.prompts import item_stats, render, user_lifetime
from rallrec_jax.retrieval import history

FIT_SAMPLES = 4000  # train samples the logistic regression is fitted on (fast, and plenty for 3)
SEED = 0            # chooses those samples and seeds the bootstrap
RESAMPLES = 1000    # bootstrap resamples of the AUC and AUC-difference CIs
TITLES = {"item_like_rate": "item like-rate", "user_like_rate": "user like-rate",
          "user_mean_rating": "user mean rating", "logistic_regression": "logistic regression",
          "user_lifetime_like_rate": "user like-rate (all earlier ratings)",
          "user_lifetime_mean_rating": "user mean rating (all earlier ratings)",
          "user_genre_mean_rating": "user mean rating (shown items of the target's genres)",
          "item_popularity_level": "item popularity level",
          "user_close_mean_rating": "user mean rating (shown items marked close)",
          "logistic_regression_all": "logistic regression on every feature above"}
PROBABILITIES = ("item_like_rate", "user_like_rate", "logistic_regression",
                 "user_lifetime_like_rate", "logistic_regression_all")
# finetune wording key -> the baseline features it adds (`_extra_features`).
EXTRA = {"user_lifetime_stats": ("user_lifetime_like_rate", "user_lifetime_mean_rating"),
         "genres": ("user_genre_mean_rating",), "item_popularity": ("item_popularity_level",),
         "mark_close": ("user_close_mean_rating",)}
SUFFIX = results.BASELINES_SUFFIX  # eval/{checkpoint}/{split}_baselines.json
_EXTRA_ONLY = {n for ns in EXTRA.values() for n in ns} | {"logistic_regression_all"}



def names(extra=()):
  """The baselines a run scores whose wording keys `extra` are on, in `TITLES`' order."""
  more = {name for key in extra for name in EXTRA.get(key, ())}
  if more:
    more.add("logistic_regression_all")
  return [name for name in TITLES if name not in _EXTRA_ONLY or name in more]


@dataclasses.dataclass
class Fitted:
  """What the baselines learned from the train split."""
  item_likes: np.ndarray   # [num_items] liked train samples of each target item
  item_count: np.ndarray   # [num_items] train samples of each target item
  like_rate: float         # share of liked train samples
  mean_rating: float       # mean rating of the train samples
  threshold: float         # rating above which an item is liked
  model: object            # sklearn pipeline: StandardScaler, LogisticRegression
  extra: tuple = ()         # EXTRA keys whose features join the baselines
  extra_model: object = None  # the regression on the three features and the extra ones
  close: tuple = None       # `render.close_option` of the run's prompts (for mark_close)

  def item_rate(self, items):
    """Smoothed train like-rate of each item."""
    return item_stats.smoothed(self.item_likes[items], self.item_count[items], self.like_rate)


def _history_features(dataset, split, result, like_rate, mean_rating, threshold):
  """(user_like_rate, user_mean_rating) [N] of each row of a `retrieve` result."""
  ratings = render.history_ratings(dataset, split, result)
  shown = ~np.isnan(ratings)
  count = shown.sum(axis=1)
  liked = (shown & (np.nan_to_num(ratings) > threshold)).sum(axis=1)
  total = np.where(shown, ratings, 0.0).sum(axis=1)
  some = count > 0
  safe = np.maximum(count, 1)
  return (np.where(some, liked / safe, like_rate), np.where(some, total / safe, mean_rating))


def _lifetime_features(dataset, split, samples, like_rate, mean_rating, threshold):
  """(like-rate, mean rating) [N] over each sample's earlier ratings; the train-wide values for a
  user with none."""
  count, liked, mean = user_lifetime.counts(dataset, split, samples, threshold)
  some = count > 0
  return (np.where(some, liked / np.maximum(count, 1), like_rate),
          np.where(some, np.nan_to_num(mean), mean_rating))


def _genre_shared(dataset, rows):
  """[N, K] bool: which shown items share a genre with their row's target."""
  names = sorted({g for item in dataset.items for g in item.get("genres", [])})
  index = {g: j for j, g in enumerate(names)}
  member = np.zeros((dataset.num_items, max(len(names), 1)), bool)
  for i, item in enumerate(dataset.items):
    member[i, [index[g] for g in item.get("genres", [])]] = True
  history_items = np.asarray(rows["history"], np.int64)
  return (history_items >= 0) & (member[np.maximum(history_items, 0)]
                                 & member[np.asarray(rows["target"])][:, None, :]).any(-1)


def _mean_rating_of(dataset, split, rows, chosen, mean_rating):
  """[N] mean rating of each row's shown items where `chosen` [N, K]; `mean_rating` where none."""
  ratings = render.history_ratings(dataset, split, rows)
  count = chosen.sum(axis=1)
  total = np.where(chosen, np.nan_to_num(ratings), 0.0).sum(axis=1)
  return np.where(count > 0, total / np.maximum(count, 1), mean_rating)


def _extra_features(fitted, dataset, split, rows):
  """{name: [N]} of the EXTRA features of `fitted.extra`, in EXTRA's order."""
  out = {}
  if "user_lifetime_stats" in fitted.extra:
    rate, mean = _lifetime_features(dataset, split, rows["sample"], fitted.like_rate,
                                    fitted.mean_rating, fitted.threshold)
    out.update(user_lifetime_like_rate=rate, user_lifetime_mean_rating=mean)
  if "genres" in fitted.extra:
    out["user_genre_mean_rating"] = _mean_rating_of(dataset, split, rows,
                                                    _genre_shared(dataset, rows),
                                                    fitted.mean_rating)
  if "item_popularity" in fitted.extra:
    out["item_popularity_level"] = item_stats.popularity_levels(
        dataset, split, rows["sample"]).astype(np.float64)
  if "mark_close" in fitted.extra:
    out["user_close_mean_rating"] = _mean_rating_of(
        dataset, split, rows, render.close_marks(fitted.close, rows["history"], rows["target"]),
        fitted.mean_rating)
  return out


def _regression(features, y):
  model = make_pipeline(StandardScaler(), LogisticRegression())
  return model.fit(np.stack(features, axis=1), y.astype(np.int64))


def fit(dataset, train_result, fit_samples=FIT_SAMPLES, seed=SEED, extra=(), close=None):
  """Fitted baselines from the train split's samples and its retrieval result; `extra` (EXTRA
  keys, the wording keys a run's prompts use) adds their features and a regression on all;
  "mark_close" among them needs the prompts' `close` (`render.close_option`)."""
  if "mark_close" in extra and close is None:
    raise ValueError("the mark_close baseline needs the prompts' close option (vectors, threshold)")
  train = dataset.splits["train"]
  label = train.label.astype(np.float64)
  likes, count, like_rate = item_stats.train_counts(dataset)
  mean_rating, threshold = float(train.rating.mean()), float(dataset.meta["label_threshold"])
  chosen = np.sort(np.random.default_rng(seed).permutation(len(train))[:fit_samples])
  rows = history.take(train_result, chosen)
  target, y = train.target[chosen], label[chosen]
  item = item_stats.smoothed(likes[target] - y, count[target] - 1, like_rate)
  user = _history_features(dataset, "train", rows, like_rate, mean_rating, threshold)
  fitted = Fitted(likes, count, like_rate, mean_rating, threshold, _regression([item, *user], y),
                  tuple(k for k in EXTRA if k in extra), close=close)
  if fitted.extra:
    more = _extra_features(fitted, dataset, "train", rows)
    fitted.extra_model = _regression([item, *user, *more.values()], y)
  return fitted


def scores(fitted, dataset, split, result, samples):
  """{baseline name: [N] float64 scores} of the given sample indices of `split`."""
  rows = history.take(result, np.asarray(samples, np.int64))
  item = fitted.item_rate(dataset.splits[split].target[rows["sample"]])
  user_rate, user_mean = _history_features(dataset, split, rows, fitted.like_rate,
                                          fitted.mean_rating, fitted.threshold)
  features = np.stack([item, user_rate, user_mean], axis=1)
  out = {"item_like_rate": item, "user_like_rate": user_rate, "user_mean_rating": user_mean,
         "logistic_regression": fitted.model.predict_proba(features)[:, 1]}
  if fitted.extra:
    more = _extra_features(fitted, dataset, split, rows)
    out.update(more)
    out["logistic_regression_all"] = fitted.extra_model.predict_proba(
        np.concatenate([features, np.stack(list(more.values()), axis=1)], axis=1))[:, 1]
  return out


def compare(labels, llm_scores, baseline_scores, resamples=RESAMPLES, seed=SEED):
  """{name: metrics of the baseline, its AUC CI, and AUC(LLM) - AUC(baseline) with a paired CI}.

  Metrics are `metrics.all_metrics` (log loss and accuracy None for scores that are not
  probabilities); CIs are 95% percentile intervals over bootstrap resamples shared by the LLM
  and every baseline; `spearman_llm` is the rank correlation of the baseline's scores with the
  LLM's.
  """
  names = list(baseline_scores)
  stacked = np.stack([llm_scores] + [baseline_scores[n] for n in names])
  aucs = bootstrap.resample_aucs(labels, stacked, resamples, seed)
  llm_auc = metrics.auc(labels, llm_scores)
  out = {}
  for i, name in enumerate(names, start=1):
    entry = (metrics.all_metrics(labels, stacked[i]) if name in PROBABILITIES else
             {"auc": metrics.auc(labels, stacked[i]), "logloss": None, "acc": None,
              "n": len(labels)})
    out[name] = {**entry, "auc_ci": list(bootstrap.percentile_ci(aucs[i])),
                 "auc_diff": llm_auc - entry["auc"],
                 "auc_diff_ci": list(bootstrap.percentile_ci(aucs[0] - aucs[i])),
                 "spearman_llm": float(spearmanr(stacked[0], stacked[i]).statistic)}
  return out


def path(folder, split):
  """{split}_baselines.json in `folder`, the results folder of one checkpoint (eval/best)."""
  return Path(folder) / f"{split}{SUFFIX}.json"


def write(folder, split, table):
  """Write `compare`'s table to {split}_baselines.json in results `folder` atomically."""
  atomic.write_text(path(folder, split), json.dumps(table, indent=2) + "\n")
