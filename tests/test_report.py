"""The results report: bootstrap CIs, ROC and calibration helpers, the table, plots and errors."""
import json
import re
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from rallrec_jax import config as config_lib
from rallrec_jax import pipeline, report
from rallrec_jax.eval import baselines, bootstrap, metrics
from rallrec_jax.eval import results as results_lib
from rallrec_jax.eval.evaluate import write_eval
from tests.conftest import REPO

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def fake_scores(n, signal, seed, ties=False):
  """Labels and float32 P(yes) that separate them better as `signal` grows."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n).astype(np.int8)
  logit = signal * (2.0 * labels - 1.0) + rng.normal(0.0, 1.0, n)
  scores = 1.0 / (1.0 + np.exp(-logit))
  return labels, (np.round(scores, 1) if ties else scores).astype(np.float32)


def make_run(folder, labels, scores, samples=None, k=30, variant="mix3", calibrated=True):
  """A workdir holding config.json and eval/best/test.json with its predictions."""
  cfg = config_lib.apply_overrides(config_lib.base_config(),
                                   {"retrieval.k": k, "mix.variant": variant})
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
  add_eval(folder, labels, scores, samples, calibrated=calibrated)
  return folder


def add_eval(folder, labels, scores, samples=None, checkpoint="best", step=7, calibrated=True,
             results=None):
  """Write a test-split evaluation of `checkpoint` into `results` (default: its eval/ folder)."""
  samples = np.arange(len(labels)) if samples is None else samples
  summary = {**metrics.all_metrics(labels, scores), "step": step, "checkpoint": checkpoint,
             "temperature": 1.5 if calibrated else None,
             "logloss_calibrated": 0.5 if calibrated else None}
  results = results_lib.results_dir(folder, checkpoint) if results is None else results
  write_eval(results, "test", summary, samples, labels, scores)


def table_rows(text):
  """{label: {column: cell}} of the first markdown table in `text`."""
  lines = [l for l in text.splitlines() if l.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
  return {r[0]: dict(zip(header, r)) for r in rows}


def ci(cell):
  low, high = cell.strip("[]").split(",")
  return float(low), float(high)


def png_size(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24]), len(data)


def test_resample_aucs_match_auc_on_each_resample():
  labels, scores = fake_scores(300, 0.7, seed=0, ties=True)
  aucs = bootstrap.resample_aucs(labels, scores, resamples=50, seed=3)[0]
  idx = np.random.default_rng(3).integers(0, 300, (50, 300))  # one chunk: the same draws
  expected = [metrics.auc(labels[i], scores[i]) for i in idx]
  np.testing.assert_allclose(aucs, expected, rtol=0, atol=1e-12)


def test_resample_aucs_single_class_is_nan():
  aucs = bootstrap.resample_aucs([0, 1], [0.2, 0.9], resamples=200, seed=0)[0]
  assert np.isnan(aucs).any() and set(aucs[~np.isnan(aucs)]) == {1.0}
  assert bootstrap.percentile_ci(aucs) == (1.0, 1.0)


def test_ci_contains_estimate_and_shrinks_with_n():
  widths = []
  for n in (200, 5000):
    labels, scores = fake_scores(n, 0.8, seed=n)
    low, high = bootstrap.percentile_ci(bootstrap.resample_aucs(labels, scores)[0])
    assert low < metrics.auc(labels, scores) < high
    widths.append(high - low)
  assert widths[1] < 0.4 * widths[0]


def test_paired_difference_of_identical_scores_is_zero():
  labels, scores = fake_scores(1000, 0.5, seed=1)
  aucs = bootstrap.resample_aucs(labels, np.stack([scores, scores]))
  assert np.all(aucs[0] - aucs[1] == 0.0)


def test_bootstrap_is_fast():
  labels, scores = fake_scores(10_000, 0.5, seed=2)
  start = time.perf_counter()
  bootstrap.resample_aucs(labels, np.stack([scores, np.round(scores, 2)]), resamples=1000)
  assert time.perf_counter() - start < 5.0


def test_roc_curve_matches_sklearn_and_auc():
  labels, scores = fake_scores(500, 0.6, seed=4, ties=True)
  fpr, tpr = report.roc_curve(labels, scores)
  sk_fpr, sk_tpr, _ = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)
  assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auc(labels, scores), abs=1e-12)


def test_calibration_bins():
  rng = np.random.default_rng(5)
  scores = rng.random(20_000)
  labels = rng.random(20_000) < scores  # calibrated by construction
  mean_score, observed, count = report.calibration_bins(labels, scores, bins=10)
  assert count.sum() == 20_000 and count.max() - count.min() <= 1
  assert np.all(np.diff(mean_score) > 0)
  np.testing.assert_allclose(observed, mean_score, atol=0.04)
  assert np.dot(mean_score, count) / 20_000 == pytest.approx(scores.mean())
  assert len(report.calibration_bins([0, 1, 1], [0.1, 0.5, 0.9], bins=10)[2]) == 3


def test_labels_name_only_differing_keys():
  base = report.flatten(json.loads(config_lib.base_config().to_json_best_effort()))
  other = {**base, "retrieval.k": 20, "mix.variant": "cf"}
  assert report.run_labels(["x/a", "y/b"], [base, other]) == [
      "a: mix.variant=mix3, retrieval.k=30", "b: mix.variant=cf, retrieval.k=20"]
  assert report.run_labels(["x/a", "y/a"], [base, base]) == ["x/a", "y/a"]


def write_manifests(folder, overrides, stages=("prepare", "mix", "retrieve", "evaluate")):
  """W/manifests/{stage}.json holding the config subtrees each stage keeps, as they run."""
  cfg = config_lib.apply_overrides(config_lib.base_config(), overrides)
  (folder / "manifests").mkdir(exist_ok=True)
  for name in stages:
    kept = {k: config_lib.result_config(cfg, k) for k in pipeline.STAGES[name].config_keys}
    (folder / "manifests" / f"{name}.json").write_text(json.dumps({"stage": name,
                                                                   "config": kept}))


def test_runs_are_labelled_by_the_config_their_manifests_kept(tmp_path):
  labels, scores = fake_scores(300, 1.0, seed=15)
  a, b, c = (make_run(tmp_path / name, labels, scores, k=10) for name in "abc")
  write_manifests(a, {"retrieval.k": 10})
  # b's config.json is that of a later rerun that failed; its evaluation ran with k=20 and the
  # cf vectors, and a retrieve rerun since (k=15) leaves the evaluate manifest as it was.
  write_manifests(b, {"retrieval.k": 20, "mix.variant": "cf"})
  write_manifests(b, {"retrieval.k": 15}, stages=("retrieve",))
  runs = [report.load_run(w, "test") for w in (a, b, c)]
  assert report.run_labels([a, b], [r.config for r in runs[:2]]) == [
      "a: mix.variant=mix3, retrieval.k=10", "b: mix.variant=cf, retrieval.k=20"]
  assert {"data.max_history", "finetune.lr", "eval.checkpoint"} <= set(runs[1].config)
  assert "align.epochs" not in runs[1].config  # no align manifest
  assert runs[2].config == report.flatten(json.loads((c / "config.json").read_text()))
  (b / "manifests" / "mix.json").write_text("[]")
  with pytest.raises(report.ReportError, match=r"b/manifests/mix\.json: no config subtrees"):
    report.load_run(b, "test")


def test_report_table_plots_and_stdout(tmp_path, capsys):
  weak, strong = fake_scores(3000, 0.3, seed=6), fake_scores(3000, 1.0, seed=6)  # same labels
  runs = [make_run(tmp_path / "a", *weak, k=10),
          make_run(tmp_path / "b", *strong, k=20),
          make_run(tmp_path / "c", weak[0], np.round(weak[1], 1), k=20, variant="cf",
                   calibrated=False)]
  out = tmp_path / "out"
  report.main([str(r) for r in runs] + ["--out", str(out)])
  text = (out / "report.md").read_text()
  rows = table_rows(text)
  assert list(rows) == ["a: mix.variant=mix3, retrieval.k=10", "b: mix.variant=mix3, "
                        "retrieval.k=20", "c: mix.variant=cf, retrieval.k=20"]
  a, b, c = rows.values()
  for row, run in zip((a, b, c), runs):
    with np.load(run / "eval" / "best" / "test_predictions.npz") as npz:
      labels, scores = npz["label"], npz["score"]
    assert row["n"] == "3000"
    assert float(row["AUC"]) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores),
                                              abs=5e-5)
    assert float(row["ACC"]) == pytest.approx(metrics.accuracy(labels, scores), abs=5e-5)
    low, high = ci(row["AUC 95% CI"])
    assert low < float(row["AUC"]) < high and high - low < 0.06
  assert (a["LogLoss (calibrated)"], c["LogLoss (calibrated)"]) == ("0.5000", "-")
  assert (a["ΔAUC vs baseline"], a["ΔAUC 95% CI"]) == ("baseline", "-")
  assert ci(b["ΔAUC 95% CI"])[0] > 0 and float(b["ΔAUC vs baseline"]) == pytest.approx(
      float(b["AUC"]) - float(a["AUC"]), abs=2e-4)
  low, high = ci(c["ΔAUC 95% CI"])
  assert low <= float(c["ΔAUC vs baseline"]) <= high
  assert a["checkpoint (step)"] == "best (7)"
  assert "different sample sets" not in text and "ΔAUC LLM − this" not in text
  for name in ("roc.png", "calibration.png", "auc_vs_k.png"):
    (width, height), size = png_size(out / name)
    assert width >= 600 and height >= 450 and size > 15_000, name
    assert f"]({name})" in text
  printed = capsys.readouterr().out
  assert printed.startswith(text[text.index("| run"):text.index("\n\n", text.index("| run"))])
  assert str(out / "report.md") in printed and str(out / "auc_vs_k.png") in printed


def test_paired_difference_against_itself_and_on_shared_samples(tmp_path):
  labels, scores = fake_scores(1000, 0.4, seed=7)
  a = make_run(tmp_path / "a", labels, scores)
  same = make_run(tmp_path / "same", labels, scores)
  keep = np.random.default_rng(8).permutation(1000)[:700]  # another order, a subset
  part = make_run(tmp_path / "part", labels[keep], np.round(scores[keep], 2), samples=keep)
  runs = [report.load_run(w, "test") for w in (a, same, part)]
  rows, notes = report.summarize(runs, ["a", "same", "part"], base=0)
  assert rows[1].diff == 0.0 and rows[1].diff_ci == (0.0, 0.0)
  expected = (sklearn_metrics.roc_auc_score(labels[keep], np.round(scores[keep], 2))
              - sklearn_metrics.roc_auc_score(labels[keep], scores[keep]))
  assert rows[2].diff == pytest.approx(expected, abs=1e-12)
  assert rows[2].diff_ci[0] <= rows[2].diff <= rows[2].diff_ci[1]
  assert notes == ["`part` (700 samples) and the baseline `a` (1000) scored different sample "
                   "sets: its ΔAUC compares the two runs on the 700 samples both scored."]
  out = tmp_path / "out"
  report.report([str(part), str(a)], out, baseline=str(a))
  text = (out / "report.md").read_text()
  assert "the 700 samples both scored" in text
  assert table_rows(text)["a"]["ΔAUC vs baseline"] == "baseline"
  assert png_size(out / "auc_vs_k.png")[1] > 15_000  # one shared k still plots


def test_baseline_rows_under_the_run_that_has_them(tmp_path, capsys):
  labels, scores = fake_scores(2000, 0.8, seed=10)
  with_file, without = make_run(tmp_path / "a", labels, scores), make_run(tmp_path / "b", labels,
                                                                          scores)
  rng = np.random.default_rng(11)
  found = {"item_like_rate": rng.random(2000),
           "user_mean_rating": 3 + labels * 0.3 + rng.normal(0, 1, 2000)}
  table = baselines.compare(labels, scores, found, resamples=200)
  baselines.write(with_file / "eval" / "best", "test", table)
  report.main([str(with_file), str(without), "--out", str(tmp_path / "out")])
  rows = table_rows((tmp_path / "out" / "report.md").read_text())
  assert list(rows) == ["a", "baseline: item like-rate [a]", "baseline: user mean rating [a]",
                        "b"]
  for name, title in (("item_like_rate", "item like-rate"),
                      ("user_mean_rating", "user mean rating")):
    row, entry = rows[f"baseline: {title} [a]"], table[name]
    assert row["n"] == "2000"
    assert float(row["AUC"]) == pytest.approx(sklearn_metrics.roc_auc_score(labels, found[name]),
                                              abs=5e-5)
    assert ci(row["AUC 95% CI"]) == pytest.approx(entry["auc_ci"], abs=5e-5)
    assert float(row["ΔAUC LLM − this"]) == pytest.approx(
        float(rows["a"]["AUC"]) - float(row["AUC"]), abs=2e-4)
    assert ci(row["ΔAUC LLM − this 95% CI"]) == pytest.approx(entry["auc_diff_ci"], abs=5e-5)
    assert (row["ΔAUC vs baseline"], row["checkpoint (step)"]) == ("-", "-")
  item, mean = rows["baseline: item like-rate [a]"], rows["baseline: user mean rating [a]"]
  assert item["LogLoss"] == f"{table['item_like_rate']['logloss']:.4f}"
  assert (mean["LogLoss"], mean["ACC"]) == ("-", "-")
  assert ci(item["ΔAUC LLM − this 95% CI"])[0] > 0
  for run in ("a", "b"):
    assert (rows[run]["ΔAUC LLM − this"], rows[run]["ΔAUC LLM − this 95% CI"]) == ("-", "-")
  assert "baseline: item like-rate [a]" in capsys.readouterr().out

  table["item_like_rate"]["n"] = 1999
  baselines.write(with_file / "eval" / "best", "test", table)
  with pytest.raises(report.ReportError, match="'item_like_rate' scored 1999 rows, the LLM 2000"):
    report.load_run(with_file, "test")


@pytest.mark.parametrize("remove, message", [
    ("eval/best/test.json", r"a/eval/best/test\.json missing: run --stages evaluate"),
    ("eval/best/test_predictions.npz",
     r"a/eval/best/test_predictions\.npz missing: run --stages evaluate"),
    ("config.json", r"a/config\.json missing: run the pipeline on it"),
])
def test_missing_file_is_one_line_exit_2(tmp_path, capsys, remove, message):
  run = make_run(tmp_path / "a", *fake_scores(50, 1.0, seed=9))
  (run / remove).unlink()
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(run), "--out", str(tmp_path / "out")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert err.startswith("error: ") and re.search(message, err)
  assert not (tmp_path / "out").exists()


def test_bad_baseline_and_single_class(tmp_path, capsys):
  run = make_run(tmp_path / "a", *fake_scores(50, 1.0, seed=9))
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(run), "--baseline", str(tmp_path / "z")])
  assert exit_info.value.code == 2 and "is not one of the workdirs" in capsys.readouterr().err
  write_eval(run / "eval" / "best", "test", {}, np.arange(10), np.ones(10), np.full(10, 0.7))
  with pytest.raises(report.ReportError, match=r"AUC needs labels 0 and 1, found \[1\]"):
    report.load_run(run, "test")


def test_cli_missing_eval_exits_2_without_traceback(tmp_path):
  run = make_run(tmp_path / "w", *fake_scores(50, 1.0, seed=9))
  (run / "eval" / "best" / "test.json").unlink()
  result = subprocess.run([sys.executable, "-m", "rallrec_jax.report", str(run)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr == f"error: {run}/eval/best/test.json missing: run --stages evaluate " \
                          "(with 'test' in eval.splits)\n"


def test_each_checkpoint_keeps_its_results_and_best_is_the_default(tmp_path, capsys):
  labels, scores = fake_scores(400, 1.0, seed=12)
  run = make_run(tmp_path / "a", labels, scores)
  zero = fake_scores(400, 0.1, seed=12)[1]
  add_eval(run, labels, zero, checkpoint="none", step=None)
  add_eval(run, labels, scores, checkpoint="16", step=16)
  assert sorted(p.name for p in (run / "eval").iterdir()) == ["best", "none", "step-16"]
  best = report.load_run(run, "test")
  assert best.summary["checkpoint"] == "best"
  np.testing.assert_allclose(best.score, scores, rtol=1e-6)
  none = report.load_run(run, "test", "none")
  np.testing.assert_allclose(none.score, zero, rtol=1e-6)
  for name in ("16", "step-16"):
    assert report.load_run(run, "test", name).summary["step"] == 16
  report.main([str(run), "--out", str(tmp_path / "out"), "--checkpoint", "none"])
  assert table_rows(capsys.readouterr().out)["a"]["checkpoint (step)"] == "none"
  with pytest.raises(report.ReportError, match=r"eval/latest/test\.json missing: test was "
                     r"evaluated on best, none, step-16; pass --checkpoint"):
    report.load_run(run, "test", "latest")


def test_a_run_without_best_reads_its_only_evaluation(tmp_path):
  labels, scores = fake_scores(300, 1.0, seed=13)
  run = make_run(tmp_path / "a", labels, scores)
  (run / "eval" / "best").rename(run / "eval" / "none")
  assert report.load_run(run, "test").workdir == run
  add_eval(run, labels, scores, checkpoint="latest", step=9)
  with pytest.raises(report.ReportError, match="evaluated on latest, none"):
    report.load_run(run, "test")


def test_a_workdir_with_results_directly_in_eval_reads_as_their_checkpoint(tmp_path, capsys):
  labels, scores = fake_scores(300, 1.0, seed=14)
  run = make_run(tmp_path / "a", labels, scores)
  shutil.rmtree(run / "eval")
  add_eval(run, labels, scores, checkpoint="none", step=None, results=run / "eval")
  assert report.load_run(run, "test", "none").summary["step"] is None
  assert report.load_run(run, "test").summary["checkpoint"] == "none"  # the only one
  add_eval(run, labels, np.round(scores, 1), checkpoint="best")
  report.main([str(run), "--out", str(tmp_path / "out")])
  assert table_rows(capsys.readouterr().out)["a"]["checkpoint (step)"] == "best (7)"
