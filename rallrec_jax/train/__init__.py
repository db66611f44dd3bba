"""Fine-tuning of the language model (LoRA or full): the train step, a resumable loop, checkpoints."""
from rallrec_jax.train.loop import fit

__all__ = ["fit"]
