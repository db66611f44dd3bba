"""Amazon 2018 review dump of one category (Movies_and_TV in the paper), filtered as in RALLRec.

Files in `data.path`: reviews `{category}.json` and metadata `meta_{category}.json`, each plain
or gzipped, one strict JSON object per line. The reviews file is several GB, so it is streamed
in chunks of whole lines and its four needed fields are pulled out by regexes over each chunk;
a chunk whose lines do not all hold each field once, in the dump's usual form (`"key": value`,
one `{...}` object a line), is parsed line by line with `json.loads` instead, which also names
the first bad line. The regexes check the syntax of those four fields and each line's braces,
not the JSON of the rest of the line (the review text).

Every review must have non-empty ids, an `overall` of 1..5 whole stars and a `unixReviewTime`
from 1990-01-01 to tomorrow. Ratings are kept when their item has a metadata title, the latest
of each (user, item), and inside the iterative core filter of `data.amazon` (see `core_filter`).
"""
import gzip
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np

from rallrec_jax.data.errors import DataError
from rallrec_jax.data.raw import (RawData, check_scale, check_times, check_values, clean_text,
                                  latest_per_pair)

CHUNK_BYTES = 1 << 26

_ID = rb'"([\x20\x21\x23-\x5b\x5d-\x7e]*)"'
_NUMBER = rb"(-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?)(?=[,}])"
_COUNT = rb"((?:0|[1-9]\d*))(?=[,}])"
# Each pattern ends by eating the rest of its line, up to a `}` and a next line that starts with
# `{`, so a chunk yields at most one match per line and a full count means every line holds the
# field and is shaped like an object.
_FAST_FIELDS = tuple((key, re.compile(key + value + rb"[^\n]*}\n(?={|\Z)")) for key, value in (
    (b'"reviewerID": ', _ID), (b'"asin": ', _ID), (b'"overall": ', _NUMBER),
    (b'"unixReviewTime": ', _COUNT)))


def _is_id(value):
  return isinstance(value, str)


def _is_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_time(value):
  return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


_FIELD_CHECKS = (("reviewerID", _is_id, "a string"), ("asin", _is_id, "a string"),
                 ("overall", _is_number, "a finite number"),
                 ("unixReviewTime", _is_time, "a whole number of seconds >= 0"))


def input_files(cfg):
  """The reviews and metadata files of `cfg.amazon.category` in `cfg.path`."""
  if not str(cfg.path):
    raise DataError("<unset>", "no data path given: set data.path to the folder holding the "
                    "Amazon 2018 review dump")
  folder = Path(cfg.path).expanduser()
  if not folder.is_dir():
    raise DataError(folder, "not a folder (set data.path to the folder holding the Amazon 2018 "
                    "review dump)")
  category = cfg.amazon.category
  return [_find(folder, f"{category}.json"), _find(folder, f"meta_{category}.json")]


def _find(folder, name):
  """`name` in `folder`, else its gzipped twin."""
  for path in (folder / name, folder / f"{name}.gz"):
    if path.is_file():
      return path
  raise DataError(folder, f"neither {name} nor {name}.gz is in this folder (set data.path to "
                  f"the Amazon 2018 dump, or data.amazon.category to the category it holds)")


def load(cfg):
  """Ratings of the category, filtered as in the paper, with each kept item's title."""
  reviews, meta = input_files(cfg)
  titled = _read_meta(meta)
  user, item, rating, timestamp = _read_reviews(reviews)
  _check_reviews(reviews, user, item, rating, timestamp)
  user_ids, user = np.unique(user, return_inverse=True)
  asins, item = np.unique(item, return_inverse=True)
  notes = []
  rows = np.flatnonzero(_has_title(asins, item, titled, cfg.unknown_ids, reviews, notes))
  rows = rows[latest_per_pair(user[rows], item[rows], timestamp[rows], notes)]
  before = _sizes(user[rows], item[rows])
  rows = rows[core_filter(user[rows], item[rows], cfg.amazon)]
  notes.append(_core_note(cfg.amazon, before, _sizes(user[rows], item[rows])))
  user, item = user_ids[user[rows]], asins[item[rows]]
  return RawData(user=user, item=item, rating=rating[rows].astype(np.float32),
                 timestamp=timestamp[rows], items={a: titled[a] for a in np.unique(item).tolist()},
                 users={u: {} for u in np.unique(user).tolist()}, notes=notes)


def _has_title(asins, item, titled, policy, path, notes):
  """Mask of ratings whose item has a metadata title: the title is what the prompts show."""
  known = np.array([a in titled for a in asins.tolist()], dtype=bool)
  mask = known[item]
  missing = len(mask) - int(mask.sum())
  if missing and policy == "error":
    row = int(np.flatnonzero(~mask)[0])
    raise DataError(path, f"rating of item {asins[item[row]]!r}, which has no title in the "
                    f"metadata (set data.unknown_ids='drop' to skip such ratings)", row + 1)
  notes.append(f"dropped {missing} ratings of items without metadata title")
  return mask


def _check_reviews(path, user, item, rating, timestamp):
  """Each review's values inside the dataset's domain; row i is line i + 1."""
  check_values(user, np.strings.str_len(user) > 0, path, "reviewerID", "a non-empty string")
  check_values(item, np.strings.str_len(item) > 0, path, "asin", "a non-empty string")
  check_scale(rating, 1, 5, path, "overall")
  check_times(timestamp, path, "unixReviewTime")


def core_filter(user, item, cfg_amazon):
  """Mask of ratings inside the core, then within the `top_items` most rated items.

  Repeats until stable: keep ratings whose user has user_min..user_max ratings and whose item
  has item_min..item_max ratings (inclusive). Then keep the `top_items` items with the most
  ratings, ties broken by the smaller id (0 keeps all). `user` and `item` are id arrays
  (strings, or codes ordered like the ids).
  """
  _, user = np.unique(user, return_inverse=True)
  _, item = np.unique(item, return_inverse=True)
  keep = np.ones(len(user), dtype=bool)
  while True:
    inside = (_in_range(user, keep, cfg_amazon.user_min, cfg_amazon.user_max)
              & _in_range(item, keep, cfg_amazon.item_min, cfg_amazon.item_max) & keep)
    if np.array_equal(inside, keep):
      break
    keep = inside
  if cfg_amazon.top_items:
    counts = np.bincount(item[keep], minlength=item.max(initial=-1) + 1)
    top = np.lexsort((np.arange(len(counts)), -counts))[:cfg_amazon.top_items]
    chosen = np.zeros(len(counts), dtype=bool)
    chosen[top[counts[top] > 0]] = True
    keep &= chosen[item]
  return keep


def _in_range(codes, keep, low, high):
  """Mask of rows whose code has low..high kept rows."""
  counts = np.bincount(codes[keep], minlength=codes.max(initial=-1) + 1)[codes]
  return (counts >= low) & (counts <= high)


def _sizes(user, item):
  return len(user), len(np.unique(user)), len(np.unique(item))


def _core_note(c, before, after):
  return (f"core filter (users {c.user_min}-{c.user_max} and items {c.item_min}-{c.item_max} "
          f"ratings, top {c.top_items} items): {before[0]} ratings, {before[1]} users, "
          f"{before[2]} items -> {after[0]} ratings, {after[1]} users, {after[2]} items")


def _chunks(path):
  """Yield (first line number, line count, bytes) for blocks of whole lines, each ending in a
  newline; a block is CHUNK_BYTES plus the rest of its last line."""
  opener = gzip.open if path.suffix == ".gz" else open
  first = 1
  try:
    with opener(path, "rb") as f:
      while block := f.read(CHUNK_BYTES):
        block += f.readline()
        if not block.endswith(b"\n"):
          block += b"\n"
        lines = block.count(b"\n")
        yield first, lines, block
        first += lines
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(path, f"cannot read ({e}); the file may be truncated or not gzip") from e


def _decode(data, path, first):
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(path, f"byte {data[e.start:e.start + 1]!r} is not valid UTF-8",
                    first + data.count(b"\n", 0, e.start)) from e


def _lines(text):
  """Lines of a decoded chunk (which ends in a newline)."""
  return text[:-1].split("\n")


def _json_object(line, path, number):
  try:
    value = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(path, f"not valid JSON ({e.msg} at column {e.colno})", number) from None
  if not isinstance(value, dict):
    raise DataError(path, f"expected a JSON object, got {type(value).__name__}", number)
  return value


def _read_reviews(path):
  """Columns reviewerID, asin, overall, unixReviewTime; row i is line i + 1."""
  parts = [_review_columns(data, lines, path, first) for first, lines, data in _chunks(path)]
  if not parts:
    raise DataError(path, "file is empty (no reviews)")
  user, item, rating, timestamp = (np.concatenate(column) for column in zip(*parts))
  return user, item, rating, timestamp


def _review_columns(data, lines, path, first):
  """Columns of one chunk; bad UTF-8 is an error even where the regexes do not look."""
  if not data.isascii():
    _decode(data, path, first)
  columns = _fast_columns(data, lines)
  if columns is None:
    columns = _checked_columns(_decode(data, path, first), path, first)
  return columns


def _fast_columns(data, lines):
  """The chunk's columns by regex, or None when a line is not in the dump's usual form."""
  if not data.startswith(b"{"):
    return None
  values = []
  for key, pattern in _FAST_FIELDS:
    if data.count(key) != lines:
      return None
    values.append(pattern.findall(data))
    if len(values[-1]) != lines:
      return None
  try:
    rating = np.array(values[2], dtype=np.float64)
    timestamp = np.array(values[3], dtype=np.int64)
  except (ValueError, OverflowError):
    return None
  if not np.isfinite(rating).all():
    return None
  return np.array(values[0]).astype(str), np.array(values[1]).astype(str), rating, timestamp


def _checked_columns(text, path, first):
  """The chunk's columns by `json.loads`; the first bad line is a DataError."""
  rows = [_review(line, path, first + i) for i, line in enumerate(_lines(text))]
  user, item, rating, timestamp = zip(*rows)
  return (np.array(user, dtype=str), np.array(item, dtype=str),
          np.array(rating, dtype=np.float64), np.array(timestamp, dtype=np.int64))


def _review(line, path, number):
  review = _json_object(line, path, number)
  for name, valid, expected in _FIELD_CHECKS:
    if name not in review:
      raise DataError(path, f"missing field {name!r}", number)
    if not valid(review[name]):
      raise DataError(path, f"{name} must be {expected}, got {review[name]!r:.40}", number)
  return tuple(review[name] for name, _, _ in _FIELD_CHECKS)


def _read_meta(path):
  """{asin: {"title", "categories"}} of the items with a non-empty title.

  An asin listed twice keeps its first record, whether or not that one has a title.
  """
  titled, seen = {}, set()
  for first, _, data in _chunks(path):
    for i, line in enumerate(_lines(_decode(data, path, first))):
      record = _json_object(line, path, first + i)
      asin = record.get("asin")
      if not isinstance(asin, str):
        raise DataError(path, f"asin must be a string, got {asin!r:.40}", first + i)
      if asin not in seen:
        seen.add(asin)
        fields = _item_fields(record, path, first + i)
        if fields["title"]:
          titled[asin] = fields
  if not seen:
    raise DataError(path, "file is empty (no items)")
  return titled


def _item_fields(record, path, number):
  title = record.get("title", "")
  categories = record.get("category", [])
  if not isinstance(title, str):
    raise DataError(path, f"title must be a string, got {title!r:.40}", number)
  if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
    raise DataError(path, f"category must be a list of strings, got {categories!r:.60}", number)
  categories = [clean_text(c) for c in categories]
  return {"title": clean_text(title), "categories": [c for c in categories if c]}
