"""Decoder hyper-parameters, read from (and written back to) a Hugging Face config.json."""
import dataclasses
import json
from pathlib import Path

import jax

SUPPORTED = ("llama", "mistral", "qwen2")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("", "xla", "cudnn", "blocked")
SCAN_LAYERS = ("auto", "true", "false")
SCAN_AUTO_MIN_LAYERS = 5  # "auto" scans stacks of at least this many layers


class CheckpointError(ValueError):
  """A model folder or file that cannot be loaded; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()          # sorted (key, value) pairs: rope_type, factor, ...
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  max_position_embeddings: int = 4096
  model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_ids: tuple = ()
  pad_token_id: int | None = None
  dtype: str = "float32"            # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"               # none | full | dots (save matmul outputs)
  attention: str = ""               # xla | cudnn | blocked; "": automatic (model._implementation)
  nvidia_gpu: bool = False          # the model runs on NVIDIA GPUs (set at load, for attention="")
  scan_layers: str = "auto"         # auto | true | false: the layers as one scan (see `scanned`)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
    if self.scan_layers not in SCAN_LAYERS:
      raise ValueError(f"scan_layers={self.scan_layers!r} is not one of {SCAN_LAYERS}")

  @property
  def scanned(self):
    """Whether the layers run as one scan over params stacked on a leading "layers" axis
    (compiled once, whatever the depth) rather than unrolled (one copy per layer).

    "auto" scans stacks of SCAN_AUTO_MIN_LAYERS or more, except in 16-bit compute on the CPU:
    there XLA copies the scan's stacked residuals at every layer, and the unrolled SmolLM2-135M
    LoRA step in bfloat16 runs 1.65x the scanned one (README, benchmarks)."""
    if self.scan_layers == "auto":
      cpu_16bit = self.dtype != "float32" and jax.default_backend() == "cpu"
      return self.num_layers >= SCAN_AUTO_MIN_LAYERS and not cpu_16bit
    return self.scan_layers == "true"

  @property
  def rope(self):
    return dict(self.rope_scaling)

  def num_params(self):
    """Parameter count (embedding included once when tied)."""
    e, m, h, k, d = (self.hidden_size, self.intermediate_size, self.num_heads,
                     self.num_kv_heads, self.head_dim)
    attn = e * d * (2 * h + 2 * k) + (d * (h + 2 * k) if self.qkv_bias else 0)
    layer = attn + 3 * e * m + 2 * e
    head = 0 if self.tie_word_embeddings else e * self.vocab_size
    return self.num_layers * layer + self.vocab_size * e + e + head

  @classmethod
  def from_hf(cls, hf, **overrides):
    """From a parsed HF config.json dict; an unsupported model_type is a CheckpointError."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
      raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED}")
    if hf.get("hidden_act", "silu") != "silu":
      raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope = {**legacy, **rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
      raise CheckpointError(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")
    rope = {k: v for k, v in rope.items() if k != "type"}
    rope["rope_type"] = rope_type
    eos = hf.get("eos_token_id")
    heads = hf["num_attention_heads"]
    values = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope.items())),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096), model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        pad_token_id=hf.get("pad_token_id"))
    values.update(overrides)
    return cls(**values)

  @classmethod
  def from_folder(cls, path, **overrides):
    file = Path(path) / "config.json"
    if not file.is_file():
      raise CheckpointError(f"{file}: missing (a Hugging Face model folder has config.json)")
    try:
      hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    try:
      return cls.from_hf(hf, **overrides)
    except CheckpointError as e:
      raise CheckpointError(f"{file}: {e}") from e
    except KeyError as e:
      raise CheckpointError(f"{file}: missing key {e}") from e

  def to_hf(self):
    """A config.json dict that transformers reads back as the same architecture."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}[self.model_type]
    hf = {
        "architectures": [arch], "model_type": self.model_type, "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "rope_parameters": {"rope_theta": self.rope_theta, **self.rope},
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else (
            self.eos_token_ids[0] if self.eos_token_ids else None),
        "pad_token_id": self.pad_token_id, "torch_dtype": "float32",
    }
    if self.model_type != "qwen2":
      hf["attention_bias"] = self.qkv_bias
      hf["mlp_bias"] = False
    return hf
