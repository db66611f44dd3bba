"""Training sets, batching, example scoring (base and LoRA), temperature fit and eval files."""
import json
import re

import jax
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from rallrec_jax.eval import evaluate, results
from rallrec_jax.llm import load_pretrained, lora, padding, score
from rallrec_jax.llm.model import Decoder
from rallrec_jax.prompts import render
from rallrec_jax.train import batches, sets
from tests.llm_fixtures import tiny_hf_model

PROMPTS = [
    "Will the user like this movie ?",
    "the user read a book . will the user like this book ?",
    "rating stars ?",
    "Paris is the capital of France . The user watched a movie in Paris . Will the user like it ?",
    "a movie",
    "will the user like this item ?",
    "it is .",
]


def _retrievals(orders, n):
  return {o: {"sample": np.arange(n)} for o in orders}


def test_pool_is_seeded_distinct_and_capped():
  a = sets.pool(100_000)
  assert a.dtype == np.int64 and len(a) == 8192 and len(np.unique(a)) == 8192
  np.testing.assert_array_equal(a, sets.pool(100_000))
  assert a.min() >= 0 and a.max() < 100_000
  assert not np.array_equal(a, sets.pool(100_000, seed=1))
  small = sets.pool(200, size=256)
  np.testing.assert_array_equal(np.sort(small), np.arange(200))


def test_training_set_variants():
  pool = sets.pool(5000, size=10)
  everything = _retrievals(("simple", "high", "sequential", "rerank"), 5000)
  mixed = sets.training_set("mixed", pool, everything, mixed_size=4)
  assert mixed == [(o, int(s)) for s in pool[:4] for o in ("high", "sequential", "simple")]
  two = sets.training_set("mixed", pool, everything, mixed_orders=("high", "simple"))
  assert len(two) == 20 and [o for o, _ in two[:4]] == ["high", "simple"] * 2
  assert sets.training_set("simple", pool, everything) == [("simple", int(s)) for s in pool]
  assert {o for o, _ in sets.training_set("rag", pool, everything)} == {"rerank"}
  assert {o for o, _ in sets.training_set("rag", pool, everything, order="high")} == {"high"}
  with pytest.raises(ValueError, match="'sequential' retrieval"):
    sets.training_set("mixed", pool, _retrievals(("high", "simple"), 5000))
  with pytest.raises(ValueError, match="lacks train sample"):
    sets.training_set("simple", pool, _retrievals(("simple",), 3))
  with pytest.raises(ValueError, match="unknown training set variant"):
    sets.training_set("nope", pool, everything)


def _examples(lengths, seed=0):
  rng = np.random.default_rng(seed)
  ids = [rng.integers(4, 60, n).astype(np.int32) for n in lengths]
  masks = [np.r_[np.zeros(n - 1), 1].astype(np.int32) for n in lengths]
  return {"input_ids": ids, "loss_mask": masks}


def test_left_pad_keeps_empty_rows_empty_and_refuses_overflow():
  values, mask = padding.left_pad([[7, 8], [], [9]], 4, pad_id=0)
  np.testing.assert_array_equal(values, [[0, 0, 7, 8], [0, 0, 0, 0], [0, 0, 0, 9]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match="row 1 has 3 tokens"):
    padding.left_pad([[1], [1, 2, 3]], 2, pad_id=0)


def test_pad_batch_left_pads_to_bucket():
  ex = _examples([5, 33, 2])
  out = batches.pad_batch(ex, [2, 1, 0], pad_id=3, bucket=32)
  assert all(a.shape == (3, 64) and a.dtype == np.int32 for a in out.values())
  for r, i in enumerate([2, 1, 0]):
    n = len(ex["input_ids"][i])
    np.testing.assert_array_equal(out["input_ids"][r, -n:], ex["input_ids"][i])
    assert (out["input_ids"][r, :-n] == 3).all()
    assert out["attention_mask"][r].sum() == n and out["attention_mask"][r, -n:].all()
    np.testing.assert_array_equal(out["loss_mask"][r, -n:], ex["loss_mask"][i])
    assert out["loss_mask"][r, :-n].sum() == 0
  assert batches.pad_batch(ex, [0], pad_id=0, bucket=8)["input_ids"].shape == (1, 8)


def test_batches_resume_and_epochs():
  ex = _examples([3] * 23)
  full = list(batches.batches(ex, 5, seed=7))
  assert [len(b) for b in full] == [5, 5, 5, 5, 3]
  np.testing.assert_array_equal(np.sort(np.concatenate(full)), np.arange(23))
  resumed = list(batches.batches(ex, 5, seed=7, start=10))
  assert all(np.array_equal(a, b) for a, b in zip(full[2:], resumed, strict=True))
  np.testing.assert_array_equal(np.concatenate(list(batches.batches(ex, 5, seed=7, start=7))),
                                np.concatenate(full)[7:])
  it = batches.epochs(ex, 5, seed=7)
  first = [next(it) for _ in range(10)]
  assert [e for e, _ in first] == [0] * 5 + [1] * 5
  assert all(np.array_equal(a, b) for (_, a), b in zip(first[:5], full))
  assert not np.array_equal(np.concatenate([r for _, r in first[5:]]), np.concatenate(full))
  epoch, rows = next(batches.epochs(ex, 5, seed=7, start=23 + 15))
  assert epoch == 1 and np.array_equal(rows, first[8][1])


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_llama_eval")
  tiny_hf_model(folder, "llama")
  return load_pretrained(folder)


def _prompt_examples(lm):
  enc = [render.encode(lm.tokenizer, p) for p in PROMPTS]
  return {"input_ids": [e["input_ids"] for e in enc], "loss_mask": [e["loss_mask"] for e in enc]}


def test_score_examples_matches_score_module(lm):
  yes, no = lm.yes_no_tokens()
  got = evaluate.score_examples(lm, _prompt_examples(lm), yes, no, batch_size=3, bucket=8)
  expected = score.prompt_logits(lm, PROMPTS, batch_size=4, bucket=8, progress=False)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(evaluate.sigmoid(evaluate.logit_gap(got)),
                             score.score_prompts(lm, PROMPTS, progress=False), atol=1e-5)
  labelled = _prompt_examples(lm)
  labelled["loss_mask"][0] = np.ones_like(labelled["loss_mask"][0])
  with pytest.raises(ValueError, match="prompt-only"):
    evaluate.score_examples(lm, labelled, yes, no)


def test_score_examples_with_lora_matches_merged_model(lm):
  yes, no = lm.yes_no_tokens()
  lora_cfg = lora.LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj"))
  adapters = lora.init(jax.random.key(0), lm.cfg, lora_cfg)
  adapters = jax.tree.map_with_path(
      lambda p, x: 0.3 * jax.random.normal(jax.random.key(len(p)), x.shape)
      if p[-1].key == "b" else x, adapters)
  examples = _prompt_examples(lm)
  got = evaluate.score_examples(lm, examples, yes, no, adapters, lora_cfg, batch_size=4, bucket=8)
  merged = lora.merge(lm.params, adapters, lora_cfg)
  padded = batches.pad_batch(examples, range(len(PROMPTS)), lm.tokenizer.pad_token_id, 1)
  full = np.asarray(Decoder(lm.cfg).apply({"params": merged}, padded["input_ids"],
                                          padded["attention_mask"]))[:, -1]
  pair = full[:, [yes, no]].astype(np.float64)
  expected = np.exp(pair[:, 0]) / np.exp(pair).sum(axis=1)
  np.testing.assert_allclose(evaluate.sigmoid(evaluate.logit_gap(got)), expected, atol=1e-5)
  base = evaluate.score_examples(lm, examples, yes, no, batch_size=4, bucket=8)
  assert np.abs(got - base).max() > 1e-3


def test_fit_temperature_recovers_known_temperature():
  rng = np.random.default_rng(0)
  z = rng.normal(0, 4, 20_000)
  labels = (rng.random(len(z)) < evaluate.sigmoid(z / 2.0)).astype(np.int8)
  fitted = evaluate.fit_temperature(z, labels)
  assert abs(fitted - 2.0) < 0.15
  logits = np.stack([z, np.zeros_like(z)], axis=1)
  result = evaluate.evaluate_split(labels, logits, fitted)
  assert result["logloss_calibrated"] < result["logloss"]
  calibrated = np.stack([z / 2.0, np.zeros_like(z)], axis=1)
  t = evaluate.fit_temperature(z / 2.0, labels)
  out = evaluate.evaluate_split(labels, calibrated, t)
  assert out["logloss_calibrated"] <= out["logloss"]


def test_evaluate_split_matches_sklearn():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (500, 2)).astype(np.float32)
  labels = rng.integers(0, 2, 500)
  out = evaluate.evaluate_split(labels, logits)
  p = 1 / (1 + np.exp(logits[:, 1].astype(np.float64) - logits[:, 0]))
  assert out["auc"] == pytest.approx(roc_auc_score(labels, p), abs=1e-12)
  assert out["logloss"] == pytest.approx(log_loss(labels, p), abs=1e-9)
  assert out["acc"] == pytest.approx(accuracy_score(labels, p > 0.5))
  assert out["n"] == 500 and out["logloss_calibrated"] is None


def test_write_eval_round_trip(tmp_path):
  metrics = {"auc": 0.7, "logloss": 0.6, "acc": 0.65, "n": 3, "logloss_calibrated": None}
  folder = results.results_dir(tmp_path, "best")
  summary, predictions = evaluate.write_eval(folder, "test", metrics, [4, 0, 9], [1, 0, 1],
                                             np.array([0.9, 0.2, 0.4]))
  assert summary == tmp_path / "eval" / "best" / "test.json"
  assert json.loads(summary.read_text()) == metrics
  with np.load(predictions) as f:
    np.testing.assert_array_equal(f["sample"], [4, 0, 9])
    np.testing.assert_array_equal(f["label"], [1, 0, 1])
    np.testing.assert_allclose(f["score"], [0.9, 0.2, 0.4], rtol=1e-6)
  assert sorted(p.name for p in folder.iterdir()) == ["test.json", "test_predictions.npz"]


def test_each_checkpoint_choice_has_its_own_folder():
  names = [results.checkpoint_name(c) for c in ("best", "latest", "none", 16, "0016")]
  assert names == ["best", "latest", "none", "step-16", "step-16"]
  other = results.checkpoint_name("/runs/a b/checkpoints")
  assert re.fullmatch(r"folder-runs_a_b_checkpoints-[0-9a-f]{8}", other)
  assert results.checkpoint_name("/runs/a_b/checkpoints") != other
  assert results.checkpoint_name("mean:96,64,96") == "mean-64-96"
  assert results.mean_steps("mean:96,64") == [64, 96] and results.mean_steps("96") is None


def test_capped_rows_first_spread_and_all():
  np.testing.assert_array_equal(evaluate.capped_rows(10, 0), np.arange(10))
  np.testing.assert_array_equal(evaluate.capped_rows(10, 12, "spread"), np.arange(10))
  np.testing.assert_array_equal(evaluate.capped_rows(10, 3), [0, 1, 2])
  np.testing.assert_array_equal(evaluate.capped_rows(10, 3, "spread"), [0, 3, 6])
  rows = evaluate.capped_rows(9529, 1000, "spread")
  gaps = np.diff(rows)
  assert len(np.unique(rows)) == 1000 and rows[0] == 0 and rows[-1] >= 9529 - 10
  assert set(gaps) <= {9, 10}
  with pytest.raises(ValueError, match="rows='last'"):
    evaluate.capped_rows(10, 3, "last")
