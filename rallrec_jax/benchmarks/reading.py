"""How much of the LLM's score is a linear reading of the numbers its prompt states.

The fine-tuned model's logit log(p / (1 - p)) is fitted by least squares on the prompt's stated
features (`features`: the target's like-rate when the prompt states it, the K shown ratings by
position, which of the K slots are filled, and which are marked close to the target when the
prompt marks them) on one split, the validation split in `read`. On each
split the AUCs of the logit, of its fitted linear part and of the rest tell whether the model
adds anything to a linear reading of its prompt or only noise; the share of the rest's variance
that lies between target items and between users says where that rest comes from (chance is
about groups / rows).
"""
from pathlib import Path

import numpy as np

from rallrec_jax import data, report
from rallrec_jax.eval import metrics, results
from rallrec_jax.prompts import item_stats, render
from rallrec_jax.retrieval import history

EPS = 1e-6


def features(dataset, result, split, samples, like_rate=True, close=None):
  """[N, F] stated features of a split's samples: like-rate (if `like_rate`), then the K shown
  ratings by position (0 where a slot is empty), then K filled flags, then (with `close`,
  `render.close_option`) K close marks and the K shown ratings of the marked slots."""
  rows = history.take(result, samples)
  ratings = np.nan_to_num(render.history_ratings(dataset, split, rows), nan=0.0)
  columns = [ratings, (np.asarray(rows["history"]) >= 0).astype(np.float64)]
  if like_rate:
    columns.insert(0, item_stats.target_rates(dataset, split, samples)[:, None])
  if close is not None:
    marks = render.close_marks(close, rows["history"], rows["target"])
    columns += [marks.astype(np.float64), ratings * marks]
  return np.concatenate(columns, axis=1)


def fit_linear(x, y):
  """Least-squares weights [F + 1] (intercept last) of y on x."""
  design = np.column_stack([x, np.ones(len(x))])
  return np.linalg.lstsq(design, y, rcond=None)[0]


def predict_linear(weights, x):
  return x @ weights[:-1] + weights[-1]


def between_share(values, groups):
  """Share of the variance of `values` that lies between the means of `groups`."""
  centred = values - values.mean()
  _, index = np.unique(groups, return_inverse=True)
  means = np.bincount(index, centred) / np.bincount(index)
  total = np.sum(centred ** 2)
  return float(np.sum(means[index] ** 2) / total) if total > 0 else 0.0


def decompose(weights, x, logit, label, groups):
  """Metrics of one split given linear `weights` fitted elsewhere; `groups` is {name: [N]}."""
  linear = predict_linear(weights, x)
  rest = logit - linear
  variance = np.var(logit)
  row = {"auc": metrics.auc(label, logit), "linear_auc": metrics.auc(label, linear),
         "rest_auc": metrics.auc(label, rest),
         "r2": float(1 - np.var(rest) / variance) if variance > 0 else 0.0, "n": len(label)}
  for name, group in groups.items():
    row[f"rest_share_{name}"] = between_share(rest, group)
    row[f"chance_{name}"] = len(np.unique(group)) / len(group)
  return row


def read(workdir, checkpoint="best", fit_split="valid", splits=("valid", "test")):
  """One dict per split of `decompose` for the workdir's predictions of `checkpoint` (as
  eval.checkpoint: best, latest, a step, ...), the linear part fitted on `fit_split`."""
  workdir = Path(workdir)
  folder = results.results_dir(workdir, checkpoint)
  names = tuple(dict.fromkeys((fit_split, *splits)))
  for split in names:
    path = folder / f"{split}_predictions.npz"
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no predictions; run the evaluate stage with "
                              f"eval.checkpoint={checkpoint} and {split} in eval.splits")
  dataset = data.load_dataset(workdir)
  runs = {split: report.load_run(workdir, split, checkpoint) for split in names}
  wording = runs[fit_split].config  # one workdir, one fine-tune: the same prompts on every split
  like_rate = bool(wording.get("finetune.item_stats", False))
  close = render.close_option({"mark_close": wording.get("finetune.mark_close", 0.0)},
                              workdir / "embeddings" / "mixed.npy")
  loaded = {}
  for split, run in runs.items():
    result = history.load(workdir / "retrieval" / f"{split}.npz")
    p = np.clip(run.score, EPS, 1 - EPS)
    loaded[split] = (features(dataset, result, split, run.sample, like_rate, close),
                     np.log(p / (1 - p)),
                     run.label, {"target": dataset.splits[split].target[run.sample],
                                 "user": dataset.splits[split].user[run.sample]})
  weights = fit_linear(*loaded[fit_split][:2])
  return [dict(split=split, fit_split=fit_split, checkpoint=checkpoint,
               **decompose(weights, *loaded[split])) for split in splits]
