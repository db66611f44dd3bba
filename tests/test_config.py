"""Configs: arg parsing, overrides, and validation errors that name the key."""
import importlib.util

import flax.linen as nn
import jax
import pytest

from rallrec_jax import config as config_lib, parallel
from rallrec_jax.eval import results as results_lib
from rallrec_jax.llm import model
from rallrec_jax.llm.config import LMConfig
from tests.conftest import REPO

CONFIGS = ("quickstart", "ml100k", "ml1m", "bookcrossing", "amazon_movies")


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates_and_documents_its_command(name, tmp_path):
  arg = None if name == "quickstart" else f"path={tmp_path}"
  cfg = load_config(name, arg)
  config_lib.validate(cfg)
  assert cfg.data.name == ("synthetic" if name == "quickstart" else name)
  module_doc = (REPO / "configs" / f"{name}.py").read_text().split('"""')[1]
  assert "python -m rallrec_jax.main --config configs/" + name in module_doc


def test_paper_settings():
  ml1m = load_config("ml1m", "path=/x")
  assert (ml1m.data.min_history, ml1m.data.label_threshold, tuple(ml1m.data.split)) == (
      5, 3.0, (0.8, 0.1, 0.1))
  bx = load_config("bookcrossing", "path=/x")
  assert bx.data.label_threshold == 4.0 and bx.data.min_history == 4 and bx.data.seed == 42
  az = load_config("amazon_movies", "path=/x")
  assert (az.data.amazon.user_min, az.data.amazon.user_max, az.data.amazon.item_min,
          az.data.amazon.item_max, az.data.amazon.top_items) == (11, 200, 10, 200, 5000)
  assert ml1m.retrieval.k == 30


def test_parse_arg_types_and_unknown_keys():
  arg = config_lib.parse_arg("path=/d, runlocal=true,n=3", {"path": "", "runlocal": False, "n": 1})
  assert (arg.path, arg.runlocal, arg.n) == ("/d", True, 3)
  with pytest.raises(config_lib.ConfigError, match=r"arg 'pth'.*\['n', 'path'\]"):
    config_lib.parse_arg("pth=/d", {"path": "", "n": 1})
  with pytest.raises(config_lib.ConfigError, match="expects a int"):
    config_lib.parse_arg("n=three", {"n": 1})
  with pytest.raises(config_lib.ConfigError, match="key=value"):
    config_lib.parse_arg("justpath", {"path": ""})


def test_quickstart_runlocal_shrinks_the_data():
  full, small = load_config("quickstart"), load_config("quickstart", "runlocal=true")
  assert small.data.synthetic.num_ratings < full.data.synthetic.num_ratings


def test_overrides_set_leaves_and_reject_unknown_keys():
  cfg = config_lib.apply_overrides(config_lib.base_config(), {"retrieval.k": 20,
                                                              "data.amazon.top_items": 10})
  assert cfg.retrieval.k == 20 and cfg.data.amazon.top_items == 10
  with pytest.raises(config_lib.ConfigError, match="data.amazon.top_itemz"):
    config_lib.apply_overrides(cfg, {"data.amazon.top_itemz": 1})
  with pytest.raises(config_lib.ConfigError, match="'model.size'"):
    config_lib.apply_overrides(cfg, {"model.size": 1})


@pytest.mark.parametrize("key,value,message", [
    ("retrieval.k", -1, "retrieval.k: must be a positive integer"),
    ("retrieval.k", 0, "retrieval.k: must be a positive integer"),
    ("data.split", (0.8, 0.2, 0.1), "data.split: ratios .* sum to 1.1"),
    ("data.split", (0.9, 0.1), "data.split: must be three ratios"),
    ("data.split", (1.1, -0.1, 0.0), "data.split: must be three ratios >= 0"),
    ("data.name", "ml2m", "data.name: unknown dataset 'ml2m'"),
    ("eval.rows", "random", "eval.rows: 'random' is not one of"),
    ("finetune.eval_rows", "last", "finetune.eval_rows: 'last' is not one of"),
    ("data.source", "kaggle", "data.source: 'kaggle' is not one of"),
    ("data.min_history", -2, "data.min_history: must be an integer >= 0"),
    ("data.max_history", -1, "data.max_history"),
    ("data.unknown_ids", "ignore", "data.unknown_ids"),
    ("data.amazon.user_min", 300, "data.amazon.user_min: 300 exceeds"),
    ("data.synthetic.num_users", 0, "data.synthetic.num_users: must be a positive integer"),
    ("data.synthetic.drift", 1.5, "data.synthetic.drift"),
    ("retrieval.order", "random", "retrieval.order: 'random' is not one of"),
    ("retrieval.half_life", 0.0, "retrieval.half_life: must be > 0"),
    ("model.path", "/nowhere", "model.path: /nowhere is not a Hugging Face model folder"),
    ("model.dtype", "float8", "model.dtype"),
    ("model.scan_layers", "yes", "model.scan_layers: 'yes' is not one of auto, true, false"),
    ("model.mesh", (("data", -1), ("model", 2)), "model.mesh: mesh axes"),
    ("model.mesh", (("data", -1), ("tensor", -1)), "model.mesh: mesh sizes"),
    ("model.rules.embed", "tensor",
     "model.rules: 'vocab' and 'embed' both map to mesh axis 'tensor'.*\\('vocab', 'embed'\\)"),
    ("model.rules.mlp", "fsdp",
     "model.rules: 'embed' and 'mlp' both map to mesh axis 'fsdp'"),
    ("model.rules.heads", "model", "model.rules: heads='model': a comma-separated list"),
    ("model.rules.mlp", "tensor,tensor", "model.rules: mlp='tensor,tensor'"),
    ("model.tiny.number_line", (100, 11), "model.tiny.number_line: must be .* 0 <= low < high"),
    ("model.tiny.number_line", (11,), "model.tiny.number_line"),
    ("embed.source", "title", "embed.source"),
    ("embed.pool", "last", "embed.pool: 'last' is not one of"),
    ("mix.variant", "mix4", "mix.variant"),
    ("mix.weights.cf", -1.0, "mix.weights.cf: must be >= 0"),
    ("cf.epochs", 0, "cf.epochs: must be a positive integer"),
    ("describe.top_p", 0.0, "describe.top_p"),
    ("align.temperature", 0.0, "align.temperature"),
    ("align.heldout", 1.0, "align.heldout"),
    ("finetune.loss", "mse", "finetune.loss: 'mse' is not one of"),
    ("finetune.method", "prefix", "finetune.method: 'prefix' is not one of"),
    ("finetune.warmup", -1, "finetune.warmup: must be a non-negative integer"),
    ("finetune.mark_close", 1.0, "finetune.mark_close: must lie in \\[0, 1\\)"),
    ("finetune.clip_norm", -1.0, "finetune.clip_norm: must be a number >= 0"),
    ("finetune.eval_samples", -1, "finetune.eval_samples: must be a non-negative integer"),
    ("finetune.lora.targets", ("q_proj", "wq"), "finetune.lora.targets: .*a non-empty set"),
    ("finetune.lora.targets", (), "finetune.lora.targets"),
    ("finetune.lora.rank", 0, "finetune.lora.rank: must be a positive integer"),
    ("finetune.lora.alpha", 0.0, "finetune.lora.alpha: must be > 0"),
    ("finetune.lora.dropout", 1.0, "finetune.lora.dropout: must lie in"),
    ("finetune.lora.layers", -2, "finetune.lora.layers: must be a non-negative integer"),
    ("eval.checkpoint", "mean:64,last", "eval.checkpoint: 'mean:64,last': after 'mean:' give"),
    ("eval.checkpoint", "average", "eval.checkpoint: 'average': use best, latest"),
])
def test_invalid_values_name_the_key(key, value, message):
  cfg = config_lib.apply_overrides(config_lib.base_config(), {key: value})
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(cfg)


def test_missing_data_path_says_how_to_set_it(tmp_path):
  cfg = load_config("ml1m")
  with pytest.raises(config_lib.ConfigError, match=r"data.path: .*configs/ml1m.py:path=DIR"):
    config_lib.validate(cfg)
  cfg = load_config("ml1m", f"path={tmp_path / 'nowhere'}")
  with pytest.raises(config_lib.ConfigError, match=r"data.path: .*nowhere does not exist"):
    config_lib.validate(cfg)


def test_tfds_source_without_tensorflow_is_a_clear_error(tmp_path):
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed here")
  cfg = load_config("ml100k", "source=tfds")
  with pytest.raises(config_lib.ConfigError, match="data.source: .*needs TensorFlow.*pip install"):
    config_lib.validate(cfg)
  cfg = load_config("bookcrossing", f"path={tmp_path}")
  cfg.data.source = "tfds"
  with pytest.raises(config_lib.ConfigError, match="MovieLens only"):
    config_lib.validate(cfg)


def test_ml100k_cpu_recipe_sets_the_measured_fine_tune_and_validates(tmp_path):
  paper, cpu = (load_config("ml100k", f"path={tmp_path}{extra}") for extra in ("", ",recipe=cpu"))
  config_lib.validate(cpu)
  assert (cpu.finetune.method, cpu.finetune.lr, cpu.finetune.clip_norm, cpu.retrieval.k,
          cpu.model.dtype, cpu.eval.max_samples) == ("full", 5e-5, 1.0, 5, "bfloat16", 2000)
  assert (paper.finetune.method, paper.finetune.lr, paper.retrieval.k) == ("lora", 5e-4, 30)
  assert cpu.data.to_dict() == paper.data.to_dict()
  with pytest.raises(config_lib.ConfigError, match="recipe.*'gpu' is not one of"):
    load_config("ml100k", "path=/x,recipe=gpu")


def test_ml100k_lifetime4k_recipe_is_the_measured_run_and_its_average_exists(tmp_path):
  cfg = load_config("ml100k", f"path={tmp_path},recipe=cpu_lifetime4k")
  config_lib.validate(cfg)
  f = cfg.finetune
  assert (f.pool_size, f.batch_size * f.grad_accum, f.epochs, f.user_lifetime_stats, f.variant,
          cfg.retrieval.order, cfg.mix.variant) == (4096, 16, 1, True, "simple", "simple", "cf")
  # The averaged steps are checkpoints the run saves: every eval_every updates up to the last.
  last = f.pool_size // (f.batch_size * f.grad_accum)
  saved = set(range(f.eval_every, last + 1, f.eval_every))
  steps = results_lib.mean_steps(cfg.eval.checkpoint)
  assert steps[-1] == last and set(steps) <= saved and len(steps) == 5
  assert cfg.recommend.checkpoint == cfg.export.checkpoint == cfg.eval.checkpoint


def test_model_rules_default_to_the_table_and_cover_every_array_of_the_model():
  cfg = config_lib.base_config()
  assert config_lib.model_rules(cfg.model) == parallel.DEFAULT_RULES
  with pytest.raises(ValueError, match="'layers' and 'embed' both map to mesh axis 'fsdp'"):
    parallel.check_rules(parallel.rules_from_table({"layers": "fsdp", "embed": "fsdp"}),
                         model.PARAM_AXES)
  # Every param's logical axes (bias and untied head included) are among model.PARAM_AXES,
  # which the rules are checked against.
  for scan in ("false", "true"):
    lm_cfg = LMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8, qkv_bias=True, scan_layers=scan)
    names = {tuple(leaf.names) for leaf in jax.tree.leaves(
        model.abstract_params(lm_cfg), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))}
    assert names <= set(model.PARAM_AXES)
    assert any(n[0] == "layers" for n in names) == (scan == "true")
  assert config_lib.EXECUTION_KEYS.count("model.rules") == 1


def test_model_rules_reach_the_param_shardings():
  cfg = config_lib.apply_overrides(config_lib.base_config(), {"model.rules.embed": ""})
  config_lib.validate(cfg)
  mesh = parallel.make_mesh((("fsdp", 2), ("tensor", 2)), jax.devices()[:4])
  lm_cfg = LMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=2, head_dim=8)
  shard = model.param_shardings(lm_cfg, mesh, config_lib.model_rules(cfg.model))
  default = model.param_shardings(lm_cfg, mesh)
  up = ("layers_0", "mlp", "up_proj", "kernel")
  assert tuple(default[up[0]][up[1]][up[2]][up[3]].spec) == ("fsdp", "tensor")
  assert tuple(shard[up[0]][up[1]][up[2]][up[3]].spec) == (None, "tensor")
