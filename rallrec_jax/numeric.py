"""Numeric helpers shared across packages."""
import numpy as np


def unit_rows(x):
  """Rows of the float array `x` scaled to unit length, in its dtype; all-zero rows stay zero
  instead of becoming NaN."""
  x = np.asarray(x)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norms, np.finfo(x.dtype).tiny)
