"""The Amazon 2018 loader against independent pure-Python readings of hand-made dump files."""
import collections
import gzip
import json
import random

import ml_collections
import numpy as np
import pytest

from rallrec_jax import config
from rallrec_jax.data import amazon, build
from rallrec_jax.data.errors import DataError
from rallrec_jax.data.raw import clean_text

CATEGORY = "Movies_and_TV"
SMALL_CORE = dict(user_min=3, user_max=20, item_min=3, item_max=30, top_items=15)
NO_CORE = dict(user_min=0, user_max=10**6, item_min=0, item_max=10**6, top_items=0)
T0 = 1_300_000_000  # 2011-03-13, when the fixtures' reviews start
WORDS = ["great", "film", "café", "naïve", "\u2665", 'said "asin": "B000TRAP"', "\\o/",
         '"reviewerID": "ATRAP", "overall": 1.0', "DVD", "{}", "the", "plot", "slash\\"]


def _cfg(tmp_path, unknown_ids="drop", **amazon_overrides):
  c = config.base_config().data
  c.name = "amazon_movies"
  c.path = str(tmp_path)
  c.unknown_ids = unknown_ids
  c.amazon.update(amazon_overrides)
  return c


def _review_line(rng, user, asin, overall, time, compact=False, trap=False):
  """One reviews line as the dump writes it, with shuffled keys and noisy text.

  A `trap` line first names decoy fields: inside a nested object and as a repeated key, which
  JSON overrides with the later real one.
  """
  record = {"overall": overall, "verified": rng.random() < 0.5, "reviewTime": "11 9, 2012",
            "reviewerID": user, "asin": asin, "style": {"Format:": " DVD"},
            "reviewerName": "Terry \u00e9", "unixReviewTime": time,
            "reviewText": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 12))),
            "summary": rng.choice(WORDS)}
  keys = list(record)
  rng.shuffle(keys)
  record = {k: record[k] for k in keys}
  separators = (",", ":") if compact else None
  line = json.dumps(record, ensure_ascii=rng.random() < 0.5, separators=separators)
  if trap:
    decoys = '"asin": "BDECOY", "reviewerID": "ADECOY", "overall": 0.5, "unixReviewTime": 1'
    line = f'{{"extra": {{{decoys}}}, {decoys}, {line[1:]}'
  return line


def _meta_line(asin, title, categories=("Movies & TV", "Movies")):
  record = {"category": list(categories), "tech1": "", "description": ["a <b>film</b>"],
            "asin": asin, "brand": "Studio"}
  if title is not None:
    record["title"] = title
  return json.dumps(record)


def _write(path, lines, gz=False):
  data = "".join(line + "\n" for line in lines).encode("utf-8")
  if gz:
    path = path.with_name(path.name + ".gz")
    path.write_bytes(gzip.compress(data))
  else:
    path.write_bytes(data)
  return path


def _write_dump(folder, reviews, meta, gz=False):
  folder.mkdir(parents=True, exist_ok=True)
  return (_write(folder / f"{CATEGORY}.json", reviews, gz),
          _write(folder / f"meta_{CATEGORY}.json", meta, gz))


def _random_dump(seed, num_ratings=600):
  """Reviews with skewed user and item activity, repeats, same-time repeats and untitled items."""
  rng = random.Random(seed)
  users = [f"A{u:04d}" for u in range(50)]
  asins = [f"B{i:09d}" for i in range(70)]
  user_weights = [1.0 / (k + 1) ** 0.7 for k in range(len(users))]
  item_weights = [1.0 / (k + 1) ** 0.9 for k in range(len(asins))]
  reviews = []
  for n in range(num_ratings):
    user = rng.choices(users, user_weights)[0]
    asin = rng.choices(asins, item_weights)[0]
    time = T0 + rng.randrange(400)
    reviews.append(_review_line(rng, user, asin, float(rng.randrange(1, 6)), time,
                                compact=n % 97 == 5, trap=n % 89 == 7))
  meta = [_meta_line(a, None if k % 11 == 3 else f"Film {k} &amp; <i>More</i>")
          for k, a in enumerate(asins)]
  return reviews, meta


def _json_reviews(lines):
  """(reviewerID, asin, overall, unixReviewTime, line number) by plain json.loads."""
  out = []
  for number, line in enumerate(lines, 1):
    r = json.loads(line)
    out.append((r["reviewerID"], r["asin"], float(r["overall"]), r["unixReviewTime"], number))
  return out


def _reference_core_one_pass(rows, c):
  users = collections.Counter(r[0] for r in rows)
  items = collections.Counter(r[1] for r in rows)
  return [r for r in rows if c["user_min"] <= users[r[0]] <= c["user_max"]
          and c["item_min"] <= items[r[1]] <= c["item_max"]]


def _reference_core(rows, c):
  """Pure-Python core filter: repeat the count bounds until stable, then the top items."""
  while True:
    kept = _reference_core_one_pass(rows, c)
    if kept == rows:
      break
    rows = kept
  items = collections.Counter(r[1] for r in rows)
  top = sorted(items, key=lambda a: (-items[a], a))
  if c["top_items"]:
    top = top[:c["top_items"]]
  return [r for r in rows if r[1] in set(top)]


def _reference_load(review_lines, meta_lines, c):
  """The whole loader in plain Python: titled items, latest of each pair, core."""
  titles = {}
  for line in meta_lines:
    record = json.loads(line)
    titles.setdefault(record["asin"], clean_text(record.get("title", "")))
  rows = [r for r in _json_reviews(review_lines) if titles.get(r[1])]
  latest = {}
  for r in sorted(rows, key=lambda r: (r[0], r[1], r[3], r[4])):
    latest[(r[0], r[1])] = r
  rows = sorted(latest.values(), key=lambda r: r[4])
  return _reference_core(rows, c), titles


def _rows(raw):
  return list(zip(raw.user.tolist(), raw.item.tolist(), raw.rating.tolist(),
                  raw.timestamp.tolist()))


def _same(a, b):
  assert _rows(a) == _rows(b)
  assert a.user.dtype.kind == b.user.dtype.kind == "U"
  assert a.items == b.items and a.users == b.users and a.notes == b.notes


@pytest.mark.parametrize("chunk_bytes", [200, 4096, amazon.CHUNK_BYTES])
@pytest.mark.parametrize("gz", [False, True])
def test_fields_match_json_reading(tmp_path, monkeypatch, chunk_bytes, gz):
  monkeypatch.setattr(amazon, "CHUNK_BYTES", chunk_bytes)
  reviews, _ = _random_dump(seed=1)
  path = _write(tmp_path / "r.json", reviews, gz)
  user, item, rating, timestamp = amazon._read_reviews(path)
  expected = _json_reviews(reviews)
  assert list(zip(user.tolist(), item.tolist(), rating.tolist(), timestamp.tolist())) == \
      [r[:4] for r in expected]
  assert timestamp.dtype == np.int64 and user.dtype.kind == "U" and item.dtype.kind == "U"


def test_last_line_without_newline(tmp_path):
  reviews, _ = _random_dump(seed=2, num_ratings=20)
  path = tmp_path / "r.json"
  path.write_text("\n".join(reviews), encoding="utf-8")
  user, item, rating, timestamp = amazon._read_reviews(path)
  assert list(zip(user.tolist(), item.tolist(), rating.tolist(), timestamp.tolist())) == \
      [r[:4] for r in _json_reviews(reviews)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_core_filter_matches_reference(seed):
  rng = np.random.default_rng(seed)
  n = 400
  user_p = 1 / np.arange(1, 41) ** 0.6
  item_p = 1 / np.arange(1, 61) ** 0.9
  user = np.array([f"U{k:03d}" for k in rng.choice(40, n, p=user_p / user_p.sum())])
  item = np.array([f"I{k:03d}" for k in rng.choice(60, n, p=item_p / item_p.sum())])
  mask = amazon.core_filter(user, item, ml_collections.ConfigDict(SMALL_CORE))
  rows = list(zip(user.tolist(), item.tolist(), range(n)))
  assert np.flatnonzero(mask).tolist() == [r[2] for r in _reference_core(rows, SMALL_CORE)]
  # The fixture needs more than one round, and the top-items cut removes items.
  stable = _reference_core(rows, dict(SMALL_CORE, top_items=0))
  assert len(stable) < len(_reference_core_one_pass(rows, SMALL_CORE))
  assert len({r[1] for r in stable}) > SMALL_CORE["top_items"]


def test_core_filter_breaks_ties_by_asin():
  user = np.array(["U1", "U2", "U1", "U2", "U3"])
  item = np.array(["B2", "B2", "B1", "B1", "B0"])
  c = ml_collections.ConfigDict(dict(NO_CORE, top_items=1))
  assert amazon.core_filter(user, item, c).tolist() == [False, False, True, True, False]


@pytest.mark.parametrize("seed", [0, 5])
def test_load_matches_reference(tmp_path, monkeypatch, seed):
  monkeypatch.setattr(amazon, "CHUNK_BYTES", 3000)
  reviews, meta = _random_dump(seed)
  _write_dump(tmp_path, reviews, meta)
  raw = amazon.load(_cfg(tmp_path, **SMALL_CORE))
  expected, titles = _reference_load(reviews, meta, SMALL_CORE)
  assert _rows(raw) == [r[:4] for r in expected]
  assert raw.rating.dtype == np.float32
  assert sorted(raw.items) == sorted({r[1] for r in expected})
  assert all(raw.items[a]["title"] == titles[a] for a in raw.items)
  assert sorted(raw.users) == sorted({r[0] for r in expected})
  assert len(raw.items) == SMALL_CORE["top_items"]
  assert any(n.startswith("dropped") and "without metadata title" in n for n in raw.notes)
  assert any(n.startswith("core filter") for n in raw.notes)


def test_gz_and_plain_give_the_same_data(tmp_path):
  reviews, meta = _random_dump(seed=3)
  _write_dump(tmp_path / "plain", reviews, meta)
  _write_dump(tmp_path / "gz", reviews, meta, gz=True)
  plain = amazon.load(_cfg(tmp_path / "plain", **SMALL_CORE))
  packed = amazon.load(_cfg(tmp_path / "gz", **SMALL_CORE))
  assert len(plain.user) > 0
  _same(plain, packed)
  assert [p.name for p in amazon.input_files(_cfg(tmp_path / "gz"))] == \
      [f"{CATEGORY}.json.gz", f"meta_{CATEGORY}.json.gz"]


def _warts_dump(folder):
  rng = random.Random(7)
  reviews = [
      _review_line(rng, "A1", "B01", 5.0, T0 + 100),
      _review_line(rng, "A1", "B02", 4.0, T0 + 200),
      _review_line(rng, "A2", "B01", 2.0, T0 + 150),
      _review_line(rng, "A1", "B01", 1.0, T0 + 50),   # repeat of (A1, B01), earlier: dropped
      _review_line(rng, "A2", "B03", 3.0, T0 + 300),  # B03 has no title
      _review_line(rng, "A2", "B01", 5.0, T0 + 150),  # same-time repeat: the later line stays
      _review_line(rng, "A3", "B04", 4.0, T0 + 400),  # B04's first record has a blank title
      _review_line(rng, "A3", "B02", 1.0, T0 + 120, compact=True),
  ]
  meta = [
      _meta_line("B01", "Some Film &amp; More <span class=\"x\">(DVD)</span>"),
      _meta_line("B02", "Caf&eacute;   Noir", categories=("Movies &amp; TV", "", "Drama")),
      _meta_line("B01", "A later duplicate"),
      _meta_line("B03", None),
      _meta_line("B04", "<br />"),
      _meta_line("B04", "Titled only in the repeat"),
  ]
  return _write_dump(folder, reviews, meta)


def test_warts(tmp_path):
  _warts_dump(tmp_path)
  raw = amazon.load(_cfg(tmp_path, **NO_CORE))
  assert sorted(_rows(raw)) == [("A1", "B01", 5.0, T0 + 100), ("A1", "B02", 4.0, T0 + 200),
                                ("A2", "B01", 5.0, T0 + 150), ("A3", "B02", 1.0, T0 + 120)]
  assert raw.items == {
      "B01": {"title": "Some Film & More (DVD)", "categories": ["Movies & TV", "Movies"]},
      "B02": {"title": "Café Noir", "categories": ["Movies & TV", "Drama"]}}
  assert raw.users == {"A1": {}, "A2": {}, "A3": {}}
  assert "dropped 2 ratings of items without metadata title" in raw.notes
  assert any(n.startswith("dropped 2 repeated (user, item) ratings") for n in raw.notes)


def test_untitled_item_is_an_error_when_asked(tmp_path):
  reviews, _ = _warts_dump(tmp_path)
  with pytest.raises(DataError) as e:
    amazon.load(_cfg(tmp_path, unknown_ids="error", **NO_CORE))
  assert e.value.path == str(reviews) and e.value.line == 5
  assert "B03" in str(e.value) and f"{reviews}:5:" in str(e.value)


def _good_lines(n=6):
  rng = random.Random(3)
  return [_review_line(rng, f"A{k}", "B01", 4.0, T0 + k) for k in range(n)]


BAD_LINES = {
    "invalid JSON": ('{"overall": 5.0, "reviewerID": "A9", "asin": "B01", "unixReviewTime": 7',
                     "not valid JSON"),
    "missing field": ('{"overall": 5.0, "reviewerID": "A9", "asin": "B01"}',
                      "missing field 'unixReviewTime'"),
    "non-numeric overall": ('{"overall": "five", "reviewerID": "A9", "asin": "B01", '
                            '"unixReviewTime": 7}', "overall must be a finite number"),
    "infinite overall": ('{"overall": 1e999, "reviewerID": "A9", "asin": "B01", '
                         '"unixReviewTime": 7}', "overall must be a finite number"),
    "fractional time": ('{"overall": 5.0, "reviewerID": "A9", "asin": "B01", '
                        '"unixReviewTime": 7.5}', "unixReviewTime must be a whole number"),
    "text before the object": ('x{"overall": 5.0, "reviewerID": "A9", "asin": "B01", '
                               '"unixReviewTime": 7}', "not valid JSON"),
    "not an object": ('["A9", "B01"]', "expected a JSON object"),
}


@pytest.mark.parametrize("chunk_bytes", [300, amazon.CHUNK_BYTES])
@pytest.mark.parametrize("number", [1, 5])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_review_line_names_file_and_line(tmp_path, monkeypatch, chunk_bytes, number, case):
  monkeypatch.setattr(amazon, "CHUNK_BYTES", chunk_bytes)
  line, message = BAD_LINES[case]
  lines = _good_lines()
  lines.insert(number - 1, line)
  reviews, _ = _write_dump(tmp_path, lines, [_meta_line("B01", "Film")])
  with pytest.raises(DataError) as e:
    amazon.load(_cfg(tmp_path, **NO_CORE))
  assert e.value.path == str(reviews) and e.value.line == number
  assert message in str(e.value) and f"{reviews}:{number}:" in str(e.value)


@pytest.mark.parametrize("chunk_bytes", [300, amazon.CHUNK_BYTES])
def test_invalid_utf8_names_its_line(tmp_path, monkeypatch, chunk_bytes):
  monkeypatch.setattr(amazon, "CHUNK_BYTES", chunk_bytes)
  _write_dump(tmp_path, [], [_meta_line("B01", "Film")])
  data = "".join(line + "\n" for line in _good_lines()).encode()
  lines = data.split(b"\n")
  lines[5] = lines[5].replace(b'"A5"', b'"A\xff5"')
  reviews = tmp_path / f"{CATEGORY}.json"
  reviews.write_bytes(b"\n".join(lines))
  with pytest.raises(DataError) as e:
    amazon.load(_cfg(tmp_path, **NO_CORE))
  assert e.value.path == str(reviews) and e.value.line == 6
  assert "not valid UTF-8" in str(e.value) and f"{reviews}:6:" in str(e.value)


def test_bad_metadata_line_names_file_and_line(tmp_path):
  _, meta = _write_dump(tmp_path, _good_lines(),
                        [_meta_line("B01", "Film"), '{"asin": "B02", "title": "X"', ""])
  with pytest.raises(DataError) as e:
    amazon.load(_cfg(tmp_path, **NO_CORE))
  assert e.value.path == str(meta) and e.value.line == 2 and "not valid JSON" in str(e.value)


@pytest.mark.parametrize("which", ["reviews", "meta"])
def test_empty_file(tmp_path, which):
  reviews, meta = _write_dump(tmp_path, _good_lines(), [_meta_line("B01", "Film")])
  empty = reviews if which == "reviews" else meta
  empty.write_bytes(b"")
  with pytest.raises(DataError) as e:
    amazon.load(_cfg(tmp_path, **NO_CORE))
  assert e.value.path == str(empty) and "empty" in str(e.value)


@pytest.mark.parametrize("which", ["reviews", "meta"])
def test_missing_file_names_folder_and_both_names(tmp_path, which):
  reviews, meta = _write_dump(tmp_path, _good_lines(), [_meta_line("B01", "Film")])
  missing = reviews if which == "reviews" else meta
  missing.unlink()
  with pytest.raises(DataError) as e:
    amazon.load(_cfg(tmp_path, **NO_CORE))
  assert e.value.path == str(tmp_path)
  assert f"{missing.name} nor {missing.name}.gz" in str(e.value)


def test_unset_or_missing_folder(tmp_path):
  with pytest.raises(DataError, match="data.path"):
    amazon.input_files(_cfg(""))
  with pytest.raises(DataError, match="not a folder"):
    amazon.input_files(_cfg(tmp_path / "nowhere"))


def test_truncated_gz(tmp_path):
  reviews, _ = _random_dump(seed=4)
  path, _ = _write_dump(tmp_path, reviews, [_meta_line("B01", "Film")], gz=True)
  path.write_bytes(path.read_bytes()[:-200])
  with pytest.raises(DataError) as e:
    amazon.load(_cfg(tmp_path, **NO_CORE))
  assert e.value.path == str(path) and "truncated" in str(e.value)


def test_build_sample_counts(tmp_path):
  reviews, meta = _random_dump(seed=0, num_ratings=1500)
  _write_dump(tmp_path, reviews, meta)
  core = dict(SMALL_CORE, user_max=60, item_max=100, top_items=40)
  raw = amazon.load(_cfg(tmp_path, **core))
  data = build.build(raw, name="amazon_movies", sampling="chronological", min_history=5,
                     label_threshold=3.0, split=(0.8, 0.1, 0.1))
  rows = sorted(_rows(raw), key=lambda r: (r[3], r[0], r[1]))
  seen = collections.Counter()
  samples = []
  for user, _, rating, _ in rows:
    if seen[user] >= 5:
      samples.append(rating)
    seen[user] += 1
  n = len(samples)
  assert n > 50
  assert data.meta["num_ratings"] == len(rows)
  assert data.meta["num_users"] == len(raw.users) and data.meta["num_items"] == len(raw.items)
  assert data.meta["splits"] == {"train": int(0.8 * n), "valid": int(0.1 * n),
                                 "test": n - int(0.8 * n) - int(0.1 * n)}
  labels = sum(int(data.splits[s].label.sum()) for s in data.splits)
  assert labels == sum(r > 3.0 for r in samples)
  assert data.meta["notes"] == raw.notes
