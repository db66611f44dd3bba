"""The blended reranking: rank scores against scipy, the grid, the pure corners against plain
sorts, and the weights `choose` picks against a brute-force search."""
import numpy as np
import pytest
from scipy import stats

from rallrec_jax.eval import blend, recommend
from rallrec_jax.retrieval import index as index_lib
from tests.test_recommend import brute_force


def planted(seed, users=60, m=12, items=80):
  """Candidates (some rows padded), P(yes), popularity, and relevant items that favour popular
  candidates the LLM also likes."""
  rng = np.random.default_rng(seed)
  candidates = np.stack([rng.permutation(items)[:m] for _ in range(users)])
  candidates[rng.random(candidates.shape) < 0.08] = -1
  popularity = rng.integers(0, 6, items).astype(np.float64)
  p_yes = rng.random(candidates.shape)
  relevant = []
  for row, p in zip(candidates, p_yes):
    pull = popularity[np.maximum(row, 0)] / 5 + p + rng.normal(0, 0.5, m)
    relevant.append(row[(row >= 0) & (pull > np.quantile(pull, 0.8))])
  return candidates, p_yes, popularity, relevant


def test_row_ranks_are_scipys_average_ranks_scaled_to_the_unit_interval():
  scores = np.array([[3.0, 1.0, 1.0, 7.0], [2.0, 5.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
  filled = np.array([[True] * 4, [True, True, False, False], [True, False, False, False]])
  got = blend.row_ranks(scores, filled)
  np.testing.assert_allclose(got[0], (stats.rankdata(scores[0]) - 1) / 3)
  np.testing.assert_allclose(got[1, :2], [0.0, 1.0])
  assert np.isnan(got[1, 2:]).all() and got[2, 0] == 1.0 and np.isnan(got[2, 1:]).all()


def test_the_grid_covers_the_simplex_once_with_the_pure_llm_first():
  points = blend.grid(0.25)
  assert len(points) == 15 == len(set(points)) and points[0] == (1.0, 0.0, 0.0)
  assert all(min(p) >= 0 and sum(p) == pytest.approx(1.0) for p in points)
  assert {(0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.25, 0.25)} <= set(points)
  with pytest.raises(ValueError, match="step must divide 1"):
    blend.grid(0.3)


def test_the_corners_are_the_plain_orders():
  candidates, p_yes, popularity, _ = planted(0)
  found = blend.features(candidates, p_yes, popularity)
  by_llm, _ = recommend.by_score(candidates, p_yes)
  np.testing.assert_array_equal(blend.rank(candidates, found, (1, 0, 0)), by_llm)
  index_order = np.stack([np.r_[row[row >= 0], row[row < 0]] for row in candidates])
  np.testing.assert_array_equal(blend.rank(candidates, found, (0, 1, 0)), index_order)
  for row, ranked in zip(candidates, blend.rank(candidates, found, (0, 0, 1))):
    kept = row[row >= 0]
    expected = kept[np.argsort(-popularity[kept], kind="stable")]  # ties: index order
    np.testing.assert_array_equal(ranked[:len(kept)], expected)


def test_choose_finds_the_best_point_of_a_brute_force_search():
  candidates, p_yes, popularity, relevant = planted(1)
  csr = index_lib.as_csr(relevant)
  found = blend.features(candidates, p_yes, popularity)
  n = 4
  weights, table = blend.choose(candidates, found, csr.offsets, csr.items, n)
  brute = {}
  for point in blend.grid():
    ranked = blend.rank(candidates, found, point)
    per_user = [brute_force(ranked[u], relevant[u], n)[1] for u in range(len(relevant))
                if len(relevant[u])]
    brute[point] = np.mean(per_user)
    assert table[blend.label(point)] == pytest.approx(brute[point], abs=1e-12)
  assert brute[weights] == max(brute.values())
  # Relevance pulls towards both P(yes) and popularity: a mix beats each corner.
  assert weights[0] > 0 and weights[2] > 0
  assert brute[weights] > max(brute[(1.0, 0.0, 0.0)], brute[(0.0, 0.0, 1.0)])
