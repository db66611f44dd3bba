"""LightGCN: propagation and gradients against dense numpy, negatives, metrics, training, resume."""
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rallrec_jax import config, data
from rallrec_jax.cf import lightgcn


def _random_pairs(rng, num_users, num_items, count):
  keys = rng.choice(num_users * num_items, count, replace=False)
  return (keys // num_items).astype(np.int32), (keys % num_items).astype(np.int32)


def _dense_propagation(user_emb, item_emb, user, item, num_layers):
  """Mean of layers 0..L of Â^k E on the dense (U+I)^2 normalised adjacency, in float64."""
  num_users = len(user_emb)
  n = num_users + len(item_emb)
  adj = np.zeros((n, n))  # set, not added: a repeated pair is one edge
  adj[user, num_users + item] = 1.0
  adj[num_users + item, user] = 1.0
  degree = adj.sum(1)
  scale = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1.0)), 0.0)
  norm = scale[:, None] * adj * scale[None, :]
  layer = np.concatenate([user_emb, item_emb]).astype(np.float64)
  total = layer.copy()
  for _ in range(num_layers):
    layer = norm @ layer
    total += layer
  total /= num_layers + 1
  return total[:num_users], total[num_users:]


def _dense_bpr(user_emb, item_emb, user, item, batch, num_layers, l2):
  users, items = _dense_propagation(user_emb, item_emb, user, item, num_layers)
  u, p, n = batch["user"], batch["pos"], batch["neg"]
  margin = np.sum(users[u] * (items[p] - items[n]), axis=1)
  squares = np.sum(user_emb[u] ** 2) + np.sum(item_emb[p] ** 2) + np.sum(item_emb[n] ** 2)
  return np.mean(np.log1p(np.exp(-margin))) + l2 * squares / 2 / len(u)


@pytest.mark.parametrize("chunk", [4, lightgcn.EDGE_CHUNK])
def test_propagation_matches_dense_normalised_adjacency(chunk):
  # User 5 and item 6 have no interactions; the pair (0, 1) is listed twice.
  user = np.array([0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 4, 0])
  item = np.array([0, 1, 2, 2, 3, 4, 0, 5, 1, 3, 5, 1])
  graph = lightgcn.build_graph(user, item, 6, 7, chunk=chunk)
  params = lightgcn.init(jax.random.key(1), 6, 7, 5)
  for num_layers in (0, 1, 3):
    got = lightgcn.propagate(params, graph, num_layers)
    want = _dense_propagation(np.asarray(params["user"]), np.asarray(params["item"]),
                              user, item, num_layers)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)
  vectors = lightgcn.item_embeddings(params, graph, 3)
  assert vectors.dtype == np.float32 and vectors.shape == (7, 5)


def test_out_of_range_ids_are_refused():
  with pytest.raises(ValueError, match=r"item ids must lie in \[0, 3\)"):
    lightgcn.build_graph(np.array([0, 1]), np.array([2, 3]), 2, 3)
  with pytest.raises(ValueError, match="user ids"):
    lightgcn.positives_from_pairs(np.array([-1]), np.array([0]), 2, 3)


def test_bpr_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  user, item = _random_pairs(rng, 4, 5, 9)
  graph = lightgcn.build_graph(user, item, 4, 5, chunk=4)
  params = {"user": rng.normal(0, 0.5, (4, 3)), "item": rng.normal(0, 0.5, (5, 3))}
  batch = {"user": np.array([0, 1, 3, 1]), "pos": np.array([1, 2, 0, 2]),
           "neg": np.array([4, 0, 3, 1])}
  l2, num_layers = 0.3, 2

  def loss(user_emb, item_emb):
    return _dense_bpr(user_emb, item_emb, user, item, batch, num_layers, l2)
  params32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  value, grads = jax.value_and_grad(lightgcn.bpr_loss)(params32, graph, batch, num_layers, l2)
  assert value == pytest.approx(loss(params["user"], params["item"]), abs=1e-6)
  eps = 1e-6
  for name in ("user", "item"):
    numeric = np.zeros_like(params[name])
    for index in np.ndindex(params[name].shape):
      shifted = {key: [a.copy(), a.copy()] for key, a in params.items()}
      shifted[name][0][index] += eps
      shifted[name][1][index] -= eps
      up = loss(shifted["user"][0], shifted["item"][0])
      down = loss(shifted["user"][1], shifted["item"][1])
      numeric[index] = (up - down) / (2 * eps)
    np.testing.assert_allclose(grads[name], numeric, atol=2e-6)


def test_negatives_avoid_positives_and_are_uniform():
  rng = np.random.default_rng(2)
  num_items = 50
  allowed_dense = np.array([7, 23, 49])
  dense = np.setdiff1d(np.arange(num_items), allowed_dense)
  sparse_items = np.array([0, 10, 11, 12, 48])
  user = np.concatenate([np.zeros(len(dense), int), np.ones(len(sparse_items), int)])
  positives = lightgcn.positives_from_pairs(user, np.concatenate([dense, sparse_items]), 3,
                                            num_items)
  users = np.repeat([0, 1, 2], [30000, 45000, 5000])
  rng.shuffle(users)
  neg = lightgcn.sample_negatives(rng, users, num_items, positives)
  assert not np.isin(neg[users == 0], dense).any()
  assert not np.isin(neg[users == 1], sparse_items).any()
  assert neg.min() >= 0 and neg.max() < num_items
  counts = np.bincount(neg[users == 0], minlength=num_items)[allowed_dense]
  np.testing.assert_allclose(counts, 10000, rtol=0.05)
  counts = np.bincount(neg[users == 1], minlength=num_items)
  allowed = np.setdiff1d(np.arange(num_items), sparse_items)
  np.testing.assert_allclose(counts[allowed], 1000, rtol=0.15)
  assert set(np.unique(neg[users == 2])) == set(range(num_items))
  full = lightgcn.positives_from_pairs(np.zeros(num_items, int), np.arange(num_items), 1,
                                       num_items)
  with pytest.raises(ValueError, match="every item"):
    lightgcn.sample_negatives(rng, np.array([0]), num_items, full)


def _oracle_recall_ndcg(user_emb, item_emb, train_pairs, eval_pairs, k):
  """Per-user loops over sets and sorted score lists."""
  train = {}
  for u, i in zip(*train_pairs):
    train.setdefault(int(u), set()).add(int(i))
  truth = {}
  for u, i in zip(*eval_pairs):
    if int(i) not in train.get(int(u), set()):
      truth.setdefault(int(u), set()).add(int(i))
  recalls, ndcgs = [], []
  for u, held in truth.items():
    scores = [(float(np.dot(user_emb[u], item_emb[i])), i) for i in range(len(item_emb))
              if i not in train.get(u, set())]
    ranked = [i for _, i in sorted(scores, reverse=True)][:k]
    hits = [i in held for i in ranked]
    recalls.append(sum(hits) / len(held))
    dcg = sum(1 / math.log2(rank + 2) for rank, hit in enumerate(hits) if hit)
    ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(held), k)))
    ndcgs.append(dcg / ideal)
  return np.mean(recalls), np.mean(ndcgs)


def test_recall_ndcg_matches_oracle(monkeypatch):
  monkeypatch.setattr(lightgcn, "EVAL_BATCH", 7)
  rng = np.random.default_rng(3)
  num_users, num_items, k = 30, 40, 5
  user_emb = rng.normal(size=(num_users, 6)).astype(np.float32)
  item_emb = rng.normal(size=(num_items, 6)).astype(np.float32)
  train_pairs = _random_pairs(rng, num_users, num_items, 400)
  eval_user, eval_item = _random_pairs(rng, num_users, num_items, 60)
  # Repeat a pair and add held-out pairs that are training positives: both must not count.
  eval_pairs = (np.concatenate([eval_user, eval_user[:3], train_pairs[0][:10]]),
                np.concatenate([eval_item, eval_item[:3], train_pairs[1][:10]]))
  positives = lightgcn.positives_from_pairs(*train_pairs, num_users, num_items)
  got = lightgcn.recall_ndcg(user_emb, item_emb, positives, eval_pairs, k)
  want = _oracle_recall_ndcg(user_emb.astype(np.float64), item_emb.astype(np.float64),
                             train_pairs, eval_pairs, k)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_training_beats_random_embeddings_on_ml100k(ml100k_path):
  cfg = config.base_config().data
  cfg.name, cfg.path = "ml100k", str(ml100k_path)
  ds = data.prepare(cfg)
  user, item = ds.train_interactions()
  valid = ds.splits["valid"]
  eval_pairs = (valid.user, valid.target)
  positives = lightgcn.positives_from_pairs(user, item, ds.num_users, ds.num_items)
  graph = lightgcn.build_graph(user, item, ds.num_users, ds.num_items)
  random = lightgcn.init(jax.random.key(0), ds.num_users, ds.num_items, 32)
  before = lightgcn.recall_ndcg(*lightgcn.propagate(random, graph, 3), positives, eval_pairs, 20)
  # 32 dims, 3 layers, batches of 8,192, Adam 1e-2 (the tests' XLA runs unoptimised: the
  # defaults' 128 dims took 100 s here): recall@20 goes from about 0.014 to 0.089.
  params, history = lightgcn.train(user, item, ds.num_users, ds.num_items, dim=32,
                                   batch_size=8192, lr=1e-2, epochs=3, eval_pairs=eval_pairs,
                                   eval_every=3, progress=False)
  assert history[-1]["loss"] < history[0]["loss"]
  assert history[-1]["recall@20"] > 2 * before[0]
  assert history[-1]["ndcg@20"] > 2 * before[1]
  after = lightgcn.recall_ndcg(*lightgcn.propagate(params, graph, 3), positives, eval_pairs, 20)
  assert after == pytest.approx((history[-1]["recall@20"], history[-1]["ndcg@20"]))


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path, caplog):
  rng = np.random.default_rng(4)
  user, item = _random_pairs(rng, 20, 30, 160)
  eval_pairs = _random_pairs(rng, 20, 30, 40)
  kwargs = dict(num_users=20, num_items=30, dim=8, num_layers=2, batch_size=32, seed=5,
                eval_pairs=eval_pairs, k=5, progress=False)
  saved = dict(checkpoint_dir=tmp_path / "checkpoints", metrics_path=tmp_path / "metrics.jsonl")
  lightgcn.train(user, item, epochs=2, **saved, **kwargs)
  with caplog.at_level(logging.INFO, logger="rallrec_jax"):
    resumed, resumed_history = lightgcn.train(user, item, epochs=3, **saved, **kwargs)
  assert "resuming from" in caplog.text and "at step 2" in caplog.text
  whole, whole_history = lightgcn.train(user, item, epochs=3, **kwargs)
  np.testing.assert_array_equal(resumed["user"], whole["user"])
  np.testing.assert_array_equal(resumed["item"], whole["item"])
  assert [h["epoch"] for h in resumed_history] == [1, 2, 3]
  for got, want in zip(resumed_history, whole_history):
    assert {key: v for key, v in got.items() if key != "seconds"} == pytest.approx(
        {key: v for key, v in want.items() if key != "seconds"})


def test_a_kill_between_checkpoints_repeats_only_the_epochs_since_the_last(tmp_path, caplog,
                                                                          monkeypatch):
  """With save_every=2 a run killed in epoch 4 resumes from epoch 2 and ends equal to an
  uninterrupted run, each epoch logged once."""
  rng = np.random.default_rng(4)
  user, item = _random_pairs(rng, 20, 30, 160)
  kwargs = dict(num_users=20, num_items=30, dim=8, num_layers=2, batch_size=32, seed=5,
                eval_pairs=_random_pairs(rng, 20, 30, 40), k=5, progress=False)
  saved = dict(checkpoint_dir=tmp_path / "checkpoints", metrics_path=tmp_path / "metrics.jsonl",
               save_every=2)
  calls, recall_ndcg = [], lightgcn.recall_ndcg

  def killed_in_epoch_4(*args):
    calls.append(1)
    if len(calls) == 4:
      raise KeyboardInterrupt
    return recall_ndcg(*args)

  monkeypatch.setattr(lightgcn, "recall_ndcg", killed_in_epoch_4)
  with pytest.raises(KeyboardInterrupt):
    lightgcn.train(user, item, epochs=5, **saved, **kwargs)
  monkeypatch.setattr(lightgcn, "recall_ndcg", recall_ndcg)
  with caplog.at_level(logging.INFO, logger="rallrec_jax"):
    resumed, history = lightgcn.train(user, item, epochs=5, **saved, **kwargs)
  assert "at step 2 " in caplog.text
  whole, whole_history = lightgcn.train(user, item, epochs=5, **kwargs)
  np.testing.assert_array_equal(resumed["item"], whole["item"])
  assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
  assert [h["ndcg@5"] for h in history] == pytest.approx([h["ndcg@5"] for h in whole_history])
