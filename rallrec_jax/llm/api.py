"""The language model as one object: config, sharded params, tokenizer and entry points."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax import parallel
from rallrec_jax.llm import hf_io, tokenizer as tokenizer_lib
from rallrec_jax.llm.config import LMConfig
from rallrec_jax.llm.model import Decoder, param_shardings


@dataclasses.dataclass
class LM:
  cfg: LMConfig
  params: dict
  tokenizer: object = None
  mesh: object = None
  rules: tuple = parallel.DEFAULT_RULES

  @property
  def model(self):
    return Decoder(self.cfg)

  def logits(self, input_ids, attention_mask=None):
    """Vocabulary logits [B, T, vocab] as numpy float32."""
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    ids, mask = self.place(ids), self.place(mask)
    with parallel.activation_sharding(self.mesh, self.rules):
      return np.asarray(_logits(self.model, self.params, ids, mask))

  def place(self, batch_array):
    """A host [batch, ...] array on the devices, its batch split over the mesh's batch axes."""
    if self.mesh is None:
      return jnp.asarray(batch_array)
    return parallel.put_batch(np.asarray(batch_array), self.mesh, self.rules)

  def yes_no_tokens(self):
    return tokenizer_lib.yes_no_tokens(self.tokenizer)

  def generate_text(self, prompts, **kwargs):
    """Completions of `prompts` (see rallrec_jax.llm.generate.generate_text)."""
    from rallrec_jax.llm import generate  # pylint: disable=import-outside-toplevel
    return generate.generate_text(self, prompts, **kwargs)


@jax.jit(static_argnums=0)
def _logits(model, params, ids, mask):
  return model.apply({"params": params}, ids, mask)


def on_nvidia_gpu(mesh=None):
  """Whether the mesh's devices (by default the first device) are NVIDIA GPUs."""
  device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
  return device.platform == "gpu" and "NVIDIA" in device.device_kind


def load_pretrained(path, dtype="float32", param_dtype=None, mesh=None,
                    rules=parallel.DEFAULT_RULES, remat="none", attention="", scan_layers="auto"):
  """Load a Hugging Face model folder (config.json, safetensors, tokenizer), offline.

  `dtype` is the compute dtype; params default to it too. With a `mesh`, every param is read
  shard by shard straight into its sharding. `scan_layers` picks the layers' layout (see
  `LMConfig.scanned`).
  """
  cfg = LMConfig.from_folder(path, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat,
                             attention=attention, scan_layers=scan_layers,
                             nvidia_gpu=on_nvidia_gpu(mesh))
  shardings = param_shardings(cfg, mesh, rules)
  params = hf_io.load_params(path, cfg, shardings)
  return LM(cfg=cfg, params=params, tokenizer=tokenizer_lib.load(path), mesh=mesh, rules=rules)
