"""Cached generation against transformers' generate, a cache-free forward, and itself."""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rallrec_jax import parallel
from rallrec_jax.llm import load_pretrained
from rallrec_jax.llm import generate as gen
from tests.llm_fixtures import tiny_hf_model

torch = pytest.importorskip("torch")

EOS, PAD = 2, 3
NEW = 12


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  """One tiny random llama folder, shared by the tests of this module."""
  return tmp_path_factory.mktemp("tiny_llama")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
  """(torch model, LM) of the tiny llama."""
  return tiny_hf_model(tiny_folder, "llama"), load_pretrained(tiny_folder)


@pytest.fixture(scope="module", params=["unrolled", "scanned"])
def either(request, tiny, tiny_folder):
  """The tiny llama's LM in either layout of its layers."""
  if request.param == "unrolled":
    return tiny[1]
  return load_pretrained(tiny_folder, scan_layers="true")


def left_padded(lengths, vocab_size, seed=0):
  """Random prompts of these lengths, left-padded with PAD: ids and mask [B, max(lengths)]."""
  rng = np.random.default_rng(seed)
  width = max(lengths)
  ids = np.full((len(lengths), width), PAD)
  mask = np.zeros((len(lengths), width), np.int64)
  for row, length in enumerate(lengths):
    ids[row, width - length:] = rng.integers(8, vocab_size, length)
    mask[row, width - length:] = 1
  return ids, mask


def torch_greedy(model, ids, mask, new_tokens, eos=EOS, pad=PAD):
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                         eos_token_id=eos)
  return out[:, ids.shape[1]:].numpy()


def assert_same_up_to_stop(ours, ref, pad=PAD):
  """transformers stops when every row has ended; whatever it left out must be padding."""
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert (ours[:, ref.shape[1]:] == pad).all()


@pytest.mark.parametrize("kind, scan", [("llama", "false"), ("qwen2", "false"), ("qwen2", "true")])
def test_greedy_matches_transformers(kind, scan, tmp_path):
  model = tiny_hf_model(tmp_path, kind)
  lm = load_pretrained(tmp_path, scan_layers=scan)
  ids, mask = left_padded([5, 17, 2, 9], lm.cfg.vocab_size)
  ours = gen.generate(lm.cfg, lm.params, ids, mask, max_new_tokens=NEW, eos_ids=(EOS,),
                      pad_id=PAD)
  assert ours.shape == (4, NEW)
  assert_same_up_to_stop(ours, torch_greedy(model, ids, mask, NEW))


def test_cached_decode_matches_cache_free_forward(either):
  lm = either
  ids, mask = left_padded([6, 3, 10], lm.cfg.vocab_size, seed=1)
  out = gen.generate(lm.cfg, lm.params, ids, mask, max_new_tokens=NEW)
  full_ids = np.concatenate([ids, out], axis=1)
  full = lm.logits(full_ids, np.concatenate([mask, np.ones_like(out)], axis=1))
  prefill = jax.jit(gen.prefill, static_argnums=0)
  step = jax.jit(gen.decode_step, static_argnums=0)
  t = ids.shape[1]
  logits, state = prefill(lm.cfg, lm.params, ids, mask, gen.init_cache(lm.cfg, 3, t + NEW))
  for i in range(NEW):
    np.testing.assert_allclose(logits, full[:, t + i - 1], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.argmax(logits, axis=-1), out[:, i])
    logits, state = step(lm.cfg, lm.params, out[:, i], state, t + i)


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy(tiny):
  _, lm = tiny
  ids, mask = left_padded([4, 7, 5], lm.cfg.vocab_size, seed=2)

  def sample(seed, temperature=2.0, top_p=1.0):
    return gen.generate(lm.cfg, lm.params, ids, mask, max_new_tokens=NEW,
                        temperature=temperature, top_p=top_p, rng=jax.random.key(seed))
  first = sample(1)
  np.testing.assert_array_equal(sample(1), first)
  assert (sample(2) != first).any()
  greedy = gen.generate(lm.cfg, lm.params, ids, mask, max_new_tokens=NEW)
  np.testing.assert_array_equal(sample(3, temperature=1.0, top_p=1e-6), greedy)


def _nucleus_probs(logits, temperature, top_p):
  """numpy reference: softmax(logits / temperature) renormalised on its top-p nucleus."""
  z = logits.astype(np.float64) / temperature
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  before = np.cumsum(probs[order]) - probs[order]
  nucleus = order[(before < top_p) | (np.arange(len(order)) == 0)]
  out = np.zeros_like(probs)
  out[nucleus] = probs[nucleus] / probs[nucleus].sum()
  return out


@pytest.mark.parametrize("temperature,top_p", [(1.5, 1.0), (0.8, 0.6)])
def test_one_step_frequencies_follow_the_nucleus_softmax(tiny, temperature, top_p):
  _, lm = tiny
  ids, mask = left_padded([6], lm.cfg.vocab_size, seed=3)
  rows = 2000
  tokens = gen.generate(lm.cfg, lm.params, np.repeat(ids, rows, 0), np.repeat(mask, rows, 0),
                        max_new_tokens=1, temperature=temperature, top_p=top_p,
                        rng=jax.random.key(4))[:, 0]
  expected = _nucleus_probs(lm.logits(ids, mask)[0, -1], temperature, top_p)
  nucleus = np.flatnonzero(expected)
  freq = np.bincount(tokens, minlength=len(expected)) / rows
  assert 1 < len(nucleus) and expected.max() < 0.9  # a real spread to compare
  assert set(np.unique(tokens)) <= set(nucleus.tolist())
  assert np.abs(freq - expected).max() < 0.05


@pytest.mark.parametrize("top_p,path", [(0.5, "candidates"), (0.97, "whole sort"),
                                        (1.0, "softmax")])
def test_sampling_paths_draw_from_the_exact_nucleus(top_p, path):
  """8 candidates of 40 tokens: top_p=0.5 is inside them, 0.97 is not (the vocabulary is
  sorted), 1.0 samples the softmax; every path follows the numpy nucleus distribution."""
  logits = np.random.default_rng(7).normal(0, 1.5, 40).astype(np.float32)
  temperature = 0.9
  probs = np.exp(logits / temperature - np.max(logits / temperature))
  top8 = np.sort(probs / probs.sum())[::-1][:8].sum()
  assert (top8 >= top_p) == (path == "candidates")
  draws = 20000
  sample = jax.jit(jax.vmap(lambda key: gen._sample(jnp.asarray(logits)[None], key, temperature,
                                                     top_p, candidates=8)[0]))
  tokens = np.asarray(sample(jax.random.split(jax.random.key(0), draws)))
  expected = _nucleus_probs(logits, temperature, top_p)
  assert set(np.unique(tokens)) <= set(np.flatnonzero(expected).tolist())
  assert np.abs(np.bincount(tokens, minlength=40) / draws - expected).max() < 0.015


def test_rows_stop_at_their_own_eos_and_the_loop_stops_when_all_have(tiny):
  _, lm = tiny
  ids, mask = left_padded([5, 8, 3], lm.cfg.vocab_size, seed=5)
  free = gen.generate(lm.cfg, lm.params, ids, mask, max_new_tokens=NEW)
  stops = {int(free[0, 1]), int(free[1, 3]), int(free[2, 5])}
  ends = [int(np.flatnonzero(np.isin(row, list(stops)))[0]) for row in free]
  out, steps = gen.generate(lm.cfg, lm.params, ids, mask, max_new_tokens=NEW, eos_ids=stops,
                            pad_id=PAD, return_steps=True)
  assert len(set(ends)) > 1  # rows really end at different steps
  for row, end in enumerate(ends):
    np.testing.assert_array_equal(out[row, :end + 1], free[row, :end + 1])
    assert (out[row, end + 1:] == PAD).all()
  assert steps == max(ends) + 1 < NEW


def test_generate_text_batches_and_shards_alike(tiny, tiny_folder):
  _, lm = tiny
  prompts = ["the user will like", "Paris is the capital of France", "a book", "rating ?",
             "watched the movie"]
  one_batch = gen.generate_text(lm, prompts, max_new_tokens=6, batch_size=8)
  assert len(one_batch) == len(prompts) and all(isinstance(r, str) for r in one_batch)
  assert gen.generate_text(lm, prompts, max_new_tokens=6, batch_size=2) == one_batch
  mesh = parallel.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  sharded = load_pretrained(tiny_folder, mesh=mesh)
  assert gen.generate_text(sharded, prompts, max_new_tokens=6, batch_size=4) == one_batch
  assert gen.generate_text(lm, [], max_new_tokens=6) == []


def test_cache_batch_is_sharded_over_the_batch_axes(either):
  lm = either
  mesh = parallel.make_mesh((("data", 4), ("tensor", 2)))
  shape = (8, 24, lm.cfg.num_kv_heads, lm.cfg.head_dim)
  sharding = parallel.batch_sharding(mesh, shape)
  cache = gen.init_cache(lm.cfg, 8, 24, sharding=sharding)
  if lm.cfg.scanned:  # one stack, its layers axis unsplit
    assert cache["k"].shape == (lm.cfg.num_layers,) + shape
    assert tuple(cache["k"].sharding.spec) == (None,) + tuple(sharding.spec)
    assert cache["v"].addressable_shards[0].data.shape == (lm.cfg.num_layers, 2) + shape[1:]
  else:
    assert len(cache) == lm.cfg.num_layers
    assert cache[0]["k"].sharding == sharding
    assert cache[0]["v"].addressable_shards[0].data.shape == (2,) + shape[1:]


def test_bucket_lengths():
  assert [gen.bucket_length(n) for n in (1, 16, 17, 100, 128, 129, 300)] == [
      16, 16, 32, 128, 128, 256, 384]


@pytest.fixture(scope="module")
def smollm2():
  path = os.environ.get("RALLREC_SMOLLM2")
  if not path or not Path(path, "config.json").is_file():
    pytest.skip("set RALLREC_SMOLLM2 to a SmolLM2-135M-Instruct folder")
  transformers = pytest.importorskip("transformers")
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  return model, load_pretrained(path)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2):
  model, lm = smollm2
  prompts = ["The capital of France is", "Once upon a time, in a small village,"]
  batch = lm.tokenizer(prompts, padding=True, return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  eos, pad = lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id
  ours = gen.generate(lm.cfg, lm.params, ids, mask, max_new_tokens=16, eos_ids=(eos,),
                      pad_id=pad)
  assert_same_up_to_stop(ours, torch_greedy(model, ids, mask, 16, eos=eos, pad=pad), pad=pad)
  replies = gen.generate_text(lm, prompts, max_new_tokens=16, chat=False)
  assert replies == [lm.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ours]
  assert "Paris" in replies[0]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
  model, lm = smollm2
  batch = lm.tokenizer(["The capital of France is", "Recommend a movie for a user who liked",
                        "Hi"], padding=True, return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions)).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(lm.logits(ids, mask)[real], ref[real], atol=1e-3, rtol=0)
