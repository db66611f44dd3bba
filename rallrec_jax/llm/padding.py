"""Left padding of token sequences, the one layout every batch of prompts uses.

Left padding puts each row's last real token at the last position, where the answer logits
are read, so training, scoring and embedding see prompts laid out the same way.
"""
import numpy as np


def round_up(n, multiple):
  return -(-n // multiple) * multiple


def left_pad(sequences, length, pad_id):
  """Left-padded int32 [len(sequences), length] values and their 0/1 mask."""
  values = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for r, seq in enumerate(sequences):
    if len(seq) > length:
      raise ValueError(f"row {r} has {len(seq)} tokens, more than the padded length {length}")
    if len(seq):
      values[r, length - len(seq):] = seq
      mask[r, length - len(seq):] = 1
  return values, mask
