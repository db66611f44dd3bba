"""Scoring token-id prompts with the base model or LoRA adapters, metrics, and eval files.

P(yes) is the two-way softmax of the raw (yes, no) logits, sigmoid(logit_yes - logit_no), never
a softmax of probabilities (PAPER.md, known defects). The logits are kept so that one
temperature, fitted on the validation split only, can report a calibrated log loss beside the
raw one; it divides the logit gap and so leaves AUC and the 0.5-threshold accuracy unchanged.
"""
import json
from pathlib import Path

import numpy as np

from rallrec_jax import atomic, distributed, progress as progress_lib
from rallrec_jax.eval import metrics
from rallrec_jax.llm import prefix_score, score
from rallrec_jax.train import batches

# Temperatures searched by `fit_temperature`, as log10 bounds, and the search's step count.
LOG10_T_RANGE = (-2.0, 3.0)
SEARCH_STEPS = 80


def score_examples(lm, examples, yes_id, no_id, adapters=None, lora_cfg=None, batch_size=16,
                   bucket=32, progress=True, params=None):
  """[N, 2] float32 (yes, no) logits of prompt-only examples, in their order.

  The model is `lm` with `params` (default: its own, e.g. fully fine-tuned weights) and, when
  given, LoRA `adapters` of `lora_cfg` on top.

  Examples are sorted by length and cut into batches of `batch_size` rows (short batches repeat
  their last prompt), each left-padded to a multiple of `bucket` tokens, so few shapes compile.
  With a mesh, `batch_size` must divide by the mesh's batch ways. `progress` shows a bar (on
  process 0) with prompts/s.
  """
  lengths = _check_examples(examples, adapters, lora_cfg)
  yes_id, no_id = np.int32(yes_id), np.int32(no_id)
  pad_id = lm.tokenizer.pad_token_id or 0
  params = lm.params if params is None else params
  out = np.zeros((len(lengths), 2), np.float32)
  order = np.argsort(-lengths, kind="stable")
  bar = progress_lib.bar(total=len(order), desc="score", unit="prompt",
                         disable=not progress or not distributed.is_primary())
  for begin in range(0, len(order), batch_size):
    rows = order[begin:begin + batch_size]
    filled = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows))])
    batch = batches.pad_batch(examples, filled, pad_id, bucket)
    ids, mask = lm.place(batch["input_ids"]), lm.place(batch["attention_mask"])
    logits = score.yes_no_logits(lm.cfg, params, ids, mask, yes_id, no_id, adapters, lora_cfg)
    out[rows] = distributed.to_host(logits)[:len(rows)]
    bar.update(len(rows))
  bar.close()
  return out


def score_groups(lm, examples, groups, yes_id, no_id, adapters=None, lora_cfg=None,
                 batch_size=16, bucket=32, progress=True, params=None):
  """[N, 2] float32 (yes, no) logits of prompt-only examples, those of `score_examples` up to
  float rounding, the prompts of each group (examples with one value of `groups`, such as one
  user's candidates) sharing one run of their common token prefix (`llm.prefix_score`) where
  that saves work; the other groups' prompts go to `score_examples` together.
  """
  _check_examples(examples, adapters, lora_cfg)
  groups = np.asarray(groups)
  if groups.shape != (len(examples["input_ids"]),):
    raise ValueError(f"groups has shape {groups.shape}, not one value per example "
                     f"({len(examples['input_ids'])})")
  weights = dict(adapters=adapters, lora_cfg=lora_cfg, params=params)
  multiple = score.batch_multiple(lm.mesh, lm.rules)
  shared, alone = [], []
  for value in np.unique(groups):
    rows = np.flatnonzero(groups == value)
    tokens = [examples["input_ids"][i] for i in rows]
    (shared if prefix_score.saves_work(tokens, batch_size, multiple, bucket) else alone).append(
        rows)
  out = np.zeros((len(groups), 2), np.float32)
  if alone:
    rows = np.concatenate(alone)
    subset = {key: [examples[key][i] for i in rows] for key in ("input_ids", "loss_mask")}
    out[rows] = score_examples(lm, subset, yes_id, no_id, batch_size=batch_size, bucket=bucket,
                               progress=progress, **weights)
  bar = progress_lib.bar(total=sum(map(len, shared)), desc="score (shared prefixes)",
                         unit="prompt", disable=not shared or not progress
                         or not distributed.is_primary())
  for rows in shared:
    out[rows] = prefix_score.group_logits(lm, [examples["input_ids"][i] for i in rows], yes_id,
                                          no_id, batch_size=batch_size, **weights)
    bar.update(len(rows))
  bar.close()
  return out


def _check_examples(examples, adapters, lora_cfg):
  """The examples' prompt lengths, after checking that they are prompt-only and not empty and
  that adapters come with their config."""
  if any(np.any(m) for m in examples["loss_mask"]):
    raise ValueError("scoring needs prompt-only examples (build_examples with labels=False)")
  if (adapters is None) != (lora_cfg is None):
    raise ValueError("pass both adapters and lora_cfg, or neither")
  lengths = np.array([len(ids) for ids in examples["input_ids"]], np.int64)
  if (lengths == 0).any():
    raise ValueError(f"example {int(np.argmax(lengths == 0))} has no tokens")
  return lengths


def capped_rows(num_rows, limit, rows="first"):
  """Indices of the rows a split is scored on: all when `limit` is 0 or covers the split, else
  the first `limit` ("first") or `limit` rows evenly spaced from the first ("spread")."""
  if not limit or limit >= num_rows:
    return np.arange(num_rows)
  if rows == "first":
    return np.arange(limit)
  if rows == "spread":
    return np.arange(limit) * num_rows // limit
  raise ValueError(f"rows={rows!r} is not 'first' or 'spread'")


def logit_gap(logits):
  """logit_yes - logit_no (float64): P(yes) is its sigmoid."""
  logits = np.asarray(logits, np.float64)
  return logits[:, 0] - logits[:, 1]


def sigmoid(x):
  """Overflow-free logistic function."""
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def p_yes(logits):
  """P(yes) (float64) of [N, 2] Yes/No logits."""
  return sigmoid(logit_gap(logits))


def _nll(logit_diff, labels, temperature):
  """Mean log loss of sigmoid(logit_diff / temperature), computed from the logits (no clipping)."""
  signed = np.where(np.asarray(labels).astype(bool), 1.0, -1.0) * logit_diff / temperature
  return float(np.mean(np.logaddexp(0.0, -signed)))


def fit_temperature(logit_diff, labels):
  """The temperature T > 0 minimising the log loss of sigmoid(logit_diff / T) on `labels`.

  Fit on the validation split only. The loss is convex in 1/T, hence unimodal in log T, so a
  golden-section search over log T finds the minimum; if the result does not beat T = 1 on the
  reported (clipped) log loss, 1.0 is returned, so calibration never worsens these labels.
  """
  diff = np.asarray(logit_diff, np.float64)
  if len(diff) == 0 or len(diff) != len(labels):
    raise ValueError(f"need matching non-empty logits and labels, got {len(diff)}, "
                     f"{len(labels)}")
  ratio = (np.sqrt(5.0) - 1.0) / 2.0
  lo, hi = LOG10_T_RANGE
  for _ in range(SEARCH_STEPS):
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    if _nll(diff, labels, 10.0 ** a) <= _nll(diff, labels, 10.0 ** b):
      hi = b
    else:
      lo = a
  fitted = 10.0 ** ((lo + hi) / 2.0)
  if metrics.logloss(labels, sigmoid(diff / fitted)) <= metrics.logloss(labels, sigmoid(diff)):
    return float(fitted)
  return 1.0


def evaluate_split(labels, logits, temperature=None):
  """auc, logloss, acc, n of P(yes) = sigmoid(logit_yes - logit_no) from [N, 2] logits; with a
  `temperature` (fitted on validation) also the log loss of sigmoid(gap / temperature)."""
  diff = logit_gap(logits)
  out = metrics.all_metrics(labels, sigmoid(diff))
  out["temperature"] = None if temperature is None else float(temperature)
  out["logloss_calibrated"] = (None if temperature is None
                               else metrics.logloss(labels, sigmoid(diff / temperature)))
  return out


def write_eval(folder, split, metrics_dict, samples, labels, scores):
  """Write {split}.json and {split}_predictions.npz (sample, label, score) into `folder` (a
  `results.results_dir`), each atomically; returns the two paths."""
  out = Path(folder)
  summary, predictions = out / f"{split}.json", out / f"{split}_predictions.npz"
  atomic.write_text(summary, json.dumps(metrics_dict, indent=2, sort_keys=True) + "\n")
  with atomic.open_file(predictions) as f:
    np.savez(f, sample=np.asarray(samples, np.int64), label=np.asarray(labels, np.int8),
             score=np.asarray(scores, np.float32))
  return summary, predictions
