"""Prompt text per dataset, answer loss masks, fitting to max_length and example building."""
import os
import re
from pathlib import Path

import numpy as np
import pytest

from rallrec_jax.data import schema
from rallrec_jax.eval import baselines
from rallrec_jax.llm import tiny, tokenizer as tok_lib
from rallrec_jax.prompts import render, templates, user_lifetime

PROFILE = {"gender": "F", "age": 25, "age_group": "25-34", "occupation": "writer"}
HISTORY = [("Toy Story (1995)", 5.0), ("Heat (1995)", 1.0), ("Babe (1995)", 3.5)]
TARGET = "Jumanji (1995)"
TITLES = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf"]

ML1M_TEXT = (
    "The user is a female. Her job is writer. Her age is 25-34.\n"
    "She watched the following relevant movies in the past, and rated them:\n"
    "Toy Story (1995) (5 stars)\n"
    "Heat (1995) (1 star)\n"
    "Babe (1995) (3.5 stars)\n"
    "Note that more stars the user rated the movie, the user liked the movie more.\n"
    "And we think the user will like a new movie if the rating could be higher than 3 stars\n"
    "Based on the movies she has watched, deduce if she will like the movie "
    "***Jumanji (1995)***.\n"
    "You should ONLY tell me yes or no.")


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
  """A word-level tokenizer with a chat template over the words of the test prompts."""
  folder = tmp_path_factory.mktemp("tok")
  texts = [ML1M_TEXT, " ".join(TITLES), "Kilo Lima Mike 0 1 2 3 4 5 male His He he",
           "liked these rated on average"]
  tiny.word_tokenizer(folder, tiny.vocabulary(texts))
  return tok_lib.load(folder)


@pytest.fixture(scope="module")
def smollm2():
  path = os.environ.get("RALLREC_SMOLLM2")
  if not path or not (Path(path) / "tokenizer.json").is_file():
    pytest.skip("set RALLREC_SMOLLM2 to the SmolLM2 folder to test its tokenizer")
  return tok_lib.load(path)


def test_ml1m_text():
  assert render.render_prompt(PROFILE, HISTORY, TARGET, "ml1m") == ML1M_TEXT


def test_movielens_without_age_group_uses_age():
  user = {"gender": "M", "age": 24, "occupation": "technician"}
  text = render.render_prompt(user, HISTORY[:1], TARGET, "ml100k")
  assert text.startswith("The user is a male. His job is technician. His age is 24.\n"
                         "He watched the following relevant movies in the past")
  assert "Based on the movies he has watched, deduce if he will like" in text


def test_amazon_text():
  expected = (
      "The user watched the following relevant movies in the past, and rated them:\n"
      "Heat (1995) (1 star)\n"
      "Note that more stars the user rated the movie, the user liked the movie more.\n"
      "And we think the user will like a new movie if the rating could be higher than 3 stars\n"
      "Based on the movies the user has watched, deduce if the user will like the movie "
      "***Jumanji (1995)***.\n"
      "You should ONLY tell me yes or no.")
  assert render.render_prompt({}, HISTORY[1:2], TARGET, "amazon_movies") == expected


def test_bookcrossing_text():
  user = {"location": "porto, portugal", "country": "portugal", "age": 31}
  expected = (
      "The user's location is portugal. The user's age is 31.\n"
      "The user read the following relevant books in the past, and rated them:\n"
      "Dune (8 stars)\n"
      "Emma (0 star)\n"
      "Note that more stars the user rated the book, the user liked the book more.\n"
      "And we think the user will like a new book if the rating could be higher than 4 stars\n"
      "Based on the books the user has read, deduce if the user will like the book ***Ulysses***.\n"
      "You should ONLY tell me yes or no.")
  history = [("Dune", 8), ("Emma", 0)]
  assert render.render_prompt(user, history, "Ulysses", "bookcrossing") == expected
  missing = render.render_prompt({"location": "", "country": None, "age": None}, history,
                                 "Ulysses", "bookcrossing")
  assert missing.startswith("The user's location is unknown. The user's age is unknown.\n")


@pytest.mark.parametrize("rating, text", [(5, "5 stars"), (4.0, "4 stars"), (3.5, "3.5 stars"),
                                          (1.5, "1.5 stars"), (1, "1 star"), (0.5, "0.5 star"),
                                          (np.float32(2.0), "2 stars")])
def test_stars(rating, text):
  assert templates.stars(rating) == text


def test_bad_inputs():
  with pytest.raises(ValueError, match="no prompt template"):
    render.render_prompt(PROFILE, HISTORY, TARGET, "netflix")
  with pytest.raises(ValueError, match="gender"):
    render.render_prompt({"gender": "X", "age": 1, "occupation": "x"}, HISTORY, TARGET, "ml1m")


@pytest.mark.parametrize("answer", ["Yes.", "No."])
def test_loss_mask_tiny(tiny_tok, answer):
  prompt = render.encode(tiny_tok, ML1M_TEXT)
  full = render.encode(tiny_tok, ML1M_TEXT, answer)
  n = len(prompt["input_ids"])
  assert not prompt["loss_mask"].any()
  np.testing.assert_array_equal(full["input_ids"][:n], prompt["input_ids"])
  assert full["loss_mask"].tolist() == [0] * n + [1, 1]
  masked = full["input_ids"][full["loss_mask"] == 1].tolist()
  assert tiny_tok.convert_ids_to_tokens(masked) == [answer[:-1], "."]
  assert tiny_tok.convert_ids_to_tokens(prompt["input_ids"][-1:].tolist()) == ["<|assistant|>"]


@pytest.mark.parametrize("answer", ["Yes.", "No."])
def test_loss_mask_smollm2(smollm2, answer):
  full = render.encode(smollm2, ML1M_TEXT, answer)
  prompt = render.encode(smollm2, ML1M_TEXT)
  n = len(prompt["input_ids"])
  np.testing.assert_array_equal(full["input_ids"][:n], prompt["input_ids"])
  assert not full["loss_mask"][:n].any() and full["loss_mask"][n:].all()
  masked = full["input_ids"][full["loss_mask"] == 1].tolist()
  assert smollm2.decode(masked) == answer
  assert smollm2.decode(prompt["input_ids"].tolist()).endswith("<|im_start|>assistant\n")


def _titled(n):
  return [(title, 4) for title in TITLES[:n]]


@pytest.mark.parametrize("drop, kept", [("last", TITLES[:4]), ("first", TITLES[3:])])
def test_fitting_drops_history_items(tiny_tok, drop, kept):
  history = _titled(7)
  full = render.encode_fitted(tiny_tok, PROFILE, history, TARGET, "ml1m", answer="Yes.")
  per_item = 5  # "Alpha ( 4 stars )"
  limit = len(full["input_ids"]) - 3 * per_item + 2
  fitted = render.encode_fitted(tiny_tok, PROFILE, history, TARGET, "ml1m", answer="Yes.",
                                max_length=limit, drop=drop)
  assert full["kept"] == 7 and fitted["kept"] == 4
  expected = render.encode(tiny_tok, render.render_prompt(
      PROFILE, [(t, 4) for t in kept], TARGET, "ml1m"), "Yes.")
  np.testing.assert_array_equal(fitted["input_ids"], expected["input_ids"])
  np.testing.assert_array_equal(fitted["loss_mask"], expected["loss_mask"])
  assert len(fitted["input_ids"]) <= limit


def test_fitting_too_long_even_empty(tiny_tok):
  empty = render.encode_fitted(tiny_tok, PROFILE, [], TARGET, "ml1m", answer="No.")
  n = len(empty["input_ids"])
  fitted = render.encode_fitted(tiny_tok, PROFILE, _titled(3), TARGET, "ml1m", answer="No.",
                                max_length=n)
  assert fitted["kept"] == 0
  np.testing.assert_array_equal(fitted["input_ids"], empty["input_ids"])
  with pytest.raises(ValueError, match="no history items"):
    render.encode_fitted(tiny_tok, PROFILE, _titled(3), TARGET, "ml1m", answer="No.",
                         max_length=n - 1)
  with pytest.raises(ValueError, match="drop"):
    render.encode_fitted(tiny_tok, PROFILE, [], TARGET, "ml1m", drop="middle")


def _dataset():
  """Two users; user 1 rated item 4 twice, the second time as a sample's target."""
  items = [{"id": i, "title": t, "genres": []} for i, t in enumerate(TITLES[:5])]
  users = [{"id": 0, "gender": "M", "age": 18, "age_group": "18-24", "occupation": "artist"},
           {"id": 1, "gender": "F", "age": 56, "age_group": "56+", "occupation": "retired"}]
  timelines = schema.Timelines(
      offsets=np.array([0, 4, 8]), item=np.array([0, 1, 2, 3, 2, 4, 0, 4], np.int32),
      rating=np.array([5, 1, 4, 2, 3, 5, 1, 2], np.float32), timestamp=np.arange(8))
  train = schema.Samples(
      user=np.array([0, 1], np.int32), pos=np.array([2, 3], np.int32),
      target=np.array([2, 4], np.int32), rating=np.array([4, 2], np.float32),
      label=np.array([1, 0], np.int8), timestamp=np.array([2, 7]))
  return schema.Dataset(meta={"name": "ml1m", "sampling": "chronological"}, items=items,
                        users=users, timelines=timelines, splits={"train": train})


def _result():
  return {"sample": np.array([0, 1]), "user": np.array([0, 1], np.int32),
          "target": np.array([2, 4], np.int32),
          "history": np.array([[1, 0, -1], [4, 2, 0]], np.int32)}


def test_history_ratings_latest_before_sample():
  ratings = render.history_ratings(_dataset(), "train", _result())
  np.testing.assert_array_equal(ratings, [[1, 5, np.nan], [5, 3, 1]])
  bad = dict(_result(), history=np.array([[3, -1, -1], [4, 2, 0]], np.int32))
  with pytest.raises(ValueError, match="not in its sample's history"):
    render.history_ratings(_dataset(), "train", bad)


def test_build_examples(tiny_tok):
  ds = _dataset()
  out = render.build_examples(ds, _result(), tiny_tok, split="train", order="high")
  assert out["label"].tolist() == [1, 0] and out["kept"].tolist() == [2, 3]
  assert out["sample"].tolist() == [0, 1]
  user0 = render.render_prompt(ds.users[0], [("Bravo", 1), ("Alpha", 5)], "Charlie", "ml1m")
  user1 = render.render_prompt(ds.users[1], [("Echo", 5), ("Charlie", 3), ("Alpha", 1)], "Echo",
                               "ml1m")
  for i, (text, answer) in enumerate([(user0, "Yes."), (user1, "No.")]):
    expected = render.encode(tiny_tok, text, answer)
    np.testing.assert_array_equal(out["input_ids"][i], expected["input_ids"])
    np.testing.assert_array_equal(out["loss_mask"][i], expected["loss_mask"])
  scoring = render.build_examples(ds, _result(), tiny_tok, split="train", labels=False)
  np.testing.assert_array_equal(scoring["input_ids"][0],
                                render.encode(tiny_tok, user0)["input_ids"])
  assert not any(m.any() for m in scoring["loss_mask"])


def test_build_examples_fits_and_checks_order(tiny_tok):
  ds = _dataset()
  full = render.build_examples(ds, _result(), tiny_tok, split="train", order="simple")
  limit = len(full["input_ids"][1]) - 1
  out = render.build_examples(ds, _result(), tiny_tok, split="train", order="simple",
                              max_length=limit)
  assert out["kept"].tolist() == [2, 2]
  text = render.render_prompt(ds.users[1], [("Charlie", 3), ("Alpha", 1)], "Echo", "ml1m")
  np.testing.assert_array_equal(out["input_ids"][1],
                                render.encode(tiny_tok, text, "No.")["input_ids"])
  with pytest.raises(ValueError, match="unknown retrieval order"):
    render.build_examples(ds, _result(), tiny_tok, split="train", order="random")


def test_history_summary_counts_the_listed_items_as_the_baselines_do(tiny_tok):
  assert templates.history_summary("movie", PROFILE, [r for _, r in HISTORY], 3.0) == (
      "She liked 2 of these 3 movies, rated 3.2 stars on average.")
  assert templates.history_summary("book", {}, [8, 3], 4.0) == (
      "The user liked 1 of these 2 books, rated 5.5 stars on average.")
  assert templates.history_summary("movie", PROFILE, [], 3.0) is None
  assert render.render_prompt(PROFILE, HISTORY, TARGET, "ml1m", threshold=3.0) == (
      ML1M_TEXT.replace("(3.5 stars)\n", "(3.5 stars)\nShe liked 2 of these 3 movies, rated 3.2 "
                        "stars on average.\n"))
  ds = schema.Dataset(**dict(vars(_dataset()), meta={"name": "ml1m", "label_threshold": 3.0}))
  ratings = render.history_ratings(ds, "train", _result())
  like_rate, mean = baselines._history_features(ds, "train", _result(), 0.5, 3.0, 3.0)
  for i in range(2):
    shown = ratings[i][~np.isnan(ratings[i])]
    liked, count, stars = map(float, re.findall(r"[0-9.]+", templates.history_summary(
        "movie", ds.users[i], shown, 3.0))[:3])
    assert (liked / count, count) == (pytest.approx(like_rate[i]), len(shown))
    assert stars == pytest.approx(mean[i], abs=0.05)
  # Built prompts carry the summary of the items they keep, after fitting to max_length.
  full = render.build_examples(ds, _result(), tiny_tok, split="train", order="simple",
                               user_stats=True)
  out = render.build_examples(ds, _result(), tiny_tok, split="train", order="simple",
                              user_stats=True, max_length=len(full["input_ids"][1]) - 1)
  assert out["kept"].tolist() == [2, 2]
  text = render.render_prompt(ds.users[1], [("Charlie", 3), ("Alpha", 1)], "Echo", "ml1m",
                              threshold=3.0)
  assert "liked 0 of these 2 movies, rated 2.0 stars" in text
  np.testing.assert_array_equal(out["input_ids"][1],
                                render.encode(tiny_tok, text, "No.")["input_ids"])


def test_lifetime_summary_states_every_earlier_rating(tiny_tok):
  assert templates.lifetime_summary("movie", PROFILE, 87, 45, 3.64) == (
      "Of all 87 movies she rated before, she liked 52% of them, 3.6 stars on average.")
  assert templates.lifetime_summary("book", {}, 4, 1, 5.5) == (
      "Of all 4 books the user rated before, the user liked 25% of them, 5.5 stars on average.")
  assert templates.lifetime_summary("movie", PROFILE, 0, 0, float("nan")) is None
  text = render.render_prompt(PROFILE, HISTORY, TARGET, "ml1m", threshold=3.0,
                              lifetime=(87, 45, 3.64))
  assert text == ML1M_TEXT.replace("(3.5 stars)\n", (
      "(3.5 stars)\nShe liked 2 of these 3 movies, rated 3.2 stars on average.\n"
      "Of all 87 movies she rated before, she liked 52% of them, 3.6 stars on average.\n"))
  ds = schema.Dataset(**dict(vars(_dataset()), meta={"name": "ml1m", "label_threshold": 3.0}))
  out = render.build_examples(ds, _result(), tiny_tok, split="train", order="simple",
                              user_lifetime_stats=True)
  count, liked, mean = user_lifetime.counts(ds, "train", _result()["sample"], 3.0)
  assert (count.tolist(), liked.tolist(), mean.tolist()) == ([2, 3], [1, 1], [3.0, 3.0])
  for i in range(2):
    text = render.render_prompt(ds.users[i], [
        (ds.items[item]["title"], rating) for item, rating in zip(
            _result()["history"][i], render.history_ratings(ds, "train", _result())[i])
        if item >= 0], ds.items[_result()["target"][i]]["title"], "ml1m",
        lifetime=(count[i], liked[i], mean[i]))
    assert f"Of all {count[i]} movies" in text
    np.testing.assert_array_equal(out["input_ids"][i], render.encode(
        tiny_tok, text, templates.ANSWERS[bool(out["label"][i])])["input_ids"])


def test_genres_name_every_item_with_its_genres(tiny_tok):
  assert render.titled({"title": "Heat (1995)", "genres": ["Action", "Crime"]}, genres=True) == (
      "Heat (1995) (Action, Crime)")
  assert render.titled({"title": "Heat (1995)", "genres": ["Action"]}) == "Heat (1995)"
  assert render.titled({"title": "Heat (1995)", "genres": []}, genres=True) == "Heat (1995)"
  assert render.wording({"genres": True}) == {"item_stats": False, "user_stats": False,
                                              "user_lifetime_stats": False, "genres": True,
                                              "item_popularity": False}
  ds = _dataset()
  for i, item in enumerate(ds.items):
    item["genres"] = [f"G{i % 2}"]
  out = render.build_examples(ds, _result(), tiny_tok, split="train", order="high", genres=True)
  user0 = render.render_prompt(ds.users[0], [("Bravo (G1)", 1), ("Alpha (G0)", 5)],
                               "Charlie (G0)", "ml1m")
  np.testing.assert_array_equal(out["input_ids"][0],
                                render.encode(tiny_tok, user0, "Yes.")["input_ids"])


def test_close_marks_follow_the_titles_of_the_items_near_the_target(tiny_tok):
  ds = _dataset()
  rng = np.random.default_rng(0)
  vectors = rng.normal(size=(5, 4))
  assert render.close_option({"mark_close": 0.0}, vectors) is None
  assert render.close_option({}, vectors) is None
  close = render.close_option({"mark_close": 0.1}, vectors)
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  result = _result()
  marks = render.close_marks(close, result["history"], result["target"])
  expected = [[item >= 0 and float(unit[item] @ unit[t]) > 0.1 for item in row]
              for row, t in zip(result["history"].tolist(), result["target"].tolist())]
  np.testing.assert_array_equal(marks, expected)
  assert 0 < marks.sum() < (result["history"] >= 0).sum()  # some marked, some not
  out = render.build_examples(ds, result, tiny_tok, split="train", order="high", close=close)
  titles = [[("Bravo", 1), ("Alpha", 5)], [("Echo", 5), ("Charlie", 3), ("Alpha", 1)]]
  for i, (user, target, answer) in enumerate([(0, "Charlie", "Yes."), (1, "Echo", "No.")]):
    shown = [(title + (" *" if marks[i][j] else ""), rating)
             for j, (title, rating) in enumerate(titles[i])]
    text = render.render_prompt(ds.users[user], shown, target, "ml1m")
    np.testing.assert_array_equal(out["input_ids"][i],
                                  render.encode(tiny_tok, text, answer)["input_ids"])
  assert tiny_tok.convert_tokens_to_ids("*") != tiny_tok.unk_token_id
