"""Tokens/s of one LoRA fine-tuning step on SmolLM2-135M: our jitted step against PEFT on torch.

Both sides train the same model (r=8, alpha=16, dropout 0.05 on q_proj and v_proj, AdamW) on
the same random batch with the loss on every token, in one precision (float32 or bfloat16: our
params and compute in bfloat16 with float32 adapters cast to it, against a torch bfloat16 model
with PEFT's adapters), in one process. Each gets warm-up steps first (compilation for JAX), then
`steps` timed steps.

  python -m rallrec_jax.benchmarks.lora        # RALLREC_SMOLLM2=/path/to/SmolLM2-135M optional
"""
import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rallrec_jax.llm import api, flops, lora
from rallrec_jax.llm.config import LMConfig
from rallrec_jax.llm.model import Decoder
from rallrec_jax.train import step as step_lib

SMOLLM2_135M = LMConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1,
    eos_token_ids=(2,), pad_token_id=2)
LORA = lora.LoraConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"))
LEARNING_RATE = 1e-4
WARMUP = 2
DTYPES = ("float32", "bfloat16")


def _model(model_dir, dtype):
  """(cfg, params) in `dtype`: real weights from `model_dir`, else SmolLM2-135M's shape at
  random."""
  if model_dir:
    lm = api.load_pretrained(model_dir, dtype=dtype)
    return lm.cfg, lm.params
  cfg = dataclasses.replace(SMOLLM2_135M, dtype=dtype, param_dtype=dtype)
  ids = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda key: nn.meta.unbox(Decoder(cfg).init(key, ids)["params"]))
  return cfg, init(jax.random.key(0))


def timed(run_step, steps):
  """Seconds for `steps` calls of run_step after WARMUP untimed ones."""
  for _ in range(WARMUP):
    run_step()
  start = time.perf_counter()
  for _ in range(steps):
    run_step()
  return time.perf_counter() - start


def _jax_seconds(cfg, params, ids, steps):
  optimizer = optax.adamw(LEARNING_RATE)
  step = step_lib.make_train_step(cfg, LORA, optimizer)
  state = step_lib.init_train_state(jax.random.key(1), lora.init(jax.random.key(0), cfg, LORA),
                                optimizer)
  ones = jnp.ones(ids.shape, jnp.int32)
  batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": ones, "loss_mask": ones}
  holder = {"state": state}

  def run_step():
    holder["state"], metrics = step(holder["state"], params, batch)
    metrics["loss"].block_until_ready()

  return timed(run_step, steps)


def _torch_model(cfg, model_dir):
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  dtype = getattr(torch, cfg.dtype)
  if model_dir:
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).to(dtype)
  model.config.use_cache = False
  return peft.get_peft_model(model, peft.LoraConfig(
      r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
      target_modules=list(LORA.targets), task_type="CAUSAL_LM")).train()


def _torch_seconds(cfg, model_dir, ids, steps):
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  model = _torch_model(cfg, model_dir)
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                lr=LEARNING_RATE)
  ids = torch.from_numpy(ids).long()
  mask = torch.ones_like(ids)

  def run_step():
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  return timed(run_step, steps)


def bench_lora_step(model_dir=None, seq=256, batch=8, steps=5, dtype="float32"):
  """One JSON-ready record: our tokens/s, PEFT's in the same `dtype`, their ratio, our MFU."""
  cfg, params = _model(model_dir, dtype)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
  tokens = batch * seq * steps
  ours = tokens / _jax_seconds(cfg, params, ids, steps)
  del params
  theirs = tokens / _torch_seconds(cfg, model_dir, ids, steps)
  device = jax.devices()[0]
  return {"bench": "lora_train_step", "value": ours, "unit": "tokens/s",
          "competitor": f"transformers+peft (torch cpu, {dtype})", "competitor_value": theirs,
          "ratio": ours / theirs, "dtype": dtype,
          "mfu": flops.mfu(flops.lora_train_flops_per_token(cfg, seq), ours),
          "seq": seq, "batch": batch, "steps": steps,
          "weights": "real" if model_dir else "random",
          "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}, "
                    f"{os.cpu_count()} cpu threads"}


if __name__ == "__main__":
  for name in DTYPES:
    print(json.dumps(bench_lora_step(os.environ.get("RALLREC_SMOLLM2"), dtype=name)))
