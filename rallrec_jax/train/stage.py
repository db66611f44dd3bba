"""The `finetune` stage: instruction tuning on the training prompts, selected on validation AUC.

Also what the `evaluate` stage shares with it: prompts of a split's rows (the LoRA config and
the weights that scoring takes are in `rallrec_jax.eval.weights`)."""
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import jax
import numpy as np

from rallrec_jax import config as config_lib
from rallrec_jax import data, distributed, stage, workdir_model
from rallrec_jax.eval import evaluate
from rallrec_jax.eval.weights import lora_config, restore_checkpoint, scoring_weights
from rallrec_jax.llm import number_line
from rallrec_jax.prompts import render
from rallrec_jax.retrieval import history
from rallrec_jax.stage import Stage
from rallrec_jax.train import batches, export, finetune as finetune_lib, sets, unrated

log = logging.getLogger("rallrec_jax")


def build_examples(dataset, tokenizer, split, results, pairs, *, labels, max_length,
                   **wording):
  """Examples of (order, sample index) pairs, built per order and put back in pair order."""
  by_order = {}
  for position, (order, sample) in enumerate(pairs):
    by_order.setdefault(order, []).append((position, sample))
  out = {"input_ids": [None] * len(pairs), "loss_mask": [None] * len(pairs),
         "label": np.zeros(len(pairs), np.int8), "sample": np.zeros(len(pairs), np.int64)}
  for order, items in by_order.items():
    subset = history.take(results[order], [s for _, s in items])
    built = render.build_examples(dataset, subset, tokenizer, split=split, labels=labels,
                                  max_length=max_length, order=order, **wording)
    for j, (position, _) in enumerate(items):
      for key in ("input_ids", "loss_mask", "label", "sample"):
        out[key][position] = built[key][j]
  return out


def with_unrated(cfg, dataset, tokenizer, vectors, pairs, examples):
  """`examples` followed by finetune.unrated x len(pairs) unrated negatives (`unrated`): copies
  of the first pairs' samples about an item the user never rated, each with its own retrieved
  history of the same order, answered "No"."""
  f = cfg.finetune
  copied = pairs[:int(round(f.unrated * len(pairs)))]
  if not copied:
    return examples
  negatives = unrated.samples(dataset, [s for _, s in copied], vectors, seed=f.seed)
  dataset = dataclasses.replace(dataset, splits={**dataset.splits, unrated.SPLIT: negatives})
  results = {order: history.retrieve_configured(dataset, unrated.SPLIT, vectors, cfg.retrieval,
                                                cfg.data.max_history, order)
             for order in {o for o, _ in copied}}
  extra = build_examples(dataset, tokenizer, unrated.SPLIT, results,
                         [(o, row) for row, (o, _) in enumerate(copied)],
                         labels=f.loss == "lm", max_length=f.max_length,
                         close=render.close_option(f, vectors), **render.wording(f))
  log.info("finetune: %d prompts and %d unrated negatives", len(pairs), len(copied))
  return {"input_ids": examples["input_ids"] + extra["input_ids"],
          "loss_mask": examples["loss_mask"] + extra["loss_mask"],
          "label": np.concatenate([examples["label"], extra["label"]]),
          "sample": np.concatenate([examples["sample"], extra["sample"]])}


def eval_examples(cfg, workdir, dataset, lm, split, limit, which):
  """Prompt-only examples of `limit` rows (0: all) of a split's retrieval, `which` ("first" or
  "spread") saying which."""
  result = history.load(Path(workdir) / "retrieval" / f"{split}.npz")
  rows = evaluate.capped_rows(len(result["sample"]), limit, which)
  pairs = [(cfg.retrieval.order, int(s)) for s in result["sample"][rows]]
  return build_examples(dataset, lm.tokenizer, split, {cfg.retrieval.order: result}, pairs,
                        labels=False, max_length=cfg.finetune.max_length,
                        close=render.close_option(cfg.finetune,
                                                  Path(workdir) / "embeddings" / "mixed.npy"),
                        **render.wording(cfg.finetune))


def trained_number_line(cfg, lm, lora_cfg):
  """(token ids, positions) of the tiny decoder's number line, kept by full fine-tuning; None
  for a model from model.path, without `model.tiny.number_line`, or under LoRA."""
  line = tuple(cfg.model.tiny.number_line)
  if cfg.model.path or not line or lora_cfg is not None:
    return None
  return number_line.tokens(lm.tokenizer, *line)


def finetune(cfg, workdir):
  """checkpoints/: LoRA instruction tuning on the training set of finetune.variant, selected
  and early-stopped on the validation AUC; resumes from the latest checkpoint."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  f = cfg.finetune
  key = json.dumps([f.to_dict(), config_lib.result_config(cfg, "retrieval"),
                    config_lib.result_config(cfg, "model")], sort_keys=True, default=str)
  if distributed.is_primary():
    stage.resumable([workdir / "checkpoints", workdir / "metrics.jsonl"], workdir / ".finetune.key",
                    hashlib.sha256(key.encode()).hexdigest() + stage.data_key(workdir))
  distributed.barrier("finetune key")
  lm = workdir_model.load_model(cfg, workdir, dataset)
  primary = distributed.is_primary()
  vectors = np.load(workdir / "embeddings" / "mixed.npy")
  orders = sets.orders(f.variant, cfg.retrieval.order)
  r = cfg.retrieval
  results = {order: history.retrieve_configured(dataset, "train", vectors, r,
                                                cfg.data.max_history, order)
             for order in orders}
  pool = sets.pool(len(dataset.splits["train"]), f.pool_size, f.seed)
  pairs = sets.training_set(f.variant, pool, results, order=r.order, mixed_size=f.mixed_size)
  examples = build_examples(dataset, lm.tokenizer, "train", results, pairs,
                            labels=f.loss == "lm", max_length=f.max_length,
                            close=render.close_option(f, vectors), **render.wording(f))
  examples = with_unrated(cfg, dataset, lm.tokenizer, vectors, pairs, examples)
  valid = eval_examples(cfg, workdir, dataset, lm, "valid", f.eval_samples, f.eval_rows)
  yes, no = lm.yes_no_tokens()
  lora_cfg = lora_config(cfg)

  def eval_fn(weights):
    logits = evaluate.score_examples(lm, valid, yes, no, batch_size=cfg.eval.batch_size,
                                     **scoring_weights(lm, lora_cfg, weights))
    return {k: v for k, v in evaluate.evaluate_split(valid["label"], logits).items()
            if v is not None}

  per_update = f.batch_size * f.grad_accum
  updates_per_epoch = max(1, -(-len(examples["label"]) // per_update))
  pad = lm.tokenizer.pad_token_id or 0

  def train_batches(position):
    for _, rows in batches.epochs(examples, f.batch_size, f.seed, start=position):
      yield batches.pad_batch(examples, rows, pad)

  summary = finetune_lib.fit(
      lm, lora_cfg, train_batches, steps=updates_per_epoch * f.epochs, lr=f.lr,
      weight_decay=f.weight_decay, grad_accum=f.grad_accum, warmup=f.warmup,
      clip_norm=f.clip_norm, loss=f.loss, answer_ids=(yes, no),
      checkpoint_dir=workdir / "checkpoints", save_every=f.eval_every or updates_per_epoch,
      eval_fn=eval_fn, eval_every=f.eval_every or updates_per_epoch, patience=f.patience,
      seed=f.seed, progress=primary, metrics_path=workdir / "metrics.jsonl" if primary else None,
      number_line=trained_number_line(cfg, lm, lora_cfg))
  summary = {k: v for k, v in summary.items() if k != "weights"}
  if primary:
    stage.save_json(workdir / "finetune.json", {**summary, "examples": len(examples["label"]),
                                                "updates_per_epoch": updates_per_epoch})
  log.info("finetune: %s at step %s; best valid AUC %s at step %s", summary["status"],
           summary["step"], summary["best_auc"], summary["best_step"])


FINETUNE = Stage(
    name="finetune",
    help="instruction tuning (finetune.method lora or full, finetune.loss answer or lm) on "
         "prompts of the finetune.variant training set, early stopping on validation AUC, "
         "resumable: writes checkpoints/, metrics.jsonl, finetune.json",
    run=finetune, config_keys=("finetune", "model", "retrieval"),
    deps=("prepare", "mix", "retrieve"), outputs=("finetune.json",),
    external_inputs=workdir_model.model_files, distributed=True,
    resumes=("checkpoints", "metrics.jsonl", "finetune.json"))


def export_stage(cfg, workdir):
  """export/: the weights of checkpoint export.checkpoint for Hugging Face users: adapters/ (a
  PEFT LoRA folder; LoRA runs only), merged/ (a transformers folder: the base model with the
  adapters merged, or the fully tuned weights) and export.json."""
  if jax.process_count() > 1:
    raise RuntimeError("export runs in one process: run `--stages export` without "
                       "RALLREC_DISTRIBUTED, on one host that sees the workdir")
  workdir = Path(workdir)
  lm = workdir_model.load_model(cfg, workdir, data.load_dataset(workdir))
  choice = str(cfg.export.checkpoint)
  trained, step = restore_checkpoint(cfg, workdir, lm, choice)
  folder = export.write(workdir / "export", lm, trained, workdir_model.model_folder(cfg, workdir),
                        step=step, checkpoint=choice)
  log.info("export: checkpoint %s (step %s) in %s", choice, step, folder)


EXPORT = Stage(
    name="export",
    help="the fine-tune's weights at export.checkpoint (best, latest, STEP, mean:A,B,..., a "
         "folder) for Hugging Face: writes export/adapters/ (LoRA runs: a PEFT folder that "
         "peft.PeftModel.from_pretrained loads), export/merged/ (a transformers folder with "
         "tokenizer and chat template: the adapters merged, or the fully tuned weights) and "
         "export/export.json; left out of a full run, ask for it with --stages export",
    run=export_stage, config_keys=("export", "finetune", "model"),
    deps=("prepare", "finetune"), outputs=("export",),
    external_inputs=workdir_model.model_files, distributed=True, needed=lambda cfg: False)
