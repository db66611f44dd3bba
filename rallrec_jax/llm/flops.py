"""Model FLOPs per token and per-device peaks, for model FLOPs utilisation (MFU).

Counting: a forward pass costs 2N FLOPs per token (N = parameters in matmuls, embedding
lookups excluded, the output projection included) plus causal attention, 2 * layers * heads *
head_dim * seq_len per token (QK^T and AV over half the sequence on average, 2 FLOPs per MAC).
LoRA training costs 4N (forward, plus the backward pass through activations; frozen weights get
no weight gradient) plus three times the forward attention term.
"""
import time

import jax
import jax.numpy as jnp

# bf16 dense peaks per chip, from the vendors' data sheets.
PEAKS = (("H100", 989e12), ("H200", 989e12), ("v5 lite", 197e12), ("v5e", 197e12),
         ("v5p", 459e12), ("v6", 918e12))


def matmul_params(cfg):
  """Parameters that take part in a matmul for every token (the output head included)."""
  # The input embedding is a lookup; tied, the same matrix is the output head's matmul.
  return cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def attention_flops(cfg, seq_len):
  return 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def scoring_flops_per_token(cfg, seq_len):
  """Forward FLOPs per token when only the last position is projected, onto two rows."""
  head = cfg.vocab_size * cfg.hidden_size
  return 2 * (matmul_params(cfg) - head) + attention_flops(cfg, seq_len) + 4 * cfg.hidden_size / seq_len


def lora_train_flops_per_token(cfg, seq_len):
  return 4 * matmul_params(cfg) + 3 * attention_flops(cfg, seq_len)


def full_train_flops_per_token(cfg, seq_len):
  """Full fine-tuning: forward, input gradients and weight gradients of every matmul."""
  return 6 * matmul_params(cfg) + 3 * attention_flops(cfg, seq_len)


_measured = {}


def measured_matmul_peak(dtype=jnp.float32, n=1024, repeats=4, rounds=5):
  """FLOP/s of a jitted n x n matmul on the default device (used where no table entry fits).

  The best of several rounds: a busy machine slows some rounds, never speeds one up.
  """
  key = (jax.devices()[0].device_kind, jnp.dtype(dtype).name)
  if key not in _measured:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
      start = time.perf_counter()
      for _ in range(repeats):
        out = f(a)
      out.block_until_ready()
      best = min(best, time.perf_counter() - start)
    _measured[key] = 2 * n ** 3 * repeats / best
  return _measured[key]


def device_peak(device=None):
  """(peak FLOP/s per device, where it came from)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAKS:
    if name.lower() in kind.lower():
      return peak, f"table:{name}"
  return measured_matmul_peak(), f"measured f32 matmul on {kind}"


def mfu(flops_per_token, tokens_per_second, num_devices=None):
  peak, _ = device_peak()
  return flops_per_token * tokens_per_second / (peak * (num_devices or jax.device_count()))
