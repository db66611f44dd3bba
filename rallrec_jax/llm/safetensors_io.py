"""A small reader and writer of the safetensors format, for lazy per-shard reads.

The reader memory-maps each file and hands out numpy views of single tensors, so a loader can
read just the slice that one device needs (an 8B model never sits whole in host memory). bf16
comes through ml_dtypes. The writer streams tensors one at a time after a header that it
computes from shapes alone.
"""
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from rallrec_jax import atomic
from rallrec_jax.llm.config import CheckpointError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class SafetensorsFile:
  """Tensors of one .safetensors file as lazy numpy views."""

  def __init__(self, path):
    self.path = Path(path)
    size = self.path.stat().st_size
    try:
      with open(self.path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
          raise ValueError(f"header length {length} exceeds the file size {size}")
        header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{self.path}: not a valid safetensors file ({e})") from e
    header.pop("__metadata__", None)
    self._start = 8 + length
    self._entries = {}
    for name, entry in header.items():
      try:
        dtype = np.dtype(DTYPES[entry["dtype"]])
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = entry["data_offsets"]
      except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry") from e
      if end - begin != int(np.prod(shape)) * dtype.itemsize or self._start + end > size:
        raise CheckpointError(f"{self.path}: tensor {name!r} lies outside the file or has a "
                              f"wrong byte count; the file may be truncated")
      self._entries[name] = (dtype, shape, begin)
    self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

  def names(self):
    return list(self._entries)

  def shape(self, name):
    return self._entries[name][1]

  def tensor(self, name):
    dtype, shape, begin = self._entries[name]
    count = int(np.prod(shape))
    offset = self._start + begin
    return self._map[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)


class Checkpoint:
  """All tensors of a model folder: model.safetensors, or shards listed in the index file."""

  def __init__(self, folder):
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError) as e:
        raise CheckpointError(f"{index}: not a valid index ({e})") from e
      files = {f: SafetensorsFile(folder / f) for f in sorted(set(weight_map.values()))}
      self._where = {}
      for name, file in weight_map.items():
        if name not in files[file].names():
          raise CheckpointError(f"{folder / file}: missing tensor {name!r} listed in {INDEX}")
        self._where[name] = files[file]
    elif (folder / "model.safetensors").is_file():
      single = SafetensorsFile(folder / "model.safetensors")
      self._where = {name: single for name in single.names()}
    else:
      raise CheckpointError(f"{folder}: no model.safetensors or {INDEX}")

  def names(self):
    return list(self._where)

  def shape(self, name):
    return self._where[name].shape(name)

  def file(self, name):
    return self._where[name].path

  def tensor(self, name):
    return self._where[name].tensor(name)


def save(path, tensors, metadata=None):
  """Write {name: (shape, dtype, fetch)} where fetch() returns the array, one at a time."""
  header = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, (shape, dtype, _) in tensors.items():
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with atomic.open_file(path) as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, (shape, dtype, fetch) in tensors.items():
      array = np.ascontiguousarray(fetch(), dtype=dtype)
      if array.shape != tuple(shape):
        raise ValueError(f"tensor {name}: shape {array.shape}, header says {tuple(shape)}")
      f.write(array.tobytes())
