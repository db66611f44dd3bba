"""The resumable training loop that every trainer of the package runs (LightGCN, the alignment,
the fine-tune): steps, evaluation, model selection, early stopping, checkpoints, SIGTERM.

A step consumes one group of batches (an epoch of LightGCN or of the alignment, `grad_accum`
batches of the fine-tune) and logs the mean of the step function's metrics over them.
Everything a resumed run needs to continue exactly (the state, the number of examples consumed,
the best evaluation so far) goes into every checkpoint; with batches that are a function of that
position, stopping and resuming gives the same state as one uninterrupted run.

  result = fit(init, step, batches, Options(steps=10, metric="auc"), evaluate=evaluate)
"""
import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from rallrec_jax import atomic, progress as progress_lib
from rallrec_jax.stage import Preempted
from rallrec_jax.train import checkpoint

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Options:
  """How long to train, when to evaluate and save, and what picks the best step."""
  steps: int
  checkpoint_dir: Any = None       # None: no checkpoints, and no resume
  save_every: int = 1              # steps between checkpoints; the last step is always saved
  max_to_keep: int | None = None   # None: every checkpoint (the best may lie far back)
  eval_every: int = 1              # steps between evaluations (0: after the last step only)
  metric: str | None = None        # the evaluation result that selects the best step
  mode: str = "max"                # "max" or "min": which way `metric` improves
  patience: int = 0                # evaluations without improvement before stopping (0: never)
  metrics_path: Any = None         # JSON lines, one record per step (None: none written)
  log_every: int = 0               # steps between log lines of the record (0: none)
  progress: bool = True
  desc: str = "train"
  unit: str = "step"

  def __post_init__(self):
    if self.mode not in ("max", "min"):
      raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")


class Result(NamedTuple):
  status: str             # "complete", "early_stopped" or "already_complete"
  step: int
  state: Any
  position: int           # examples consumed
  best_step: int | None
  best_value: float | None
  loss: float | None      # of the last step this call ran
  history: list           # the records of every step (read back from `metrics_path` on resume)


class _Best(NamedTuple):
  step: int | None = None
  value: float | None = None
  stale: int = 0          # evaluations since the best


def fit(init, step_fn, batches, opts, *, evaluate=None, abstract=None,
        layout=checkpoint.PLAIN, record=None):
  """Train from `init()` (or the newest checkpoint of `opts.checkpoint_dir`) to `opts.steps`.

  `step_fn(state, batch) -> (state, metrics)`; `batches(position)` yields, step after step, the
  batches of one step (an iterable of pytrees whose leaves have one row per example), starting
  at example `position`, the same ones every time. `evaluate(state)` returns a dict with
  `opts.metric`. `abstract()` gives the shapes, dtypes and shardings a checkpoint is restored
  into (default: `jax.eval_shape(init)`, on the default device). `record(step, batches,
  seconds)` adds fields to each step's record. SIGTERM ends the step under way, saves a
  checkpoint and raises `Preempted`.
  """
  mngr = checkpoint.manager(opts.checkpoint_dir, opts.max_to_keep) if opts.checkpoint_dir else None
  try:
    state, step, meta = _start(mngr, init, abstract or (lambda: jax.eval_shape(init)), layout)
    best = _Best(meta.get("best_step"), meta.get("best_value"),
                 meta.get("evals_without_improvement", 0))
    position = meta.get("position", 0)
    metrics = _Metrics(opts.metrics_path)
    if step >= opts.steps or meta.get("early_stopped"):
      log.warning("TRAINING ALREADY COMPLETE: %s holds step %d of %d; nothing to train",
                  opts.checkpoint_dir, step, opts.steps)
      return Result("already_complete", step, state, position, best.step, best.value, None,
                    metrics.read())
    metrics.keep_until(step)
    with _sigterm_flag() as preempted:
      run = _Run(step_fn, batches, evaluate, record, opts, mngr, layout)
      return run.train(state, step, position, best, metrics.read(), metrics, preempted)
  finally:
    if mngr is not None:
      mngr.close()


def _start(mngr, init, abstract, layout):
  """(state, step, meta): the newest checkpoint if there is one, else a fresh start."""
  if mngr is None or mngr.latest_step() is None:
    return init(), 0, {}
  state, meta = checkpoint.restore(mngr, abstract(), layout=layout)
  step = int(mngr.latest_step())
  log.info("resuming from %s at step %d (%d examples seen)", mngr.directory, step,
           meta["position"])
  return state, step, meta


class _Run:
  """The loop proper, with what does not change from one step to the next."""

  def __init__(self, step_fn, batches, evaluate, record, opts, mngr, layout):
    self.step_fn, self.batches, self.evaluate, self.record = step_fn, batches, evaluate, record
    self.opts, self.mngr, self.layout = opts, mngr, layout

  def train(self, state, step, position, best, history, metrics, preempted):
    """From `step` to the end, an early stop or a preemption; a Result or Preempted."""
    opts = self.opts
    groups = iter(self.batches(position))
    bar = progress_lib.bar(total=opts.steps, initial=step, disable=not opts.progress,
                           desc=opts.desc, unit=opts.unit)
    start, first, loss, status = time.perf_counter(), step, None, "complete"
    while step < opts.steps:
      tick = time.perf_counter()
      group = next(groups, None)
      if group is None:
        raise ValueError(f"{opts.desc}: the batches ran out at example {position}")
      state, means, used = _step(self.step_fn, state, group)
      position += sum(len(jax.tree.leaves(batch)[0]) for batch in used)
      loss, step = means.get("loss"), step + 1
      now = time.perf_counter()
      extra = self.record(step, used, now - tick) if self.record else {}
      row = {"step": step, **means, **extra, "examples_seen": position,
             "eta_s": (now - start) / (step - first) * (opts.steps - step)}
      if self.evaluate is not None and (step == opts.steps or (opts.eval_every and
                                                               step % opts.eval_every == 0)):
        row["eval"], best = _evaluate(self.evaluate, state, step, best, opts)
      metrics.write(row)
      history.append(row)
      bar.update(1)
      if loss is not None:
        bar.set_postfix(loss=f"{loss:.4f}")
      if opts.log_every and (step % opts.log_every == 0 or step == opts.steps):
        log.info("%s %s %d: %s", opts.desc, opts.unit, step, _line(row))
      if opts.patience and best.stale >= opts.patience:
        status = "early_stopped"
        log.info("%s step %d: no improvement in %d evaluations, stopping", opts.desc, step,
                 opts.patience)
        break
      if preempted.is_set():
        status = "preempted"
        log.warning("%s step %d: SIGTERM received, saving a checkpoint and stopping", opts.desc,
                    step)
        break
      if step % opts.save_every == 0 and step < opts.steps:
        self._save(step, state, position, best, False)
    bar.close()
    self._save(step, state, position, best, status == "early_stopped")
    if status == "preempted":
      saved = f"checkpoint saved in {opts.checkpoint_dir}" if self.mngr else "no checkpoint"
      raise Preempted(f"stopped by SIGTERM at step {step}, {saved}; rerun the same command to "
                      f"{'resume' if self.mngr else 'start again'}")
    return Result(status, step, state, position, best.step, best.value, loss, history)

  def _save(self, step, state, position, best, early_stopped):
    if self.mngr is None:
      return
    meta = {"position": position, "best_step": best.step, "best_value": best.value,
            "metric": self.opts.metric, "evals_without_improvement": best.stale,
            "early_stopped": early_stopped, "steps": self.opts.steps}
    checkpoint.save(self.mngr, step, state, meta, self.layout)


def _step(step_fn, state, group):
  """(state, mean metrics, batches) of one step over a group of batches.

  The metrics are fetched once, at the end, so the steps are dispatched without waiting.
  """
  used, records = [], []
  for batch in group:
    state, metrics = step_fn(state, batch)
    used.append(batch)
    records.append(metrics)
  if not used:
    raise ValueError("a step needs at least one batch")
  records = jax.device_get(records)
  return state, {k: float(np.mean([r[k] for r in records])) for k in records[0]}, used


def _evaluate(evaluate, state, step, best, opts):
  """(evaluation result, best so far) after evaluating `state` at `step`."""
  result = {k: float(v) for k, v in evaluate(state).items()}
  value = result[opts.metric]
  improved = best.value is None or (value > best.value if opts.mode == "max"
                                    else value < best.value)
  best = _Best(step, value, 0) if improved else best._replace(stale=best.stale + 1)
  log.info("%s step %d: eval %s (best %s %.6f at step %d)", opts.desc, step, result,
           opts.metric, best.value, best.step)
  return result, best


def _line(row):
  flat = {k: v for k, v in row.items() if k not in ("step", "eval")} | row.get("eval", {})
  return " ".join(f"{k}={v:.4g}" for k, v in flat.items())


@contextlib.contextmanager
def _sigterm_flag():
  """Within: SIGTERM sets the yielded event instead of killing the process mid-write."""
  flag = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


class _Metrics:
  """Appends one JSON object per step to `path` (nothing when `path` is None)."""

  def __init__(self, path):
    self.path = None if path is None else Path(path)
    if self.path is not None:
      self.path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, record):
    if self.path is not None:
      with self.path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

  def read(self):
    """The records written so far (none without a file)."""
    if self.path is None or not self.path.is_file():
      return []
    lines = self.path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if _record_step(line) != float("inf")]

  def keep_until(self, step):
    """Drop the records after `step` and any torn line, so a resumed run logs each step once.

    A run killed after its last checkpoint has logged steps that the resumed run repeats. The
    kept lines go to a temporary file that replaces the old one, so a kill here loses nothing.
    """
    if self.path is None or not self.path.is_file():
      return
    text = self.path.read_text(encoding="utf-8")
    lines = text.splitlines()
    kept = [line for line in lines if _record_step(line) <= step]
    torn_end = bool(text) and not text.endswith("\n")
    if kept != lines or torn_end:
      atomic.write_text(self.path, "".join(line + "\n" for line in kept))
      log.info("%s: dropped %d records after step %d, where training resumes", self.path,
               len(lines) - len(kept), step)


def _record_step(line):
  """The step of a metrics line; infinite for a torn line, which is never kept."""
  try:
    record = json.loads(line)
  except ValueError:
    return float("inf")
  step = record.get("step") if isinstance(record, dict) else None
  return step if isinstance(step, int) else float("inf")
