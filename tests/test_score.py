"""Yes/no scoring: last-position answer rows against full logits, transformers, and batching."""
import json
import shutil

import numpy as np
import pytest
import torch

from rallrec_jax import parallel
from rallrec_jax.llm import load_pretrained, score, tokenizer as tokenizer_lib
from rallrec_jax.llm.model import Decoder
from tests.llm_fixtures import tiny_hf_model

KINDS = {"llama": ("llama", {}), "llama_tied": ("llama", {"tie_word_embeddings": True}),
         "qwen2": ("qwen2", {})}
PROMPTS = [
    "Will the user like this movie ?",
    "Yes",
    "the user read a book . will the user like this book ?",
    "rating stars ?",
    "Paris is the capital of France . The user watched a movie in Paris and it is a movie of "
    "the capital . Will the user like it ?",
    "a movie",
    "will the user like this item ?",
    "The book is of the user .",
    "it is .",
    "user , movie , book , item , rating ?",
    "No .",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{name: (folder, torch model)} for each tiny model kind."""
  out = {}
  for name, (kind, overrides) in KINDS.items():
    folder = tmp_path_factory.mktemp(name)
    out[name] = folder, tiny_hf_model(folder, kind, seed=len(out), **overrides)
  return out


@pytest.fixture(scope="module")
def lms(folders):
  return {name: load_pretrained(folder) for name, (folder, _) in folders.items()}


def _left_padded(lm, prompts):
  batch = lm.tokenizer([tokenizer_lib.chat_prompt(lm.tokenizer, p) for p in prompts],
                       padding=True, add_special_tokens=False, return_tensors="np")
  return batch.input_ids.astype(np.int32), batch.attention_mask.astype(np.int32)


def _two_way(logits, yes, no):
  pair = np.stack([logits[:, yes], logits[:, no]], axis=1).astype(np.float64)
  pair = np.exp(pair - pair.max(axis=1, keepdims=True))
  return pair[:, 0] / pair.sum(axis=1)


@pytest.mark.parametrize("name", KINDS)
def test_p_yes_matches_full_logits(lms, name):
  lm = lms[name]
  assert lm.cfg.tie_word_embeddings == (name == "llama_tied")
  yes, no = lm.yes_no_tokens()
  ids, mask = _left_padded(lm, PROMPTS[:5])
  assert mask[:, 0].min() == 0 and mask[:, -1].min() == 1
  full = np.asarray(Decoder(lm.cfg).apply({"params": lm.params}, ids, mask))[:, -1]
  got = np.asarray(score.p_yes(lm.cfg, lm.params, ids, mask, yes, no))
  np.testing.assert_allclose(got, _two_way(full, yes, no), atol=1e-5)
  logits = np.asarray(score.yes_no_logits(lm.cfg, lm.params, ids, mask, yes, no))
  np.testing.assert_allclose(logits, full[:, [yes, no]], rtol=1e-5, atol=1e-5)
  assert got.dtype == np.float32 and logits.shape == (5, 2)


@pytest.mark.parametrize("scan", ["false", "true"])
@pytest.mark.parametrize("name", KINDS)
def test_p_yes_matches_transformers(folders, lms, name, scan):
  folder, model = folders[name]
  lm = lms[name] if scan == "false" else load_pretrained(folder, scan_layers=scan)
  yes, no = lm.yes_no_tokens()
  ids, mask = _left_padded(lm, PROMPTS[:5])
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.inference_mode():
    logits = model(torch.from_numpy(ids.astype(np.int64)),
                   attention_mask=torch.from_numpy(mask.astype(np.int64)),
                   position_ids=torch.from_numpy(positions)).logits[:, -1].numpy()
  got = np.asarray(score.p_yes(lm.cfg, lm.params, ids, mask, yes, no))
  np.testing.assert_allclose(got, _two_way(logits, yes, no), atol=1e-4)


def _alone(lm, prompt, answers=None):
  """P(yes) of one prompt scored by itself: batch of one, no padding."""
  text = tokenizer_lib.chat_prompt(lm.tokenizer, prompt)
  ids = np.asarray([lm.tokenizer(text, add_special_tokens=False).input_ids], np.int32)
  answers = answers or lm.yes_no_tokens()
  return float(score.p_yes(lm.cfg, lm.params, ids, np.ones_like(ids), *answers)[0])


def _recording(monkeypatch):
  """Record the (batch, length) shapes and the ids' sharding that `score_prompts` compiles for."""
  calls = []
  original = score.p_yes

  def spy(cfg, params, ids, mask, yes, no):
    calls.append((ids.shape, getattr(ids, "sharding", None)))
    return original(cfg, params, ids, mask, yes, no)

  monkeypatch.setattr(score, "p_yes", spy)
  return calls


def test_score_prompts_buckets_and_restores_order(lms, monkeypatch):
  lm = lms["llama"]
  expected = np.array([_alone(lm, p) for p in PROMPTS])
  calls = _recording(monkeypatch)
  got = score.score_prompts(lm, PROMPTS, batch_size=4, bucket=8, progress=False)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  shapes = [shape for shape, _ in calls]
  assert len(shapes) == 3 and all(b == 4 and t % 8 == 0 for b, t in shapes)
  lengths = [len(lm.tokenizer(tokenizer_lib.chat_prompt(lm.tokenizer, p),
                              add_special_tokens=False).input_ids) for p in PROMPTS]
  assert len(set(shapes)) <= len({-(-n // 8) for n in lengths})
  assert [t for _, t in shapes] == sorted((t for _, t in shapes), reverse=True)


def test_prompt_logits_agree_with_scores(lms):
  lm = lms["llama"]
  logits = score.prompt_logits(lm, PROMPTS, batch_size=4, bucket=8, progress=False)
  scores = score.score_prompts(lm, PROMPTS, batch_size=4, bucket=8, progress=False)
  assert logits.shape == (len(PROMPTS), 2)
  np.testing.assert_allclose(1 / (1 + np.exp(logits[:, 1] - logits[:, 0])), scores, atol=1e-6)


def test_score_prompts_edge_cases(lms):
  lm = lms["llama"]
  assert score.score_prompts(lm, [], progress=False).shape == (0,)
  with pytest.raises(ValueError, match="prompt 1 tokenizes to nothing"):
    score.score_prompts(lm, ["Yes", ""], chat=False, progress=False)


@pytest.mark.parametrize("shape,rows,scan", [
    ((("data", 8),), 8, "false"), ((("data", 2), ("fsdp", 2), ("tensor", 2)), 4, "false"),
    ((("data", 2), ("fsdp", 2), ("tensor", 2)), 4, "true")])
def test_score_prompts_on_a_mesh(folders, lms, monkeypatch, shape, rows, scan):
  mesh = parallel.make_mesh(shape)
  sharded = load_pretrained(folders["llama"][0], mesh=mesh, scan_layers=scan)
  assert len(sharded.params["embed_tokens"]["embedding"].sharding.device_set) == 8
  expected = score.score_prompts(lms["llama"], PROMPTS, batch_size=4, bucket=8, progress=False)
  calls = _recording(monkeypatch)
  got = score.score_prompts(sharded, PROMPTS, batch_size=4, bucket=8, progress=False)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  batch_axes = tuple(a for a, _ in shape if a != "tensor")
  for ids_shape, sharding in calls:
    assert ids_shape[0] == rows
    assert sharding.spec[0] in (batch_axes, batch_axes[0])


def _swap_answer_words(folder, target):
  """A copy of the model folder whose tokenizer gives "Yes" and "No" other ids."""
  shutil.copytree(folder, target)
  file = target / "tokenizer.json"
  spec = json.loads(file.read_text())
  vocab = spec["model"]["vocab"]
  for word, other in (("Yes", "the"), ("No", "movie")):
    vocab[word], vocab[other] = vocab[other], vocab[word]
  file.write_text(json.dumps(spec))
  return target


def test_answer_ids_come_from_the_tokenizer(folders, lms, tmp_path):
  lm = lms["llama"]
  swapped = load_pretrained(_swap_answer_words(folders["llama"][0], tmp_path / "swapped"))
  for model in (lm, swapped):
    assert model.yes_no_tokens() == tuple(model.tokenizer.convert_tokens_to_ids(["Yes", "No"]))
  assert swapped.yes_no_tokens() != lm.yes_no_tokens()
  prompt = "Will the user like this movie ?"
  got = score.score_prompts(swapped, [prompt], progress=False)[0]
  np.testing.assert_allclose(got, _alone(swapped, prompt), atol=1e-5)
  assert abs(got - _alone(swapped, prompt, lm.yes_no_tokens())) > 1e-3
