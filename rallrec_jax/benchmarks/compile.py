"""Compile time of a Llama-3-8B-shaped decoder on the CPU, its layers unrolled against scanned.

  python -m rallrec_jax.bench compile [--layers 32] [--seq 128] [--batch 4] [--score-batch 4]

Two programs, each lowered and compiled (`jax.jit(...).lower(...).compile()`) once per layout
(`LMConfig.scan_layers`): the LoRA training step (forward and backward of the answer loss,
r=8 adapters on q_proj and v_proj, AdamW) and Yes/No scoring (the forward of `score.p_yes`).
Params, adapters, optimizer state and batches are abstract (ShapeDtypeStructs): nothing of
the 8B model is materialised, only compiled. Each row is the scanned layout's seconds (lower +
compile, wall clock; CPU time beside it) with the unrolled layout's as the competitor; a tiny
decoder is compiled first in both layouts, so that neither pays JAX's one-time start-up.
"""
import argparse
import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rallrec_jax.llm import lora, model, score
from rallrec_jax.llm.config import LMConfig
from rallrec_jax.train import step as step_lib

# Llama-3-8B's shape: 8.03B parameters, untied output embedding.
LLAMA3_8B = LMConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, dtype="bfloat16", param_dtype="bfloat16")
LORA = lora.LoraConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"))
ANSWER_IDS = (9642, 2822)  # any two token ids: only their shape reaches the compiler


def _int32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.int32)


def _params(cfg):
  return nn.meta.unbox(model.abstract_params(cfg))


def _timed(fn, *args):
  """(seconds to lower, seconds to compile, CPU seconds of both) of jitted `fn` at these
  (abstract) arguments. CPU time is the fairer figure on cores that other processes share."""
  cpu = time.process_time()
  start = time.perf_counter()
  lowered = fn.lower(*args)
  lowered_at = time.perf_counter()
  lowered.compile()
  return (lowered_at - start, time.perf_counter() - lowered_at, time.process_time() - cpu)


def train_step_seconds(cfg, batch, seq):
  """`_timed` of the LoRA answer-loss step."""
  optimizer = optax.adamw(1e-4)
  step = step_lib.make_train_step(cfg, LORA, optimizer, "answer", ANSWER_IDS)
  adapters = jax.eval_shape(lambda key: lora.init(key, cfg, LORA), jax.random.key(0))
  state = {"weights": adapters, "opt_state": jax.eval_shape(optimizer.init, adapters),
           "step": _int32(), "rng": jax.eval_shape(jax.random.key, 0)}
  data = {"input_ids": _int32(batch, seq), "attention_mask": _int32(batch, seq),
          "loss_mask": _int32(batch, seq), "label": _int32(batch)}
  return _timed(step, state, _params(cfg), data)


def score_seconds(cfg, batch, seq):
  """`_timed` of the Yes/No scorer's forward."""
  return _timed(score.p_yes, cfg, _params(cfg), _int32(batch, seq), _int32(batch, seq),
                _int32(), _int32())


def bench_compile(layers=32, seq=128, batch=4, score_batch=4):
  """JSON-ready records: per program, the scanned layout's seconds against the unrolled's."""
  base = dataclasses.replace(LLAMA3_8B, num_layers=layers)
  tiny = dataclasses.replace(LLAMA3_8B, vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
  for layout in ("true", "false"):
    train_step_seconds(dataclasses.replace(tiny, scan_layers=layout), 1, 8)
    score_seconds(dataclasses.replace(tiny, scan_layers=layout), 1, 8)
  device = jax.devices()[0]
  rows = []
  for row, measure, rows_per_batch in (("lora_train_step", train_step_seconds, batch),
                                       ("score", score_seconds, score_batch)):
    seconds = {}
    for layout in ("true", "false"):
      cfg = dataclasses.replace(base, scan_layers=layout)
      seconds[layout] = measure(cfg, rows_per_batch, seq)
    (lower, compile_, cpu), (their_lower, their_compile, their_cpu) = (seconds["true"],
                                                                        seconds["false"])
    ours, theirs = lower + compile_, their_lower + their_compile
    rows.append({"bench": "compile", "row": row, "value": round(ours, 2), "unit": "s",
                 "competitor": "unrolled layers", "competitor_value": round(theirs, 2),
                 "ratio": round(theirs / ours, 2), "lower_s": round(lower, 2),
                 "competitor_lower_s": round(their_lower, 2), "cpu_s": round(cpu, 2),
                 "competitor_cpu_s": round(their_cpu, 2), "cpu_ratio": round(their_cpu / cpu, 2),
                 "layers": layers,
                 "seq": seq, "batch": rows_per_batch, "dtype": base.dtype,
                 "params": base.num_params(),
                 "device": f"{device.platform}:{device.device_kind}, "
                           f"{os.cpu_count()} cpu threads"})
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m rallrec_jax.bench compile",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=32, help="decoder layers")
  parser.add_argument("--seq", type=int, default=128, help="tokens per row")
  parser.add_argument("--batch", type=int, default=4, help="rows per training batch")
  parser.add_argument("--score-batch", type=int, default=4, help="rows per scoring batch")
  args = parser.parse_args(argv)
  for row in bench_compile(args.layers, args.seq, args.batch, args.score_batch):
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
