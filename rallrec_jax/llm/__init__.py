"""A Flax decoder that loads Hugging Face Llama / Mistral / Qwen2 checkpoints.

  from rallrec_jax.llm import load_pretrained
  lm = load_pretrained("/models/smollm2", dtype="float32")
  logits = lm.logits(lm.tokenizer(["The capital of France is"]).input_ids)

It knows nothing about recommendation.
"""
from rallrec_jax.llm.api import LM, load_pretrained
from rallrec_jax.llm.config import CheckpointError, LMConfig
from rallrec_jax.llm.model import Decoder

__all__ = ["CheckpointError", "Decoder", "LM", "LMConfig", "load_pretrained"]
