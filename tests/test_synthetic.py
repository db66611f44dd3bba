"""The synthetic generator: exact sizes, determinism, and planted structure that can be measured."""
import dataclasses

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from rallrec_jax import config as config_lib
from rallrec_jax.data import build, synthetic

# Enough ratings per user and cluster that late ratings have 20+ same-cluster predecessors.
STRUCTURE = dict(num_users=400, num_items=300, num_ratings=40000, num_clusters=4, seed=0)
RECENT = 10


@pytest.fixture(scope="module")
def small():
  return synthetic.generate_with_truth(120, 90, 5000, 5, 0.8, 3)


@pytest.fixture(scope="module")
def drifting():
  return synthetic.generate_with_truth(drift=0.8, **STRUCTURE)


@pytest.fixture(scope="module")
def steady():
  return synthetic.generate_with_truth(drift=0.0, **STRUCTURE)


def timelines(raw):
  """Rows in (user, time) order, and the start of each user's rows."""
  order = np.lexsort((raw.timestamp, raw.user))
  user = raw.user[order]
  starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
  return order, starts, np.r_[starts[1:], len(user)]


def cluster_of_items(raw, truth):
  """Each raw item's cluster, read from its first genre (the text, not the truth)."""
  index = {name: c for c, name in enumerate(truth.names)}
  clusters = np.full(max(raw.items) + 1, -1)
  for item_id, fields in raw.items.items():
    clusters[item_id] = index[fields["genres"][0]]
  return clusters


def recency_aucs(raw, truth):
  """AUC of the label against the mean of the user's most recent and oldest RECENT ratings of
  the target's cluster, over ratings in the second half of a timeline with 2 RECENT such
  predecessors (so the two windows never overlap)."""
  order, starts, ends = timelines(raw)
  rating = raw.rating[order]
  cluster = cluster_of_items(raw, truth)[raw.item[order]]
  labels, recent, oldest = [], [], []
  for lo, hi in zip(starts, ends):
    for c in np.unique(cluster[lo:hi]):
      at = np.flatnonzero(cluster[lo:hi] == c)
      if len(at) <= 2 * RECENT:
        continue
      same = rating[lo:hi][at]
      total = np.r_[0.0, np.cumsum(same)]
      j = np.arange(len(at))
      j = j[(j >= 2 * RECENT) & (at >= (hi - lo) // 2)]
      labels.append(same[j] > 3)
      recent.append((total[j] - total[j - RECENT]) / RECENT)
      oldest.append(np.full(len(j), total[RECENT] / RECENT))
  labels, recent, oldest = map(np.concatenate, (labels, recent, oldest))
  assert len(labels) > 2000
  return roc_auc_score(labels, recent), roc_auc_score(labels, oldest)


def test_sizes_and_ranges(small):
  raw, truth = small
  assert len(raw.user) == 5000
  assert raw.user.dtype == raw.item.dtype == raw.timestamp.dtype == np.int64
  assert raw.rating.dtype == np.float32
  assert set(np.unique(raw.user)) <= set(range(1, 121)) and raw.user.min() == 1
  assert raw.item.min() >= 1 and raw.item.max() <= 90
  assert sorted(raw.items) == list(range(1, 91)) and sorted(raw.users) == list(range(1, 121))
  assert all(type(k) is int for k in [*raw.items, *raw.users])
  assert set(np.unique(raw.rating).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
  assert 0.5 <= (raw.rating > 3).mean() <= 0.6
  assert len(set(zip(raw.user.tolist(), raw.item.tolist()))) == 5000
  counts = np.bincount(raw.user)[1:]
  assert counts.min() >= 20 and counts.max() > 2 * np.median(counts)
  assert raw.timestamp.min() >= synthetic.START
  assert len(truth.item_cluster) == 90 and len(truth.home) == 120
  assert (truth.home != truth.second).all()


def test_timestamps_increase_within_each_user(small):
  raw, _ = small
  order, starts, ends = timelines(raw)
  step = np.diff(raw.timestamp[order])
  inside = np.ones(len(step), bool)
  inside[ends[:-1] - 1] = False
  assert (step[inside] > 0).all()
  first = raw.timestamp[order][starts]
  assert first.max() - first.min() > 180 * synthetic.DAY


def test_user_profiles(small):
  raw, _ = small
  profiles = list(raw.users.values())
  assert {p["gender"] for p in profiles} == {"M", "F"}
  assert {p["age"] for p in profiles} <= set(synthetic.AGES)
  assert {p["occupation"] for p in profiles} <= set(synthetic.OCCUPATIONS)


def test_deterministic_in_the_seed():
  a = synthetic.generate(50, 40, 1500, 3, 0.5, 7)
  b = synthetic.generate(50, 40, 1500, 3, 0.5, 7)
  c = synthetic.generate(50, 40, 1500, 3, 0.5, 8)
  for name in ("user", "item", "rating", "timestamp"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert a.items == b.items and a.users == b.users
  assert not np.array_equal(a.item, c.item) and not np.array_equal(a.timestamp, c.timestamp)
  assert a.items != c.items


@pytest.mark.parametrize("sizes, message", [
    (dict(num_users=10, num_items=5, num_ratings=51), "exceeds num_users \\* num_items = 50"),
    (dict(num_users=0, num_items=5, num_ratings=5), "num_users must be a positive integer"),
    (dict(num_users=10, num_items=5, num_ratings=20, drift=1.5), "drift must lie in"),
])
def test_bad_sizes_are_clear_errors(sizes, message):
  args = dict(num_clusters=2, drift=0.5, seed=0) | sizes
  with pytest.raises(ValueError, match=message):
    synthetic.generate(**args)


def test_every_pair_rated_when_full():
  raw = synthetic.generate(30, 25, 750, 3, 0.8, 1)
  assert len(set(zip(raw.user.tolist(), raw.item.tolist()))) == 750


def test_few_ratings_lower_the_per_user_floor():
  raw = synthetic.generate(100, 50, 700, 3, 0.8, 1)
  assert len(raw.user) == 700 and np.bincount(raw.user)[1:].min() == 7


def test_load_uses_the_config():
  cfg = config_lib.base_config().data
  s = cfg.synthetic
  raw = synthetic.load(cfg)
  expected = synthetic.generate(s.num_users, s.num_items, s.num_ratings, s.num_clusters, s.drift,
                                s.seed)
  np.testing.assert_array_equal(raw.rating, expected.rating)
  assert len(raw.user) == 12000 and len(raw.items) == 200 and len(raw.users) == 300
  assert synthetic.input_files(cfg) == []


def test_items_of_a_cluster_share_genre_and_words(small):
  raw, truth = small
  for c, name in enumerate(truth.names):
    members = np.flatnonzero(truth.item_cluster == c) + 1
    assert all(raw.items[i]["genres"][0] == name for i in members.tolist())
    _, adjectives, nouns = synthetic._vocabulary(c)
    for i in members.tolist():
      words = set(raw.items[i]["title"].replace("(", " ").split())
      assert words & set(nouns), raw.items[i]["title"]
  titles = [v["title"] for v in raw.items.values()]
  assert len(set(titles)) == len(titles)
  assert all(t[-6:-5] == "(" and t[-5:-1].isdigit() and "::" not in t for t in titles)


def test_cluster_names_are_distinct_past_the_base_list():
  names = synthetic.cluster_names(300)
  assert len(set(names)) == 300
  assert names[:2] == ["Space Opera", "Courtroom Drama"]


def test_current_preferred_cluster_is_rated_higher(drifting):
  raw, truth = drifting
  order, starts, ends = timelines(raw)
  ts = raw.timestamp[order]
  first = np.repeat(ts[starts], ends - starts)
  last = np.repeat(ts[ends - 1], ends - starts)
  t = (ts - first) / np.maximum(last - first, 1)
  user = raw.user[order] - 1
  current = np.where(0.8 * t < 0.5, truth.home[user], truth.second[user])
  liked = truth.item_cluster[raw.item[order] - 1] == current
  rating = raw.rating[order]
  assert rating[liked].mean() > rating[~liked].mean() + 0.8
  # Late in a timeline the home cluster has lost its lead to the second one.
  late = t > 0.8
  home = truth.item_cluster[raw.item[order] - 1] == truth.home[user]
  second = truth.item_cluster[raw.item[order] - 1] == truth.second[user]
  assert rating[late & second].mean() > rating[late & home].mean() + 0.3
  assert rating[~late & home].mean() > rating[late & home].mean() + 0.3


def test_recent_history_predicts_better_only_with_drift(drifting, steady):
  recent, oldest = recency_aucs(*drifting)
  assert recent > oldest + 0.04
  recent_steady, oldest_steady = recency_aucs(*steady)
  assert abs(recent_steady - oldest_steady) < 0.015
  assert recent - oldest > 3 * abs(recent_steady - oldest_steady)


def parse_ml1m(folder):
  """An independent reader of the three MovieLens 1M files."""
  def rows(name):
    text = (folder / name).read_bytes().decode("latin-1")
    assert text.endswith("\n") and "\r" not in text
    return [line.split("::") for line in text[:-1].split("\n")]
  ratings = [tuple(int(x) for x in r) for r in rows("ratings.dat")]
  movies = {int(m[0]): {"title": m[1], "genres": m[2].split("|")} for m in rows("movies.dat")}
  users = {int(u[0]): u[1:] for u in rows("users.dat")}
  return ratings, movies, users


def test_write_ml1m_round_trip(small, tmp_path):
  raw, _ = small
  synthetic.write_ml1m(raw, tmp_path / "ml")
  ratings, movies, users = parse_ml1m(tmp_path / "ml")
  assert all(len(r) == 4 for r in ratings)
  assert [r[3] for r in ratings] == sorted(r[3] for r in ratings)
  expected = zip(raw.user.tolist(), raw.item.tolist(), raw.rating.tolist(), raw.timestamp.tolist())
  assert sorted(ratings) == sorted((u, i, int(r), t) for u, i, r, t in expected)
  assert movies == raw.items
  assert sorted(users) == sorted(raw.users)
  for user_id, (gender, age, occupation, zip_code) in users.items():
    profile = raw.users[user_id]
    assert (gender, int(age)) == (profile["gender"], profile["age"])
    assert synthetic.OCCUPATIONS[int(occupation)] == profile["occupation"]
    assert len(zip_code) == 5 and zip_code.isdigit()


def test_write_ml1m_refuses_separators_in_text(small, tmp_path):
  raw = dataclasses.replace(small[0], items=dict(small[0].items))
  raw.items[1] = {"title": "Bad::Title (1999)", "genres": ["Horror"]}
  with pytest.raises(ValueError, match="item 1"):
    synthetic.write_ml1m(raw, tmp_path)
  raw.items[1] = {"title": "Fine (1999)", "genres": ["Sci|Fi"]}
  with pytest.raises(ValueError, match="item 1"):
    synthetic.write_ml1m(raw, tmp_path)


def test_builds_a_chronological_dataset(small):
  raw, _ = small
  ds = build.build(raw, name="synthetic", sampling="chronological", min_history=5,
                   label_threshold=3.0, split=(0.8, 0.1, 0.1))
  assert sum(len(s) for s in ds.splits.values()) == 5000 - 120 * 5
  assert ds.num_items == 90 and len(ds.users) == 120
  assert 0.45 < ds.meta["positive_rate"]["train"] < 0.65
