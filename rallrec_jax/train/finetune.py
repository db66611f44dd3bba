"""Fine-tuning of the language model (LoRA or full) on `loop.fit`: AdamW with warmup, gradient
accumulation, per-layer checkpoints, and reading trained weights back.

`fit` counts optimizer updates; each update consumes `grad_accum` batches. `lora_cfg` None
means full fine-tuning (see `rallrec_jax.train.step`).
"""
import contextlib
import functools
import itertools

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rallrec_jax import parallel
from rallrec_jax.llm import flops, lora, number_line as number_line_lib
from rallrec_jax.train import checkpoint, layout as layout_lib, loop, step as step_lib


def schedule(lr, steps, warmup=0):
  """Linear warmup from 0 to `lr` over `warmup` updates, then linear decay to 0 at `steps`."""
  decay = optax.linear_schedule(lr, 0.0, max(steps - warmup, 1))
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(lr, steps, *, weight_decay=0.0, warmup=0, clip_norm=0.0, b1=0.9, b2=0.999,
                   eps=1e-8, number_line=None):
  """AdamW on `schedule`, after clipping the gradient's global norm to `clip_norm` (0: none);
  `number_line` (token ids, positions) keeps those embedding rows on their line."""
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(optax.adamw(schedule(lr, steps, warmup), b1=b1, b2=b2, eps=eps,
                           weight_decay=weight_decay))
  if number_line:
    parts.append(number_line_lib.keep_on_line(*number_line))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


@functools.lru_cache(maxsize=8)
def _trainer(cfg, lora_cfg, steps, lr, weight_decay, grad_accum, warmup=0, loss="lm",
             answer_ids=None, clip_norm=0.0, number_line=None):
  """(optimizer, jitted step), cached so repeated runs of one setup compile once."""
  inner = make_optimizer(lr, steps, weight_decay=weight_decay, warmup=warmup, clip_norm=clip_norm,
                         number_line=number_line)
  optimizer = optax.MultiSteps(inner, every_k_schedule=grad_accum)
  return optimizer, step_lib.make_train_step(cfg, lora_cfg, optimizer, loss, answer_ids)


def _fresh_state(lm, lora_cfg, optimizer, seed):
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
  weights = step_lib.initial_weights(init_rng, lm, lora_cfg)
  return step_lib.init_train_state(dropout_rng, weights, optimizer)


def abstract_weights(lm, lora_cfg):
  """Shapes, dtypes and shardings of the trained weights, none of them computed: the float32
  params' (full fine-tuning) or those of adapters created into their shardings (LoRA)."""
  if lora_cfg is None:
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, np.float32, sharding=p.sharding),
                        lm.params)
  return lora.abstract(lm.cfg, lora_cfg, lm.mesh, lm.rules)


def abstract_state(lm, lora_cfg, optimizer):
  """The layout of `_fresh_state` (what a checkpoint is restored into), the optimizer state's
  shapes from `jax.eval_shape`: nothing is allocated."""
  weights = abstract_weights(lm, lora_cfg)
  sharding = jax.tree.leaves(weights)[0].sharding
  mesh = (sharding.mesh if isinstance(sharding, NamedSharding)
          else parallel.make_mesh((("data", 1),), jax.devices()[:1]))
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  state = {"weights": weights, "opt_state": jax.eval_shape(optimizer.init, weights),
           "step": jax.ShapeDtypeStruct((), np.int32), "rng": rng}
  return jax.tree.map(lambda x: _on_mesh(x, mesh), state)


def _on_mesh(leaf, mesh):
  """`leaf` laid out on `mesh`: with its own partition spec if it has one, else replicated."""
  spec = leaf.sharding.spec if isinstance(leaf.sharding, NamedSharding) else PartitionSpec()
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))


@contextlib.contextmanager
def _checkpoint_reader(lm, lora_cfg, checkpoint_dir):
  """Within: read(step) -> (trained weights, step) for "best", "latest" or an int step, from one
  manager and one abstract tree (the layout fresh weights of this model would have)."""
  mngr = checkpoint.manager(checkpoint_dir)
  try:
    meta = checkpoint.read_meta(mngr)
    target = {"weights": abstract_weights(lm, lora_cfg)}
    layout = layout_lib.PerLayer(lm.cfg, lora_cfg)

    def read(step):
      if step == "best":
        step = meta["best_step"] if meta["best_step"] is not None else mngr.latest_step()
      elif step == "latest":
        step = mngr.latest_step()
      if step not in mngr.all_steps():
        raise FileNotFoundError(f"{checkpoint_dir}: no checkpoint at step {step} "
                                f"(have {sorted(mngr.all_steps())})")
      return checkpoint.restore_partial(mngr, target, step, layout)["weights"], int(step)

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


def _groups(batches, size):
  """Consecutive lists of `size` batches; a short last one is left out."""
  while len(group := list(itertools.islice(batches, size))) == size:
    yield group


def fit(lm, lora_cfg, train_batches_fn, *, steps, lr=5e-4, weight_decay=0.0, grad_accum=1,
        warmup=0, clip_norm=0.0, loss="lm", answer_ids=None, checkpoint_dir, save_every,
        eval_fn=None, eval_every=None, patience=None, metrics_path=None, seed=0, progress=True,
        number_line=None):
  """Fine-tune `lm` for `steps` optimizer updates; returns a summary dict.

  `lora_cfg` is a LoraConfig (adapters) or None (every weight). `train_batches_fn(position)`
  yields dict batches of [B, T] "input_ids", "attention_mask", "loss_mask" and [B] "label"
  starting at example `position`, the same ones every time, so a run resumed from
  `checkpoint_dir` continues on the data it would have seen. `clip_norm` > 0 clips each
  update's (accumulated) gradient to that global norm. `loss` and `answer_ids` are those
  of `step.make_train_step`. `eval_fn(weights)` returns a dict with "auc"; the best step is kept
  and, with `patience`, training stops after that many evaluations without improvement.
  SIGTERM saves a checkpoint and raises `Preempted`. `number_line` (token ids, positions in
  [0, 1]) keeps those embedding rows on one line (`rallrec_jax.llm.number_line`; full
  fine-tuning only, the embedding being frozen under LoRA).
  """
  answer_ids = None if answer_ids is None else tuple(int(i) for i in answer_ids)
  if number_line is not None:
    if lora_cfg is not None:
      raise ValueError("number_line keeps embedding rows on a line: it needs full fine-tuning")
    number_line = tuple(tuple(np.asarray(a).tolist()) for a in number_line)
  optimizer, step_fn = _trainer(lm.cfg, lora_cfg, steps, lr, weight_decay, grad_accum, warmup,
                                loss, answer_ids, float(clip_norm), number_line)
  lr_at = schedule(lr, steps, warmup)
  # Matmul FLOPs only (the attention term depends on each batch's length): a lower bound.
  per_token = (flops.full_train_flops_per_token if lora_cfg is None
               else flops.lora_train_flops_per_token)(lm.cfg, 0)

  def update(state, batch):
    placed = {k: lm.place(np.asarray(v, np.int32)) for k, v in batch.items()}
    with parallel.activation_sharding(lm.mesh, lm.rules):
      state, metrics = step_fn(state, lm.params, placed)
    return state, {k: v for k, v in metrics.items() if k != "grad_norm"}

  def record(step, batches, seconds):
    tokens_per_s = sum(int(np.sum(b["attention_mask"])) for b in batches) / max(seconds, 1e-9)
    return {"lr": float(lr_at(step - 1)), "tokens_per_s": tokens_per_s,
            "mfu": flops.mfu(per_token, tokens_per_s)}

  opts = loop.Options(steps=steps, checkpoint_dir=checkpoint_dir, save_every=save_every,
                      eval_every=eval_every or 0, metric="auc", patience=patience or 0,
                      metrics_path=metrics_path, progress=progress,
                      desc="full" if lora_cfg is None else "lora")
  result = loop.fit(
      lambda: _fresh_state(lm, lora_cfg, optimizer, seed), update,
      lambda position: _groups(iter(train_batches_fn(position)), grad_accum), opts,
      evaluate=None if eval_fn is None else lambda state: eval_fn(state["weights"]),
      abstract=lambda: abstract_state(lm, lora_cfg, optimizer),
      layout=layout_lib.PerLayer(lm.cfg, lora_cfg), record=record)
  return {"status": result.status, "step": result.step, "examples_seen": result.position,
          "best_step": result.best_step, "best_auc": result.best_value,
          "final_loss": result.loss, "weights": result.state["weights"]}
