"""Nearest-neighbour indexes and candidate generation against numpy and pure-Python oracles."""
import json
import math

import numpy as np
import pytest

from rallrec_jax import data as data_lib
from rallrec_jax import numeric, pipeline
from rallrec_jax.retrieval import stage as retrieval_stage
from rallrec_jax.eval import metrics
from rallrec_jax.retrieval import candidates
from rallrec_jax.retrieval import index as ix
from tests.test_config import load_config


def _clustered(rng, n, d, clusters=40, spread=1.0):
  centres = numeric.unit_rows(rng.standard_normal((clusters, d)).astype(np.float32))
  noise = rng.standard_normal((n, d)).astype(np.float32) * (spread / math.sqrt(d))
  return centres[rng.integers(0, clusters, n)] + noise


def _brute_force(vectors, queries, k, exclude):
  """Numpy ground truth: cosine scores, excluded ids at -inf, stable descending order."""
  scores = numeric.unit_rows(queries) @ numeric.unit_rows(vectors).T
  for row, ids in enumerate(exclude):
    ids = np.asarray(ids, np.int64)
    scores[row, ids[(ids >= 0) & (ids < len(vectors))]] = -np.inf
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(scores, order, axis=1)


def _recall(found, truth):
  return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


@pytest.fixture(scope="module")
def data():
  """20k clustered 32-d items, 400 queries from the same clusters, and both indexes."""
  rng = np.random.default_rng(0)
  vectors = _clustered(rng, 20_000, 32)
  queries = _clustered(np.random.default_rng(1), 400, 32)
  cfg = ix.IndexConfig(num_leaves=200, num_leaves_to_search=40, training_sample_size=20_000)
  return {"vectors": vectors, "queries": queries, "scann": ix.build(vectors, cfg),
          "exact": ix.build(vectors, ix.IndexConfig(backend="exact", batch_size=256))}


def test_exact_matches_numpy_with_exclusions(monkeypatch):
  monkeypatch.setattr(ix, "EXACT_CHUNK", 256)  # several chunks and a padded last one
  rng = np.random.default_rng(2)
  vectors = rng.standard_normal((1000, 16)).astype(np.float32)
  queries = rng.standard_normal((150, 16)).astype(np.float32)
  exclude = [rng.integers(0, 1000, rng.integers(0, 30)) for _ in range(150)]
  exclude[0] = np.array([-5, 1000, 7])  # ids outside the catalogue are ignored
  index = ix.ExactIndex(vectors, batch_size=64)
  ids, scores = index.search(queries, 12, exclude=exclude)
  want_ids, want_scores = _brute_force(vectors, queries, 12, exclude)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  assert (ids == want_ids).mean() > 0.999
  csr_ids, _ = index.search(queries, 12, exclude=ix.as_csr(exclude))
  np.testing.assert_array_equal(csr_ids, ids)
  assert ids.dtype == np.int32 and scores.dtype == np.float32


def test_exact_pads_rows_with_too_few_items():
  vectors = np.eye(5, dtype=np.float32)
  ids, scores = ix.ExactIndex(vectors).search(vectors[:2], 7, exclude=[[0, 1], []])
  assert sorted(ids[0, :3]) == [2, 3, 4] and (ids[0, 3:] == -1).all()
  assert ids[1, 0] == 1 and sorted(ids[1, 1:5]) == [0, 2, 3, 4] and (ids[1, 5:] == -1).all()
  assert np.isneginf(scores[0, 3:]).all() and np.isneginf(scores[1, 5:]).all()


def test_scann_recall_against_exact(data):
  found, scores = data["scann"].search(data["queries"], 10)
  truth, _ = data["exact"].search(data["queries"], 10)
  assert _recall(found, truth) >= 0.9
  assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_scann_exclusions_keep_k_results(data):
  truth, _ = data["exact"].search(data["queries"], 10)
  exclude = [row[:5] for row in truth]  # the five best must make way for the next ones
  ids, _ = data["scann"].search(data["queries"], 10, exclude=exclude)
  assert not any(np.isin(i, e).any() for i, e in zip(ids, exclude))
  assert (ids >= 0).all()


def test_scann_save_load_round_trip(data, tmp_path):
  folder = tmp_path / "index"
  data["scann"].save(folder)
  loaded = ix.ScannIndex.load(folder)
  assert loaded.cfg == data["scann"].cfg and loaded.num_items == 20_000
  before = data["scann"].search(data["queries"], 10)
  for got, want in zip(loaded.search(data["queries"], 10), before):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(loaded.vectors, data["scann"].vectors)


def test_load_missing_folder_names_it(tmp_path):
  with pytest.raises(ix.IndexLoadError, match=str(tmp_path / "absent")):
    ix.ScannIndex.load(tmp_path / "absent")


@pytest.mark.parametrize("damage", ["flip_byte", "delete_file", "bad_json", "no_json"])
def test_load_corrupt_folder_names_it(data, tmp_path, damage):
  folder = tmp_path / damage
  data["scann"].save(folder)
  if damage == "flip_byte":
    raw = bytearray((folder / "hashed_dataset.npy").read_bytes())
    raw[-1] ^= 0xFF
    (folder / "hashed_dataset.npy").write_bytes(bytes(raw))
  elif damage == "delete_file":
    (folder / "ah_codebook.pb").unlink()
  elif damage == "bad_json":
    (folder / ix.META_FILE).write_text("{not json")
  else:
    (folder / ix.META_FILE).unlink()
  with pytest.raises(ix.IndexLoadError, match=str(folder)):
    ix.ScannIndex.load(folder)


@pytest.mark.parametrize("backend", ["scann", "exact"])
def test_neighbors_exclude_the_item_itself(backend):
  rng = np.random.default_rng(3)
  vectors = _clustered(rng, 3000, 16)
  vectors[1] = vectors[0]  # an identical copy is a neighbour; the item itself is not
  cfg = ix.IndexConfig(backend=backend, num_leaves=30, num_leaves_to_search=30,
                       training_sample_size=3000)
  found = ix.neighbors(ix.build(vectors, cfg), 8)
  assert found.shape == (3000, 8) and found.dtype == np.int32
  assert not (found == np.arange(3000)[:, None]).any()
  assert found[0, 0] == 1 and found[1, 0] == 0


@pytest.mark.parametrize("backend", ["scann", "exact"])
def test_recommend_never_returns_seen_items(data, backend):
  rng = np.random.default_rng(4)
  histories = [rng.integers(0, 20_000, rng.integers(1, 60)) for _ in range(200)]
  users = candidates.user_vectors(data["vectors"], histories)
  nearest, _ = data["exact"].search(users, 20)
  seen = [np.concatenate([h, near[:10]]) for h, near in zip(histories, nearest)]
  found = candidates.recommend(data[backend], users, ix.as_csr(seen), 15)
  assert found.shape == (200, 15) and (found >= 0).all()
  assert not any(np.isin(f, s).any() for f, s in zip(found, seen))


def _oracle(recommended, relevant):
  recalls, ndcgs = [], []
  for recs, rel in zip(recommended, relevant):
    if not rel:
      continue
    hits = [r in rel for r in recs]
    dcg = sum(1 / math.log2(rank + 2) for rank, hit in enumerate(hits) if hit)
    ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(recs), len(rel))))
    recalls.append(sum(hits) / len(rel))
    ndcgs.append(dcg / ideal)
  return sum(recalls) / len(recalls), sum(ndcgs) / len(ndcgs)


def test_recall_ndcg_match_a_python_oracle():
  rng = np.random.default_rng(5)
  recommended = np.stack([rng.permutation(50)[:10] for _ in range(300)])
  recommended[::7, -3:] = -1
  relevant = [set(rng.integers(0, 50, rng.integers(0, 25)).tolist()) for _ in range(300)]
  csr = ix.as_csr(relevant)
  got = metrics.recall_ndcg_at_n(recommended, csr.offsets, csr.items)
  np.testing.assert_allclose(got, _oracle(recommended.tolist(), relevant), rtol=1e-12)
  twice = ix.as_csr([sorted(r) * 2 for r in relevant])  # duplicate relevant ids count once
  np.testing.assert_allclose(metrics.recall_ndcg_at_n(recommended, twice.offsets, twice.items),
                             got, rtol=1e-12)
  assert metrics.recall_ndcg_at_n([[1, 2]], [0, 3], [1, 2, 3]) == pytest.approx((2 / 3, 1.0))


def test_user_vectors_match_numpy():
  rng = np.random.default_rng(6)
  items = rng.standard_normal((100, 8)).astype(np.float32) * rng.uniform(0.1, 5, (100, 1))
  histories = [rng.integers(0, 100, n) for n in (0, 1, 3, 20, 45)]
  got = candidates.user_vectors(items, histories, recent=20)
  for vec, history in zip(got, histories):
    if len(history) == 0:
      np.testing.assert_array_equal(vec, 0)
      continue
    rows = items[history[-20:]]
    mean = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(axis=0)
    np.testing.assert_allclose(vec, mean / np.linalg.norm(mean), atol=1e-6)
  np.testing.assert_array_equal(candidates.user_vectors(items, ix.as_csr(histories)), got)


@pytest.mark.parametrize("field, value", [
    ("backend", "faiss"), ("num_leaves", -1), ("num_leaves_to_search", 11),
    ("dims_per_block", 0), ("anisotropic_threshold", 1.5), ("reorder", 0),
    ("training_sample_size", 0), ("batch_size", 2.5)])
def test_index_config_errors_name_the_field(field, value):
  kwargs = {"num_leaves": 10} if field == "num_leaves_to_search" else {}
  with pytest.raises(ValueError, match=f"IndexConfig.{field} "):
    ix.IndexConfig(**kwargs, **{field: value})


def test_index_config_automatic_tree_shape():
  assert ix.IndexConfig().tree_shape(1_000_000) == (1000, 50)  # num_leaves / 20
  assert ix.IndexConfig().tree_shape(100_000) == (316, 16)
  assert ix.IndexConfig().tree_shape(10_000) == (100, 20)      # scans 2,000 items at least
  assert ix.IndexConfig().tree_shape(200) == (14, 14)
  assert ix.IndexConfig().tree_shape(3) == (2, 2)
  assert ix.IndexConfig(num_leaves_to_search=80).tree_shape(100) == (10, 10)
  assert ix.IndexConfig(num_leaves=50, num_leaves_to_search=3).tree_shape(10_000) == (50, 3)


def test_auto_backend_follows_the_catalogue_size():
  cfg = ix.IndexConfig()
  assert cfg.backend == "auto"
  assert cfg.resolve_backend(ix.SCANN_MIN_ITEMS - 1) == "exact"
  assert cfg.resolve_backend(ix.SCANN_MIN_ITEMS) == "scann"
  assert ix.IndexConfig(backend="scann").resolve_backend(10) == "scann"
  assert ix.IndexConfig(backend="exact").resolve_backend(10**7) == "exact"
  small = _clustered(np.random.default_rng(7), 300, 8)
  assert isinstance(ix.build(small), ix.ExactIndex)
  assert isinstance(ix.build(small, ix.IndexConfig(backend="scann")), ix.ScannIndex)


def test_scann_reorders_enough_candidates_per_result(data):
  scann = data["scann"]
  assert scann.candidates(5) == 100 and scann.candidates(21) == 210
  settings = scann.settings(21)
  assert settings["backend"] == "scann" and settings["reorder_candidates"] == 210
  assert (settings["num_leaves"], settings["num_leaves_to_search"]) == (200, 40)


def _small_catalogue():
  """200 clustered 128-d items, the size and width of the quickstart's mixed vectors."""
  return _clustered(np.random.default_rng(8), 200, 128, clusters=10)


def test_forced_scann_on_a_small_catalogue_matches_brute_force():
  vectors = _small_catalogue()
  found = ix.neighbors(ix.build(vectors, ix.IndexConfig(backend="scann")), 10)
  truth, _ = _brute_force(vectors, vectors, 10, [[i] for i in range(200)])
  assert (found >= 0).all()
  assert _recall(found, truth) >= 0.95


def test_scann_rows_short_of_results_are_searched_exactly():
  vectors = _small_catalogue()
  cfg = ix.IndexConfig(backend="scann", num_leaves=14, num_leaves_to_search=1)
  index = ix.build(vectors, cfg)
  found = ix.neighbors(index, 30)  # more than most single partitions hold
  assert (found >= 0).all()
  assert all(len(set(row)) == 30 for row in found)
  assert not (found == np.arange(200)[:, None]).any()
  ids, _ = index.search(vectors[:2], 5, exclude=[np.arange(197), []])
  assert sorted(ids[0, :3]) == [197, 198, 199] and (ids[0, 3:] == -1).all()


def test_neighbor_recall_counts_misses():
  vectors = _small_catalogue()
  index = ix.build(vectors, ix.IndexConfig(backend="exact"))
  found = ix.neighbors(index, 10)
  assert ix.neighbor_recall(index, found) == {"recall@10": 1.0, "queries": 200, "seed": 0}
  found[:, 5:] = -1
  assert ix.neighbor_recall(index, found, queries=50)["recall@10"] == 0.5
  wide = ix.neighbors(index, 20)
  wide[:, 10:] = -1
  assert ix.neighbor_recall(index, wide) == {"recall@10": 1.0, "recall@20": 0.5, "queries": 200,
                                             "seed": 0}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A prepared quickstart workdir (the shrunk one) and its config."""
  workdir = tmp_path_factory.mktemp("index_stage")
  cfg = load_config("quickstart", "runlocal=true")
  pipeline.run(cfg, workdir, stages=["prepare"])
  return cfg, workdir


@pytest.mark.parametrize("backend", ["auto", "scann"])
def test_index_stage_writes_its_recall_against_exact_search(prepared, backend):
  cfg, workdir = prepared
  num_items = data_lib.load_dataset(workdir).num_items
  (workdir / "embeddings").mkdir(exist_ok=True)
  vectors = _clustered(np.random.default_rng(9), num_items, 64, clusters=8)
  np.save(workdir / "embeddings" / "mixed.npy", vectors)
  cfg.index.backend = backend
  cfg.index.neighbors = 20
  retrieval_stage.index(cfg, workdir)
  k = cfg.index.neighbors
  metrics = json.loads((workdir / "index" / "metrics.json").read_text())
  assert metrics["backend"] == ("exact" if backend == "auto" else "scann")
  assert metrics["requested_backend"] == backend and metrics["num_items"] == num_items
  assert metrics["queries"] == min(num_items, ix.RECALL_QUERIES)
  assert metrics["missing_slots"] == 0
  found = np.load(workdir / "index" / "neighbors.npy")
  truth, _ = _brute_force(vectors, vectors, k, [[i] for i in range(num_items)])
  assert metrics[f"recall@{k}"] == pytest.approx(_recall(found, truth), abs=1e-4)
  assert metrics[f"recall@{k}"] >= 0.95
  assert metrics["recall@10"] == pytest.approx(_recall(found[:, :10], truth[:, :10]), abs=1e-4)
  assert metrics["recall@10"] >= 0.95
  assert (workdir / "index" / "scann").is_dir() == (backend == "scann")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unit_rows_keep_the_dtype_and_zero_rows(dtype):
  x = np.random.default_rng(0).standard_normal((50, 7)).astype(dtype) * 1e3
  x[3] = 0
  got = numeric.unit_rows(x)
  assert got.dtype == dtype and not np.isnan(got).any()
  np.testing.assert_array_equal(got[3], 0)
  keep = np.arange(50) != 3
  np.testing.assert_allclose(np.linalg.norm(got[keep], axis=1), 1, rtol=1e-6)
  np.testing.assert_allclose(got[keep] * np.linalg.norm(x[keep], axis=1, keepdims=True), x[keep],
                             rtol=1e-5)
