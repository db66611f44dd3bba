"""Top-n recommendation: ranking metrics against a brute-force oracle, the Recommender API on
the shrunk quickstart (zero-shot), the `recommend` stage and its rows in `report`."""
import dataclasses
import json
import re
import types

import numpy as np
import pytest

from rallrec_jax import config as config_lib
from rallrec_jax import data, pipeline, report
from rallrec_jax.eval import blend, bootstrap, metrics, recommend
from rallrec_jax.llm import prefix_score
from rallrec_jax.retrieval import index as index_lib
from tests.test_config import load_config
from tests.test_report import fake_scores, make_run

STAGES = ["prepare", "describe", "embed", "cf", "align", "mix", "index", "retrieve"]


def brute_force(ranked, relevant, n):
  """(recall, ndcg, hit) of one ranked list against a set of relevant ids, by a plain loop."""
  relevant = {int(i) for i in relevant if i >= 0}
  hits = [i >= 0 and int(i) in relevant for i in ranked[:n]]
  dcg = sum(1.0 / np.log2(rank + 2) for rank, hit in enumerate(hits) if hit)
  ideal = sum(1.0 / np.log2(rank + 2) for rank in range(min(n, len(relevant))))
  return sum(hits) / len(relevant), dcg / ideal, float(any(hits))


def hand_made(seed, users=40, items=30, n=6):
  rng = np.random.default_rng(seed)
  ranked = np.stack([rng.permutation(items)[:n] for _ in range(users)])
  ranked[rng.random(ranked.shape) < 0.1] = -1
  relevant = [rng.choice(items, rng.integers(0, 5), replace=True) for _ in range(users)]
  return ranked, index_lib.as_csr(relevant), relevant


def test_ranking_metrics_match_a_brute_force_loop():
  ranked, csr, relevant = hand_made(0)
  per_user, users = metrics.ranking_at_n(ranked, csr.offsets, csr.items)
  expected = np.array([brute_force(ranked[u], relevant[u], ranked.shape[1]) for u in users])
  assert list(users) == [u for u in range(len(relevant)) if len(relevant[u])]
  np.testing.assert_allclose(per_user["recall"], expected[:, 0], atol=1e-12)
  np.testing.assert_allclose(per_user["ndcg"], expected[:, 1], atol=1e-12)
  np.testing.assert_allclose(per_user["hit_rate"], expected[:, 2], atol=1e-12)
  assert 0 < per_user["hit_rate"].mean() < 1
  recall, ndcg = metrics.recall_ndcg_at_n(ranked, csr.offsets, csr.items)
  assert (recall, ndcg) == pytest.approx(tuple(expected[:, :2].mean(0)), abs=1e-12)


def test_the_oracle_is_at_least_every_reranking_of_the_candidates():
  rng = np.random.default_rng(1)
  candidates, csr, _ = hand_made(2, n=15)
  n = 5
  rows = {"index": candidates[:, :n],
          "shuffled": np.stack([rng.permutation(row)[:n] for row in candidates]),
          "oracle": recommend.oracle(candidates, csr.offsets, csr.items, n)}
  found = {name: metrics.ranking_at_n(r, csr.offsets, csr.items)[0] for name, r in rows.items()}
  for key in ("recall", "ndcg", "hit_rate"):
    for name in ("index", "shuffled"):
      assert (found["oracle"][key] >= found[name][key] - 1e-12).all(), (key, name)
    assert found["oracle"][key].mean() > found["index"][key].mean()
  table = recommend.ranking_rows(rows, csr.offsets, csr.items, resamples=200)
  for name, row in table.items():
    for key in ("recall", "ndcg", "hit_rate"):
      low, high = row[f"{key}@{n}_ci"]
      assert low <= row[f"{key}@{n}"] <= high
      assert row[f"{key}@{n}"] == pytest.approx(found[name][key].mean())


def test_mean_cis_are_paired_and_cover_the_mean():
  values = np.random.default_rng(3).random((2, 500))
  (a, b), (c, d) = bootstrap.mean_cis(np.stack([values[0], values[0] + 1.0]), 300, seed=4)
  assert a < values[0].mean() < b and (c, d) == pytest.approx((a + 1.0, b + 1.0))


def test_most_popular_ranks_by_train_likes_and_leaves_out_seen_items():
  train = types.SimpleNamespace(target=np.array([0, 0, 1, 1, 1, 2, 3, 3, 3]),
                                label=np.array([1, 1, 1, 0, 0, 1, 1, 1, 1]))
  dataset = types.SimpleNamespace(splits={"train": train}, num_items=5)
  seen = index_lib.as_csr([[3], [], [0, 3, 2, 1]])
  got = recommend.most_popular(dataset, seen, [0, 1, 2], 3)
  # likes: item 3 (3), 0 (2), then 1 and 2 with one each: 1 has more train samples.
  np.testing.assert_array_equal(got, [[0, 1, 2], [3, 0, 1], [4, -1, -1]])


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory):
  """The shrunk quickstart up to `retrieve`, the test split evaluated zero-shot, and the
  Recommender of the zero-shot model."""
  workdir = tmp_path_factory.mktemp("recommend")
  cfg = load_config("quickstart", "runlocal=true")
  cfg.eval.checkpoint, cfg.eval.splits = "none", ("test",)
  cfg.recommend.update(dict(checkpoint="none", max_users=6, candidates=8, n=4))
  pipeline.run(cfg, workdir, stages=STAGES + ["evaluate"])
  return cfg, workdir, recommend.Recommender.from_workdir(workdir, checkpoint="none")


def test_score_equals_the_evaluate_stage_on_a_first_test_sample(zero_shot):
  _, workdir, rec = zero_shot
  ds = data.load_dataset(workdir)
  test = ds.splits["test"]
  predictions = np.load(workdir / "eval" / "none" / "test_predictions.npz")
  first = [s for s in predictions["sample"] if test.pos[s] == test.pos[test.user == test.user[s]]
           .min()][:3]
  assert first
  for s in first:
    user, item = ds.users[test.user[s]]["raw_id"], ds.items[test.target[s]]["raw_id"]
    other = ds.items[(test.target[s] + 1) % ds.num_items]["raw_id"]
    score = rec.score(user, [item, other])
    expected = predictions["score"][predictions["sample"] == s][0]
    assert score.shape == (2,) and score[0] == pytest.approx(expected, abs=2e-5)


def test_recommend_is_sorted_unseen_and_scored_like_score(zero_shot):
  _, workdir, rec = zero_shot
  ds = data.load_dataset(workdir)
  user = int(ds.splits["test"].user[0])
  raw = ds.users[user]["raw_id"]
  got = rec.recommend(raw, n=5)
  items = [i for i, _ in got]
  scores = np.array([s for _, s in got])
  t = ds.timelines
  known = t.item[t.offsets[user]:t.offsets[user] + rec.known[user]]
  assert len(got) == 5 and len(set(items)) == 5
  assert not {rec.item_index(i) for i in items} & set(known.tolist())
  assert (np.diff(scores) <= 0).all()
  np.testing.assert_allclose(rec.score(raw, items), scores, atol=2e-5)
  everything = rec.recommend(raw, n=ds.num_items, exclude_seen=False)
  assert {rec.item_index(i) for i, _ in everything} & set(known.tolist())



def test_recommend_with_blend_weights_reorders_the_same_candidates(zero_shot):
  _, workdir, rec = zero_shot
  ds = data.load_dataset(workdir)
  raw = ds.users[int(ds.splits["test"].user[0])]["raw_id"]
  m = rec.cfg.recommend.candidates
  by_llm = rec.recommend(raw, n=m)
  assert rec.recommend(raw, n=m, weights={"llm": 1.0}) == by_llm
  user = rec.user_index(raw)
  index_order = [rec.raw_item(i) for i in rec.candidates([user], m)[0] if i >= 0]
  by_index = rec.recommend(raw, n=m, weights={"index": 1.0})
  assert [i for i, _ in by_index] == index_order
  assert dict(by_index) == pytest.approx(dict(by_llm))   # the same P(yes), another order
  likes = recommend.train_likes(ds)
  popular = [likes[rec.item_index(i)] for i, _ in rec.recommend(raw, n=m,
                                                                weights={"popularity": 1.0})]
  assert (np.diff(popular) <= 0).all()
  for bad, message in [({"llm": 1.0, "clicks": 1.0}, "unknown blend feature 'clicks'"),
                       ({"llm": -1.0, "index": 2.0}, "must be >= 0"),
                       ({"llm": 0.0}, "not all 0")]:
    with pytest.raises(ValueError, match=message):
      rec.recommend(raw, weights=bad)


@pytest.mark.parametrize("order", ["simple", "rerank"])
def test_the_prefix_cache_gives_the_scores_and_ranking_of_whole_prompts(zero_shot, monkeypatch,
                                                                        order):
  cfg, _, rec = zero_shot
  users = recommend.evaluated_users(rec.dataset, 3)[0]
  found = rec.candidates(users, 8)

  # One device: on the tests' 8-way mesh the prefix would run once per device, more work
  # than 8 whole prompts spread over the devices, and every group would be scored whole.
  lm = dataclasses.replace(rec.lm, mesh=None)

  def reranked(prefix_cache):
    other = config_lib.apply_overrides(cfg, {"retrieval.order": order,
                                             "recommend.prefix_cache": prefix_cache})
    return recommend.Recommender(other, rec.dataset, lm, rec.vectors, rec.index,
                                 rec.trained).rerank(users, found, progress=False)

  groups = []
  real = prefix_score.group_logits
  monkeypatch.setattr(prefix_score, "group_logits",
                      lambda lm, tokens, *a, **k: groups.append(len(tokens)) or real(
                          lm, tokens, *a, **k))
  items, scores = reranked(True)
  # The simple order's history does not depend on the target: each user's 8 prompts differ
  # only from the target's title on, and share their prefix.
  if order == "simple":
    assert groups == [8] * len(users)
  whole_items, whole_scores = reranked(False)
  np.testing.assert_array_equal(items, whole_items)
  np.testing.assert_allclose(scores, whole_scores, atol=2e-5)
  assert np.ptp(scores) > 1e-3


def test_an_unknown_id_is_an_error_naming_it(zero_shot):
  _, workdir, rec = zero_shot
  ds = data.load_dataset(workdir)
  with pytest.raises(ValueError, match="unknown user id 'no-such-user'"):
    rec.score("no-such-user", [ds.items[0]["raw_id"]])
  with pytest.raises(ValueError, match="unknown item id 'no-such-item'"):
    rec.score(ds.users[0]["raw_id"], [ds.items[0]["raw_id"], "no-such-item"])
  with pytest.raises(ValueError, match="unknown user id 'nobody'"):
    rec.recommend("nobody")


def test_the_stage_writes_lists_and_five_rows(zero_shot, tmp_path):
  cfg, workdir, rec = zero_shot
  assert pipeline.run(cfg, workdir, stages=["recommend"]) == {"recommend": "ran"}
  found = json.loads((workdir / "recommend" / "metrics.json").read_text())
  assert list(found["rows"]) == list(recommend.ROWS)
  assert (found["n"], found["candidates"], found["users"]) == (4, 8, 6)
  rows = found["rows"]
  for key in ("recall@4", "ndcg@4", "hit_rate@4"):
    assert rows["oracle"][key] >= max(rows[name][key] for name in recommend.ROWS[1:-1])
  chosen = found["blend"]
  assert chosen["chosen_on"] == "valid" and chosen["valid_users"] > 0
  assert sum(chosen["weights"].values()) == pytest.approx(1.0)
  weights = tuple(chosen["weights"][f] for f in blend.FEATURES)
  assert chosen["valid_ndcg@4"][blend.label(weights)] == max(chosen["valid_ndcg@4"].values())
  lists = [json.loads(x) for x in (workdir / "recommend" / "lists.jsonl").read_text()
           .splitlines()]
  assert len(lists) == 6
  ds = data.load_dataset(workdir)
  for entry in lists:
    user = rec.user_index(entry["user"])
    t = ds.timelines
    known = set(t.item[t.offsets[user]:t.offsets[user] + rec.known[user]].tolist())
    assert len(entry["items"]) == 8 and not {rec.item_index(i) for i in entry["items"]} & known
    assert (np.diff(entry["scores"]) <= 0).all()
  entry = lists[0]
  np.testing.assert_allclose(rec.score(entry["user"], entry["items"][:2]), entry["scores"][:2],
                             atol=2e-5)
  # report shows the five rows under the run's AUC table.
  run = make_run(tmp_path / "run", *fake_scores(200, 1.0, seed=0))
  (run / "recommend").mkdir()
  (run / "recommend" / "metrics.json").write_bytes(
      (workdir / "recommend" / "metrics.json").read_bytes())
  table, notes, _ = report.report([str(run)], out=tmp_path / "out", resamples=50)
  lines = [line for line in table.splitlines() if line.startswith("| ") and "[run]" in line]
  titles = [line.split("|")[1].strip() for line in lines]
  assert titles == [f"{report.RECOMMEND_TITLES[k]} [run]" for k in recommend.ROWS]
  cells = [c.strip() for c in lines[4].strip("|").split("|")]
  assert cells[3] == f"{rows['oracle']['recall@4']:.4f}"
  assert any("recommend stage" in n for n in notes)


@pytest.mark.parametrize("key,value,message", [
    ("recommend.checkpoint", "bestest", "recommend.checkpoint: 'bestest'"),
    ("recommend.n", 60, "recommend.n: 60 is more than recommend.candidates=50"),
    ("recommend.candidates", 0, "recommend.candidates: must be a positive integer"),
    ("recommend.max_users", -1, "recommend.max_users: must be a non-negative integer")])
def test_recommend_keys_are_validated(key, value, message):
  cfg = config_lib.apply_overrides(config_lib.base_config(), {key: value})
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(cfg)


def test_prefix_cache_is_a_bool_and_an_execution_key():
  with pytest.raises(TypeError, match="prefix_cache"):
    config_lib.apply_overrides(config_lib.base_config(), {"recommend.prefix_cache": "yes"})
  cfg = config_lib.apply_overrides(config_lib.base_config(), {"recommend.prefix_cache": False})
  assert "prefix_cache" not in config_lib.result_config(cfg, "recommend")
  assert config_lib.result_config(cfg, "recommend") == config_lib.result_config(
      config_lib.base_config(), "recommend")


def test_a_config_json_reads_back_as_the_config_it_was():
  cfg = load_config("quickstart", "runlocal=true")
  cfg.recommend.max_users = 7
  back = config_lib.from_resolved(json.loads(cfg.to_json_best_effort()))
  assert back.to_dict() == cfg.to_dict()
  assert config_lib.from_resolved({"recommend": {"n": 3}, "gone": 1}).recommend.n == 3


def test_known_counts_cut_each_timeline_before_the_first_sample_of_a_split_or_a_later_one():
  split = lambda user, pos: types.SimpleNamespace(user=np.array(user), pos=np.array(pos))
  dataset = types.SimpleNamespace(
      timelines=types.SimpleNamespace(offsets=np.array([0, 10, 16, 20, 27])),
      splits={"valid": split([0, 0, 2], [6, 7, 3]), "test": split([0, 1, 3], [9, 4, 5])})
  np.testing.assert_array_equal(recommend.known_counts(dataset, "end"), [10, 6, 4, 7])
  np.testing.assert_array_equal(recommend.known_counts(dataset, "test"), [9, 4, 4, 5])
  np.testing.assert_array_equal(recommend.known_counts(dataset, "valid"), [6, 4, 3, 5])
  with pytest.raises(ValueError, match="until must be one of"):
    recommend.known_counts(dataset, "train")


def test_evaluated_users_are_those_with_a_liked_test_item_spread_over_the_list():
  test = types.SimpleNamespace(user=np.array([4, 1, 4, 2, 1, 7, 4, 9]),
                               target=np.array([5, 3, 2, 8, 3, 1, 6, 0]),
                               label=np.array([1, 1, 1, 0, 1, 1, 0, 1]))
  dataset = types.SimpleNamespace(splits={"test": test})
  users, relevant = recommend.evaluated_users(dataset, 0)
  np.testing.assert_array_equal(users, [1, 4, 7, 9])
  assert [list(relevant.items[a:b]) for a, b in zip(relevant.offsets, relevant.offsets[1:])] == [
      [3], [2, 5], [1], [0]]
  users, relevant = recommend.evaluated_users(dataset, 2)
  np.testing.assert_array_equal(users, [1, 7])
  assert list(relevant.items) == [3, 1]
