"""Tiny Hugging Face models and a tiny tokenizer, built offline, for the LLM tests."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax.llm import tiny
from rallrec_jax.llm.model import Decoder

WORDS = ("Yes No . , ? the a user will like movie book item rating stars watched read is of and "
         "to in it this that Paris France capital The").split()


def tiny_tokenizer(folder):
  """A word-level tokenizer with a chat template and special tokens, saved to `folder`."""
  return tiny.word_tokenizer(folder, WORDS)


def tiny_hf_model(folder, kind="llama", seed=0, scale=0.2, with_tokenizer=True, **overrides):
  """A random tiny transformers model with every weight (biases included) drawn N(0, scale²),
  saved with `save_pretrained` (plus the tiny tokenizer). Returns the torch model in eval mode.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=3)
  sizes.update(overrides)
  config_cls, model_cls = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  }[kind]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**sizes)).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + scale * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(scale * torch.randn(p.shape, generator=gen))
  model.save_pretrained(folder)
  if with_tokenizer:
    tiny_tokenizer(folder)
  return model


def init_params(cfg, seed=0):
  """Fresh params of our decoder for `cfg`, initialised under jit (op by op, every op of the
  init compiles on its own: tens of seconds for a few layers on a CPU)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return nn.meta.unbox(jax.jit(Decoder(cfg).init)(jax.random.key(seed), ids)["params"])


def random_batch(vocab_size, batch=3, length=12, seed=0, pad_right=(0, 4, 7)):
  """int ids [B, T] and a mask with `pad_right[b]` padding positions at the end of row b."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, vocab_size, (batch, length))
  mask = np.ones((batch, length), np.int64)
  for b, pad in enumerate(pad_right[:batch]):
    if pad:
      mask[b, -pad:] = 0
  return ids, mask
