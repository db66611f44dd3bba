"""The trainer control: our LoRA step and transformers + PEFT give the same losses step by step."""
import dataclasses

import jax
import numpy as np
import pytest

from rallrec_jax.benchmarks import control as bench_control
from rallrec_jax.llm import api, lora
from tests.llm_fixtures import random_batch, tiny_hf_model

ALL = tuple(lora.IN_NDIM)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A tiny random llama with its tokenizer."""
  path = tmp_path_factory.mktemp("tiny_llama")
  tiny_hf_model(path, "llama")
  return path


def left_padded(seed, pads=(0, 3, 6, 1)):
  """A batch of 4 random rows, row b with pads[b] left padding positions, and random labels."""
  ids, mask = random_batch(64, batch=4, length=10, seed=seed, pad_right=pads)
  ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
  labels = np.random.default_rng(seed).integers(0, 2, 4)
  return {"input_ids": np.where(mask > 0, ids, 3), "attention_mask": mask, "label": labels}


BATCHES = [left_padded(seed) for seed in range(3)]


def rel_diffs(out):
  ours, theirs = np.array(out["ours_loss"]), np.array(out["theirs_loss"])
  return np.abs(ours - theirs) / np.abs(theirs)


@pytest.mark.parametrize("targets,layers,opt,scan", [
    (("q_proj", "v_proj"), 0, bench_control.Optim(lr=1e-2, steps=5), "false"),
    (ALL, 0, bench_control.Optim(lr=1e-2, steps=6, warmup=2, weight_decay=0.1), "false"),
    (("k_proj", "o_proj", "up_proj"), 1, bench_control.Optim(lr=1e-2, steps=4, warmup=1), "false"),
    (ALL, 0, bench_control.Optim(lr=1e-2, steps=4, warmup=1), "true"),
    (("k_proj", "o_proj", "up_proj"), 1, bench_control.Optim(lr=1e-2, steps=4, warmup=1), "true"),
])
def test_losses_match_peft_step_by_step(folder, targets, layers, opt, scan):
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=targets, layers=layers)
  out = bench_control.control(folder, BATCHES, lora_cfg, opt, eval_batches=BATCHES[:2],
                              scan_layers=scan)
  assert len(out["ours_loss"]) == len(out["theirs_loss"]) == opt.steps
  assert max(rel_diffs(out)) < 1e-4, (out["ours_loss"], out["theirs_loss"])
  # The adapters did train: the loss moved, and P(yes) agrees after training.
  assert abs(out["ours_loss"][-1] - out["ours_loss"][0]) > 1e-3
  assert out["max_p_yes_diff"] < 1e-4
  assert out["ours_auc"] == pytest.approx(out["theirs_auc"])


@pytest.mark.parametrize("clip_norm,scan", [(0.0, "false"), (1e-3, "false"), (1e-3, "true")])
def test_full_fine_tuning_losses_match_transformers_step_by_step(folder, clip_norm, scan):
  opt = bench_control.Optim(lr=1e-3, steps=5, warmup=1, weight_decay=0.01, clip_norm=clip_norm)
  out = bench_control.control(folder, BATCHES, None, opt, eval_batches=BATCHES[:2],
                              scan_layers=scan)
  assert max(rel_diffs(out)) < 1e-4, (out["ours_loss"], out["theirs_loss"])
  assert abs(out["ours_loss"][-1] - out["ours_loss"][0]) > 1e-3
  assert out["max_p_yes_diff"] < 1e-4
  assert out["ours_auc"] == pytest.approx(out["theirs_auc"])


def test_clipping_shows_in_full_fine_tuning(folder):
  """A clip norm far below the gradient's changes the losses: clipping is not a no-op."""
  lm = api.load_pretrained(folder)
  answers = lm.yes_no_tokens()
  weights = jax.device_get(lm.params)
  opt = bench_control.Optim(lr=1e-3, steps=4)
  free, _ = bench_control.train_ours(lm, weights, None, BATCHES, opt, answers)
  clipped, _ = bench_control.train_ours(lm, weights, None, BATCHES,
                                        dataclasses.replace(opt, clip_norm=1e-3), answers)
  assert free[0] == pytest.approx(clipped[0], rel=1e-6)
  assert max(rel_diffs({"ours_loss": free, "theirs_loss": clipped})) > 1e-3


def test_a_mismatch_shows(folder):
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "o_proj"))
  opt = bench_control.Optim(lr=1e-2, steps=4)
  lm = api.load_pretrained(folder)
  answers = lm.yes_no_tokens()
  adapters = jax.device_get(lora.init(jax.random.key(0), lm.cfg, lora_cfg))
  ours, _ = bench_control.train_ours(lm, adapters, lora_cfg, BATCHES, opt, answers)
  model = bench_control.peft_model(folder, adapters, lora_cfg)
  theirs = bench_control.train_theirs(model, BATCHES, dataclasses.replace(opt, lr=2e-2),
                                      answers)
  assert ours[0] == pytest.approx(theirs[0], rel=1e-5)  # the first step is before any update
  assert max(rel_diffs({"ours_loss": ours, "theirs_loss": theirs})) > 1e-3


def test_dropout_is_refused(folder):
  with pytest.raises(ValueError, match="dropout"):
    bench_control.control(folder, BATCHES, lora.LoraConfig(rank=4, dropout=0.1),
                          bench_control.Optim(steps=1))
