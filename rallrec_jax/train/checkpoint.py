"""Resumable training checkpoints: the train-state pytree plus a JSON record of the run.

Each directory holds one orbax `CheckpointManager` with two items per step: "state" (trained
weights, optimizer state, step, rng) and "meta" (data position, epoch, best evaluation, and the LoRA and
base-model fields that fix the state's shapes). The state is restored straight into the
shardings of a caller-provided abstract state, so a run can resume on a different mesh.
Checkpoints hold per-layer trees ("layers_i") in either layout of the decoder's layers: a
stacked "layers" tree is split at save and stacked again at restore, so a run can also resume
in the other layout.
"""
import dataclasses
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from rallrec_jax.llm import lora
from rallrec_jax.llm.model import stack_layers, unstack_layers

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


def _stacked(node):
  return isinstance(node, dict) and "layers" in node


def _per_layer(tree, num_layers):
  """`tree` with each stacked "layers" dict in it split into "layers_i" dicts."""
  return jax.tree.map(lambda node: unstack_layers(node, num_layers) if _stacked(node) else node,
                      tree, is_leaf=_stacked)


def _abstract_layer(leaf):
  """One layer's ShapeDtypeStruct of a stacked one (whose layers axis is never split)."""
  sharding = leaf.sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
  return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)


def _per_layer_abstract(tree, num_layers):
  def split(node):
    layers = jax.tree.map(_abstract_layer, node["layers"])
    n = jax.tree.leaves(node["layers"])[0].shape[0]
    rest = {k: v for k, v in node.items() if k != "layers"}
    return rest | {f"layers_{num_layers - n + j}": layers for j in range(n)}
  return jax.tree.map(lambda node: split(node) if _stacked(node) else node, tree,
                      is_leaf=_stacked)


def _restack(abstract_tree, restored):
  """`restored` (per layer) with the stacks of `abstract_tree` rebuilt in their shardings."""
  def rebuild(target, node):
    if not _stacked(target):
      return node
    return jax.tree.map(lambda a, t: jax.device_put(a, t.sharding), stack_layers(node), target)
  return jax.tree.map(rebuild, abstract_tree, restored, is_leaf=_stacked)


def save(mngr, step, state, meta):
  """Write `state` and `meta` at `step` and wait, so a preempted process leaves it whole."""
  state = _per_layer(state, meta["base"]["num_layers"])
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
  target = _per_layer_abstract(abstract_state, meta["base"]["num_layers"])
  args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
  return _restack(abstract_state, mngr.restore(step, args=args)["state"]), meta


def restore_weights(mngr, abstract_weights, step, expect=None):
  """The trained weights alone of `step`, laid out like `abstract_weights`.

  The optimizer state is not read, so its layout (clipping, accumulation) need not be rebuilt.
  """
  meta = read_meta(mngr, step)
  if expect is not None:
    check(meta, expect, f"{mngr.directory} step {step}")
  target = {"weights": _per_layer_abstract(abstract_weights, meta["base"]["num_layers"])}
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return _restack(abstract_weights, mngr.restore(step, args=args)["state"]["weights"])


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
