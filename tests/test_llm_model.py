"""The Flax decoder against transformers' PyTorch models, sharded against unsharded, and
scanned layers against unrolled ones."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from rallrec_jax import parallel
from rallrec_jax.llm import LMConfig, load_pretrained
from rallrec_jax.llm import generate, hf_io, lora, matmul, tiny
from rallrec_jax.llm import model as model_lib
from rallrec_jax.llm.model import Decoder, abstract_params, stack_layers
from tests.llm_fixtures import init_params, random_batch, tiny_hf_model

torch = pytest.importorskip("torch")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
CASES = {
    "llama_gqa_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_gqa_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_mha_head_dim": ("llama", dict(num_key_value_heads=4, head_dim=16)),
    "qwen2_bias": ("qwen2", dict(tie_word_embeddings=False)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "llama3_rope": ("llama", dict(rope_parameters={"rope_theta": 5000.0, **LLAMA3_ROPE})),
    "linear_rope": ("llama", dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "linear",
                                                   "factor": 4.0})),
}


def torch_logits(model, ids, mask):
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.parametrize("scan", ["false", "true"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, scan, tmp_path):
  kind, overrides = CASES[case]
  model = tiny_hf_model(tmp_path, kind, **overrides)
  lm = load_pretrained(tmp_path, scan_layers=scan)
  ids, mask = random_batch(lm.cfg.vocab_size, batch=3, length=40)
  ref = torch_logits(model, ids, mask)
  ours = lm.logits(ids, mask)
  real = mask.astype(bool)
  assert np.abs(ref).max() > 1.0  # weights large enough for a real comparison
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


def test_left_padding_matches_the_unpadded_prompt(tmp_path):
  model = tiny_hf_model(tmp_path, "llama")
  lm = load_pretrained(tmp_path)
  ids, _ = random_batch(lm.cfg.vocab_size, batch=1, length=10)
  padded = np.concatenate([np.full((1, 6), 3), ids], axis=1)
  mask = np.concatenate([np.zeros((1, 6), int), np.ones((1, 10), int)], axis=1)
  np.testing.assert_allclose(lm.logits(padded, mask)[:, 6:], lm.logits(ids), atol=1e-5)
  np.testing.assert_allclose(lm.logits(ids), torch_logits(model, ids, np.ones_like(ids)),
                             atol=1e-4)


def test_config_round_trips_through_hf(tmp_path):
  tiny_hf_model(tmp_path, "llama", rope_parameters={"rope_theta": 5000.0, **LLAMA3_ROPE})
  cfg = LMConfig.from_folder(tmp_path)
  assert cfg.rope["rope_type"] == "llama3" and cfg.rope_theta == 5000.0
  assert LMConfig.from_hf(cfg.to_hf()) == cfg
  assert cfg.num_params() == sum(int(np.prod(v.shape)) for v in
                                 _leaves(hf_io.load_params(tmp_path, cfg)))


def _leaves(tree):
  for v in tree.values():
    yield from (_leaves(v) if isinstance(v, dict) else [v])


def test_remat_and_bf16(tmp_path):
  tiny_hf_model(tmp_path, "llama")
  ids, mask = random_batch(64)
  ref = load_pretrained(tmp_path).logits(ids, mask)
  np.testing.assert_allclose(load_pretrained(tmp_path, remat="full").logits(ids, mask), ref,
                             atol=1e-5)
  bf16 = load_pretrained(tmp_path, dtype="bfloat16")
  assert bf16.params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype.name == "bfloat16"
  out = bf16.logits(ids, mask)
  real = mask.astype(bool)
  assert out.dtype == np.float32 and np.abs(out - ref)[real].max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("scan", ["false", "true"])
@pytest.mark.parametrize("shape", [(("data", 2), ("fsdp", 2), ("tensor", 2)), (("data", 8),)])
def test_sharded_forward_equals_unsharded(shape, scan, tmp_path):
  tiny_hf_model(tmp_path, "llama", hidden_size=48, intermediate_size=64, head_dim=8,
                num_attention_heads=6, num_key_value_heads=2)
  ids, mask = random_batch(64, batch=8, pad_right=(0, 3, 5, 0, 1, 2, 7, 4))
  ref = load_pretrained(tmp_path).logits(ids, mask)
  mesh = parallel.make_mesh(shape)
  lm = load_pretrained(tmp_path, mesh=mesh, scan_layers=scan)
  np.testing.assert_allclose(lm.logits(ids, mask), ref, atol=2e-5)
  layers = lm.params["layers"] if lm.cfg.scanned else lm.params["layers_0"]
  up = layers["mlp"]["up_proj"]["kernel"]
  q = layers["self_attn"]["q_proj"]["kernel"]
  lead = (lm.cfg.num_layers,) if lm.cfg.scanned else ()  # a stack's layers axis is not split
  if dict(shape).get("tensor"):
    assert tuple(up.sharding.spec) == (None,) * len(lead) + ("fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == lead + (48 // 2, 64 // 2)
    assert q.addressable_shards[0].data.shape == lead + (24, 3, 8)
  else:
    assert up.addressable_shards[0].data.shape == up.shape  # no fsdp/tensor axes: replicated


def test_mesh_shapes():
  mesh = parallel.make_mesh((("data", -1), ("tensor", 2)))
  assert dict(mesh.shape) == {"data": 4, "tensor": 2}
  with pytest.raises(ValueError, match="one of"):
    parallel.make_mesh((("model", 8),))
  with pytest.raises(ValueError, match="needs 6 devices"):
    parallel.make_mesh((("data", 3), ("tensor", 2)))
  uneven = parallel.logical_sharding((9, 64), ("heads", "head_dim"), mesh)
  assert tuple(uneven.spec) == (None, None)  # 9 heads do not split over 2 devices


@pytest.mark.parametrize("init_std", [0.02, 0.1])
def test_tiny_build_draws_weights_at_init_std(tmp_path, init_std):
  folder = tiny.build(tmp_path / "m", ["some words for the vocabulary"], hidden_size=64,
                      intermediate_size=128, init_std=init_std)
  tensors = safetensors_numpy.load_file(str(folder / "model.safetensors"))
  for name, value in tensors.items():
    if "norm" in name:
      np.testing.assert_array_equal(value, 1.0)
    else:
      assert abs(value.std() / init_std - 1) < 0.1, (name, value.std())


DEEP = LMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=6, num_heads=4,
                num_kv_heads=2, head_dim=8, scan_layers="false")


def test_auto_scans_deep_stacks_only():
  assert not dataclasses.replace(DEEP, num_layers=2, scan_layers="auto").scanned
  assert not dataclasses.replace(DEEP, num_layers=4, scan_layers="auto").scanned
  assert dataclasses.replace(DEEP, scan_layers="auto").scanned
  # 16-bit compute on a CPU runs unrolled (the scan copies its residuals there).
  on_cpu = jax.default_backend() == "cpu"
  assert dataclasses.replace(DEEP, dtype="bfloat16").scanned is not on_cpu
  assert dataclasses.replace(DEEP, dtype="bfloat16", scan_layers="true").scanned
  assert dataclasses.replace(DEEP, num_layers=2, scan_layers="true").scanned
  with pytest.raises(ValueError, match="scan_layers"):
    dataclasses.replace(DEEP, scan_layers="yes")


def _both_layouts(remat="none"):
  """(unrolled cfg, its params, scanned cfg, the same params stacked) of a 3-layer decoder:
  deep enough for a scan over layers, shallow enough to compile the unrolled twin quickly."""
  unrolled = dataclasses.replace(DEEP, num_layers=3, remat=remat)
  params = jax.tree.map(lambda p: p * 5.0, init_params(unrolled))  # large enough for a real comparison
  return unrolled, params, dataclasses.replace(unrolled, scan_layers="true"), stack_layers(params)


def _close(got, want, tol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * float(np.abs(w).max()))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_equal_unrolled(remat):
  unrolled, params, scanned, stacked = _both_layouts(remat)
  assert scanned.scanned and set(stacked) == {"embed_tokens", "layers", "norm", "lm_head"}
  abstract = abstract_params(scanned)["layers"]["mlp"]["up_proj"]["kernel"]
  assert tuple(abstract.names) == ("layers", "embed", "mlp")
  ids, mask = (jnp.asarray(a, jnp.int32) for a in random_batch(64, batch=3, length=10))

  def apply(cfg, p):
    return Decoder(cfg).apply({"params": p}, ids, mask)

  def loss(cfg, p):
    return jnp.mean(apply(cfg, p) ** 2)

  # Jitted: op by op, a forward and backward compiles each op on its own.
  ref = jax.jit(functools.partial(apply, unrolled))(params)
  assert float(jnp.abs(ref).max()) > 1.0
  _close(jax.jit(functools.partial(apply, scanned))(stacked), ref, 1e-5)
  want = stack_layers(jax.jit(jax.grad(functools.partial(loss, unrolled)))(params))
  _close(jax.jit(jax.grad(functools.partial(loss, scanned)))(stacked), want, 1e-4)


def test_scanned_lora_and_cache_equal_unrolled():
  unrolled, params, scanned, stacked = _both_layouts()
  ids, mask = (jnp.asarray(a, jnp.int32) for a in random_batch(64, batch=3, length=10))
  lora_cfg = lora.LoraConfig(rank=4, dropout=0.2, targets=("q_proj", "down_proj"), layers=2)
  adapters = lora.init(jax.random.key(1), unrolled, lora_cfg)
  adapters = jax.tree.map(lambda a: a + 0.1, adapters)  # B away from zero
  assert sorted(adapters) == ["layers_1", "layers_2"]
  stacked_adapters = lora.init(jax.random.key(1), scanned, lora_cfg)
  assert stacked_adapters["layers"]["self_attn"]["q_proj"]["a"].shape[0] == 2
  _close(stacked_adapters, stack_layers(lora.init(jax.random.key(1), unrolled, lora_cfg)), 0)

  def loss(cfg, p, a):
    out = lora.apply(cfg, p, a, lora_cfg, ids, mask, dropout_rng=jax.random.key(7))
    return jnp.mean(out ** 2)

  value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, unrolled), argnums=1))(
      params, adapters)
  got, got_grads = jax.jit(jax.value_and_grad(functools.partial(loss, scanned), argnums=1))(
      stacked, stack_layers(adapters))
  _close(got, value, 1e-5)  # the same dropout masks in both layouts
  _close(got_grads, stack_layers(grads), 1e-4)
  _close(lora.merge(stacked, stack_layers(adapters), lora_cfg),
         stack_layers(lora.merge(params, adapters, lora_cfg)), 1e-6)

  def cached(cfg, p):
    cache = generate.init_cache(cfg, 3, 16)
    hidden, cache = Decoder(cfg).apply({"params": p}, ids, mask, cache=cache,
                                       kv_mask=jnp.pad(mask, ((0, 0), (0, 6))),
                                       method=Decoder.hidden)
    return hidden, cache

  hidden, cache = jax.jit(functools.partial(cached, unrolled))(params)
  got_hidden, got_cache = jax.jit(functools.partial(cached, scanned))(stacked)
  assert got_cache["k"].shape == (3, 3, 16, 2, 8)
  _close(got_hidden, hidden, 1e-5)
  _close(got_cache, jax.tree.map(lambda *c: jnp.stack(c), *cache), 1e-5)


@pytest.mark.parametrize("layers", [None, 1, 2])
def test_last_only_equals_the_last_position_of_the_whole_forward(layers):
  """The last layer computed for the last position alone gives that position's hidden state
  and gradients, in both layouts, with full weights trained or LoRA on the top layer(s)."""
  unrolled, params, scanned, stacked = _both_layouts()
  ids, mask = (jnp.asarray(a, jnp.int32) for a in random_batch(64, batch=3, length=10))
  mask = mask[:, ::-1]  # left-padded, as scored and trained
  lora_cfg = layers and lora.LoraConfig(rank=4, dropout=0.0, layers=layers,
                                        targets=("q_proj", "v_proj", "down_proj"))

  def last_hidden(cfg, base, trained, last_only):
    kwargs = dict(method=Decoder.hidden, last_only=last_only)
    if lora_cfg:
      hidden, _ = lora.apply(cfg, base, trained, lora_cfg, ids, mask, **kwargs)
    else:
      hidden, _ = Decoder(cfg).apply({"params": trained}, ids, mask, **kwargs)
    return hidden[:, -1]

  adapters = lora_cfg and jax.tree.map(lambda a: a + 0.1,
                                       lora.init(jax.random.key(1), unrolled, lora_cfg))
  def loss(cfg, base, trained, last_only):
    hidden = last_hidden(cfg, base, trained, last_only)
    return jnp.sum(jnp.sin(hidden)), hidden

  for cfg, base, trained in ((unrolled, params, adapters or params),
                             (scanned, stacked, stack_layers(adapters or params))):
    ((_, hidden), grads), ((_, want_hidden), want_grads) = (
        jax.jit(jax.value_and_grad(functools.partial(loss, cfg, base, last_only=flag),
                                   has_aux=True))(trained) for flag in (True, False))
    assert float(jnp.abs(want_hidden).max()) > 0.5
    _close(hidden, want_hidden, 1e-5)
    _close(grads, want_grads, 1e-4)
  with pytest.raises(ValueError, match="last_only"):
    Decoder(unrolled).apply({"params": params}, ids, mask, method=Decoder.hidden, last_only=True,
                            cache=generate.init_cache(unrolled, 3, 16))


def test_16_bit_matmul_runs_every_dot_on_16_bit_inputs_with_float32_accumulation():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 48)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(48, 32)), jnp.bfloat16)
  c = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)

  def loss(x, w):
    return (matmul.einsum_f32_acc("ij,jk->ik", x, w).astype(jnp.float32) * c).sum()

  def exact(x, w):
    return ((x.astype(jnp.float32) @ w.astype(jnp.float32)) * c).sum()

  got = jax.grad(loss, (0, 1))(x, w)
  want = jax.grad(exact, (0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
  for g, e in zip(got, want):
    assert g.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits: the cotangent and the result are rounded once each.
    np.testing.assert_allclose(np.asarray(g, np.float32), e, atol=0.02 * float(jnp.abs(e).max()))

  def dots(jaxpr):
    for eq in jaxpr.eqns:
      if eq.primitive.name == "dot_general":
        yield eq
      if "call_jaxpr" in eq.params:   # the forward pass, inside the custom_vjp call
        yield from dots(eq.params["call_jaxpr"].jaxpr)

  found = list(dots(jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(x, w).jaxpr))
  assert len(found) == 3   # forward, input gradient, weight gradient
  for eq in found:
    assert [v.aval.dtype for v in eq.invars] == [jnp.bfloat16, jnp.bfloat16]
    assert eq.outvars[0].aval.dtype == jnp.float32


def test_causal_blocks_equal_whole_attention_values_and_gradients():
  """Causal blocks of queries against the keys up to each block's end: the same outputs and
  gradients as XLA's kernel over the whole score matrix (left padding, GQA, a ragged last
  block)."""
  rng = np.random.default_rng(0)
  b, t, h, k, d = 3, 45, 4, 2, 8
  q, key, value = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, k, k))
  real = np.arange(t)[None, :] >= (t - np.array([45, 30, 7]))[:, None]   # left padding
  mask = model_lib._mask(jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.asarray(real))
  weights = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)

  def loss(attend, q, key, value):
    out = attend(q, key, value, mask=mask)
    return jnp.sum(jnp.sin(out) * weights), out

  def run(attend):
    return jax.value_and_grad(functools.partial(loss, attend), (0, 1, 2), has_aux=True)(
        q, key, value)

  (_, want), want_grads = run(functools.partial(jax.nn.dot_product_attention,
                                                implementation="xla"))
  for block in (8, 16, 32):
    (_, got), got_grads = run(functools.partial(model_lib.causal_blocks, block=block))
    _close(got, want, 1e-5)
    _close(got_grads, want_grads, 1e-5)
  with pytest.raises(ValueError, match="without a cache"):
    model_lib.causal_blocks(q[:, -1:], key, value, mask[:, :, -1:])


def test_automatic_attention_runs_causal_blocks_on_the_cpu_where_they_apply():
  cfg = dataclasses.replace(DEEP, attention="")
  q = jnp.zeros((2, model_lib.CAUSAL_BLOCK + 1, cfg.num_heads, cfg.head_dim))
  assert jax.default_backend() == "cpu"
  assert model_lib._implementation(cfg, q, None, False) == "blocked"
  assert model_lib._implementation(cfg, q, {"k": None}, False) == "xla"   # a KV cache
  assert model_lib._implementation(cfg, q, None, True) == "xla"           # last position only
  assert model_lib._implementation(cfg, q[:, :model_lib.CAUSAL_BLOCK], None, False) == "xla"
  xla = dataclasses.replace(cfg, attention="xla")
  assert model_lib._implementation(xla, q, None, False) == "xla"
