"""The stage graph: which stages exist, what each reads and writes, and when to skip one.

A stage is a function `run(cfg, workdir)` that reads the config and earlier artifacts and
writes its own artifacts atomically. After it finishes, `W/manifests/{stage}.json` records
the config subtrees it used, the fingerprints of its external inputs (raw files), the output
fingerprints of the stages it depends on, and the fingerprints of its outputs. A rerun skips a
stage whose manifest still matches and whose outputs are unchanged.

Under several processes (rallrec_jax.distributed), stages marked `distributed` run on every
process; the others run on process 0 while the rest wait for the stage's manifest of this run.
Only process 0 writes manifests.
"""
import hashlib
import json
import logging
import secrets
import shutil
import textwrap
import time
from pathlib import Path

from rallrec_jax import atomic
from rallrec_jax import config as config_lib
from rallrec_jax import distributed
from rallrec_jax.align import stage as align_stage
from rallrec_jax.cf import stage as cf_stage
from rallrec_jax.data import stage as data_stage
from rallrec_jax.eval import stage as eval_stage
from rallrec_jax.retrieval import stage as retrieval_stage
from rallrec_jax.stage import Preempted
from rallrec_jax.text import stage as text_stage
from rallrec_jax.train import stage as train_stage

log = logging.getLogger("rallrec_jax")

_CHUNK = 1 << 20
LARGE_FILE = 256 << 20
_FILE_HASHES = {}


class PipelineError(RuntimeError):
  """A stage cannot run as asked (a missing or stale upstream artifact, an unknown stage)."""


# Run order. Adding a stage: declare it in a `stage.py` beside its code, add it here.
REGISTRY = (data_stage.PREPARE, text_stage.DESCRIBE, text_stage.EMBED, cf_stage.CF,
            align_stage.ALIGN, align_stage.MIX, retrieval_stage.INDEX, retrieval_stage.RETRIEVE,
            train_stage.FINETUNE, eval_stage.EVALUATE, eval_stage.RECOMMEND,
            train_stage.EXPORT)

STAGES = {}


def register(stage):
  if stage.name in STAGES:
    raise ValueError(f"stage {stage.name!r} registered twice")
  STAGES[stage.name] = stage
  return stage


def deps_of(stage, cfg):
  deps = stage.deps(cfg) if callable(stage.deps) else stage.deps
  unknown = [d for d in deps if d not in STAGES]
  if unknown:
    raise PipelineError(f"stage {stage.name!r} depends on unregistered stages {unknown}")
  return tuple(deps)


for _stage in REGISTRY:
  register(_stage)


def describe_stages():
  """One line per stage, in run order."""
  width = max(len(n) for n in STAGES)
  return "\n".join(textwrap.fill(s.help, 96, initial_indent=f"  {s.name:<{width}}  ",
                                 subsequent_indent=" " * (width + 4))
                   for s in STAGES.values())


def fingerprint(path):
  """sha256 of a file's bytes, or of a folder's sorted (relative path, file hash) pairs.

  Files over LARGE_FILE bytes (model weights, multi-GB review dumps) are fingerprinted by size
  and modification time instead: hashing them on every run would cost minutes.
  """
  path = Path(path)
  h = hashlib.sha256()
  if path.is_dir():
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
      h.update(f"{f.relative_to(path).as_posix()}\0{fingerprint(f)}\0".encode())
    return h.hexdigest()
  stat = path.stat()
  if stat.st_size > LARGE_FILE:
    return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
  # Every stage's up-to-date check re-reads its upstream artifacts: hash each file version once.
  key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
  if key not in _FILE_HASHES:
    with open(path, "rb") as f:
      while block := f.read(_CHUNK):
        h.update(block)
    _FILE_HASHES[key] = h.hexdigest()
  return _FILE_HASHES[key]


def _manifest_path(workdir, name):
  return Path(workdir) / "manifests" / f"{name}.json"


def read_manifest(workdir, name):
  path = _manifest_path(workdir, name)
  if not path.is_file():
    return None
  return json.loads(path.read_text())


def _expected(stage, cfg, workdir):
  """The manifest fields that must match for `stage` to be up to date."""
  deps = {}
  for dep in deps_of(stage, cfg):
    manifest = read_manifest(workdir, dep)
    if manifest is None:
      raise PipelineError(f"stage {stage.name!r} needs the artifacts of {dep!r}, which has not "
                          f"run in {workdir}: add {dep} to --stages")
    if not _is_current(STAGES[dep], workdir, manifest, _expected(STAGES[dep], cfg, workdir)):
      raise PipelineError(f"stage {stage.name!r} needs {dep!r}, whose artifacts in {workdir} are "
                          f"out of date for this config: add {dep} to --stages")
    deps[dep] = manifest["outputs"]
  inputs = {str(p): fingerprint(p) for p in stage.external_inputs(cfg)}
  config = {k: config_lib.result_config(cfg, k) for k in stage.config_keys}
  return {"stage": stage.name, "version": stage.version, "config": config, "inputs": inputs,
          "deps": deps}


def _check_upstream(selected, cfg, workdir):
  """Name at once every stage that the selection needs but that has not run or is stale."""
  names = {s.name for s in selected}
  missing = {}

  def visit(stage):
    for dep in deps_of(stage, cfg):
      if dep in names or dep in missing:
        continue
      missing[dep] = _upstream_problem(dep, cfg, workdir)
      if missing[dep]:
        visit(STAGES[dep])

  for stage in selected:
    visit(stage)
  problems = [(n, missing[n]) for n in STAGES if missing.get(n)]
  if problems:
    said = "; ".join(f"{n!r} {why}" for n, why in problems)
    raise PipelineError(f"the selected stages need the artifacts of stages that are not ready in "
                        f"{workdir} ({said}): add {','.join(n for n, _ in problems)} to --stages")


def _upstream_problem(name, cfg, workdir):
  """Why stage `name`'s artifacts cannot be used ("" when they are current)."""
  manifest = read_manifest(workdir, name)
  if manifest is None:
    return "has not run"
  try:
    current = _is_current(STAGES[name], workdir, manifest, _expected(STAGES[name], cfg, workdir))
  except PipelineError:
    current = False
  return "" if current else "is out of date for this config"


def _clear_partial_work(stage, workdir):
  """Remove what `stage` would resume from, so that --force starts it afresh."""
  removed = []
  for rel in stage.resumes:
    path = Path(workdir) / rel
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()
    else:
      continue
    removed.append(rel)
  if removed:
    log.info("%s: --force: starting afresh, removed %s", stage.name, ", ".join(removed))


def _outputs(stage, workdir):
  return {out: fingerprint(Path(workdir) / out) for out in stage.outputs
          if (Path(workdir) / out).exists()}


def _stored_config(stored, expected):
  """A manifest's config as this version of the code would write it: keys that joined
  EXECUTION_KEYS since are dropped, and keys added to the config since (absent from it) read as
  their defaults, so that neither change makes finished stages out of date."""
  stored = config_lib.without_execution_keys(stored)
  base = config_lib.base_config()
  for key in expected:
    default = config_lib.result_config(base, key)
    if key not in stored:
      stored[key] = default
    elif isinstance(default, dict) and isinstance(stored[key], dict):
      before = {leaf[len(key) + 1:]: value
                for leaf, value in config_lib.VALUES_BEFORE_KEY.items()
                if leaf.startswith(key + ".")}
      stored[key] = {**default, **before, **stored[key]}
  return stored


def _is_current(stage, workdir, manifest, expected):
  if manifest is None:
    return False
  manifest = dict(manifest, config=_stored_config(manifest.get("config", {}), expected["config"]))
  if any(manifest.get(k) != v for k, v in expected.items()):
    return False
  outputs = _outputs(stage, workdir)
  return len(outputs) == len(stage.outputs) and outputs == manifest.get("outputs")


def select(names, cfg=None):
  """Stages to run, in registry order; None means all (those `cfg` needs, when given)."""
  if not names:
    return [s for s in STAGES.values() if cfg is None or s.needed(cfg)]
  unknown = [n for n in names if n not in STAGES]
  if unknown:
    raise PipelineError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGES)}")
  return [s for s in STAGES.values() if s.name in names]


def _run_id():
  """A random id of this pipeline run, the same on every process (process 0's draw)."""
  return str(distributed.broadcast_int(secrets.randbelow(2 ** 31 - 1)))


def run(cfg, workdir, stages=None, force=False, wait_timeout_s=None):
  """Run the selected stages in order, skipping those already up to date (unless `force`).

  Returns {stage name: "ran" | "skipped"}. Under several processes, a process other than 0
  gives up after `wait_timeout_s` seconds without the manifest it waits for (None: never).
  """
  config_lib.validate(cfg)
  workdir = Path(workdir)
  primary = distributed.is_primary()
  run_id = _run_id()
  selected = select(stages, cfg)
  for stage in selected:  # missing raw files fail here, before anything is written
    stage.external_inputs(cfg)
  _check_upstream(selected, cfg, workdir)
  if primary:
    workdir.mkdir(parents=True, exist_ok=True)
  else:
    distributed.wait_for(workdir.is_dir, f"{workdir}", wait_timeout_s)
  status, wrote_config = {}, False
  for stage in selected:
    expected = _expected(stage, cfg, workdir)
    if not force and _is_current(stage, workdir, read_manifest(workdir, stage.name), expected):
      log.info("%s: up to date, skipped (pass --force to rerun)", stage.name)
      status[stage.name] = "skipped"
      continue
    status[stage.name] = "ran"
    if force and stage.resumes:
      if primary:
        _clear_partial_work(stage, workdir)
      distributed.barrier(f"force-{stage.name}")
    if not primary:
      if stage.distributed:
        _run_body(stage, cfg, workdir)
      distributed.wait_for(
          lambda s=stage: (read_manifest(workdir, s.name) or {}).get("run") == run_id,
          f"the manifest of stage {stage.name!r} from process 0", wait_timeout_s)
      continue
    log.info("%s: running", stage.name)
    start = time.time()
    _run_body(stage, cfg, workdir)
    manifest = dict(expected, outputs=_outputs(stage, workdir),
                    seconds=round(time.time() - start, 3),
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), run=run_id)
    atomic.write_text(_manifest_path(workdir, stage.name), json.dumps(manifest, indent=1) + "\n")
    log.info("%s: done in %.1f s", stage.name, manifest["seconds"])
    if not wrote_config:
      _write_config(cfg, workdir)
      wrote_config = True
  return status


def _run_body(stage, cfg, workdir):
  """stage.run; a stop on SIGTERM within it (Preempted) names the stage, whose manifest is not
  written."""
  try:
    stage.run(cfg, workdir)
  except Preempted as e:
    raise Preempted(f"{stage.name} (no manifest written): {e}") from None


def _write_config(cfg, workdir):
  """W/config.json, the resolved config of the run, once one of its stages has succeeded: a
  run that fails before then leaves the config of the run that made the artifacts."""
  atomic.write_text(Path(workdir) / "config.json", cfg.to_json_best_effort(indent=2) + "\n")
