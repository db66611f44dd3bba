"""Scoring throughput: our jitted `p_yes` against a transformers forward on the CPU.

  python -m rallrec_jax.benchmarks.score [--model-dir /models/smollm2] [--dtype bfloat16]

The competitor is how reference code scores yes/no prompts with transformers: a full forward,
`model(ids, attention_mask).logits[:, -1]`, then a softmax over the yes and no logits. Both
run on the same batches of the SmolLM2-135M shape, in one precision (float32 or bfloat16, the
torch model in the same dtype as ours), after a warm-up, in this process. Without a model
folder both models get random weights (their own draws): the work, not the values, is measured,
and any two distinct token ids stand in for the answers.
"""
import argparse
import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax.llm import flops, score
from rallrec_jax.llm.api import load_pretrained
from rallrec_jax.llm.config import LMConfig
from rallrec_jax.llm.model import Decoder

SMOLLM2_135M = LMConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                        rope_theta=100000.0, tie_word_embeddings=True, model_type="llama")


def bench_scoring(model_dir=None, seq=256, batch=8, batches=4, dtype="float32"):
  """{"bench": "scoring", "value": prompts/s, ...} with the transformers forward in the same
  `dtype` as competitor."""
  cfg, params, answers, torch_model = _models(model_dir, dtype)
  data = _batches(cfg, seq, batch, batches)
  (ours, our_seconds), (theirs, their_seconds) = _time(
      (lambda ids, mask: score.p_yes(cfg, params, ids, mask, *answers),
       lambda ids, mask: _torch_p_yes(torch_model, ids, mask, answers)), data)
  prompts = batch * batches
  value = prompts / our_seconds
  competitor = prompts / their_seconds
  device = jax.devices()[0]
  return {"bench": "scoring", "value": round(value, 2), "unit": "prompts/s",
          "competitor": f"transformers forward, full logits (torch cpu, {dtype})",
          "competitor_value": round(competitor, 2), "ratio": round(value / competitor, 2),
          "dtype": dtype,
          "mfu": flops.mfu(flops.scoring_flops_per_token(cfg, seq), value * seq),
          "max_abs_diff": float(np.max(np.abs(ours - theirs))) if model_dir else None,
          "weights": model_dir or "random",
          "seq": seq, "batch": batch, "batches": batches,
          "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}",
          "torch_threads": _torch().get_num_threads()}


def _torch():
  import torch  # pylint: disable=import-outside-toplevel
  return torch


def _models(model_dir, dtype):
  """(cfg, params, (yes_id, no_id), torch model) in `dtype`: the folder's weights in both, or
  random."""
  import transformers  # pylint: disable=import-outside-toplevel
  torch = _torch()
  torch.set_num_threads(os.cpu_count())
  torch_dtype = getattr(torch, dtype)
  if model_dir:
    lm = load_pretrained(model_dir, dtype=dtype)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    return lm.cfg, lm.params, lm.yes_no_tokens(), model.eval()
  cfg = dataclasses.replace(SMOLLM2_135M, dtype=dtype, param_dtype=dtype)
  params = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  hf = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                   if k not in ("architectures", "model_type")})
  model = transformers.LlamaForCausalLM(hf).to(torch_dtype)
  return cfg, nn.meta.unbox(params), (cfg.vocab_size - 2, cfg.vocab_size - 1), model.eval()


def _batches(cfg, seq, batch, batches):
  """Random full-length prompts (the same arrays for both sides)."""
  rng = np.random.default_rng(0)
  return [(rng.integers(3, cfg.vocab_size, (batch, seq)).astype(np.int32),
           np.ones((batch, seq), np.int32)) for _ in range(batches)]


def _time(fns, data):
  """[(P(yes) of every row, seconds)] per function, each after a warm-up batch, in turn.

  Ours runs first and whole: torch's OpenMP workers keep spinning after each call, and on 2
  cores they halved the speed of the XLA code that ran between torch calls.
  """
  results = []
  for fn in fns:
    np.asarray(fn(*data[0]))
    start, out = time.perf_counter(), []
    for ids, mask in data:
      out.append(np.asarray(fn(ids, mask)))
    results.append((np.concatenate(out), time.perf_counter() - start))
  return results


def _torch_p_yes(model, ids, mask, answers):
  torch = _torch()
  with torch.inference_mode():
    logits = model(torch.from_numpy(ids.astype(np.int64)),
                   attention_mask=torch.from_numpy(mask.astype(np.int64))).logits[:, -1]
    return torch.softmax(logits[:, list(answers)].float(), dim=-1)[:, 0].numpy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model-dir")
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args()
  print(json.dumps(bench_scoring(args.model_dir, args.seq, args.batch, args.batches,
                                 args.dtype)))


if __name__ == "__main__":
  main()
