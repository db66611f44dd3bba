"""The canonical dataset in `W/data/`, and the one function that loads it back.

Layout:
  meta.json              dataset name, sizes, split sizes, label rule
  items.jsonl            {"id": i, "raw_id": ..., text fields} for canonical item 0..n-1
  users.jsonl            {"id": u, "raw_id": ..., profile fields} for canonical user 0..m-1
  timelines.npz          per-user chronological timelines as CSR: offsets [m+1], item, rating,
                         timestamp [R] (user u's ratings are rows offsets[u]:offsets[u+1])
  samples_{split}.npz    user, pos (index of the target in the user's timeline = history
                         length), target, rating, label, timestamp; one row per sample
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from rallrec_jax import atomic

SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1


@dataclasses.dataclass
class Timelines:
  offsets: np.ndarray    # int64 [num_users + 1]
  item: np.ndarray       # int32 [R]
  rating: np.ndarray     # float32 [R]
  timestamp: np.ndarray  # int64 [R]


@dataclasses.dataclass
class Samples:
  user: np.ndarray       # int32 [N]
  pos: np.ndarray        # int32 [N] target's index in the user's timeline
  target: np.ndarray     # int32 [N]
  rating: np.ndarray     # float32 [N]
  label: np.ndarray      # int8 [N]
  timestamp: np.ndarray  # int64 [N]

  def __len__(self):
    return len(self.user)

  def take(self, index):
    return Samples(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})


@dataclasses.dataclass
class Dataset:
  meta: dict
  items: list            # dicts, canonical order
  users: list            # dicts, canonical order
  timelines: Timelines
  splits: dict           # split name -> Samples

  @property
  def num_items(self):
    return len(self.items)

  @property
  def num_users(self):
    return len(self.users)

  def history_bounds(self, samples, max_history=0):
    """Rows [start, end) of each sample's history in the timeline arrays.

    The history is every earlier rating of the user; `max_history` > 0 keeps only the most
    recent ones.
    """
    start = self.timelines.offsets[samples.user]
    end = start + samples.pos
    if max_history > 0:
      start = np.maximum(start, end - max_history)
    return start, end

  def train_interactions(self):
    """(user, item) of the ratings a model may learn from without seeing valid or test.

    Chronological datasets: the ratings older than the first valid or test sample (ties at
    that instant excluded). Per-user random ones (BookCrossing): every rating except the
    valid and test targets.
    """
    t = self.timelines
    user = np.repeat(np.arange(self.num_users, dtype=np.int32), np.diff(t.offsets))
    held = [s for name, s in self.splits.items() if name != "train" and len(s)]
    if not held:
      return user, t.item
    if self.meta["sampling"] == "chronological":
      keep = t.timestamp < min(int(s.timestamp.min()) for s in held)
    else:
      keep = np.ones(len(t.item), bool)
      for s in held:
        keep[t.offsets[s.user] + s.pos] = False
    return user[keep], t.item[keep]

  def history(self, split, index, max_history=0):
    """(items, ratings, timestamps) of one sample's history, oldest first."""
    s = self.splits[split].take(np.array([index]))
    (start,), (end,) = self.history_bounds(s, max_history)
    t = self.timelines
    return t.item[start:end], t.rating[start:end], t.timestamp[start:end]


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def save(ds, path):
  """Write `ds` to folder `path` atomically (an earlier folder stays intact on failure)."""
  with atomic.directory(path) as tmp:
    _write_jsonl(tmp / "items.jsonl", ds.items)
    _write_jsonl(tmp / "users.jsonl", ds.users)
    np.savez(tmp / "timelines.npz", **dataclasses.asdict(ds.timelines))
    for name, samples in ds.splits.items():
      np.savez(tmp / f"samples_{name}.npz", **dataclasses.asdict(samples))
    (tmp / "meta.json").write_text(json.dumps(ds.meta, indent=1) + "\n")


def load(path):
  """Load a dataset folder written by `save`."""
  path = Path(path)
  if not (path / "meta.json").is_file():
    raise FileNotFoundError(f"{path} holds no prepared dataset (run the 'prepare' stage first)")
  meta = json.loads((path / "meta.json").read_text())
  with np.load(path / "timelines.npz") as z:
    timelines = Timelines(**{k: z[k] for k in z.files})
  splits = {}
  for name in meta["splits"]:
    with np.load(path / f"samples_{name}.npz") as z:
      splits[name] = Samples(**{k: z[k] for k in z.files})
  return Dataset(meta=meta, items=_read_jsonl(path / "items.jsonl"),
                 users=_read_jsonl(path / "users.jsonl"), timelines=timelines, splits=splits)


def load_dataset(workdir):
  """The prepared dataset of a workdir (`W/data/`)."""
  return load(Path(workdir) / "data")
