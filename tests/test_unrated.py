"""Unrated negatives of the fine-tune (finetune.unrated): never-rated, near the user's recent
items by a brute-force search, the pool sample's moment kept; and in the training examples."""
import numpy as np
import pytest

from rallrec_jax import config as config_lib
from rallrec_jax.data import schema
from rallrec_jax.llm import tiny, tokenizer as tok_lib
from rallrec_jax.prompts import item_stats, render
from rallrec_jax.train import stage as train_stage
from rallrec_jax.train import unrated
from tests.test_config import load_config


def _dataset(seed=0, users=6, items=30, length=12):
  rng = np.random.default_rng(seed)
  timelines = [rng.choice(items, length, replace=False) for _ in range(users)]
  offsets = np.arange(users + 1) * length
  rows = [(u, p) for u in range(users) for p in range(3, length)]
  user = np.array([u for u, _ in rows], np.int32)
  pos = np.array([p for _, p in rows], np.int32)
  train = schema.Samples(user=user, pos=pos,
                         target=np.array([timelines[u][p] for u, p in rows], np.int32),
                         rating=np.full(len(rows), 4.0, np.float32),
                         label=rng.integers(0, 2, len(rows)).astype(np.int8),
                         timestamp=np.arange(len(rows), dtype=np.int64) * 10)
  t = schema.Timelines(offsets=offsets, item=np.concatenate(timelines).astype(np.int32),
                       rating=np.full(users * length, 4.0, np.float32),
                       timestamp=np.arange(users * length, dtype=np.int64))
  return schema.Dataset(meta={"name": "ml1m"}, items=[{"title": f"I{i}"} for i in range(items)],
                        users=[{} for _ in range(users)], timelines=t, splits={"train": train})


def test_negatives_are_near_never_rated_items_at_the_pool_samples_moment():
  ds = _dataset()
  vectors = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
  rows = np.arange(0, len(ds.splits["train"]), 2)
  got = unrated.samples(ds, rows, vectors, candidates=5, recent=3, seed=0)
  train = ds.splits["train"].take(rows)
  for name in ("user", "pos", "timestamp"):
    np.testing.assert_array_equal(getattr(got, name), getattr(train, name))
  assert (got.label == 0).all() and (got.rating == 0).all()
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  t = ds.timelines
  for user, pos, target in zip(got.user, got.pos, got.target):
    timeline = t.item[t.offsets[user]:t.offsets[user + 1]]
    assert target not in timeline
    query = unit[timeline[max(0, pos - 3):pos]].sum(0)
    nearest = [i for i in np.argsort(-(unit @ query), kind="stable") if i not in timeline][:5]
    assert target in nearest
  assert len(set(got.target.tolist())) > 3
  again = unrated.samples(ds, rows, vectors, candidates=5, recent=3, seed=0)
  np.testing.assert_array_equal(again.target, got.target)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_the_fraction_is_validated(value):
  cfg = load_config("quickstart", "runlocal=true")
  cfg.finetune.unrated = value
  with pytest.raises(config_lib.ConfigError, match="finetune.unrated: must lie in"):
    config_lib.validate(cfg)


def test_the_fine_tune_examples_end_with_the_negatives_answered_no(tmp_path):
  ds = _dataset(seed=2)
  ds.meta.update(label_threshold=3.0, sampling="chronological")
  ds.users[:] = [{"gender": "M", "age": 1, "occupation": "writer"} for _ in ds.users]
  for item in ds.items:
    item["genres"] = []
  cfg = config_lib.apply_overrides(load_config("quickstart", "runlocal=true"), {
      "finetune.unrated": 0.5, "finetune.item_stats": True, "finetune.loss": "lm",
      "retrieval.k": 3, "retrieval.order": "simple"})
  folder = tmp_path / "tok"
  tiny.word_tokenizer(folder, tiny.vocabulary(
      [" ".join(it["title"] for it in ds.items), item_stats.vocabulary_text(),
       render.render_prompt(ds.users[0], [("I0", 4.0)], "I1", "ml1m"), "Yes. No."]))
  tok = tok_lib.load(folder)
  vectors = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
  pairs = [("simple", int(s)) for s in range(0, 40, 3)]
  results = {"simple": train_stage.history.retrieve(ds, "train", vectors, k=3, order="simple")}
  examples = train_stage.build_examples(ds, tok, "train", results, pairs, labels=True,
                                        max_length=512, item_stats=True)
  out = train_stage.with_unrated(cfg, ds, tok, vectors, pairs, examples)
  added = round(0.5 * len(pairs))
  assert len(out["input_ids"]) == len(out["label"]) == len(pairs) + added
  assert out["input_ids"][:len(pairs)] == examples["input_ids"]
  assert (out["label"][len(pairs):] == 0).all()
  negatives = unrated.samples(ds, [s for _, s in pairs[:added]], vectors, seed=cfg.finetune.seed)
  for row, target in zip(out["input_ids"][len(pairs):], negatives.target):
    text = tok.decode(row).replace(" ", "")   # the word tokenizer spaces every token
    assert f"***I{target}(likedby" in text and text.endswith("No.")
