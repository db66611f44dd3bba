"""Yes/No logits of prompts that share a token prefix, the prefix run once into a KV cache.

The candidate prompts of one user share a long prefix (chat header, instructions, profile and,
when the history does not depend on the target, the whole history). Here the prefix runs
through the decoder once, filling a KV cache (`generate.init_cache`); the cache is then
broadcast to a batch of the prompts' suffixes, which attend to it and to their own earlier
tokens, at positions that continue after the prefix. The answer logits are read at each
suffix's last token, so the result is `score.yes_no_logits` of the whole prompts up to float
rounding, for a fraction of the work when the suffixes are short.

The prefix is left-padded to a `generate.bucket_length`, each batch of suffixes left-padded to
a multiple of SUFFIX_BUCKET tokens (padding slots between the prefix and a suffix are masked
out of the attention and skipped by the positions), so that few shapes compile.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax import distributed
from rallrec_jax.llm import generate, padding, score

# Finer than the whole prompts' bucket: suffixes are short (a title and the question's tail),
# so a coarse bucket would pad most of them to nearly twice their length.
SUFFIX_BUCKET = 16


def shared_prefix_length(token_lists):
  """How many leading tokens every list shares, at most the shortest length minus one: each
  prompt keeps a suffix of at least its last token, where its answer is read."""
  lengths = [len(t) for t in token_lists]
  if not lengths or min(lengths) == 0:
    raise ValueError("every prompt of a group needs at least one token")
  first = np.asarray(token_lists[0])
  shared = min(lengths) - 1
  for tokens in token_lists[1:]:
    differ = np.flatnonzero(np.asarray(tokens[:shared]) != first[:shared])
    shared = int(differ[0]) if differ.size else shared
  return shared


def suffix_batches(suffix_lengths, batch_size, multiple=1, bucket=SUFFIX_BUCKET):
  """(rows per batch, [(row indices, padded length)]) of a group's suffixes, longest first.

  The rows split into as few batches of at most `batch_size` as they need, all of one row
  count (a multiple of `multiple`, the mesh's batch ways): 50 suffixes at 16 make 4 batches
  of 13 rather than 3 full ones and one of 2 padded to 16.
  """
  n = len(suffix_lengths)
  count = -(-n // max(batch_size, 1))
  rows = padding.round_up(-(-n // count), multiple)
  order = np.argsort(-np.asarray(suffix_lengths), kind="stable")
  return rows, [(order[i:i + rows], padding.round_up(int(suffix_lengths[order[i]]), bucket))
                for i in range(0, n, rows)]


def saves_work(token_lists, batch_size, multiple=1, bucket=32):
  """Whether `group_logits` runs at most half the token slots through the decoder that scoring
  each prompt on its own, padded to a multiple of `bucket`, does (`evaluate.score_examples`).

  Half, not merely fewer: each suffix batch also copies the prefix's cache and attends over
  its padded slots, which on a tiny model cost more than the tokens saved by a short prefix.
  """
  lengths = np.array([len(t) for t in token_lists], np.int64)
  shared = shared_prefix_length(token_lists)
  rows, batches = suffix_batches(lengths - shared, batch_size, multiple)
  reuse = multiple * generate.bucket_length(shared) + rows * sum(n for _, n in batches)
  return 2 * reuse <= int(padding.round_up(lengths, bucket).sum())


@functools.partial(jax.jit, static_argnums=(0, 5))
def prefill(cfg, params, ids, mask, adapters=None, lora_cfg=None):
  """The KV cache of left-padded prefix rows [R, P] (R: the mesh's batch ways, all one prefix)."""
  cache = generate.init_cache(cfg, ids.shape[0], ids.shape[1])
  _, cache = score.final_hidden(cfg, params, adapters, lora_cfg, ids, mask, cache=cache,
                                cache_index=0, kv_mask=mask)
  return cache


@functools.partial(jax.jit, static_argnums=(0, 9))
def suffix_logits(cfg, params, cache, prefix_mask, ids, mask, yes_id, no_id, adapters=None,
                  lora_cfg=None):
  """[B, 2] float32 (yes, no) logits of left-padded suffixes [B, S] after the prefix whose cache
  and mask [R, P] `prefill` made."""
  b, s = ids.shape
  p = prefix_mask.shape[1]

  def widen(array):  # [..., R, P, kv_heads, head_dim] -> [..., B, P + S, kv_heads, head_dim]
    row = jax.lax.slice_in_dim(array, 0, 1, axis=array.ndim - 4)
    row = jnp.pad(row, [(0, 0)] * (array.ndim - 3) + [(0, s), (0, 0), (0, 0)])
    return jnp.broadcast_to(row, row.shape[:-4] + (b,) + row.shape[-3:])

  kv_mask = jnp.concatenate([jnp.broadcast_to(prefix_mask[:1], (b, p)), mask], axis=1)
  positions = jnp.sum(prefix_mask[0]) + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  hidden, _ = score.final_hidden(cfg, params, adapters, lora_cfg, ids, positions=positions,
                                 cache=jax.tree.map(widen, cache), cache_index=p,
                                 kv_mask=kv_mask)
  return score.answer_logits(cfg, params, hidden[:, -1], yes_id, no_id)


def group_logits(lm, token_lists, yes_id, no_id, *, batch_size=16, params=None, adapters=None,
                 lora_cfg=None):
  """[N, 2] float32 (yes, no) logits of one group of token-id prompts, in their order.

  The model is `lm` with `params` (default: its own) and, when given, LoRA `adapters` of
  `lora_cfg`. With a mesh, `batch_size` rounds up to the mesh's batch ways.
  """
  shared = shared_prefix_length(token_lists)
  multiple = score.batch_multiple(lm.mesh, lm.rules)
  pad_id = lm.tokenizer.pad_token_id or 0
  params = lm.params if params is None else params
  yes_id, no_id = np.int32(yes_id), np.int32(no_id)
  ids, prefix_mask = padding.left_pad([token_lists[0][:shared]] * multiple,
                                      generate.bucket_length(shared), pad_id)
  prefix_mask = lm.place(prefix_mask)
  cache = prefill(lm.cfg, params, lm.place(ids), prefix_mask, adapters, lora_cfg)
  suffixes = [t[shared:] for t in token_lists]
  out = np.zeros((len(suffixes), 2), np.float32)
  rows_per_batch, batches = suffix_batches([len(s) for s in suffixes], batch_size, multiple)
  for rows, length in batches:
    filled = list(rows) + [rows[-1]] * (rows_per_batch - len(rows))
    ids, mask = padding.left_pad([suffixes[i] for i in filled], length, pad_id)
    logits = suffix_logits(lm.cfg, params, cache, prefix_mask, lm.place(ids), lm.place(mask),
                           yes_id, no_id, adapters, lora_cfg)
    out[rows] = distributed.to_host(logits)[:len(rows)]
  return out
