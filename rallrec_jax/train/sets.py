"""Instruction-tuning sets: which train samples are used, and with which prompt variant.

A training set is a list of (retrieval order, sample index in the train split) pairs; the
order names the `retrieve` result whose history goes into that sample's prompt. All variants
draw from one seeded pool (PAPER.md step 9), so they train on the same samples and differ only
in how the prompts are built.

"mixed" reading of PAPER.md's "1024 samples x 2 by default": 1024 is the number of pool samples
(`mixed_size`) and the factor is the number of prompt variants per sample, which is the length
of `mixed_orders`. The paper names three variants (by similarity, similarity-retrieved in time
order, last K in time order), so the default is the three orders "high", "sequential" and
"simple" (3072 examples); passing two orders gives the literal 1024 x 2.
"""
import numpy as np

POOL_SIZE = 8192
POOL_SEED = 42
MIXED_SIZE = 1024
MIXED_ORDERS = ("high", "sequential", "simple")
VARIANTS = ("simple", "rag", "rerank", "mixed")


def pool(num_train, size=POOL_SIZE, seed=POOL_SEED):
  """int64 indices of `size` distinct train samples (all of them, shuffled, when fewer).

  The indices come in the order drawn, so any prefix of the pool is itself a random sample.
  """
  if num_train < 0 or size < 0:
    raise ValueError(f"num_train={num_train} and size={size} must be non-negative")
  order = np.random.default_rng(seed).permutation(num_train)
  return order[:min(size, num_train)].astype(np.int64)


def orders(variant, order):
  """The retrieval orders whose train-split histories a variant's prompts use."""
  if variant == "mixed":
    return MIXED_ORDERS
  return ({"simple": "simple", "rerank": "rerank"}.get(variant, order),)


def training_set(variant, pool_indices, retrievals_by_order, *, order="rerank",
                 mixed_size=MIXED_SIZE, mixed_orders=MIXED_ORDERS):
  """[(order, sample index)] of one variant, checked against the retrievals at hand.

  "simple" prompts list the last K items, "rerank" the reranked retrieval, "rag" the configured
  retrieval `order`; each takes the whole pool once. "mixed" takes the first `mixed_size` pool
  samples, each once per order of `mixed_orders`, interleaved sample by sample so that every
  stretch of the set holds all variants.
  """
  pool_indices = np.asarray(pool_indices, np.int64)
  if variant == "mixed":
    pairs = [(o, int(s)) for s in pool_indices[:mixed_size] for o in mixed_orders]
  elif variant in VARIANTS:
    single = {"simple": "simple", "rag": order, "rerank": "rerank"}[variant]
    pairs = [(single, int(s)) for s in pool_indices]
  else:
    raise ValueError(f"unknown training set variant {variant!r}; known: {VARIANTS}")
  _check_covered(pairs, retrievals_by_order)
  return pairs


def _check_covered(pairs, retrievals_by_order):
  """Fail early when an order has no retrieval, or its retrieval lacks one of the samples."""
  by_order = {}
  for o, s in pairs:
    by_order.setdefault(o, []).append(s)
  for o, samples in by_order.items():
    if o not in retrievals_by_order:
      raise ValueError(f"the training set needs the {o!r} retrieval; have "
                       f"{sorted(retrievals_by_order)}")
    missing = np.setdiff1d(samples, retrievals_by_order[o]["sample"])
    if len(missing):
      raise ValueError(f"the {o!r} retrieval lacks train sample {int(missing[0])}")
