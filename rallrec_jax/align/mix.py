"""The item vectors that retrieval compares (RALLRec step 5): text, cf and joint blocks mixed.

Each block is divided by its own largest row L2 norm, one global scale per block rather than
per row: the scale stops a block from dominating the concatenation just because its features
are larger, while the relative norms of rows inside a block survive. A block weight then sets
that block's largest row norm, and so its share of the cosine similarity over the
concatenation. Blocks are concatenated in the fixed order text, cf, joint.
"""
import numpy as np

from rallrec_jax import numeric

BLOCKS = ("text", "cf", "joint")
VARIANTS = {"text": ("text",), "cf": ("cf",), "mix": ("text", "cf"),
            "mix3": ("text", "cf", "joint")}


def mix(blocks, variant="mix3", weights=None):
  """Concatenate the variant's blocks, each scaled so its largest row norm equals its weight.

  `blocks` maps names in BLOCKS to [N, d] arrays (blocks the variant does not use are
  ignored); `weights` maps block names to non-negative floats, 1 where absent.
  """
  names = _variant_blocks(variant)
  weights = _check_weights(weights or {})
  arrays = [_block(blocks, name, variant) for name in names]
  _check_rows(names, arrays)
  scaled = [_unit_max_norm(name, a) * np.float32(weights.get(name, 1.0))
            for name, a in zip(names, arrays)]
  return np.concatenate(scaled, axis=1).astype(np.float32)


def cosine(queries, keys):
  """[Q, K] cosine similarities between rows; a zero row is similar to nothing (0)."""
  return (numeric.unit_rows(np.asarray(queries, np.float32))
          @ numeric.unit_rows(np.asarray(keys, np.float32)).T)


def _variant_blocks(variant):
  if variant not in VARIANTS:
    raise ValueError(f"unknown mix variant {variant!r}; choose one of {tuple(VARIANTS)}")
  return VARIANTS[variant]


def _check_weights(weights):
  unknown = sorted(set(weights) - set(BLOCKS))
  if unknown:
    raise ValueError(f"weights name unknown blocks {unknown}; blocks are {BLOCKS}")
  bad = {k: v for k, v in weights.items() if not (np.isfinite(v) and v >= 0)}
  if bad:
    raise ValueError(f"block weights must be finite and non-negative, got {bad}")
  return weights


def _block(blocks, name, variant):
  if name not in blocks:
    raise ValueError(f"mix variant {variant!r} needs block {name!r}, but only "
                     f"{sorted(blocks)} were given")
  array = np.asarray(blocks[name], np.float32)
  if array.ndim != 2:
    raise ValueError(f"block {name!r} must be a 2-D [items, dim] array, got shape {array.shape}")
  return array


def _check_rows(names, arrays):
  rows = {name: a.shape[0] for name, a in zip(names, arrays)}
  if len(set(rows.values())) > 1:
    raise ValueError(f"blocks have different row counts {rows}; every block needs one row "
                     f"per item")


def _unit_max_norm(name, array):
  """Divide by the largest row norm; an all-zero block has no scale and is an error."""
  largest = np.linalg.norm(array, axis=1).max(initial=0.0)
  if not np.isfinite(largest) or largest == 0:
    raise ValueError(f"block {name!r} has largest row norm {largest}; it cannot be scaled")
  return array / largest


