"""How a fine-tune's state is laid out in its checkpoints: one tree per decoder layer.

Checkpoints hold per-layer trees ("layers_i") in either layout of the decoder's layers: a
stacked "layers" tree is split at save and stacked again at restore, so a run can resume in the
other layout. The meta names the LoRA and base-model fields that fix the state's shapes, so a
checkpoint of another rank, other targets or another base model is an error naming the field.
"""
import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec

from rallrec_jax.llm import lora
from rallrec_jax.llm.model import stack_layers, unstack_layers
from rallrec_jax.train import checkpoint


def compat(cfg, lora_cfg):
  """The fields that must match for a checkpoint's state to fit this model and its trained
  weights (LoRA adapters, or every weight when `lora_cfg` is None)."""
  return {"lora": None if lora_cfg is None else dataclasses.asdict(lora_cfg),
          "base": {f: getattr(cfg, f) for f in lora.BASE_FIELDS}}


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


class PerLayer(checkpoint.Layout):
  """The layout of a fine-tune of decoder `cfg` (LoRA `lora_cfg`, or every weight: None)."""

  def __init__(self, cfg, lora_cfg):
    self._compat = compat(cfg, lora_cfg)
    self._num_layers = cfg.num_layers

  def meta(self):
    return self._compat

  def check(self, meta, where):
    check(meta, self._compat, where)

  def stored(self, state):
    return jax.tree.map(
        lambda node: unstack_layers(node, self._num_layers) if _stacked(node) else node,
        state, is_leaf=_stacked)

  def target(self, abstract_state):
    def split(node):
      layers = jax.tree.map(_abstract_layer, node["layers"])
      n = jax.tree.leaves(node["layers"])[0].shape[0]
      rest = {k: v for k, v in node.items() if k != "layers"}
      return rest | {f"layers_{self._num_layers - n + j}": layers for j in range(n)}
    return jax.tree.map(lambda node: split(node) if _stacked(node) else node, abstract_state,
                        is_leaf=_stacked)

  def loaded(self, abstract_state, restored):
    """`restored` (per layer) with the stacks of `abstract_state` rebuilt in their shardings."""
    def rebuild(target, node):
      if not _stacked(target):
        return node
      return jax.tree.map(lambda a, t: jax.device_put(a, t.sharding), stack_layers(node), target)
    return jax.tree.map(rebuild, abstract_state, restored, is_leaf=_stacked)


def _stacked(node):
  return isinstance(node, dict) and "layers" in node


def _abstract_layer(leaf):
  """One layer's ShapeDtypeStruct of a stacked one (whose layers axis is never split)."""
  sharding = leaf.sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
  return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
