"""LoRA adapters in PEFT's own format, out and back in, without torch or peft.

A PEFT LoRA folder is `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules,
...) and `adapter_model.safetensors`, one pair of tensors per adapted module named after the
module in the transformers model:

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]

Ours are A [*in_dims, r] and B [r, *out_dims] with the heads of q/k/v (output) and o (input)
on axes of their own; flattening those axes head-major (h * head_dim + d) gives Hugging Face's
feature order, the same that `hf_io` reads and writes for the base kernels. Both scale the
product by lora_alpha / r, so `save` writes adapters that `peft.PeftModel.from_pretrained`
applies exactly as `lora.apply` does, and `load` reads such a folder back, checked against the
base model: anything this decoder cannot apply is a CheckpointError naming the file and key.
"""
import json
import math
import re
from pathlib import Path

import jax
import numpy as np

from rallrec_jax import atomic, parallel
from rallrec_jax.llm import hf_io, lora, safetensors_io
from rallrec_jax.llm.config import CheckpointError
from rallrec_jax.llm.model import unstack_layers

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's path to the transformers model it wraps
MATRIX = {"a": "lora_A", "b": "lora_B"}
# adapter_config.json keys whose other values change what the adapters compute, and the value
# this decoder's LoRA implies (None and an empty list or dict mean the same: unset).
# A key that is absent reads as this value too, PEFT's default.
PLAIN = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
         "lora_bias": False, "modules_to_save": None, "rank_pattern": None,
         "alpha_pattern": None, "layer_replication": None, "exclude_modules": None,
         "target_parameters": None, "trainable_token_indices": None}


def _names(cfg, lora_cfg):
  """{PEFT tensor name: (our unrolled path, our shape, PEFT shape)} of every adapter tensor."""
  table = hf_io.key_table(cfg)
  out = {}
  for path, (shape, _) in lora.layer_specs(cfg, lora_cfg).items():
    module, kind = path[:-1], path[-1]
    hf = table[module + ("kernel",)][0].removesuffix(".weight")
    split = lora.IN_NDIM[module[-1]] if kind == "a" else 1
    features = math.prod(shape[:split] if kind == "a" else shape[split:])
    out[f"{PREFIX}{hf}.{MATRIX[kind]}.weight"] = (
        path, shape, (lora_cfg.rank, features) if kind == "a" else (features, lora_cfg.rank))
  return out


def _to_peft(kind, array):
  """A [*in, r] -> [r, in_features]; B [r, *out] -> [out_features, r]."""
  return (array.reshape(-1, array.shape[-1]) if kind == "a" else
          array.reshape(array.shape[0], -1)).T


def _layers_to_transform(cfg, lora_cfg):
  if not lora_cfg.layers:
    return None
  return list(range(lora.first_adapted(cfg, lora_cfg), cfg.num_layers))


def peft_config(cfg, lora_cfg, base_model=""):
  """The adapter_config.json of `lora_cfg` on base model `cfg` (its folder: `base_model`)."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank,
          "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
          "target_modules": list(lora_cfg.targets), "bias": "none", "fan_in_fan_out": False,
          "use_rslora": False, "use_dora": False, "modules_to_save": None,
          "layers_to_transform": _layers_to_transform(cfg, lora_cfg), "inference_mode": True,
          "base_model_name_or_path": str(base_model)}


def save(adapters, lora_cfg, folder, cfg, base_model=""):
  """Write `adapters` (either layout) as a PEFT LoRA folder for base model `cfg`; each file
  atomically. `base_model` goes into the config as base_model_name_or_path."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  per_layer = unstack_layers(adapters, cfg.num_layers)

  def fetch(path):
    node = per_layer
    for key in path:
      node = node[key]
    return _to_peft(path[-1], np.asarray(jax.device_get(node), np.float32))

  tensors = {name: (shape, np.float32, lambda p=path: fetch(p))
             for name, (path, _, shape) in _names(cfg, lora_cfg).items()}
  safetensors_io.save(folder / WEIGHTS, tensors, {"format": "pt"})
  atomic.write_text(folder / CONFIG, json.dumps(peft_config(cfg, lora_cfg, base_model),
                                                indent=2) + "\n")
  return folder


def _read_config(file):
  if not file.is_file():
    raise CheckpointError(f"{file}: missing (a PEFT adapter folder has {CONFIG})")
  try:
    meta = json.loads(file.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from e
  if not isinstance(meta, dict):
    raise CheckpointError(f"{file}: not a JSON object")
  return meta


def _lora_config(file, meta, cfg):
  """The LoraConfig that adapter_config.json `meta` describes on base model `cfg`."""
  def bad(key, why):
    return CheckpointError(f"{file}: key {key!r} = {meta.get(key)!r}: {why}")

  if meta.get("peft_type") != "LORA":
    raise bad("peft_type", "not a LoRA adapter (peft_type must be 'LORA')")
  for key, plain in PLAIN.items():
    if (meta.get(key, plain) or None) != (plain or None):
      raise bad(key, f"unsupported here (this decoder's LoRA has {key} = {plain!r})")
  targets = meta.get("target_modules")
  if not isinstance(targets, list) or not targets:
    raise bad("target_modules", f"give a list of module names among {tuple(lora.IN_NDIM)}")
  unknown = [t for t in targets if t not in lora.IN_NDIM]
  if unknown:
    raise bad("target_modules", f"unknown target module {unknown[0]!r}; this decoder adapts "
                                f"{tuple(lora.IN_NDIM)}")
  layers = _tail_layers(meta.get("layers_to_transform"), cfg, bad)
  try:
    return lora.LoraConfig(rank=meta.get("r"), alpha=float(meta.get("lora_alpha", 8)),
                           dropout=float(meta.get("lora_dropout", 0.0)),
                           targets=tuple(targets), layers=layers)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{file}: not a valid LoRA config ({e})") from e


def _tail_layers(chosen, cfg, bad):
  """LoraConfig.layers of PEFT's layers_to_transform: it must name the last n layers."""
  if chosen is None:
    return 0
  chosen = [chosen] if isinstance(chosen, int) else chosen
  n = cfg.num_layers
  if not isinstance(chosen, list) or not all(isinstance(i, int) for i in chosen):
    raise bad("layers_to_transform", "must be a layer index or a list of them")
  if any(not 0 <= i < n for i in chosen):
    raise bad("layers_to_transform", f"names a layer the base model lacks (it has {n})")
  if sorted(chosen) != list(range(n - len(chosen), n)):
    raise bad("layers_to_transform", f"only the last layers of the {n} can be adapted here")
  return len(chosen)


def _check_tensors(file, expected, cfg):
  """Every expected tensor present with its shape, and nothing else."""
  names = set(file.names())
  extra = sorted(names - set(expected))
  for name in extra:
    layer = re.search(r"\.layers\.(\d+)\.", name)
    if layer and int(layer.group(1)) >= cfg.num_layers:
      raise CheckpointError(f"{file.path}: tensor {name!r} is for layer {layer.group(1)}, but "
                            f"the base model has {cfg.num_layers} layers")
  if extra:
    raise CheckpointError(f"{file.path}: unexpected tensor {extra[0]!r} for the configured "
                          f"targets and layers on this base model")
  missing = sorted(set(expected) - names)
  if missing:
    raise CheckpointError(f"{file.path}: missing tensor {missing[0]!r}")
  for name, (_, _, shape) in expected.items():
    if tuple(file.shape(name)) != shape:
      raise CheckpointError(f"{file.path}: tensor {name!r} has shape {tuple(file.shape(name))}, "
                            f"this rank and base model need {shape}")


def load(folder, cfg, mesh=None, rules=parallel.DEFAULT_RULES):
  """(adapters in `cfg`'s layout and shardings on `mesh`, LoraConfig) of a PEFT LoRA folder
  for base model `cfg`.

  A missing file, a non-LoRA or unsupported config (bias, DoRA, rsLoRA, per-module ranks,
  layers other than the last n), an unknown target module, and a missing, extra or wrongly
  shaped tensor (one for a layer the base model lacks included) are CheckpointErrors naming
  the file and key.
  """
  folder = Path(folder)
  meta = _read_config(folder / CONFIG)
  lora_cfg = _lora_config(folder / CONFIG, meta, cfg)
  if not (folder / WEIGHTS).is_file():
    raise CheckpointError(f"{folder / WEIGHTS}: missing (a PEFT adapter folder has {WEIGHTS})")
  file = safetensors_io.SafetensorsFile(folder / WEIGHTS)
  expected = _names(cfg, lora_cfg)
  _check_tensors(file, expected, cfg)
  arrays = {path: np.asarray(file.tensor(name), np.float32).T.reshape(shape)
            for name, (path, shape, _) in expected.items()}
  return lora.place(arrays, cfg, lora_cfg, mesh, rules), lora_cfg
