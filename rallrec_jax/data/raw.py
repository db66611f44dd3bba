"""What every loader returns, and the vectorised reading helpers the loaders share.

A loader turns raw files into `RawData`: one row per rating with raw ids, plus the text or
profile fields of each raw item and user. Canonical ids, timelines and samples are built from
it by `rallrec_jax.data.build`, the same way for every dataset.
"""
import dataclasses
import datetime
import io
import math
import re
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from rallrec_jax.data.errors import DataError

EARLIEST_TIME = 631152000   # 1990-01-01 00:00:00 UTC: no dataset here has older ratings
DAY = 86400
MAX_ID = np.iinfo(np.int64).max


@dataclasses.dataclass
class RawData:
  """Ratings with raw ids (int64 or unicode arrays) and the fields of each raw id.

  `timestamp` is seconds since the epoch; datasets without time put the rating order there.
  `items` and `users` map a raw id (same Python type as the id arrays' elements) to a dict of
  text fields (title, genres, ...) or profile fields (gender, age, ...).
  """
  user: np.ndarray
  item: np.ndarray
  rating: np.ndarray
  timestamp: np.ndarray
  items: dict
  users: dict
  notes: list = dataclasses.field(default_factory=list)

  def __post_init__(self):
    n = len(self.user)
    for name in ("item", "rating", "timestamp"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"RawData.{name} has {len(getattr(self, name))} rows, user has {n}")

  def select(self, mask):
    """The ratings where `mask` holds; items and users are kept whole."""
    return dataclasses.replace(self, user=self.user[mask], item=self.item[mask],
                               rating=self.rating[mask], timestamp=self.timestamp[mask])


class Source:
  """Files of one dataset, from a folder or from the original zip, found by base name."""

  def __init__(self, path, what="data.path"):
    self.path = Path(path).expanduser()
    if not str(path):
      raise DataError("<unset>", f"no data path given: set {what} (a folder or the original zip)")
    if not self.path.exists():
      raise DataError(self.path, f"no such file or folder (set {what} to the dataset's folder or zip)")
    self.zip = None
    if self.path.is_file():
      try:
        self.zip = zipfile.ZipFile(self.path)
        self._members = {Path(n).name: n for n in self.zip.namelist() if not n.endswith("/")}
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(self.path, f"not a readable zip archive ({e}); the file may be truncated") from e

  def where(self, name):
    """How to name file `name` in a message."""
    if self.zip is not None:
      return f"{self.path}:{self._members.get(name, name)}"
    return str(self.path / name)

  def has(self, name):
    if self.zip is not None:
      return name in self._members
    return (self.path / name).is_file()

  def read(self, name):
    """The bytes of file `name`; a missing or unreadable file is a DataError."""
    if not self.has(name):
      raise DataError(self.where(name), f"missing file {name!r} in {self.path}")
    if self.zip is not None:
      try:
        return self.zip.read(self._members[name])
      except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise DataError(self.where(name), f"cannot read from the zip ({e}); it may be truncated") from e
    return (self.path / name).read_bytes()

  def fingerprint_files(self, names):
    """The files on disk whose content decides what `read(names)` returns; every one of
    `names` must exist (a DataError names the first missing one)."""
    for name in names:
      if not self.has(name):
        raise DataError(self.where(name), f"missing file {name!r} in {self.path} (data.path must "
                        f"be the folder or zip holding {', '.join(names)})")
    if self.zip is not None:
      return [self.path]
    return [self.path / n for n in names]


def decode(data, where, encoding):
  """Decode bytes; an undecodable byte is a DataError naming its line."""
  try:
    return data.decode(encoding)
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(where, f"byte {data[e.start:e.start + 1]!r} is not valid {encoding} "
                    f"(set data.encoding if the file uses another encoding)", line) from e


def _strip_text(data):
  data = data.replace(b"\r\n", b"\n")
  return data.rstrip(b"\n")


def parse_numeric_table(data, where, sep, columns, header=False, dtype=np.float64):
  """Parse a table of numbers separated by `sep` into an array [rows, len(columns)] of `dtype`.

  Vectorised: one pass of numpy's text parser over the whole file. Only when the quick checks
  fail is the file walked line by line, to name the first bad line.
  """
  data = _strip_text(data)
  ncol = len(columns)
  first = 1
  if header:
    cut = data.find(b"\n")
    data = b"" if cut < 0 else data[cut + 1:]
    first = 2
  if not data.strip():
    raise DataError(where, "file is empty (no data rows)")
  rows = data.count(b"\n") + 1
  values = None
  if data.count(sep) == rows * (ncol - 1):
    text = data.replace(sep, b"\t") if sep != b"\t" else data
    try:
      values = np.loadtxt(io.BytesIO(text), delimiter="\t", dtype=dtype, ndmin=2,
                          comments=None)
    except (ValueError, OverflowError):
      values = None
  if values is None or values.shape != (rows, ncol) or not np.isfinite(values).all():
    _raise_first_bad_line(data, where, sep, columns, first, dtype)
  return values


def _raise_first_bad_line(data, where, sep, columns, first, dtype):
  for i, line in enumerate(data.split(b"\n")):
    fields = line.split(sep)
    if len(fields) != len(columns):
      shown = line[:80].decode("latin-1")
      raise DataError(where, f"expected {len(columns)} fields ({', '.join(columns)}) separated by "
                      f"{sep.decode()!r}, found {len(fields)} in {shown!r}", first + i)
    for name, field in zip(columns, fields):
      _check_field(field, name, dtype, where, first + i)
  raise DataError(where, "could not parse the file as a numeric table")


def _check_field(field, name, dtype, where, line):
  """A DataError naming `line` when `field` is not a number that fits `dtype`."""
  integral = np.issubdtype(dtype, np.integer)
  kind = "an integer" if integral else "a number"
  shown = field[:40].decode("latin-1")
  try:
    value = int(field) if integral else float(field)
    if not math.isfinite(value):
      raise ValueError
  except ValueError:
    raise DataError(where, f"{name} is not {kind}: {shown!r}", line) from None
  if integral and not np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
    raise DataError(where, f"{name} is out of range: {shown!r} (at most {np.iinfo(dtype).max})",
                    line)


def check_known(ids, known, where, what, policy, first_line=1):
  """Mask of ratings whose `ids` are in `known`.

  policy "error": an unknown id is a DataError naming its line; "drop": those rows are masked
  out (the caller reports how many).
  """
  # No dtype cast: casting to the ids' string width would cut longer known ids to false matches.
  known_arr = np.array(list(known)) if len(known) else np.array([], ids.dtype)
  mask = np.isin(ids, known_arr)
  if policy == "error" and not mask.all():
    i = int(np.flatnonzero(~mask)[0])
    raise DataError(where, f"rating names unknown {what} {ids[i].item()!r} (not in the {what} file; "
                    f"set data.unknown_ids='drop' to skip such ratings)", first_line + i)
  return mask


def check_values(values, ok, where, name, expected, first_line=1):
  """A DataError naming the first row where `ok` is false, as `{name} must be {expected}`."""
  if not ok.all():
    i = int(np.flatnonzero(~ok)[0])
    raise DataError(where, f"{name} must be {expected}, got {values[i].item()!r}", first_line + i)


def check_ids(ids, where, name, first_line=1):
  """Every id a positive integer."""
  check_values(ids, ids >= 1, where, name, "a positive integer", first_line)


def check_scale(values, low, high, where, name, first_line=1):
  """Every value a whole number in low..high (the dataset's rating scale)."""
  ok = (values >= low) & (values <= high) & (values == np.floor(values))
  check_values(values, ok, where, name, f"a whole number in {low}..{high}", first_line)


def check_times(timestamp, where, name="timestamp", first_line=1):
  """Every timestamp (seconds since 1970) between 1990-01-01 and a day from now."""
  latest = int(time.time()) + DAY
  ok = (timestamp >= EARLIEST_TIME) & (timestamp <= latest)
  last_day = datetime.datetime.fromtimestamp(latest, datetime.timezone.utc).date()
  check_values(timestamp, ok, where, name, f"seconds since 1970 between 1990-01-01 and "
               f"{last_day}", first_line)


def latest_per_pair(user, item, timestamp, notes):
  """Mask of the latest rating of each (user, item): the newest timestamp, then the last row.

  A repeated pair would put the rating's own label in the user's history. The number dropped
  goes to `notes` when there are any.
  """
  user, _ = _codes(user)
  item, num_items = _codes(item)
  pair = user * num_items + item
  keep = np.ones(len(pair), dtype=bool)
  if not _has_repeats(pair, int(user.max(initial=0) + 1) * num_items):
    return keep
  order = np.lexsort((timestamp, pair))
  keep[order[:-1][pair[order][1:] == pair[order][:-1]]] = False
  notes.append(f"dropped {len(keep) - int(keep.sum())} repeated (user, item) ratings, "
               f"keeping the latest")
  return keep


def _codes(ids):
  """Integer codes of `ids` (numbers or strings), ordered like them, and their bound."""
  if np.issubdtype(ids.dtype, np.integer) and len(ids):
    low, high = int(ids.min()), int(ids.max())
    if high - low < 1 << 31:
      return ids.astype(np.int64) - low, high - low + 1
  codes = np.unique(ids, return_inverse=True)[1].astype(np.int64).reshape(-1)
  return codes, max(len(ids), 1)


def _has_repeats(pair, size):
  """Whether a code of `pair` (each below `size`) occurs twice; a table when `size` is small."""
  if size <= 8 * len(pair) + (1 << 24):
    seen = np.zeros(size, dtype=bool)
    seen[pair] = True
    return int(np.count_nonzero(seen)) < len(pair)
  return len(np.unique(pair)) < len(pair)


_HTML_TAG = re.compile(r"<[^>]+>")


def clean_text(text):
  """Unescape HTML entities, drop tags, collapse whitespace."""
  import html
  text = html.unescape(html.unescape(text))
  text = _HTML_TAG.sub(" ", text)
  return " ".join(text.split())
