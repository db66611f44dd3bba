"""A resumable fine-tuning loop (LoRA or full): AdamW, warmup, accumulation, checkpoints.

`fit` counts optimizer updates; each update consumes `grad_accum` batches. Everything a resumed
run needs to continue exactly (trained weights, optimizer and accumulator state, rng, the number
of examples consumed, the best evaluation so far) goes into every checkpoint, so stopping and
resuming gives the same weights as one uninterrupted run. `lora_cfg` None means full
fine-tuning (see `rallrec_jax.train.step`).
"""
import contextlib
import functools
import json
import logging
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
import optax

from rallrec_jax import atomic, parallel, progress
from rallrec_jax.llm import flops
from rallrec_jax.train import checkpoint, step as step_lib

log = logging.getLogger(__name__)


def schedule(lr, steps, warmup=0):
  """Linear warmup from 0 to `lr` over `warmup` updates, then linear decay to 0 at `steps`."""
  decay = optax.linear_schedule(lr, 0.0, max(steps - warmup, 1))
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(lr, steps, *, weight_decay=0.0, warmup=0, clip_norm=0.0, b1=0.9, b2=0.999,
                   eps=1e-8):
  """AdamW on `schedule`, after clipping the gradient's global norm to `clip_norm` (0: none)."""
  adamw = optax.adamw(schedule(lr, steps, warmup), b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay)
  if clip_norm <= 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


@functools.lru_cache(maxsize=8)
def _trainer(cfg, lora_cfg, steps, lr, weight_decay, grad_accum, warmup=0, loss="lm",
             answer_ids=None, clip_norm=0.0):
  """(optimizer, jitted step), cached so repeated runs of one setup compile once."""
  inner = make_optimizer(lr, steps, weight_decay=weight_decay, warmup=warmup, clip_norm=clip_norm)
  optimizer = optax.MultiSteps(inner, every_k_schedule=grad_accum)
  return optimizer, step_lib.make_train_step(cfg, lora_cfg, optimizer, loss, answer_ids)


def _fresh_state(lm, lora_cfg, optimizer, seed):
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
  weights = step_lib.initial_weights(init_rng, lm, lora_cfg)
  return step_lib.init_train_state(dropout_rng, weights, optimizer)


@contextlib.contextmanager
def _checkpoint_reader(lm, lora_cfg, checkpoint_dir):
  """Within: read(step) -> (trained weights, step) for "best", "latest" or an int step, from one
  manager and one abstract tree (the layout fresh weights of this model would have)."""
  mngr = checkpoint.manager(checkpoint_dir)
  try:
    meta = checkpoint.read_meta(mngr)
    abstract = checkpoint.abstract(step_lib.initial_weights(jax.random.PRNGKey(0), lm, lora_cfg))
    expect = checkpoint.compat(lm.cfg, lora_cfg)

    def read(step):
      if step == "best":
        step = meta["best_step"] if meta["best_step"] is not None else mngr.latest_step()
      elif step == "latest":
        step = mngr.latest_step()
      if step not in mngr.all_steps():
        raise FileNotFoundError(f"{checkpoint_dir}: no checkpoint at step {step} "
                                f"(have {sorted(mngr.all_steps())})")
      return checkpoint.restore_weights(mngr, abstract, step, expect=expect), int(step)

    yield read
  finally:
    mngr.close()


def restore_weights(lm, lora_cfg, checkpoint_dir, step="best"):
  """(trained weights, step) of a fine-tune checkpoint: "best", "latest" or an int step.

  Only the weights are read, into the layout fresh weights of this model would have.
  """
  with _checkpoint_reader(lm, lora_cfg, checkpoint_dir) as read:
    return read(step)


def restore_mean_weights(lm, lora_cfg, checkpoint_dir, steps):
  """The average of the trained weights of `steps` (summed in float32 on their devices, then
  cast to each leaf's dtype): checkpoint averaging, which smooths the noise of single updates
  out of one model."""
  total = dtypes = None
  with _checkpoint_reader(lm, lora_cfg, checkpoint_dir) as read:
    for step in steps:
      weights, _ = read(step)
      if total is None:
        dtypes = jax.tree.map(lambda x: x.dtype, weights)
        total = jax.tree.map(lambda x: x.astype(np.float32), weights)
      else:
        total = jax.tree.map(lambda t, x: t + x.astype(np.float32), total, weights)
  return jax.tree.map(lambda t, d: (t / len(steps)).astype(d), total, dtypes)


def _fresh_meta(lm, lora_cfg, steps, grad_accum):
  return {"position": 0, "best_step": None, "best_auc": None,
          "evals_without_improvement": 0, "done": False, "steps": steps,
          "grad_accum": grad_accum, **checkpoint.compat(lm.cfg, lora_cfg)}


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
  """Appends one JSON object per logged step to `path` (nothing when `path` is None)."""

  def __init__(self, path):
    self.path = None if path is None else Path(path)
    if self.path is not None:
      self.path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, record):
    if self.path is not None:
      with self.path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

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


def _update(step_fn, state, lm, batches, grad_accum, meta):
  """One optimizer update over `grad_accum` batches: (state, mean metrics, tokens)."""
  records, tokens = [], 0
  for _ in range(grad_accum):
    batch = next(batches, None)
    if batch is None:
      raise ValueError(f"train_batches_fn ran out of batches at example {meta['position']}")
    placed = {k: lm.place(np.asarray(v, np.int32)) for k, v in batch.items()}
    with parallel.activation_sharding(lm.mesh, lm.rules):
      state, metrics = step_fn(state, lm.params, placed)
    records.append(metrics)
    tokens += int(np.sum(batch["attention_mask"]))
    meta["position"] += len(batch["input_ids"])
  means = {k: float(np.mean([float(r[k]) for r in records])) for k in records[0]
           if k != "grad_norm"}
  return state, means, tokens


def _evaluate(eval_fn, weights, step, meta):
  """Run `eval_fn`, update the best step in `meta`; returns its result."""
  result = {k: float(v) for k, v in eval_fn(weights).items()}
  auc = result["auc"]
  improved = meta["best_auc"] is None or auc > meta["best_auc"]
  if improved:
    meta.update(best_step=step, best_auc=auc, evals_without_improvement=0)
  else:
    meta["evals_without_improvement"] += 1
  log.info("step %d: eval %s (best auc %.6f at step %d)", step, result, meta["best_auc"],
           meta["best_step"])
  return result


def _summary(status, step, meta, weights, loss=None):
  return {"status": status, "step": step, "examples_seen": meta["position"],
          "best_step": meta["best_step"], "best_auc": meta["best_auc"], "final_loss": loss,
          "weights": weights}


def _start(mngr, lm, lora_cfg, optimizer, seed, steps, grad_accum):
  """(state, meta, step): the newest checkpoint if there is one, else a fresh start."""
  state = _fresh_state(lm, lora_cfg, optimizer, seed)
  if checkpoint.latest_step(mngr) is None:
    return state, _fresh_meta(lm, lora_cfg, steps, grad_accum), 0
  state, meta = checkpoint.restore(mngr, checkpoint.abstract(state),
                                   expect=checkpoint.compat(lm.cfg, lora_cfg))
  step = int(state["step"]) // meta["grad_accum"]
  log.info("resuming from %s at step %d (%d examples seen)", mngr.directory, step,
           meta["position"])
  return state, meta, step


def fit(lm, lora_cfg, train_batches_fn, *, steps, lr=5e-4, weight_decay=0.0, grad_accum=1,
        warmup=0, clip_norm=0.0, loss="lm", answer_ids=None, checkpoint_dir, save_every,
        eval_fn=None, eval_every=None, patience=None, metrics_path=None, seed=0, progress=True):
  """Fine-tune `lm` for `steps` optimizer updates; returns a summary dict.

  `lora_cfg` is a LoraConfig (adapters) or None (every weight). `train_batches_fn(position)`
  yields dict batches of [B, T] "input_ids", "attention_mask", "loss_mask" and [B] "label"
  starting at example `position`, the same ones every time, so a run resumed from
  `checkpoint_dir` continues on the data it would have seen. `clip_norm` > 0 clips each
  update's (accumulated) gradient to that global norm. `loss` and `answer_ids` are those
  of `step.make_train_step`. `eval_fn(weights)` returns a dict with "auc"; the best step is kept
  and, with `patience`, training stops after that many evaluations without improvement.
  SIGTERM saves a checkpoint and returns status "preempted".
  """
  answer_ids = None if answer_ids is None else tuple(int(i) for i in answer_ids)
  optimizer, step_fn = _trainer(lm.cfg, lora_cfg, steps, lr, weight_decay, grad_accum, warmup,
                                loss, answer_ids, float(clip_norm))
  mngr = checkpoint.manager(checkpoint_dir)
  try:
    state, meta, step = _start(mngr, lm, lora_cfg, optimizer, seed, steps, grad_accum)
    if meta["done"] or step >= steps:
      log.warning("TRAINING ALREADY COMPLETE: %s holds step %d of %d; nothing to train",
                  checkpoint_dir, step, steps)
      return _summary("already_complete", step, meta, state["weights"])
    metrics = _Metrics(metrics_path)
    metrics.keep_until(step)
    with _sigterm_flag() as preempted:
      return _train(lm, step_fn, state, meta, step, mngr, train_batches_fn, preempted,
                    dict(steps=steps, lr=lr, warmup=warmup, grad_accum=grad_accum,
                         full=lora_cfg is None,
                         save_every=save_every,
                         eval_fn=eval_fn, eval_every=eval_every, patience=patience,
                         metrics=metrics, progress=progress))
  finally:
    mngr.close()


def _train(lm, step_fn, state, meta, step, mngr, train_batches_fn, preempted, opts):
  """The loop proper, from `step` to the end, an early stop or a preemption."""
  steps, lr_at = opts["steps"], schedule(opts["lr"], opts["steps"], opts["warmup"])
  # Matmul FLOPs only (the attention term depends on each batch's length): a lower bound.
  per_token = (flops.full_train_flops_per_token if opts["full"]
               else flops.lora_train_flops_per_token)(lm.cfg, 0)
  batches = iter(train_batches_fn(meta["position"]))
  bar = progress.bar(total=steps, initial=step, disable=not opts["progress"],
                     desc="full" if opts["full"] else "lora")
  start, first, loss, status = time.perf_counter(), step, None, "complete"
  while step < steps:
    tick = time.perf_counter()
    state, means, tokens = _update(step_fn, state, lm, batches, opts["grad_accum"], meta)
    loss = means["loss"]
    step += 1
    now = time.perf_counter()
    tokens_per_s = tokens / max(now - tick, 1e-9)
    record = {"step": step, **means, "lr": float(lr_at(step - 1)),
              "tokens_per_s": tokens_per_s, "mfu": flops.mfu(per_token, tokens_per_s),
              "examples_seen": meta["position"],
              "eta_s": (now - start) / (step - first) * (steps - step)}
    if opts["eval_fn"] is not None and (step == steps or (opts["eval_every"]
                                                          and step % opts["eval_every"] == 0)):
      record["eval"] = _evaluate(opts["eval_fn"], state["weights"], step, meta)
    opts["metrics"].write(record)
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}")
    if opts["patience"] and meta["evals_without_improvement"] >= opts["patience"]:
      status = "early_stopped"
      log.info("step %d: no improvement in %d evaluations, stopping", step, opts["patience"])
      break
    if preempted.is_set():
      status = "preempted"
      log.warning("step %d: SIGTERM received, saving a checkpoint and stopping", step)
      break
    if step % opts["save_every"] == 0 and step < steps:
      checkpoint.save(mngr, step, state, meta)
  bar.close()
  meta["done"] = status != "preempted"
  checkpoint.save(mngr, step, state, meta)
  return _summary(status, step, meta, state["weights"], loss)
