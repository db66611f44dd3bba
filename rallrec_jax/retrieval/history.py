"""Choose the K history items of each sample's prompt (PAPER.md steps 6 and 7).

A sample's history is every earlier rating of its user (optionally only the `max_history` most
recent). Retrieval scores it against the sample's target by cosine similarity of item
embeddings, on the accelerator. The samples of one user share a timeline, so they are scored
in blocks: a block holds a few samples of one user and the slice of that user's timeline their
histories cover, one matrix product scores every (sample, slice item) pair, a mask keeps each
sample's own history and `jax.lax.top_k` keeps the best K (on the CPU, where it is several
times faster, numpy's partition on the host: `host_top_k`). Blocks are bucketed by slice width
so that each bucket is one compiled shape and padding stays small.

Tie rule: of equal scores, the more recent history item ranks first. The slice is laid out
newest first and `jax.lax.top_k` puts the lower index first among equal values, so the rule is
exact rather than an epsilon. Scores of -0.0 become +0.0 first, since top_k orders them apart.

Orders (prompt order of the K items):
  simple      the last K history items, oldest first.
  high        the K most similar, most similar first.
  sequential  the K most similar, oldest first.
  rerank      K1 = floor(2K/3): the K1 most recent of the K most similar, most recent first;
              then the K - K1 most recent history items not chosen yet (by position), oldest
              first. With `rerank_short=False`, histories of at most K items use `sequential`.
  fusion      the K best by (1 + cos) / 2 * 0.5 ** (age / half_life), oldest first, where age
              counts the later history items (0 for the most recent). Mapping the similarity to
              [0, 1] makes the decay lower every score; on raw cosines it would raise negative
              ones, and a short half-life would no longer mean "most recent first".
"""
import collections
import concurrent.futures
import typing
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax import atomic, numeric, progress

ORDERS = ("simple", "high", "sequential", "rerank", "fusion")
MAX_BLOCK = 64           # samples per block, at most
GRID = 32                # bucket widths are multiples of this
SHAPE_COST = 1 << 22     # a bucket's compile takes about as long as scoring this many pairs
CALL_WIDTH = 256         # a call scores about batch_size * CALL_WIDTH pairs (cache-sized)
PROGRESS_MIN = 100_000   # samples from which a progress bar is shown


def normalize(embeddings):
  """Unit float32 rows (zero rows stay zero), so a dot product is the cosine."""
  e = np.asarray(embeddings, np.float64)
  if e.ndim != 2:
    raise ValueError(f"embeddings must be [num_items, dim], got shape {e.shape}")
  if not np.isfinite(e).all():
    raise ValueError("embeddings hold NaN or infinite values")
  return numeric.unit_rows(e).astype(np.float32)


def _scores(table, rows, targets, first, count, decay):
  """Scores [C, M, L] of each block sample against its block's timeline slice; -inf elsewhere.

  rows [C, L] is a block's timeline slice, newest first; targets, first, count [C, M] say that
  a sample's history is columns [first, first + count) of its block. decay [L] (or None for
  plain cosine) is the fusion factor by age. -0.0 becomes +0.0, since top_k orders them apart.
  """
  hist = jnp.take(table, rows, axis=0, mode="clip")
  target = jnp.take(table, targets, axis=0, mode="clip")
  score = jnp.einsum("cmd,cld->cml", target, hist, precision=jax.lax.Precision.HIGHEST)
  age = jnp.arange(rows.shape[1], dtype=jnp.int32) - first[..., None]
  if decay is not None:
    score = (1 + score) / 2 * jnp.take(decay, age, mode="clip")
  valid = (age >= 0) & (age < count[..., None])
  return jnp.where(valid, jnp.where(score == 0, 0.0, score), -jnp.inf)


@partial(jax.jit, static_argnames=("k",))
def _block_top_k(table, rows, targets, first, count, decay, *, k):
  """Ages (0 = newest) of each block sample's k best history items, best first; -1 past the end."""
  value, col = jax.lax.top_k(_scores(table, rows, targets, first, count, decay), k)
  return jnp.where(value > -jnp.inf, col - first[..., None], -1)


@partial(jax.jit, static_argnames=("k",))
def _block_scores(table, rows, targets, first, count, decay, *, k):
  """The scores `host_top_k` selects from (`k` only keeps the signature of `_block_top_k`)."""
  del k
  return _scores(table, rows, targets, first, count, decay)


def host_top_k(score, first, k, ranked=True):
  """Ages of each row's k best scores, as `_block_top_k` gives them, from scores on the host.

  score [R, L] (-inf outside the row's history), first [R]. numpy's partition finds each row's
  k-th largest value; the columns above it are kept, and of the columns equal to it the first
  ones (the more recent items), as many as are missing. Ages come best first when `ranked`,
  newest first otherwise (all a retrieval order needs but `high`). On the CPU this is several
  times faster than `jax.lax.top_k`, whose cost per row is high for rows of a few hundred.
  """
  width = score.shape[1]
  kth = np.partition(score, width - k, axis=1)[:, width - k, None]
  take = score > kth
  ties = (score == kth) & (kth > -np.inf)
  missing = k - take.sum(axis=1)
  over = np.flatnonzero(ties.sum(axis=1) > missing)
  take |= ties
  if len(over):
    tied = ties[over]
    take[over] = (score[over] > kth[over]) | (tied & (np.cumsum(tied, axis=1)
                                                      <= missing[over, None]))
  row, col = np.nonzero(take)
  if ranked:
    order = np.lexsort((col, -score[row, col], row))
    row, col = row[order], col[order]
  per_row = np.bincount(row, minlength=len(score))
  slot = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
  ages = np.full((len(score), k), -1, np.int64)
  ages[row, slot] = col - first[row]
  return ages


def _block_size(user):
  """Samples per block: a power of two near the mean samples per user, so blocks fill up."""
  mean = len(user) / max(1, len(np.unique(user)))
  return int(min(MAX_BLOCK, 2 ** np.floor(np.log2(max(mean, 1.0)))))


def _blocks(user, start, end, size):
  """Group non-empty histories into blocks of up to `size` samples of one user.

  Returns members [B, size] (sample index, -1 for an empty slot) and each block's timeline
  slice [lo, hi). Samples are sorted by user then time, so a block's first member starts the
  slice and its last member ends it.
  """
  live = np.flatnonzero(end > start)
  order = live[np.lexsort((end[live], user[live]))]
  u = user[order]
  new_user = np.r_[True, u[1:] != u[:-1]]
  rank = np.arange(len(u)) - np.maximum.accumulate(np.where(new_user, np.arange(len(u)), 0))
  slot = rank % size
  block = np.cumsum(slot == 0) - 1
  members = np.full((block[-1] + 1 if len(u) else 0, size), -1, np.int64)
  members[block, slot] = order
  last = np.r_[block[1:] != block[:-1], True] if len(u) else np.zeros(0, bool)
  return members, start[order[slot == 0]], end[order[last]]


def _bucket_widths(spans, size, k):
  """Each block's bucket width (a multiple of GRID, at least its span and k).

  The bucket edges minimise the padded scores plus SHAPE_COST per bucket, by dynamic
  programming over the distinct rounded spans: finer buckets waste less, but each is a compile.
  """
  need = -(-np.maximum(spans, max(k, 1)) // GRID) * GRID
  widths, counts = np.unique(need, return_counts=True)
  total = np.r_[0, np.cumsum(counts)]
  best = np.zeros(len(widths) + 1)
  cut = np.zeros(len(widths) + 1, np.int64)
  for i in range(1, len(widths) + 1):
    cost = best[:i] + float(widths[i - 1] * size) * (total[i] - total[:i]) + SHAPE_COST
    cut[i] = np.argmin(cost)
    best[i] = cost[cut[i]]
  edges, i = [], len(widths)
  while i:
    edges.append(widths[i - 1])
    i = cut[i]
  edges = np.array(edges[::-1])
  return edges[np.searchsorted(edges, need)]


def _plan(widths, size, batch_size):
  """(width, block indices [calls, per_call]) per bucket; calls of a bucket are equal in size.

  A call holds about batch_size * CALL_WIDTH scores; the last is padded with -1 blocks.
  """
  for width in np.unique(widths):
    index = np.flatnonzero(widths == width)
    calls = -(-len(index) // max(1, batch_size * CALL_WIDTH // (size * width)))
    per_call = -(-len(index) // calls)
    padded = np.full(calls * per_call, -1, np.int64)
    padded[:len(index)] = index
    yield int(width), padded.reshape(calls, per_call)


def _compile(kernel, table, decay, blocks, size, width, k):
  """Compile the kernel for one call shape; run ahead in a thread while earlier calls run."""
  def spec(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)
  kernel.lower(table, spec(blocks, width), spec(blocks, size), spec(blocks, size),
               spec(blocks, size), decay, k=k).compile()


class _Histories(typing.NamedTuple):
  """What the kernel inputs are cut from: timeline items, and per sample its target and rows."""
  items: np.ndarray
  target: np.ndarray
  start: np.ndarray
  end: np.ndarray


def _call_inputs(hist, members, lo, hi, call, width):
  """Members [C, M] of the blocks `call` (-1 pads) and the device inputs of that call.

  Inputs: each block's timeline slice newest first, its samples' targets, and where each
  sample's history starts (column) and how long it is.
  """
  present = call >= 0
  b = np.maximum(call, 0)
  call_members = np.where(present[:, None], members[b], -1)
  lo, hi = np.where(present, lo[b], 0), np.where(present, hi[b], 0)
  row = hi[:, None] - 1 - np.arange(width)
  rows = np.where(row >= lo[:, None], hist.items[np.maximum(row, 0)], 0)
  filled = call_members >= 0
  m = np.maximum(call_members, 0)
  target = np.where(filled, hist.target[m], 0)
  first = np.where(filled, hi[:, None] - hist.end[m], 0)
  count = np.where(filled, hist.end[m] - hist.start[m], 0)
  inputs = tuple(x.astype(np.int32) for x in (rows, target, first, count))
  return call_members, inputs


def _decay_table(width, half_life):
  """0.5 ** (age / half_life) for ages 0..width-1, computed on the host so it is exact to test."""
  if half_life is None:
    return None
  return (0.5 ** (np.arange(width) / half_life)).astype(np.float32)


def _scored_calls(dataset, samples, embeddings, k, max_history, half_life, batch_size,
                  ranked=True):
  """Yield (sample indices, ages [n, k]) per device call: each sample's k best.

  Ages count back from the newest history item (0); -1 marks slots past a short history. They
  come best first when `ranked`, else in any order. Up to four calls are in flight and their
  results are taken in two worker threads, so host and device work overlap; bucket shapes
  compile in a background thread ahead of their turn. On the CPU the k best are chosen by
  `host_top_k` in those threads, elsewhere by top_k on the device.
  """
  start, end = dataset.history_bounds(samples, max_history)
  size = _block_size(samples.user[end > start])
  members, lo, hi = _blocks(samples.user, start, end, size)
  if not len(members):
    return
  hist = _Histories(dataset.timelines.item, samples.target, start, end)
  table = jnp.asarray(normalize(embeddings))
  plan = list(_plan(_bucket_widths(hi - lo, size, k), size, batch_size))
  on_host = jax.default_backend() == "cpu"
  kernel = _block_scores if on_host else _block_top_k
  pending = collections.deque()
  pool = concurrent.futures.ThreadPoolExecutor(1)
  selector = concurrent.futures.ThreadPoolExecutor(2)
  try:
    compiled = [pool.submit(_compile, kernel, table, _decay_table(width, half_life),
                            len(calls[0]), size, width, k) for width, calls in plan]
    for (width, calls), ready in progress.bar(list(zip(plan, compiled)), desc="retrieve",
                                              unit="bucket", disable=len(samples) < PROGRESS_MIN):
      ready.result()
      decay = _decay_table(width, half_life)
      for call in calls:
        call_members, inputs = _call_inputs(hist, members, lo, hi, call, width)
        out = kernel(table, *inputs, decay, k=k)
        pending.append(selector.submit(_fetch, call_members, out,
                                       inputs[2] if on_host else None, k, ranked))
        if len(pending) > 3:
          yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(cancel_futures=True)
    selector.shutdown(cancel_futures=True)


def _fetch(call_members, out, first, k, ranked):
  """(sample indices, ages [n, k]) of one finished call, empty block slots dropped.

  `out` is the call's ages, or its scores when `first` is given (the host selection).
  """
  keep = call_members >= 0
  out = np.asarray(out)[keep]
  if first is not None:
    out = host_top_k(out, first[keep], k, ranked)
  return call_members[keep], out


def top_k_history(dataset, samples, embeddings, k, *, max_history=0, half_life=None,
                  batch_size=4096):
  """Timeline rows [N, k] of each sample's k best-scoring history items, best first.

  The score is the cosine to the target, or the fusion score when `half_life` is given (module
  doc); equal scores rank the more recent item first. Rows past a short history are -1.
  """
  _, end = dataset.history_bounds(samples, max_history)
  out = np.full((len(samples), k), -1, np.int64)
  for sample, ages in _scored_calls(dataset, samples, embeddings, k, max_history, half_life,
                                    batch_size):
    out[sample] = np.where(ages >= 0, end[sample, None] - 1 - ages, -1)
  return out


def _last_ages(count, k):
  """Ages of the last k history items, oldest first, -1 padded at the end."""
  n = np.minimum(count, k)[:, None]
  col = np.arange(k)
  return np.where(col < n, n - 1 - col, -1)


def _rerank(top, count, k):
  """PAPER.md step 7 on the retrieved ages `top` (see the module doc)."""
  k1 = 2 * k // 3
  none = np.iinfo(top.dtype).max
  newest = np.sort(np.where(top < 0, none, top), axis=1)[:, :k1]
  recent = _recent_unchosen(newest, count, k, k - k1)
  newest = np.where(newest == none, -1, newest)
  filled = (newest >= 0).sum(axis=1, keepdims=True)
  col = np.arange(k)
  pick = np.minimum(np.where(col < filled, col, k1 + col - filled), k)
  padded = np.concatenate([newest, recent, np.full((len(top), 1), -1, top.dtype)], axis=1)
  return np.take_along_axis(padded, pick, axis=1)


def _recent_unchosen(newest, count, k, wanted):
  """Ages of the `wanted` most recent history items not in `newest`, oldest first, -1 padded.

  They all lie among the last k history items, so only ages 0..k-1 are looked at.
  """
  chosen = np.zeros((len(newest), k + 1), bool)
  chosen[np.arange(len(newest))[:, None], np.minimum(newest, k)] = True
  free = ~chosen[:, :k] & (np.arange(k) < count[:, None])
  keep = free & (np.cumsum(free, axis=1) <= wanted)
  return np.sort(np.where(keep, np.arange(k), -1), axis=1)[:, ::-1][:, :wanted]


def _prompt_ages(top, count, k, order, rerank_short):
  """Ages of the prompt items in prompt order, from the retrieved ages `top` (best first for
  `high`; the other orders only need the set)."""
  if order == "high":
    return top
  oldest_first = np.sort(top, axis=1)[:, ::-1]
  if order in ("sequential", "fusion"):
    return oldest_first
  reranked = _rerank(top, count, k)
  if rerank_short:
    return reranked
  return np.where((count <= k)[:, None], oldest_first, reranked)


def _order_ages(dataset, samples, embeddings, k, order, max_history, half_life, rerank_short,
                batch_size):
  """Yield (sample indices, ages [n, k] in prompt order) over all samples with a history."""
  start, end = dataset.history_bounds(samples, max_history)
  count = end - start
  if order == "simple":
    yield np.arange(len(samples)), _last_ages(count, k)
    return
  for sample, top in _scored_calls(dataset, samples, embeddings, k, max_history,
                                   half_life if order == "fusion" else None, batch_size,
                                   ranked=order == "high"):
    yield sample, _prompt_ages(top, count[sample], k, order, rerank_short)


def _items(timeline_items, end, ages):
  """Item ids of the history items `ages` back from each history's `end` row (-1 stays -1)."""
  rows = np.where(ages >= 0, end[:, None] - 1 - ages, 0)
  return np.where(ages >= 0, timeline_items[rows], -1)


def _check(dataset, embeddings, k, order, half_life):
  """Reject bad arguments before any work, with a message that names the fix."""
  if order not in ORDERS:
    raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
  if not (isinstance(k, int) and k > 0):
    raise ValueError(f"k must be a positive integer, got {k!r}")
  if not half_life > 0:
    raise ValueError(f"half_life must be > 0, got {half_life!r}")
  if np.shape(embeddings)[0] != dataset.num_items:
    raise ValueError(f"embeddings have {np.shape(embeddings)[0]} rows for "
                     f"{dataset.num_items} items")


def retrieve(dataset, split, embeddings, *, k=30, order="rerank", max_history=0, half_life=10.0,
             rerank_short=True, batch_size=4096):
  """The k prompt items of every sample of `split`, as canonical item ids in prompt order.

  Returns sample (index in the split), user, target and history [N, k] (-1 padded at the end
  when a history has fewer than k items). `embeddings` is [num_items, dim].
  """
  _check(dataset, embeddings, k, order, half_life)
  samples = dataset.splits[split]
  _, end = dataset.history_bounds(samples, max_history)
  history = np.full((len(samples), k), -1, np.int32)
  for sample, ages in _order_ages(dataset, samples, embeddings, k, order, max_history,
                                  half_life, rerank_short, batch_size):
    history[sample] = _items(dataset.timelines.item, end[sample], ages)
  return {"sample": np.arange(len(samples), dtype=np.int64),
          "user": samples.user.astype(np.int32),
          "target": samples.target.astype(np.int32),
          "history": history}


def retrieve_configured(dataset, split, embeddings, retrieval, max_history, order=None):
  """`retrieve` with the parameters of a config's `retrieval` section (`k`, `order` unless
  `order` is given, `half_life`, `rerank_short`, `batch_size`) and data.max_history."""
  return retrieve(dataset, split, embeddings, k=retrieval.k, order=order or retrieval.order,
                  max_history=max_history, half_life=retrieval.half_life,
                  rerank_short=retrieval.rerank_short, batch_size=retrieval.batch_size)


def save(result, path):
  """Write a `retrieve` result to `path` (.npz) through a temporary file, then rename."""
  with atomic.open_file(path) as f:
    np.savez(f, **result)


def load(path):
  """Read a result written by `save`."""
  with np.load(path) as z:
    return {name: z[name] for name in z.files}


def take(result, samples):
  """The rows of a result holding the given sample indices (of its split), in their order."""
  row_of = {int(s): r for r, s in enumerate(result["sample"])}
  missing = [int(s) for s in samples if int(s) not in row_of]
  if missing:
    raise ValueError(f"the retrieval result has no row for samples {missing[:10]}")
  rows = np.array([row_of[int(s)] for s in samples], np.int64)
  return {key: value[rows] for key, value in result.items()}
