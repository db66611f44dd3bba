"""Scoring one user's candidates: the shared prefix run once into a KV cache, against every
prompt scored whole.

  python -m rallrec_jax.bench prefix-score --workdir W [--candidates 50] [--dtype float32]

With a workdir (one that ran `index` and `finetune`, read only), the prompts are those the
`recommend` stage asks for its first evaluated user: the index's `--candidates` nearest unseen
items, each with its retrieved history, the run's wording and chat template, scored by the
run's `--checkpoint` (as recommend.checkpoint). Without one, `--model-dir` (default
$RALLREC_SMOLLM2) scores synthetic prompts of the ML-100K template: one profile and 30 rated
history titles, then each candidate's title. Both paths take batches of `--batch` rows (10:
the 50 prompts fill the whole-prompt batches, so neither side pays for padding rows), run
once to compile, then once timed. Reported: the seconds of each, their ratio, the largest
|logit| difference and whether the P(yes) rankings are identical.
"""
import json
import time

import numpy as np

from rallrec_jax import config as config_lib
from rallrec_jax.eval import evaluate, recommend
from rallrec_jax.llm import load_pretrained, prefix_score, score
from rallrec_jax.prompts import render

USER = {"gender": "F", "occupation": "librarian", "age": 34}


def bench_prefix_scoring(workdir=None, model_dir=None, checkpoint="best", candidates=50,
                         batch=10, dtype="float32"):
  """One JSON row: prefix reuse (value, seconds) against whole prompts (competitor)."""
  lm, trained, tokens, source = (_workdir_prompts(workdir, model_dir, checkpoint, candidates,
                                                  dtype) if workdir else
                                 _synthetic_prompts(model_dir, candidates, dtype))
  yes, no = lm.yes_no_tokens()
  examples = {"input_ids": tokens, "loss_mask": [np.zeros(len(t), np.int32) for t in tokens]}

  def whole():
    return evaluate.score_examples(lm, examples, yes, no, batch_size=batch, progress=False,
                                   **trained)

  def reuse():
    return prefix_score.group_logits(lm, tokens, yes, no, batch_size=batch, **trained)

  whole(), reuse()    # compile
  seconds = {}
  logits = {}
  for name, fn in (("whole", whole), ("reuse", reuse)):
    start = time.perf_counter()
    logits[name] = fn()
    seconds[name] = time.perf_counter() - start
  gap = {k: evaluate.logit_gap(v) for k, v in logits.items()}
  lengths = np.array([len(t) for t in tokens])
  shared = prefix_score.shared_prefix_length(tokens)
  multiple = score.batch_multiple(lm.mesh, lm.rules)
  return {"bench": "prefix_scoring", "row": f"{len(tokens)} candidates of one user",
          "value": round(seconds["reuse"], 3), "unit": "s",
          "competitor": "every prompt scored whole (evaluate.score_examples)",
          "competitor_value": round(seconds["whole"], 3),
          "ratio": round(seconds["whole"] / seconds["reuse"], 2),
          "max_abs_logit_diff": float(np.abs(logits["reuse"] - logits["whole"]).max()),
          "same_ranking": bool(np.array_equal(np.argsort(-gap["reuse"], kind="stable"),
                                              np.argsort(-gap["whole"], kind="stable"))),
          "chosen_by_recommend": bool(prefix_score.saves_work(tokens, batch, multiple)),
          "prompt_tokens_mean": round(float(lengths.mean()), 1), "shared_prefix": shared,
          "suffix_tokens_mean": round(float(lengths.mean()) - shared, 1),
          "batch": batch, "dtype": dtype, "source": source}


def _workdir_prompts(workdir, model_dir, checkpoint, candidates, dtype):
  """(lm, scoring weights, token lists, source) of the first evaluated user's candidates."""
  with open(f"{workdir}/config.json", encoding="utf-8") as f:
    cfg = config_lib.from_resolved(json.load(f))
  overrides = {"model.dtype": dtype, "model.param_dtype": ""}
  if model_dir:
    overrides["model.path"] = model_dir
  cfg = config_lib.apply_overrides(cfg, overrides)
  rec = recommend.Recommender.from_workdir(workdir, checkpoint, cfg=cfg)
  users, _ = recommend.evaluated_users(rec.dataset, 1)
  found = rec.candidates(users, candidates)[0]
  found = found[found >= 0]
  examples = rec.examples(np.full(len(found), users[0]), found)
  source = (f"{workdir} user {rec.dataset.users[users[0]]['raw_id']}, retrieval.order "
            f"{cfg.retrieval.order}, checkpoint {checkpoint} (step {rec.step})")
  return rec.lm, rec.trained, examples["input_ids"], source


def _synthetic_prompts(model_dir, candidates, dtype):
  """(lm, no trained weights, token lists, source) of ML-100K-template prompts."""
  if not model_dir:
    raise ValueError("pass --workdir or --model-dir (or set RALLREC_SMOLLM2)")
  lm = load_pretrained(model_dir, dtype=dtype)
  rng = np.random.default_rng(0)
  history = [(f"Movie number {i} of the archive ({1960 + i})", int(rng.integers(1, 6)))
             for i in range(30)]
  tokens = [render.encode(lm.tokenizer, render.render_prompt(
      USER, history, f"Candidate film {j}: a story of {j * 7} days ({1970 + j})",
      "ml100k"))["input_ids"] for j in range(candidates)]
  return lm, {}, tokens, f"synthetic ML-100K prompts, {model_dir}"

