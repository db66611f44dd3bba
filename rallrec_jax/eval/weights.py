"""The weights that scoring takes: the LoRA config of a run, and a checkpoint choice restored
(best, latest, a step, mean:A,B,... of several steps, a folder, or none for zero-shot)."""
from pathlib import Path

import jax

from rallrec_jax.eval import results as results_lib
from rallrec_jax.llm import lora
from rallrec_jax.train import finetune


def lora_config(cfg):
  """The LoraConfig of finetune.lora, or None under full fine-tuning (finetune.method=full)."""
  if cfg.finetune.method == "full":
    return None
  f = cfg.finetune.lora
  return lora.LoraConfig(rank=f.rank, alpha=f.alpha, dropout=f.dropout, targets=tuple(f.targets),
                         layers=f.layers)


def scoring_weights(lm, lora_cfg, weights):
  """(adapters, params) that `evaluate.score_examples` takes for trained `weights`."""
  if lora_cfg is not None:
    return {"adapters": weights, "lora_cfg": lora_cfg}
  dtype = jax.tree.leaves(lm.params)[0].dtype
  return {"params": jax.tree.map(lambda x: x.astype(dtype), weights)}


def restore_checkpoint(cfg, workdir, lm, choice):
  """(scoring weights for `evaluate.score_examples`, step) of eval.checkpoint `choice`."""
  if choice == "none":
    return {}, None
  workdir = Path(workdir)
  lora_cfg = lora_config(cfg)
  steps = results_lib.mean_steps(choice)
  if steps is not None:
    weights = finetune.restore_mean_weights(lm, lora_cfg, workdir / "checkpoints", steps)
    return scoring_weights(lm, lora_cfg, weights), steps[-1]
  keyword = choice in ("best", "latest") or choice.isdigit()
  folder = workdir / "checkpoints" if keyword else Path(choice)
  which = int(choice) if choice.isdigit() else ("latest" if choice == "latest" else "best")
  weights, step = finetune.restore_weights(lm, lora_cfg, folder, which)
  return scoring_weights(lm, lora_cfg, weights), step
