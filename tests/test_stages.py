"""The representation stages end to end on the shrunk quickstart, against the artifact contract."""
import json
import os
import shutil
import signal

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from rallrec_jax import data, pipeline, report, workdir_model
from rallrec_jax import stage as stage_lib
from rallrec_jax.eval import baselines, evaluate, table as table_lib, weights as weights_lib
from rallrec_jax.llm import lora
from rallrec_jax.text import describe, stage as text_stage
from rallrec_jax.train import loop, stage as train_stage
from tests.test_baselines import loop_item_rates
from tests.test_config import load_config

STAGES = ["prepare", "describe", "embed", "cf", "align", "mix", "index", "retrieve"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("quickstart")
  cfg = load_config("quickstart", "runlocal=true")
  status = pipeline.run(cfg, workdir, stages=STAGES)
  return cfg, workdir, status


def test_every_stage_runs_and_writes_the_contract(run):
  cfg, workdir, status = run
  assert status == {name: "ran" for name in STAGES}
  ds = data.load_dataset(workdir)
  n = ds.num_items
  assert sorted(describe.read_done(workdir / "descriptions.jsonl")) == list(range(n))
  dims = {"text": cfg.embed.pca_dim, "cf": cfg.cf.dim, "joint": cfg.align.dim,
          "mixed": cfg.embed.pca_dim + cfg.cf.dim + cfg.align.dim}
  for name, dim in dims.items():
    array = np.load(workdir / "embeddings" / f"{name}.npy")
    assert array.shape == (n, dim) and array.dtype == np.float32 and np.isfinite(array).all()
  neighbors = np.load(workdir / "index" / "neighbors.npy")
  assert neighbors.shape == (n, cfg.index.neighbors)
  assert not (neighbors == np.arange(n)[:, None]).any()
  assert json.loads((workdir / "index" / "recommend.json").read_text())["recall@10"] > 0
  for name in data.SPLITS:
    got = np.load(workdir / "retrieval" / f"{name}.npz")
    samples = ds.splits[name]
    assert got["history"].shape == (len(samples), cfg.retrieval.k)
    np.testing.assert_array_equal(got["user"], samples.user[got["sample"]])
    np.testing.assert_array_equal(got["target"], samples.target[got["sample"]])
    start, end = ds.history_bounds(samples)
    for i in range(0, len(samples), 97):
      chosen = got["history"][i][got["history"][i] >= 0]
      available = ds.timelines.item[start[i]:end[i]]
      assert len(chosen) == min(cfg.retrieval.k, len(available))
      assert set(chosen) <= set(available)
  metrics = json.loads((workdir / "cf" / "metrics.json").read_text())
  assert len(metrics) == cfg.cf.epochs and "recall@20" in metrics[-1]


def test_rerun_skips_and_a_changed_key_reruns_only_downstream(run):
  cfg, workdir, _ = run
  assert set(pipeline.run(cfg, workdir, stages=STAGES).values()) == {"skipped"}
  cfg = load_config("quickstart", "runlocal=true")
  cfg.retrieval.order = "simple"
  status = pipeline.run(cfg, workdir, stages=STAGES)
  assert [s for s, v in status.items() if v == "ran"] == ["retrieve"]
  got = np.load(workdir / "retrieval" / "test.npz")
  ds = data.load_dataset(workdir)
  start, end = ds.history_bounds(ds.splits["test"])
  i = int(np.argmax(end - start))
  last = ds.timelines.item[max(start[i], end[i] - cfg.retrieval.k):end[i]]
  np.testing.assert_array_equal(got["history"][i][:len(last)], last)


def check_baselines(workdir, checkpoint):
  """Every baseline scored on the LLM's rows: the item like-rate's AUC on the predictions' rows
  as recomputed by a loop over the train samples."""
  ds = data.load_dataset(workdir)
  results = workdir / "eval" / checkpoint
  for split in ("valid", "test"):
    llm = json.loads((results / f"{split}.json").read_text())
    found = json.loads((results / f"{split}_baselines.json").read_text())
    assert sorted(found) == sorted(baselines.names())
    assert all(b["n"] == llm["n"] for b in found.values())
    predictions = np.load(results / f"{split}_predictions.npz")
    rates = loop_item_rates(ds, ds.splits[split].target[predictions["sample"]])
    item = found["item_like_rate"]
    assert item["auc"] == pytest.approx(roc_auc_score(predictions["label"], rates), abs=1e-12)
    assert item["auc_diff"] == pytest.approx(llm["auc"] - item["auc"], abs=1e-12)


def test_finetune_and_evaluate_from_checkpoints(run):
  cfg, workdir, _ = run
  status = pipeline.run(cfg, workdir, stages=STAGES + ["finetune", "evaluate"])
  assert status["finetune"] == "ran" and status["evaluate"] == "ran"
  summary = json.loads((workdir / "finetune.json").read_text())
  assert summary["status"] in ("complete", "early_stopped") and summary["best_step"] >= 1
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == list(range(1, len(lines) + 1))
  logged = {x["step"]: x["eval"]["auc"] for x in lines if "eval" in x}
  best = json.loads((workdir / "eval" / "best" / "valid.json").read_text())
  # Evaluating the best checkpoint later reproduces the AUC logged at training time.
  assert best["step"] == summary["best_step"]
  assert abs(best["auc"] - logged[summary["best_step"]]) < 1e-6
  test = json.loads((workdir / "eval" / "best" / "test.json").read_text())
  assert test["n"] == cfg.eval.max_samples and 0 <= test["auc"] <= 1
  table = table_lib.results_table(workdir).splitlines()
  assert table[0].startswith("split") and table[1].split()[:2] == ["test", f"{test['auc']:.4f}"]
  assert table[1].endswith(f"best (step {summary['best_step']})")
  assert [line.split(":")[0] for line in table[2:6]] == ["  baseline"] * 4
  assert table[6].startswith("valid")
  check_baselines(workdir, "best")
  assert all("mfu" in x and x["mfu"] > 0 for x in lines)
  predictions = np.load(workdir / "eval" / "best" / "test_predictions.npz")
  assert predictions["score"].shape == (test["n"],)
  assert ((predictions["score"] > 0) & (predictions["score"] < 1)).all()

  zero = load_config("quickstart", "runlocal=true")
  zero.eval.checkpoint, zero.eval.rows = "none", "spread"
  best_files = {p.name: p.read_bytes() for p in (workdir / "eval" / "best").iterdir()}
  status = pipeline.run(zero, workdir, stages=["evaluate"])
  assert status == {"evaluate": "ran"}
  assert json.loads((workdir / "eval" / "none" / "test.json").read_text())["step"] is None
  n_test = len(np.load(workdir / "retrieval" / "test.npz")["sample"])
  spread = np.load(workdir / "eval" / "none" / "test_predictions.npz")["sample"]
  assert n_test > 2 * zero.eval.max_samples and spread[-1] > n_test // 2
  np.testing.assert_array_equal(
      spread, evaluate.capped_rows(n_test, zero.eval.max_samples, "spread"))
  check_baselines(workdir, "none")
  check_records_of_both(cfg, zero, workdir, best_files, test)


def check_records_of_both(cfg, zero, workdir, best_files, test):
  """After evaluating best and then none, both results are kept, best is what the results
  table and the report show, and asking for best again is not taken as up to date."""
  assert {p.name: p.read_bytes() for p in (workdir / "eval" / "best").iterdir()} == best_files
  assert table_lib.results_table(workdir) == table_lib.results_table(workdir, "best")
  assert table_lib.results_table(workdir).splitlines()[1].split()[1] == f"{test['auc']:.4f}"
  assert table_lib.results_table(workdir, "none").splitlines()[1].endswith("none (zero-shot)")
  run = report.load_run(workdir, "test")
  assert run.summary == test
  assert report.load_run(workdir, "test", "none").summary["checkpoint"] == "none"
  stage = pipeline.STAGES["evaluate"]
  manifest = pipeline.read_manifest(workdir, "evaluate")
  for config, current in ((zero, True), (cfg, False)):
    expected = pipeline._expected(stage, config, workdir)
    assert pipeline._is_current(stage, workdir, manifest, expected) is current


@pytest.mark.slow  # about 30 s; tests/test_train_loop.py covers resume in the default suite
def test_preempted_finetune_resumes_to_the_same_run(run, tmp_path, monkeypatch):
  cfg, workdir, _ = run
  pipeline.run(cfg, workdir, stages=STAGES + ["finetune"])
  uninterrupted = (workdir / "metrics.jsonl").read_text().splitlines()
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(
      "checkpoints", "metrics.jsonl", "finetune.json", "eval"))
  (copy / "manifests" / "finetune.json").unlink(missing_ok=True)
  (copy / "manifests" / "evaluate.json").unlink(missing_ok=True)
  real = loop._evaluate

  def sigterm_after_first_eval(*args, **kwargs):
    result = real(*args, **kwargs)
    monkeypatch.setattr(loop, "_evaluate", real)
    os.kill(os.getpid(), signal.SIGTERM)
    return result

  monkeypatch.setattr(loop, "_evaluate", sigterm_after_first_eval)
  with pytest.raises(stage_lib.Preempted, match="rerun the same command"):
    pipeline.run(cfg, copy, stages=STAGES + ["finetune"])
  assert pipeline.read_manifest(copy, "finetune") is None
  first = (copy / "metrics.jsonl").read_text().splitlines()
  assert 0 < len(first) < len(uninterrupted)
  assert pipeline.run(cfg, copy, stages=STAGES + ["finetune"])["finetune"] == "ran"
  resumed = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
  expected = [json.loads(x) for x in uninterrupted]
  assert [x["step"] for x in resumed] == [x["step"] for x in expected]
  for got, want in zip(resumed, expected):
    assert abs(got["loss"] - want["loss"]) < 1e-5
    assert got.get("eval", {}).get("auc") == pytest.approx(want.get("eval", {}).get("auc"))


def test_full_fine_tuning_learns_on_the_shrunk_quickstart(run, tmp_path):
  """One epoch of the quickstart's recipe (full fine-tuning, answer loss) lowers the training
  decision loss and lifts validation AUC above the zero-shot decoder's on the same rows."""
  cfg, workdir, _ = run
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(
      "checkpoints", "metrics.jsonl", "finetune.json", "eval", ".finetune.key"))
  cfg = load_config("quickstart", "runlocal=true")
  # Random weights whose zero-shot scores sit nearer chance than seed 1's (0.63 on these rows
  # by luck), so that the margin below measures what training adds.
  cfg.model.tiny.seed = 0
  f = cfg.finetune
  f.pool_size, f.batch_size, f.grad_accum, f.epochs, f.lr, f.warmup = 4096, 32, 1, 1, 3e-3, 5
  f.eval_every, f.eval_samples, f.eval_rows = 10, 200, "spread"
  cfg.eval.splits = ("valid",)
  pipeline.run(cfg, copy, stages=STAGES + ["finetune", "evaluate"])
  lines = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
  losses = [x["answer_loss"] for x in lines]
  assert len(losses) >= 40
  assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.01, losses
  tuned = json.loads((copy / "eval" / "best" / "valid.json").read_text())
  cfg.eval.checkpoint = "none"
  pipeline.run(cfg, copy, stages=["evaluate"])
  zero = json.loads((copy / "eval" / "none" / "valid.json").read_text())
  assert zero["n"] == tuned["n"] == 200 and zero["step"] is None
  assert tuned["auc"] > zero["auc"] + 0.05, (tuned["auc"], zero["auc"])
  # The average of one checkpoint with itself is that checkpoint: same scores, own folder.
  best = tuned["step"]
  cfg.eval.checkpoint = f"mean:{best},{best}"
  pipeline.run(cfg, copy, stages=["evaluate"])
  averaged = json.loads((copy / "eval" / f"mean-{best}" / "valid.json").read_text())
  assert (averaged["auc"], averaged["step"]) == (tuned["auc"], best)


def test_tiny_tokenizer_reads_every_word_of_the_prompts(run):
  """The tiny decoder's vocabulary covers the question, not only the items: no prompt token
  (the target's *** marks, "stars", the profile) is <unk>."""
  cfg, workdir, _ = run
  dataset = data.load_dataset(workdir)
  lm = workdir_model.load_model(cfg, workdir, dataset)
  unk = lm.tokenizer.unk_token_id
  for split in ("train", "test"):
    examples = train_stage.eval_examples(cfg, workdir, dataset, lm, split, 0, "first")
    assert len(examples["input_ids"]) == len(dataset.splits[split])
    assert not any(unk in ids for ids in examples["input_ids"]), split
  words = set(lm.tokenizer.convert_ids_to_tokens(examples["input_ids"][0]))
  assert {"*", "stars", "watched", "ONLY"} <= words
  cfg.embed.source = "template"
  embedded = lm.tokenizer(text_stage.item_texts(cfg, workdir, dataset)).input_ids
  assert not any(unk in ids for ids in embedded)
  assert {"Here", "Its"} <= set(lm.tokenizer.convert_ids_to_tokens(embedded[0]))


def test_control_prompts_are_worded_like_the_fine_tune(run):
  """The trainer control reads the workdir's prompts with its stats phrases, as finetune does."""
  from rallrec_jax.benchmarks import control as bench_control  # pylint: disable=import-outside-toplevel
  from rallrec_jax.llm import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  cfg, workdir, _ = run
  assert cfg.finetune.item_stats
  tokenizer = tokenizer_lib.load(workdir / "model_tiny")
  train, held = bench_control.workdir_batches(workdir, tokenizer, prompts=4, batch=2,
                                              eval_rows=2)
  assert [len(b["label"]) for b in train] == [2, 2] and [len(b["label"]) for b in held] == [2]
  for batch in train + held:
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
      assert "of its earlier raters" in tokenizer.decode(ids[mask > 0])


@pytest.mark.slow
def test_export_of_a_lora_fine_tune_loads_in_peft_and_transformers(run, tmp_path):
  """`--stages export` after a LoRA fine-tune: PEFT on the tiny base model with export/adapters
  and transformers on export/merged give the logits of our decoder with the best checkpoint's
  adapters; a rerun skips it, another export.checkpoint reruns it. Slow (26 s): the default
  suite checks the stage (test_export.test_the_export_stage_ships_the_chosen_checkpoint) and
  PEFT and transformers loading its folders (test_export) separately."""
  import torch  # pylint: disable=import-outside-toplevel
  from peft import PeftModel  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  cfg, workdir, _ = run
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(
      "checkpoints", "metrics.jsonl", "finetune.json", "eval", ".finetune.key", "export"))
  cfg = load_config("quickstart", "runlocal=true")
  cfg.finetune.update(method="lora", epochs=1, lr=3e-2)
  cfg.finetune.lora.update(rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"), layers=1)
  status = pipeline.run(cfg, copy, stages=STAGES + ["finetune", "export"])
  assert (status["finetune"], status["export"]) == ("ran", "ran")
  assert pipeline.run(cfg, copy, stages=["export"]) == {"export": "skipped"}
  dataset = data.load_dataset(copy)
  lm = workdir_model.load_model(cfg, copy, dataset)
  trained, step = weights_lib.restore_checkpoint(cfg, copy, lm, "best")
  assert json.loads((copy / "export" / "export.json").read_text())["step"] == step
  examples = train_stage.eval_examples(cfg, copy, dataset, lm, "valid", 3, "first")
  ids = np.array([x[-40:] for x in examples["input_ids"]])
  assert ids.shape == (3, 40)
  ours = np.asarray(lora.apply(lm.cfg, lm.params, trained["adapters"], trained["lora_cfg"], ids))
  assert np.abs(ours - lm.logits(ids)).max() > 1e-3  # the fine-tune moved the model

  base = AutoModelForCausalLM.from_pretrained(copy / "model_tiny").eval()
  peft_model = PeftModel.from_pretrained(base, copy / "export" / "adapters").eval()
  merged = AutoModelForCausalLM.from_pretrained(copy / "export" / "merged").eval()
  for model in (peft_model, merged):
    with torch.no_grad():
      theirs = model(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
  cfg.export.checkpoint = "latest"
  assert pipeline.run(cfg, copy, stages=["export"]) == {"export": "ran"}


def test_close_marks_reach_the_prompts_and_the_baselines(run, tmp_path):
  """finetune.mark_close marks the listed items near the target in the prompts the stages score
  and adds the marked items' mean rating to the evaluate stage's baselines."""
  from rallrec_jax.llm import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from rallrec_jax.prompts import render  # pylint: disable=import-outside-toplevel
  from rallrec_jax.retrieval import history  # pylint: disable=import-outside-toplevel
  _, source, _ = run
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  cfg = load_config("quickstart", "runlocal=true")
  cfg.finetune.mark_close, cfg.eval.checkpoint = 0.2, "none"
  # Other tests of this module may leave the shared workdir at another config's artifacts.
  status = pipeline.run(cfg, workdir, stages=STAGES + ["evaluate"])
  assert status["evaluate"] == "ran"
  dataset = data.load_dataset(workdir)
  lm = workdir_model.load_model(cfg, workdir, dataset)
  examples = train_stage.eval_examples(cfg, workdir, dataset, lm, "test", 6, "first")
  result = history.take(history.load(workdir / "retrieval" / "test.npz"), np.arange(6))
  close = render.close_option(cfg.finetune, np.load(workdir / "embeddings" / "mixed.npy"))
  marks = render.close_marks(close, result["history"], result["target"])
  tokenizer = tokenizer_lib.load(workdir / "model_tiny")
  star = tokenizer.convert_tokens_to_ids("*")
  # Each prompt holds the target's six *** marks plus one "*" per marked listed item.
  got = [int((np.asarray(ids) == star).sum()) - 6 for ids in examples["input_ids"]]
  assert got == marks.sum(axis=1).tolist() and sum(got) > 0
  table = json.loads((workdir / "eval" / "none" / "test_baselines.json").read_text())
  assert {"user_close_mean_rating", "logistic_regression_all"} <= set(table)
