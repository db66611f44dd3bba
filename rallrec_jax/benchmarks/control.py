"""A trainer control: our step against transformers (+ PEFT for LoRA) on the same batches.

Both sides start from the same model and, for LoRA, the same adapters (ours, copied into PEFT's
lora_A and lora_B; full fine-tuning trains every weight of both models), train on the same
batches in the same order with AdamW (the same betas, eps and weight decay) under the same
schedule (`finetune.schedule`: linear warmup, then linear decay), with the same optional clipping
of the gradient's global norm (`optax.clip_by_global_norm` in `finetune.make_optimizer` against
`torch.nn.utils.clip_grad_norm_`), on the same loss: the two-way cross-entropy of the (yes, no)
logits at the last position of left-padded prompts, label 1 = yes. Positions are
cumsum(mask) - 1 on both sides. In float32 the per-step losses agree to rounding, so a
difference in the optimizer, the schedule, the loss, the positions or the adapters shows as
losses that drift apart within a few steps. Adapter dropout must be 0: the two sides would draw
different masks.

  python -m rallrec_jax.bench control --workdir W [--model-dir DIR] [--steps 16] [--method full]

`--workdir` is a pipeline workdir with `retrieve` done: the training prompts are the first
`--prompts` samples of the finetune stage's pool with their stored history, the held-out ones
the first `--eval-rows` validation samples, rendered as the finetune stage renders them.
"""
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rallrec_jax import data
from rallrec_jax.eval import evaluate, metrics
from rallrec_jax.llm import api, lora, score, tokenizer as tokenizer_lib
from rallrec_jax.llm.model import unstack_layers
from rallrec_jax.prompts import render
from rallrec_jax.retrieval import history
from rallrec_jax.train import batches as batches_lib, finetune, sets, step as step_lib

@dataclasses.dataclass(frozen=True)
class Optim:
  """AdamW and its schedule, spelled out so both sides get the same values."""
  lr: float = 1e-3
  steps: int = 16
  warmup: int = 0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 0.0

  def schedule(self):
    return finetune.schedule(self.lr, self.steps, self.warmup)

  def optax(self):
    """Our side's optimizer, built as the fine-tune builds it (`finetune.make_optimizer`)."""
    return finetune.make_optimizer(self.lr, self.steps, weight_decay=self.weight_decay,
                               warmup=self.warmup, clip_norm=self.clip_norm, b1=self.b1,
                               b2=self.b2, eps=self.eps)


def positions(mask):
  """Position ids of left-padded rows, as our decoder derives them: cumsum(mask) - 1, >= 0."""
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _cycle(batches, steps):
  return [batches[i % len(batches)] for i in range(steps)]


def train_ours(lm, adapters, lora_cfg, batches, opt, answer_ids):
  """(per-step losses, trained weights) of `step.make_train_step` with the answer loss.

  `lora_cfg` None is full fine-tuning: `adapters` are then the float32 weights of every layer.
  """
  optimizer = opt.optax()
  train_step = step_lib.make_train_step(lm.cfg, lora_cfg, optimizer, loss="answer",
                                        answer_ids=answer_ids)
  state = step_lib.init_train_state(jax.random.key(0), jax.tree.map(jnp.asarray, adapters),
                                    optimizer)
  losses = []
  for batch in _cycle(batches, opt.steps):
    placed = {k: jnp.asarray(batch[k], jnp.int32) for k in ("input_ids", "attention_mask",
                                                             "label")}
    placed["loss_mask"] = jnp.zeros_like(placed["input_ids"])
    state, out = train_step(state, lm.params, placed)
    losses.append(float(out["loss"]))
  return losses, state["weights"]


def p_yes_ours(lm, adapters, lora_cfg, batches, answer_ids):
  """P(yes) of every row of `batches` with our model and adapters (full weights: no LoRA)."""
  yes, no = (np.int32(i) for i in answer_ids)
  params, adapters = (adapters, None) if lora_cfg is None else (lm.params, adapters)
  out = [score.yes_no_logits(lm.cfg, params, jnp.asarray(b["input_ids"], jnp.int32),
                             jnp.asarray(b["attention_mask"], jnp.int32), yes, no, adapters,
                             lora_cfg)
         for b in batches]
  return evaluate.p_yes(np.concatenate([np.asarray(o) for o in out]))


def hf_model(model_dir, dtype="float32"):
  """The folder's transformers model, every weight trainable (full fine-tuning's side)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                            dtype=getattr(torch, dtype))
  model.config.use_cache = False
  return model


def peft_model(model_dir, adapters, lora_cfg, dtype="float32"):
  """The folder's transformers model with PEFT LoRA on our targets, set to our `adapters`."""
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  if lora_cfg.dropout:
    raise ValueError("the control needs LoRA dropout 0: the two sides would draw other masks")
  model = hf_model(model_dir, dtype)
  adapters = unstack_layers(adapters, model.config.num_hidden_layers)
  layers = None
  if lora_cfg.layers:
    layers = list(range(model.config.num_hidden_layers - lora_cfg.layers,
                        model.config.num_hidden_layers))
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=0.0,
      target_modules=list(lora_cfg.targets), layers_to_transform=layers))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".lora_" not in name:
        continue
      # "...layers.3.self_attn.q_proj.lora_A.default.weight": the path of our pair.
      layer, parent, proj = name.split(".layers.")[1].split(".")[:3]
      pair = adapters[f"layers_{layer}"][parent][proj]
      # PEFT: lora_A.weight [r, in], lora_B.weight [out, r]; ours [*in, r] and [r, *out].
      ours = (np.reshape(pair["a"], (-1, lora_cfg.rank)).T if ".lora_A." in name
              else np.reshape(pair["b"], (lora_cfg.rank, -1)).T)
      if tuple(ours.shape) != tuple(p.shape):
        raise ValueError(f"{name}: PEFT shape {tuple(p.shape)}, ours {ours.shape}")
      p.copy_(torch.from_numpy(np.ascontiguousarray(ours)))
  return model


def _answer_logits(model, batch, answer_ids):
  """logits[:, -1, [yes, no]] of a left-padded batch, as float32."""
  import torch  # pylint: disable=import-outside-toplevel
  mask = np.asarray(batch["attention_mask"], np.int64)
  out = model(input_ids=torch.from_numpy(np.asarray(batch["input_ids"], np.int64)),
              attention_mask=torch.from_numpy(mask),
              position_ids=torch.from_numpy(positions(mask)), logits_to_keep=1)
  return out.logits[:, -1, list(answer_ids)].float()


def train_theirs(model, batches, opt, answer_ids):
  """Per-step losses of `model` (`peft_model` or `hf_model`) trained by torch AdamW under
  LambdaLR, its gradient clipped to `opt.clip_norm` when that is > 0."""
  import torch  # pylint: disable=import-outside-toplevel
  model.train()
  schedule = opt.schedule()
  trained = [p for p in model.parameters() if p.requires_grad]
  # A base lr of 1 makes the scheduled value the lr itself (also in the decay lr * wd).
  optimizer = torch.optim.AdamW(trained, lr=1.0,
                                betas=(opt.b1, opt.b2), eps=opt.eps,
                                weight_decay=opt.weight_decay)
  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: float(schedule(k)))
  losses = []
  for batch in _cycle(batches, opt.steps):
    target = torch.from_numpy(1 - np.asarray(batch["label"], np.int64))
    loss = torch.nn.functional.cross_entropy(_answer_logits(model, batch, answer_ids), target)
    loss.backward()
    if opt.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(trained, opt.clip_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
  return losses


def p_yes_theirs(model, batches, answer_ids):
  """P(yes) of every row of `batches` with the transformers model."""
  import torch  # pylint: disable=import-outside-toplevel
  model.eval()
  with torch.no_grad():
    logits = torch.cat([_answer_logits(model, b, answer_ids) for b in batches]).numpy()
  return evaluate.p_yes(logits)


def control(model_dir, batches, lora_cfg, opt, eval_batches=(), dtype="float32",
            answer_ids=None, seed=0, scan_layers="auto"):
  """Train both sides from the same adapters; their per-step losses and held-out P(yes).

  `lora_cfg` None fine-tunes every weight of both models (ours from a float32 copy).
  `scan_layers` is our decoder's layout (`LMConfig.scan_layers`).

  `batches` are dicts of left-padded int [B, T] "input_ids", "attention_mask" and [B] "label",
  used in order (cycled when `opt.steps` is longer); `eval_batches` the same, scored after
  training. `answer_ids` default to the folder tokenizer's (yes, no) tokens.
  """
  lm = api.load_pretrained(model_dir, dtype=dtype, scan_layers=scan_layers)
  answer_ids = tuple(int(i) for i in (answer_ids or lm.yes_no_tokens()))
  if lora_cfg is None:
    adapters = step_lib.initial_weights(None, lm, None)
    model = hf_model(model_dir, dtype)
  else:
    adapters = jax.device_get(lora.init(jax.random.key(seed), lm.cfg, lora_cfg))
    model = peft_model(model_dir, adapters, lora_cfg, dtype)
  ours, trained = train_ours(lm, adapters, lora_cfg, batches, opt, answer_ids)
  theirs = train_theirs(model, batches, opt, answer_ids)
  out = {"ours_loss": ours, "theirs_loss": theirs, "answer_ids": answer_ids}
  if eval_batches:
    labels = np.concatenate([b["label"] for b in eval_batches])
    p_ours = p_yes_ours(lm, trained, lora_cfg, eval_batches, answer_ids)
    p_theirs = p_yes_theirs(model, eval_batches, answer_ids)
    out.update(ours_p_yes=p_ours, theirs_p_yes=p_theirs,
               ours_auc=metrics.auc(labels, p_ours), theirs_auc=metrics.auc(labels, p_theirs),
               max_p_yes_diff=float(np.max(np.abs(p_ours - p_theirs))))
  return out


def _prompts(dataset, tokenizer, workdir, split, samples, cfg):
  """Prompt-only examples of `samples` (indices in `split`) with their stored history, worded
  as the workdir's fine-tune words them (`render.WORDING`)."""
  result = history.take(history.load(Path(workdir) / "retrieval" / f"{split}.npz"), samples)
  f = cfg["finetune"]
  close = render.close_option(f, Path(workdir) / "embeddings" / "mixed.npy")
  return render.build_examples(dataset, result, tokenizer, split=split, labels=False,
                               max_length=f["max_length"], order=cfg["retrieval"]["order"],
                               close=close, **render.wording(f))


def _workdir_config(workdir):
  return json.loads((Path(workdir) / "config.json").read_text())


def workdir_batches(workdir, tokenizer, prompts, batch, eval_rows):
  """(train batches, held-out batches) of left-padded prompts from a workdir's retrieval."""
  cfg = _workdir_config(workdir)
  dataset = data.load_dataset(workdir)
  f = cfg["finetune"]
  pool = sets.pool(len(dataset.splits["train"]), f["pool_size"], f["seed"])[:prompts]
  held = evaluate.capped_rows(len(dataset.splits["valid"]), eval_rows, f["eval_rows"])
  pad = tokenizer.pad_token_id or 0
  out = []
  for split, samples in (("train", pool), ("valid", held)):
    examples = _prompts(dataset, tokenizer, workdir, split, samples, cfg)
    out.append([batches_lib.pad_batch(examples, range(i, min(i + batch, len(samples))), pad)
                for i in range(0, len(samples), batch)])
  return tuple(out)


def bench_control(workdir, model_dir, *, prompts=64, batch=4, steps=None, lr=1e-3, warmup=4,
                  weight_decay=0.01, rank=16, alpha=32.0, targets=("q_proj", "v_proj"),
                  eval_rows=64, dtype="float32", method="lora", clip_norm=0.0):
  """JSON-ready rows: one per step (both losses) and a summary (AUCs, largest differences)."""
  model_dir = model_dir or _workdir_config(workdir)["model"]["path"]
  if not model_dir:
    raise ValueError("the control needs a Hugging Face model folder (--model-dir)")
  train, held = workdir_batches(workdir, tokenizer_lib.load(model_dir), prompts, batch,
                                eval_rows)
  opt = Optim(lr=lr, steps=steps or len(train), warmup=warmup, weight_decay=weight_decay,
              clip_norm=clip_norm)
  lora_cfg = (None if method == "full" else
              lora.LoraConfig(rank=rank, alpha=alpha, dropout=0.0, targets=tuple(targets)))
  out = control(model_dir, train, lora_cfg, opt, held if eval_rows else (), dtype)
  rows = [{"bench": "control", "step": i + 1, "ours_loss": a, "theirs_loss": b,
           "abs_diff": abs(a - b)} for i, (a, b) in enumerate(zip(out["ours_loss"],
                                                                 out["theirs_loss"]))]
  summary = {"bench": "control_summary", "dtype": dtype, "model": str(model_dir),
             "method": method, "prompts": prompts, "batch": batch, "steps": opt.steps, "lr": lr,
             "warmup": warmup, "weight_decay": weight_decay, "clip_norm": clip_norm,
             **({} if lora_cfg is None else {"rank": rank, "alpha": alpha,
                                             "targets": list(targets)}),
             "max_loss_diff": max(r["abs_diff"] for r in rows),
             "max_rel_loss_diff": max(r["abs_diff"] / abs(r["theirs_loss"]) for r in rows)}
  if eval_rows:
    summary.update({k: out[k] for k in ("ours_auc", "theirs_auc", "max_p_yes_diff")},
                   eval_rows=len(out["ours_p_yes"]))
  return rows + [summary]
