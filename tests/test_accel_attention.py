"""cuDNN flash attention against XLA's, with left padding, on an NVIDIA GPU (skipped elsewhere).

  JAX_PLATFORMS=cuda python -m pytest tests/test_accel_attention.py
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rallrec_jax.llm import lora, losses, score
from rallrec_jax.llm.config import LMConfig
from rallrec_jax.llm.model import Decoder
from tests.llm_fixtures import init_params

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="cuDNN attention needs an NVIDIA GPU")

CFG = LMConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=4,
               num_heads=4, num_kv_heads=2, head_dim=64, dtype="bfloat16",
               param_dtype="bfloat16", tie_word_embeddings=True)
PADS = (0, 17, 64, 127)


def _batch(length=128):
  ids = np.random.default_rng(0).integers(3, CFG.vocab_size, (len(PADS), length))
  mask = np.ones_like(ids)
  for row, pad in enumerate(PADS):
    ids[row, :pad], mask[row, :pad] = 0, 0
  return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_logits_and_scores_match_xla_on_left_padded_rows(params):
  ids, mask = _batch()
  out = {}
  for impl in ("xla", "cudnn"):
    cfg = dataclasses.replace(CFG, attention=impl)
    logits = Decoder(cfg).apply({"params": params}, ids, mask)
    out[impl] = (logits, score.p_yes(cfg, params, ids, mask, 5, 6))
  real = np.asarray(mask, bool)
  assert np.isfinite(np.asarray(out["cudnn"][0])[real]).all()
  assert _rel(np.asarray(out["cudnn"][0])[real], np.asarray(out["xla"][0])[real]) < 2e-2
  np.testing.assert_allclose(out["cudnn"][1], out["xla"][1], atol=2e-2)


def test_lora_gradients_match_xla_and_are_finite_with_padding(params):
  ids, mask = _batch()
  lora_cfg = lora.LoraConfig(rank=8, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj"))
  adapters = jax.tree.map(lambda x: x + 0.01, lora.init(jax.random.key(1), CFG, lora_cfg))
  grads = {}
  for impl in ("xla", "cudnn"):
    cfg = dataclasses.replace(CFG, attention=impl)

    def loss(a, cfg=cfg):
      hidden, _ = lora.apply(cfg, params, a, lora_cfg, ids, mask, method=Decoder.hidden)
      return losses.hidden_next_token_loss(hidden, losses.output_matrix(cfg, params), ids, mask)

    value, grad = jax.jit(jax.value_and_grad(loss))(adapters)
    grads[impl] = (float(value), np.concatenate([np.ravel(np.asarray(g, np.float32))
                                                 for g in jax.tree.leaves(grad)]))
  assert np.isfinite(grads["cudnn"][1]).all() and np.abs(grads["xla"][1]).max() > 0
  assert abs(grads["cudnn"][0] - grads["xla"][0]) < 1e-2 * abs(grads["xla"][0])
  assert _rel(grads["cudnn"][1], grads["xla"][1]) < 5e-2
