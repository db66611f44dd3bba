"""Helpers shared by the experiment configs: the base config, `arg` parsing and validation.

Every config in configs/ starts from `base_config()`, sets what its experiment needs and is
checked by `validate()` before any heavy work. Keys are fixed (the config is locked): an
unknown key is an error naming it.
"""
import json
import math
from pathlib import Path

import ml_collections

from rallrec_jax import parallel
from rallrec_jax.eval import results as results_lib
from rallrec_jax.llm import model

DATASETS = ("synthetic", "ml100k", "ml1m", "bookcrossing", "amazon_movies")
SOURCES = ("files", "tfds")
UNKNOWN_ID_POLICIES = ("error", "drop")
ORDERS = ("simple", "high", "sequential", "rerank", "fusion")
EMBED_SOURCES = ("description", "template")
EMBED_POOLS = ("hidden", "tokens")
MIX_VARIANTS = ("text", "cf", "mix", "mix3")
FINETUNE_VARIANTS = ("simple", "rag", "rerank", "mixed")
FINETUNE_LOSSES = ("answer", "lm")
FINETUNE_METHODS = ("lora", "full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16", "float16")
EVAL_ROWS = ("first", "spread")
# Keys that decide how a stage runs, not what it computes. Stage fingerprints and resume keys
# leave them out, so another mesh, sharding table, remat policy, attention kernel, layout of the
# layers or inference batch size neither reruns a finished stage nor throws away a stage's
# partial work (checkpoints hold the layers apart in either layout); nor does scoring with or
# without the shared-prefix cache, which gives the same scores.
EXECUTION_KEYS = ("model.mesh", "model.rules", "model.remat", "model.attention",
                  "model.scan_layers", "retrieval.batch_size", "eval.batch_size",
                  "recommend.prefix_cache", "cf.save_every")

# Keys added with a default other than what the code did before they existed: a manifest
# written before them reads as this value, not as today's default.
VALUES_BEFORE_KEY = {"finetune.loss": "lm"}


class ConfigError(ValueError):
  """A config key has a bad value; the message names the key and the fix."""


def _error(key, message):
  return ConfigError(f"config key {key}: {message}")


def base_config():
  """Every key a run can set, with the paper's defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 42

  c.data = d = ml_collections.ConfigDict()
  d.name = "synthetic"
  d.source = "files"          # "files": our parsers; "tfds": tensorflow-datasets (MovieLens)
  d.path = ""                 # folder or original zip of the raw files
  d.encoding = "latin-1"      # of the raw text files (MovieLens, BookCrossing)
  d.unknown_ids = "error"     # a rating naming an item/user missing from its file: error | drop
  d.min_history = 5           # a sample needs at least this many earlier ratings of its user
  d.max_history = 0           # later stages see at most this many recent history items (0: all)
  d.label_threshold = 3.0     # label = rating > threshold
  d.split = (0.8, 0.1, 0.1)   # train / valid / test ratios
  d.seed = 42                 # shuffling (BookCrossing timelines and split)
  # Iterative core filter, then the top_items most rated items (0: no cap).
  d.amazon = ml_collections.ConfigDict(dict(
      category="Movies_and_TV", user_min=11, user_max=200, item_min=10, item_max=200,
      top_items=5000))
  d.synthetic = ml_collections.ConfigDict(dict(
      num_users=300, num_items=200, num_ratings=12000, num_clusters=6, drift=0.8, seed=0))

  # The LLM: a Hugging Face folder, or (path "") a tiny random decoder built in W/model_tiny.
  c.model = m = ml_collections.ConfigDict()
  m.path = ""
  m.dtype = "float32"         # compute dtype; bfloat16 on accelerators
  m.param_dtype = ""          # "" = same as dtype
  m.remat = "none"            # none | full | dots
  # xla | cudnn (flash) | blocked (XLA's in causal blocks of queries); "": cudnn for 16-bit
  # prefill on NVIDIA GPUs, blocked without a KV cache on a CPU, else xla.
  m.attention = ""
  m.scan_layers = "auto"      # auto | true | false: the layers as one scan; auto: 5+ layers,
                              # unrolled in 16-bit compute on a CPU
  m.mesh = (("data", -1),)    # (axis, size) pairs over data / fsdp / tensor, one -1
  # Logical axis -> the mesh axes that shard it ("data,fsdp", "tensor", "" = replicated).
  # Params shard over fsdp (embed) and tensor (heads, mlp, vocab); activations their batch
  # over data and fsdp. One mesh axis may shard at most one dimension of any param.
  m.rules = ml_collections.ConfigDict(
      {logical: ",".join(axes) if isinstance(axes, tuple) else axes or ""
       for logical, axes in parallel.DEFAULT_RULES})
  # number_line (low, high): the number tokens low..high embedded on one line, placed there at
  # init and kept there by full fine-tuning (`rallrec_jax.llm.number_line`); () for free rows.
  m.tiny = ml_collections.ConfigDict(dict(
      hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, seed=0,
      init_std=0.02, number_line=()))

  c.describe = ml_collections.ConfigDict(dict(
      batch_size=16, max_new_tokens=128, temperature=0.8, top_p=0.9, max_words=80, seed=0))
  # Text embedding of each item: its generated description, or the plain template, mean-pooled
  # over the final hidden states (pool "hidden") or the input token embeddings ("tokens").
  c.embed = ml_collections.ConfigDict(dict(
      source="description", pool="hidden", batch_size=32, max_length=256, pca_dim=128))
  # save_every: epochs between checkpoints (a kill repeats at most that many; the last epoch is
  # always saved). Saving every epoch took 10 of the quickstart's 15 s of LightGCN.
  c.cf = ml_collections.ConfigDict(dict(
      dim=128, layers=3, lr=1e-3, l2=1e-4, batch_size=2048, epochs=30, k=20, seed=0,
      save_every=10))
  c.align = ml_collections.ConfigDict(dict(
      hidden=256, dim=64, temperature=0.15, lr=1e-3, weight_decay=1e-4, batch_size=256,
      epochs=100, heldout=0.1, seed=0))
  c.mix = ml_collections.ConfigDict(dict(
      variant="mix3", weights=ml_collections.ConfigDict(dict(text=1.0, cf=1.0, joint=1.0))))

  # Nearest-neighbour index of the mixed item vectors: backend auto (exact search below
  # retrieval.index.SCANN_MIN_ITEMS items, ScaNN above), scann or exact (forced). Zeros in
  # num_leaves and num_leaves_to_search follow the catalogue size.
  c.index = ml_collections.ConfigDict(dict(
      backend="auto", num_leaves=0, num_leaves_to_search=0, dims_per_block=2,
      anisotropic_threshold=0.2, reorder=100, training_sample_size=100_000, batch_size=4096,
      neighbors=20, recommend_n=20, recent=20))

  # Instruction tuning (PAPER.md step 9) and checkpoint evaluation (step 10). `method`: lora
  # (adapters on `lora.targets`) or full (every weight; small models). `loss`: answer (two-way
  # cross-entropy of the Yes/No logits at the last prompt position, the score evaluation reads)
  # or lm (next-token loss on the answer text, the paper's). `warmup`: updates of linear warmup.
  # `clip_norm`: clip each update's gradient to this global norm (0: no clipping).
  # `item_stats`: name the target with its earlier raters' like-rate (an extension of the
  # paper's prompt, see rallrec_jax/prompts/item_stats.py). `user_stats`: follow the history
  # list with the user's like count and mean rating over it (rallrec_jax/prompts/templates.py).
  # `user_lifetime_stats`: and with the user's like-rate and mean rating over every earlier
  # rating (rallrec_jax/prompts/user_lifetime.py). `genres`: name every item with its genres.
  # `item_popularity`: name the target with how often it was liked ("more liked than 60% of
  # movies": the decile of its number of earlier likes, prompts/item_stats.py); with
  # `unrated` negatives it is what lets P(yes) rank recommendation candidates.
  # `unrated`: add this many unrated negatives per training prompt (an item the user never
  # rated, answered "No"; rallrec_jax/train/unrated.py), so that P(yes) can rank candidates.
  # `mark_close` > 0: mark each listed item whose mixed vector's cosine to the target's exceeds
  # it with a "*" after its title (the retrieval's judgement of closeness, stated; 0: none).
  c.finetune = ml_collections.ConfigDict(dict(
      variant="rerank", pool_size=8192, mixed_size=1024, unrated=0.0, max_length=1024,
      batch_size=8, grad_accum=32, lr=5e-4, weight_decay=0.0, warmup=0, clip_norm=0.0,
      epochs=20, eval_every=0, eval_samples=1000, eval_rows="first", patience=5, seed=42,
      method="lora", loss="answer",
      item_stats=False, user_stats=False, user_lifetime_stats=False, genres=False,
      item_popularity=False, mark_close=0.0,
      lora=ml_collections.ConfigDict(dict(rank=8, alpha=16.0, dropout=0.05,
                                          targets=("q_proj", "v_proj"), layers=0))))
  # Rows scored when a split is capped (finetune.eval_rows for model selection, eval.rows for
  # evaluation): "first" (the paper's protocol; the first rows of a chronological split come
  # from a few users) or "spread" (evenly spaced over the whole split).
  c.eval = ml_collections.ConfigDict(dict(
      checkpoint="best", splits=("test",), max_samples=0, rows="first", batch_size=16))
  # What the `export` stage ships (W/export/): the checkpoint choice, as eval.checkpoint's
  # but not none.
  c.export = ml_collections.ConfigDict(dict(checkpoint="best"))

  # The `recommend` stage: for each evaluated user (max_users of those with a liked test item,
  # spread over them; 0: all), the index's `candidates` nearest unseen items reranked by the
  # tuned LLM's P(yes) (checkpoint: as eval.checkpoint), measured at `n`; with `blend`, also
  # by a blend of P(yes), index order and popularity whose weights are chosen on validation users.
  # `prefix_cache` runs the token prefix a user's prompts share once into a KV cache and scores
  # only the rest of each (the same P(yes) up to float rounding); false scores every prompt whole.
  c.recommend = ml_collections.ConfigDict(dict(
      candidates=50, n=10, checkpoint="best", max_users=200, blend=True, prefix_cache=True))

  c.retrieval = r = ml_collections.ConfigDict()
  r.k = 30                    # history items per prompt
  r.order = "rerank"          # simple | high | sequential | rerank | fusion
  r.half_life = 10.0          # fusion: recency half-life, in history items
  r.rerank_short = True       # rerank also histories no longer than k (MovieLens); else sequential
  r.batch_size = 4096
  return c


def parse_arg(arg, defaults):
  """Parse a config `arg` string "k1=v1,k2=v2" into a ConfigDict over `defaults`.

  Values take the type of their default (bool accepts true/false/1/0). An unknown key is a
  ConfigError that lists the known ones.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for part in arg.split(","):
    if not part.strip():
      continue
    if "=" not in part:
      raise _error(f"arg {part!r}", "config args are key=value pairs separated by commas, "
                   "e.g. path=/data/ml-1m")
    key, value = (s.strip() for s in part.split("=", 1))
    if key not in defaults:
      raise _error(f"arg {key!r}", f"unknown; this config takes {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise _error(f"arg {key!r}", f"expects true or false, got {value!r}")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise _error(f"arg {key!r}", f"expects a {type(default).__name__}, got {value!r}") from None
    else:
      out[key] = value
  return out


def without_execution_keys(subtrees):
  """{dotted key: plain config subtree} with the EXECUTION_KEYS below those keys removed."""
  out = {}
  for key, value in subtrees.items():
    if isinstance(value, dict):
      value = {k: v for k, v in value.items() if f"{key}.{k}" not in EXECUTION_KEYS}
    out[key] = value
  return out


def result_config(cfg, key):
  """The subtree of `cfg` at dotted `key` as JSON data, without EXECUTION_KEYS: what decides
  the results of the stages that read it."""
  node = cfg
  for part in key.split("."):
    node = node[part]
  value = json.loads(json.dumps(node.to_dict() if hasattr(node, "to_dict") else node))
  return without_execution_keys({key: value})[key]


def apply_overrides(cfg, overrides):
  """Set dotted keys (`{"retrieval.k": 20}`) on a copy of `cfg`; unknown keys are errors."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for key, value in overrides.items():
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise _error(key, f"unknown key {'.'.join(parts[:i + 1])!r}")
      if i < len(parts) - 1:
        node = node[part]
    node[parts[-1]] = value
  return cfg


def _check(ok, key, message):
  if not ok:
    raise _error(key, message)


def validate(cfg):
  """Raise ConfigError on the first bad value, naming its key and the fix."""
  d = cfg.data
  _check(d.name in DATASETS, "data.name", f"unknown dataset {d.name!r}; choose one of {DATASETS}")
  _check(d.source in SOURCES, "data.source", f"{d.source!r} is not one of {SOURCES}")
  if d.source == "tfds":
    from rallrec_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
    _check(d.name in tfds_source.TFDS_NAMES, "data.source",
           f"'tfds' serves MovieLens only (ml100k, ml1m), not {d.name!r}; use data.source='files'")
    _check(tfds_source.tensorflow_available(), "data.source", tfds_source.MISSING_TF)
  elif d.name != "synthetic":
    _check(bool(d.path), "data.path",
           f"dataset {d.name!r} needs its raw files: pass configs/{d.name}.py:path=DIR "
           f"or --config.data.path=DIR")
    _check(Path(d.path).expanduser().exists(), "data.path",
           f"{d.path} does not exist; point it at the folder (or zip) holding the raw files")
  _check(d.unknown_ids in UNKNOWN_ID_POLICIES, "data.unknown_ids",
         f"{d.unknown_ids!r} is not one of {UNKNOWN_ID_POLICIES}")
  _check(isinstance(d.min_history, int) and d.min_history >= 0, "data.min_history",
         f"must be an integer >= 0, got {d.min_history!r}")
  _check(isinstance(d.max_history, int) and d.max_history >= 0, "data.max_history",
         f"must be an integer >= 0 (0 keeps the whole history), got {d.max_history!r}")
  _check(isinstance(d.label_threshold, (int, float)) and math.isfinite(d.label_threshold),
         "data.label_threshold", f"must be a number, got {d.label_threshold!r}")
  split = tuple(d.split)
  _check(len(split) == 3 and all(isinstance(x, (int, float)) and x >= 0 for x in split),
         "data.split", f"must be three ratios >= 0 (train, valid, test), got {split!r}")
  _check(abs(sum(split) - 1.0) < 1e-6, "data.split",
         f"ratios {split!r} sum to {sum(split):g}; they must sum to 1, e.g. (0.8, 0.1, 0.1)")
  for key in ("user_min", "user_max", "item_min", "item_max", "top_items"):
    value = d.amazon[key]
    _check(isinstance(value, int) and value >= 0, f"data.amazon.{key}",
           f"must be an integer >= 0, got {value!r}")
  _check(d.amazon.user_min <= d.amazon.user_max, "data.amazon.user_min",
         f"{d.amazon.user_min} exceeds data.amazon.user_max={d.amazon.user_max}")
  _check(d.amazon.item_min <= d.amazon.item_max, "data.amazon.item_min",
         f"{d.amazon.item_min} exceeds data.amazon.item_max={d.amazon.item_max}")
  for key in ("num_users", "num_items", "num_ratings", "num_clusters"):
    value = d.synthetic[key]
    _check(isinstance(value, int) and value > 0, f"data.synthetic.{key}",
           f"must be a positive integer, got {value!r}")
  _check(0.0 <= d.synthetic.drift <= 1.0, "data.synthetic.drift",
         f"must lie in [0, 1], got {d.synthetic.drift!r}")
  k = cfg.retrieval.k
  _check(isinstance(k, int) and k > 0, "retrieval.k",
         f"must be a positive integer (history items per prompt; the paper uses 30), got {k!r}")
  _check(cfg.retrieval.order in ORDERS, "retrieval.order",
         f"{cfg.retrieval.order!r} is not one of {ORDERS}")
  _check(cfg.retrieval.half_life > 0, "retrieval.half_life",
         f"must be > 0, got {cfg.retrieval.half_life!r}")
  _validate_model(cfg.model)
  _check(cfg.embed.source in EMBED_SOURCES, "embed.source",
         f"{cfg.embed.source!r} is not one of {EMBED_SOURCES}")
  _check(cfg.embed.pool in EMBED_POOLS, "embed.pool",
         f"{cfg.embed.pool!r} is not one of {EMBED_POOLS}")
  _check(cfg.mix.variant in MIX_VARIANTS, "mix.variant",
         f"{cfg.mix.variant!r} is not one of {MIX_VARIANTS}")
  for key in ("describe.batch_size", "describe.max_new_tokens", "embed.batch_size",
              "embed.pca_dim", "cf.dim", "cf.layers", "cf.batch_size", "cf.epochs", "cf.k",
              "cf.save_every", "align.hidden", "align.dim", "align.batch_size", "align.epochs",
              "retrieval.batch_size"):
    section, name = key.split(".")
    value = cfg[section][name]
    _check(isinstance(value, int) and value > 0, key, f"must be a positive integer, got {value!r}")
  _check(0.0 < cfg.describe.top_p <= 1.0, "describe.top_p",
         f"must lie in (0, 1], got {cfg.describe.top_p!r}")
  _check(cfg.describe.temperature >= 0, "describe.temperature",
         f"must be >= 0 (0 is greedy), got {cfg.describe.temperature!r}")
  _check(cfg.align.temperature > 0, "align.temperature",
         f"must be > 0, got {cfg.align.temperature!r}")
  _check(0.0 < cfg.align.heldout < 1.0, "align.heldout",
         f"must lie in (0, 1), got {cfg.align.heldout!r}")
  _check(cfg.finetune.variant in FINETUNE_VARIANTS, "finetune.variant",
         f"{cfg.finetune.variant!r} is not one of {FINETUNE_VARIANTS}")
  for key in ("pool_size", "mixed_size", "max_length", "batch_size", "grad_accum", "epochs"):
    _check(isinstance(cfg.finetune[key], int) and cfg.finetune[key] > 0, f"finetune.{key}",
           f"must be a positive integer, got {cfg.finetune[key]!r}")
  _check(isinstance(cfg.finetune.eval_samples, int) and cfg.finetune.eval_samples >= 0,
         "finetune.eval_samples",
         f"must be a non-negative integer (0: every validation sample), got "
         f"{cfg.finetune.eval_samples!r}")
  _check(cfg.finetune.lr > 0, "finetune.lr", f"must be > 0, got {cfg.finetune.lr!r}")
  _check(0.0 <= cfg.finetune.mark_close < 1.0, "finetune.mark_close",
         f"must lie in [0, 1) (a cosine threshold; 0 marks nothing), got "
         f"{cfg.finetune.mark_close!r}")
  _check(0.0 <= cfg.finetune.unrated <= 1.0, "finetune.unrated",
         f"must lie in [0, 1] (unrated negatives per training prompt), got "
         f"{cfg.finetune.unrated!r}")
  _check(isinstance(cfg.finetune.warmup, int) and cfg.finetune.warmup >= 0, "finetune.warmup",
         f"must be a non-negative integer (updates), got {cfg.finetune.warmup!r}")
  _check(isinstance(cfg.finetune.clip_norm, (int, float)) and cfg.finetune.clip_norm >= 0,
         "finetune.clip_norm", f"must be a number >= 0 (0: no clipping), got "
         f"{cfg.finetune.clip_norm!r}")
  _check(cfg.finetune.loss in FINETUNE_LOSSES, "finetune.loss",
         f"{cfg.finetune.loss!r} is not one of {FINETUNE_LOSSES}")
  _check(cfg.finetune.method in FINETUNE_METHODS, "finetune.method",
         f"{cfg.finetune.method!r} is not one of {FINETUNE_METHODS}")
  lo = cfg.finetune.lora
  targets = tuple(lo.targets)
  _check(bool(targets) and len(set(targets)) == len(targets)
         and all(t in LORA_TARGETS for t in targets), "finetune.lora.targets",
         f"{targets!r}: a non-empty set of {LORA_TARGETS}")
  _check(isinstance(lo.rank, int) and lo.rank > 0, "finetune.lora.rank",
         f"must be a positive integer, got {lo.rank!r}")
  _check(lo.alpha > 0, "finetune.lora.alpha", f"must be > 0, got {lo.alpha!r}")
  _check(isinstance(lo.layers, int) and lo.layers >= 0, "finetune.lora.layers",
         f"must be a non-negative integer (0: every layer), got {lo.layers!r}")
  _check(0.0 <= lo.dropout < 1.0, "finetune.lora.dropout",
         f"must lie in [0, 1), got {lo.dropout!r}")
  for key in ("eval.rows", "finetune.eval_rows"):
    section, name = key.split(".")
    _check(cfg[section][name] in EVAL_ROWS, key,
           f"{cfg[section][name]!r} is not one of {EVAL_ROWS}")
  _check_checkpoint("eval.checkpoint", cfg.eval.checkpoint, ", none (zero-shot)")
  _check_checkpoint("recommend.checkpoint", cfg.recommend.checkpoint, ", none (zero-shot)")
  _check_checkpoint("export.checkpoint", cfg.export.checkpoint)
  r = cfg.recommend
  for key in ("candidates", "n"):
    _check(isinstance(r[key], int) and r[key] > 0, f"recommend.{key}",
           f"must be a positive integer, got {r[key]!r}")
  _check(r.n <= r.candidates, "recommend.n",
         f"{r.n} is more than recommend.candidates={r.candidates}")
  _check(isinstance(r.max_users, int) and r.max_users >= 0, "recommend.max_users",
         f"must be a non-negative integer (0: every user), got {r.max_users!r}")
  _check(all(s in ("train", "valid", "test") for s in cfg.eval.splits), "eval.splits",
         f"{tuple(cfg.eval.splits)!r}: splits are train, valid, test")
  for key in ("neighbors", "recommend_n", "recent"):
    _check(isinstance(cfg.index[key], int) and cfg.index[key] > 0, f"index.{key}",
           f"must be a positive integer, got {cfg.index[key]!r}")
  try:
    index_config(cfg)
  except ValueError as e:
    raise _error("index", str(e)) from None
  for name, weight in cfg.mix.weights.items():
    _check(weight >= 0, f"mix.weights.{name}", f"must be >= 0, got {weight!r}")
  return cfg


def _check_checkpoint(key, value, none=""):
  """A checkpoint choice: best, latest, a step, mean:A,B,..., a folder (and none when `none`
  says how to name it)."""
  ckpt = str(value)
  try:
    averaged = results_lib.mean_steps(ckpt) is not None
  except ValueError as e:
    raise _error(key, str(e)) from None
  words = [w for w in results_lib.CHECKPOINT_WORDS if none or w != "none"]
  _check(ckpt in words or ckpt.isdigit() or averaged or Path(ckpt).is_dir(), key,
         f"{ckpt!r}: use best, latest{none}, a step number, mean:A,B,... (the average of "
         f"those steps' weights) or a checkpoint folder")


def from_resolved(values):
  """The config a workdir's config.json holds (`values`, its parsed JSON): base_config() with
  every leaf the file gives; keys it lacks keep their defaults, keys no longer known are left
  out, and JSON lists become tuples where the config holds tuples."""
  cfg = base_config()

  def as_default(default, value):
    if isinstance(default, tuple) and isinstance(value, list):
      return tuple(as_default(default[0] if default else (), v) for v in value)
    return value

  def fill(node, given):
    for key, value in given.items():
      if key not in node:
        continue
      if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
        fill(node[key], value)
      else:
        node[key] = as_default(node[key], value)

  fill(cfg, values)
  return cfg


INDEX_KEYS = ("backend", "num_leaves", "num_leaves_to_search", "dims_per_block",
              "anisotropic_threshold", "reorder", "training_sample_size", "batch_size")


def index_config(cfg):
  """The retrieval.index.IndexConfig of the `index` block (it validates its own fields)."""
  from rallrec_jax.retrieval.index import IndexConfig  # pylint: disable=import-outside-toplevel
  return IndexConfig(**{k: cfg.index[k] for k in INDEX_KEYS})


def _validate_model(m):
  if m.path:
    _check(Path(m.path).expanduser().joinpath("config.json").is_file(), "model.path",
           f"{m.path} is not a Hugging Face model folder (no config.json); leave it empty for "
           f"the tiny random model")
  _check(m.tiny.init_std > 0, "model.tiny.init_std", f"must be > 0, got {m.tiny.init_std!r}")
  line = tuple(m.tiny.number_line)
  _check(not line or (len(line) == 2 and all(isinstance(n, int) for n in line)
                      and 0 <= line[0] < line[1]), "model.tiny.number_line",
         f"must be () or (low, high) with 0 <= low < high, got {line!r}")
  _check(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r} is not one of {DTYPES}")
  _check(m.param_dtype in DTYPES + ("",), "model.param_dtype",
         f"{m.param_dtype!r} is not one of {DTYPES} or ''")
  _check(m.remat in ("none", "full", "dots"), "model.remat",
         f"{m.remat!r} is not one of none, full, dots")
  _check(m.attention in ("", "xla", "cudnn", "blocked"), "model.attention",
         f"{m.attention!r} is not one of '' (automatic), xla, cudnn, blocked")
  _check(m.scan_layers in ("auto", "true", "false"), "model.scan_layers",
         f"{m.scan_layers!r} is not one of auto, true, false")
  try:
    parallel.check_mesh_shape([tuple(x) for x in m.mesh])
  except ValueError as e:
    raise _error("model.mesh", str(e)) from None
  try:
    parallel.check_rules(model_rules(m), model.PARAM_AXES)
  except ValueError as e:
    raise _error("model.rules", str(e)) from None


def model_rules(m):
  """The logical-axis rules of the `model` block's `rules` table."""
  return parallel.rules_from_table(m.rules.to_dict())
