"""Training: the resumable loop every trainer runs (`loop`), its checkpoints, and the language
model's fine-tune on it (`finetune.fit`: LoRA or full, the train step, per-layer checkpoints)."""
from rallrec_jax.train.finetune import fit

__all__ = ["fit"]
