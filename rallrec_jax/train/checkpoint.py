"""Resumable training checkpoints: the train-state pytree plus a JSON record of the run.

Each directory holds one orbax `CheckpointManager` with two items per step: "state" (trained
weights, optimizer state, step, rng) and "meta" (data position, epoch, best evaluation, and the LoRA and
base-model fields that fix the state's shapes). The state is restored straight into the
shardings of a caller-provided abstract state, so a run can resume on a different mesh.
"""
import dataclasses
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from rallrec_jax.llm import lora

ITEMS = ("state", "meta")


def manager(directory, max_to_keep=None):
  """The checkpoint manager of `directory`, created if missing.

  Every step is kept by default: adapters are small, and the best step of an early-stopped run
  may lie several evaluations back.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=ITEMS)


def latest_step(mngr):
  """The newest saved step, or None for an empty directory."""
  return mngr.latest_step()


def compat(cfg, lora_cfg):
  """The fields that must match for a checkpoint's state to fit this model and its trained
  weights (LoRA adapters, or every weight when `lora_cfg` is None)."""
  return {"lora": None if lora_cfg is None else dataclasses.asdict(lora_cfg),
          "base": {f: getattr(cfg, f) for f in lora.BASE_FIELDS}}


def save(mngr, step, state, meta):
  """Write `state` and `meta` at `step` and wait, so a preempted process leaves it whole."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  mngr.save(step, args=args, force=True)
  mngr.wait_until_finished()


def abstract(state):
  """Shape, dtype and sharding of every leaf: the target `restore` lays the state out on."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def read_meta(mngr, step=None):
  """The JSON meta of `step` (default: the newest)."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{mngr.directory}: no checkpoint")
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mngr, abstract_state, step=None, expect=None):
  """(state, meta) of `step` (default: the newest), laid out like `abstract_state`.

  With `expect` (see `compat`), the stored meta is checked first, so a checkpoint of another
  rank, other targets or another base model is a ValueError naming the field, not a shape error
  from deep inside the restore.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{mngr.directory}: no checkpoint to restore")
  meta = read_meta(mngr, step)
  if expect is not None:
    check(meta, expect, f"{mngr.directory} step {step}")
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
  return mngr.restore(step, args=args)["state"], meta


def restore_weights(mngr, abstract_weights, step, expect=None):
  """The trained weights alone of `step`, laid out like `abstract_weights`.

  The optimizer state is not read, so its layout (clipping, accumulation) need not be rebuilt.
  """
  if expect is not None:
    check(read_meta(mngr, step), expect, f"{mngr.directory} step {step}")
  target = {"weights": abstract_weights}
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return mngr.restore(step, args=args)["state"]["weights"]


def check(meta, expect, where):
  """Raise a ValueError naming the first LoRA or base-model field that differs."""
  def fields(record):
    method = "full" if record["lora"] is None else "lora"
    out = {"method": method, **{f"base {k}": v for k, v in record["base"].items()}}
    if method == "lora":
      out.update(rank=record["lora"]["rank"], targets=tuple(record["lora"]["targets"]),
                 layers=record["lora"].get("layers", 0))
    return out

  stored, wanted = fields(meta), fields(expect)
  for name, value in wanted.items():
    if stored.get(name) != value:
      raise ValueError(f"{where}: checkpoint has {name} = {stored.get(name)!r}, "
                       f"the current model needs {value!r}")
