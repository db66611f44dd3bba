"""Batched text generation: one prefill call over the prompts, then a compiled decode loop.

Prompts are left-padded, so every row writes its next token to the same cache slot and one
`cache_index` serves the whole batch, while each row keeps its own RoPE position and its own
`kv_mask` of real slots. Prompt lengths are rounded up to buckets (more left padding), so a new
prompt length rarely means a new compilation.
"""
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rallrec_jax import parallel
from rallrec_jax.llm import tokenizer as tokenizer_lib
from rallrec_jax.llm.model import Decoder

MIN_BUCKET = 16
LINEAR_BUCKET = 128
NUCLEUS_CANDIDATES = 256     # top-p draws from these when they hold top_p of the mass


class DecodeState(typing.NamedTuple):
  """What a decode step needs besides the token: the cache, its real slots, the next positions."""
  cache: list | dict
  kv_mask: jax.Array
  position: jax.Array


def init_cache(cfg, batch, length, dtype=None, sharding=None):
  """A zeroed KV cache: one {"k", "v"} of [batch, length, kv_heads, head_dim] per layer, or in
  the scanned layout one {"k", "v"} of [layers, batch, length, kv_heads, head_dim].

  `sharding` is that of one layer's array; a stack adds an unsharded leading axis.
  """
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  if cfg.scanned:
    shape = (cfg.num_layers,) + shape
    if sharding is not None:
      sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))

  def zeros():
    array = jnp.zeros(shape, dtype or cfg.dtype)
    return array if sharding is None else jax.lax.with_sharding_constraint(array, sharding)
  if cfg.scanned:
    return {"k": zeros(), "v": zeros()}
  return [{"k": zeros(), "v": zeros()} for _ in range(cfg.num_layers)]


def bucket_length(length):
  """Powers of two up to LINEAR_BUCKET, multiples of it beyond: few shapes, bounded waste."""
  if length <= LINEAR_BUCKET:
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())
  return -(-length // LINEAR_BUCKET) * LINEAR_BUCKET


def _last_logits(cfg, params, ids, positions, state, index):
  """Logits [B, vocab] after the last of `ids`, written from cache slot `index` on."""
  model = Decoder(cfg)
  hidden, cache = model.apply({"params": params}, ids, method=Decoder.hidden, positions=positions,
                              cache=state.cache, cache_index=index, kv_mask=state.kv_mask)
  logits = model.apply({"params": params}, hidden[:, -1], method=Decoder.project)
  return logits, state._replace(cache=cache)


def prefill(cfg, params, input_ids, attention_mask, cache):
  """Run the left-padded prompts through slots 0..T-1; the next-token logits and decode state."""
  b, t = input_ids.shape
  mask = attention_mask.astype(jnp.int32)
  length = (cache["k"] if cfg.scanned else cache[0]["k"]).shape[-3]
  kv_mask = jnp.zeros((b, length), jnp.int32).at[:, :t].set(mask)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  return _last_logits(cfg, params, input_ids, positions,
                      DecodeState(cache, kv_mask, positions[:, -1] + 1), 0)


def decode_step(cfg, params, tokens, state, index):
  """Feed one token per row at cache slot `index`; the next-token logits and new state."""
  state = state._replace(kv_mask=state.kv_mask.at[:, index].set(1))
  logits, state = _last_logits(cfg, params, tokens[:, None], state.position[:, None], state,
                               index)
  return logits, state._replace(position=state.position + 1)


def _sample(logits, key, temperature, top_p, candidates=NUCLEUS_CANDIDATES):
  """A token per row from softmax(logits / temperature) cut to its top-p nucleus.

  The nucleus is the smallest prefix of the tokens sorted by probability whose mass reaches
  top_p: a token stays if the mass before it is below top_p, and the top token always stays.
  Sorting the whole vocabulary every step is slow (on CPUs above all), so the nucleus is taken
  from the `candidates` most likely tokens whenever they hold at least top_p of the mass in
  every row, which is exact; only otherwise is the vocabulary sorted. top_p >= 1 samples from
  the whole softmax.
  """
  scaled = logits.astype(jnp.float32) / temperature
  k = min(candidates, scaled.shape[-1])
  top_scaled, top_ids = jax.lax.top_k(scaled, k)
  probs = jnp.exp(top_scaled - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))
  covered = jnp.all(jnp.sum(probs, axis=-1) >= top_p)

  def nucleus(sorted_scaled, sorted_probs, ids):
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep = (mass_before < top_p).at[:, 0].set(True)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_scaled, -jnp.inf), axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]

  def whole_sort():
    order = jnp.argsort(-scaled, axis=-1)
    sorted_scaled = jnp.take_along_axis(scaled, order, axis=-1)
    return nucleus(sorted_scaled, jax.nn.softmax(sorted_scaled, axis=-1), order)

  branch = jnp.where(top_p >= 1.0, 0, jnp.where(covered, 1, 2))
  return jax.lax.switch(branch, (
      lambda: jax.random.categorical(key, scaled, axis=-1),
      lambda: nucleus(top_scaled, probs, top_ids),
      whole_sort))


def _choose(logits, key, temperature, top_p, greedy):
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return _sample(logits, key, temperature, top_p).astype(jnp.int32)


def _is_eos(tokens, eos_ids):
  return (tokens[:, None] == jnp.asarray(eos_ids, jnp.int32).reshape(1, -1)).any(axis=-1)


@jax.jit(static_argnames=("cfg", "max_new_tokens", "greedy", "eos_ids", "cache_sharding"))
def _generate(params, input_ids, attention_mask, rng, temperature, top_p, pad_id, *, cfg,
              max_new_tokens, greedy, eos_ids, cache_sharding):
  """New tokens [B, max_new_tokens] and how many the loop produced before every row stopped."""
  b, t = input_ids.shape
  cache = init_cache(cfg, b, t + max_new_tokens - 1, sharding=cache_sharding)
  logits, state = prefill(cfg, params, input_ids, attention_mask, cache)

  def pick(step, logits, rng, out, done):
    rng, key = jax.random.split(rng)
    token = jnp.where(done, pad_id, _choose(logits, key, temperature, top_p, greedy))
    return rng, out.at[:, step].set(token), done | _is_eos(token, eos_ids)

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  rng, out, done = pick(0, logits, rng, out, jnp.zeros((b,), bool))

  def more(carry):
    step, _, _, _, done = carry
    return (step < max_new_tokens) & ~done.all()

  def step_once(carry):
    step, state, rng, out, done = carry
    logits, state = decode_step(cfg, params, out[:, step - 1], state, t + step - 1)
    return (step + 1, state) + pick(step, logits, rng, out, done)

  steps, _, _, out, _ = jax.lax.while_loop(more, step_once, (1, state, rng, out, done))
  return out, steps


def _left_pad(array, length, value):
  return np.pad(array, ((0, 0), (length - array.shape[1], 0)), constant_values=value)


def generate(cfg, params, input_ids, attention_mask, *, max_new_tokens, temperature=0.0,
             top_p=1.0, eos_ids=(), pad_id=0, rng=None, mesh=None,
             rules=parallel.DEFAULT_RULES, return_steps=False):
  """New tokens [B, max_new_tokens] (numpy) for left-padded prompts.

  A row keeps its EOS token and holds pad_id after it.

  Temperature 0 is greedy. With a `mesh`, the cache's batch dimension is sharded over the
  mesh's batch axes. `return_steps` also returns how many tokens the loop produced before
  every row had stopped.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must not be negative")
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
  length = bucket_length(ids.shape[1])
  ids, mask = _left_pad(ids, length, pad_id), _left_pad(mask, length, 0)
  cache_shape = (ids.shape[0], length + max_new_tokens - 1, cfg.num_kv_heads, cfg.head_dim)
  sharding = None if mesh is None else parallel.batch_sharding(mesh, cache_shape, rules)
  out, steps = _generate(
      params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
      jax.random.key(0) if rng is None else rng, float(temperature), float(top_p), int(pad_id),
      cfg=cfg, max_new_tokens=int(max_new_tokens), greedy=bool(temperature == 0),
      eos_ids=tuple(sorted({int(e) for e in eos_ids})), cache_sharding=sharding)
  out = np.asarray(out)
  return (out, int(steps)) if return_steps else out


def stop_ids(lm):
  """The ids that end a reply: the tokenizer's EOS and those in the model config."""
  ids = set(lm.cfg.eos_token_ids)
  if lm.tokenizer.eos_token_id is not None:
    ids.add(lm.tokenizer.eos_token_id)
  return tuple(sorted(ids))


def _until_eos(row, stop):
  ends = np.flatnonzero(np.isin(row, stop))
  return row[:ends[0]] if ends.size else row


def generate_text(lm, prompts, *, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0,
                  batch_size=8, chat=True):
  """Replies to `prompts` (in the chat template when `chat`), stripped, special tokens dropped.

  Every batch, the last one included, has the same number of rows (short ones repeat a
  prompt), so that one compilation serves them all.
  """
  tok = lm.tokenizer
  texts = [tokenizer_lib.chat_prompt(tok, p) if chat else p for p in prompts]
  stop = stop_ids(lm)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
  rows = min(batch_size, len(texts))
  replies = []
  for start in range(0, len(texts), max(rows, 1)):
    chunk = texts[start:start + rows]
    batch = tok(chunk + chunk[:1] * (rows - len(chunk)), padding=True, padding_side="left",
                add_special_tokens=not chat, return_tensors="np")
    rng = jax.random.fold_in(jax.random.key(seed), start)
    out = generate(lm.cfg, lm.params, batch["input_ids"], batch["attention_mask"],
                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   eos_ids=stop, pad_id=pad_id, rng=rng, mesh=lm.mesh, rules=lm.rules)
    replies += [tok.decode(_until_eos(row, stop), skip_special_tokens=True).strip()
                for row in out[:len(chunk)]]
  return replies
