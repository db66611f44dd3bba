"""Self-supervised alignment of an item's text and collaborative views (RALLRec step 4).

The paper aligns the two views without publishing its objective; this module uses symmetric
InfoNCE. Each view has its own 2-layer MLP into a shared `out_dim` space, and the outputs are
L2-normalised. In a batch of items, the text projection of item i must pick out the CF
projection of item i among the batch, and the CF projection must pick out the text one. The
other items in the batch serve as negatives. The joint embedding of an item is the
L2-normalised mean of its two normalised projections, so both views count equally and the
result lies on the same unit sphere as each projection.

Inputs are standardised per feature with the mean and std of the train-period items only.
These statistics sit in params["norm"], so `joint` reuses them, and the optimiser never
updates them. Only train-period items feed the updates. Held-out items are used only to
measure how well the two views retrieve each other.

  params, history = train(text, cf, train_items, heldout_items, hidden=256, out_dim=64,
                          temperature=0.15)
  z = joint(params, text, cf)          # [N, out_dim], unit rows
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rallrec_jax.train import loop

LOG_EVERY = 10  # epochs between log lines (every epoch is in the returned history)


def init(rng, text_dim, cf_dim, hidden=256, out_dim=64):
  """One MLP per view, plus identity standardisation until `train` fits it."""
  text_rng, cf_rng = jax.random.split(rng)
  return {
      "text": _init_mlp(text_rng, text_dim, hidden, out_dim),
      "cf": _init_mlp(cf_rng, cf_dim, hidden, out_dim),
      "norm": {
          "text_mean": jnp.zeros(text_dim), "text_std": jnp.ones(text_dim),
          "cf_mean": jnp.zeros(cf_dim), "cf_std": jnp.ones(cf_dim),
      },
  }


def project(params, text, cf):
  """(zt, zc): both views standardised, projected and L2-normalised, [N, out_dim] each."""
  norm = params["norm"]
  zt = _mlp(params["text"], (text - norm["text_mean"]) / norm["text_std"])
  zc = _mlp(params["cf"], (cf - norm["cf_mean"]) / norm["cf_std"])
  return _l2_normalise(zt), _l2_normalise(zc)


_project_jit = jax.jit(project)


def info_nce(zt, zc, temperature):
  """Mean of the text->cf and cf->text cross-entropies; row i's positive is column i."""
  logits = zt @ zc.T / temperature
  text_to_cf = -jnp.mean(jnp.diag(jax.nn.log_softmax(logits, axis=1)))
  cf_to_text = -jnp.mean(jnp.diag(jax.nn.log_softmax(logits, axis=0)))
  return 0.5 * (text_to_cf + cf_to_text)


def loss(params, batch, temperature):
  """InfoNCE of a batch {"text": [B, dt], "cf": [B, dc]} whose rows are the same items."""
  zt, zc = project(params, batch["text"], batch["cf"])
  return info_nce(zt, zc, temperature)


def joint(params, text, cf):
  """The joint embedding: normalised mean of the two normalised projections, float32 [N, d]."""
  zt, zc = _project_jit(params, jnp.asarray(text, jnp.float32), jnp.asarray(cf, jnp.float32))
  return np.asarray(_l2_normalise(zt + zc), np.float32)


def top1(zt, zc):
  """Cross-view top-1 accuracy: how often an item's nearest other-view vector is its own.

  Averages the cf->text and text->cf directions; chance is 1 / N. Rows are compared in
  chunks so that a large held-out set never needs its full [N, N] similarity matrix.
  """
  zt, zc = np.asarray(zt, np.float32), np.asarray(zc, np.float32)
  if len(zt) == 0:
    return float("nan")
  return 0.5 * (_hit_rate(zc, zt) + _hit_rate(zt, zc))


def train(text, cf, train_items, heldout_items, *, hidden=256, out_dim=64, temperature=0.15,
          lr=1e-3, weight_decay=1e-4, batch_size=256, epochs=100, seed=0, progress=True):
  """Fit the two projections on the train items; returns (params, history).

  `text` [N, dt] and `cf` [N, dc] hold one row per item; `train_items` and `heldout_items`
  are disjoint row indices. Each epoch shuffles the train items and drops the last partial
  batch: a fixed batch shape keeps a single compiled step and the same number of negatives
  in every batch. `history` has one entry per epoch: {"epoch", "loss" (mean train batch
  loss), "heldout_top1"} (`top1` among the held-out items, NaN when there are none).
  """
  text, cf = np.asarray(text, np.float32), np.asarray(cf, np.float32)
  train_items, heldout_items = _check_inputs(text, cf, train_items, heldout_items, temperature)
  weights = init(jax.random.PRNGKey(seed), text.shape[1], cf.shape[1], hidden, out_dim)
  del weights["norm"]
  norm = _fit_norm(text[train_items], cf[train_items])
  opt_state = _optimizer(lr, weight_decay).init(weights)
  hyper = {"temperature": temperature, "lr": lr, "weight_decay": weight_decay}
  batch_size = min(batch_size, len(train_items))
  per_epoch = len(train_items) // batch_size * batch_size

  def step(state, batch):
    weights, opt_state, value = _step(state["weights"], state["opt"], norm, batch, **hyper)
    return {"weights": weights, "opt": opt_state}, {"loss": value}

  def epochs_from(position):
    order_rng = np.random.default_rng(seed)
    for epoch in itertools.count():
      order = order_rng.permutation(train_items)
      if epoch >= position // per_epoch:
        yield ({"text": text[rows], "cf": cf[rows]} for rows in _batches(order, batch_size))

  def evaluate(state):
    zt, zc = _project_jit({**state["weights"], "norm": norm}, text[heldout_items],
                          cf[heldout_items])
    return {"heldout_top1": top1(zt, zc)}

  opts = loop.Options(steps=epochs, metric="heldout_top1", log_every=LOG_EVERY,
                      progress=progress, desc="align", unit="epoch")
  result = loop.fit(lambda: {"weights": weights, "opt": opt_state}, step, epochs_from, opts,
                    evaluate=evaluate)
  history = [{"epoch": r["step"], "loss": r["loss"], "heldout_top1": r["eval"]["heldout_top1"]}
             for r in result.history]
  return {**result.state["weights"], "norm": norm}, history


def _init_mlp(rng, in_dim, hidden, out_dim):
  """Two dense layers with LeCun-normal weights and zero biases."""
  rng1, rng2 = jax.random.split(rng)
  return {
      "w1": jax.random.normal(rng1, (in_dim, hidden)) / np.sqrt(in_dim),
      "b1": jnp.zeros(hidden),
      "w2": jax.random.normal(rng2, (hidden, out_dim)) / np.sqrt(hidden),
      "b2": jnp.zeros(out_dim),
  }


def _mlp(p, x):
  return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _l2_normalise(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _hit_rate(queries, keys, chunk=2048):
  hits = 0
  for start in range(0, len(queries), chunk):
    nearest = np.argmax(queries[start:start + chunk] @ keys.T, axis=1)
    hits += int(np.sum(nearest == np.arange(start, start + len(nearest))))
  return hits / len(queries)


def _check_inputs(text, cf, train_items, heldout_items, temperature):
  """Index arrays as int64; mismatched views, empty or overlapping splits are errors."""
  if text.ndim != 2 or cf.ndim != 2 or len(text) != len(cf):
    raise ValueError(f"text {text.shape} and cf {cf.shape} must be [N, d] with the same N")
  train_items = np.asarray(train_items, np.int64).reshape(-1)
  heldout_items = np.asarray(heldout_items, np.int64).reshape(-1)
  if len(train_items) < 2:
    raise ValueError(f"alignment needs at least 2 train items, got {len(train_items)}")
  overlap = np.intersect1d(train_items, heldout_items)
  if len(overlap):
    raise ValueError(f"{len(overlap)} items are both train and held-out, e.g. {overlap[:5]}")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  return train_items, heldout_items


def _fit_norm(text, cf):
  """Per-feature mean and std of the train rows; a constant feature keeps std 1."""
  def stats(x):
    std = x.std(axis=0)
    return jnp.asarray(x.mean(axis=0)), jnp.asarray(np.where(std > 1e-6, std, 1.0))
  text_mean, text_std = stats(text)
  cf_mean, cf_std = stats(cf)
  return {"text_mean": text_mean, "text_std": text_std, "cf_mean": cf_mean, "cf_std": cf_std}


def _optimizer(lr, weight_decay):
  return optax.adamw(lr, weight_decay=weight_decay)


@functools.partial(jax.jit, static_argnames=("temperature", "lr", "weight_decay"))
def _step(weights, opt_state, norm, batch, *, temperature, lr, weight_decay):
  """One AdamW step on the MLP weights; the fitted standardisation `norm` is held fixed.

  Jitted at module level with the hyperparameters static, so repeated `train` calls with the
  same settings and shapes reuse one compiled step.
  """
  value, grads = jax.value_and_grad(
      lambda w: loss({**w, "norm": norm}, batch, temperature))(weights)
  updates, opt_state = _optimizer(lr, weight_decay).update(grads, opt_state, weights)
  return optax.apply_updates(weights, updates), opt_state, value


def _batches(order, batch_size):
  for start in range(0, len(order) - batch_size + 1, batch_size):
    yield order[start:start + batch_size]
