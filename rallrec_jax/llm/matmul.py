"""Two-operand einsums of 16-bit operands that accumulate in float32, forward and backward.

XLA's CPU backend runs a dot of bfloat16 operands with a float32 result several times faster
than one with a bfloat16 result, and far faster than a float32 dot on a CPU with bfloat16
matrix units (AMX, AVX512-BF16): README, benchmarks. `jnp.einsum(..., preferred_element_type=
float32)` gets the forward right, but its autodiff runs both gradient einsums on the float32
cotangent. `einsum_f32_acc` casts the cotangent to the operands' dtype first, so that all three
einsums take 16-bit operands and accumulate in float32; the result is cast back to the operands'
dtype. On accelerators this is what their 16-bit matmuls do anyway.

Every index must appear in at least two of the three terms (no index summed within one operand):
then the gradient of one operand is the einsum of the cotangent with the other.
"""
import functools

import jax
import jax.numpy as jnp


def _einsum(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32_acc(spec, a, b):
  """jnp.einsum(spec, a, b) accumulated in float32, in a's dtype (see the module doc)."""
  return _einsum(spec, a, b).astype(a.dtype)


def _fwd(spec, a, b):
  return einsum_f32_acc(spec, a, b), (a, b)


def _bwd(spec, res, g):
  a, b = res
  ins, out = spec.split("->")
  left, right = ins.split(",")
  g = g.astype(a.dtype)
  da = _einsum(f"{out},{right}->{left}", g, b).astype(a.dtype)
  db = _einsum(f"{left},{out}->{right}", a, g).astype(b.dtype)
  return da, db


einsum_f32_acc.defvjp(_fwd, _bwd)
