"""Raw ratings to the canonical dataset: contiguous ids, timelines, samples and splits.

Two sampling schemes, as in the paper:
  chronological   (MovieLens, Amazon) sort all ratings by (timestamp, user, item); every rating
                  whose user has at least `min_history` earlier ratings is a sample; the samples
                  in that order are cut into train / valid / test by the split ratios.
  per_user_random (BookCrossing) each user's ratings are shuffled (seed); the last one is the
                  user's single sample, the rest its history; users are split at random.
"""
import numpy as np

from rallrec_jax.data import schema

SAMPLINGS = ("chronological", "per_user_random")


def _canonical(ids):
  """Sorted unique raw ids and each row's canonical id."""
  if np.issubdtype(ids.dtype, np.integer) and len(ids):
    low, high = int(ids.min()), int(ids.max())
    if high - low <= 4 * len(ids) + (1 << 20):
      # Small id ranges (MovieLens, BookCrossing users): an O(n) table instead of a sort.
      present = np.zeros(high - low + 1, bool)
      present[ids - low] = True
      rank = np.cumsum(present, dtype=np.int64) - 1
      return np.flatnonzero(present) + low, rank[ids - low].astype(np.int32)
  uniq, idx = np.unique(ids, return_inverse=True)
  return uniq, idx.astype(np.int32)


def _chronological_order(timestamp, user, item, num_users, num_items):
  """Row order sorted by (timestamp, user, item)."""
  span = int(timestamp.max()) - int(timestamp.min()) + 1
  if span * num_users * num_items < (1 << 62):
    # One sort of a combined int64 key is about three times faster than a 3-key lexsort.
    key = ((timestamp - timestamp.min()) * num_users + user) * num_items + item
    return np.argsort(key, kind="stable")
  return np.lexsort((item, user, timestamp))


def _timelines(user, item, rating, timestamp, num_users):
  """CSR timelines from rows already in timeline order; returns (timelines, position of row)."""
  by_user = np.argsort(user, kind="stable")
  counts = np.bincount(user, minlength=num_users)
  offsets = np.zeros(num_users + 1, np.int64)
  np.cumsum(counts, out=offsets[1:])
  pos = np.empty(len(user), np.int64)
  pos[by_user] = np.arange(len(user)) - offsets[user[by_user]]
  tl = schema.Timelines(offsets=offsets, item=item[by_user].astype(np.int32),
                        rating=rating[by_user].astype(np.float32),
                        timestamp=timestamp[by_user].astype(np.int64))
  return tl, pos


def split_sizes(n, ratios):
  """train = int(r0 n), valid = int(r1 n), test = the rest."""
  n_train = int(ratios[0] * n)
  n_valid = int(ratios[1] * n)
  return n_train, n_valid, n - n_train - n_valid


def _split(samples, ratios):
  n_train, n_valid, _ = split_sizes(len(samples), ratios)
  cuts = [0, n_train, n_train + n_valid, len(samples)]
  return {name: samples.take(np.arange(cuts[i], cuts[i + 1]))
          for i, name in enumerate(schema.SPLITS)}


def build(raw, name, sampling, min_history, label_threshold, split, seed=42):
  """Build a `schema.Dataset` from `RawData`."""
  if sampling not in SAMPLINGS:
    raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
  if len(raw.user) == 0:
    raise ValueError(f"{name}: no ratings left to build a dataset from")
  user_ids, user = _canonical(raw.user)
  item_ids, item = _canonical(raw.item)
  rating = raw.rating.astype(np.float32)
  rng = np.random.default_rng(seed)

  if sampling == "chronological":
    order = _chronological_order(raw.timestamp.astype(np.int64), user.astype(np.int64),
                                 item.astype(np.int64), len(user_ids), len(item_ids))
    u, it, r, ts = user[order], item[order], rating[order], raw.timestamp[order]
    timelines, pos = _timelines(u, it, r, ts, len(user_ids))
    keep = pos >= min_history
    samples = schema.Samples(user=u[keep], pos=pos[keep].astype(np.int32), target=it[keep],
                             rating=r[keep], label=(r[keep] > label_threshold).astype(np.int8),
                             timestamp=ts[keep].astype(np.int64))
  else:
    order = rng.permutation(len(user))
    order = order[np.argsort(user[order], kind="stable")]
    u, it, r = user[order], item[order], rating[order]
    timelines, pos = _timelines(u, it, r, np.zeros(len(u), np.int64), len(user_ids))
    # No time in these datasets: a rating's timestamp is its place in the shuffled timeline.
    timelines.timestamp = pos.astype(np.int64)
    counts = np.diff(timelines.offsets)
    users = np.flatnonzero(counts >= min_history + 1).astype(np.int32)
    last = timelines.offsets[users] + counts[users] - 1
    samples = schema.Samples(user=users, pos=(counts[users] - 1).astype(np.int32),
                             target=timelines.item[last], rating=timelines.rating[last],
                             label=(timelines.rating[last] > label_threshold).astype(np.int8),
                             timestamp=timelines.timestamp[last])
    samples = samples.take(rng.permutation(len(samples)))

  splits = _split(samples, split)
  items = [{"id": i, "raw_id": rid, **raw.items.get(rid, {})} for i, rid in enumerate(item_ids.tolist())]
  users = [{"id": i, "raw_id": rid, **raw.users.get(rid, {})} for i, rid in enumerate(user_ids.tolist())]
  meta = {
      "format_version": schema.FORMAT_VERSION,
      "name": name,
      "sampling": sampling,
      "num_users": len(users),
      "num_items": len(items),
      "num_ratings": int(len(raw.user)),
      "min_history": int(min_history),
      "label_threshold": float(label_threshold),
      "split_ratios": [float(x) for x in split],
      "splits": {k: len(v) for k, v in splits.items()},
      "positive_rate": {k: float(v.label.mean()) if len(v) else None for k, v in splits.items()},
      "notes": list(raw.notes),
  }
  return schema.Dataset(meta=meta, items=items, users=users, timelines=timelines, splits=splits)
