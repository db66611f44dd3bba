"""The `evaluate` stage: P(yes) of a checkpoint on the configured splits, beside the non-LLM
baselines on the same rows."""
import logging
from pathlib import Path

from rallrec_jax import atomic, data, distributed, workdir_model
from rallrec_jax.eval import baselines, evaluate, metrics
from rallrec_jax.eval import results as results_lib
from rallrec_jax.prompts import render
from rallrec_jax.retrieval import history
from rallrec_jax.stage import Stage
from rallrec_jax.train import stage as train_stage

log = logging.getLogger("rallrec_jax")


def _baselines(workdir, dataset, fitted, split, examples, scores):
  """The non-LLM baselines' table on the rows the LLM was scored on (logged)."""
  result = history.load(Path(workdir) / "retrieval" / f"{split}.npz")
  found = baselines.scores(fitted, dataset, split, result, examples["sample"])
  table = baselines.compare(examples["label"], scores, found)
  for name, m in table.items():
    log.info("evaluate: %s baseline %s: auc %.4f, LLM minus it %+.4f [%+.4f, %+.4f]", split,
             name, m["auc"], m["auc_diff"], *m["auc_diff_ci"])
  return table


def _write_results(workdir, choice, results):
  """eval/{checkpoint}/, replaced whole: each split's json, predictions and baselines."""
  with atomic.directory(results_lib.results_dir(workdir, choice)) as tmp:
    for split, (metrics_dict, examples, scores, table) in results.items():
      evaluate.write_eval(tmp, split, metrics_dict, examples["sample"], examples["label"],
                          scores)
      baselines.write(tmp, split, table)


def evaluate_stage(cfg, workdir):
  """eval/{checkpoint}/{split}.json and predictions: P(yes) of a checkpoint (or zero-shot) on
  each split, with log loss also after one temperature fitted on the validation prompts; and
  {split}_baselines.json beside them, non-LLM baselines fitted on the train split, on the same
  rows. Each checkpoint choice has its own folder (`results.checkpoint_name`)."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  primary = distributed.is_primary()
  fitted = (baselines.fit(dataset, history.load(workdir / "retrieval" / "train.npz"),
                          extra=[k for k, on in render.wording(cfg.finetune).items() if on])
            if primary else None)
  lm = workdir_model.load_model(cfg, workdir, dataset)
  yes, no = lm.yes_no_tokens()
  choice = str(cfg.eval.checkpoint)
  trained, step = train_stage.restore_checkpoint(cfg, workdir, lm, choice)

  def logits_of(split, limit):
    examples = train_stage.eval_examples(cfg, workdir, dataset, lm, split, limit, cfg.eval.rows)
    return examples, evaluate.score_examples(lm, examples, yes, no,
                                             batch_size=cfg.eval.batch_size, **trained)

  valid, valid_logits = logits_of("valid", cfg.finetune.eval_samples)
  temperature = evaluate.fit_temperature(evaluate.logit_gap(valid_logits), valid["label"])
  results = {}
  for split in cfg.eval.splits:
    examples, logits = (valid, valid_logits) if split == "valid" else logits_of(
        split, cfg.eval.max_samples)
    metrics_dict = {**evaluate.evaluate_split(examples["label"], logits, temperature),
                    "step": step, "checkpoint": choice}
    scores = evaluate.sigmoid(evaluate.logit_gap(logits))
    log.info("evaluate: %s (checkpoint %s): auc %.4f logloss %.4f acc %.4f n %d", split,
             metrics.checkpoint_label(choice, step), metrics_dict["auc"], metrics_dict["logloss"],
             metrics_dict["acc"], metrics_dict["n"])
    if primary:
      results[split] = (metrics_dict, examples, scores,
                        _baselines(workdir, dataset, fitted, split, examples, scores))
  if primary:
    _write_results(workdir, choice, results)
    log.info("evaluate: results in %s", results_lib.results_dir(workdir, choice))


EVALUATE = Stage(
    name="evaluate",
    help="P(yes) of a checkpoint (eval.checkpoint: best, latest, STEP, mean:STEP,STEP,... for "
         "their averaged weights, a folder, or none for zero-shot) on eval.splits, and non-LLM "
         "baselines fitted on the train split (item like-rate, user like-rate and mean "
         "rating of the prompt's history, a logistic regression on the three) on the same "
         "rows: writes eval/{checkpoint}/{split}.json, "
         "{split}_predictions.npz and {split}_baselines.json, one folder per checkpoint "
         "choice (best, latest, step-N, mean-A-B, none, folder-...)",
    run=evaluate_stage, config_keys=("eval", "finetune", "model", "retrieval"),
    deps=lambda cfg: ("prepare", "retrieve") if str(cfg.eval.checkpoint) == "none" else (
        "prepare", "retrieve", "finetune"),
    outputs=("eval",), external_inputs=workdir_model.model_files, version=3, distributed=True)
