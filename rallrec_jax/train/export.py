"""What a fine-tune learned, in the formats Hugging Face users load: the LoRA adapters as a
PEFT folder and the model with them merged (or the fully tuned weights) as a transformers
folder, with the base model's tokenizer and chat template."""
import dataclasses
import json
from pathlib import Path

from rallrec_jax import atomic
from rallrec_jax.llm import hf_io, lora, peft_io

ADAPTERS = "adapters"
MERGED = "merged"
SUMMARY = "export.json"


def write(folder, lm, trained, base_model, step=None, checkpoint=None):
  """Write `folder` whole (atomically): adapters/ (for LoRA weights), merged/ and export.json.

  `trained` is what `eval.weights.scoring_weights` returns: {"adapters", "lora_cfg"} or
  {"params"}. `base_model` is the base model's folder: its tokenizer files are copied into
  merged/ and the adapters' config names it.
  """
  base_model = Path(base_model).expanduser().absolute()
  lora_cfg = trained.get("lora_cfg")
  with atomic.directory(folder) as tmp:
    if lora_cfg is not None:
      peft_io.save(trained["adapters"], lora_cfg, tmp / ADAPTERS, lm.cfg, base_model)
      params = lora.merge(lm.params, trained["adapters"], lora_cfg)
    else:
      params = trained["params"]
    hf_io.export(params, lm.cfg, tmp / MERGED, tokenizer_from=base_model,
                 dtype=lm.cfg.param_dtype)
    summary = {"checkpoint": checkpoint, "step": step, "base_model": str(base_model),
               "method": "full" if lora_cfg is None else "lora",
               "lora": None if lora_cfg is None else dataclasses.asdict(lora_cfg),
               "folders": [ADAPTERS, MERGED] if lora_cfg is not None else [MERGED]}
    atomic.write_text(tmp / SUMMARY, json.dumps(summary, indent=1) + "\n")
  return Path(folder)
