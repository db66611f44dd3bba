"""Book-Crossing (Ziegler et al. 2005): the three files of the original BX-CSV-Dump.

The dump is a MySQL export: `;`-separated, every field double-quoted, a quote inside a field
written `\\"`, latin-1 text with HTML entities. Its known warts are handled here: BX-Books rows
whose title swallowed the author (7 fields instead of 8), fields broken over lines, Windows line
ends, ISBNs whose case differs between files, and ratings of books or users missing from their
files (`data.unknown_ids`). The ~1.15M ratings are checked by one regex pass over the whole
file, then split and cast by numpy; books and users are parsed row by row.
"""
import re

import numpy as np

from rallrec_jax.data import raw
from rallrec_jax.data.errors import DataError

RATINGS = "BX-Book-Ratings.csv"
BOOKS = "BX-Books.csv"
USERS = "BX-Users.csv"
NAMES = (RATINGS, BOOKS, USERS)

_COLUMNS = {
    RATINGS: ("User-ID", "ISBN", "Book-Rating"),
    BOOKS: ("ISBN", "Book-Title", "Book-Author", "Year-Of-Publication", "Publisher",
            "Image-URL-S", "Image-URL-M", "Image-URL-L"),
    USERS: ("User-ID", "Location", "Age"),
}

# A ratings row is one line; the ISBN is taken loosely (it only has to be found in BX-Books);
# the field count is checked separately, by counting the '";"' separators.
_RATING_ROW = re.compile(r'^"[0-9]{1,18}";"[^\n]*?";"[0-9]{1,18}"$', re.M)
_INT = re.compile(r"[0-9]{1,18}")
_MAX_RATING = 10

# A quoted field: anything but a bare quote, backslash escapes included; it may span lines.
_Q = r'"([^"\\]*(?:\\.[^"\\]*)*)"'
_END = r"(?=\n|\Z)"
_BOOK_ROW = re.compile(";".join([_Q] * 8) + _END, re.S)
_BOOK_ROW_7 = re.compile(";".join([_Q] * 7) + _END, re.S)
_USER_ROW = re.compile(rf'"([0-9]+)";{_Q};(?:NULL|"([0-9]+)")' + _END, re.S)
_ESCAPE = re.compile(r"\\(.)", re.S)
_YEAR = re.compile(r"[0-9]+")


def input_files(cfg):
  """The raw files whose content decides what `load(cfg)` returns."""
  return raw.Source(cfg.path).fingerprint_files(list(NAMES))


def load(cfg):
  """Ratings, books and users of the dump at `cfg.path` (a folder or BX-CSV-Dump.zip).

  Ratings of books or users missing from their files are dropped with a note, or raise,
  per `cfg.unknown_ids`; of a book a user rated twice the later row is kept. Users are not
  filtered by history length: the build step does that.
  """
  source = raw.Source(cfg.path)
  items = _books(source, cfg)
  users = _users(source, cfg)
  user, item, rating = _ratings(source, cfg)
  where = source.where(RATINGS)
  book_ok = raw.check_known(item, items, where, "book", cfg.unknown_ids, 2)
  user_ok = raw.check_known(user, users, where, "user", cfg.unknown_ids, 2)
  keep = book_ok & user_ok
  notes = _drop_notes(int((~book_ok).sum()), int((book_ok & ~user_ok).sum()))
  keep[keep] = raw.latest_per_pair(user[keep], item[keep], np.flatnonzero(keep), notes)
  return raw.RawData(user=user[keep], item=item[keep], rating=rating[keep].astype(np.float32),
                     timestamp=np.arange(int(keep.sum()), dtype=np.int64), items=items,
                     users=users, notes=notes)


def _drop_notes(books, users):
  notes = []
  if books:
    notes.append(f"dropped {books} ratings of books missing from {BOOKS}")
  if users:
    notes.append(f"dropped {users} ratings of users missing from {USERS}")
  return notes


def _body(source, name, cfg):
  """Text of `name` after its header line (checked), with '\\n' line ends; starts at line 2."""
  where = source.where(name)
  text = raw.decode(source.read(name), where, cfg.encoding).replace("\r\n", "\n").rstrip("\n")
  if not text.strip():
    raise DataError(where, "file is empty", 1)
  header = ";".join(f'"{c}"' for c in _COLUMNS[name])
  first, _, body = text.partition("\n")
  if first != header:
    raise DataError(where, f"expected the header {header} (quoted fields separated by ';'), "
                    f"found {first[:120]!r}", 1)
  if not body.strip():
    raise DataError(where, "no data rows after the header", 2)
  return body


def _line(body, pos):
  return 2 + body.count("\n", 0, pos)


def _unescape(text):
  return _ESCAPE.sub(r"\1", text) if "\\" in text else text


def _rows(body, where, patterns, expected):
  """The match of each row, by the first of `patterns` that fits where the row starts."""
  pos = 0
  while pos < len(body):
    m = next((m for m in (p.match(body, pos) for p in patterns) if m), None)
    if m is None:
      shown = body[pos:pos + 160].split("\n")[0]
      raise DataError(where, f"expected {expected}, found {shown!r}", _line(body, pos))
    yield m
    pos = m.end() + 1


def _books(source, cfg):
  """ISBN (upper case) -> title, author, year, publisher; the first row of an ISBN wins."""
  where = source.where(BOOKS)
  body = _body(source, BOOKS, cfg)
  expected = f"{len(_COLUMNS[BOOKS])} quoted fields separated by ';'"
  items = {}
  for m in _rows(body, where, (_BOOK_ROW, _BOOK_ROW_7), expected):
    isbn, title, author, year, publisher = _book_fields(m, body, where)
    items.setdefault(_unescape(isbn).upper(), {
        "title": _text(title), "author": _text(author), "year": _year(year),
        "publisher": _text(publisher)})
  return items


def _book_fields(m, body, where):
  """ISBN, title, author, year and publisher of a row, mending a 7-field row.

  In a 7-field row an escaped quote before ';' glued title and author into one field.
  """
  fields = m.groups()
  if m.re is _BOOK_ROW:
    return fields[:5]
  title, sep, author = fields[1].rpartition('\\";')
  if not sep:
    raise DataError(where, f"expected 8 quoted fields separated by ';', found 7 and no escaped "
                    f"quote before ';' to split title and author in {fields[1][:120]!r}",
                    _line(body, m.start()))
  return fields[0], title, author, fields[2], fields[3]


def _text(field):
  return raw.clean_text(_unescape(field))


def _year(field):
  """Year of publication; 0 (the dump's unknown) or a non-number is None."""
  return (int(field) or None) if _YEAR.fullmatch(field) else None


def _users(source, cfg):
  """User id -> location, country (its last comma part) and age (None for NULL)."""
  where = source.where(USERS)
  body = _body(source, USERS, cfg)
  expected = ('"User-ID";"Location";"Age" with an integer User-ID and an Age that is an '
              "integer or NULL")
  users = {}
  for m in _rows(body, where, (_USER_ROW,), expected):
    uid, location, age = m.groups()
    if not 1 <= int(uid) <= raw.MAX_ID:
      raise DataError(where, f"User-ID must be a positive integer below 2**63, got {uid[:40]!r}",
                      _line(body, m.start()))
    location = _text(location)
    users.setdefault(int(uid), {"location": location, "country": _country(location),
                                "age": None if age is None else int(age)})
  return users


def _country(location):
  country = location.rsplit(",", 1)[-1].strip()
  return None if country.lower() in ("", "n/a") else country


def _ratings(source, cfg):
  """User ids (int64), ISBNs (upper case) and ratings (int64) of every ratings row, in order."""
  where = source.where(RATINGS)
  body = _body(source, RATINGS, cfg)
  n = body.count("\n") + 1
  if len(_RATING_ROW.findall(body)) != n or body.count('";"') != 2 * n:
    _raise_bad_rating(body, where)
  # Every line is now "user";"isbn";"rating": drop the outer quotes, split on the inner ones.
  fields = body.upper()[1:-1].replace('"\n"', '";"').split('";"')
  user = np.array(fields[0::3], dtype=np.int64)
  rating = np.array(fields[2::3], dtype=np.int64)
  raw.check_ids(user, where, "User-ID", 2)
  raw.check_scale(rating, 0, _MAX_RATING, where, "Book-Rating", 2)
  return user, _unescape_all(np.array(fields[1::3])), rating


def _unescape_all(item):
  """Unescape the few ISBNs that hold a backslash."""
  escaped = np.flatnonzero(np.strings.find(item, "\\") >= 0)
  item[escaped] = [_unescape(str(s)) for s in item[escaped]]
  return item


def _raise_bad_rating(body, where):
  """Name the first ratings row that is not "integer";"ISBN";"integer 0..10"."""
  for i, line in enumerate(body.split("\n")):
    if line.count('";"') == 2 and _RATING_ROW.fullmatch(line):
      continue
    fields = line[1:-1].split('";"') if len(line) > 1 and line[0] == line[-1] == '"' else []
    if len(fields) != 3:
      message = (f"expected 3 quoted fields separated by ';' (User-ID, ISBN, Book-Rating), "
                 f"found {line[:120]!r}")
    elif not _INT.fullmatch(fields[0]):
      message = f"User-ID is not an integer: {fields[0][:40]!r}"
    else:
      message = f"Book-Rating is not an integer in 0..{_MAX_RATING}: {fields[2][:40]!r}"
    raise DataError(where, message, 2 + i)
  raise DataError(where, "could not parse the ratings")
