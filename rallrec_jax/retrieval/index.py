"""Nearest-neighbour search over item vectors by cosine similarity: ScaNN and exact JAX.

Catalogue-scale retrieval (the most similar items of every item, candidate items for a user,
the relevant part of a very long history) needs an approximate index; the exact backend is the
ground truth that its recall is measured against. Both backends answer the same call:

  ids, scores = index.search(queries, k, exclude=None)

ids int32 [Q, k] and scores float32 [Q, k], best first; with `normalize` (the default) items
and queries are scaled to unit length, so scores are cosine similarities. `exclude` gives, per
query, ids that must not come back (the item itself, items a user has seen); ids outside the
catalogue are ignored. A row with fewer than k eligible items is padded with id -1 and score
-inf.

Per-row id lists (exclusions, histories, relevant items) are a `Csr` or a sequence with one
array, list or set of ids per row.
"""
import dataclasses
import functools
import json
import math
import zlib
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax import atomic, numeric

BACKENDS = ("auto", "scann", "exact")
SCANN_MIN_ITEMS = 5000     # "auto" searches smaller catalogues exactly (see `resolve_backend`)
MIN_SCANNED = 2000         # automatic num_leaves_to_search scans about this many items at least
REORDER_PER_RESULT = 10    # coarse candidates rescored per result asked for, at least
RECALL_QUERIES = 1000      # items whose neighbours `neighbor_recall` checks against exact search
RECALL_AT = (10,)          # recall@k that `neighbor_recall` also gives, for k under the width
META_FILE = "index.json"
FORMAT_VERSION = 1
SCANN_VECTORS = "dataset.npy"  # the float vectors ScaNN keeps for reordering
EXACT_CHUNK = 8192             # database rows the exact backend scores per step


class IndexLoadError(ValueError):
  """A saved index folder is missing, incomplete or corrupt."""


class Csr(NamedTuple):
  """Ragged rows of ids: row r is items[offsets[r]:offsets[r + 1]]."""
  offsets: np.ndarray
  items: np.ndarray


def as_csr(rows, num_rows=None):
  """A `Csr` (int64 offsets and items) from a `Csr` or one id collection per row."""
  if isinstance(rows, Csr):
    csr = Csr(np.asarray(rows.offsets, np.int64), np.asarray(rows.items, np.int64))
  else:
    arrays = [np.asarray(sorted(r) if isinstance(r, (set, frozenset)) else r, np.int64).ravel()
              for r in rows]
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    csr = Csr(offsets, np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
  offsets = csr.offsets
  if (offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or np.any(np.diff(offsets) < 0)
      or offsets[-1] != len(csr.items)):
    raise ValueError("Csr offsets must start at 0, never decrease and end at len(items)")
  if num_rows is not None and len(offsets) - 1 != num_rows:
    raise ValueError(f"expected {num_rows} rows of ids (one per query), got {len(offsets) - 1}")
  return csr


@dataclasses.dataclass(frozen=True)
class IndexConfig:
  """How to index item vectors; the exact backend reads only `backend` and `batch_size`.

  backend: "scann" (approximate, for catalogue-scale queries), "exact" (ground truth) or
    "auto" (exact below `SCANN_MIN_ITEMS` items, ScaNN from there on).
  num_leaves: k-means partitions of the items; 0 picks round(sqrt(N)), the usual balance
    between scoring centroids and scoring the items of the chosen partitions.
  num_leaves_to_search: partitions scored per query; 0 picks num_leaves / 20, raised to reach
    about `MIN_SCANNED` items: on a million clustered 128-d vectors (bench_index, 2 CPU
    cores) num_leaves / 20 gave recall@10 0.99 at over 40 times the exact backend's queries
    per second, but on 10,000 items it gave 0.70 and the 2,000-item floor 0.99.
  dims_per_block: dimensions per 4-bit asymmetric-hashing code; 2 keeps the coarse scores
    accurate enough for `reorder` to repair.
  anisotropic_threshold: ScaNN's anisotropic quantization threshold, which weights the
    quantization error of items whose dot product with a query exceeds it; 0 turns it off.
  reorder: coarse candidates rescored with the float vectors, at least (1 or more: the float
    vectors are what `neighbors` and `ScannIndex.load` read back); a search rescores at least
    `REORDER_PER_RESULT` per result it asks for, or recall@20 stops near 0.985.
  training_sample_size: items sampled to train the partitions and the codebooks.
  batch_size: queries per search call.
  """
  backend: str = "auto"
  num_leaves: int = 0
  num_leaves_to_search: int = 0
  dims_per_block: int = 2
  anisotropic_threshold: float = 0.2
  reorder: int = 100
  training_sample_size: int = 100_000
  batch_size: int = 4096

  def __post_init__(self):
    _check(self.backend in BACKENDS, "backend", f"one of {BACKENDS}", self.backend)
    for name, low in (("num_leaves", 0), ("num_leaves_to_search", 0), ("dims_per_block", 1),
                      ("reorder", 1), ("training_sample_size", 1), ("batch_size", 1)):
      value = getattr(self, name)
      _check(_is_int(value) and value >= low, name, f"an int >= {low}", value)
      object.__setattr__(self, name, int(value))  # numpy ints would not survive json.dumps
    _check(self.num_leaves == 0 or self.num_leaves_to_search <= self.num_leaves,
           "num_leaves_to_search", f"at most num_leaves ({self.num_leaves})",
           self.num_leaves_to_search)
    threshold = self.anisotropic_threshold
    _check(isinstance(threshold, (int, float, np.integer, np.floating))
           and not isinstance(threshold, bool) and 0 <= threshold < 1,
           "anisotropic_threshold", "a number in [0, 1)", threshold)
    object.__setattr__(self, "anisotropic_threshold", float(threshold))

  def tree_shape(self, num_items):
    """(num_leaves, num_leaves_to_search) for `num_items` items, automatic choices filled in."""
    leaves = max(1, min(self.num_leaves or round(math.sqrt(num_items)), num_items))
    floor = math.ceil(leaves * MIN_SCANNED / num_items)
    search = self.num_leaves_to_search or max(1, round(leaves / 20), floor)
    return leaves, min(search, leaves)

  def resolve_backend(self, num_items):
    """The backend that indexes `num_items` items: "auto" becomes "exact" or "scann".

    Below `SCANN_MIN_ITEMS` items exact search of every item against every item takes about a
    second on 2 CPU cores, and ScaNN has to scan most partitions to reach high recall anyway.
    """
    if self.backend != "auto":
      return self.backend
    return "exact" if num_items < SCANN_MIN_ITEMS else "scann"


def _is_int(value):
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check(ok, field, requirement, value):
  if not ok:
    raise ValueError(f"IndexConfig.{field} must be {requirement}, got {value!r}")


def _database(vectors):
  """The item vectors as a 2-D float32 array with at least one finite row."""
  vectors = np.asarray(vectors, np.float32)
  if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
    raise ValueError(f"item vectors must be a non-empty [num_items, dim] array, "
                     f"got shape {vectors.shape}")
  if not np.isfinite(vectors).all():
    raise ValueError("item vectors contain NaN or infinite values")
  return vectors


def _query_array(queries, dim):
  queries = np.asarray(queries, np.float32)
  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ValueError(f"queries must be a [num_queries, {dim}] array, got shape {queries.shape}")
  return queries


def _check_k(k):
  if not _is_int(k) or k < 1:
    raise ValueError(f"k must be an int >= 1, got {k!r}")
  return int(k)


def _query_batch(queries, start, stop, normalize):
  """One batch of queries, normalised per batch so a huge query set is never copied whole."""
  batch = np.ascontiguousarray(queries[start:stop], np.float32)
  return numeric.unit_rows(batch) if normalize else batch


def _empty_results(num_queries, k):
  return np.full((num_queries, k), -1, np.int32), np.full((num_queries, k), -np.inf, np.float32)


def _row_lengths(csr, start, stop):
  return np.diff(csr.offsets[start:stop + 1])


def _pad_rows(csr, start, stop, width, fill):
  """Rows start..stop-1 of `csr` as a [stop - start, width] matrix padded with `fill`."""
  lengths = _row_lengths(csr, start, stop)
  out = np.full((stop - start, width), fill, np.int64)
  rows = np.repeat(np.arange(stop - start), lengths)
  first = csr.offsets[start:stop] - csr.offsets[start]
  cols = np.arange(len(rows)) - np.repeat(first, lengths)
  out[rows, cols] = csr.items[csr.offsets[start]:csr.offsets[stop]]
  return out


def _next_pow2(n):
  return 1 << max(0, int(n) - 1).bit_length()


class ExactIndex:
  """Brute-force search in JAX: every query scored against every item, as ground truth.

  The database is scanned in chunks of `EXACT_CHUNK` rows with a running top-k, so a batch of
  queries needs batch_size x EXACT_CHUNK scores of memory however large the catalogue is.
  Batches hold `batch_size` queries, the last one padded to a power of two rows, and exclusion
  lists are padded to a power of two width, which bounds how many shapes get compiled.
  """
  backend = "exact"

  def __init__(self, vectors, normalize=True, batch_size=4096):
    if not _is_int(batch_size) or batch_size < 1:
      raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    vectors = _database(vectors)
    self.num_items, self.dim = vectors.shape
    self.normalize = normalize
    self.batch_size = batch_size
    self._chunk = min(EXACT_CHUNK, -(-self.num_items // 8) * 8)
    rows = -(-self.num_items // self._chunk) * self._chunk
    self._db = _device_database(vectors, normalize, rows)
    self._bias = jnp.where(jnp.arange(rows) < self.num_items, 0.0, -jnp.inf).astype(jnp.float32)

  @property
  def vectors(self):
    """The indexed (normalised) item vectors, float32 [N, d]."""
    return np.asarray(self._db[:self.num_items])

  def settings(self, k):  # pylint: disable=unused-argument
    """What searches of k results use: the backend alone."""
    return {"backend": self.backend}

  def search(self, queries, k, exclude=None):
    """(ids int32 [Q, k], scores float32 [Q, k]); see the module docstring."""
    queries, k = _query_array(queries, self.dim), _check_k(k)
    exclude = None if exclude is None else as_csr(exclude, len(queries))
    found = min(k, self.num_items)
    ids, scores = _empty_results(len(queries), k)
    for start, stop, rows in self._batches(len(queries)):
      batch = np.zeros((rows, self.dim), np.float32)
      batch[:stop - start] = _query_batch(queries, start, stop, self.normalize)
      skip = self._exclusions(exclude, start, stop, rows)
      got_ids, got_scores = _exact_top_k(self._db, self._bias, batch, skip, k=found,
                                         chunk=self._chunk)
      ids[start:stop, :found] = np.asarray(got_ids)[:stop - start]
      scores[start:stop, :found] = np.asarray(got_scores)[:stop - start]
    ids[scores == -np.inf] = -1
    return ids, scores

  def _batches(self, num_queries):
    """(start, stop, padded rows) of each batch; the last one is padded only to a power of two."""
    start = 0
    while start < num_queries:
      rows = min(self.batch_size, _next_pow2(num_queries - start))
      yield start, min(start + rows, num_queries), rows
      start += rows

  def _exclusions(self, exclude, start, stop, rows):
    """[rows, width] int32 ids to skip, padded with -1 (which matches no item)."""
    if exclude is None:
      return np.full((rows, 1), -1, np.int32)
    width = _next_pow2(max(1, _row_lengths(exclude, start, stop).max(initial=0)))
    skip = np.full((rows, width), -1, np.int32)
    ids = _pad_rows(exclude, start, stop, width, -1)
    skip[:stop - start] = np.where((ids >= 0) & (ids < self.num_items), ids, -1)
    return skip


@functools.partial(jax.jit, static_argnums=(1, 2))
def _device_database(vectors, normalize, rows):
  """The item vectors on the device, normalised if asked, padded with zero rows to `rows`."""
  if normalize:
    norms = jnp.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)
  return jnp.pad(vectors, ((0, rows - vectors.shape[0]), (0, 0)))


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _exact_top_k(db, bias, queries, skip, *, k, chunk):
  """Best k (ids, scores) of each query over `db`, scanning `chunk` rows at a time.

  `bias` is -inf on padding rows; `skip` [B, E] holds ids whose score becomes -inf. Ties go to
  the lower id: `jax.lax.top_k` prefers the lower index and earlier chunks come first in the
  merge.
  """
  rows = jnp.arange(queries.shape[0])[:, None]

  def step(carry, block):
    best, best_ids = carry
    vectors, block_bias, first = block
    scores = queries @ vectors.T + block_bias
    local = skip - first
    local = jnp.where((local >= 0) & (local < chunk), local, chunk)
    scores = scores.at[rows, local].set(-jnp.inf, mode="drop")
    top, top_ids = jax.lax.top_k(scores, min(k, chunk))
    merged = jnp.concatenate([best, top], axis=1)
    merged_ids = jnp.concatenate([best_ids, top_ids + first], axis=1)
    best, order = jax.lax.top_k(merged, k)
    return (best, jnp.take_along_axis(merged_ids, order, axis=1)), None

  blocks = (db.reshape(-1, chunk, db.shape[1]), bias.reshape(-1, chunk),
            jnp.arange(db.shape[0] // chunk, dtype=jnp.int32) * chunk)
  init = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
          jnp.full((queries.shape[0], k), -1, jnp.int32))
  (scores, ids), _ = jax.lax.scan(step, init, blocks)
  return ids, scores


def _scann():
  """ScaNN's numpy API, imported on first use so the exact backend never needs it."""
  from scann import scann_ops_pybind  # pylint: disable=import-outside-toplevel
  return scann_ops_pybind


class ScannIndex:
  """ScaNN over the item vectors: k-means partitions, 4-bit anisotropic hashing, reordering.

  Exclusions are applied by asking ScaNN for k plus the batch's longest exclusion list and
  dropping the excluded ids, so a row still gets k results when excluded ids rank among its
  best. A row that still comes back short (its partitions held too few eligible items) is
  searched exactly, so -1 pads only rows with fewer than k eligible items, as with the exact
  backend. Search runs ScaNN's batched search on all cores.
  """
  backend = "scann"

  def __init__(self, vectors, cfg=IndexConfig(), normalize=True):
    vectors = _database(vectors)
    if normalize:
      vectors = numeric.unit_rows(vectors)
    vectors = np.ascontiguousarray(vectors)
    self._attach(_build_searcher(vectors, cfg), vectors, cfg, normalize)

  def _attach(self, searcher, vectors, cfg, normalize):
    self._searcher = searcher
    self.vectors = vectors
    self.num_items, self.dim = vectors.shape
    self.cfg = cfg
    self.normalize = normalize

  def search(self, queries, k, exclude=None):
    """(ids int32 [Q, k], scores float32 [Q, k]); see the module docstring."""
    queries, k = _query_array(queries, self.dim), _check_k(k)
    exclude = None if exclude is None else as_csr(exclude, len(queries))
    ids, scores = _empty_results(len(queries), k)
    for start in range(0, len(queries), self.cfg.batch_size):
      stop = min(start + self.cfg.batch_size, len(queries))
      extra = 0 if exclude is None else int(_row_lengths(exclude, start, stop).max(initial=0))
      fetch = min(k + extra, self.num_items)
      batch = _query_batch(queries, start, stop, self.normalize)
      got_ids, got_scores = self._searcher.search_batched_parallel(
          batch, final_num_neighbors=fetch, pre_reorder_num_neighbors=self.candidates(fetch))
      got_ids = got_ids.astype(np.int64)
      keep = np.isfinite(got_scores)
      if exclude is not None:
        keep &= ~_excluded(got_ids, exclude, start, stop, self.num_items)
      ids[start:stop], scores[start:stop] = _first_kept(got_ids, got_scores, keep, k)
      for row in np.flatnonzero(ids[start:stop, -1] < 0):
        skip = () if exclude is None else _row_items(exclude, start + row)
        ids[start + row], scores[start + row] = _brute_force_row(self.vectors, batch[row], k, skip)
    return ids, scores

  def candidates(self, fetch):
    """Coarse candidates rescored with the float vectors when `fetch` results are asked for."""
    return min(max(self.cfg.reorder, REORDER_PER_RESULT * fetch), self.num_items)

  def settings(self, k):
    """What searches of k results use: backend, partitions, reordering, quantization."""
    leaves, search = self.cfg.tree_shape(self.num_items)
    return {"backend": self.backend, "num_leaves": leaves, "num_leaves_to_search": search,
            "reorder_candidates": self.candidates(min(k, self.num_items)),
            "dims_per_block": self.cfg.dims_per_block,
            "anisotropic_threshold": self.cfg.anisotropic_threshold,
            "training_sample_size": min(self.cfg.training_sample_size, self.num_items)}

  def save(self, folder):
    """Write ScaNN's files and index.json (config, shape, file checksums) to `folder`.

    They are written to a temporary folder beside it that then replaces `folder` whole, so a
    reader sees the old index or the new one, never half of one.
    """
    with atomic.directory(folder) as tmp:
      self._searcher.serialize(str(tmp), relative_path=True)
      meta = {"format": FORMAT_VERSION, "backend": "scann", "num_items": self.num_items,
              "dim": self.dim, "normalize": self.normalize,
              "config": dataclasses.asdict(self.cfg),
              "files": {p.name: _fingerprint(p) for p in sorted(tmp.iterdir())}}
      atomic.write_text(tmp / META_FILE, json.dumps(meta, indent=1) + "\n")

  @classmethod
  def load(cls, folder):
    """The index saved in `folder`; IndexLoadError naming the folder if it is missing or corrupt."""
    folder = Path(folder)
    meta = _read_meta(folder)
    for name, expected in meta["files"].items():
      if not (folder / name).is_file() or _fingerprint(folder / name) != expected:
        raise IndexLoadError(f"ScaNN index in {folder}: {name} is missing or corrupt "
                             f"(size or checksum differs from {META_FILE})")
    try:
      searcher = _scann().load_searcher(str(folder), assets_backcompat_shim=False)
      vectors = np.load(folder / SCANN_VECTORS, mmap_mode="r")
      cfg = IndexConfig(**meta["config"])
    except (RuntimeError, ValueError, OSError, TypeError) as e:
      raise IndexLoadError(f"ScaNN index in {folder} cannot be loaded: {e}") from e
    if vectors.shape != (meta["num_items"], meta["dim"]) or searcher.size() != meta["num_items"]:
      raise IndexLoadError(f"ScaNN index in {folder} does not hold the {meta['num_items']} x "
                           f"{meta['dim']} vectors that {META_FILE} records")
    index = cls.__new__(cls)
    index._attach(searcher, vectors, cfg, meta["normalize"])
    return index


def _build_searcher(vectors, cfg):
  """A ScaNN searcher for dot products over `vectors` (one partition: no tree at all)."""
  leaves, search = cfg.tree_shape(len(vectors))
  sample = min(cfg.training_sample_size, len(vectors))
  builder = _scann().builder(vectors, 10, "dot_product")
  if leaves > 1:
    builder = builder.tree(num_leaves=leaves, num_leaves_to_search=search,
                           training_sample_size=sample)
  threshold = cfg.anisotropic_threshold or float("nan")
  return builder.score_ah(cfg.dims_per_block, anisotropic_quantization_threshold=threshold,
                          training_sample_size=sample).reorder(cfg.reorder).build()


def _excluded(ids, exclude, start, stop, num_items):
  """[B, F] bool: which fetched ids are in their query's exclusion list."""
  rows = np.arange(stop - start, dtype=np.int64)[:, None]
  lengths = _row_lengths(exclude, start, stop)
  skip = exclude.items[exclude.offsets[start]:exclude.offsets[stop]]
  skip_rows = np.repeat(rows[:, 0], lengths)
  inside = (skip >= 0) & (skip < num_items)
  return np.isin(rows * num_items + ids, skip_rows[inside] * num_items + skip[inside])


def _row_items(csr, row):
  return csr.items[csr.offsets[row]:csr.offsets[row + 1]]


def _brute_force_row(vectors, query, k, skip):
  """(ids [k], scores [k]) of one query over all `vectors` by dot product, `skip` ids left out.

  Best first, ties to the lower id, padded with -1 and -inf past the eligible items.
  """
  scores = np.asarray(vectors @ query, np.float32)
  skip = np.asarray(skip, np.int64)
  scores[skip[(skip >= 0) & (skip < len(scores))]] = -np.inf
  order = np.argsort(-scores, kind="stable")[:k]
  ids, out = _empty_results(1, k)
  found = np.isfinite(scores[order])
  ids[0, :len(order)] = np.where(found, order, -1)
  out[0, :len(order)] = np.where(found, scores[order], -np.inf)
  return ids[0], out[0]


def _first_kept(ids, scores, keep, k):
  """The first k kept (id, score) pairs of each row, padded with -1 and -inf."""
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
  kept = np.take_along_axis(keep, order, axis=1)
  out_ids, out_scores = _empty_results(len(ids), k)
  width = order.shape[1]
  out_ids[:, :width] = np.where(kept, np.take_along_axis(ids, order, axis=1), -1)
  out_scores[:, :width] = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)
  return out_ids, out_scores


def _fingerprint(path):
  """[size, crc32] of a file, read in 16 MiB pieces."""
  crc = 0
  with open(path, "rb") as f:
    while piece := f.read(1 << 24):
      crc = zlib.crc32(piece, crc)
  return [path.stat().st_size, crc]


def _read_meta(folder):
  path = folder / META_FILE
  if not folder.is_dir():
    raise IndexLoadError(f"no saved index at {folder}: not a folder")
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise IndexLoadError(f"no saved index in {folder}: {META_FILE} is missing") from None
  except (ValueError, OSError) as e:
    raise IndexLoadError(f"saved index in {folder}: {META_FILE} is unreadable: {e}") from e
  keys = ("format", "backend", "num_items", "dim", "normalize", "config", "files")
  if (not isinstance(meta, dict) or any(key not in meta for key in keys)
      or not isinstance(meta["files"], dict) or not isinstance(meta["config"], dict)):
    raise IndexLoadError(f"saved index in {folder}: {META_FILE} lacks some of {keys}")
  if meta["format"] != FORMAT_VERSION or meta["backend"] != "scann":
    raise IndexLoadError(f"saved index in {folder} is format {meta['format']} "
                         f"{meta['backend']!r}; expected format {FORMAT_VERSION} 'scann'")
  return meta


def build(vectors, cfg=IndexConfig(), normalize=True):
  """An index over `vectors` with the backend that `cfg` names (see `resolve_backend`)."""
  vectors = _database(vectors)
  if cfg.resolve_backend(len(vectors)) == "exact":
    return ExactIndex(vectors, normalize=normalize, batch_size=cfg.batch_size)
  return ScannIndex(vectors, cfg, normalize=normalize)


def neighbors(index, m):
  """int32 [N, m]: each item's m most similar items, best first, the item itself excluded.

  Only the item's own id is excluded: an identical copy of it is still a neighbour.
  """
  n = index.num_items
  itself = Csr(np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64))
  return index.search(index.vectors, m, exclude=itself)[0]


def recall_at_k(found, truth):
  """Mean fraction of each row's ids in `truth` (-1 padding aside) that `found` contains."""
  hits = [len(np.intersect1d(f, t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)]
  return float(np.mean(hits))


def neighbor_recall(index, found, queries=RECALL_QUERIES, seed=0):
  """recall@k of `found` ([N, k], best first, as `neighbors` returns) against exact search, and
  recall@j of its first j columns for each j of RECALL_AT below k.

  Checked on `queries` items drawn with `seed` (every item if there are fewer); an exact index
  is its own ground truth. Returns {"recall@j", ..., "recall@k", "queries", "seed"}.
  """
  n, k = found.shape
  rows = np.sort(np.random.default_rng(seed).choice(n, min(queries, n), replace=False))
  exact = index if isinstance(index, ExactIndex) else ExactIndex(index.vectors, normalize=False)
  itself = Csr(np.arange(len(rows) + 1, dtype=np.int64), rows.astype(np.int64))
  truth = exact.search(exact.vectors[rows], k, exclude=itself)[0]
  widths = sorted({j for j in RECALL_AT if j < k} | {k})
  recall = {f"recall@{j}": round(recall_at_k(found[rows, :j], truth[:, :j]), 4) for j in widths}
  return {**recall, "queries": len(rows), "seed": seed}
