"""Number tokens as points on one line of the embedding space (the tiny decoder's like-rates).

A word-level tokenizer gives every number its own token, and a decoder trained from random
weights reads each as its own word: the like-rate 40% and 41% are as unrelated as two titles,
each learned from a few hundred prompts, so the decoder's reading of the rate is a jagged
function of the number (README, the quickstart's recipe). Here the embedding rows of the
number tokens low..high sit on one line, the row of n at (n - low) / (high - low) of the way
from the row of `low` to that of `high`: placed there at initialisation (`place`) and kept
there while every weight trains (`keep_on_line`, which moves the line's two ends as the
gradients ask but no row off it), so that nearby numbers read alike.
"""
import jax.numpy as jnp
import numpy as np
import optax


def tokens(tokenizer, low, high):
  """(ids, positions in [0, 1]) of the numbers low..high that are single tokens of the
  tokenizer's vocabulary; an error when fewer than two are."""
  vocab = tokenizer.get_vocab()
  numbers = [n for n in range(low, high + 1) if str(n) in vocab]
  if len(numbers) < 2:
    raise ValueError(f"number line {low}..{high}: {len(numbers)} of its numbers are tokens of "
                     "the vocabulary, it needs at least two")
  ids = np.array([vocab[str(n)] for n in numbers], np.int32)
  return ids, (np.array(numbers, np.float64) - numbers[0]) / (numbers[-1] - numbers[0])


def place(embedding, ids, positions):
  """`embedding` [vocab, embed] with the rows `ids` on the line between the first's and the
  last's, at `positions` (0 and 1 leave those two rows as they are)."""
  embedding = np.array(embedding)
  first, last = embedding[ids[0]].copy(), embedding[ids[-1]].copy()
  embedding[ids] = (1 - positions[:, None]) * first + positions[:, None] * last
  return embedding


def projector(positions):
  """[k, k] least-squares projection onto rows a + t * b (the hat matrix of [1, t])."""
  design = np.stack([np.ones_like(positions), positions], axis=1)
  return design @ np.linalg.solve(design.T @ design, design.T)


def keep_on_line(ids, positions):
  """An optax transformation, last in a chain, that turns the updates of the rows `ids` into
  those that land them on their least-squares line: new rows = P (rows + updates). Rows already
  on a line stay on one; the other params' updates pass unchanged."""
  ids = np.asarray(ids, np.int32)
  hat = jnp.asarray(projector(np.asarray(positions, np.float64)), jnp.float32)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("keep_on_line needs the params")
    rows = params["embed_tokens"]["embedding"][ids].astype(jnp.float32)
    moved = updates["embed_tokens"]["embedding"]
    new = hat @ (rows + moved[ids].astype(jnp.float32)) - rows
    embed = {**updates["embed_tokens"], "embedding": moved.at[ids].set(new.astype(moved.dtype))}
    return {**updates, "embed_tokens": embed}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)

