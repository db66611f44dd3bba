"""Malformed raw files of every loader: a one-line error naming the file and line, and an
earlier good `W/data/` left byte for byte as it was; repeated ratings keep the latest."""
import json
import logging
import random
import re

import numpy as np
import pytest

from rallrec_jax import data, pipeline
from rallrec_jax.data import bookcrossing, raw
from tests import test_amazon, test_bookcrossing
from tests.test_config import load_config
from tests.test_movielens import ML1M_MOVIES, ML1M_USERS, random_ratings, write_ml1m

LAST = -1           # the last line, cut off without its newline as an interrupted copy leaves it
FUTURE = 4102444800  # 2100-01-01
HUGE = 99999999999999999999
REVIEWS = f"{test_amazon.CATEGORY}.json"
BX_RATINGS, _, BX_USERS = bookcrossing.NAMES


def write_ml100k(folder, ratings):
  """u.data, u.item and u.user in the GroupLens 100K format."""
  folder.mkdir(parents=True, exist_ok=True)
  flags = "|".join("1" if g == 8 else "0" for g in range(19))
  (folder / "u.item").write_bytes("".join(
      f"{i}|{title}|01-Jan-1995||http://us.imdb.com/x|{flags}\n"
      for i, title, _ in ML1M_MOVIES).encode("latin-1"))
  (folder / "u.user").write_bytes("".join(
      f"{u}|{age}|{gender}|writer|{zip_code}\n"
      for u, gender, age, _, zip_code in ML1M_USERS).encode("latin-1"))
  (folder / "u.data").write_bytes("".join(
      "\t".join(map(str, r)) + "\n" for r in ratings).encode("latin-1"))


def write_bookcrossing(folder):
  books, users, ratings, _ = test_bookcrossing._random_dump(seed=3)
  test_bookcrossing._write_dump(folder, ratings, books, users)


def write_amazon(folder):
  reviews, meta = test_amazon._random_dump(seed=0)
  test_amazon._write_dump(folder, reviews, meta)


WRITERS = {
    "ml100k": lambda folder: write_ml100k(folder, random_ratings()),
    "ml1m": lambda folder: write_ml1m(folder, random_ratings()),
    "bookcrossing": write_bookcrossing,
    "amazon_movies": write_amazon,
}


def config(name, folder):
  """The dataset's own config file, with a core filter that keeps the tiny Amazon dump."""
  cfg = load_config(name, f"path={folder}")
  if name == "amazon_movies":
    cfg.data.amazon.update(user_min=1, user_max=1000, item_min=1, item_max=1000, top_items=0)
  return cfg


def review(overall=4.0, time=test_amazon.T0, user="A0001", asin="B000000001"):
  """One reviews line in the dump's usual form."""
  return json.dumps({"reviewerID": user, "asin": asin, "overall": overall,
                     "unixReviewTime": time, "summary": "ok"})


def cut(line):
  return line[:len(line) // 2]


# case -> (dataset, file, line (LAST: the last one, cut off), new line or a function of the old
# one, what the message says after "file:line: ")
CASES = {
    "ml100k rating 7": ("ml100k", "u.data", 3, "1\t2\t7\t978300000",
                        "rating must be a whole number in 1..5, got 7"),
    "ml100k rating 0": ("ml100k", "u.data", 5, "1\t2\t0\t978300000",
                        "rating must be a whole number in 1..5, got 0"),
    "ml100k half star": ("ml100k", "u.data", 2, "1\t2\t3.5\t978300000",
                         "rating is not an integer: '3.5'"),
    "ml100k negative timestamp": ("ml100k", "u.data", 4, "1\t2\t3\t-5",
                                  "timestamp must be seconds since 1970 between 1990-01-01 and "
                                  r"\d{4}-\d\d-\d\d, got -5"),
    "ml100k timestamp in 2100": ("ml100k", "u.data", 6, f"1\t2\t3\t{FUTURE}",
                                 f"timestamp must be .*, got {FUTURE}"),
    "ml100k timestamp beyond int64": ("ml100k", "u.data", 7, f"1\t2\t3\t{HUGE}",
                                      f"timestamp is out of range: '{HUGE}'"),
    "ml100k truncated last line": ("ml100k", "u.data", LAST, lambda line: line[:-6],
                                   "timestamp must be .*, got 978$"),
    "ml100k last line without its timestamp": ("ml100k", "u.data", LAST,
                                               lambda line: line.rsplit(b"\t", 1)[0],
                                               "expected 4 fields .*, found 3"),
    "ml100k user 0": ("ml100k", "u.data", 8, "0\t2\t3\t978300000",
                      "user must be a positive integer, got 0"),
    "ml100k negative item": ("ml100k", "u.data", 9, "1\t-2\t3\t978300000",
                             "item must be a positive integer, got -2"),
    "ml100k item id 0 in u.item": ("ml100k", "u.item", 2, lambda line: b"0" + line[1:],
                                   "id must be a positive integer below 2\\*\\*63, got '0'"),
    "ml100k short u.user line": ("ml100k", "u.user", 2, b"2|56|M",
                                 r"expected 5 fields separated by '\|', found 3"),
    "ml1m rating 6": ("ml1m", "ratings.dat", 10, "2::3::6::978300000",
                      "rating must be a whole number in 1..5, got 6"),
    "ml1m timestamp of 1973": ("ml1m", "ratings.dat", 11, "2::3::4::100000000",
                               "timestamp must be .*, got 100000000"),
    "ml1m item beyond int64": ("ml1m", "ratings.dat", 12, f"2::{HUGE}::4::978300000",
                               f"item is out of range: '{HUGE}'"),
    "ml1m truncated last line": ("ml1m", "ratings.dat", LAST, cut, "expected 4 fields"),
    "ml1m user id 0 in users.dat": ("ml1m", "users.dat", 1, b"0::F::1::10::48067",
                                    "id must be a positive integer"),
    "bookcrossing rating 11": ("bookcrossing", BX_RATINGS, 4, '"3";"000000000X";"11"',
                               "Book-Rating must be a whole number in 0..10, got 11"),
    "bookcrossing rating -1": ("bookcrossing", BX_RATINGS, 5, '"3";"000000000X";"-1"',
                               r"Book-Rating is not an integer in 0..10: '-1'"),
    "bookcrossing User-ID 0": ("bookcrossing", BX_RATINGS, 6, '"0";"000000000X";"5"',
                               "User-ID must be a positive integer, got 0"),
    "bookcrossing two fields": ("bookcrossing", BX_RATINGS, 7, '"3";"000000000X"',
                                "expected 3 quoted fields"),
    "bookcrossing truncated last line": ("bookcrossing", BX_RATINGS, LAST, cut,
                                         "expected 3 quoted fields"),
    "bookcrossing user 0 in BX-Users": ("bookcrossing", BX_USERS, 3, '"0";"a, b, c";"30"',
                                        "User-ID must be a positive integer below 2\\*\\*63"),
    "amazon overall 7": ("amazon_movies", REVIEWS, 3, review(overall=7.0),
                         "overall must be a whole number in 1..5, got 7.0"),
    "amazon overall 0": ("amazon_movies", REVIEWS, 40, review(overall=0.0),
                         "overall must be a whole number in 1..5, got 0.0"),
    "amazon half star": ("amazon_movies", REVIEWS, 41, review(overall=4.5),
                         "overall must be a whole number in 1..5, got 4.5"),
    "amazon negative time": ("amazon_movies", REVIEWS, 5, review(time=-5),
                             "unixReviewTime must be a whole number of seconds >= 0, got -5"),
    "amazon time of 1970": ("amazon_movies", REVIEWS, 6, review(time=87),
                            "unixReviewTime must be seconds since 1970 between 1990-01-01"),
    "amazon time in 2100": ("amazon_movies", REVIEWS, 7, review(time=FUTURE),
                            f"unixReviewTime must be .*, got {FUTURE}"),
    "amazon time beyond int64": ("amazon_movies", REVIEWS, 8, review(time=HUGE),
                                 f"unixReviewTime must be a whole number .*, got {HUGE}"),
    "amazon empty reviewerID": ("amazon_movies", REVIEWS, 9, review(user=""),
                                "reviewerID must be a non-empty string, got ''"),
    "amazon truncated last line": ("amazon_movies", REVIEWS, LAST, cut, "not valid JSON"),
}


def replace_line(path, line, change):
  """Put `change` (bytes, text or a function of the old line) at `line`; its number."""
  lines = path.read_bytes().split(b"\n")[:-1]
  index = len(lines) - 1 if line == LAST else line - 1
  new = change(lines[index]) if callable(change) else change
  lines[index] = new.encode("latin-1") if isinstance(new, str) else new
  path.write_bytes(b"\n".join(lines) + (b"" if line == LAST else b"\n"))
  return index + 1


def tree(path):
  return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
          if p.is_file()}


@pytest.fixture
def prepared(tmp_path):
  """Writes a dataset's good raw files and prepares them into a workdir: (folder, workdir)."""
  def prepare(name):
    folder, workdir = tmp_path / "raw", tmp_path / "w"
    WRITERS[name](folder)
    assert pipeline.run(config(name, folder), workdir, stages=["prepare"]) == {"prepare": "ran"}
    return folder, workdir
  return prepare


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_line_is_named_and_the_earlier_data_kept(prepared, case):
  name, file, line, change, message = CASES[case]
  folder, workdir = prepared(name)
  before = tree(workdir)
  number = replace_line(folder / file, line, change)
  # force: the rerun must not hinge on the mtime resolution of the fingerprint cache.
  with pytest.raises(data.DataError) as e:
    pipeline.run(config(name, folder), workdir, stages=["prepare"], force=True)
  assert "\n" not in str(e.value)
  assert (e.value.path, e.value.line) == (str(folder / file), number)
  assert str(e.value).startswith(f"{folder / file}:{number}: "), str(e.value)
  assert re.match(message, e.value.message), e.value.message
  assert tree(workdir) == before


def rating_of(ds, user, item):
  """The rating of raw (user, item) in the prepared timelines."""
  u = [x["raw_id"] for x in ds.users].index(user)
  row = slice(ds.timelines.offsets[u], ds.timelines.offsets[u + 1])
  items = [ds.items[i]["raw_id"] for i in ds.timelines.item[row]]
  return float(ds.timelines.rating[row][items.index(item)])


REPEATS = {
    "ml100k": ("u.data", lambda u, i, r: "\t".join(map(str, (u, i, r, 1_600_000_000)))),
    "ml1m": ("ratings.dat", lambda u, i, r: f"{u}::{i}::{r}::1600000000"),
    "bookcrossing": (BX_RATINGS, lambda u, i, r: f'"{u}";"{i}";"{r}"'),
    "amazon_movies": (REVIEWS, lambda u, i, r: review(float(r), 1_600_000_000, u, i)),
}


@pytest.mark.parametrize("name", sorted(REPEATS))
def test_repeated_rating_keeps_the_latest_and_says_so(prepared, caplog, name):
  folder, workdir = prepared(name)
  good = data.load_dataset(workdir)
  user = good.users[0]["raw_id"]
  item = good.items[good.timelines.item[0]]["raw_id"]
  new = 2 if rating_of(good, user, item) == 1 else 1
  file, line_of = REPEATS[name]
  with open(folder / file, "ab") as f:
    f.write(line_of(user, item, new).encode("latin-1") + b"\n")
  with caplog.at_level(logging.INFO, logger="rallrec_jax"):
    pipeline.run(config(name, folder), workdir, stages=["prepare"], force=True)
  ds = data.load_dataset(workdir)
  assert rating_of(ds, user, item) == new
  assert ds.meta["num_ratings"] == good.meta["num_ratings"]
  note = next(n for n in ds.meta["notes"] if "repeated (user, item) ratings" in n)
  assert note.endswith("keeping the latest")
  assert sum(note in r.getMessage() for r in caplog.records) == 1


def test_latest_per_pair_breaks_time_ties_by_file_order():
  rng = random.Random(0)
  rows = [(rng.randrange(4), rng.choice("abc"), rng.randrange(3)) for _ in range(60)]
  latest = {}
  for n, (user, item, time) in enumerate(rows):
    if (user, item) not in latest or time >= rows[latest[(user, item)]][2]:
      latest[(user, item)] = n
  user, item, time = (np.array(column) for column in zip(*rows))
  notes = []
  keep = raw.latest_per_pair(user, item, time, notes)
  assert np.flatnonzero(keep).tolist() == sorted(latest.values())
  assert notes == [f"dropped {60 - len(latest)} repeated (user, item) ratings, keeping the latest"]
