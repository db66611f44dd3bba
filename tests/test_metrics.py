"""Our metrics against scikit-learn."""
import numpy as np
import pytest

from rallrec_jax.eval import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(4))
def test_against_sklearn(seed):
  rng = np.random.default_rng(seed)
  n = 500
  labels = rng.integers(0, 2, n)
  scores = np.clip(0.3 * labels + rng.normal(0.4, 0.25, n), 0, 1)
  if seed % 2:
    scores = np.round(scores, 1)  # many ties
  assert metrics.auc(labels, scores) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores),
                                                      abs=1e-12)
  assert metrics.logloss(labels, scores) == pytest.approx(
      sklearn_metrics.log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7)), abs=1e-9)
  assert metrics.accuracy(labels, scores) == pytest.approx(
      sklearn_metrics.accuracy_score(labels, scores > 0.5))


def test_auc_edge_cases():
  assert metrics.auc([0, 1], [0.2, 0.9]) == 1.0
  assert metrics.auc([0, 1], [0.5, 0.5]) == 0.5
  with pytest.raises(ValueError, match="both positive and negative"):
    metrics.auc([1, 1], [0.1, 0.2])


def test_checkpoint_label_names_zero_shot_rows():
  assert metrics.checkpoint_label("best", 256) == "best (step 256)"
  assert metrics.checkpoint_label("none", None) == "none (zero-shot)"
