"""Item text: description prompts and clean-up, resumable describe, mean pooling, PCA."""
import json

import numpy as np
import pytest

from rallrec_jax.llm import load_pretrained
from rallrec_jax.text import describe, embed, templates
from tests.llm_fixtures import tiny_hf_model

torch = pytest.importorskip("torch")

ITEMS = [{"id": i, "title": f"Film {w}", "genres": ["Drama", "War"][: 1 + i % 2]}
         for i, w in enumerate("the a user will like movie book".split())]


def test_templates_per_dataset():
  movie = templates.description_prompt({"title": "Heat (1995)", "genres": ["Action", "Crime"]},
                                       "ml1m")
  assert "the film Heat (1995), whose genre is Action, Crime" in movie and "80 words" in movie
  book = templates.description_prompt({"title": "Emma", "author": "Jane Austen", "year": 1815,
                                       "publisher": None}, "bookcrossing")
  assert "the book Emma by Jane Austen, published in 1815 by unknown" in book
  assert templates.plain_text({"title": "Heat (1995)", "genres": ["Action"]}, "ml100k") == (
      "Here is a movie. Its title is Heat (1995). The movie's genre is Action.")


def test_clean_makes_one_short_line():
  text = 'A "heist" film.\n\nIt\u2019s  long ' + "word " * 100
  out = describe.clean(text)
  assert "\n" not in out and '"' not in out and "\u2019" not in out and len(out.split()) == 80
  assert out.startswith("A heist film. Its long word")


def test_read_done_drops_a_torn_last_line(tmp_path):
  path = tmp_path / "descriptions.jsonl"
  path.write_text(json.dumps({"item": 0, "text": "a"}) + "\n" + json.dumps({"item": 1, "text": "b"})
                  + "\n" + '{"item": 2, "te')
  assert describe.read_done(path) == {0: "a", 1: "b"}
  assert path.read_text().count("\n") == 2 and path.read_text().endswith("}\n")


def test_mean_pool_equals_numpy_over_real_tokens(tmp_path):
  model = tiny_hf_model(tmp_path, "llama")
  lm = load_pretrained(tmp_path)
  texts = ["the user will like this movie", "a book", "Paris is the capital of France ."]
  out = embed.embed_texts(lm, texts, batch_size=4, bucket=8, progress=False)
  for i, text in enumerate(texts):
    ids = lm.tokenizer([text]).input_ids
    with torch.no_grad():
      hidden = model(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states[-1]
    np.testing.assert_allclose(out[i], hidden[0].numpy().mean(0), atol=1e-4)


def test_tokens_pool_equals_the_mean_of_the_embedding_rows(tmp_path):
  model = tiny_hf_model(tmp_path, "llama")
  lm = load_pretrained(tmp_path)
  texts = ["the user will like this movie", "a book", "Paris is the capital of France ."]
  out = embed.embed_texts(lm, texts, pool="tokens", batch_size=4, bucket=8, progress=False)
  table = model.get_input_embeddings().weight.detach().numpy()
  for i, text in enumerate(texts):
    np.testing.assert_allclose(out[i], table[lm.tokenizer([text]).input_ids[0]].mean(0),
                               atol=1e-6)
  with pytest.raises(ValueError, match="unknown pool 'last'"):
    embed.embed_texts(lm, texts, pool="last", progress=False)


def test_pca_matches_numpy_svd():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + 3.0
  ours = embed.pca(x, 5)
  centred = x - x.mean(0)
  u, s, vt = np.linalg.svd(centred, full_matrices=False)
  ref = centred @ vt[:5].T
  np.testing.assert_allclose(np.abs(ours), np.abs(ref), atol=1e-3)
  for j in range(5):  # the same component up to sign
    assert abs(abs(np.corrcoef(ours[:, j], ref[:, j])[0, 1]) - 1) < 1e-5
  np.testing.assert_allclose(ours.var(0, ddof=1), s[:5] ** 2 / 199, rtol=1e-3)
  wide = embed.pca(x[:3], 5)
  assert wide.shape == (3, 5) and np.all(wide[:, 3:] == 0)


def test_describe_resumes_after_an_interruption(tmp_path, monkeypatch):
  tiny_hf_model(tmp_path / "model", "llama")
  lm = load_pretrained(tmp_path / "model")
  kwargs = dict(batch_size=2, max_new_tokens=6, progress=False, seed=3)
  full = describe.describe(lm, ITEMS, "ml1m", tmp_path / "full.jsonl", **kwargs)
  assert sorted(full) == [it["id"] for it in ITEMS] and all(full.values())

  real = describe.generate.generate_text
  calls = []

  def dies_on_third_batch(*args, **kw):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*args, **kw)

  monkeypatch.setattr(describe.generate, "generate_text", dies_on_third_batch)
  path = tmp_path / "resumed.jsonl"
  with pytest.raises(KeyboardInterrupt):
    describe.describe(lm, ITEMS, "ml1m", path, **kwargs)
  assert len(describe.read_done(path)) == 4
  monkeypatch.setattr(describe.generate, "generate_text", real)
  resumed = describe.describe(lm, ITEMS, "ml1m", path, **kwargs)
  assert resumed == full
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert [row["item"] for row in lines] == list(range(len(ITEMS)))
