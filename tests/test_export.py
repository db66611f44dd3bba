"""The export of a fine-tune: PEFT adapter folders out and back in, the merged transformers
folder, and the `export` stage on a tiny workdir."""
import copy
import dataclasses
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rallrec_jax import config as config_lib
from rallrec_jax import pipeline, workdir_model
from rallrec_jax.llm import LM, Decoder, hf_io, lora, peft_io
from rallrec_jax.llm import tokenizer as tokenizer_lib
from rallrec_jax.llm.config import CheckpointError, LMConfig
from rallrec_jax.train import checkpoint, export, layout
from rallrec_jax.train import stage as train_stage
from tests.conftest import REPO
from tests.llm_fixtures import random_batch, tiny_hf_model
from tests.test_lora import by_module, randomize_b

ALL = tuple(lora.IN_NDIM)
IDS, MASK = random_batch(64, batch=4, pad_right=(0, 4, 7, 2))
REAL = MASK.astype(bool)
ATOL = 1e-4  # as the transformers / PEFT parity tests of test_lora and test_hf_io


def torch_logits(model):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(IDS).long(),
                 attention_mask=torch.from_numpy(MASK).long()).logits.numpy()


@jax.jit(static_argnums=(0, 3))
def lora_logits(cfg, params, adapters, lora_cfg):
  return lora.apply(cfg, params, adapters, lora_cfg, IDS, MASK)


@jax.jit(static_argnums=0)
def logits(cfg, params):
  return Decoder(cfg).apply({"params": params}, IDS, MASK)


@pytest.fixture(scope="module", params=[("llama", "false", 0), ("qwen2", "true", 0),
                                        ("llama", "true", 1)],
                ids=["llama-unrolled", "qwen2-scanned", "llama-scanned-last-layer"])
def case(request, tmp_path_factory):
  """A tiny model, random adapters on every projection (B nonzero) of all its layers (or the
  last one), our logits with them, and `export.write`'s folder of them."""
  kind, scan, layers = request.param
  root = tmp_path_factory.mktemp(f"{kind}{scan}{layers}")
  torch_model = tiny_hf_model(root / "base", kind)
  cfg = LMConfig.from_folder(root / "base", scan_layers=scan)
  params = hf_io.load_params(root / "base", cfg)
  lora_cfg = lora.LoraConfig(rank=4, alpha=12.0, dropout=0.1, targets=ALL, layers=layers)
  adapters = randomize_b(lora.init(jax.random.key(0), cfg, lora_cfg), scale=0.3)
  ours = np.asarray(lora_logits(cfg, params, adapters, lora_cfg))
  base = torch_logits(torch_model)
  assert np.abs(ours - base)[REAL].max() > 1e-2  # the adapters change the model
  folder = export.write(root / "export", LM(cfg=cfg, params=params), {
      "adapters": adapters, "lora_cfg": lora_cfg}, root / "base", step=7, checkpoint="best")
  return dict(cfg=cfg, params=params, lora_cfg=lora_cfg, adapters=adapters, ours=ours,
              torch_model=torch_model, folder=folder, root=root)


def test_peft_loads_the_exported_adapters(case):
  from peft import PeftModel  # pylint: disable=import-outside-toplevel
  folder, cfg, lora_cfg = case["folder"] / export.ADAPTERS, case["cfg"], case["lora_cfg"]
  assert sorted(p.name for p in folder.iterdir()) == [peft_io.CONFIG, peft_io.WEIGHTS]
  meta = json.loads((folder / peft_io.CONFIG).read_text())
  assert (meta["peft_type"], meta["task_type"], meta["r"], meta["lora_alpha"]) == (
      "LORA", "CAUSAL_LM", 4, 12.0)
  assert meta["base_model_name_or_path"] == str((case["root"] / "base").absolute())
  assert meta["layers_to_transform"] == ([1] if lora_cfg.layers else None)
  tensors = load_file(folder / peft_io.WEIGHTS)
  adapted = range(lora.first_adapted(cfg, lora_cfg), cfg.num_layers)
  assert len(tensors) == 2 * len(ALL) * len(adapted)
  q = f"base_model.model.model.layers.{adapted[-1]}.self_attn.q_proj"
  assert tensors[f"{q}.lora_A.weight"].shape == (4, cfg.hidden_size)
  assert tensors[f"{q}.lora_B.weight"].shape == (cfg.num_heads * cfg.head_dim, 4)

  model = PeftModel.from_pretrained(copy.deepcopy(case["torch_model"]), folder).eval()
  np.testing.assert_allclose(torch_logits(model)[REAL], case["ours"][REAL], atol=ATOL)


def test_transformers_loads_the_merged_model(case):
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  merged = case["folder"] / export.MERGED
  model = AutoModelForCausalLM.from_pretrained(merged).eval()
  np.testing.assert_allclose(torch_logits(model)[REAL], case["ours"][REAL], atol=ATOL)
  tokenizer = tokenizer_lib.load(merged)
  assert tokenizer.chat_template and tokenizer("Yes No").input_ids == tokenizer_lib.load(
      case["root"] / "base")("Yes No").input_ids != []
  summary = json.loads((case["folder"] / export.SUMMARY).read_text())
  assert (summary["method"], summary["step"], summary["lora"]["layers"]) == (
      "lora", 7, case["lora_cfg"].layers)


def test_full_weights_export_only_the_merged_model(case, tmp_path):
  """Under full fine-tuning the tuned weights are the model: merged/ holds them, no adapters."""
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  cfg = case["cfg"]
  tuned = lora.merge(case["params"], case["adapters"], case["lora_cfg"])
  folder = export.write(tmp_path / "export", LM(cfg=cfg, params=case["params"]),
                        {"params": tuned}, case["root"] / "base")
  assert sorted(p.name for p in folder.iterdir()) == [export.SUMMARY, export.MERGED]
  model = AutoModelForCausalLM.from_pretrained(folder / export.MERGED).eval()
  np.testing.assert_allclose(torch_logits(model)[REAL], case["ours"][REAL], atol=ATOL)


@pytest.mark.parametrize("saved, loaded", [("false", "false"), ("true", "true"),
                                           ("true", "false"), ("false", "true")])
@pytest.mark.parametrize("layers", [0, 1])
def test_round_trip_gives_the_same_adapters(tmp_path, saved, loaded, layers):
  cfg = LMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                 num_heads=4, num_kv_heads=2, head_dim=8)
  lora_cfg = lora.LoraConfig(rank=3, alpha=5.0, dropout=0.0,
                             targets=("o_proj", "q_proj", "up_proj", "v_proj"), layers=layers)
  out_cfg = dataclasses.replace(cfg, scan_layers=saved)
  adapters = randomize_b(lora.init(jax.random.key(3), out_cfg, lora_cfg))
  peft_io.save(adapters, lora_cfg, tmp_path / "a", out_cfg)
  in_cfg = dataclasses.replace(cfg, scan_layers=loaded)
  got, got_cfg = peft_io.load(tmp_path / "a", in_cfg)
  assert got_cfg == lora_cfg
  assert ("layers" in got) == (loaded == "true")
  for kind in ("a", "b"):
    want, have = by_module(adapters, kind, out_cfg), by_module(got, kind, in_cfg)
    assert sorted(want) == sorted(have) and len(want) == 4 * (layers or 3)
    for module, array in want.items():
      np.testing.assert_array_equal(have[module], array, err_msg=module)
  assert np.abs(by_module(got, "b", in_cfg)["layers_2/self_attn/o_proj"]).min() > 0


@pytest.fixture(scope="module")
def good_adapters(tmp_path_factory):
  """(folder, cfg) of adapters on q, o and down of both layers of a 2-layer model."""
  cfg = LMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=8, scan_layers="false")
  lora_cfg = lora.LoraConfig(rank=4, targets=("q_proj", "o_proj", "down_proj"))
  folder = tmp_path_factory.mktemp("good") / "adapters"
  peft_io.save(randomize_b(lora.init(jax.random.key(0), cfg, lora_cfg)), lora_cfg, folder, cfg)
  return folder, cfg


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def edit_config(**changes):
  def edit(folder):
    meta = json.loads((folder / peft_io.CONFIG).read_text())
    meta.update(changes)
    (folder / peft_io.CONFIG).write_text(json.dumps(meta))
  return edit


def edit_tensors(change):
  def edit(folder):
    tensors = load_file(folder / peft_io.WEIGHTS)
    change(tensors)
    save_file(tensors, folder / peft_io.WEIGHTS)
  return edit


BAD = {
    "no_config": (lambda f: (f / peft_io.CONFIG).unlink(), r"adapter_config\.json: missing"),
    "no_weights": (lambda f: (f / peft_io.WEIGHTS).unlink(),
                   r"adapter_model\.safetensors: missing"),
    "config_not_json": (lambda f: (f / peft_io.CONFIG).write_text("{r: 4"),
                        r"adapter_config\.json: not valid JSON"),
    "prefix_tuning": (edit_config(peft_type="PREFIX_TUNING"),
                      r"adapter_config\.json: key 'peft_type' = 'PREFIX_TUNING'"),
    "unknown_target": (edit_config(target_modules=["q_proj", "c_attn"]),
                       r"adapter_config\.json: key 'target_modules'.*unknown target module "
                       r"'c_attn'"),
    "regex_targets": (edit_config(target_modules=".*proj"),
                      r"adapter_config\.json: key 'target_modules' = '\.\*proj'"),
    "dora": (edit_config(use_dora=True), r"adapter_config\.json: key 'use_dora' = True"),
    "bias": (edit_config(bias="lora_only"), r"adapter_config\.json: key 'bias' = 'lora_only'"),
    "layers_not_last": (edit_config(layers_to_transform=[0]),
                        r"adapter_config\.json: key 'layers_to_transform' = \[0\]: only the "
                        r"last"),
    "layer_beyond_base": (edit_config(layers_to_transform=[1, 2]),
                          r"key 'layers_to_transform' = \[1, 2\]: names a layer the base model "
                          r"lacks"),
    "bad_rank": (edit_config(r=0), r"adapter_config\.json: not a valid LoRA config.*rank"),
    "config_rank_differs": (edit_config(r=8),
                            r"adapter_model\.safetensors: tensor 'base_model\.model\.model\."
                            r"layers\.0\.\S+\.lora_A\.weight' has shape \(4, \d+\), this rank "
                            r"and base model need \(8, \d+\)"),
    "wrong_shape": (edit_tensors(lambda t: t.update({f"{Q0}.lora_B.weight": np.ones(
        (16, 4), np.float32)})), rf"tensor '{Q0}\.lora_B\.weight' has shape \(16, 4\)"),
    "missing_tensor": (edit_tensors(lambda t: t.pop(f"{Q0}.lora_B.weight")),
                       rf"adapter_model\.safetensors: missing tensor '{Q0}\.lora_B\.weight'"),
    "layer_the_base_lacks": (
        edit_tensors(lambda t: t.update({Q0.replace("layers.0", "layers.5") + ".lora_A.weight":
                                         np.ones((4, 32), np.float32)})),
        r"adapter_model\.safetensors: tensor 'base_model\.model\.model\.layers\.5\.self_attn\."
        r"q_proj\.lora_A\.weight' is for layer 5, but the base model has 2 layers"),
    "untargeted_tensor": (
        edit_tensors(lambda t: t.update({Q0.replace("q_proj", "k_proj") + ".lora_A.weight":
                                         np.ones((4, 32), np.float32)})),
        r"unexpected tensor 'base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A"),
    "truncated_weights": (
        lambda f: (f / peft_io.WEIGHTS).write_bytes((f / peft_io.WEIGHTS).read_bytes()[:200]),
        r"adapter_model\.safetensors"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_adapter_folders_name_the_file_and_key(good_adapters, tmp_path, name):
  good, cfg = good_adapters
  folder = shutil.copytree(good, tmp_path / "adapters")
  peft_io.load(folder, cfg)  # the unedited copy loads
  edit, message = BAD[name]
  edit(folder)
  with pytest.raises(CheckpointError, match=message):
    peft_io.load(folder, cfg)


def write_checkpoints(workdir, lm, lora_cfg, weights_by_step, best_step):
  """W/checkpoints as the fine-tune leaves it: the trained weights of each step, and a meta
  naming the best step."""
  mngr = checkpoint.manager(workdir / "checkpoints")
  for step, weights in weights_by_step.items():
    checkpoint.save(mngr, step, {"weights": weights}, {"best_step": best_step},
                    layout.PerLayer(lm.cfg, lora_cfg))
  mngr.close()


@pytest.fixture(scope="module")
def workdir_cfg(tmp_path_factory):
  """(cfg, prepared workdir) of a small synthetic dataset with a tiny HF model as model.path."""
  root = tmp_path_factory.mktemp("stage")
  tiny_hf_model(root / "base", "llama")
  cfg = config_lib.base_config()
  cfg.model.path = str(root / "base")
  s = cfg.data.synthetic
  s.num_users, s.num_items, s.num_ratings = 40, 30, 800
  assert pipeline.run(cfg, root / "w", stages=["prepare"]) == {"prepare": "ran"}
  return cfg, root / "w"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_export_stage_ships_the_chosen_checkpoint(workdir_cfg, tmp_path, method):
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  cfg, prepared = workdir_cfg
  workdir = shutil.copytree(prepared, tmp_path / "w")
  cfg = copy.deepcopy(cfg)
  cfg.finetune.method = method
  cfg.finetune.lora.update(rank=2, targets=("q_proj", "v_proj", "up_proj"), layers=1)
  config_lib.validate(cfg)
  lm = workdir_model.load_model(cfg, workdir, None)
  lora_cfg = train_stage.lora_config(cfg)
  if method == "lora":
    fresh = lora.init(jax.random.key(0), lm.cfg, lora_cfg, lm.mesh, lm.rules)
    steps = {2: randomize_b(fresh, seed=2), 4: randomize_b(fresh, seed=4)}
  else:
    steps = {s: jax.tree.map(lambda x, s=s: x * (1 + 0.1 * s), lm.params) for s in (2, 4)}
  write_checkpoints(workdir, lm, lora_cfg, steps, best_step=2)

  expected = {}
  for choice in ("best", "4"):
    cfg.export.checkpoint = choice
    train_stage.EXPORT.run(cfg, workdir)
    out = workdir / "export"
    summary = json.loads((out / export.SUMMARY).read_text())
    step = 2 if choice == "best" else 4
    assert (summary["checkpoint"], summary["step"], summary["method"]) == (choice, step, method)
    assert (out / export.ADAPTERS).is_dir() == (method == "lora")
    model = AutoModelForCausalLM.from_pretrained(out / export.MERGED).eval()
    if method == "lora":
      got, got_cfg = peft_io.load(out / export.ADAPTERS, lm.cfg)
      assert got_cfg == lora_cfg
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(got),
                   jax.device_get(steps[step]))
      ours = lora_logits(lm.cfg, lm.params, steps[step], lora_cfg)
    else:
      ours = logits(lm.cfg, steps[step])
    expected[choice] = torch_logits(model)
    np.testing.assert_allclose(expected[choice][REAL], np.asarray(ours)[REAL], atol=ATOL)
  assert np.abs(expected["best"] - expected["4"])[REAL].max() > 1e-2
  assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".export")) == []


def test_export_checkpoint_is_validated_like_eval_checkpoint():
  cfg = config_lib.base_config()
  for good in ("best", "latest", "12", "mean:4,8"):
    cfg.export.checkpoint = good
    config_lib.validate(cfg)
  for bad, message in (("none", "use best, latest, a step"), ("mean:4,x", "after 'mean:'"),
                       ("/no/such/folder", "checkpoint folder")):
    cfg.export.checkpoint = bad
    with pytest.raises(config_lib.ConfigError, match=f"config key export.checkpoint: .*{message}"):
      config_lib.validate(cfg)


def test_the_cli_runs_the_export_stage_only_when_asked(tmp_path):
  """`--stages export` is the export's command line; on a workdir without a fine-tune it names
  what to run first, and a full run leaves the export out."""
  out = subprocess.run([sys.executable, "-m", "rallrec_jax.main", "--config",
                        "configs/quickstart.py:runlocal=true", "--workdir", str(tmp_path / "w"),
                        "--stages", "export"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2, out.stderr
  assert "'finetune' has not run" in out.stderr and "Traceback" not in out.stderr
  assert "finetune to --stages" in out.stderr
  assert "export" not in [s.name for s in pipeline.select(None, config_lib.base_config())]
