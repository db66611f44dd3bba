"""Rotary position embeddings with the default, "linear" and "llama3" frequency schedules."""
import math

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim, theta, scaling):
  """Per-pair inverse frequencies [head_dim // 2], float32 numpy as transformers computes them."""
  exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
  inv = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    inv = inv / scaling["factor"]
  elif kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  elif kind != "default":
    raise ValueError(f"unsupported rope_type {kind!r}")
  return inv


def sin_cos(positions, inv_freq):
  """sin and cos [..., T, head_dim] for integer positions [..., T] (float32)."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.sin(angles), jnp.cos(angles)


def apply(x, sin, cos):
  """Rotate x [B, T, heads, head_dim] by the half-split convention of Hugging Face Llama."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return out.astype(x.dtype)
