"""Training losses of the decoder.

  answer_loss             the two-way cross-entropy of the (yes, no) logits at the position that
                          decides the answer (`decision_position`), the score evaluation reads
  next_token_loss         next-token cross-entropy over the masked answer tokens, from logits
  hidden_next_token_loss  the same from hidden states and the output matrix, chunked over the
                          sequence so that no [B, T, vocab] logits are ever held
"""
import jax
import jax.numpy as jnp
import optax

CHUNK_TOKENS = 512  # tokens per chunk of hidden_next_token_loss


def answer_loss(hidden_at, rows, labels):
  """Mean two-way cross-entropy of the (yes, no) logits of hidden states [B, E]; label 1 = yes."""
  logits = jnp.einsum("be,ne->bn", hidden_at.astype(jnp.float32), rows.astype(jnp.float32))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, 1 - labels.astype(jnp.int32)))


def decision_position(loss_mask):
  """Per row, the position whose next-token logits decide the answer: the last position of a
  prompt-only row, else the one before the first answer token."""
  t = loss_mask.shape[1]
  has_answer = jnp.any(loss_mask > 0, axis=1)
  first = jnp.argmax(loss_mask > 0, axis=1)
  return jnp.where(has_answer, first - 1, t - 1)


def next_token_loss(logits, input_ids, loss_mask):
  """Mean cross-entropy of logits at t predicting ids at t+1, over targets where loss_mask is 1.

  `loss_mask` is aligned with `input_ids`: it marks the tokens to be predicted (like Hugging
  Face labels that are not -100), so position 0 is never a target.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], input_ids[:, 1:])
  weights = loss_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def output_matrix(cfg, params):
  """The vocabulary projection as [vocab, embed] (the tied embedding or lm_head's kernel)."""
  if cfg.tie_word_embeddings:
    return params["embed_tokens"]["embedding"]
  return params["lm_head"]["kernel"].T


def hidden_next_token_loss(hidden, head, input_ids, loss_mask, chunk_tokens=CHUNK_TOKENS):
  """`next_token_loss` of logits = hidden @ head.T, never holding all [B, T, vocab] logits.

  The sequence is cut into chunks of about `chunk_tokens` tokens (the batch axis, which may be
  sharded, stays whole); each chunk's logits live only inside one scan step. The gradient with
  respect to `hidden` is computed in the same pass, so nothing is recomputed backwards; `head`
  is treated as frozen (it gets no gradient), as it is under LoRA.
  """
  b, t = input_ids.shape
  targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
  weights = jnp.pad(loss_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
  size = max(1, min(t, chunk_tokens // b))
  pad = -t % size
  total = _chunked_ce(*(_chunks(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)), size)
                        for x in (hidden, targets, weights)), head)
  return total / jnp.maximum(jnp.sum(weights), 1.0)


def _chunks(x, size):
  """[B, T, ...] -> [T / size, B, size, ...], the scan axis first."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, t // size, size, *x.shape[2:]), 1, 0)


def _ce_chunk(h, head, targets, weights):
  """(logits [B, C, vocab] float32, logsumexp, weighted cross-entropy sum) of one chunk."""
  logits = jnp.einsum("bce,ve->bcv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logits, lse, jnp.sum((lse - picked) * weights)


@jax.custom_vjp
def _chunked_ce(hidden, targets, weights, head):
  """Sum of weighted cross-entropies over chunked [N, B, C, ...] inputs."""
  def body(total, xs):
    return total + _ce_chunk(xs[0], head, xs[1], xs[2])[2], None
  return jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets, weights))[0]


def _chunked_ce_fwd(hidden, targets, weights, head):
  def body(total, xs):
    h, t, w = xs
    logits, lse, loss = _ce_chunk(h, head, t, w)
    probs = jnp.exp(logits - lse[..., None])
    dlogits = (probs - jax.nn.one_hot(t, head.shape[0], dtype=jnp.float32)) * w[..., None]
    dh = jnp.einsum("bcv,ve->bce", dlogits.astype(h.dtype), head.astype(h.dtype),
                    preferred_element_type=jnp.float32)
    return total + loss, dh.astype(h.dtype)
  total, dh = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets, weights))
  return total, dh


def _chunked_ce_bwd(dh, g):
  # The head is frozen and targets and weights are data: only `hidden` gets a cotangent.
  return (g * dh).astype(dh.dtype), None, None, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
