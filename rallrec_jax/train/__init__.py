"""LoRA fine-tuning of the language model: a resumable training loop and its checkpoints."""
from rallrec_jax.train.loop import fit

__all__ = ["fit"]
