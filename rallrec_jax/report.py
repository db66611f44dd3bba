"""A results report across pipeline runs: a markdown table with bootstrap CIs, and plots.

  python -m rallrec_jax.report W1 W2 ... [--out DIR] [--baseline W1] [--split test]
      [--checkpoint best]

Each workdir W needs the `evaluate` stage's W/eval/{checkpoint}/{split}.json and
{split}_predictions.npz beside it. The checkpoint is best unless --checkpoint names another
(latest, none, a step or its folder name step-N); a run evaluated on one checkpoint only is
read from that one. A workdir from before the per-checkpoint folders has the files in W/eval/
itself, read as the checkpoint they record. Runs are labelled by their folder name and the
config leaves that differ between the runs given: those its stages ran with, from the config
subtrees of its manifests W/manifests/{stage}.json (W/config.json only in a workdir without
manifests). DIR (default ./report) receives:

  report.md        one row per run: n, AUC with a 95% bootstrap CI, log loss (also after the
                   validation-fitted temperature, when the run has it), accuracy, the AUC
                   difference to the baseline run with a 95% paired bootstrap CI, and the
                   checkpoint scored; under a run with {split}_baselines.json beside its
                   results, one row per non-LLM baseline scored on the same rows, with
                   AUC(LLM) - AUC(baseline) and its paired CI; and for runs with
                   W/recommend/metrics.json (the `recommend` stage), a second table of its
                   four rows: recall, NDCG and hit rate at n with 95% CIs over users
  roc.png          ROC curves, AUC in the legend
  calibration.png  reliability diagram (equal-count bins) over each run's score histogram
  auc_vs_k.png     AUC with its CI against retrieval.k, one line per setting of the other keys

The table is also printed. Bad input exits with status 2 and a one-line message.
"""
import argparse
import dataclasses
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from rallrec_jax import atomic, pipeline
from rallrec_jax.eval import baselines, bootstrap, metrics
from rallrec_jax.eval import results as results_lib

K_KEY = "retrieval.k"
LEGEND_WIDTH = 60
DPI = 100


class ReportError(ValueError):
  """Bad report input; the message names the file and what to run."""


@dataclasses.dataclass
class Run:
  """One workdir's evaluation of a split."""
  workdir: Path
  config: dict     # flattened: dotted key -> leaf value
  summary: dict    # eval/{checkpoint}/{split}.json
  sample: np.ndarray
  label: np.ndarray
  score: np.ndarray
  baselines: dict = None  # eval/{checkpoint}/{split}_baselines.json, when the run has it


def _read_json(path, missing):
  if not path.is_file():
    raise ReportError(f"{path} missing: {missing}")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ReportError(f"{path}: not readable JSON ({e})") from None


def _results_folder(workdir, split, checkpoint):
  """The folder holding `checkpoint`'s evaluation of `split` in a workdir (see the module
  docstring); a one-line error naming what to run when there is none."""
  checkpoint = re.sub(r"^step-(\d+)$", r"\1", str(checkpoint))
  stored = {name: splits[split].parent
            for name, splits in results_lib.stored_results(workdir).items() if split in splits}
  name = results_lib.choose(stored, checkpoint)
  if name is not None:
    return stored[name]
  flag = "" if str(checkpoint) == "best" else f" --config.eval.checkpoint={checkpoint}"
  path = results_lib.results_dir(workdir, checkpoint) / f"{split}.json"
  if not stored:
    raise ReportError(f"{path} missing: run --stages evaluate{flag} (with '{split}' in "
                      "eval.splits)")
  raise ReportError(f"{path} missing: {split} was evaluated on {', '.join(sorted(stored))}; pass "
                    f"--checkpoint NAME, or run --stages evaluate{flag}")


def load_run(workdir, split, checkpoint="best"):
  """The run in `workdir`: its config and its `split` evaluation of `checkpoint`, checked for
  consistency."""
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise ReportError(f"{workdir}: no such workdir")
  evaluate = f"run --stages evaluate (with '{split}' in eval.splits)"
  config = run_config(workdir)
  folder = _results_folder(workdir, split, checkpoint)
  summary = _read_json(folder / f"{split}.json", evaluate)
  path = folder / f"{split}_predictions.npz"
  if not path.is_file():
    raise ReportError(f"{path} missing: {evaluate}")
  try:
    with np.load(path) as npz:
      arrays = {k: np.asarray(npz[k]) for k in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ReportError(f"{path}: not a readable .npz ({e})") from None
  absent = [k for k in ("sample", "label", "score") if k not in arrays]
  if absent:
    raise ReportError(f"{path}: no array(s) {', '.join(absent)}; rerun --stages evaluate")
  sample, label, score = arrays["sample"], arrays["label"], arrays["score"]
  if not len(sample) == len(label) == len(score) or sample.ndim != 1 or score.ndim != 1:
    raise ReportError(f"{path}: sample, label and score must be 1-D arrays of one length, got "
                      f"{sample.shape}, {label.shape}, {score.shape}")
  if len(np.unique(sample)) != len(sample):
    raise ReportError(f"{path}: repeated sample ids")
  if not np.isfinite(score).all():
    raise ReportError(f"{path}: {int((~np.isfinite(score)).sum())} scores are not finite")
  if not np.isin(label, (0, 1)).all() or len(np.unique(label)) != 2:
    raise ReportError(f"{path}: AUC needs labels 0 and 1, found {np.unique(label).tolist()}")
  return Run(workdir, config, summary, sample.astype(np.int64), label.astype(np.int8),
             score.astype(np.float64), _load_baselines(folder, split, len(sample)))


def run_config(workdir):
  """The flattened config that a workdir's artifacts were made with: the config subtrees kept
  in its stages' manifests, stage by stage in run order (a later stage's added), or
  W/config.json when no stage has a manifest."""
  manifests = [Path(workdir) / "manifests" / f"{name}.json" for name in pipeline.STAGES]
  manifests = [path for path in manifests if path.is_file()]
  if not manifests:
    return flatten(_read_json(Path(workdir) / "config.json",
                              "run the pipeline on it (python -m rallrec_jax.main --workdir ...)"))
  config = {}
  for path in manifests:
    manifest = _read_json(path, "rerun its stage")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
      raise ReportError(f"{path}: no config subtrees in it; rerun its stage with --force")
    config.update(flatten(manifest["config"]))
  return config


BASELINE_KEYS = ("auc", "auc_ci", "logloss", "acc", "n", "auc_diff", "auc_diff_ci")


def _load_baselines(folder, split, n):
  """{split}_baselines.json in a run's results folder (None when absent), checked against its
  n rows."""
  path = baselines.path(folder, split)
  if not path.is_file():
    return None
  rerun = "rerun --stages evaluate"
  table = _read_json(path, rerun)
  if not isinstance(table, dict):
    raise ReportError(f"{path}: not a table of baselines; {rerun}")
  for name, entry in table.items():
    absent = [k for k in BASELINE_KEYS if not isinstance(entry, dict) or k not in entry]
    if absent:
      raise ReportError(f"{path}: {name!r} lacks {', '.join(absent)}; {rerun}")
    if entry["n"] != n:
      raise ReportError(f"{path}: {name!r} scored {entry['n']} rows, the LLM {n}; {rerun}")
  return table


def flatten(tree, prefix=""):
  """{"a": {"b": 1}} -> {"a.b": 1}; lists are leaves."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def format_value(value):
  return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def differing_keys(configs):
  """Sorted flattened keys whose values are not the same in every config (absent counts)."""
  keys = sorted(set().union(*configs))
  return [k for k in keys if len({json.dumps(c.get(k, "<absent>")) for c in configs}) > 1]


def settings(config, keys):
  """"k1=v1, k2=v2" of `keys` in a flattened config."""
  return ", ".join(f"{k}={format_value(config.get(k, '<absent>'))}" for k in keys)


def run_names(workdirs):
  """Folder names, or the paths as given when names repeat."""
  names = [Path(w).name for w in workdirs]
  return names if len(set(names)) == len(names) else [str(w) for w in workdirs]


def run_labels(workdirs, configs):
  """Folder name (the path as given when names repeat) plus the settings that differ."""
  names = run_names(workdirs)
  keys = differing_keys(configs)
  return [f"{name}: {settings(c, keys)}" if keys else name for name, c in zip(names, configs)]


def roc_curve(labels, scores):
  """(fpr, tpr) from (0, 0) to (1, 1), one point per distinct score (ties move diagonally),
  so the trapezoid area equals the tie-aware AUC."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  order = np.argsort(-scores, kind="mergesort")
  scores, labels = scores[order], labels[order]
  last_of_level = np.r_[scores[1:] != scores[:-1], True]
  tp = np.cumsum(labels)[last_of_level]
  fp = np.cumsum(~labels)[last_of_level]
  return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def calibration_bins(labels, scores, bins=10):
  """(mean score, observed positive rate, count) of up to `bins` equal-count bins of samples
  sorted by score."""
  labels = np.asarray(labels, np.float64)
  scores = np.asarray(scores, np.float64)
  parts = [p for p in np.array_split(np.argsort(scores, kind="mergesort"), bins) if len(p)]
  return (np.array([scores[p].mean() for p in parts]), np.array([labels[p].mean() for p in parts]),
          np.array([len(p) for p in parts]))


@dataclasses.dataclass
class Row:
  """One line of the table: a run, or a non-LLM baseline scored on a run's rows."""
  label: str
  n: int
  auc: float
  auc_ci: tuple
  logloss: float
  logloss_calibrated: float
  acc: float
  checkpoint: str
  baseline: bool = False
  diff: float = None
  diff_ci: tuple = None
  llm_diff: float = None     # baseline rows: AUC(the run's LLM) - AUC(this baseline)
  llm_diff_ci: tuple = None


def summarize(runs, labels, base, resamples=1000, seed=0):
  """(rows, notes): the table's rows and the notes that go under it."""
  rows, notes = [], []
  ref = runs[base]
  for i, (run, label) in enumerate(zip(runs, labels)):
    point = metrics.all_metrics(run.label, run.score)
    boot = bootstrap.resample_aucs(run.label, run.score, resamples, seed)[0]
    step = run.summary.get("step")
    checkpoint = str(run.summary.get("checkpoint", "-")) + ("" if step is None else f" ({step})")
    row = Row(label, point["n"], point["auc"], bootstrap.percentile_ci(boot), point["logloss"],
              run.summary.get("logloss_calibrated"), point["acc"], checkpoint, i == base)
    rows.append(row)
    if i == base:
      continue
    shared, at_run, at_ref = np.intersect1d(run.sample, ref.sample, assume_unique=True,
                                            return_indices=True)
    name, ref_name = label, labels[base]  # as the table shows them
    if len(shared) == 0:
      notes.append(f"`{name}` and the baseline `{ref_name}` scored no sample in common: "
                   "no ΔAUC.")
      continue
    disagree = int((run.label[at_run] != ref.label[at_ref]).sum())
    if disagree:
      notes.append(f"`{name}` and the baseline `{ref_name}` label {disagree} of the "
                   f"{len(shared)} samples both scored differently (different data?): no ΔAUC.")
      continue
    shared_labels = run.label[at_run]
    if len(np.unique(shared_labels)) < 2:
      notes.append(f"The {len(shared)} samples that `{name}` and the baseline `{ref_name}` both "
                   "scored have one label only: no ΔAUC.")
      continue
    if len(shared) < max(len(run.sample), len(ref.sample)):
      notes.append(f"`{name}` ({len(run.sample)} samples) and the baseline `{ref_name}` "
                   f"({len(ref.sample)}) scored different sample sets: its ΔAUC compares the two "
                   f"runs on the {len(shared)} samples both scored.")
    pair = np.stack([run.score[at_run], ref.score[at_ref]])
    aucs = bootstrap.resample_aucs(shared_labels, pair, resamples, seed)
    row.diff = metrics.auc(shared_labels, pair[0]) - metrics.auc(shared_labels, pair[1])
    row.diff_ci = bootstrap.percentile_ci(aucs[0] - aucs[1])
  return rows, notes


def baseline_rows(run, name):
  """The rows of a run's non-LLM baselines (none without {split}_baselines.json)."""
  return [Row(f"baseline: {baselines.TITLES.get(key, key)} [{name}]", b["n"], b["auc"],
              tuple(b["auc_ci"]), b["logloss"], None, b["acc"], "-",
              llm_diff=b["auc_diff"], llm_diff_ci=tuple(b["auc_diff_ci"]))
          for key, b in (run.baselines or {}).items()]


def _legend(label, width=LEGEND_WIDTH):
  """A legend entry short enough to leave the axes their room (the table has the full label)."""
  return label if len(label) <= width else label[:width - 3] + "..."


def _cell(text):
  return str(text).replace("|", "\\|")


def _number(value):
  return "-" if value is None else f"{value:.4f}"


def _difference(diff, ci):
  return [f"{diff:+.4f}", f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"]


def markdown_table(rows):
  """The rows as a markdown table; the calibrated log loss column only when a run has it, the
  LLM-minus-baseline columns only when there are baseline rows."""
  calibrated = any(r.logloss_calibrated is not None for r in rows)
  versus_llm = any(r.llm_diff is not None for r in rows)
  header = ["run", "n", "AUC", "AUC 95% CI", "LogLoss"]
  header += ["LogLoss (calibrated)"] if calibrated else []
  header += ["ACC", "ΔAUC vs baseline", "ΔAUC 95% CI"]
  header += ["ΔAUC LLM − this", "ΔAUC LLM − this 95% CI"] if versus_llm else []
  header += ["checkpoint (step)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
  for r in rows:
    cells = [_cell(r.label), str(r.n), f"{r.auc:.4f}", f"[{r.auc_ci[0]:.4f}, {r.auc_ci[1]:.4f}]",
             _number(r.logloss)]
    if calibrated:
      cells.append(_number(r.logloss_calibrated))
    cells.append(_number(r.acc))
    if r.diff_ci is not None:
      cells += _difference(r.diff, r.diff_ci)
    else:
      cells += ["baseline" if r.baseline else "-", "-"]
    if versus_llm:
      cells += _difference(r.llm_diff, r.llm_diff_ci) if r.llm_diff is not None else ["-", "-"]
    cells.append(_cell(r.checkpoint))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _save(fig, path):
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=DPI)
  with atomic.open_file(path) as f:
    f.write(buffer.getvalue())


def plot_roc(runs, rows, split, path):
  fig = Figure(figsize=(7, 6), layout="constrained")
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance (AUC 0.5)")
  for run, row in zip(runs, rows):
    fpr, tpr = roc_curve(run.label, run.score)
    ax.plot(fpr, tpr, lw=1.8, label=f"{_legend(row.label)} (AUC {row.auc:.3f})")
  ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate",
         title=f"ROC curves, {split} split", aspect="equal")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize="small")
  _save(fig, path)


def plot_calibration(runs, rows, split, path, bins=10):
  """Reliability diagram over a histogram of the scores. The x axis spans the scores (padded):
  when they are concentrated a [0, 1] axis would stack every bin on one spot."""
  scores = np.concatenate([run.score for run in runs])
  pad = 0.05 * (scores.max() - scores.min()) or 0.01
  lo, hi = max(0.0, scores.min() - pad), min(1.0, scores.max() + pad)
  if hi - lo > 0.5:
    lo, hi = 0.0, 1.0
  fig = Figure(figsize=(7, 7.5), layout="constrained")
  top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  top.plot([lo, hi], [lo, hi], ls="--", color="0.6", lw=1, label="perfectly calibrated")
  edges = np.linspace(lo, hi, 41)
  for run, row in zip(runs, rows):
    mean_score, observed, _ = calibration_bins(run.label, run.score, bins)
    line, = top.plot(mean_score, observed, marker="o", lw=1.5, label=_legend(row.label))
    bottom.hist(run.score, bins=edges, histtype="step", lw=1.5, color=line.get_color())
  top.set(xlim=(lo, hi), ylim=(0, 1), ylabel="Observed positive rate",
          title=f"Reliability diagram, {split} split ({bins} equal-count bins per run)")
  top.grid(alpha=0.3)
  top.legend(loc="upper left", fontsize="small")
  zoomed = "" if (lo, hi) == (0.0, 1.0) else ", axis fitted to the scores"
  bottom.set(xlabel=f"Predicted P(yes): bin mean (top), score (bottom){zoomed}",
             ylabel="Samples")
  bottom.grid(alpha=0.3)
  _save(fig, path)


def plot_auc_vs_k(runs, rows, split, path):
  """AUC with CI error bars against retrieval.k; runs sharing every other differing key form
  one line."""
  configs = [r.config for r in runs]
  missing = [str(r.workdir) for r in runs if K_KEY not in r.config]
  if missing:
    raise ReportError(f"{missing[0]}: its config (from its manifests, else config.json) has no "
                      f"{K_KEY}")
  others = [k for k in differing_keys(configs) if k != K_KEY]
  groups = {}
  for config, row in zip(configs, rows):
    groups.setdefault(settings(config, others), []).append((config[K_KEY], row))
  ks = sorted({c[K_KEY] for c in configs})
  dodge = 0.012 * ((ks[-1] - ks[0]) or 1)
  fig = Figure(figsize=(7, 5), layout="constrained")
  ax = fig.add_subplot()
  for g, (name, points) in enumerate(groups.items()):
    points.sort(key=lambda p: p[0])
    x = np.array([k for k, _ in points], np.float64) + dodge * (g - (len(groups) - 1) / 2)
    auc = np.array([r.auc for _, r in points])
    err = np.array([[r.auc - r.auc_ci[0], r.auc_ci[1] - r.auc] for _, r in points]).T
    ax.errorbar(x, auc, yerr=err, marker="o", capsize=4, lw=1.5,
                label=_legend(name) if name else "all runs")
  ax.set_xticks(ks)
  if len(ks) == 1:
    ax.set_xlim(ks[0] - 1, ks[0] + 1)
  ax.set(xlabel=f"{K_KEY} (history items per prompt)", ylabel="AUC (95% bootstrap CI)",
         title=f"AUC against retrieved history length, {split} split")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", title="other settings" if others else None)
  _save(fig, path)


RECOMMEND_TITLES = {"most_popular": "most popular (unseen)", "index": "index order",
                    "llm_rerank": "LLM rerank", "blend": "blend of P(yes), index, popularity",
                    "oracle": "oracle (candidates' ceiling)"}


def recommend_table(workdirs, names):
  """A markdown table of the `recommend` stage's rows (W/recommend/metrics.json) of the runs
  that have one: recall, NDCG and hit rate at n with their 95% CIs; "" when none has."""
  lines = []
  for workdir, name in zip(workdirs, names):
    path = Path(workdir) / "recommend" / "metrics.json"
    if not path.is_file():
      continue
    found = json.loads(path.read_text())
    n = found["n"]
    for key, row in found["rows"].items():
      cells = [f"{RECOMMEND_TITLES.get(key, key)} [{name}]", str(row["users"]),
               str(found["candidates"])]
      for metric in ("recall", "ndcg", "hit_rate"):
        low, high = row[f"{metric}@{n}_ci"]
        cells += [f"{row[f'{metric}@{n}']:.4f}", f"[{low:.4f}, {high:.4f}]"]
      lines.append("| " + " | ".join(_cell(c) for c in cells) + f" | {n} |")
  if not lines:
    return ""
  header = ["recommend row", "users", "candidates", "Recall@n", "95% CI", "NDCG@n", "95% CI",
            "HitRate@n", "95% CI", "n"]
  return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
                   + lines)


def report(workdirs, out="report", split="test", baseline=None, resamples=1000, seed=0, bins=10,
           checkpoint="best"):
  """Write report.md and the plots under `out` for each run's evaluation of `checkpoint`;
  returns (table text, notes, paths written)."""
  if not workdirs:
    raise ReportError("give at least one workdir")
  runs = [load_run(w, split, checkpoint) for w in workdirs]
  base = 0
  if baseline is not None:
    matches = [i for i, w in enumerate(workdirs)
               if w == baseline or Path(w).resolve() == Path(baseline).resolve()]
    if not matches:
      raise ReportError(f"--baseline {baseline} is not one of the workdirs given")
    base = matches[0]
  labels = run_labels(workdirs, [r.config for r in runs])
  rows, notes = summarize(runs, labels, base, resamples, seed)
  notes = [f"Baseline: `{labels[base]}`. AUC CIs: 95% percentile bootstrap over samples "
           f"({resamples} resamples, seed {seed}); ΔAUC: AUC minus the baseline's, its CI from "
           "paired resamples of the samples both runs scored, matched by sample id. Calibrated "
           "log loss: after one temperature fitted on the validation split."] + notes
  extra = [baseline_rows(run, name) for run, name in zip(runs, run_names(workdirs))]
  if any(extra):
    notes.append("Rows `baseline: ... [run]`: non-LLM baselines fitted on the train split and "
                 f"scored on exactly the run's rows (eval/CHECKPOINT/{split}_baselines.json, "
                 "written by the evaluate stage); ΔAUC LLM − this: the run's AUC minus the "
                 f"baseline's, its CI from {baselines.RESAMPLES} paired resamples (seed "
                 f"{baselines.SEED}) made by that stage, as is the baseline's AUC CI. The user "
                 "mean rating is no probability: no log loss or accuracy.")
  table = markdown_table([r for row, more in zip(rows, extra) for r in [row] + more])
  ranking = recommend_table(workdirs, run_names(workdirs))
  if ranking:
    table += "\n\n" + ranking
    notes.append("Rows `recommend row`: the recommend stage (W/recommend/metrics.json): for "
                 "each user with a liked test item, the index's candidates unseen before the "
                 "user's first test sample, ranked by index order, by the LLM's P(yes), and with "
                 "the liked candidates first (the oracle, the ceiling of any reranking), beside "
                 "the most popular unseen items; CIs: 95% bootstrap over users.")
  out = Path(out)
  paths = {name: out / name for name in ("report.md", "roc.png", "calibration.png",
                                          "auc_vs_k.png")}
  plot_roc(runs, rows, split, paths["roc.png"])
  plot_calibration(runs, rows, split, paths["calibration.png"], bins)
  plot_auc_vs_k(runs, rows, split, paths["auc_vs_k.png"])
  runs_list = [f"- `{label}`: `{run.workdir.resolve()}`" for label, run in zip(labels, runs)]
  text = "\n\n".join([
      f"# Results: {split} split", table, "\n".join(f"- {n}" for n in notes),
      "## Runs\n\n" + "\n".join(runs_list),
      "## Plots\n\n![ROC curves](roc.png)\n\n![Reliability diagram](calibration.png)\n\n"
      "![AUC against retrieval.k](auc_vs_k.png)"]) + "\n"
  atomic.write_text(paths["report.md"], text)
  return table, notes, list(paths.values())


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m rallrec_jax.report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", metavar="W", help="run workdirs to compare")
  parser.add_argument("--out", default="report", metavar="DIR",
                      help="output folder (default: ./report)")
  parser.add_argument("--baseline", default=None, metavar="W",
                      help="workdir the ΔAUC column compares against (default: the first)")
  parser.add_argument("--split", default="test", help="evaluated split to report (default: test)")
  parser.add_argument("--checkpoint", default="best", metavar="NAME",
                      help="evaluated checkpoint to report: best, latest, none, a step or "
                           "step-N (default: best, or the only one a run has)")
  parser.add_argument("--resamples", type=int, default=1000, metavar="N",
                      help="bootstrap resamples (default: 1000)")
  parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
  parser.add_argument("--bins", type=int, default=10, metavar="N",
                      help="reliability diagram bins per run (default: 10)")
  args = parser.parse_args(argv)
  if args.resamples < 1 or args.bins < 1:
    parser.error("--resamples and --bins must be at least 1")
  try:
    table, notes, paths = report(args.workdirs, args.out, args.split, args.baseline,
                                 args.resamples, args.seed, args.bins, args.checkpoint)
  except (ReportError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(table + "\n")
  print("\n".join(f"- {n}" for n in notes) + "\n")
  print("wrote:\n" + "\n".join(f"  {p}" for p in paths))


if __name__ == "__main__":
  main()
