"""The `evaluate` stage: P(yes) of a checkpoint on the configured splits, beside the non-LLM
baselines on the same rows; and the `recommend` stage: top-n lists reranked by the LLM."""
import json
import logging
from pathlib import Path

from rallrec_jax import atomic, data, distributed, stage, workdir_model
from rallrec_jax.eval import baselines, evaluate, metrics, recommend
from rallrec_jax.eval import results as results_lib
from rallrec_jax.eval.weights import restore_checkpoint
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
  close = render.close_option(cfg.finetune, workdir / "embeddings" / "mixed.npy")
  extra = [k for k, on in render.wording(cfg.finetune).items() if on]
  if close is not None:
    extra.append("mark_close")
  fitted = (baselines.fit(dataset, history.load(workdir / "retrieval" / "train.npz"),
                          extra=extra, close=close)
            if primary else None)
  lm = workdir_model.load_model(cfg, workdir, dataset)
  yes, no = lm.yes_no_tokens()
  choice = str(cfg.eval.checkpoint)
  trained, step = restore_checkpoint(cfg, workdir, lm, choice)

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
    scores = evaluate.p_yes(logits)
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


def recommend_stage(cfg, workdir):
  """recommend/lists.jsonl and metrics.json: for recommend.max_users users with a liked test
  item, the index's recommend.candidates nearest unseen items reranked by the P(yes) of
  recommend.checkpoint, and recall, NDCG and hit rate at recommend.n of four rows."""
  workdir = Path(workdir)
  r = cfg.recommend
  rec = recommend.Recommender.from_workdir(workdir, str(r.checkpoint), cfg=cfg)
  lists, summary = recommend.evaluate_recommendations(rec, r.max_users, r.candidates, r.n,
                                                      blended=r.blend)
  summary["checkpoint"] = str(r.checkpoint)
  if not distributed.is_primary():
    return
  with atomic.directory(workdir / "recommend") as tmp:
    atomic.write_text(tmp / "lists.jsonl", "".join(json.dumps(x) + "\n" for x in lists))
    stage.save_json(tmp / "metrics.json", summary)
  if "blend" in summary:
    log.info("recommend: blend weights %s, chosen on %d validation users",
             summary["blend"]["weights"], summary["blend"]["valid_users"])
  for name, row in summary["rows"].items():
    log.info("recommend: %-12s recall@%d %.4f ndcg@%d %.4f hit_rate@%d %.4f (%d users)", name,
             r.n, row[f"recall@{r.n}"], r.n, row[f"ndcg@{r.n}"], r.n, row[f"hit_rate@{r.n}"],
             row["users"])


RECOMMEND = Stage(
    name="recommend",
    help="top-n recommendation: for recommend.max_users users with a liked test item (0: all), "
         "the index's recommend.candidates nearest items unseen before the user's first test "
         "sample, each scored by recommend.checkpoint with the CTR prompt and ranked by P(yes) "
         "(recommend.prefix_cache: a user's shared token prefix run once into a KV cache) "
         "and (recommend.blend) by a blend of P(yes), index order and popularity whose weights "
         "are chosen on validation users; recall, NDCG and hit rate at recommend.n with "
         "bootstrap CIs for most-popular, index order, LLM rerank, the blend and the oracle "
         "ceiling of the candidates: writes "
         "recommend/lists.jsonl and recommend/metrics.json",
    run=recommend_stage,
    config_keys=("recommend", "finetune", "model", "retrieval", "index", "data.max_history"),
    deps=lambda cfg: ("prepare", "mix", "index") + (
        () if str(cfg.recommend.checkpoint) == "none" else ("finetune",)),
    outputs=("recommend",), external_inputs=workdir_model.model_files, version=2,
    distributed=True)
