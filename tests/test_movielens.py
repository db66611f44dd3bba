"""MovieLens loaders and the chronological samples, checked against pure-Python recomputations."""
import collections
import zipfile

import numpy as np
import pytest

from rallrec_jax import config as config_lib
from rallrec_jax import data
from rallrec_jax.data import movielens


def data_config(name, path, **overrides):
  cfg = config_lib.base_config().data
  cfg.name = name
  cfg.path = str(path)
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def keep_latest(rows):
  """Of each (user, item) the row with the newest timestamp (the later row on a tie)."""
  latest = {}
  for n, row in enumerate(rows):
    if row[:2] not in latest or row[3] >= rows[latest[row[:2]]][3]:
      latest[row[:2]] = n
  return [rows[n] for n in sorted(latest.values())]


def reference_samples(rows, min_history=5, threshold=3):
  """Pure-Python samples: rows (user, item, rating, ts) -> list per split of (u, i, label, hist)."""
  rows = sorted(keep_latest(rows), key=lambda r: (r[3], r[0], r[1]))
  seen = collections.defaultdict(list)
  samples = []
  for user, item, rating, ts in rows:
    if len(seen[user]) >= min_history:
      samples.append((user, item, int(rating > threshold), tuple(seen[user])))
    seen[user].append(item)
  n = len(samples)
  n_train, n_valid = int(0.8 * n), int(0.1 * n)
  return {"train": samples[:n_train], "valid": samples[n_train:n_train + n_valid],
          "test": samples[n_train + n_valid:]}


def raw_samples(ds, split):
  """The dataset's samples of `split` in raw ids: (user, item, label, raw history items)."""
  s = ds.splits[split]
  item_raw = [it["raw_id"] for it in ds.items]
  user_raw = [u["raw_id"] for u in ds.users]
  start, end = ds.history_bounds(s)
  t = ds.timelines
  return [(user_raw[s.user[i]], item_raw[s.target[i]], int(s.label[i]),
           tuple(item_raw[j] for j in t.item[start[i]:end[i]])) for i in range(len(s))]


def test_ml100k_counts_match_an_independent_computation(ml100k_path):
  ds = data.prepare(data_config("ml100k", ml100k_path))
  assert ds.meta["splits"] == {"train": 76228, "valid": 9528, "test": 9529}
  with open(ml100k_path / "u.data") as f:
    rows = [tuple(int(x) for x in line.split("\t")) for line in f]
  ref = reference_samples(rows)
  assert {k: len(v) for k, v in ref.items()} == ds.meta["splits"]
  assert (ds.num_users, ds.num_items) == (943, 1682)
  for split in ("valid", "test"):
    assert raw_samples(ds, split) == ref[split]
  train = raw_samples(ds, "train")
  assert [s[:3] for s in train] == [s[:3] for s in ref["train"]]
  assert train[::997] == ref["train"][::997]
  toy = ds.items[[it["raw_id"] for it in ds.items].index(1)]
  assert toy["title"] == "Toy Story (1995)"
  assert toy["genres"] == ["Animation", "Children's", "Comedy"]
  assert ds.users[0] == {"id": 0, "raw_id": 1, "gender": "M", "age": 24,
                         "occupation": "technician", "zip": "85711"}


def test_max_history_keeps_the_most_recent(ml100k_path):
  ds = data.prepare(data_config("ml100k", ml100k_path))
  full_items, _, full_ts = ds.history("test", 7)
  items, _, ts = ds.history("test", 7, max_history=3)
  assert list(items) == list(full_items[-3:]) and np.all(np.diff(full_ts) >= 0)


ML1M_MOVIES = [(1, "Toy Story (1995)", "Animation|Children's|Comedy"),
               (2, "Misérables, Les (1995)", "Drama|Musical"),
               (3, "Shawshank Redemption, The (1994)", "Drama"),
               (4, "Unrated Film (2000)", "Comedy")] + [
                   (i, f"Film {i} (199{i % 10})", "Drama|Thriller") for i in range(5, 31)]
ML1M_USERS = [(1, "F", 1, 10, "48067"), (2, "M", 56, 16, "70072"), (3, "M", 25, 15, "55117-1234")]


def random_ratings(seed=0, n_users=3, n_items=30, per_user=(9, 12, 14)):
  """Ratings with tied timestamps (the sort must break ties by user, then item) and a few
  repeated (user, item) pairs."""
  rng = np.random.default_rng(seed)
  rows = []
  for user, n in zip(range(1, n_users + 1), per_user):
    for k in range(n):
      item = int(rng.integers(1, n_items + 1))
      rows.append((user, item, int(rng.integers(1, 6)), 978300000 + int(rng.integers(0, 12))))
  return rows


def write_ml1m(folder, ratings, movies=ML1M_MOVIES, users=ML1M_USERS):
  folder.mkdir(parents=True, exist_ok=True)
  lines = ["::".join(map(str, r)) for r in ratings]
  (folder / "ratings.dat").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
  (folder / "movies.dat").write_bytes(
      "".join(f"{i}::{t}::{g}\n" for i, t, g in movies).encode("latin-1"))
  (folder / "users.dat").write_bytes(
      "".join("::".join(map(str, u)) + "\n" for u in users).encode("latin-1"))
  return folder


def test_ml1m_fixture_matches_reference_folder_and_zip(tmp_path):
  rows = random_ratings()
  folder = write_ml1m(tmp_path / "ml-1m", rows)
  ds = data.prepare(data_config("ml1m", folder))
  ref = reference_samples(rows)
  for split in data.SPLITS:
    assert raw_samples(ds, split) == ref[split]
  assert ds.items[1]["title"] == "Misérables, Les (1995)"
  assert ds.items[0]["genres"] == ["Animation", "Children's", "Comedy"]
  assert ds.users[1]["age_group"] == "56+" and ds.users[1]["occupation"] == "self-employed"
  assert ds.users[2]["zip"] == "55117-1234"

  archive = tmp_path / "ml-1m.zip"
  with zipfile.ZipFile(archive, "w") as z:
    for name in movielens.ML1M_FILES:
      z.write(folder / name, f"ml-1m/{name}")
  zipped = data.prepare(data_config("ml1m", archive))
  for split in data.SPLITS:
    assert raw_samples(zipped, split) == ref[split]
  assert movielens.input_files_ml1m(data_config("ml1m", archive)) == [archive]


def test_windows_line_endings_parse_the_same(tmp_path):
  rows = random_ratings(seed=3)
  folder = write_ml1m(tmp_path / "a", rows)
  crlf = tmp_path / "b"
  crlf.mkdir()
  for name in movielens.ML1M_FILES:
    (crlf / name).write_bytes((folder / name).read_bytes().replace(b"\n", b"\r\n"))
  a, b = data.prepare(data_config("ml1m", folder)), data.prepare(data_config("ml1m", crlf))
  assert raw_samples(a, "train") == raw_samples(b, "train") and a.items == b.items


def test_save_and_load_round_trip(tmp_path):
  ds = data.prepare(data_config("ml1m", write_ml1m(tmp_path / "ml", random_ratings(seed=1))))
  data.save(ds, tmp_path / "w" / "data")
  back = data.load_dataset(tmp_path / "w")
  assert back.meta == ds.meta and back.items == ds.items and back.users == ds.users
  for split in data.SPLITS:
    for field in ("user", "pos", "target", "rating", "label", "timestamp"):
      np.testing.assert_array_equal(getattr(back.splits[split], field),
                                    getattr(ds.splits[split], field))
  np.testing.assert_array_equal(back.timelines.offsets, ds.timelines.offsets)
  assert back.splits["train"].target.dtype == np.int32


def test_unknown_ids_can_be_dropped(tmp_path):
  rows = random_ratings(seed=2) + [(3, 99, 5, 978300005)]
  folder = write_ml1m(tmp_path / "ml", rows)
  with pytest.raises(data.DataError, match=rf"ratings.dat:{len(rows)}: .*unknown item 99"):
    data.prepare(data_config("ml1m", folder))
  ds = data.prepare(data_config("ml1m", folder, unknown_ids="drop"))
  assert ds.meta["num_ratings"] == len(keep_latest(rows[:-1]))
  assert "dropped 1 ratings" in ds.meta["notes"][0]


def test_train_interactions_stop_before_validation(tmp_path):
  rows = random_ratings(seed=4, per_user=(12, 15, 9))
  ds = data.prepare(data_config("ml1m", write_ml1m(tmp_path / "ml", rows)))
  user, item = ds.train_interactions()
  first_held = min(ds.splits["valid"].timestamp.min(), ds.splits["test"].timestamp.min())
  expected = sorted((u, i) for u, i, _, ts in keep_latest(rows) if ts < first_held)
  raw_user = [u["raw_id"] for u in ds.users]
  raw_item = [it["raw_id"] for it in ds.items]
  assert sorted((raw_user[u], raw_item[i]) for u, i in zip(user, item)) == expected


def test_train_interactions_of_per_user_samples_drop_held_out_targets(tmp_path):
  from rallrec_jax.data import build, raw  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  n = 400
  ratings = raw.RawData(user=rng.integers(0, 40, n), item=rng.integers(0, 30, n),
                        rating=rng.integers(0, 11, n).astype(np.float32),
                        timestamp=np.arange(n), items={}, users={})
  ds = build.build(ratings, "bookcrossing", "per_user_random", 4, 4.0, (0.6, 0.2, 0.2))
  user, item = ds.train_interactions()
  assert len(user) == n - len(ds.splits["valid"]) - len(ds.splits["test"])
  held = {(int(s.user[i]), int(s.pos[i])) for s in (ds.splits["valid"], ds.splits["test"])
          for i in range(len(s))}
  t = ds.timelines
  kept_rows = [(u, r - t.offsets[u]) for u in range(ds.num_users)
               for r in range(t.offsets[u], t.offsets[u + 1]) if (u, r - t.offsets[u]) not in held]
  assert len(kept_rows) == len(user)
