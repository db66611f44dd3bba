"""LoRA adapters: identity at init, merge, training, dropout, PEFT parity, save/load, sharding."""
import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rallrec_jax import parallel
from rallrec_jax.llm import hf_io, lora, losses
from rallrec_jax.llm.config import CheckpointError, LMConfig
from rallrec_jax.llm.model import Decoder, param_shardings, unstack_layers
from rallrec_jax.train import step as step_lib
from tests.llm_fixtures import random_batch, tiny_hf_model

QV = ("q_proj", "v_proj")
ALL = tuple(lora.IN_NDIM)


@pytest.fixture(scope="module", params=["unrolled", "scanned"])
def tiny(request, tmp_path_factory):
  """(folder, cfg, params, torch model) of a tiny random llama, in either layout."""
  folder = tmp_path_factory.mktemp("tiny_llama")
  torch_model = tiny_hf_model(folder, "llama", with_tokenizer=False)
  cfg = LMConfig.from_folder(folder, scan_layers="true" if request.param == "scanned" else "false")
  return folder, cfg, hf_io.load_params(folder, cfg), torch_model


@pytest.fixture(scope="module")
def trainer(tiny):
  """(LoraConfig, optimizer, jitted step), shared by the tests that train so it compiles once."""
  lora_cfg = lora.LoraConfig(rank=4, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
  optimizer = optax.adamw(3e-2)
  return lora_cfg, optimizer, step_lib.make_train_step(tiny[1], lora_cfg, optimizer)


def batch_of(cfg, length=12):
  ids, mask = random_batch(cfg.vocab_size, batch=4, length=length, pad_right=(0, 4, 7, 2))
  return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, jnp.int32),
          "loss_mask": jnp.asarray(mask, jnp.int32)}


@functools.partial(jax.jit, static_argnums=(0, 4))
def run(cfg, params, ids, mask, method=None):
  return Decoder(cfg).apply({"params": params}, ids, mask, method=method)


@functools.partial(jax.jit, static_argnums=(0, 3, 6))
def run_lora(cfg, params, adapters, lora_cfg, ids, mask, method=None):
  return lora.apply(cfg, params, adapters, lora_cfg, ids, mask, method=method)


def randomize_b(adapters, seed=1, scale=0.1):
  """Adapters with B drawn at random (in B's sharding), so that they change the output."""
  leaves, tree = jax.tree.flatten_with_path(adapters)
  out = [jax.device_put(scale * jax.random.normal(jax.random.key(seed + i), x.shape), x.sharding)
         if path[-1].key == "b" else x for i, (path, x) in enumerate(leaves)]
  return jax.tree.unflatten(tree, out)


def by_module(adapters, kind, cfg):
  """{"layers_i/.../proj": A or B} of every adapted module, as numpy, in either layout."""
  per_layer = unstack_layers(adapters, cfg.num_layers)
  return {"/".join(k.key for k in path[:-1]): np.asarray(x)
          for path, x in jax.tree.flatten_with_path(per_layer)[0] if path[-1].key == kind}


def spec(x, cfg):
  """A layer's partition spec of adapter `x` (a stack's leading layers axis left out)."""
  spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
  return spec[1:] if cfg.scanned else spec


def layer_0(adapters):
  return adapters["layers"] if "layers" in adapters else adapters["layers_0"]


def test_config_validation():
  assert lora.LoraConfig(rank=4, alpha=8.0).scale == 2.0
  assert lora.LoraConfig(targets=["q_proj"]).targets == ("q_proj",)
  with pytest.raises(ValueError, match="rank"):
    lora.LoraConfig(rank=0)
  with pytest.raises(ValueError, match="targets"):
    lora.LoraConfig(targets=("qkv",))


@pytest.mark.parametrize("targets", [QV, ALL])
def test_identity_at_init_and_merge(tiny, targets):
  _, cfg, params, _ = tiny
  lora_cfg = lora.LoraConfig(rank=4, targets=targets)
  adapters = lora.init(jax.random.key(0), cfg, lora_cfg)
  parent = {t: "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            for t in targets}
  assert set(by_module(adapters, "a", cfg)) == {f"layers_{i}/{parent[t]}/{t}"
                                           for i in range(cfg.num_layers) for t in targets}
  batch = batch_of(cfg)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  base = run(cfg, params, ids, mask)
  np.testing.assert_array_equal(run_lora(cfg, params, adapters, lora_cfg, ids, mask), base)

  adapters = randomize_b(adapters)
  adapted = run_lora(cfg, params, adapters, lora_cfg, ids, mask)
  merged = lora.merge(params, adapters, lora_cfg)
  assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2
  np.testing.assert_allclose(adapted, run(cfg, merged, ids, mask), atol=1e-5)

  hidden, _ = run_lora(cfg, params, adapters, lora_cfg, ids, mask, Decoder.hidden)
  np.testing.assert_allclose(hidden, run(cfg, merged, ids, mask, Decoder.hidden)[0], atol=1e-5)


def test_train_step_trains_adapters_only(tiny, trainer):
  _, cfg, params, _ = tiny
  lora_cfg, optimizer, step = trainer
  adapters = lora.init(jax.random.key(0), cfg, lora_cfg)
  a_before = by_module(adapters, "a", cfg)
  params_before = jax.tree.map(np.array, params)
  state = step_lib.init_train_state(jax.random.key(1), adapters, optimizer)
  losses = []
  for _ in range(6):
    state, metrics = step(state, params, batch_of(cfg))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  assert int(state["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, params), params_before)
  # B starts at 0 and A's only other force is a tiny weight decay: movement means a gradient.
  b_after, a_after = (by_module(state["weights"], "b", cfg),
                      by_module(state["weights"], "a", cfg))
  assert len(b_after) == 3 * cfg.num_layers
  for module, b in b_after.items():
    assert np.abs(b).min() > 0, module
    assert np.abs(a_after[module] - a_before[module]).max() > 1e-3, module


def test_dropout_is_random_but_reproducible(tiny):
  _, cfg, params, _ = tiny
  lora_cfg = lora.LoraConfig(rank=4, dropout=0.3)
  adapters = randomize_b(lora.init(jax.random.key(0), cfg, lora_cfg))
  ids = batch_of(cfg)["input_ids"]
  forward = jax.jit(lambda rng: lora.apply(cfg, params, adapters, lora_cfg, ids, dropout_rng=rng))
  plain = run_lora(cfg, params, adapters, lora_cfg, ids, None)
  first = forward(jax.random.key(5))
  assert float(jnp.max(jnp.abs(first - plain))) > 1e-3
  np.testing.assert_array_equal(first, forward(jax.random.key(5)))
  assert float(jnp.max(jnp.abs(first - forward(jax.random.key(6))))) > 1e-3


def test_matches_peft(tiny):
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  _, cfg, params, torch_model = tiny
  lora_cfg = lora.LoraConfig(rank=4, alpha=12.0, dropout=0.0, targets=QV)
  adapters = randomize_b(lora.init(jax.random.key(0), cfg, lora_cfg), scale=0.3)
  model = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(
      r=4, lora_alpha=12, target_modules=list(QV), lora_dropout=0.0))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".lora_" not in name:
        continue
      layer, proj = name.split(".layers.")[1].split(".")[0], name.split(".self_attn.")[1][:6]
      pair = unstack_layers(adapters, cfg.num_layers)[f"layers_{layer}"]["self_attn"][proj]
      # PEFT: lora_A.weight [r, in], lora_B.weight [out = heads * head_dim, r].
      ours = pair["a"].T if ".lora_A." in name else pair["b"].reshape(4, -1).T
      p.copy_(torch.from_numpy(np.array(ours)))
  batch = batch_of(cfg)
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(np.array(batch["input_ids"])).long(),
                   attention_mask=torch.from_numpy(np.array(batch["attention_mask"])).long()
                   ).logits.numpy()
  ours = np.asarray(run_lora(cfg, params, adapters, lora_cfg, batch["input_ids"],
                             batch["attention_mask"]))
  real = np.asarray(batch["attention_mask"]).astype(bool)
  assert np.abs(ours - run(cfg, params, batch["input_ids"], batch["attention_mask"])).max() > 1e-2
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4)


def test_save_load_round_trip_and_mismatches(tiny, tmp_path):
  _, cfg, _, _ = tiny
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj"))
  adapters = randomize_b(lora.init(jax.random.key(0), cfg, lora_cfg))
  folder = lora.save(adapters, lora_cfg, tmp_path / "adapter", cfg)
  assert {p.name for p in folder.iterdir()} == {lora.CONFIG, lora.WEIGHTS}
  for base in (None, cfg):
    loaded, loaded_cfg = lora.load(folder, base)
    assert loaded_cfg == lora_cfg
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(loaded, cfg.num_layers),
                 unstack_layers(adapters, cfg.num_layers))

  with pytest.raises(CheckpointError, match=r"tensor 'layers_0/self_attn/o_proj/a'.*rank 8"):
    lora.load(folder, cfg, rank=8)
  with pytest.raises(CheckpointError, match=r"tensor 'layers_0/self_attn/o_proj/b'"):
    lora.load(folder, dataclasses.replace(cfg, hidden_size=48))
  with pytest.raises(CheckpointError, match=r"missing tensor 'layers_2/self_attn/o_proj/a'"):
    lora.load(folder, dataclasses.replace(cfg, num_layers=3))
  (folder / lora.CONFIG).unlink()
  with pytest.raises(CheckpointError, match=lora.CONFIG):
    lora.load(folder)


def test_sharded_adapters_and_step_match_unsharded(tiny, trainer):
  folder, cfg, params, _ = tiny
  mesh = parallel.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  layout = lora.init(jax.random.key(0), cfg, lora.LoraConfig(targets=("q_proj", "o_proj")), mesh)
  attn = layer_0(layout)["self_attn"]
  assert spec(attn["q_proj"]["a"], cfg) == ("fsdp", None)
  assert spec(attn["q_proj"]["b"], cfg) == (None, "tensor", None)
  assert spec(attn["o_proj"]["a"], cfg) == ("tensor", None, None)
  assert spec(attn["o_proj"]["b"], cfg) == (None, "fsdp")

  lora_cfg, optimizer, step = trainer
  sharded = lora.init(jax.random.key(0), cfg, lora_cfg, mesh)
  assert spec(layer_0(sharded)["mlp"]["down_proj"]["b"], cfg) == (None, "fsdp")
  single = lora.init(jax.random.key(0), cfg, lora_cfg)
  jax.tree.map(np.testing.assert_array_equal, sharded, single)
  sharded_params = hf_io.load_params(folder, cfg, param_shardings(cfg, mesh))
  batch = batch_of(cfg)
  sharded_batch = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.shape))
                   for k, v in batch.items()}
  losses = {}
  for name, adapters, p, b in (("sharded", sharded, sharded_params, sharded_batch),
                               ("single", single, params, batch)):
    state = step_lib.init_train_state(jax.random.key(1), randomize_b(adapters), optimizer)
    for _ in range(2):
      state, metrics = step(state, p, b)
    losses[name] = float(metrics["loss"])
  assert losses["sharded"] == pytest.approx(losses["single"], abs=1e-5)


@pytest.mark.parametrize("chunk_tokens", [12, 1000])
def test_chunked_loss_matches_full_logits(chunk_tokens):
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(3, 11, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(37, 8)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 37, (3, 11)), jnp.int32)
  loss_mask = jnp.asarray(rng.integers(0, 2, (3, 11)), jnp.int32)

  def full(h):
    return losses.next_token_loss(jnp.einsum("bte,ve->btv", h, head), ids, loss_mask)

  def chunked(h):
    return losses.hidden_next_token_loss(h, head, ids, loss_mask, chunk_tokens)

  np.testing.assert_allclose(chunked(hidden), full(hidden), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(chunked)(hidden), jax.grad(full)(hidden), atol=1e-6)
