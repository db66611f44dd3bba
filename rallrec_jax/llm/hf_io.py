"""Hugging Face checkpoints in and out: a key table plus per-tensor layout transforms.

Loading builds each parameter with `jax.make_array_from_callback`: every device's shard is
read from the memory-mapped safetensors file and converted on its own, straight into the
target sharding. Missing, unexpected or wrongly shaped tensors are errors naming the tensor.
In the scanned layout a param stacks one tensor per layer, read layer by layer into its shard
(and written back one per layer at export).
"""
import json
import shutil
from pathlib import Path

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax.llm import safetensors_io
from rallrec_jax.llm.config import CheckpointError
from rallrec_jax.llm.model import abstract_params, param_shardings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "tokenizer.model",
                   "vocab.json", "merges.txt")
# Buffers some exporters write that are not parameters.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _norm(index, shape):
  return [slice(*s.indices(n)) for s, n in zip(index, shape)]


def _heads_in(hf, index, shape):
  """ours[e, h, d] = hf[h * D + d, e] (q/k/v kernels)."""
  se, sh, sd = _norm(index, shape)
  d = shape[2]
  block = np.asarray(hf[sh.start * d:sh.stop * d, se])
  return block.reshape(sh.stop - sh.start, d, -1)[:, sd, :].transpose(2, 0, 1)


def _heads_out(hf, index, shape):
  """ours[h, d, e] = hf[e, h * D + d] (o_proj kernel)."""
  sh, sd, se = _norm(index, shape)
  d = shape[1]
  block = np.asarray(hf[se, sh.start * d:sh.stop * d])
  return block.reshape(-1, sh.stop - sh.start, d)[:, :, sd].transpose(1, 2, 0)


def _heads_bias(hf, index, shape):
  """ours[h, d] = hf[h * D + d] (q/k/v biases)."""
  sh, sd = _norm(index, shape)
  d = shape[1]
  return np.asarray(hf[sh.start * d:sh.stop * d]).reshape(-1, d)[:, sd]


def _transposed(hf, index, shape):
  sa, sb = _norm(index, shape)
  return np.asarray(hf[sb, sa]).T


def _same(hf, index, shape):
  return np.asarray(hf[tuple(_norm(index, shape))])


def _to_hf(kind, array):
  """Our layout back to Hugging Face's (whole arrays, for export)."""
  if kind is _heads_in:
    e, h, d = array.shape
    return array.reshape(e, h * d).T
  if kind is _heads_out:
    h, d, e = array.shape
    return array.reshape(h * d, e).T
  if kind is _heads_bias:
    return array.reshape(-1)
  if kind is _transposed:
    return array.T
  return array


def key_table(cfg):
  """{our param path (tuple): (HF tensor name, transform)}."""
  table = {("embed_tokens", "embedding"): ("model.embed_tokens.weight", _same),
           ("norm", "weight"): ("model.norm.weight", _same)}
  if not cfg.tie_word_embeddings:
    table[("lm_head", "kernel")] = ("lm_head.weight", _transposed)
  for i in range(cfg.num_layers):
    ours, hf = f"layers_{i}", f"model.layers.{i}"
    for norm in ("input_layernorm", "post_attention_layernorm"):
      table[(ours, norm, "weight")] = (f"{hf}.{norm}.weight", _same)
    for proj in ("q_proj", "k_proj", "v_proj"):
      table[(ours, "self_attn", proj, "kernel")] = (f"{hf}.self_attn.{proj}.weight", _heads_in)
      if cfg.qkv_bias:
        table[(ours, "self_attn", proj, "bias")] = (f"{hf}.self_attn.{proj}.bias", _heads_bias)
    table[(ours, "self_attn", "o_proj", "kernel")] = (f"{hf}.self_attn.o_proj.weight", _heads_out)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      table[(ours, "mlp", proj, "kernel")] = (f"{hf}.mlp.{proj}.weight", _transposed)
  return table


def load_params(folder, cfg, shardings=None):
  """The decoder's params from a HF folder, each read shard by shard into its sharding."""
  checkpoint = safetensors_io.Checkpoint(folder)
  shardings = shardings or param_shardings(cfg)
  boxed = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)))
  targets = traverse_util.flatten_dict(shardings)
  table = key_table(cfg)
  available = set(checkpoint.names())
  expected = {name for name, _ in table.values()}
  missing = sorted(expected - available)
  if missing:
    raise CheckpointError(f"{folder}: missing tensor {missing[0]!r}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  extra = sorted(n for n in available - expected if not n.endswith(IGNORED_SUFFIXES)
                 and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
  if extra:
    raise CheckpointError(f"{checkpoint.file(extra[0])}: unexpected tensor {extra[0]!r} "
                          f"for a {cfg.model_type} model with this config")
  params = {}
  dtype = jnp.dtype(cfg.param_dtype)
  for path, abstract in boxed.items():
    stacked = path[0] == "layers"
    rows = _layer_rows(table, path, cfg.num_layers) if stacked else [table[path]]
    shape = abstract.shape[1:] if stacked else abstract.shape
    tensors = []
    for name, transform in rows:
      hf = checkpoint.tensor(name)
      want = _to_hf(transform, np.empty(shape, np.int8)).shape
      if tuple(hf.shape) != tuple(want):
        raise CheckpointError(f"{checkpoint.file(name)}: tensor {name!r} has shape "
                              f"{tuple(hf.shape)}, the config needs {tuple(want)}")
      tensors.append((hf, transform))

    def read(index, tensors=tensors, stacked=stacked, shape=shape):
      if not stacked:
        hf, transform = tensors[0]
        return transform(hf, index, shape).astype(dtype)
      layers = _norm(index[:1], (len(tensors),))[0]
      return np.stack([transform(hf, index[1:], shape)
                       for hf, transform in tensors[layers]]).astype(dtype)

    params[path] = jax.make_array_from_callback(abstract.shape, targets[path], read)
  return traverse_util.unflatten_dict(params)


def _layer_rows(table, path, num_layers):
  """[(HF tensor name, transform)] of each layer's slice of the stacked param at `path`."""
  return [table[(f"layers_{i}",) + path[1:]] for i in range(num_layers)]


def export(params, cfg, folder, tokenizer_from=None, dtype="float32"):
  """Write a HF folder (config.json, model.safetensors, tokenizer files) transformers can load."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  flat = traverse_util.flatten_dict(params)
  np_dtype = jnp.dtype(dtype)
  tensors = {}
  for path, (name, transform) in key_table(cfg).items():
    layer = None
    if cfg.scanned and path[0].startswith("layers_"):
      layer, path = int(path[0].split("_")[1]), ("layers",) + path[1:]
    array = flat[path]
    shape = _to_hf(transform, np.empty(array.shape[layer is not None:], np.int8)).shape
    # One layer at a time is sliced off a stacked param, so the export holds one extra layer.
    tensors[name] = (shape, np_dtype, lambda a=array, t=transform, i=layer: _to_hf(
        t, np.asarray(jax.device_get(a if i is None else a[i]))))
  safetensors_io.save(folder / "model.safetensors", tensors)
  hf = cfg.to_hf()
  hf["torch_dtype"] = str(np_dtype)
  (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  if tokenizer_from is not None:
    for name in TOKENIZER_FILES:
      if (Path(tokenizer_from) / name).is_file():
        shutil.copy(Path(tokenizer_from) / name, folder / name)
  return folder
