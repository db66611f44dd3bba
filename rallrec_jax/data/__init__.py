"""The data layer: raw loaders per dataset, and the canonical dataset they all become.

Each dataset module exposes `load(cfg) -> RawData` and `input_files(cfg) -> [Path]` (the raw
files whose content decides the result), where `cfg` is the config's `data` block.
"""
import dataclasses
from typing import Callable

from rallrec_jax.data import amazon, bookcrossing, build, movielens, synthetic, tfds_source
from rallrec_jax.data.errors import DataError
from rallrec_jax.data.raw import RawData
from rallrec_jax.data.schema import SPLITS, Dataset, Samples, Timelines, load, load_dataset, save


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  load: Callable
  input_files: Callable
  sampling: str


DATASETS = {
    "synthetic": DatasetSpec(synthetic.load, synthetic.input_files, "chronological"),
    "ml100k": DatasetSpec(movielens.load_ml100k, movielens.input_files_ml100k, "chronological"),
    "ml1m": DatasetSpec(movielens.load_ml1m, movielens.input_files_ml1m, "chronological"),
    "bookcrossing": DatasetSpec(bookcrossing.load, bookcrossing.input_files, "per_user_random"),
    "amazon_movies": DatasetSpec(amazon.load, amazon.input_files, "chronological"),
}


def _spec_and_loader(cfg):
  spec = DATASETS[cfg.name]
  if cfg.source == "tfds":
    return spec, tfds_source.load, tfds_source.input_files
  return spec, spec.load, spec.input_files


def input_files(cfg):
  """Raw files that `prepare(cfg)` reads (for fingerprints)."""
  return _spec_and_loader(cfg)[2](cfg)


def prepare(cfg):
  """Load the raw data named by the `data` config block and build the canonical dataset."""
  spec, loader, _ = _spec_and_loader(cfg)
  raw = loader(cfg)
  return build.build(raw, name=cfg.name, sampling=spec.sampling, min_history=cfg.min_history,
                     label_threshold=cfg.label_threshold, split=tuple(cfg.split), seed=cfg.seed)


__all__ = ["DATASETS", "DataError", "Dataset", "RawData", "SPLITS", "Samples", "Timelines",
           "input_files", "load", "load_dataset", "prepare", "save"]
