"""What a run prints at its end: the results table of a checkpoint's rows per split with its
baselines below, and a closing line saying where the results are and how to report them."""
import json
import shlex

from rallrec_jax.eval import baselines, metrics, results


def _number(value):
  return "-" if value is None else f"{value:.4f}"


def results_table(workdir, checkpoint="best"):
  """A text table of the workdir's evaluation of `checkpoint` (best, else the only one stored;
  "" when there is none): each split's eval/{checkpoint}/{split}.json row, naming the
  checkpoint, followed by its {split}_baselines.json rows with AUC(LLM) - AUC(baseline)."""
  stored = results.stored_results(workdir)
  name = results.choose(stored, checkpoint)
  if name is None:
    return ""
  lines = []
  for split, path in sorted(stored[name].items()):
    m = json.loads(path.read_text())
    lines.append((split, m, metrics.checkpoint_label(m.get("checkpoint"), m.get("step"))))
    extra = baselines.path(path.parent, split)
    if extra.is_file():
      lines += _baseline_lines(json.loads(extra.read_text()))
  width = max(6, *(len(label) for label, _, _ in lines))
  rows = [f"{label:<{width}} {m['auc']:.4f}  {_number(m['logloss']):>7}  "
          f"{_number(m.get('logloss_calibrated')):>10}  {_number(m['acc']):>6}  {m['n']:>6}  "
          f"{last}" for label, m, last in lines]
  header = f"{'split':<{width}} AUC     LogLoss  calibrated  ACC     n       checkpoint"
  return "\n".join([header] + rows)


def closing_line(workdir, checkpoint="best"):
  """Where the evaluation that `results_table` shows lies and the command that reports it, or
  that the workdir holds none of `checkpoint` yet."""
  stored = results.stored_results(workdir)
  name = results.choose(stored, checkpoint)
  if name is None:
    return (f"results: no evaluation of eval.checkpoint={checkpoint} in {workdir} yet "
            "(run --stages evaluate)")
  folder = next(iter(stored[name].values())).parent
  command = ["rallrec-report", str(workdir)]
  if results.choose(stored) != name:
    command += ["--checkpoint", name]
  if "test" not in stored[name]:
    command += ["--split", min(stored[name])]
  return f"results: {folder}/ ; report: {shlex.join(command)}"


def _baseline_lines(table):
  """(label, metrics, last column) of each baseline of a {split}_baselines.json table."""
  lines = []
  for name, b in table.items():
    low, high = b["auc_diff_ci"]
    rank = b.get("spearman_llm")
    lines.append((f"  baseline: {baselines.TITLES.get(name, name)}", b,
                  f"LLM minus it {b['auc_diff']:+.4f} [{low:+.4f}, {high:+.4f}]"
                  + ("" if rank is None else f", rank corr. with LLM {rank:+.2f}")))
  return lines
