"""The jitted training step: what is trained (LoRA adapters or every weight) and on what loss.

Two objectives, chosen by `loss`:
- "answer": the cross-entropy of the two-way softmax over the Yes/No logits at the last prompt
  position, exactly the score that evaluation reads (P(yes) = sigmoid(logit_yes - logit_no)).
  Batches are prompt-only, left-padded, with a 0/1 "label" per row; no vocabulary projection.
- "lm": next-token cross-entropy over the answer tokens ("Yes." / "No.") after the prompt.

Either way the step also reports "answer_loss", the two-way decision loss alone, read at the
position just before the first answer token ("lm") or at the last position ("answer"), so runs
with different objectives are compared on the same number.

What is trained, chosen by `lora_cfg`: a LoraConfig trains adapters over frozen base params;
None trains every weight of the model (full fine-tuning), from a float32 copy of the params
that is laid out with their shardings. The state holds the trained tree as "weights".
"""
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from rallrec_jax import config as config_lib, parallel
from rallrec_jax.llm import lora, losses
from rallrec_jax.llm.model import Decoder


def initial_weights(rng, lm, lora_cfg):
  """Fresh adapters (LoRA) or a float32 copy of the base params (full fine-tuning).

  The copy is made by a jitted cast, so its buffers are new even for float32 params: the step
  donates the state, which must never take the base params down with it.
  """
  if lora_cfg is None:
    return _float32_copy(lm.params)
  return lora.init(rng, lm.cfg, lora_cfg, lm.mesh, lm.rules)


@jax.jit
def _float32_copy(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def init_train_state(rng, weights, optimizer):
  """The state the step takes: trained weights, optimizer state, step, dropout rng.

  Every leaf is placed on the weights' mesh (replicated unless already laid out there), the
  placement the step gives back, so the second step reuses the first one's compilation.
  """
  sharding = jax.tree.leaves(weights)[0].sharding
  mesh = (sharding.mesh if isinstance(sharding, NamedSharding)
          else parallel.make_mesh((("data", 1),), jax.devices()[:1]))
  state = {"weights": weights, "opt_state": optimizer.init(weights),
           "step": jnp.zeros((), jnp.int32), "rng": rng}
  return jax.tree.map(lambda x: _on_mesh(x, mesh), state)


def _on_mesh(x, mesh):
  if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
    return x
  return parallel.replicate(x, mesh)


def make_train_step(cfg, lora_cfg, optimizer, loss="lm", answer_ids=None):
  """A jitted `step(state, params, batch) -> (state, metrics)`.

  `state` comes from `init_train_state`; `batch` holds [B, T] "input_ids", "attention_mask",
  "loss_mask" (the tokens to predict, see `losses.next_token_loss`) and [B] "label". The base
  params are an argument (not a baked-in constant), so one compiled step serves any weights of
  this shape; under full fine-tuning they are not read. `answer_ids` are the (yes, no) token
  ids; without them the decision loss is not computed and `loss` must be "lm". The state is
  donated so its buffers are reused in place.
  """
  if loss not in config_lib.FINETUNE_LOSSES:
    raise ValueError(f"loss={loss!r} is not one of {config_lib.FINETUNE_LOSSES}")
  if loss == "answer" and answer_ids is None:
    raise ValueError("the answer loss needs the (yes, no) answer token ids")
  answer = None if answer_ids is None else jnp.asarray(answer_ids, jnp.int32)
  model = Decoder(cfg)

  def forward(weights, params, batch, dropout_rng):
    # The answer loss reads the last position of prompt-only rows alone: the last layer
    # computes only that position.
    args = (batch["input_ids"], batch["attention_mask"])
    kwargs = {"method": Decoder.hidden, "last_only": loss == "answer"}
    if lora_cfg is None:
      return model.apply({"params": weights}, *args, **kwargs)
    return lora.apply(cfg, params, weights, lora_cfg, *args, dropout_rng=dropout_rng, **kwargs)

  def loss_fn(weights, params, batch, dropout_rng):
    hidden, _ = forward(weights, params, batch, dropout_rng)
    head_params = weights if lora_cfg is None else params
    metrics = {}
    if answer is not None:
      rows = model.apply({"params": head_params}, answer, method=Decoder.answer_rows)
      if loss == "answer":
        hidden_at = hidden[:, -1]
      else:
        at = losses.decision_position(batch["loss_mask"])
        hidden_at = jnp.take_along_axis(hidden, at[:, None, None], axis=1)[:, 0]
      metrics["answer_loss"] = losses.answer_loss(hidden_at, rows, batch["label"])
    if loss == "answer":
      return metrics["answer_loss"], metrics
    if lora_cfg is None:  # the output projection is trained too: plain logits
      logits = model.apply({"params": weights}, hidden, method=Decoder.project)
      value = losses.next_token_loss(logits, batch["input_ids"], batch["loss_mask"])
    else:
      value = losses.hidden_next_token_loss(hidden, losses.output_matrix(cfg, params),
                                            batch["input_ids"], batch["loss_mask"])
    return value, metrics

  def step(state, params, batch):
    rng, dropout_rng = jax.random.split(state["rng"])
    use_dropout = lora_cfg is not None and lora_cfg.dropout > 0
    (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["weights"], params, batch, dropout_rng if use_dropout else None)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["weights"])
    new_state = {"weights": optax.apply_updates(state["weights"], updates),
                 "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
    return new_state, {"loss": value, "grad_norm": optax.tree.norm(grads), **metrics}

  return jax.jit(step, donate_argnums=0)
