"""The Book-Crossing loader against hand-made dump files with the real dump's warts."""
import collections
import random
import zipfile

import numpy as np
import pytest

from rallrec_jax import config
from rallrec_jax.data import bookcrossing, build
from rallrec_jax.data.errors import DataError

RATINGS_HEADER = '"User-ID";"ISBN";"Book-Rating"'
BOOKS_HEADER = ('"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";'
                '"Image-URL-S";"Image-URL-M";"Image-URL-L"')
USERS_HEADER = '"User-ID";"Location";"Age"'


def _urls(isbn):
  return ";".join(f'"http://images.amazon.com/images/P/{isbn}.01.{s}ZZZZZZZ.jpg"' for s in "SML")


def _book(isbn, title, author, year, publisher):
  return f'"{isbn}";"{title}";"{author}";"{year}";"{publisher}";{_urls(isbn)}'


BOOKS = [
    _book("034545104X", "Flu: The Story of the Great Influenza Pandemic of 1918",
          "Gina Bari Kolata", 1999, "Farrar Straus &amp; Giroux"),
    # The title swallowed the author: 7 fields.
    '"078946697X";"DK Readers: Creating the X-Men, How It All Began (Level 4: Proficient '
    'Readers)\\";James Buckley";"2000";"DK Publishing Inc";' + _urls("078946697X"),
    _book("3442410665", 'Der \\"Café\\" am Rande der Welt', "John P. Strelecky", 0, "Goldmann"),
    _book("044023722x", "The &quot;Best&quot; of Times", "Anna M&#39;Müller", 2002,
          "Dell &amp;amp; Co"),
    # A title broken over two lines.
    _book("0002005018", "Clara Callan:\nA Novel", "Richard Bruce Wright", 2001,
          "HarperFlamingo Canada"),
    _book("3257224281", "Die Blechtrommel", "Günter Grass", 1993, "Diogenes"),
    # Longer than any rating's ISBN; its first 13 characters are an unknown rating's ISBN.
    _book("12345678901234", "Long ISBN", "Nobody", 2010, "Nowhere"),
]
ITEMS = {
    "034545104X": {"title": "Flu: The Story of the Great Influenza Pandemic of 1918",
                   "author": "Gina Bari Kolata", "year": 1999,
                   "publisher": "Farrar Straus & Giroux"},
    "078946697X": {"title": "DK Readers: Creating the X-Men, How It All Began (Level 4: "
                            "Proficient Readers)",
                   "author": "James Buckley", "year": 2000, "publisher": "DK Publishing Inc"},
    "3442410665": {"title": 'Der "Café" am Rande der Welt', "author": "John P. Strelecky",
                   "year": None, "publisher": "Goldmann"},
    "044023722X": {"title": 'The "Best" of Times', "author": "Anna M'Müller", "year": 2002,
                   "publisher": "Dell & Co"},
    "0002005018": {"title": "Clara Callan: A Novel", "author": "Richard Bruce Wright",
                   "year": 2001, "publisher": "HarperFlamingo Canada"},
    "3257224281": {"title": "Die Blechtrommel", "author": "Günter Grass", "year": 1993,
                   "publisher": "Diogenes"},
    "12345678901234": {"title": "Long ISBN", "author": "Nobody", "year": 2010,
                       "publisher": "Nowhere"},
}
USERS = [
    '"1";"nyc, new york, usa";NULL',
    '"2";"stockton, california, usa";"18"',
    '"3";"münchen, bayern, germany";NULL',
    '"4";"porto, v.n.gaia, portugal";"17"',
    '"5";"farnborough, hants, n/a";NULL',
    '"6";"santa monica, california, ";"61"',
    '"7";"washington, dc,\r\nusa";"24"',
    '"8";"l&#39;aquila, abruzzo, \\"italy\\"";"30"',
]
PROFILES = {
    1: {"location": "nyc, new york, usa", "country": "usa", "age": None},
    2: {"location": "stockton, california, usa", "country": "usa", "age": 18},
    3: {"location": "münchen, bayern, germany", "country": "germany", "age": None},
    4: {"location": "porto, v.n.gaia, portugal", "country": "portugal", "age": 17},
    5: {"location": "farnborough, hants, n/a", "country": None, "age": None},
    6: {"location": "santa monica, california,", "country": None, "age": 61},
    7: {"location": "washington, dc, usa", "country": "usa", "age": 24},
    8: {"location": 'l\'aquila, abruzzo, "italy"', "country": '"italy"', "age": 30},
}
RATINGS = [
    '"1";"034545104x";"0"',       # case differs from BX-Books
    '"2";"078946697X";"5"',
    '"3";"3442410665";"9"',
    '"4";"044023722X";"7"',       # BX-Books has 044023722x
    '"5";"0000000000";"8"',       # book missing from BX-Books
    '"99";"3257224281";"3"',      # user missing from BX-Users
    '"6";"0002005018";"10"',
    '"1234567890123";"1234567890123";"2"',  # user and book missing
    '"7";"3257224281";"6"',
    '"8";"1234567890123";"1"',    # book missing (a prefix of a longer known ISBN)
]


def _cfg(path, unknown_ids="drop", encoding="latin-1"):
  c = config.base_config().data
  c.name = "bookcrossing"
  c.path = str(path)
  c.unknown_ids = unknown_ids
  c.encoding = encoding
  return c


def _file(header, rows, newline="\n"):
  return (newline.join([header, *rows]) + newline).encode("latin-1")


def _write_dump(folder, ratings=RATINGS, books=BOOKS, users=USERS):
  """The three files: ratings and books with '\\n', users with Windows line ends."""
  folder.mkdir(parents=True, exist_ok=True)
  contents = {"BX-Book-Ratings.csv": _file(RATINGS_HEADER, ratings),
              "BX-Books.csv": _file(BOOKS_HEADER, books),
              "BX-Users.csv": _file(USERS_HEADER, users, "\r\n")}
  for name, data in contents.items():
    (folder / name).write_bytes(data)
  return folder


def _write_zip(folder, path):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for name in bookcrossing.NAMES:
      z.write(folder / name, name)
  return path


@pytest.fixture
def dump(tmp_path):
  return _write_dump(tmp_path / "BX-CSV-Dump")


def test_fixture_has_the_warts(dump):
  books = (dump / "BX-Books.csv").read_bytes()
  assert "ü".encode("latin-1") in books and b'\\"' in books and b"&amp;" in books
  assert b"\r\n" in (dump / "BX-Users.csv").read_bytes()
  assert b"\r" not in (dump / "BX-Book-Ratings.csv").read_bytes()


def test_books_and_users_fields(dump):
  data = bookcrossing.load(_cfg(dump))
  assert data.items == ITEMS
  assert data.users == PROFILES
  assert all(type(k) is str for k in data.items)
  assert all(type(k) is int for k in data.users)


def test_ratings_join_case_insensitively_and_drop_unknown(dump):
  data = bookcrossing.load(_cfg(dump))
  assert data.user.dtype == np.int64 and data.user.tolist() == [1, 2, 3, 4, 6, 7]
  assert data.item.dtype.kind == "U"
  assert data.item.tolist() == ["034545104X", "078946697X", "3442410665", "044023722X",
                                "0002005018", "3257224281"]
  assert data.rating.dtype == np.float32 and data.rating.tolist() == [0, 5, 9, 7, 10, 6]
  assert data.timestamp.dtype == np.int64 and data.timestamp.tolist() == list(range(6))
  assert data.notes == ["dropped 3 ratings of books missing from BX-Books.csv",
                        "dropped 1 ratings of users missing from BX-Users.csv"]
  assert set(np.unique(data.item).tolist()) <= set(data.items)
  assert set(np.unique(data.user).tolist()) <= set(data.users)


def test_error_policy_names_the_first_unknown_book(dump):
  with pytest.raises(DataError, match=r"BX-Book-Ratings\.csv:6: .*unknown book.*0000000000"):
    bookcrossing.load(_cfg(dump, unknown_ids="error"))


def test_error_policy_names_the_first_unknown_user(tmp_path):
  ratings = [r for r in RATINGS if "0000000000" not in r and "1234567890123" not in r]
  folder = _write_dump(tmp_path, ratings=ratings)
  with pytest.raises(DataError, match=r"BX-Book-Ratings\.csv:6: .*unknown user 99"):
    bookcrossing.load(_cfg(folder, unknown_ids="error"))


def test_zip_gives_the_same_data(dump, tmp_path):
  archive = _write_zip(dump, tmp_path / "BX-CSV-Dump.zip")
  a, b = bookcrossing.load(_cfg(dump)), bookcrossing.load(_cfg(archive))
  for name in ("user", "item", "rating", "timestamp"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert (a.items, a.users, a.notes) == (b.items, b.users, b.notes)
  assert bookcrossing.input_files(_cfg(archive)) == [archive]
  assert bookcrossing.input_files(_cfg(dump)) == [dump / n for n in bookcrossing.NAMES]


def _replace(rows, index, row):
  return rows[:index] + [row] + rows[index + 1:]


RATINGS_FILE, BOOKS_FILE, USERS_FILE = bookcrossing.NAMES

# case -> (file, line, words of the message, rows for _write_dump or the file's raw bytes)
BAD = {
    "comma separated": (RATINGS_FILE, 1, "expected the header",
                        b'"User-ID","ISBN","Book-Rating"\n"1","034545104X","5"\n'),
    "books comma separated": (BOOKS_FILE, 1, "expected the header",
                              BOOKS_HEADER.replace(";", ",").encode() + b"\n"),
    "non-numeric rating": (RATINGS_FILE, 4, "Book-Rating is not an integer",
                           dict(ratings=_replace(RATINGS, 2, '"3";"3442410665";"nine"'))),
    "rating above 10": (RATINGS_FILE, 5, "0..10, got 11",
                        dict(ratings=_replace(RATINGS, 3, '"4";"044023722X";"11"'))),
    "two columns": (RATINGS_FILE, 3, "expected 3 quoted fields",
                    dict(ratings=_replace(RATINGS, 1, '"2";"078946697X"'))),
    "four numeric columns": (RATINGS_FILE, 9, "expected 3 quoted fields",
                             dict(ratings=_replace(RATINGS, 7, '"6";"0002005018";"10";"5"'))),
    "non-numeric user": (RATINGS_FILE, 2, "User-ID is not an integer",
                         dict(ratings=_replace(RATINGS, 0, '"u1";"034545104x";"0"'))),
    "blank line": (RATINGS_FILE, 3, "expected 3 quoted fields",
                   dict(ratings=_replace(RATINGS, 1, ""))),
    "empty ratings": (RATINGS_FILE, 1, "empty", b""),
    "header only": (RATINGS_FILE, 2, "no data rows", RATINGS_HEADER.encode() + b"\r\n"),
    # Line 8: the book before it spans lines 6 and 7.
    "books row of 9 fields": (BOOKS_FILE, 8, "expected 8 quoted fields", dict(
        books=BOOKS[:5] + [_book("3257224281", "A", "B", 1993, "C") + ';"extra"'])),
    "books row of 7 fields, nothing to split": (BOOKS_FILE, 3, "found 7", dict(
        books=_replace(BOOKS, 1, '"078946697X";"Title";"2000";"DK";' + _urls("078946697X")))),
    "books row with a bare quote": (BOOKS_FILE, 4, "expected 8 quoted fields", dict(
        books=_replace(BOOKS, 2, _book("3442410665", 'Der "Café"', "J", 2000, "G")))),
    "users bad age": (USERS_FILE, 5, "integer or NULL",
                      dict(users=_replace(USERS, 3, '"4";"porto, portugal";"seventeen"'))),
    # Line 11: a location before it spans lines 8 and 9.
    "users row after a broken location": (USERS_FILE, 11, "integer User-ID",
                                          dict(users=USERS + ['"x9";"a, b";NULL'])),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_and_line(tmp_path, case):
  name, line, words, change = BAD[case]
  folder = _write_dump(tmp_path, **({} if isinstance(change, bytes) else change))
  if isinstance(change, bytes):
    (folder / name).write_bytes(change)
  with pytest.raises(DataError) as e:
    bookcrossing.load(_cfg(folder))
  assert str(e.value).startswith(f"{folder / name}:{line}: "), str(e.value)
  assert words in str(e.value)


def test_undecodable_byte_names_its_line(dump):
  with pytest.raises(DataError, match=r"BX-Books\.csv:4: .*utf-8"):
    bookcrossing.load(_cfg(dump, encoding="utf-8"))


def test_missing_file_is_named(dump):
  (dump / "BX-Users.csv").unlink()
  with pytest.raises(DataError, match=r"BX-Users\.csv: missing file"):
    bookcrossing.load(_cfg(dump))


def test_missing_file_in_zip_is_named(dump, tmp_path):
  archive = tmp_path / "BX-CSV-Dump.zip"
  with zipfile.ZipFile(archive, "w") as z:
    z.write(dump / "BX-Books.csv", "BX-Books.csv")
  with pytest.raises(DataError, match=r"BX-CSV-Dump\.zip:BX-Users\.csv: missing file"):
    bookcrossing.load(_cfg(archive))


def test_truncated_zip_is_named(dump, tmp_path):
  archive = _write_zip(dump, tmp_path / "BX-CSV-Dump.zip")
  archive.write_bytes(archive.read_bytes()[:len(archive.read_bytes()) // 2])
  with pytest.raises(DataError, match=r"BX-CSV-Dump\.zip.*truncated"):
    bookcrossing.load(_cfg(archive))


def test_missing_path_is_named(tmp_path):
  with pytest.raises(DataError, match="no such file or folder"):
    bookcrossing.load(_cfg(tmp_path / "nowhere"))


def _random_dump(seed, num_users=30):
  """Ratings of `num_users` users with 1..10 ratings each, a few of unknown books.

  Returns the rows as written and, per user, its (ISBN, rating) pairs that should survive.
  """
  rng = random.Random(seed)
  isbns = [f"{i:09d}{rng.choice('0123456789Xx')}" for i in range(60)]
  books = [_book(isbn, f"Title {i} &amp; Café", "Müller", 1990 + i % 20, "P")
           for i, isbn in enumerate(isbns)]
  users = [f'"{u}";"city, state, country{u}";"{20 + u}"' for u in range(1, num_users + 1)]
  ratings, kept = [], collections.defaultdict(list)
  for u in range(1, num_users + 1):
    for isbn in rng.sample(isbns, (u * 7) % 10 + 1):
      rating = rng.randrange(11)
      ratings.append(f'"{u}";"{isbn.swapcase() if rng.random() < 0.3 else isbn}";"{rating}"')
      kept[u].append((isbn.upper(), float(rating)))
    if u % 6 == 0:
      ratings.append(f'"{u}";"9999999999";"7"')
  rng.shuffle(ratings)
  return books, users, ratings, kept


def _build(raw, seed=42):
  return build.build(raw, name="bookcrossing", sampling="per_user_random", min_history=4,
                     label_threshold=4.0, split=(0.8, 0.1, 0.1), seed=seed)


def test_build_one_sample_per_user_with_five_ratings(tmp_path):
  books, users, ratings, kept = _random_dump(seed=3)
  raw = bookcrossing.load(_cfg(_write_dump(tmp_path, ratings, books, users)))
  assert raw.notes == ["dropped 5 ratings of books missing from BX-Books.csv"]
  ds = _build(raw)
  eligible = {u for u, pairs in kept.items() if len(pairs) >= 5}
  assert 0 < len(eligible) < len(kept)
  n = len(eligible)
  assert ds.meta["splits"] == {"train": int(0.8 * n), "valid": int(0.1 * n),
                               "test": n - int(0.8 * n) - int(0.1 * n)}
  seen, labels = [], []
  for split, samples in ds.splits.items():
    for i in range(len(samples)):
      user = ds.users[samples.user[i]]["raw_id"]
      seen.append(user)
      target = ds.items[samples.target[i]]["raw_id"]
      items, ratings_, _ = ds.history(split, i)
      history = [(ds.items[j]["raw_id"], float(r)) for j, r in zip(items, ratings_)]
      assert sorted(history + [(target, float(samples.rating[i]))]) == sorted(kept[user])
      assert samples.pos[i] == len(kept[user]) - 1
      assert samples.label[i] == (samples.rating[i] >= 5)
      labels.append(int(samples.label[i]))
  assert sorted(seen) == sorted(eligible)
  assert 0 < sum(labels) < n
  assert all(d["title"].endswith("& Café") and d["author"] == "Müller" for d in ds.items)
  assert ds.meta["notes"] == raw.notes


def test_build_is_deterministic_per_seed(tmp_path):
  books, users, ratings, _ = _random_dump(seed=5)
  raw = bookcrossing.load(_cfg(_write_dump(tmp_path, ratings, books, users)))
  a, b, c = _build(raw), _build(raw), _build(raw, seed=7)
  for split in a.splits:
    for field in ("user", "target", "rating", "pos"):
      np.testing.assert_array_equal(getattr(a.splits[split], field),
                                    getattr(b.splits[split], field))
  np.testing.assert_array_equal(a.timelines.item, b.timelines.item)
  assert not all(np.array_equal(a.splits[s].user, c.splits[s].user) for s in a.splits)
