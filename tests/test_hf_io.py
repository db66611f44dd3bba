"""Hugging Face checkpoints: export round trips, bad folders, shard files, loading into a mesh."""
import functools
import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rallrec_jax import parallel
from rallrec_jax.llm import hf_io, lora
from rallrec_jax.llm.config import CheckpointError, LMConfig
from rallrec_jax.llm.model import Decoder, param_shardings, stack_layers
from tests.llm_fixtures import random_batch, tiny_hf_model

IDS, MASK = random_batch(64, batch=4, pad_right=(0, 4, 7, 2))
REAL = MASK.astype(bool)


@functools.partial(jax.jit, static_argnums=0)
def logits(cfg, params, ids, mask):
  return Decoder(cfg).apply({"params": params}, ids, mask)


def ours(folder, shardings=None, scan="false"):
  cfg = LMConfig.from_folder(folder, scan_layers=scan)
  params = hf_io.load_params(folder, cfg, shardings)
  return cfg, params, np.asarray(logits(cfg, params, IDS, MASK))


def theirs(model):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(IDS).long(),
                 attention_mask=torch.from_numpy(MASK).long()).logits.numpy()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """(folder, torch model) of a tiny llama saved by transformers."""
  folder = tmp_path_factory.mktemp("good")
  return folder, tiny_hf_model(folder, "llama", with_tokenizer=False)


@pytest.mark.parametrize("kind, tied, scan", [("llama", False, "false"), ("llama", True, "false"),
                                             ("qwen2", False, "false"), ("qwen2", False, "true")])
def test_export_round_trip_with_merged_lora(tmp_path, kind, tied, scan):
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  model = tiny_hf_model(tmp_path / "hf", kind, with_tokenizer=False, tie_word_embeddings=tied)
  cfg, params, base = ours(tmp_path / "hf", scan=scan)
  assert cfg.tie_word_embeddings == tied and cfg.qkv_bias == (kind == "qwen2")
  np.testing.assert_allclose(base[REAL], theirs(model)[REAL], atol=1e-4)

  lora_cfg = lora.LoraConfig(rank=2, targets=("q_proj", "o_proj", "up_proj"))
  adapters = lora.init(jax.random.key(0), cfg, lora_cfg)
  adapters = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape),
                          adapters)
  merged = lora.merge(params, adapters, lora_cfg)
  hf_io.export(merged, cfg, tmp_path / "out")
  reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  adapted = np.asarray(lora.apply(cfg, params, adapters, lora_cfg, IDS, MASK))
  assert np.abs(adapted - base).max() > 1e-2
  np.testing.assert_allclose(theirs(reloaded)[REAL], adapted[REAL], atol=1e-4)


def copy_of(good, tmp_path):
  return shutil.copytree(good[0], tmp_path / "model")


def rewrite_tensors(folder, edit):
  """Rewrite model.safetensors with `edit(tensors)` applied to the {name: array} dict."""
  tensors = load_file(folder / "model.safetensors")
  edit(tensors)
  save_file(tensors, folder / "model.safetensors")


def test_unknown_model_type(good, tmp_path):
  folder = copy_of(good, tmp_path)
  hf = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
  with pytest.raises(CheckpointError, match=r"config\.json.*'gpt2'"):
    ours(folder)


def test_missing_config(good, tmp_path):
  folder = copy_of(good, tmp_path)
  (folder / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"config\.json: missing"):
    ours(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"model: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}),
     r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
     r"\(8, 32\), the config needs"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
     r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"),
], ids=["missing", "wrong_shape", "extra"])
def test_bad_tensors(good, tmp_path, edit, message):
  folder = copy_of(good, tmp_path)
  rewrite_tensors(folder, edit)
  with pytest.raises(CheckpointError, match=message):
    ours(folder)


@pytest.mark.parametrize("corrupt", [
    lambda data: data[:len(data) // 2],
    lambda data: (100).to_bytes(8, "little") + b"\x00garbage{" * 20,
], ids=["truncated", "garbage_header"])
def test_corrupt_safetensors(good, tmp_path, corrupt):
  folder = copy_of(good, tmp_path)
  file = folder / "model.safetensors"
  file.write_bytes(corrupt(file.read_bytes()))
  with pytest.raises(CheckpointError, match=r"model\.safetensors"):
    ours(folder)


@pytest.mark.parametrize("scan", ["false", "true"])
def test_sharded_checkpoint_files(good, tmp_path, scan):
  _, model = good
  model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
  files = sorted(p.name for p in (tmp_path / "shards").glob("*.safetensors"))
  assert (tmp_path / "shards" / "model.safetensors.index.json").is_file() and len(files) > 2
  _, _, loaded = ours(tmp_path / "shards", scan=scan)
  np.testing.assert_allclose(loaded[REAL], theirs(model)[REAL], atol=1e-4)


def test_load_into_mesh(good):
  folder, _ = good
  mesh = parallel.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  cfg, single, expected = ours(folder)
  _, params, got = ours(folder, param_shardings(cfg, mesh))
  checks = {("embed_tokens", "embedding"): ("tensor", "fsdp"),
            ("layers_0", "mlp", "gate_proj", "kernel"): ("fsdp", "tensor"),
            ("layers_1", "mlp", "down_proj", "kernel"): ("tensor", "fsdp"),
            ("layers_0", "self_attn", "q_proj", "kernel"): ("fsdp", "tensor", None)}
  for path, spec in checks.items():
    array = functools.reduce(lambda node, k: node[k], path, params)
    assert tuple(array.sharding.spec) == spec, path
    shard = array.addressable_shards[0].data
    assert shard.size < array.size and array.shape[0] // shard.shape[0] == 2, path
    np.testing.assert_array_equal(
        np.asarray(array), np.asarray(functools.reduce(lambda node, k: node[k], path, single)))
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_load_stacked_layers_into_mesh(good):
  folder, _ = good
  mesh = parallel.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  _, single, expected = ours(folder)
  cfg, params, got = ours(folder, scan="true")
  _, sharded, got_sharded = ours(folder, param_shardings(cfg, mesh), scan="true")
  up = sharded["layers"]["mlp"]["up_proj"]["kernel"]
  assert tuple(up.sharding.spec) == (None, "fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (2, 16, 24)
  for stacked in (params, sharded):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(stacked),
                 jax.device_get(stack_layers(single)))
  np.testing.assert_allclose(got, expected, atol=1e-5)
  np.testing.assert_allclose(got_sharded, expected, atol=1e-5)
