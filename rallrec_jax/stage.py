"""What a stage declares (`Stage`), and what stage bodies share: writing artifacts atomically,
keeping resumable partial work only for the key it was made under, and the stop on SIGTERM.

Each package that owns a stage declares it in its own `stage.py` beside the code it runs;
`pipeline` orders, fingerprints, skips and runs them.
"""
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from rallrec_jax import atomic


class Preempted(RuntimeError):
  """The run stopped on SIGTERM (a training loop after saving a checkpoint); rerunning the same
  command continues it."""


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  help: str                        # what it does and writes, for --help
  run: Callable                    # run(cfg, workdir)
  config_keys: tuple = ()          # config subtrees that decide its outputs
  deps: object = ()                # stages whose artifacts it reads (or a function of the cfg)
  outputs: tuple = ()              # workdir-relative paths it writes
  external_inputs: Callable = lambda cfg: []   # raw files it reads
  version: int = 1                 # bump when the stage's code changes its outputs
  distributed: bool = False        # runs on every process of a multi-host job (else process 0)
  needed: Callable = lambda cfg: True   # False: nothing reads it, so a full run leaves it out
  resumes: tuple = ()              # workdir-relative partial work it resumes from (--force clears)


def save_array(path, array):
  """np.save through a temporary name in the same folder."""
  with atomic.open_file(path) as f:
    np.save(f, np.asarray(array))


def save_json(path, value):
  atomic.write_text(path, json.dumps(value, indent=1) + "\n")


def resumable(paths, key_file, key):
  """Keep partial work in `paths` only if it was made for the same `key`; else delete it."""
  if key_file.is_file() and key_file.read_text() == key:
    return
  for path in paths:
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink(missing_ok=True)
  atomic.write_text(key_file, key)


def data_key(workdir):
  """Changes whenever the prepared dataset changes (its meta and item list)."""
  meta = Path(workdir) / "data" / "meta.json"
  items = Path(workdir) / "data" / "items.jsonl"
  return hashlib.sha256(meta.read_bytes() + items.read_bytes()).hexdigest()
