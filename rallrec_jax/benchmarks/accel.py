"""LoRA training and Yes/No scoring of a ~1B Llama-shaped decoder on one accelerator.

  python -m rallrec_jax.bench llm-accel [--seq 1024] [--batch 8] [--score-batch 32]

Random weights in bfloat16 (the work, not the values, is measured), full-length sequences. For
each attention implementation of `jax.nn.dot_product_attention` (`--attention xla,cudnn`; the
model's automatic choice on NVIDIA GPUs is cudnn): the jitted LoRA step (r=8 on q_proj and v_proj, AdamW, loss on every token) in tokens/s and the
prefill-only P(yes) scorer in prompts/s, each with its model FLOPs utilisation. The competitor,
on the same device in the same run (a child process, so that each framework has the memory to
itself): transformers + PEFT for the step and a transformers forward with full logits for the
scoring, in bfloat16 with PyTorch's scaled-dot-product attention.
"""
import argparse
import json
import subprocess
import sys

from rallrec_jax.benchmarks import lora as bench_lora
from rallrec_jax.llm.config import LMConfig
from rallrec_jax.train import step as step_lib

# Llama-3.2-1B's shape: 1.24B parameters with the tied embedding.
LLAMA_1B = LMConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
    tie_word_embeddings=True, max_position_embeddings=8192, dtype="bfloat16",
    param_dtype="bfloat16")
def _jax_records(args):
  import dataclasses  # pylint: disable=import-outside-toplevel

  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from rallrec_jax.llm import flops, lora, score  # pylint: disable=import-outside-toplevel
  from rallrec_jax.llm.model import Decoder  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  base = LLAMA_1B
  params = jax.jit(lambda key: nn.meta.unbox(Decoder(base).init(
      key, jnp.zeros((1, 1), jnp.int32))["params"]))(jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, base.vocab_size, (args.batch, args.seq)), jnp.int32)
  ones = jnp.ones(ids.shape, jnp.int32)
  lora_cfg = lora.LoraConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"))
  score_ids = jnp.asarray(rng.integers(3, base.vocab_size, (args.score_batch, args.seq)),
                          jnp.int32)
  score_mask = jnp.ones(score_ids.shape, jnp.int32)
  for impl in args.attention.split(","):
    cfg = dataclasses.replace(base, attention=impl)
    common = {"attention": impl, "seq": args.seq, "device": device.device_kind,
              "params": cfg.num_params()}
    try:
      optimizer = optax.adamw(1e-4)
      step = step_lib.make_train_step(cfg, lora_cfg, optimizer)
      holder = {"state": step_lib.init_train_state(jax.random.key(1), lora.init(
          jax.random.key(0), cfg, lora_cfg), optimizer)}
      batch = {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}

      def train():
        holder["state"], metrics = step(holder["state"], params, batch)
        metrics["loss"].block_until_ready()

      tokens_s = args.batch * args.seq * args.steps / bench_lora.timed(train, args.steps)
      holder.clear()
      yield {"bench": "lora_train_step_1b", "value": round(tokens_s, 1), "unit": "tokens/s",
             "mfu": round(flops.mfu(flops.lora_train_flops_per_token(cfg, args.seq), tokens_s), 4),
             "batch": args.batch, **common}
    except Exception as e:  # pylint: disable=broad-except
      yield {"bench": "lora_train_step_1b", "error": f"{type(e).__name__}: {e}"[:500], **common}
    try:
      p_yes = jax.jit(lambda p, i, m, c=cfg: score.p_yes(c, p, i, m, 5, 6))
      prompts_s = args.score_batch * args.steps / bench_lora.timed(
          lambda: p_yes(params, score_ids, score_mask).block_until_ready(), args.steps)
      yield {"bench": "scoring_1b", "value": round(prompts_s, 2), "unit": "prompts/s",
             "mfu": round(flops.mfu(flops.scoring_flops_per_token(cfg, args.seq),
                                    prompts_s * args.seq), 4),
             "batch": args.score_batch, **common}
    except Exception as e:  # pylint: disable=broad-except
      yield {"bench": "scoring_1b", "error": f"{type(e).__name__}: {e}"[:500], **common}


def _torch_records(args):
  """The competitor's numbers (run in its own process)."""
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf = {k: v for k, v in LLAMA_1B.to_hf().items() if k not in ("architectures", "model_type")}
  config = transformers.LlamaConfig(**hf)
  config.use_cache = False
  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.LlamaForCausalLM(config).to(device, torch.bfloat16)
  ids = torch.randint(3, LLAMA_1B.vocab_size, (args.batch, args.seq), device=device)

  def sync_timed(fn):
    def run():
      fn()
      if device == "cuda":
        torch.cuda.synchronize()
    return bench_lora.timed(run, args.steps)

  scored = torch.randint(3, LLAMA_1B.vocab_size, (args.score_batch, args.seq), device=device)

  def forward():
    with torch.inference_mode():
      logits = model(scored).logits[:, -1]
      torch.softmax(logits[:, [5, 6]].float(), dim=-1)

  scoring = args.score_batch * args.steps / sync_timed(forward)
  tuned = peft.get_peft_model(model, peft.LoraConfig(
      r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
      task_type="CAUSAL_LM")).train()
  optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-4)

  def train():
    tuned(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  training = args.batch * args.seq * args.steps / sync_timed(train)
  return {"lora_train_step_1b": training, "scoring_1b": scoring,
          "torch": torch.__version__}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=8, help="sequences per LoRA step")
  parser.add_argument("--score-batch", type=int, default=32, help="prompts per scoring call")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
  parser.add_argument("--attention", default="xla,cudnn",
                      help="comma-separated jax.nn.dot_product_attention implementations")
  parser.add_argument("--no-competitor", action="store_true", help="skip the PyTorch side")
  parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.torch_child:
    print(json.dumps(_torch_records(args)))
    return
  competitor = {}
  if not args.no_competitor:
    child = subprocess.run(
        [sys.executable, "-m", "rallrec_jax.benchmarks.accel", "--torch-child",
         f"--seq={args.seq}", f"--batch={args.batch}", f"--score-batch={args.score_batch}",
         f"--steps={args.steps}"], capture_output=True, text=True, check=False)
    if child.returncode == 0:
      competitor = json.loads(child.stdout.strip().splitlines()[-1])
    else:
      print(json.dumps({"bench": "competitor", "error": child.stderr[-1500:]}), flush=True)
  names = {"lora_train_step_1b": "transformers+peft bf16 sdpa (torch cuda)",
           "scoring_1b": "transformers forward, full logits, bf16 sdpa (torch cuda)"}
  for record in _jax_records(args):
    theirs = competitor.get(record["bench"])
    if theirs and "value" in record:
      record.update(competitor=names[record["bench"]], competitor_value=round(theirs, 2),
                    ratio=round(record["value"] / theirs, 2))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
