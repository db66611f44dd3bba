"""MovieLens 100K and 1M in the original GroupLens formats, from a folder or the original zip.

ML-100K: u.data (tab: user, item, rating, timestamp), u.item (`|`: id, title, release date,
video release date, IMDb URL, 19 genre flags), u.user (`|`: id, age, gender, occupation, zip).
ML-1M: ratings.dat, movies.dat (id::title::genre|genre), users.dat (id::gender::age::occupation
code::zip), all `::`-separated and latin-1.

A rating must name positive user and item ids, be 1..5 whole stars and carry a timestamp from
1990-01-01 to tomorrow (see `raw.check_times`); anything else is a DataError naming its line.
"""
import numpy as np

from rallrec_jax.data import raw
from rallrec_jax.data.errors import DataError

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western")

ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")

ML1M_AGE_GROUPS = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49",
                   50: "50-55", 56: "56+"}

RATING_COLUMNS = ("user", "item", "rating", "timestamp")
ML100K_FILES = ("u.data", "u.item", "u.user")
ML1M_FILES = ("ratings.dat", "movies.dat", "users.dat")


def _ratings(source, name, sep, cfg, items, users):
  """The ratings file, checked row by row; of a repeated (user, item) the latest is kept."""
  where = source.where(name)
  table = raw.parse_numeric_table(source.read(name), where, sep, RATING_COLUMNS, dtype=np.int64)
  user, item, rating, timestamp = table.T
  raw.check_ids(user, where, "user")
  raw.check_ids(item, where, "item")
  raw.check_scale(rating, 1, 5, where, "rating")
  raw.check_times(timestamp, where)
  keep = (raw.check_known(item, items.keys(), where, "item", cfg.unknown_ids)
          & raw.check_known(user, users.keys(), where, "user", cfg.unknown_ids))
  notes = []
  if not keep.all():
    notes.append(f"dropped {int((~keep).sum())} ratings naming unknown items or users")
  keep[keep] = raw.latest_per_pair(user[keep], item[keep], timestamp[keep], notes)
  return raw.RawData(user=user[keep], item=item[keep], rating=rating[keep].astype(np.float32),
                     timestamp=timestamp[keep], items=items, users=users, notes=notes)


def _rows(source, name, sep, ncols, encoding):
  """Split a small metadata file into rows of fields, naming the first malformed line."""
  where = source.where(name)
  text = raw.decode(source.read(name), where, encoding).replace("\r\n", "\n").rstrip("\n")
  if not text.strip():
    raise DataError(where, "file is empty (no data rows)")
  rows = []
  for i, line in enumerate(text.split("\n"), start=1):
    fields = line.split(sep)
    if len(fields) != ncols:
      raise DataError(where, f"expected {ncols} fields separated by {sep!r}, found {len(fields)}", i)
    try:
      key = int(fields[0])
    except ValueError:
      raise DataError(where, f"id is not an integer: {fields[0][:40]!r}", i) from None
    if not 1 <= key <= raw.MAX_ID:
      raise DataError(where, f"id must be a positive integer below 2**63, got {fields[0][:40]!r}",
                      i)
    rows.append((i, key, fields))
  return rows


def _unique(rows, where):
  out = {}
  for line, key, value in rows:
    if key in out:
      raise DataError(where, f"id {key} appears twice", line)
    out[key] = value
  return out


def _int_field(value, where, line, name):
  try:
    return int(value)
  except ValueError:
    raise DataError(where, f"{name} is not an integer: {value[:40]!r}", line) from None


def load_ml100k(cfg):
  source = raw.Source(cfg.path)
  where = source.where("u.item")
  items = []
  for line, key, f in _rows(source, "u.item", "|", 5 + len(ML100K_GENRES), cfg.encoding):
    flags = f[5:]
    if any(x not in ("0", "1") for x in flags):
      raise DataError(where, "genre flags must be 0 or 1", line)
    genres = [g for g, x in zip(ML100K_GENRES, flags) if x == "1"]
    items.append((line, key, {"title": f[1].strip(), "genres": genres, "release_date": f[2]}))
  where_u = source.where("u.user")
  users = [(line, key, {"gender": f[2], "age": _int_field(f[1], where_u, line, "age"),
                        "occupation": f[3], "zip": f[4]})
           for line, key, f in _rows(source, "u.user", "|", 5, cfg.encoding)]
  return _ratings(source, "u.data", b"\t", cfg, _unique(items, where), _unique(users, where_u))


def load_ml1m(cfg):
  source = raw.Source(cfg.path)
  where = source.where("movies.dat")
  items = [(line, key, {"title": f[1].strip(), "genres": [g for g in f[2].split("|") if g]})
           for line, key, f in _rows(source, "movies.dat", "::", 3, cfg.encoding)]
  where_u = source.where("users.dat")
  users = []
  for line, key, f in _rows(source, "users.dat", "::", 5, cfg.encoding):
    age = _int_field(f[2], where_u, line, "age")
    occupation = _int_field(f[3], where_u, line, "occupation")
    if age not in ML1M_AGE_GROUPS:
      raise DataError(where_u, f"age code {age} is not one of {sorted(ML1M_AGE_GROUPS)}", line)
    if not 0 <= occupation < len(ML1M_OCCUPATIONS):
      raise DataError(where_u, f"occupation code {occupation} is not in 0..20", line)
    users.append((line, key, {"gender": f[1], "age": age, "age_group": ML1M_AGE_GROUPS[age],
                              "occupation": ML1M_OCCUPATIONS[occupation], "zip": f[4]}))
  return _ratings(source, "ratings.dat", b"::", cfg, _unique(items, where), _unique(users, where_u))


def input_files_ml100k(cfg):
  return raw.Source(cfg.path).fingerprint_files(ML100K_FILES)


def input_files_ml1m(cfg):
  return raw.Source(cfg.path).fingerprint_files(ML1M_FILES)
