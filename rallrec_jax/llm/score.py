"""Yes/no scoring: P(yes) of "will the user like this item?" from the answer's first token.

The score is the two-way softmax of the "Yes" and "No" logits at the last prompt position.
Only that position's hidden state meets the output embedding, and only its two answer rows:
a plain forward projects every position onto the whole vocabulary ([B, T, vocab] work and
memory) and then reads two numbers of it.

Batches are left-padded, so the last position is the last real token of every row.
`score_prompts` sorts prompts by length, cuts batches and pads each to a multiple of `bucket`
tokens (and a fixed number of rows), so that only a few shapes are ever compiled.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax import progress as progress_lib
from rallrec_jax.llm import lora, padding, tokenizer as tokenizer_lib
from rallrec_jax.llm.model import Decoder


def final_hidden(cfg, params, adapters, lora_cfg, *args, **kwargs):
  """`Decoder.hidden` (final normed hidden states and the cache) of the base `params`, with the
  LoRA `adapters` of `lora_cfg` added when given (no dropout)."""
  if (adapters is None) != (lora_cfg is None):
    raise ValueError("pass adapters and lora_cfg together, or neither")
  if adapters is None:
    return Decoder(cfg).apply({"params": params}, *args, method=Decoder.hidden, **kwargs)
  return lora.apply(cfg, params, adapters, lora_cfg, *args, method=Decoder.hidden, **kwargs)


def answer_logits(cfg, params, hidden, yes_id, no_id):
  """[B, 2] float32 (yes, no) logits of final hidden states [B, embed]."""
  rows = Decoder(cfg).apply({"params": params}, jnp.stack([yes_id, no_id]),
                            method=Decoder.answer_rows)
  # Full precision: accelerators would otherwise round float32 operands of this tiny product.
  return jnp.einsum("be,ne->bn", hidden.astype(jnp.float32), rows.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnums=(0, 7))
def yes_no_logits(cfg, params, input_ids, attention_mask, yes_id, no_id, adapters=None,
                  lora_cfg=None):
  """[B, 2] float32 (yes, no) logits at the last position of a left-padded batch.

  With `adapters` (of `lora_cfg`) the LoRA deltas join the base `params` (no dropout). Kept
  apart from `p_yes` because a calibrated log-loss needs the logits, not the probability.
  """
  hidden, _ = final_hidden(cfg, params, adapters, lora_cfg, input_ids, attention_mask,
                          last_only=True)
  return answer_logits(cfg, params, hidden[:, -1], yes_id, no_id)


@jax.jit(static_argnums=0)
def p_yes(cfg, params, input_ids, attention_mask, yes_id, no_id):
  """[B] P(yes) = softmax over (yes, no) = sigmoid(logit_yes - logit_no), float32."""
  logits = yes_no_logits(cfg, params, input_ids, attention_mask, yes_id, no_id)
  return jax.nn.sigmoid(logits[:, 0] - logits[:, 1])


def score_prompts(lm, prompts, *, batch_size=16, chat=True, bucket=32, progress=True):
  """[N] P(yes) of each prompt, in the order given (see `_run` for the arguments)."""
  return _run(lm, prompts, p_yes, (), batch_size, chat, bucket, progress)


def prompt_logits(lm, prompts, *, batch_size=16, chat=True, bucket=32, progress=True):
  """[N, 2] (yes, no) logits of each prompt, in the order given."""
  return _run(lm, prompts, yes_no_logits, (2,), batch_size, chat, bucket, progress)


def _run(lm, prompts, fn, row_shape, batch_size, chat, bucket, progress):
  """Tokenize, batch by length, apply `fn` and put the rows back in the prompts' order.

  `chat` wraps each prompt in the tokenizer's chat template (which carries its own special
  tokens); `progress` shows a bar (plain lines off a terminal). Each batch is dispatched
  before the previous one is fetched, so the device works while the host packs the next batch.
  """
  tokens = _tokenize(lm.tokenizer, prompts, chat)
  lengths = np.array([len(t) for t in tokens], np.int64)
  rows_per_batch = padding.round_up(batch_size, batch_multiple(lm.mesh, lm.rules))
  yes_id, no_id = (np.int32(i) for i in lm.yes_no_tokens())
  pad_id = lm.tokenizer.pad_token_id or 0
  out = np.zeros((len(tokens),) + row_shape, np.float32)
  pending = []
  with progress_lib.bar(total=len(tokens), unit="prompt", disable=not progress) as bar:
    for rows, length in _plan(lengths, rows_per_batch, bucket):
      # Spare rows repeat the last prompt (an all-padding row would attend to nothing).
      filled = list(rows) + [rows[-1]] * (rows_per_batch - len(rows))
      ids, mask = padding.left_pad([tokens[i] for i in filled], length, pad_id)
      pending.append((rows, fn(lm.cfg, lm.params, lm.place(ids), lm.place(mask), yes_id,
                               no_id)))
      if len(pending) > 1:
        _collect(out, *pending.pop(0), bar)
    for rows, result in pending:
      _collect(out, rows, result, bar)
  return out


def _tokenize(tokenizer, prompts, chat):
  """Token id lists; a prompt with no tokens has no last position to score and is an error."""
  texts = [tokenizer_lib.chat_prompt(tokenizer, p) if chat else p for p in prompts]
  tokens = tokenizer(texts, add_special_tokens=not chat).input_ids if texts else []
  empty = [i for i, t in enumerate(tokens) if not t]
  if empty:
    raise ValueError(f"prompt {empty[0]} tokenizes to nothing")
  return tokens


def batch_multiple(mesh, rules):
  """How many ways the mesh splits the batch: every batch's row count must divide by it."""
  if mesh is None:
    return 1
  axes = next((v for k, v in rules if k == "batch"), None)
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def _plan(lengths, rows_per_batch, bucket):
  """[(prompt indices, padded length)], longest first so that a batch too big fails early."""
  order = np.argsort(-lengths, kind="stable")
  cuts = range(rows_per_batch, len(order), rows_per_batch)
  return [(rows, padding.round_up(int(lengths[rows].max()), bucket))
          for rows in np.array_split(order, cuts) if len(rows)]


def _collect(out, rows, result, bar):
  """Fetch a batch and write its real rows (not the spare ones) into `out`."""
  out[rows] = np.asarray(result)[:len(rows)]
  bar.update(len(rows))
