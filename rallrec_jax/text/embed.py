"""Text embeddings: a masked mean over each text's tokens of the final normed hidden states
(pool "hidden", one forward pass per text) or of the input token embeddings (pool "tokens").

"tokens" is for a random decoder: its layers scramble the word vectors into noise, but each word
keeps one fixed row of the embedding table, so the mean of a text's rows finds texts that share
words (for the quickstart's titles and genres, the planted clusters).

Texts are tokenized without a chat template, sorted by length and cut into batches padded up
to a few bucket lengths (few compiled shapes, little padding); each batch is split over the
mesh's batch axes. PCA (centred, not whitened) in JAX reduces the result to `dim` columns.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax import parallel, progress as progress_lib
from rallrec_jax.config import EMBED_POOLS
from rallrec_jax.llm import padding
from rallrec_jax.llm.model import Decoder


@functools.partial(jax.jit, static_argnums=(0, 1))
def mean_pool(cfg, pool, params, input_ids, attention_mask):
  """Masked mean [B, E] (float32) of the final normed hidden states or the token embeddings."""
  if pool == "tokens":
    hidden = Decoder(cfg).apply({"params": params}, input_ids, method=Decoder.token_embeddings)
  else:
    hidden, _ = Decoder(cfg).apply({"params": params}, input_ids, attention_mask,
                                   method=Decoder.hidden)
  mask = attention_mask.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


def embed_texts(lm, texts, *, pool="hidden", batch_size=32, bucket=32, max_length=512,
                progress=True):
  """Mean-pooled `pool` states [len(texts), hidden_size] float32, in the order of `texts`."""
  if pool not in EMBED_POOLS:
    raise ValueError(f"unknown pool {pool!r}; choose one of {EMBED_POOLS}")
  tok = lm.tokenizer
  ids = tok(list(texts), add_special_tokens=True, truncation=True, max_length=max_length).input_ids
  order = np.argsort([len(x) for x in ids], kind="stable")
  out = np.zeros((len(texts), lm.cfg.hidden_size), np.float32)
  pad = tok.pad_token_id or 0
  with parallel.activation_sharding(lm.mesh, lm.rules):
    for start in progress_lib.bar(range(0, len(order), batch_size), desc="embed", unit="batch",
                                  disable=not progress):
      rows = order[start:start + batch_size]
      length = padding.round_up(max(len(ids[r]) for r in rows), bucket)
      # Spare rows of the last batch are empty: all padding, dropped below.
      batch, mask = padding.left_pad([ids[r] for r in rows] + [[]] * (batch_size - len(rows)),
                                     length, pad)
      pooled = mean_pool(lm.cfg, pool, lm.params, lm.place(batch), lm.place(mask))
      out[rows] = np.asarray(pooled)[:len(rows)]
  return out


@functools.partial(jax.jit, static_argnums=1)
def _pca(x, dim):
  centred = x - x.mean(axis=0, keepdims=True)
  _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
  # Fix each component's sign (largest |loading| positive) so results are reproducible.
  signs = jnp.sign(vt[jnp.arange(vt.shape[0]), jnp.argmax(jnp.abs(vt), axis=1)])
  return centred @ (vt[:dim] * signs[:dim, None]).T


def pca(x, dim):
  """Project rows of `x` [N, D] onto their top `dim` principal components (centred, not
  whitened); with fewer than `dim` rows or columns the rest is zero-filled."""
  x = np.asarray(x, np.float32)
  keep = min(dim, *x.shape)
  out = np.zeros((x.shape[0], dim), np.float32)
  out[:, :keep] = np.asarray(_pca(jnp.asarray(x), keep))
  return out
