"""The train step: answer and lm objectives, full fine-tuning, top-layer LoRA, warmup."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rallrec_jax.llm import hf_io, lora, losses
from rallrec_jax.llm.api import LM
from rallrec_jax.llm.config import LMConfig
from rallrec_jax.llm.model import unstack_layers
from rallrec_jax.train import finetune, step as step_lib
from tests.llm_fixtures import tiny_hf_model

YES, NO = 4, 5


@pytest.fixture(scope="module", params=["unrolled", "scanned"])
def tiny(request, tmp_path_factory):
  """(cfg, params, torch model) of a tiny random llama, in either layout."""
  folder = tmp_path_factory.mktemp("tiny_llama")
  torch_model = tiny_hf_model(folder, "llama", with_tokenizer=False)
  cfg = LMConfig.from_folder(folder, scan_layers="true" if request.param == "scanned" else "false")
  return cfg, hf_io.load_params(folder, cfg), torch_model


def left_padded(length=10, pads=(0, 3, 6, 1), seed=0, answer=0):
  """A left-padded batch of random prompts; with `answer` > 0, that many answer tokens at the end
  of every row are marked in loss_mask."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(6, 64, (len(pads), length)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, pad in enumerate(pads):
    mask[row, :pad] = 0
    ids[row, :pad] = 3
  loss_mask = np.zeros_like(ids)
  if answer:
    loss_mask[:, -answer:] = 1
  labels = np.arange(len(pads)) % 2
  return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask,
          "label": labels.astype(np.int32)}


def torch_answer_loss(torch_model, batch, position):
  """Two-way cross-entropy of (yes, no) logits at `position` per row, from transformers."""
  import torch  # pylint: disable=import-outside-toplevel
  ids = torch.tensor(batch["input_ids"], dtype=torch.long)
  mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
  positions = (mask.cumsum(1) - 1).clamp(min=0)
  logits = torch_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
  rows = logits[torch.arange(len(ids)), torch.tensor(position)][:, [YES, NO]]
  target = torch.tensor(1 - batch["label"], dtype=torch.long)
  return float(torch.nn.functional.cross_entropy(rows.double(), target))


def one_step(cfg, params, lora_cfg, loss, batch, lr=0.0):
  optimizer = optax.sgd(lr)
  train = step_lib.make_train_step(cfg, lora_cfg, optimizer, loss, (YES, NO))
  lm = LM(cfg=cfg, params=params)
  state = step_lib.init_train_state(jax.random.key(1),
                                    step_lib.initial_weights(jax.random.key(0), lm, lora_cfg),
                                    optimizer)
  return train(state, params, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.mark.parametrize("lora_cfg", [lora.LoraConfig(rank=4, dropout=0.0), None],
                         ids=["lora", "full"])
def test_answer_loss_matches_transformers_at_the_last_position(tiny, lora_cfg):
  cfg, params, torch_model = tiny
  batch = left_padded()
  _, metrics = one_step(cfg, params, lora_cfg, "answer", batch)
  expected = torch_answer_loss(torch_model, batch, [batch["input_ids"].shape[1] - 1] * 4)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
  assert float(metrics["answer_loss"]) == float(metrics["loss"])


def test_lm_loss_reports_the_decision_loss_before_the_answer(tiny):
  cfg, params, torch_model = tiny
  batch = left_padded(answer=2)
  _, metrics = one_step(cfg, params, lora.LoraConfig(rank=4, dropout=0.0), "lm", batch)
  length = batch["input_ids"].shape[1]
  expected = torch_answer_loss(torch_model, batch, [length - 3] * 4)
  assert float(metrics["answer_loss"]) == pytest.approx(expected, rel=1e-4)
  assert float(metrics["loss"]) != pytest.approx(expected, rel=1e-2)


def test_decision_position():
  loss_mask = jnp.asarray([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]])
  np.testing.assert_array_equal(losses.decision_position(loss_mask), [3, 1, 2])


def test_full_fine_tuning_trains_every_weight_and_lowers_the_loss(tiny):
  cfg, params, _ = tiny
  batch = {k: jnp.asarray(v) for k, v in left_padded().items()}
  optimizer = optax.adam(1e-2)
  lm = LM(cfg=cfg, params=params)
  train = step_lib.make_train_step(cfg, None, optimizer, "answer", (YES, NO))
  state = step_lib.init_train_state(jax.random.key(1), step_lib.initial_weights(None, lm, None),
                                    optimizer)
  losses = []
  for _ in range(8):
    state, metrics = train(state, params, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(state["weights"])):
    assert after.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(after - before))) > 0


def test_full_fine_tuning_lm_loss_is_the_plain_next_token_loss(tiny):
  cfg, params, torch_model = tiny
  import torch  # pylint: disable=import-outside-toplevel
  batch = left_padded(answer=2)
  _, metrics = one_step(cfg, params, None, "lm", batch)
  ids = torch.tensor(batch["input_ids"], dtype=torch.long)
  mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
  positions = (mask.cumsum(1) - 1).clamp(min=0)
  logits = torch_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
  labels = torch.where(torch.tensor(batch["loss_mask"]) > 0, ids, -100)
  expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1))
  assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-4)


def test_top_layer_lora_adapts_only_the_last_layers(tiny):
  cfg, params, _ = tiny
  top = lora.LoraConfig(rank=4, dropout=0.0, targets=("q_proj", "down_proj"), layers=1)
  adapters = unstack_layers(lora.init(jax.random.key(0), cfg, top), cfg.num_layers)
  assert sorted(adapters) == [f"layers_{cfg.num_layers - 1}"]
  state, metrics = one_step(cfg, params, top, "answer", left_padded(), lr=1.0)
  weights = unstack_layers(state["weights"], cfg.num_layers)
  b = weights[f"layers_{cfg.num_layers - 1}"]["self_attn"]["q_proj"]["b"]
  assert float(jnp.max(jnp.abs(b))) > 0 and np.isfinite(float(metrics["loss"]))
  with pytest.raises(ValueError, match="layers=-1"):
    lora.LoraConfig(layers=-1)


def test_unknown_loss_and_missing_answer_ids_are_errors(tiny):
  cfg = tiny[0]
  with pytest.raises(ValueError, match="loss='mse'"):
    step_lib.make_train_step(cfg, None, optax.sgd(0.1), "mse", (YES, NO))
  with pytest.raises(ValueError, match="answer token ids"):
    step_lib.make_train_step(cfg, None, optax.sgd(0.1), "answer", None)


def test_warmup_then_linear_decay():
  lr = finetune.schedule(1.0, 10, warmup=4)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 7, 10)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  assert float(finetune.schedule(1.0, 10)(0)) == 1.0


def test_clip_norm_clips_the_global_norm_before_adamw():
  params = {"w": jnp.zeros(2)}
  grads = [{"w": jnp.array([30.0, 40.0])}, {"w": jnp.array([0.3, 0.4])}]  # norms 50 and 0.5

  def run(opt, gs):
    state, p = opt.init(params), params
    for g in gs:
      updates, state = opt.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return np.asarray(p["w"])

  clipped = run(finetune.make_optimizer(1e-2, 10, clip_norm=1.0), grads)
  by_hand = run(finetune.make_optimizer(1e-2, 10), [{"w": jnp.array([0.6, 0.8])}, grads[1]])
  np.testing.assert_allclose(clipped, by_hand, rtol=1e-6)
  assert not np.allclose(run(finetune.make_optimizer(1e-2, 10), grads), clipped, rtol=1e-3)
