"""Non-LLM baselines: scores against loop recomputations, no leakage, the comparison table."""
import copy
import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from rallrec_jax import config as config_lib
from rallrec_jax import data
from rallrec_jax.eval import baselines
from rallrec_jax.prompts import item_stats, render, user_lifetime

K = 6
FIT = 300


@pytest.fixture(scope="module")
def dataset():
  c = config_lib.base_config().data
  c.synthetic.num_users, c.synthetic.num_items, c.synthetic.num_ratings = 60, 80, 2400
  return data.prepare(c)


def random_retrieval(ds, split, seed):
  """Up to K history items of each sample at random positions of its history, in random order,
  -1 padded; the first sample gets none."""
  rng = np.random.default_rng(seed)
  samples = ds.splits[split]
  start, end = ds.history_bounds(samples)
  history = np.full((len(samples), K), -1, np.int32)
  for i in range(1, len(samples)):
    picked = rng.permutation(np.arange(start[i], end[i]))[:rng.integers(1, K + 1)]
    history[i, :len(picked)] = ds.timelines.item[picked]
  return {"sample": np.arange(len(samples)), "user": samples.user, "target": samples.target,
          "history": history}


def loop_item_rates(ds, items):
  train = ds.splits["train"]
  likes, count = {}, {}
  for target, label in zip(train.target.tolist(), train.label.tolist()):
    likes[target] = likes.get(target, 0) + label
    count[target] = count.get(target, 0) + 1
  rate = sum(train.label.tolist()) / len(train)
  return [(likes.get(i, 0) + item_stats.PRIOR * rate) / (count.get(i, 0) + item_stats.PRIOR)
          for i in items]


def loop_history(ds, split, result, rows):
  """(like-rate, mean rating) of each row's history items, each item's rating its user's latest
  rating of it before the sample, looked up by scanning the timeline."""
  train, samples, t = ds.splits["train"], ds.splits[split], ds.timelines
  threshold = ds.meta["label_threshold"]
  out = []
  for r in rows:
    i = result["sample"][r]
    first = t.offsets[samples.user[i]]
    ratings = []
    for item in result["history"][r].tolist():
      if item < 0:
        continue
      latest = [row for row in range(first, first + samples.pos[i]) if t.item[row] == item][-1]
      ratings.append(float(t.rating[latest]))
    if ratings:
      out.append((sum(x > threshold for x in ratings) / len(ratings), sum(ratings) / len(ratings)))
    else:
      out.append((float(train.label.mean()), float(train.rating.mean())))
  return np.array(out)


def test_scores_match_loop_recomputation(dataset):
  train_result = random_retrieval(dataset, "train", seed=0)
  fitted = baselines.fit(dataset, train_result, fit_samples=FIT, seed=3)
  result = random_retrieval(dataset, "test", seed=1)
  samples = np.array([5, 0, 17, 2, len(result["sample"]) - 1])
  got = baselines.scores(fitted, dataset, "test", result, samples)
  targets = dataset.splits["test"].target[samples]
  np.testing.assert_allclose(got["item_like_rate"], loop_item_rates(dataset, targets), rtol=1e-12)
  expected = loop_history(dataset, "test", result, samples)
  np.testing.assert_allclose(got["user_like_rate"], expected[:, 0], rtol=1e-12)
  np.testing.assert_allclose(got["user_mean_rating"], expected[:, 1], rtol=1e-12)
  assert got["user_like_rate"][1] == pytest.approx(dataset.splits["train"].label.mean())

  # The regression: fitted here on features recomputed by loops, leave-one-out item rates.
  x, y = loop_train_features(dataset, train_result, seed=3)
  z = np.column_stack([got["item_like_rate"], got["user_like_rate"], got["user_mean_rating"]])
  np.testing.assert_allclose(got["logistic_regression"], loop_regression(x, y, z), rtol=1e-6)


def loop_train_features(ds, train_result, seed):
  """(features [FIT, 3], labels) of the train rows the regression is fitted on, by loops."""
  train = ds.splits["train"]
  chosen = np.sort(np.random.default_rng(seed).permutation(len(train))[:FIT])
  rate = train.label.mean()
  loo = []
  for i in chosen:
    same = [j for j in range(len(train)) if train.target[j] == train.target[i] and j != i]
    loo.append((train.label[same].sum() + item_stats.PRIOR * rate) / (len(same) + item_stats.PRIOR))
  x = np.column_stack([loo, loop_history(ds, "train", train_result, chosen)])
  return x, train.label[chosen]


def loop_regression(x, y, z):
  """P(like) of rows `z` from a logistic regression on standardised `x`."""
  mean, sd = x.mean(0), x.std(0)
  return LogisticRegression().fit((x - mean) / sd, y).predict_proba((z - mean) / sd)[:, 1]


def test_fit_reads_no_validation_or_test_label(dataset):
  train_result = random_retrieval(dataset, "train", seed=0)
  before = baselines.fit(dataset, train_result)
  changed = copy.deepcopy(dataset)
  t = changed.timelines
  for split in ("valid", "test"):
    s = changed.splits[split]
    s.label[:] = 1 - s.label
    s.rating[:] = 6.0 - s.rating
    t.rating[t.offsets[s.user] + s.pos] = s.rating
  after = baselines.fit(changed, train_result)
  for name in ("item_likes", "item_count"):
    np.testing.assert_array_equal(getattr(before, name), getattr(after, name))
  assert (before.like_rate, before.mean_rating) == (after.like_rate, after.mean_rating)
  for step in (0, 1):
    for name, value in vars(before.model[step]).items():
      if isinstance(value, np.ndarray):
        np.testing.assert_array_equal(value, getattr(after.model[step], name), err_msg=name)
  assert before.model[1].coef_.any()
  # The test scores see the changed test ratings of earlier test targets, never their labels.
  result = random_retrieval(changed, "test", seed=1)
  rows = np.arange(len(result["sample"]))
  np.testing.assert_array_equal(baselines.scores(before, dataset, "test", result, rows)[
      "item_like_rate"], baselines.scores(after, changed, "test", result, rows)["item_like_rate"])


def test_compare_metrics_and_paired_differences(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 400)
  llm = 1 / (1 + np.exp(-(labels - 0.5 + rng.normal(0, 1, 400))))
  found = {"item_like_rate": rng.random(400), "user_mean_rating": 1 + 4 * rng.random(400),
           "logistic_regression": llm}
  table = baselines.compare(labels, llm, found, resamples=200)
  for name, scores in found.items():
    entry = table[name]
    assert entry["n"] == 400
    assert entry["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert entry["auc_diff"] == pytest.approx(roc_auc_score(labels, llm)
                                              - roc_auc_score(labels, scores), abs=1e-12)
    assert entry["auc_ci"][0] <= entry["auc"] <= entry["auc_ci"][1]
    assert entry["auc_diff_ci"][0] <= entry["auc_diff"] <= entry["auc_diff_ci"][1]
  assert table["item_like_rate"]["logloss"] == pytest.approx(
      log_loss(labels, found["item_like_rate"]), abs=1e-9)
  assert table["user_mean_rating"]["logloss"] is None and table["user_mean_rating"]["acc"] is None
  assert table["logistic_regression"]["auc_diff_ci"] == [0.0, 0.0]
  assert table["item_like_rate"]["auc_diff_ci"][0] > 0  # random scores: the LLM is better
  # Rank correlation with the LLM, against a loop over ranks (no ties in continuous scores).
  def ranks(x):
    return np.argsort(np.argsort(x)).astype(np.float64)
  for name, scores in found.items():
    expected = np.corrcoef(ranks(llm), ranks(scores))[0, 1]
    assert table[name]["spearman_llm"] == pytest.approx(expected, abs=1e-12)
  assert table["logistic_regression"]["spearman_llm"] == pytest.approx(1.0)
  assert abs(table["item_like_rate"]["spearman_llm"]) < 0.15
  baselines.write(tmp_path / "best", "test", table)
  assert json.loads((tmp_path / "best" / "test_baselines.json").read_text()) == table


def loop_lifetime(ds, split, samples):
  """(count, liked, mean) of every rating before each sample, by scanning its user's timeline."""
  s, t = ds.splits[split], ds.timelines
  threshold = ds.meta["label_threshold"]
  out = []
  for i in samples:
    first = t.offsets[s.user[i]]
    ratings = [float(t.rating[row]) for row in range(first, first + s.pos[i])]
    out.append((len(ratings), sum(r > threshold for r in ratings),
                sum(ratings) / len(ratings) if ratings else np.nan))
  return np.array(out)


def test_lifetime_counts_and_baselines_match_loops(dataset):
  samples = np.array([0, 3, 40, len(dataset.splits["test"]) - 1])
  count, liked, mean = user_lifetime.counts(dataset, "test", samples,
                                            dataset.meta["label_threshold"])
  expected = loop_lifetime(dataset, "test", samples)
  np.testing.assert_array_equal(count, expected[:, 0])
  np.testing.assert_array_equal(liked, expected[:, 1])
  np.testing.assert_allclose(mean, expected[:, 2], rtol=1e-12)
  assert (count > 5).all()  # test samples have long histories: more than the K shown items

  train_result = random_retrieval(dataset, "train", seed=0)
  plain = baselines.fit(dataset, train_result, fit_samples=FIT, seed=3)
  fitted = baselines.fit(dataset, train_result, fit_samples=FIT, seed=3,
                         extra=("user_lifetime_stats",))
  result = random_retrieval(dataset, "test", seed=1)
  without = baselines.scores(plain, dataset, "test", result, samples)
  got = baselines.scores(fitted, dataset, "test", result, samples)
  assert set(got) - set(without) == {"user_lifetime_like_rate", "user_lifetime_mean_rating",
                                      "logistic_regression_all"}
  assert list(without) == baselines.names()
  assert sorted(got) == sorted(baselines.names(("user_lifetime_stats",)))
  for name in without:  # the three-feature rows do not change
    np.testing.assert_array_equal(got[name], without[name])
  np.testing.assert_allclose(got["user_lifetime_like_rate"], expected[:, 1] / expected[:, 0],
                             rtol=1e-12)
  np.testing.assert_allclose(got["user_lifetime_mean_rating"], expected[:, 2], rtol=1e-12)
  # The five-feature regression, refitted here on loop-recomputed features.
  x, y = loop_train_features(dataset, train_result, seed=3)
  train = dataset.splits["train"]
  chosen = np.sort(np.random.default_rng(3).permutation(len(train))[:FIT])
  whole = loop_lifetime(dataset, "train", chosen)
  some = whole[:, 0] > 0
  extra = np.column_stack([
      np.where(some, whole[:, 1] / np.maximum(whole[:, 0], 1), train.label.mean()),
      np.where(some, np.nan_to_num(whole[:, 2]), train.rating.mean())])
  z = np.column_stack([got["item_like_rate"], got["user_like_rate"], got["user_mean_rating"],
                       got["user_lifetime_like_rate"], got["user_lifetime_mean_rating"]])
  np.testing.assert_allclose(got["logistic_regression_all"],
                             loop_regression(np.column_stack([x, extra]), y, z), rtol=1e-6)


def test_genre_baseline_reads_the_shown_items_sharing_a_genre_with_the_target(dataset):
  train_result = random_retrieval(dataset, "train", seed=0)
  fitted = baselines.fit(dataset, train_result, fit_samples=FIT, seed=3,
                         extra=("genres", "user_lifetime_stats"))
  assert fitted.extra == ("user_lifetime_stats", "genres")
  result = random_retrieval(dataset, "test", seed=1)
  samples = np.arange(len(result["sample"]))
  got = baselines.scores(fitted, dataset, "test", result, samples)
  assert sorted(got) == sorted(baselines.names(("genres", "user_lifetime_stats")))
  items, t, split = dataset.items, dataset.timelines, dataset.splits["test"]
  expected = []
  for r in samples:
    i = result["sample"][r]
    first = t.offsets[split.user[i]]
    wanted = set(items[split.target[i]]["genres"])
    ratings = []
    for item in result["history"][r].tolist():
      if item >= 0 and wanted & set(items[item]["genres"]):
        rows = [row for row in range(first, first + split.pos[i]) if t.item[row] == item]
        ratings.append(float(t.rating[rows[-1]]))
    expected.append(np.mean(ratings) if ratings else dataset.splits["train"].rating.mean())
  np.testing.assert_allclose(got["user_genre_mean_rating"], expected, rtol=1e-12)
  assert len(set(expected)) > 2
  # The regression reads all six features, in EXTRA's order.
  z = np.column_stack([got[k] for k in ("item_like_rate", "user_like_rate", "user_mean_rating",
                                        "user_lifetime_like_rate", "user_lifetime_mean_rating",
                                        "user_genre_mean_rating")])
  np.testing.assert_allclose(got["logistic_regression_all"],
                             fitted.extra_model.predict_proba(z)[:, 1], rtol=1e-12)
  assert fitted.extra_model[0].n_features_in_ == 6


def test_popularity_baseline_reads_the_level_the_prompt_states(dataset):
  train_result = random_retrieval(dataset, "train", seed=0)
  fitted = baselines.fit(dataset, train_result, fit_samples=FIT, seed=3,
                         extra=("item_popularity",))
  result = random_retrieval(dataset, "test", seed=1)
  samples = np.arange(len(result["sample"]))
  got = baselines.scores(fitted, dataset, "test", result, samples)
  assert sorted(got) == sorted(baselines.names(("item_popularity",)))
  assert "logistic_regression_all" in got
  train = dataset.splits["train"]
  count = np.bincount(train.target, minlength=dataset.num_items)
  likes = np.bincount(train.target, weights=train.label, minlength=dataset.num_items)
  edges = np.quantile(likes[count > 0], np.arange(1, 10) / 10)
  target = dataset.splits["test"].target[result["sample"]]
  expected = [sum(likes[t] >= e for e in edges) for t in target]
  np.testing.assert_array_equal(got["item_popularity_level"], expected)
  assert fitted.extra_model[0].n_features_in_ == 4


def test_close_baseline_reads_the_shown_items_the_prompt_marks(dataset):
  train_result = random_retrieval(dataset, "train", seed=0)
  with pytest.raises(ValueError, match="close option"):
    baselines.fit(dataset, train_result, extra=("mark_close",))
  vectors = np.random.default_rng(4).normal(size=(dataset.num_items, 8))
  close = render.close_option({"mark_close": 0.2}, vectors)
  fitted = baselines.fit(dataset, train_result, fit_samples=FIT, seed=3, extra=("mark_close",),
                         close=close)
  result = random_retrieval(dataset, "test", seed=1)
  samples = np.arange(len(result["sample"]))
  got = baselines.scores(fitted, dataset, "test", result, samples)
  assert sorted(got) == sorted(baselines.names(("mark_close",)))
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  t, split = dataset.timelines, dataset.splits["test"]
  expected = []
  for r in samples:
    i = result["sample"][r]
    first = t.offsets[split.user[i]]
    ratings = []
    for item in result["history"][r].tolist():
      if item >= 0 and float(unit[item] @ unit[split.target[i]]) > 0.2:
        rows = [row for row in range(first, first + split.pos[i]) if t.item[row] == item]
        ratings.append(float(t.rating[rows[-1]]))
    expected.append(np.mean(ratings) if ratings else dataset.splits["train"].rating.mean())
  np.testing.assert_allclose(got["user_close_mean_rating"], expected, rtol=1e-12)
  assert len(set(expected)) > 2
  assert fitted.extra_model[0].n_features_in_ == 4
