"""The target's like-rate and popularity in prompts (finetune.item_stats, item_popularity):
leak-free, equal to the baselines'."""
import hashlib

import numpy as np
import pytest

from rallrec_jax import config as config_lib, data, workdir_model
from rallrec_jax.data import schema
from rallrec_jax.eval import baselines
from rallrec_jax.llm import tiny, tokenizer as tok_lib
from rallrec_jax.prompts import item_stats, render


def _samples(rng, n, num_items, t0):
  return schema.Samples(
      user=np.zeros(n, np.int32), pos=np.ones(n, np.int32),
      target=rng.integers(0, num_items, n).astype(np.int32),
      rating=np.ones(n, np.float32), label=rng.integers(0, 2, n).astype(np.int8),
      # Few distinct timestamps, so that ties are common.
      timestamp=t0 + rng.integers(0, 40, n))


def _dataset(seed=0, num_items=7):
  rng = np.random.default_rng(seed)
  splits = {"train": _samples(rng, 300, num_items, 0), "test": _samples(rng, 50, num_items, 100)}
  items = [{"title": f"Item{i}", "genres": []} for i in range(num_items)]
  return schema.Dataset(meta={"name": "ml1m", "sampling": "chronological"}, items=items,
                        users=[{"gender": "M", "age": 1, "occupation": "writer"}],
                        timelines=schema.Timelines(
                            offsets=np.array([0, 1]), item=np.zeros(1, np.int32),
                            rating=np.full(1, 4.0, np.float32), timestamp=np.full(1, -1)),
                        splits=splits)


def _tokenizer(tmp_path, ds):
  """A word-level tokenizer that knows every word the item-stats prompts of `ds` can write."""
  folder = tmp_path / "tok"
  tiny.word_tokenizer(folder, tiny.vocabulary(
      [" ".join(it["title"] for it in ds.items), item_stats.vocabulary_text(),
       render.render_prompt(ds.users[0], [], "Item0", "ml1m")]))
  return tok_lib.load(folder)


def test_train_rates_count_only_earlier_train_samples():
  ds = _dataset()
  train = ds.splits["train"]
  rate = train.label.mean()
  samples = np.arange(len(train))
  got = item_stats.target_rates(ds, "train", samples)
  for i in samples:
    earlier = [j for j in samples if (train.timestamp[j], j) < (train.timestamp[i], i)
               and train.target[j] == train.target[i]]
    likes = sum(int(train.label[j]) for j in earlier)
    want = (likes + item_stats.PRIOR * rate) / (len(earlier) + item_stats.PRIOR)
    assert got[i] == pytest.approx(want, abs=1e-12), i


def test_test_rates_equal_the_item_like_rate_baseline():
  ds = _dataset()
  train = ds.splits["train"]
  label = train.label.astype(np.float64)
  fitted = baselines.Fitted(
      item_likes=np.bincount(train.target, weights=label, minlength=7),
      item_count=np.bincount(train.target, minlength=7).astype(np.float64),
      like_rate=float(label.mean()), mean_rating=1.0, threshold=3.0, model=None)
  samples = np.arange(50)
  np.testing.assert_allclose(item_stats.target_rates(ds, "test", samples),
                             fitted.item_rate(ds.splits["test"].target[samples]))


def test_prompt_names_the_target_with_its_rate(tmp_path):
  ds = _dataset()
  tok = _tokenizer(tmp_path, ds)
  result = {"sample": np.array([3, 4]), "user": np.array([0, 0], np.int32),
            "target": ds.splits["test"].target[[3, 4]],
            "history": np.zeros((2, 1), np.int32)}
  out = render.build_examples(ds, result, tok, split="test", labels=False, item_stats=True)
  rates = item_stats.target_rates(ds, "test", [3, 4])
  for row, rate, target in zip(out["input_ids"], rates, result["target"]):
    title = f"Item{target} ({item_stats.phrase(rate)})"
    text = render.render_prompt(ds.users[0], [("Item0", 4.0)], title, "ml1m")
    np.testing.assert_array_equal(row, render.encode(tok, text)["input_ids"])
    assert tok.unk_token_id not in row.tolist()
  plain = render.build_examples(ds, result, tok, split="test", labels=False)
  assert "raters" not in tok.decode(plain["input_ids"][0])


def test_phrase_rounds_to_whole_percent():
  assert item_stats.phrase(0.6449) == "liked by 64% of its earlier raters"
  assert item_stats.phrase(1.0) == "liked by 100% of its earlier raters"


def test_unrated_rates_count_the_train_samples_before_their_timestamp():
  ds = _dataset(seed=3)
  train = ds.splits["train"]
  rng = np.random.default_rng(4)
  ds.splits[item_stats.UNRATED] = _samples(rng, 40, 7, 0)
  negatives = ds.splits[item_stats.UNRATED]
  rate = train.label.mean()
  got = item_stats.target_rates(ds, item_stats.UNRATED, np.arange(40))
  for i in range(40):
    earlier = (train.target == negatives.target[i]) & (train.timestamp < negatives.timestamp[i])
    want = ((train.label[earlier].sum() + item_stats.PRIOR * rate)
            / (earlier.sum() + item_stats.PRIOR))
    assert got[i] == pytest.approx(want, abs=1e-12), i
  assert len(np.unique(got)) > 5


def _loop_levels(ds, split, samples):
  """Popularity levels recomputed by scanning: the target's number of liked train samples its
  prompt may count, against the deciles of the rated items' final train like counts."""
  train = ds.splits["train"]
  n = len(train.target)
  rated = [i for i in range(len(ds.items)) if np.any(train.target == i)]
  final = [np.sum((train.target == i) & (train.label == 1)) for i in rated]
  edges = np.quantile(final, np.arange(1, 10) / 10)
  out = []
  for i in samples:
    target = ds.splits[split].target[i]
    if split == "train":
      earlier = [j for j in range(n) if (train.timestamp[j], j) < (train.timestamp[i], i)]
    elif split == item_stats.UNRATED:
      earlier = [j for j in range(n) if train.timestamp[j] < ds.splits[split].timestamp[i]]
    else:
      earlier = list(range(n))
    likes = sum(train.target[j] == target and train.label[j] == 1 for j in earlier)
    out.append(sum(likes >= e for e in edges))
  return np.array(out)


@pytest.mark.parametrize("split", ["train", "test", item_stats.UNRATED])
def test_popularity_levels_match_a_scan_of_the_earlier_train_samples(split):
  ds = _dataset(seed=5, num_items=9)
  # A skewed catalogue, so that the levels spread.
  rng = np.random.default_rng(6)
  train = ds.splits["train"]
  train.target[:] = np.minimum(rng.geometric(0.25, len(train.target)) - 1, 8)
  ds.splits[item_stats.UNRATED] = _samples(rng, 40, 9, 0)
  samples = np.arange(len(ds.splits[split].target))
  got = item_stats.popularity_levels(ds, split, samples)
  np.testing.assert_array_equal(got, _loop_levels(ds, split, samples))
  assert len(np.unique(got)) >= 3


def test_phrase_names_the_popularity_level():
  assert item_stats.phrase(0.6449, 6) == (
      "liked by 64% of its earlier raters, more liked than 60% of movies")
  assert item_stats.phrase(None, 0) == "more liked than 0% of movies"
  assert item_stats.phrase(0.5) == "liked by 50% of its earlier raters"


@pytest.mark.parametrize("item_stats_on", [True, False])
def test_prompt_names_the_target_with_its_popularity(tmp_path, item_stats_on):
  ds = _dataset()
  tok = _tokenizer(tmp_path, ds)
  rows = np.arange(12)
  result = {"sample": rows, "user": np.zeros(12, np.int32),
            "target": ds.splits["test"].target[rows], "history": np.zeros((12, 1), np.int32)}
  out = render.build_examples(ds, result, tok, split="test", labels=False,
                              item_stats=item_stats_on, item_popularity=True)
  rates = item_stats.target_rates(ds, "test", rows)
  levels = _loop_levels(ds, "test", rows)
  for row, rate, level, target in zip(out["input_ids"], rates, levels, result["target"]):
    title = f"Item{target} ({item_stats.phrase(rate if item_stats_on else None, level)})"
    text = render.render_prompt(ds.users[0], [("Item0", 4.0)], title, "ml1m")
    np.testing.assert_array_equal(row, render.encode(tok, text)["input_ids"])
    assert tok.unk_token_id not in row.tolist()


def test_the_popularity_phrase_leaves_the_default_tiny_vocabulary_alone():
  """The tiny decoder's random weights follow its word ranks, so the default texts must rank as
  every earlier run's did (this hash is theirs); the popularity phrase, whose words the
  synthetic texts already hold, leaves them as they are, and joins a catalogue that lacks them."""
  c = config_lib.base_config().data
  c.synthetic.num_users, c.synthetic.num_items, c.synthetic.num_ratings = 60, 80, 2400
  ds = data.prepare(c)
  default = tiny.vocabulary(workdir_model._tiny_vocabulary_texts(ds))
  assert hashlib.sha256(" ".join(default).encode()).hexdigest() == (
      "376e1b9803228787c1c53bc7d73a0002f88fd4aec98143d6970e66082c433b30")
  texts = workdir_model._tiny_vocabulary_texts(ds, popularity=True)
  assert tiny.vocabulary(texts) == default
  for item in ds.items:
    item["title"] = item["title"].replace("movies", "books")
  ds.meta["name"] = "bookcrossing"
  texts = workdir_model._tiny_vocabulary_texts(ds, popularity=True)
  assert texts[-1] == item_stats.phrase(None, 0)
