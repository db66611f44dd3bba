"""Sweeps: a config's `sweep()` expanded into runs, each with its workdir and command line.

A config module may define `sweep()`, a list of dicts of dotted overrides such as
`{"retrieval.k": 20}`, each dict one run; `one_at_a_time` and `paper_ablations` build such lists.
`expand("configs/ml1m.py:path=/data/ml-1m", root)` checks every key against the config and
names each run's workdir after its overrides (`{root}/retrieval.k=20`, `{root}/default`);
`command` is the `python -m rallrec_jax.main` line of a run and `done` says whether its
evaluation is complete.
"""
import dataclasses
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import ml_collections

from rallrec_jax import config as config_lib
from rallrec_jax.eval import results

K_VALUES = (5, 10, 15, 20, 25, 30)
POOL_SIZES = (256, 512, 1024, 2048, 4096, 8192)
DEFAULT_NAME = "default"
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 200


class SweepError(ValueError):
  """A sweep cannot be expanded: a missing sweep(), an unknown key, a bad value."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One setting of a sweep: its overrides, workdir and resolved config."""
  name: str
  overrides: dict
  workdir: str
  cfg: ml_collections.ConfigDict


def split_spec(spec):
  """"configs/ml1m.py:path=/x" -> ("configs/ml1m.py", "path=/x"); no ':' gives arg None."""
  path, sep, arg = str(spec).partition(":")
  return path, (arg if sep else None)


def load_module(path):
  """The config module at `path` (a .py file), loaded as config_flags does."""
  path = Path(path)
  if not path.is_file():
    raise SweepError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"rallrec_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise SweepError(f"{path} defines no get_config()")
  return module


def load(spec):
  """(module, config) of a config spec "file.py[:arg]"; the arg goes to get_config."""
  path, arg = split_spec(spec)
  module = load_module(path)
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  return module, cfg


def get_value(cfg, key):
  """The value at dotted `key`; a SweepError when it is not a key of `cfg`."""
  node = cfg
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise SweepError(f"unknown config key {key!r}")
    node = node[part]
  return node


def _plain(value):
  """Comparable form of a config value (tuples and lists alike)."""
  return json.loads(json.dumps(value, default=str))


def normalise(cfg, overrides):
  """`overrides` without the entries that equal the config's own value, sorted by key."""
  return {k: v for k, v in sorted(overrides.items())
          if _plain(v) != _plain(get_value(cfg, k))}


def one_at_a_time(cfg, axes):
  """The default run ({}) and, for each axis, one run per value with only that factor changed.

  `axes` maps an axis name to its values: a plain value sets the key named by the axis, a dict
  is a whole override set (for a factor that moves several keys together). Values equal to the
  config's own make the default run; the result has no duplicates.
  """
  runs, seen = [{}], {"{}"}
  for name, values in axes.items():
    for value in values:
      overrides = normalise(cfg, value if isinstance(value, dict) else {name: value})
      key = json.dumps(_plain(overrides), sort_keys=True)
      if key not in seen:
        seen.add(key)
        runs.append(overrides)
  return runs


def paper_ablations(cfg, *, ks=K_VALUES, pool_sizes=POOL_SIZES):
  """PAPER.md's one-factor ablations around `cfg` (the RALLRec setting).

  Embedding variant (mix.variant), retrieval order (retrieval.order, fine-tuned on prompts of
  the same order: finetune.variant=rag), K (retrieval.k), training pool size
  (finetune.pool_size) and training set (finetune.variant; "rag" is left out where it builds
  the default's set, i.e. when the default variant names the default order).
  """
  f, r = cfg.finetune, cfg.retrieval
  orders = [{} if o == r.order else {"retrieval.order": o, "finetune.variant": "rag"}
            for o in config_lib.ORDERS]
  rag_is_default = f.variant == r.order and f.variant in ("simple", "rerank")
  variants = [v for v in config_lib.FINETUNE_VARIANTS if not (v == "rag" and rag_is_default)]
  return one_at_a_time(cfg, {
      "mix.variant": config_lib.MIX_VARIANTS,
      "retrieval.order": orders,
      "retrieval.k": ks,
      "finetune.pool_size": pool_sizes,
      "finetune.variant": variants,
  })


def render(value):
  """A config value as `--config.key=VALUE` text that absl / config_flags parse back."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, (tuple, list)):
    items = [repr(v) if isinstance(v, str) else render(v) for v in value]
    return "(" + ",".join(items) + ("," if len(items) == 1 else "") + ")"
  raise SweepError(f"cannot pass {value!r} ({type(value).__name__}) as a command-line override")


def run_name(overrides):
  """Deterministic, filesystem-safe folder name of an override set ("default" when empty)."""
  if not overrides:
    return DEFAULT_NAME
  text = ",".join(f"{k}={render(v)}" for k, v in sorted(overrides.items()))
  safe = _SAFE.sub("_", text)
  if safe != text or len(safe) > _MAX_NAME:
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    safe = f"{safe[:_MAX_NAME]}-{digest}"
  return safe


def expand(spec, root, *, check_paths=False):
  """The runs of the config `spec` ("file.py[:arg]"), workdirs under `root`.

  Every override must name a key of the config and fit its type; with `check_paths` each run's
  config is also fully validated (which checks that data paths exist).
  """
  module, cfg = load(spec)
  path, _ = split_spec(spec)
  if not hasattr(module, "sweep"):
    raise SweepError(f"{path} defines no sweep()")
  runs, names = [], set()
  for i, entry in enumerate(module.sweep()):
    where = f"{path}: sweep entry {i} {entry!r}"
    if not isinstance(entry, dict):
      raise SweepError(f"{where}: each entry must be a dict of dotted overrides")
    try:
      overrides = normalise(cfg, entry)
    except SweepError as e:
      raise SweepError(f"{where}: {e}; the keys are those of "
                       f"rallrec_jax/config.py:base_config") from None
    try:
      run_cfg = config_lib.apply_overrides(cfg, overrides)
      name = run_name(overrides)
      if check_paths:
        config_lib.validate(run_cfg)
    except (SweepError, config_lib.ConfigError, TypeError) as e:
      raise SweepError(f"{where}: {e}") from None
    if name not in names:
      names.add(name)
      runs.append(Run(name, overrides, str(Path(root) / name), run_cfg))
  return runs


def command(spec, run, *, python="python", extra=()):
  """argv of `python -m rallrec_jax.main` for one run; `extra` flags go last."""
  return ([python, "-m", "rallrec_jax.main", "--config", str(spec), "--workdir", run.workdir]
          + [f"--config.{k}={render(v)}" for k, v in run.overrides.items()] + list(extra))


def done(workdir, cfg):
  """True when the evaluate stage finished: its manifest and, for the configured checkpoint,
  eval/{checkpoint}/{split}.json of every split."""
  workdir = Path(workdir)
  if not (workdir / "manifests" / "evaluate.json").is_file():
    return False
  folder = results.results_dir(workdir, cfg.eval.checkpoint)
  return all((folder / f"{split}.json").is_file() for split in cfg.eval.splits)
