"""History retrieval and ordering (PAPER.md steps 6 and 7).

The real-data checks compare `history.retrieve` with a plain per-sample numpy reference. Their
embeddings have coordinates on a fine dyadic grid and rows of norm exactly 1, so every cosine is
computed exactly in float32 in any summation order: the reference and the batched kernel then
agree bit for bit, and equal scores are real ties that exercise the tie rule.
"""
import math

import numpy as np
import pytest

from rallrec_jax import config, data
from rallrec_jax.data import schema
from rallrec_jax.benchmarks import quality as bench_quality
from rallrec_jax.retrieval import history

ORDERS = ("simple", "high", "sequential", "rerank", "fusion")


def _four_squares(rng, remainder):
  """Four non-negative integers whose squares sum to `remainder` (random search)."""
  top = math.isqrt(remainder)
  while True:
    abc = rng.integers(0, top + 1, (4096, 3))
    rest = remainder - (abc ** 2).sum(axis=1)
    root = np.sqrt(np.maximum(rest, 0)).round().astype(np.int64)
    hit = np.flatnonzero((rest >= 0) & (root ** 2 == rest))
    if len(hit):
      return np.r_[abc[hit[0]], root[hit[0]]]


def exact_unit_rows(rng, n, dim=32, scale=1024):
  """Random unit rows with coordinates in multiples of 1/scale and squared norm exactly 1.

  Cosines are multiples of 1/scale**2 bounded by 1, so float32 holds every partial sum exactly.
  """
  rows = np.zeros((n, dim), np.int64)
  for i in range(n):
    g = rng.normal(size=dim - 4)
    head = np.round(g / np.linalg.norm(g) * scale * 0.95).astype(np.int64)
    tail = _four_squares(rng, scale ** 2 - int((head ** 2).sum()))
    row = np.r_[head, tail * rng.choice([-1, 1], 4)]
    rows[i] = rng.permutation(row)
  return (rows / scale).astype(np.float32)


def tied_rows(rng, n, dim=32, nonzero=16):
  """Unit rows of +-1/4 on 16 coordinates: cosines take 33 values, so ties are everywhere."""
  rows = np.zeros((n, dim), np.float32)
  for i in range(n):
    rows[i, rng.choice(dim, nonzero, replace=False)] = rng.choice([-0.25, 0.25], nonzero)
  return rows


def reference_prompt(items, cos, k, order, half_life=10.0, rerank_short=True):
  """One sample's prompt items, straight from the definitions in `history`'s module doc."""
  n = len(items)
  if order == "simple":
    return items[n - min(n, k):].tolist()
  scores = cos
  if order == "fusion":
    decay = (0.5 ** ((n - 1 - np.arange(n)) / half_life)).astype(np.float32)
    scores = (np.float32(1) + cos) / np.float32(2) * decay
  position = np.arange(n)
  top = np.lexsort((-position, -scores))[:k].tolist()
  if order == "high":
    return items[top].tolist()
  if order in ("sequential", "fusion") or (not rerank_short and n <= k):
    return items[sorted(top)].tolist()
  k1 = 2 * k // 3
  newest = sorted(top, reverse=True)[:k1]
  recent = [i for i in range(n - 1, -1, -1) if i not in newest][:k - k1]
  return items[newest + sorted(recent)].tolist()


def reference(ds, split, embeddings, k, order, max_history=0, **kwargs):
  samples = ds.splits[split]
  start, end = ds.history_bounds(samples, max_history)
  e = history.normalize(embeddings)
  out = np.full((len(samples), k), -1, np.int64)
  for i in range(len(samples)):
    items = ds.timelines.item[start[i]:end[i]]
    prompt = reference_prompt(items, e[items] @ e[samples.target[i]], k, order, **kwargs)
    out[i, :len(prompt)] = prompt
  return out


@pytest.fixture(scope="module")
def ml100k(ml100k_path):
  c = config.base_config().data
  c.name = "ml100k"
  c.path = str(ml100k_path)
  return data.prepare(c)


@pytest.fixture(scope="module")
def embeddings(ml100k):
  rng = np.random.default_rng(0)
  return {"exact": exact_unit_rows(rng, ml100k.num_items),
          "tied": tied_rows(rng, ml100k.num_items)}


@pytest.mark.parametrize("kind", ["exact", "tied"])
@pytest.mark.parametrize("k", [5, 30])
def test_matches_reference_on_ml100k(ml100k, embeddings, kind, k):
  e = embeddings[kind]
  for order in ORDERS:
    got = history.retrieve(ml100k, "test", e, k=k, order=order)["history"]
    np.testing.assert_array_equal(got, reference(ml100k, "test", e, k, order), err_msg=order)


def test_options_match_reference_on_ml100k(ml100k, embeddings):
  e = embeddings["tied"]
  got = history.retrieve(ml100k, "test", e, k=30, rerank_short=False)["history"]
  np.testing.assert_array_equal(got, reference(ml100k, "test", e, 30, "rerank",
                                               rerank_short=False))
  got = history.retrieve(ml100k, "test", e, k=5, order="fusion", half_life=3.0)["history"]
  np.testing.assert_array_equal(got, reference(ml100k, "test", e, 5, "fusion", half_life=3.0))
  for order in ("high", "rerank"):
    got = history.retrieve(ml100k, "test", e, k=30, order=order, max_history=20)["history"]
    np.testing.assert_array_equal(got, reference(ml100k, "test", e, 30, order, max_history=20))


def test_call_size_does_not_change_results(ml100k, embeddings):
  e = embeddings["tied"]
  one_block = history.retrieve(ml100k, "valid", e, k=5, order="high", batch_size=1)
  default = history.retrieve(ml100k, "valid", e, k=5, order="high")
  np.testing.assert_array_equal(one_block["history"], default["history"])


def test_max_history_caps_retrieval(ml100k, embeddings):
  samples = ml100k.splits["test"]
  rows = history.top_k_history(ml100k, samples, embeddings["exact"], 10, max_history=20)
  start, end = ml100k.history_bounds(samples, 20)
  assert ((rows == -1) | ((rows >= start[:, None]) & (rows < end[:, None]))).all()
  assert ((rows >= 0).sum(axis=1) == np.minimum(end - start, 10)).all()


def test_fusion_limits_on_ml100k(ml100k, embeddings):
  e = embeddings["exact"]
  def run(order, **kwargs):
    return history.retrieve(ml100k, "test", e, k=30, order=order, **kwargs)["history"]
  np.testing.assert_array_equal(run("fusion", half_life=math.inf), run("sequential"))
  np.testing.assert_array_equal(run("fusion", half_life=1e-9), run("simple"))


# Hand-made timelines. User 0 rated items 0..7 in order; item p's cosine to the target item 10
# is SIMS[p]. User 1 rated items 1, 9, 3, 6, where item 9 is a copy of item 1 (a tie).
SIMS = [0.9, 0.2, 0.8, 0.1, 0.7, 0.85, 0.0, 0.3]
TARGET = 10


def _hand_dataset():
  sims = SIMS + [0.0, SIMS[1], 1.0]
  emb = np.array([[s, math.sqrt(1 - s * s)] for s in sims], np.float32)
  timeline = np.array(list(range(8)) + [1, 9, 3, 6], np.int32)
  timelines = schema.Timelines(offsets=np.array([0, 8, 12]), item=timeline,
                               rating=np.ones(12, np.float32), timestamp=np.arange(12))
  user = np.array([0, 0, 0, 0, 1], np.int32)
  pos = np.array([8, 6, 3, 0, 4], np.int32)
  n = len(user)
  samples = schema.Samples(user=user, pos=pos, target=np.full(n, TARGET, np.int32),
                           rating=np.ones(n, np.float32), label=np.ones(n, np.int8),
                           timestamp=np.arange(n))
  ds = schema.Dataset(meta={}, items=[{"id": i} for i in range(11)],
                      users=[{"id": 0}, {"id": 1}], timelines=timelines,
                      splits={"test": samples})
  return ds, emb


def _prompts(k, order, **kwargs):
  ds, emb = _hand_dataset()
  return history.retrieve(ds, "test", emb, k=k, order=order, **kwargs)["history"].tolist()


def test_hand_orders():
  none = [-1] * 4
  assert _prompts(4, "simple")[:4] == [[4, 5, 6, 7], [2, 3, 4, 5], [0, 1, 2, -1], none]
  assert _prompts(4, "high")[:4] == [[0, 5, 2, 4], [0, 5, 2, 4], [0, 2, 1, -1], none]
  assert _prompts(4, "sequential")[:4] == [[0, 2, 4, 5], [0, 2, 4, 5], [0, 1, 2, -1], none]


def test_hand_rerank():
  # K1 = 2 newest of the retrieved, newest first; then the K2 = 2 newest not chosen, in order.
  assert _prompts(4, "rerank")[:4] == [[5, 4, 6, 7], [5, 4, 2, 3], [2, 1, 0, -1], [-1] * 4]
  # Histories of at most K items fall back to `sequential` when rerank_short is off.
  assert _prompts(4, "rerank", rerank_short=False)[:4] == [
      [5, 4, 6, 7], [5, 4, 2, 3], [0, 1, 2, -1], [-1] * 4]
  # K = 6: K1 = 4 of the retrieved {0, 5, 2, 4, 7, 1}, then the newest two others (3, 6).
  assert _prompts(6, "rerank")[0] == [7, 5, 4, 2, 3, 6]


def test_hand_max_history():
  assert _prompts(4, "high", max_history=5)[0] == [5, 4, 7, 3]
  assert _prompts(4, "rerank", max_history=5)[0] == [7, 5, 4, 6]
  assert _prompts(4, "simple", max_history=2)[0] == [6, 7, -1, -1]


def test_hand_ties_prefer_recent():
  assert _prompts(2, "high")[4] == [9, 1]
  assert _prompts(1, "high")[4] == [9]
  ds, emb = _hand_dataset()
  rows = history.top_k_history(ds, ds.splits["test"], emb, 3)
  assert rows.tolist() == [[0, 5, 2], [0, 5, 2], [0, 2, 1], [-1, -1, -1], [9, 8, 10]]


def test_hand_fusion_limits():
  assert _prompts(4, "fusion", half_life=math.inf) == _prompts(4, "sequential")
  assert _prompts(4, "fusion", half_life=1e-9) == _prompts(4, "simple")


def test_save_load_roundtrip(tmp_path):
  ds, emb = _hand_dataset()
  result = history.retrieve(ds, "test", emb, k=3)
  history.save(result, tmp_path / "r.npz")
  back = history.load(tmp_path / "r.npz")
  assert set(back) == {"sample", "user", "target", "history"}
  for name, value in result.items():
    np.testing.assert_array_equal(back[name], value)
    assert back[name].dtype == value.dtype
  assert [p.name for p in tmp_path.iterdir()] == ["r.npz"]


def test_rejects_bad_arguments():
  ds, emb = _hand_dataset()
  with pytest.raises(ValueError, match="unknown order"):
    history.retrieve(ds, "test", emb, order="newest")
  with pytest.raises(ValueError, match="rows for 11 items"):
    history.retrieve(ds, "test", emb[:5])
  with pytest.raises(ValueError, match="NaN"):
    history.retrieve(ds, "test", np.full_like(emb, np.nan))


@pytest.mark.parametrize("ranked", [True, False])
def test_host_top_k_equals_device_top_k(ranked):
  """The CPU's numpy selection picks what `jax.lax.top_k` picks, ties and short rows included."""
  rng = np.random.default_rng(3)
  blocks, size, width, k, items = 6, 8, 64, 10, 40
  table = rng.integers(-3, 4, (items, 4)).astype(np.float32)   # few distinct scores: many ties
  rows = rng.integers(0, items, (blocks, width)).astype(np.int32)
  targets = rng.integers(0, items, (blocks, size)).astype(np.int32)
  first = rng.integers(0, 8, (blocks, size)).astype(np.int32)
  count = rng.integers(0, width - 8, (blocks, size)).astype(np.int32)
  count[0, :3] = (0, 1, k)                                     # empty, single, exactly k
  device = np.asarray(history._block_top_k(table, rows, targets, first, count, None, k=k))
  score = np.asarray(history._block_scores(table, rows, targets, first, count, None, k=k))
  host = history.host_top_k(score.reshape(-1, width), first.reshape(-1), k, ranked)
  device = device.reshape(-1, k)
  assert (host < 0).sum() == (device < 0).sum() > 0
  if ranked:
    np.testing.assert_array_equal(host, device)
  else:
    np.testing.assert_array_equal(np.sort(host, axis=1), np.sort(device, axis=1))


def test_quality_prediction_equals_a_loop_over_rows(ml100k, embeddings):
  """bench retrieval-quality's score: user mean + similarity-weighted mean deviation."""
  vectors = embeddings["exact"]
  got = history.retrieve(ml100k, "test", vectors, k=5, order="high")["history"][:300]
  samples = ml100k.splits["test"].take(np.arange(300))
  ours = bench_quality.predict(ml100k, samples, got, vectors)
  t = ml100k.timelines
  start, end = ml100k.history_bounds(samples)
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  for n in range(300):
    items = t.item[start[n]:end[n]]
    ratings = t.rating[start[n]:end[n]]
    mean = ratings.mean() if len(ratings) else 3.5
    num = den = 0.0
    for item in got[n][got[n] >= 0]:
      w = max(float(unit[item] @ unit[samples.target[n]]), 0.0) + 1e-6
      num += w * (ratings[items == item][0] - mean)
      den += w
    assert ours[n] == pytest.approx(mean + (num / den if den else 0.0), abs=1e-5)
