"""LightGCN (He et al., 2020) trained with BPR, in pure JAX.

  user, item = ds.train_interactions()
  valid = ds.splits["valid"]
  params, history = train(user, item, ds.num_users, ds.num_items, epochs=20,
                          eval_pairs=(valid.user, valid.target))
  vectors = item_embeddings(params, build_graph(user, item, ds.num_users, ds.num_items), 3)

The graph is the user-item bipartite graph with symmetric normalisation D^-1/2 A D^-1/2; a
layer maps (users, items) to (Â_ui items, Â_iu users), and the output is the mean of layers
0..L. Layer-0 vectors start normal with std 0.1, as in the authors' PyTorch code.

Propagation is a scatter-add over edge lists (what `jax.ops.segment_sum` lowers to), run over
fixed-size chunks of edges in a loop. On the CPU this is several times faster than one
segment_sum or a BCOO product over all edges, which materialise an [edges, dim] temporary per
layer (see `bench_lightgcn`). Â is symmetric, so a layer is its own transpose: its gradient
is one more chunked layer applied to the cotangents, instead of autodiff's transposes of the
gathers and scatters.
"""
import dataclasses
import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rallrec_jax.eval import metrics
from rallrec_jax.train import loop

EDGE_CHUNK = 16384   # edges per scatter-add; keeps the [chunk, dim] temporary in cache
INIT_STD = 0.1
EVAL_BATCH = 256     # users ranked at once


class Positives(NamedTuple):
  """Each user's distinct items in increasing order: rows offsets[u]:offsets[u+1] of `item`."""
  offsets: np.ndarray  # int64 [num_users + 1]
  item: np.ndarray     # int32 [P]

  def pairs(self):
    """(user, item) int32 arrays, one row per positive."""
    user = np.repeat(np.arange(len(self.offsets) - 1, dtype=np.int32), np.diff(self.offsets))
    return user, self.item


class Edges(NamedTuple):
  """Weighted edges sorted by destination, padded and cut into [chunks, chunk] rows."""
  dst: jax.Array     # int32
  src: jax.Array     # int32
  weight: jax.Array  # float32, 0 on padding


@functools.partial(jax.tree_util.register_dataclass, data_fields=["to_user", "to_item"],
                   meta_fields=["num_users", "num_items"])
@dataclasses.dataclass(frozen=True)
class Graph:
  """The normalised bipartite graph, once per direction of message passing."""
  to_user: Edges   # dst = user, src = item
  to_item: Edges   # dst = item, src = user
  num_users: int
  num_items: int


def positives_from_pairs(user, item, num_users, num_items):
  """Deduplicated `Positives` of interaction arrays."""
  user = np.asarray(user, np.int64)
  item = np.asarray(item, np.int64)
  _check_ids(user, num_users, "user")
  _check_ids(item, num_items, "item")
  keys = np.unique(user * num_items + item)
  offsets = np.zeros(num_users + 1, np.int64)
  np.cumsum(np.bincount(keys // num_items, minlength=num_users), out=offsets[1:])
  return Positives(offsets=offsets, item=(keys % num_items).astype(np.int32))


def _check_ids(ids, size, name):
  if size < 1:
    raise ValueError(f"the graph needs at least one {name}, got {size}")
  if len(ids) and (ids.min() < 0 or ids.max() >= size):
    raise ValueError(f"{name} ids must lie in [0, {size}), got [{ids.min()}, {ids.max()}]")


def build_graph(user, item, num_users, num_items, chunk=EDGE_CHUNK):
  """The `Graph` of (deduplicated) interactions, with weights 1 / sqrt(deg_u deg_i)."""
  user, item = positives_from_pairs(user, item, num_users, num_items).pairs()
  deg_u = np.bincount(user, minlength=num_users)
  deg_i = np.bincount(item, minlength=num_items)
  weight = (1.0 / np.sqrt(deg_u[user].astype(np.float64) * deg_i[item])).astype(np.float32)
  chunk = min(chunk, max(len(user), 1))
  by_item = np.argsort(item, kind="stable")
  return Graph(to_user=_edges(user, item, weight, num_users, chunk),
               to_item=_edges(item[by_item], user[by_item], weight[by_item], num_items, chunk),
               num_users=num_users, num_items=num_items)


def _edges(dst, src, weight, num_dst, chunk):
  """Edges padded with weight-0 edges into the last node, so destinations stay sorted."""
  pad = -(-max(len(dst), 1) // chunk) * chunk - len(dst)

  def cut(a, fill):
    return jnp.asarray(np.concatenate([a, np.full(pad, fill, a.dtype)]).reshape(-1, chunk))
  return Edges(dst=cut(dst.astype(np.int32), num_dst - 1), src=cut(src.astype(np.int32), 0),
               weight=cut(weight, 0.0))


def init(rng, num_users, num_items, dim):
  """Layer-0 embeddings {"user": [U, dim], "item": [I, dim]}."""
  ku, ki = jax.random.split(rng)
  return {"user": INIT_STD * jax.random.normal(ku, (num_users, dim), jnp.float32),
          "item": INIT_STD * jax.random.normal(ki, (num_items, dim), jnp.float32)}


def _aggregate(x, edges, num_dst):
  """sum over edges of weight * x[src] into dst, one chunk of edges per loop step."""
  def body(c, acc):
    rows = edges.weight[c][:, None] * x[edges.src[c]]
    return acc.at[edges.dst[c]].add(rows, indices_are_sorted=True)
  zeros = jnp.zeros((num_dst, x.shape[1]), x.dtype)
  return jax.lax.fori_loop(0, edges.dst.shape[0], body, zeros)


@jax.custom_vjp
def _layer(users, items, graph):
  """One propagation step: (Â_ui items, Â_iu users)."""
  return (_aggregate(items, graph.to_user, graph.num_users),
          _aggregate(users, graph.to_item, graph.num_items))


def _layer_fwd(users, items, graph):
  return _layer(users, items, graph), graph


def _layer_bwd(graph, cotangents):
  # The layer is the symmetric matrix [[0, Â_ui], [Â_iu, 0]]: its transpose is itself.
  return (*_layer(*cotangents, graph), None)


_layer.defvjp(_layer_fwd, _layer_bwd)


def propagate(params, graph, num_layers):
  """(user_out [U, d], item_out [I, d]): the mean of layers 0..num_layers."""
  users, items = params["user"], params["item"]
  sum_users, sum_items = users, items
  for _ in range(num_layers):
    users, items = _layer(users, items, graph)
    sum_users, sum_items = sum_users + users, sum_items + items
  return sum_users / (num_layers + 1), sum_items / (num_layers + 1)


def bpr_from_embeddings(users, items, params, batch, l2):
  """BPR loss of propagated vectors, plus LightGCN's L2 on the batch's layer-0 vectors."""
  u = users[batch["user"]]
  margin = jnp.sum(u * (items[batch["pos"]] - items[batch["neg"]]), axis=-1)
  user0 = params["user"][batch["user"]]
  item0 = params["item"][jnp.concatenate([batch["pos"], batch["neg"]])]
  squares = jnp.sum(user0 ** 2) + jnp.sum(item0 ** 2)
  return -jnp.mean(jax.nn.log_sigmoid(margin)) + l2 * squares / 2 / batch["user"].shape[0]


def bpr_loss(params, graph, batch, num_layers, l2):
  """Scalar BPR loss of a batch {"user", "pos", "neg"} through the whole graph."""
  users, items = propagate(params, graph, num_layers)
  return bpr_from_embeddings(users, items, params, batch, l2)


def sample_negatives(rng, users, num_items, positives):
  """One item per entry of `users`, uniform over the items that are not that user's positives.

  The r-th non-positive item of a user is r + #{j : p_j - j <= r} for their sorted positives
  p_0 < p_1 < ..., so a uniform r below (num_items - degree) maps to an allowed item through one
  global searchsorted: exact, with no rejection rounds even for users who rated nearly everything.
  `rng` is a numpy Generator.
  """
  users = np.asarray(users, np.int64)
  degree = np.diff(positives.offsets)
  allowed = num_items - degree[users]
  if np.any(allowed <= 0):
    raise ValueError(f"user {users[np.argmin(allowed)]} has every item as a positive: "
                     f"no negative to sample")
  owner = np.repeat(np.arange(len(degree), dtype=np.int64), degree)
  rank = np.arange(len(positives.item)) - positives.offsets[owner]
  keys = owner * num_items + (positives.item - rank)
  r = rng.integers(0, allowed)
  below = np.searchsorted(keys, users * num_items + r, side="right") - positives.offsets[users]
  return (r + below).astype(np.int32)


def epoch_batches(rng, positives, num_items, batch_size):
  """Shuffled positive pairs with fresh negatives, as {"user", "pos", "neg"} numpy batches.

  Pairs of users who rated every item are left out: with no negative they carry no BPR signal
  (they still shape the graph).
  """
  user, item = _trainable_pairs(positives, num_items)
  order = rng.permutation(len(user))
  user, item = user[order], item[order]
  neg = sample_negatives(rng, user, num_items, positives)
  for lo in range(0, len(user), batch_size):
    yield {"user": user[lo:lo + batch_size], "pos": item[lo:lo + batch_size],
           "neg": neg[lo:lo + batch_size]}


def _trainable_pairs(positives, num_items):
  """(user, item) of the positives of users with at least one negative to sample."""
  user, item = positives.pairs()
  trainable = np.diff(positives.offsets)[user] < num_items
  return user[trainable], item[trainable]


def make_train_step(optimizer, num_layers, l2):
  """Jitted (state, graph, batch) -> (state, loss); the old state's buffers are reused."""
  def step(state, graph, batch):
    loss, grads = jax.value_and_grad(bpr_loss)(state["params"], graph, batch, num_layers, l2)
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss
  return jax.jit(step, donate_argnums=0)


@jax.jit(static_argnames="num_layers")
def _propagate(params, graph, num_layers):
  return propagate(params, graph, num_layers)


def item_embeddings(params, graph, num_layers):
  """Propagated item vectors, float32 numpy [I, d]."""
  return np.asarray(_propagate(params, graph, num_layers)[1], np.float32)


@jax.jit(static_argnames="k")
def _top_k(user_emb, item_emb, exclude, k):
  scores = jnp.where(exclude, -jnp.inf, user_emb @ item_emb.T)
  return jax.lax.top_k(scores, k)[1]


def _dense_rows(positives, rows, num_items):
  """bool [len(rows), num_items]: the positives of the given users."""
  start = positives.offsets[rows]
  counts = positives.offsets[rows + 1] - start
  flat = np.arange(counts.sum()) + np.repeat(start - (np.cumsum(counts) - counts), counts)
  mask = np.zeros((len(rows), num_items), bool)
  mask[np.repeat(np.arange(len(rows)), counts), positives.item[flat]] = True
  return mask


def recall_ndcg(user_emb, item_emb, train_pos, eval_pairs, k):
  """(recall@k, NDCG@k) averaged over users with held-out items.

  Every item is ranked except the user's training positives. Held-out pairs that are training
  positives cannot be recommended and are dropped. Recall divides the hits by the user's
  held-out count; NDCG uses binary gains and log2 discounts.
  """
  num_users, num_items = user_emb.shape[0], item_emb.shape[0]
  if not 0 < k <= num_items:
    raise ValueError(f"k must lie in [1, {num_items}], got {k}")
  truth = _held_out(train_pos, eval_pairs, num_users, num_items)
  users = np.flatnonzero(np.diff(truth.offsets))
  if len(users) == 0:
    raise ValueError("no held-out pair outside the training positives to evaluate")
  item_emb = jnp.asarray(item_emb)
  top = []
  for lo in range(0, len(users), EVAL_BATCH):
    rows = users[lo:lo + EVAL_BATCH]
    pad = ((0, EVAL_BATCH - len(rows)), (0, 0))
    top.append(np.asarray(_top_k(jnp.asarray(np.pad(np.asarray(user_emb[rows]), pad)), item_emb,
                                 np.pad(_dense_rows(train_pos, rows, num_items), pad), k))[:len(rows)])
  counts = np.diff(truth.offsets)[users]
  offsets = np.concatenate([[0], np.cumsum(counts)])
  held_out = truth.item[np.repeat(truth.offsets[users] - offsets[:-1], counts)
                        + np.arange(offsets[-1])]
  return metrics.recall_ndcg_at_n(np.concatenate(top), offsets, held_out)


def _held_out(train_pos, eval_pairs, num_users, num_items):
  """`Positives` of the evaluation pairs that are not training positives."""
  truth = positives_from_pairs(*eval_pairs, num_users, num_items)
  user, item = truth.pairs()
  train_user, train_item = train_pos.pairs()
  seen = np.isin(user.astype(np.int64) * num_items + item,
                 train_user.astype(np.int64) * num_items + train_item)
  return positives_from_pairs(user[~seen], item[~seen], num_users, num_items)


def train(user, item, num_users, num_items, *, dim=128, num_layers=3, lr=1e-3, l2=1e-4,
          batch_size=2048, epochs=20, seed=0, eval_pairs=None, k=20, eval_every=1,
          checkpoint_dir=None, save_every=1, metrics_path=None, progress=True):
  """Train LightGCN on the interactions; returns (params, history).

  `history` has one dict per epoch: epoch, loss (mean over batches), seconds (of training,
  evaluation excluded) and, on epochs that evaluate (every `eval_every`-th and the last),
  recall@k and ndcg@k on `eval_pairs` (user, item arrays). With `checkpoint_dir`, the state is
  saved after every `save_every`-th epoch and the last, and a later call resumes from the
  newest, its history read back from `metrics_path` (one record per epoch). Each epoch draws
  its shuffle and negatives from (seed, epoch), so a resumed run equals an uninterrupted one.
  """
  positives = positives_from_pairs(user, item, num_users, num_items)
  graph = build_graph(*positives.pairs(), num_users, num_items)
  optimizer = optax.adam(lr)
  step = make_train_step(optimizer, num_layers, l2)
  per_epoch = max(len(_trainable_pairs(positives, num_items)[0]), 1)

  def fresh():
    params = init(jax.random.key(seed), num_users, num_items, dim)
    return {"params": params, "opt": optimizer.init(params)}

  def update(state, batch):
    state, loss = step(state, graph, batch)
    return state, {"loss": loss}

  def epochs_from(position):
    for epoch in itertools.count(position // per_epoch + 1):
      yield epoch_batches(np.random.default_rng([seed, epoch]), positives, num_items, batch_size)

  def evaluate(state):
    users, items = _propagate(state["params"], graph, num_layers)
    return dict(zip((f"recall@{k}", f"ndcg@{k}"),
                    recall_ndcg(users, items, positives, eval_pairs, k)))

  opts = loop.Options(steps=epochs, checkpoint_dir=checkpoint_dir, save_every=save_every,
                      max_to_keep=1, eval_every=eval_every, metric=f"recall@{k}",
                      metrics_path=metrics_path, log_every=1, progress=progress,
                      desc="lightgcn", unit="epoch")
  result = loop.fit(fresh, update, epochs_from, opts,
                    evaluate=None if eval_pairs is None else evaluate,
                    record=lambda step, batches, seconds: {"seconds": seconds})
  history = [{"epoch": r["step"], "loss": r["loss"], "seconds": r["seconds"], **r.get("eval", {})}
             for r in result.history]
  return result.state["params"], history
