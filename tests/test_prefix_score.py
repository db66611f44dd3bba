"""Prefix-reuse scoring: the shared prefix once into a KV cache, then the suffixes against it,
gives the logits of scoring each whole prompt on its own."""
import jax
import numpy as np
import pytest

from rallrec_jax import parallel
from rallrec_jax.eval import evaluate
from rallrec_jax.llm import load_pretrained, lora, padding, prefix_score, score
from tests.llm_fixtures import tiny_hf_model

FIRST_TOKEN = 8  # above the tiny tokenizer's special tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("prefix_llama")
  tiny_hf_model(path, "llama")
  return path


@pytest.fixture(scope="module", params=["scanned", "unrolled"])
def lm(request, folder):
  return load_pretrained(folder, scan_layers="true" if request.param == "scanned" else "false")


def group(vocab, suffix_lengths, prefix_length=37, seed=0):
  """Token-id prompts: one random prefix, then a random suffix of each length (0: the prefix)."""
  rng = np.random.default_rng(seed)
  prefix = list(rng.integers(FIRST_TOKEN, vocab, prefix_length))
  return [prefix + list(rng.integers(FIRST_TOKEN, vocab, n)) for n in suffix_lengths]


def alone(lm, prompts, params=None, adapters=None, lora_cfg=None):
  """[N, 2] logits of the whole prompts, left-padded into one batch: the independent path."""
  yes, no = (np.int32(i) for i in lm.yes_no_tokens())
  ids, mask = padding.left_pad(prompts, padding.round_up(max(map(len, prompts)), 8), 0)
  return np.asarray(score.yes_no_logits(lm.cfg, lm.params if params is None else params, ids,
                                        mask, yes, no, adapters, lora_cfg))


def random_adapters(cfg):
  lora_cfg = lora.LoraConfig(rank=4, targets=("q_proj", "k_proj", "v_proj", "down_proj"))
  adapters = lora.init(jax.random.key(0), cfg, lora_cfg)
  adapters = jax.tree.map_with_path(
      lambda p, x: 0.3 * jax.random.normal(jax.random.key(len(p)), x.shape)
      if p[-1].key == "b" else x, adapters)
  return {"adapters": adapters, "lora_cfg": lora_cfg}


def fine_tuned(params):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return {"params": jax.tree.unflatten(tree, [
      x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])}


def test_shared_prefix_keeps_a_token_in_every_suffix():
  shared = prefix_score.shared_prefix_length
  assert shared([[5, 6, 7, 8], [5, 6, 9], [5, 6, 7]]) == 2
  assert shared([[5, 6, 7], [5, 6, 7]]) == 2
  assert shared([[5, 6, 7]]) == 2
  assert shared([[5, 6, 7], [5, 6, 7, 8, 9]]) == 2
  assert shared([[1, 2], [3, 2]]) == 0
  assert shared([[4], [4, 5]]) == 0
  with pytest.raises(ValueError, match="at least one token"):
    shared([[1, 2], []])


def test_suffix_batches_are_even_longest_first_and_bucketed():
  lengths = np.arange(1, 51)
  rows, batches = prefix_score.suffix_batches(lengths, 16, bucket=32)
  assert rows == 13 and [len(r) for r, _ in batches] == [13, 13, 13, 11]
  assert batches[0][0][0] == 49 and [n for _, n in batches] == [64, 64, 32, 32]
  assert [n for _, n in prefix_score.suffix_batches(lengths, 16)[1]] == [64, 48, 32, 16]
  assert sorted(np.concatenate([r for r, _ in batches]).tolist()) == list(range(50))
  assert prefix_score.suffix_batches(lengths, 16, multiple=4)[0] == 16
  assert prefix_score.suffix_batches([3], 16, multiple=2)[0] == 2


def test_saves_work_only_with_a_long_shared_prefix(folder):
  long_prefix = group(64, [5, 9, 3, 12] * 5, prefix_length=200)
  assert prefix_score.saves_work(long_prefix, batch_size=8)
  no_prefix = [[9] + p[1:] for p in long_prefix[:1]] + long_prefix[1:]
  assert not prefix_score.saves_work(no_prefix, batch_size=8)


@pytest.mark.parametrize("weights", ["base", "lora", "full"])
def test_group_logits_equal_scoring_each_prompt_alone(lm, weights):
  trained = {"base": {}, "lora": random_adapters(lm.cfg), "full": fine_tuned(lm.params)}[weights]
  # A suffix of 0 (the prefix itself), different lengths, 11 prompts in batches of 4.
  prompts = group(lm.cfg.vocab_size, [6, 0, 1, 13, 2, 40, 6, 3, 9, 1, 17])
  yes, no = lm.yes_no_tokens()
  got = prefix_score.group_logits(lm, prompts, yes, no, batch_size=4, **trained)
  expected = alone(lm, prompts, **trained)
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
  gap = got[:, 0] - got[:, 1]
  assert np.ptp(gap) > 1e-2
  np.testing.assert_array_equal(np.argsort(-gap, kind="stable"),
                                np.argsort(-(expected[:, 0] - expected[:, 1]), kind="stable"))
  if trained:
    assert np.abs(got - alone(lm, prompts)).max() > 1e-3


def test_a_group_of_one_and_prompts_without_a_shared_token(lm):
  yes, no = lm.yes_no_tokens()
  one = group(lm.cfg.vocab_size, [4])
  np.testing.assert_allclose(prefix_score.group_logits(lm, one, yes, no), alone(lm, one),
                             atol=2e-5, rtol=1e-5)
  apart = group(lm.cfg.vocab_size, [5, 3, 8], seed=1)
  apart = [[FIRST_TOKEN + i] + p[1:] for i, p in enumerate(apart)]
  assert prefix_score.shared_prefix_length(apart) == 0
  np.testing.assert_allclose(prefix_score.group_logits(lm, apart, yes, no, batch_size=2),
                             alone(lm, apart), atol=2e-5, rtol=1e-5)


def test_group_logits_on_a_mesh(folder):
  mesh = parallel.make_mesh((("data", 2), ("tensor", 2)), jax.devices()[:4])
  sharded = load_pretrained(folder, mesh=mesh, scan_layers="true")
  yes, no = sharded.yes_no_tokens()
  prompts = group(sharded.cfg.vocab_size, [3, 7, 0, 11, 2])
  got = prefix_score.group_logits(sharded, prompts, yes, no, batch_size=3)
  np.testing.assert_allclose(got, alone(load_pretrained(folder), prompts), atol=2e-5,
                             rtol=1e-5)


def test_score_groups_mixes_shared_prefixes_and_whole_prompts(lm, monkeypatch):
  vocab = lm.cfg.vocab_size
  shared = group(vocab, [2, 5, 1, 3, 7, 2], prefix_length=60)   # worth a shared prefix
  apart = group(vocab, [9, 4, 12], prefix_length=3, seed=1)     # not: scored whole
  prompts = [shared[0], apart[0], *shared[1:4], apart[1], *shared[4:], apart[2]]
  groups = np.array([7, 2, 7, 7, 7, 2, 7, 7, 2])
  examples = {"input_ids": [np.asarray(p, np.int32) for p in prompts],
              "loss_mask": [np.zeros(len(p), np.int32) for p in prompts]}
  calls = []
  real = prefix_score.group_logits
  monkeypatch.setattr(prefix_score, "group_logits",
                      lambda lm, tokens, *a, **k: calls.append(len(tokens)) or real(
                          lm, tokens, *a, **k))
  yes, no = lm.yes_no_tokens()
  got = evaluate.score_groups(lm, examples, groups, yes, no, batch_size=4, bucket=8,
                              progress=False)
  assert calls == [6]
  np.testing.assert_allclose(got, alone(lm, prompts), atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="one value per example"):
    evaluate.score_groups(lm, examples, groups[1:], yes, no)
