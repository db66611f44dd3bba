"""LoRA adapters for the decoder, added from outside the model with a method interceptor.

The base params stay untouched: `apply` runs the ordinary `Decoder` with a
`flax.linen.intercept_methods` hook that adds scale * dropout(x) @ A @ B to the output of every
targeted projection. Adapters are a separate small pytree that mirrors the param paths of the
targeted modules, {"layers_0": {"self_attn": {"q_proj": {"a": [*in_dims, r], "b": [r, *out]}}}},
so they can be differentiated, sharded and saved on their own. In the decoder's scanned layout
they stack the adapted layers like the params: {"layers": {... {"a": [n, *in_dims, r], ...}}}
for the last n layers. `apply` hands them to the decoder as the variable collection "lora",
which reaches every projection (per layer, inside the scan) beside its params. A is drawn as
PEFT draws it (kaiming-uniform), B starts at zero, so a fresh adapter leaves the model exactly
as it was. Saved adapters name each layer's tensors apart in either layout.
"""
from collections.abc import Mapping
import dataclasses
import functools
import json
import math
import zlib
from pathlib import Path

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax import atomic, parallel
from rallrec_jax.llm import safetensors_io
from rallrec_jax.llm.config import CheckpointError, LMConfig
from rallrec_jax.llm.model import Decoder, abstract_params, stack_layers, unstack_layers

# Projection name -> how many trailing input axes its kernel contracts.
IN_NDIM = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
           "down_proj": 1}
WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
COLLECTION = "lora"
# The LMConfig fields that fix the adapters' shapes, stored beside them.
BASE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
               "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings", "qkv_bias")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple = ("q_proj", "v_proj")
  layers: int = 0  # adapt only the last `layers` decoder layers (0: all of them)

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"LoRA rank={self.rank!r} must be a positive integer")
    if not isinstance(self.layers, int) or self.layers < 0:
      raise ValueError(f"LoRA layers={self.layers!r} must be a non-negative integer")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
    unknown = [t for t in self.targets if t not in IN_NDIM]
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(f"LoRA targets {self.targets}: a non-empty set of {tuple(IN_NDIM)}")

  @property
  def scale(self):
    return self.alpha / self.rank


def _path_id(path):
  """A stable integer per module path, so each module gets its own random stream."""
  return zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF


def first_adapted(cfg, lora_cfg):
  """The first decoder layer that carries adapters."""
  return cfg.num_layers - lora_cfg.layers if lora_cfg.layers else 0


def adapted_layer(cfg, lora_cfg, module_name):
  """Whether decoder module `module_name` ("layers_7", "norm", ...; "layers", the scanned
  stack) carries adapters."""
  if module_name == "layers":
    return True
  if not module_name.startswith("layers_"):
    return False
  return int(module_name.split("_", 1)[1]) >= first_adapted(cfg, lora_cfg)


def specs(cfg, lora_cfg):
  """{(*module path, "a" | "b"): (shape, logical axes)}, derived from the base kernels.

  With `lora_cfg.layers`, only the last that many decoder layers are adapted: gradients then
  stop at the first adapted layer, and the layers below it cost a forward pass only.
  """
  out = {}
  for path, leaf in traverse_util.flatten_dict(abstract_params(cfg)).items():
    if (path[-1] != "kernel" or path[-2] not in lora_cfg.targets
        or not adapted_layer(cfg, lora_cfg, path[0])):
      continue
    n, shape, names = IN_NDIM[path[-2]], leaf.value.shape, tuple(leaf.names)
    lead, lead_names = (), ()
    if path[0] == "layers":  # a stack of the adapted layers alone
      lead, lead_names = (cfg.num_layers - first_adapted(cfg, lora_cfg),), names[:1]
      shape, names = shape[1:], names[1:]
    out[path[:-1] + ("a",)] = (lead + shape[:n] + (lora_cfg.rank,),
                               lead_names + names[:n] + (None,))
    out[path[:-1] + ("b",)] = (lead + (lora_cfg.rank,) + shape[n:],
                               lead_names + (None,) + names[n:])
  return out


def layer_specs(cfg, lora_cfg):
  """`specs` of the unrolled layout, one entry per adapted layer whatever `cfg`'s layout: the
  tensors that saved adapters hold."""
  return specs(dataclasses.replace(cfg, scan_layers="false"), lora_cfg)


def _layer_paths(cfg, lora_cfg, path):
  """The unrolled paths of each layer of a stacked adapter path (`path` itself if unstacked)."""
  if path[0] != "layers":
    return [path]
  return [(f"layers_{i}",) + path[1:] for i in range(first_adapted(cfg, lora_cfg),
                                                      cfg.num_layers)]


def shardings(cfg, lora_cfg, mesh, rules=parallel.DEFAULT_RULES):
  """Adapter shardings: A follows the kernel's input axes, B its output axes."""
  return traverse_util.unflatten_dict({path: parallel.logical_sharding(shape, names, mesh, rules)
                     for path, (shape, names) in specs(cfg, lora_cfg).items()})


def _draw(rng, path, shape):
  """PEFT's kaiming-uniform(a=sqrt(5)) for A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B = 0."""
  if path[-1] == "b":
    return jnp.zeros(shape, jnp.float32)
  bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
  key = jax.random.fold_in(rng, _path_id(path))
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _draw_layers(rng, cfg, lora_cfg, path, shape):
  """`_draw` of each layer under its unrolled path, stacked for a stacked path: both layouts
  start from the same adapters."""
  paths = _layer_paths(cfg, lora_cfg, path)
  if paths == [path]:
    return _draw(rng, path, shape)
  return jnp.stack([_draw(rng, p, shape[1:]) for p in paths])


def _single_device_mesh():
  """The one-device mesh that `model.param_shardings` places unsharded params on."""
  return parallel.make_mesh((("data", 1),), jax.devices()[:1])


def init(rng, cfg, lora_cfg, mesh=None, rules=parallel.DEFAULT_RULES):
  """Fresh float32 adapters, created straight into their shardings on `mesh` (one device)."""
  shapes = {path: shape for path, (shape, _) in specs(cfg, lora_cfg).items()}

  def build(rng):
    return traverse_util.unflatten_dict({path: _draw_layers(rng, cfg, lora_cfg, path, shape)
                                         for path, shape in shapes.items()})

  out_shardings = shardings(cfg, lora_cfg, mesh or _single_device_mesh(), rules)
  return jax.jit(build, out_shardings=out_shardings)(rng)


def abstract(cfg, lora_cfg, mesh=None, rules=parallel.DEFAULT_RULES):
  """Shapes, dtypes and shardings of the adapters `init` creates, none of them allocated."""
  shapes = jax.eval_shape(lambda: init(jax.random.PRNGKey(0), cfg, lora_cfg, mesh, rules))
  return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes, shardings(cfg, lora_cfg, mesh or _single_device_mesh(), rules))


def _delta(x, pair, lora_cfg, rng):
  """scale * dropout(x) @ A @ B, contracting x's trailing input axes with A's."""
  if rng is not None and lora_cfg.dropout > 0:
    keep = jax.random.bernoulli(rng, 1.0 - lora_cfg.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lora_cfg.dropout), 0).astype(x.dtype)
  a, b = pair["a"].astype(x.dtype), pair["b"].astype(x.dtype)
  low = jnp.tensordot(x, a, axes=a.ndim - 1)
  return lora_cfg.scale * jnp.tensordot(low, b, axes=1)


def _interceptor(lora_cfg):
  """Adds the delta of a module's own "lora" variables ({"a", "b"} and, for dropout, "rng")."""
  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    pair = context.module.variables.get(COLLECTION)
    if not isinstance(pair, Mapping) or "a" not in pair:
      return out
    x = args[0] if args else kwargs["x"]
    return out + _delta(x, pair, lora_cfg, pair.get("rng")).astype(out.dtype)
  return intercept


def _with_rngs(cfg, lora_cfg, adapters, dropout_rng):
  """The adapters with each module's dropout key beside its pair: the key of a layer is that
  of its unrolled path in either layout, so both draw the same masks."""
  flat = traverse_util.flatten_dict(adapters)
  for path in [p[:-1] for p in flat if p[-1] == "a"]:
    keys = [jax.random.fold_in(dropout_rng, _path_id(p))
            for p in _layer_paths(cfg, lora_cfg, path)]
    flat[path + ("rng",)] = jnp.stack(keys) if path[0] == "layers" else keys[0]
  return traverse_util.unflatten_dict(flat)


def apply(cfg, params, adapters, lora_cfg, *args, method=None, dropout_rng=None, **kwargs):
  """`Decoder(cfg).apply` with the adapters added; dropout only when `dropout_rng` is given."""
  if dropout_rng is not None and lora_cfg.dropout > 0:
    adapters = _with_rngs(cfg, lora_cfg, adapters, dropout_rng)
  with nn.intercept_methods(_interceptor(lora_cfg)):
    return Decoder(cfg).apply({"params": params, COLLECTION: adapters}, *args, method=method,
                              **kwargs)


def merge(params, adapters, lora_cfg):
  """Params with W + scale * A @ B folded into each adapted kernel, in the kernel's dtype."""
  flat = traverse_util.flatten_dict(params)
  pairs = traverse_util.flatten_dict(adapters)
  for path, a in pairs.items():
    if path[-1] != "a":
      continue
    module = path[:-1]
    kernel = flat[module + ("kernel",)]
    b = pairs[module + ("b",)]
    product = functools.partial(jnp.tensordot, axes=1, precision=jax.lax.Precision.HIGHEST)
    if module[0] == "layers":  # a stack of the last layers
      first = kernel.shape[0] - a.shape[0]
      merged = kernel.astype(jnp.float32).at[first:].add(lora_cfg.scale * jax.vmap(product)(a, b))
    else:
      merged = kernel.astype(jnp.float32) + lora_cfg.scale * product(a, b)
    flat[module + ("kernel",)] = merged.astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def save(adapters, lora_cfg, folder, cfg):
  """Write adapter.safetensors ("/"-joined names, one per layer in either layout) and
  adapter_config.json, each atomically."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  per_layer = unstack_layers(adapters, cfg.num_layers)
  tensors = {"/".join(path): (a.shape, np.float32, lambda a=a: np.asarray(jax.device_get(a)))
             for path, a in traverse_util.flatten_dict(per_layer).items()}
  safetensors_io.save(folder / WEIGHTS, tensors, {"format": "rallrec-lora"})
  meta = {"lora": dataclasses.asdict(lora_cfg),
          "base": {f: getattr(cfg, f) for f in BASE_FIELDS}}
  atomic.write_text(folder / CONFIG, json.dumps(meta, indent=2) + "\n")
  return folder


def _read_config(folder):
  file = Path(folder) / CONFIG
  if not file.is_file():
    raise CheckpointError(f"{file}: missing (a LoRA adapter folder has {CONFIG})")
  try:
    meta = json.loads(file.read_text())
    return LoraConfig(**meta["lora"]), LMConfig(**meta["base"])
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{file}: not a valid LoRA adapter config ({e})") from e


def load(folder, cfg=None, mesh=None, rules=parallel.DEFAULT_RULES, rank=None):
  """(adapters, LoraConfig) from `save`'s folder, checked against the base model `cfg`.

  Without `cfg` the adapters are checked against (and laid out for) the base config stored
  beside them, in `scan_layers="auto"`'s layout. `rank`, when given, is the rank the caller
  expects. A tensor that is missing, unexpected or of the wrong shape for this base model and
  rank is a CheckpointError naming it.
  """
  lora_cfg, stored_base = _read_config(folder)
  if not (Path(folder) / WEIGHTS).is_file():
    raise CheckpointError(f"{Path(folder) / WEIGHTS}: missing")
  base = cfg or stored_base
  expected_cfg = lora_cfg if rank is None else dataclasses.replace(lora_cfg, rank=rank)
  expected = {"/".join(p): shape for p, (shape, _) in layer_specs(base, expected_cfg).items()}
  file = safetensors_io.SafetensorsFile(Path(folder) / WEIGHTS)
  _check(file, expected, expected_cfg)
  arrays = {tuple(name.split("/")): np.array(file.tensor(name), np.float32) for name in expected}
  return place(arrays, base, expected_cfg, mesh, rules), lora_cfg


def place(arrays, cfg, lora_cfg, mesh=None, rules=parallel.DEFAULT_RULES):
  """Adapters on the devices from host arrays {unrolled module path + ("a" | "b"): array},
  stacked for a scanned `cfg` and put in their shardings on `mesh` (one device when None)."""
  arrays = traverse_util.unflatten_dict(arrays)
  if cfg.scanned:
    arrays = stack_layers(arrays)
  targets = shardings(cfg, lora_cfg, mesh or _single_device_mesh(), rules)
  return jax.tree.map(jax.device_put, arrays, targets)


def _check(file, expected, lora_cfg):
  """Every expected tensor present with its shape, and nothing else."""
  missing = sorted(set(expected) - set(file.names()))
  if missing:
    raise CheckpointError(f"{file.path}: missing tensor {missing[0]!r} for targets "
                          f"{lora_cfg.targets} on this base model")
  extra = sorted(set(file.names()) - set(expected))
  if extra:
    raise CheckpointError(f"{file.path}: unexpected tensor {extra[0]!r} for targets "
                          f"{lora_cfg.targets} on this base model")
  for name, shape in expected.items():
    if tuple(file.shape(name)) != tuple(shape):
      raise CheckpointError(f"{file.path}: tensor {name!r} has shape {tuple(file.shape(name))}, "
                            f"rank {lora_cfg.rank} on this base model needs {tuple(shape)}")
