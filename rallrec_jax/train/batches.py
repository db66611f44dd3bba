"""Batches of token-id examples: left padding to bucketed lengths and a resumable shuffle.

Rows are left-padded (`llm.padding`) to the longest of the batch rounded up to a multiple of
`bucket`, so that only a few shapes are ever compiled.

The shuffle is a pure function of (seed, epoch), and `start` counts examples already consumed,
so a run resumed from a step count continues with exactly the batches it would have seen.
"""
import numpy as np

from rallrec_jax.llm import padding


def pad_batch(examples, rows, pad_id, bucket=32):
  """{"input_ids", "attention_mask", "loss_mask"}: left-padded int32 [len(rows), T] arrays,
  and "label" [len(rows)] when `examples` has labels.

  `examples` holds "input_ids" and "loss_mask" lists (as `build_examples` returns them); T is
  the longest of `rows` rounded up to a multiple of `bucket`.
  """
  rows = list(rows)
  if not rows:
    raise ValueError("a batch needs at least one row")
  length = padding.round_up(max(len(examples["input_ids"][i]) for i in rows), bucket)
  ids, mask = padding.left_pad([examples["input_ids"][i] for i in rows], length, pad_id)
  loss_mask, _ = padding.left_pad([examples["loss_mask"][i] for i in rows], length, 0)
  out = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
  if "label" in examples:
    out["label"] = np.asarray(examples["label"], np.int32)[rows]
  return out


def permutation(num_examples, seed, epoch=0):
  """The example order of one epoch, a function of (seed, epoch) alone."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(examples, batch_size, seed, start=0):
  """Row-index arrays of one shuffled epoch, skipping the first `start` examples of its order.

  The last batch may be short: every example is seen once per epoch.
  """
  return _epoch_batches(len(examples["input_ids"]), batch_size, seed, 0, start)


def epochs(examples, batch_size, seed, start=0):
  """(epoch, row indices) forever, a new order each epoch; `start` counts examples from the
  very beginning of training, across epochs. Batches never straddle two epochs."""
  n = len(examples["input_ids"])
  if n == 0:
    raise ValueError("cannot draw batches from no examples")
  epoch, offset = divmod(start, n)
  while True:
    for rows in _epoch_batches(n, batch_size, seed, epoch, offset):
      yield epoch, rows
    epoch, offset = epoch + 1, 0


def _epoch_batches(n, batch_size, seed, epoch, start):
  """Batches of one epoch's order from `start`; bad arguments fail at the call, not later."""
  if batch_size <= 0 or not 0 <= start <= n:
    raise ValueError(f"batch_size={batch_size} must be positive and start={start} in [0, {n}]")
  order = permutation(n, seed, epoch)
  return (order[begin:begin + batch_size] for begin in range(start, n, batch_size))
