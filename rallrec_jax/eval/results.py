"""Where evaluation results live: one folder per checkpoint choice under W/eval/.

  W/eval/{checkpoint}/{split}.json, {split}_predictions.npz, {split}_baselines.json

with {checkpoint} = best, latest, none, step-N, mean-A-B-... for the average of the weights of
steps A, B, ... (eval.checkpoint "mean:A,B,..."), or folder-<path>-<hash> for a checkpoint folder
of another run. Reading also accepts a workdir from before these folders, whose files sit in
W/eval/ itself. Plain files only, no JAX: the sweep launcher and `report` read it cheaply.
"""
import hashlib
import json
import re
from pathlib import Path

# eval.checkpoint values that name their own folder under eval/.
CHECKPOINT_WORDS = ("best", "latest", "none")
FOLDER_CHARS = 60  # characters of a checkpoint folder's path kept in its eval/ folder name
BASELINES_SUFFIX = "_baselines"  # {split}_baselines.json


MEAN_PREFIX = "mean:"  # eval.checkpoint "mean:64,96,128": the average of those steps' weights


def mean_steps(checkpoint):
  """The steps of an eval.checkpoint "mean:A,B,..." (sorted, distinct), else None.

  Raises ValueError when the list after "mean:" is not of step numbers.
  """
  choice = str(checkpoint)
  if not choice.startswith(MEAN_PREFIX):
    return None
  parts = choice[len(MEAN_PREFIX):].split(",")
  if not all(p.strip().isdigit() for p in parts):
    raise ValueError(f"{choice!r}: after {MEAN_PREFIX!r} give step numbers separated by commas")
  return sorted({int(p) for p in parts})


def checkpoint_name(checkpoint):
  """The folder under eval/ of an eval.checkpoint: best, latest, none, step-N for a step,
  mean-A-B-... for an average of steps, or folder-<its path, sanitised>-<hash of the path> for
  a checkpoint folder of another run."""
  choice = str(checkpoint)
  if choice in CHECKPOINT_WORDS:
    return choice
  if choice.isdigit():
    return f"step-{int(choice)}"
  steps = mean_steps(choice)
  if steps is not None:
    return "mean-" + "-".join(str(s) for s in steps)
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", choice).strip("._-")[-FOLDER_CHARS:]
  return f"folder-{safe}-{hashlib.sha256(choice.encode()).hexdigest()[:8]}"


def results_dir(workdir, checkpoint):
  """W/eval/{checkpoint_name(checkpoint)}: the results of evaluating one checkpoint choice."""
  return Path(workdir) / "eval" / checkpoint_name(checkpoint)


def _recorded_checkpoint(path):
  """The checkpoint an eval/{split}.json says it scored (best, the default, when it cannot)."""
  try:
    summary = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, ValueError):
    return "best"
  return summary.get("checkpoint", "best") if isinstance(summary, dict) else "best"


def _split_files(folder):
  """{split: path} of the {split}.json files in a results folder (baselines files excluded)."""
  return {p.stem: p for p in sorted(folder.glob("*.json")) if not p.stem.endswith(BASELINES_SUFFIX)}


def stored_results(workdir):
  """{checkpoint name: {split: path of its {split}.json}} of every evaluation in a workdir.

  A workdir written before results had a folder per checkpoint holds them in eval/ itself;
  each such file counts as the checkpoint it records, unless that checkpoint's folder has the
  split too.
  """
  root = Path(workdir) / "eval"
  if not root.is_dir():
    return {}
  found = {}
  for split, path in _split_files(root).items():
    found.setdefault(checkpoint_name(_recorded_checkpoint(path)), {})[split] = path
  for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
    for split, path in _split_files(folder).items():
      found.setdefault(folder.name, {})[split] = path
  return {name: splits for name, splits in found.items() if splits}


def choose(found, checkpoint="best"):
  """The key of `found` (from `stored_results`) to read for `checkpoint`, given as a choice
  (best, 16, a folder) or a folder name (step-16): that one, else for best the only one
  stored; None when there is neither."""
  for name in (str(checkpoint), checkpoint_name(checkpoint)):
    if name in found:
      return name
  if str(checkpoint) == "best" and len(found) == 1:
    return next(iter(found))
  return None
