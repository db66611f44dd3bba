"""The linear reading of an LLM's logit (rallrec_jax.benchmarks.reading) against sklearn and numpy."""
import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.metrics import roc_auc_score

from rallrec_jax.benchmarks import reading


def _planted(rng, n=600, groups=30):
  x = np.column_stack([rng.uniform(0.3, 0.9, n), rng.integers(1, 6, (n, 4)).astype(float)])
  weights = np.array([3.0, 0.4, 0.3, 0.2, 0.1])
  group = rng.integers(0, groups, n)
  offsets = rng.normal(0, 0.5, groups)
  logit = x @ weights - 3.0 + offsets[group]
  label = (rng.random(n) < 1 / (1 + np.exp(-(x @ weights - 3.0)))).astype(int)
  return x, logit, label, group


def test_the_fit_and_its_r2_match_sklearn():
  rng = np.random.default_rng(0)
  x, logit, label, group = _planted(rng)
  weights = reading.fit_linear(x, logit)
  ours = reading.decompose(weights, x, logit, label, {"target": group})
  theirs = LinearRegression().fit(x, logit)
  np.testing.assert_allclose(weights[:-1], theirs.coef_, rtol=1e-8)
  np.testing.assert_allclose(ours["r2"], theirs.score(x, logit), rtol=1e-8)
  assert ours["auc"] == pytest.approx(roc_auc_score(label, logit))
  assert ours["linear_auc"] == pytest.approx(roc_auc_score(label, theirs.predict(x)))
  assert ours["rest_auc"] == pytest.approx(roc_auc_score(label, logit - theirs.predict(x)))


def test_planted_group_offsets_are_the_rest_and_score_nothing():
  rng = np.random.default_rng(1)
  x, logit, label, group = _planted(rng, n=4000)
  fit_rows, eval_rows = slice(0, 2000), slice(2000, None)
  weights = reading.fit_linear(x[fit_rows], logit[fit_rows])
  row = reading.decompose(weights, x[eval_rows], logit[eval_rows], label[eval_rows],
                          {"target": group[eval_rows], "noise": rng.integers(0, 30, 2000)})
  assert row["rest_share_target"] > 0.95        # the rest is the planted per-group offsets
  assert row["rest_share_noise"] < 0.05         # a random grouping holds almost none of it
  assert abs(row["rest_auc"] - 0.5) < 0.04      # offsets unrelated to the label
  assert row["linear_auc"] > row["auc"]         # the offsets only add noise


def test_between_share_matches_a_loop_over_groups():
  rng = np.random.default_rng(2)
  values, groups = rng.normal(size=200), rng.integers(0, 7, 200)
  centred = values - values.mean()
  between = sum(np.sum(groups == g) * centred[groups == g].mean() ** 2 for g in np.unique(groups))
  assert reading.between_share(values, groups) == pytest.approx(between / np.sum(centred ** 2))


def test_a_workdir_without_predictions_names_the_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"eval/best/valid_predictions\.npz"):
    reading.read(tmp_path)


def test_features_add_the_close_marks_and_the_marked_ratings_when_the_prompt_marks():
  from rallrec_jax.prompts import render  # pylint: disable=import-outside-toplevel
  from tests.test_prompts import _dataset, _result  # pylint: disable=import-outside-toplevel
  ds, result = _dataset(), _result()
  samples = np.arange(2)
  plain = reading.features(ds, result, "train", samples, like_rate=False)
  np.testing.assert_array_equal(plain, [[1, 5, 0, 1, 1, 0], [5, 3, 1, 1, 1, 1]])
  close = render.close_option({"mark_close": 0.1}, np.random.default_rng(0).normal(size=(5, 4)))
  marks = render.close_marks(close, result["history"], result["target"])
  got = reading.features(ds, result, "train", samples, like_rate=False, close=close)
  np.testing.assert_array_equal(got[:, :6], plain)
  np.testing.assert_array_equal(got[:, 6:9], marks)
  np.testing.assert_array_equal(got[:, 9:], plain[:, :3] * marks)
