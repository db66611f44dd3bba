"""LightGCN training speed: seconds per epoch, ours against two straightforward alternatives.

  python -m rallrec_jax.benchmarks.lightgcn [--ratings 1000000] [--ml100k PATH]

Data: MovieLens 100K interactions before the validation period (with --ml100k), and synthetic
interactions of MovieLens 1M's shape (6040 users, 3706 items, 1M ratings). All runs use 128
dims, 3 layers, batches of 2048, the same batches and the same initial parameters; ours is a
whole epoch timed after a warm-up epoch.

Competitors, one JSON line each per dataset:
  numpy dense  Â_ui as a dense [U, I] float32 array: propagation by matrix products, the
               gradient by hand (back through Â is another propagation, Â being symmetric),
               Adam in numpy.
  jax BCOO     Â_ui and Â_iu as jax.experimental.sparse BCOO matrices, one product over all
               edges per layer, gradient by autodiff, optax Adam, jitted.
Each competitor is timed over its first `competitor_steps` batches after one warm-up batch and
scaled to the epoch's batch count: a whole 1M-rating epoch takes each of them tens of
minutes. ratio = competitor seconds / our seconds (above 1: ours is faster).
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import sparse

from rallrec_jax import config, data
from rallrec_jax.cf import lightgcn
from rallrec_jax.data import synthetic

DIM, LAYERS, BATCH, LR, L2 = 128, 3, 2048, 1e-3, 1e-4
SEED = 0


def bench_lightgcn_epoch(num_ratings=None, ml100k_path=None, competitor_steps=10):
  """JSON-ready rows {"bench": "lightgcn_epoch", "dataset", "value", "unit": "s", ...}."""
  return list(iter_rows(num_ratings, ml100k_path, competitor_steps))


def iter_rows(num_ratings=None, ml100k_path=None, competitor_steps=10):
  """The rows of `bench_lightgcn_epoch`, each as soon as it is measured."""
  if ml100k_path:
    yield from _bench_dataset("ml100k_before_valid", *_ml100k(ml100k_path), competitor_steps)
  num_ratings = num_ratings or 1_000_000
  yield from _bench_dataset(f"synthetic_{num_ratings}", *_synthetic(num_ratings),
                            competitor_steps)


def _ml100k(path):
  cfg = config.base_config().data
  cfg.name, cfg.path = "ml100k", str(path)
  ds = data.prepare(cfg)
  return (*ds.train_interactions(), ds.num_users, ds.num_items)


def _synthetic(num_ratings):
  raw = synthetic.generate(6040, 3706, num_ratings, 18, 0.8, 0)
  # Raw ids are 1-based positions, so id - 1 is already a contiguous index.
  return raw.user - 1, raw.item - 1, 6040, 3706


def _bench_dataset(name, user, item, num_users, num_items, competitor_steps):
  positives = lightgcn.positives_from_pairs(user, item, num_users, num_items)
  pairs = positives.pairs()
  batches = list(lightgcn.epoch_batches(np.random.default_rng([SEED, 2]), positives, num_items,
                                        BATCH))
  ours = _ours_epoch(pairs, positives, num_users, num_items)
  device = jax.devices()[0]
  base = {"bench": "lightgcn_epoch", "dataset": name, "value": round(ours, 3), "unit": "s",
          "interactions": len(positives.item), "users": num_users, "items": num_items,
          "steps_per_epoch": len(batches), "dim": DIM, "layers": LAYERS, "batch": BATCH,
          "device": f"{device.platform} x{jax.device_count()}, {os.cpu_count()} cores"}
  competitors = {"numpy dense [U, I] matrix, hand-written gradient": _numpy_dense_step,
                 "jax BCOO products over all edges, autodiff": _bcoo_step}
  for label, make in competitors.items():
    step = make(pairs, num_users, num_items)
    timed = min(competitor_steps, len(batches))
    seconds = _time_steps(step, batches, timed) * len(batches) / timed
    yield {**base, "competitor": label, "competitor_value": round(seconds, 3),
           "competitor_steps_timed": timed, "ratio": round(seconds / ours, 2)}


def _ours_epoch(pairs, positives, num_users, num_items):
  """Seconds of epoch 2 of `lightgcn`'s own step, epoch 1 being the warm-up."""
  graph = lightgcn.build_graph(*pairs, num_users, num_items)
  optimizer = optax.adam(LR)
  params = lightgcn.init(jax.random.key(SEED), num_users, num_items, DIM)
  state = {"params": params, "opt": optimizer.init(params)}
  step = lightgcn.make_train_step(optimizer, LAYERS, L2)
  for epoch in (1, 2):
    start = time.perf_counter()
    for batch in lightgcn.epoch_batches(np.random.default_rng([SEED, epoch]), positives,
                                        num_items, BATCH):
      state, loss = step(state, graph, batch)
    jax.block_until_ready((state, loss))
    seconds = time.perf_counter() - start
  return seconds


def _time_steps(step, batches, count):
  """Seconds of `count` batches after one untimed warm-up batch."""
  step(batches[0])
  start = time.perf_counter()
  for batch in batches[:count]:
    step(batch)
  return time.perf_counter() - start


def _normalised(pairs, num_users, num_items):
  """(user, item, weight) of every edge, weight 1 / sqrt(deg_u deg_i)."""
  user, item = pairs
  deg_u = np.bincount(user, minlength=num_users).astype(np.float64)
  deg_i = np.bincount(item, minlength=num_items).astype(np.float64)
  return user, item, (1.0 / np.sqrt(deg_u[user] * deg_i[item])).astype(np.float32)


def _numpy_dense_step(pairs, num_users, num_items):
  """A batch -> None training step of LightGCN on dense numpy arrays (state in the closure)."""
  user, item, weight = _normalised(pairs, num_users, num_items)
  adjacency = np.zeros((num_users, num_items), np.float32)
  adjacency[user, item] = weight
  params = {k: np.array(v) for k, v in
            lightgcn.init(jax.random.key(SEED), num_users, num_items, DIM).items()}
  moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
  count = [0]

  def propagate(users, items):
    total_u, total_i = users.copy(), items.copy()
    for _ in range(LAYERS):
      users, items = adjacency @ items, adjacency.T @ users
      total_u += users
      total_i += items
    return total_u / (LAYERS + 1), total_i / (LAYERS + 1)

  def step(batch):
    u, p, n = batch["user"], batch["pos"], batch["neg"]
    users, items = propagate(params["user"], params["item"])
    diff = items[p] - items[n]
    margin = np.sum(users[u] * diff, axis=1)
    coef = (-1.0 / (1.0 + np.exp(margin)) / len(u))[:, None]
    grad_u, grad_i = np.zeros_like(users), np.zeros_like(items)
    np.add.at(grad_u, u, coef * diff)
    np.add.at(grad_i, p, coef * users[u])
    np.add.at(grad_i, n, -coef * users[u])
    grads = dict(zip(("user", "item"), propagate(grad_u, grad_i)))
    np.add.at(grads["user"], u, L2 / len(u) * params["user"][u])
    np.add.at(grads["item"], p, L2 / len(u) * params["item"][p])
    np.add.at(grads["item"], n, L2 / len(u) * params["item"][n])
    count[0] += 1
    for key, grad in grads.items():
      _adam(params[key], *moments[key], grad, count[0])
  return step


def _adam(param, mean, square, grad, count, b1=0.9, b2=0.999, eps=1e-8):
  """optax.adam's update, in place."""
  mean *= b1
  mean += (1 - b1) * grad
  square *= b2
  square += (1 - b2) * grad * grad
  param -= LR * (mean / (1 - b1 ** count)) / (np.sqrt(square / (1 - b2 ** count)) + eps)


def _bcoo_step(pairs, num_users, num_items):
  """A batch -> None training step with BCOO propagation and autodiff (state in the closure)."""
  user, item, weight = _normalised(pairs, num_users, num_items)
  by_item = np.argsort(item, kind="stable")
  to_user = sparse.BCOO((jnp.asarray(weight), jnp.asarray(np.stack([user, item], 1))),
                        shape=(num_users, num_items))
  to_item = sparse.BCOO((jnp.asarray(weight[by_item]),
                         jnp.asarray(np.stack([item[by_item], user[by_item]], 1))),
                        shape=(num_items, num_users))
  optimizer = optax.adam(LR)
  params = lightgcn.init(jax.random.key(SEED), num_users, num_items, DIM)
  state = [{"params": params, "opt": optimizer.init(params)}]

  def loss(params, to_user, to_item, batch):
    users, items = params["user"], params["item"]
    total_u, total_i = users, items
    for _ in range(LAYERS):
      users, items = to_user @ items, to_item @ users
      total_u, total_i = total_u + users, total_i + items
    return lightgcn.bpr_from_embeddings(total_u / (LAYERS + 1), total_i / (LAYERS + 1), params,
                                        batch, L2)

  @jax.jit(donate_argnums=0)
  def update(state, to_user, to_item, batch):
    grads = jax.grad(loss)(state["params"], to_user, to_item, batch)
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}

  def step(batch):
    state[0] = jax.block_until_ready(update(state[0], to_user, to_item, batch))
  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ratings", type=int, default=None, help="synthetic ratings (1M)")
  parser.add_argument("--ml100k", default=os.environ.get("RALLREC_ML100K"),
                      help="MovieLens 100K folder (default: $RALLREC_ML100K; skipped if unset)")
  parser.add_argument("--competitor-steps", type=int, default=10)
  args = parser.parse_args(argv)
  for row in iter_rows(args.ratings, args.ml100k, args.competitor_steps):
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
