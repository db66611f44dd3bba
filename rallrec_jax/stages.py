"""What each pipeline stage does: read earlier artifacts, call the library, write artifacts.

Every function here is `run(cfg, workdir)`; `pipeline` registers them with their inputs and
outputs. Arrays are written through a temporary name and renamed, so an interrupted stage
never leaves a half-written artifact.
"""
import hashlib
import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np

from rallrec_jax import atomic, data, distributed, parallel
from rallrec_jax import config as config_lib
from rallrec_jax.align import contrastive, mix as mix_lib
from rallrec_jax.cf import lightgcn
from rallrec_jax.eval import baselines, evaluate, metrics
from rallrec_jax.eval import results as results_lib
from rallrec_jax.llm import load_pretrained, lora, tiny
from rallrec_jax.prompts import item_stats, render
from rallrec_jax.retrieval import candidates, history, index as index_lib
from rallrec_jax.text import describe as describe_lib, embed as embed_lib, templates
from rallrec_jax.train import batches, loop, sets

log = logging.getLogger("rallrec_jax")

class Preempted(RuntimeError):
  """A stage stopped on SIGTERM after saving its state; rerunning the command resumes it."""


MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def save_array(path, array):
  """np.save through a temporary name in the same folder."""
  with atomic.open_file(path) as f:
    np.save(f, np.asarray(array))


def save_json(path, value):
  atomic.write_text(path, json.dumps(value, indent=1) + "\n")


def model_files(cfg):
  """The files of the configured model folder (none for the tiny model, built from config)."""
  if not cfg.model.path:
    return []
  folder = Path(cfg.model.path).expanduser()
  return sorted(p for p in folder.iterdir()
                if p.name in MODEL_FILES or p.name.endswith(".safetensors"))


def _tiny_folder(workdir):
  return Path(workdir) / "model_tiny"


def _tiny_model_folder(cfg, workdir, dataset):
  """W/model_tiny: a random decoder whose vocabulary covers the items' text and prompts."""
  folder = _tiny_folder(workdir)
  texts = _tiny_vocabulary_texts(dataset)
  key = hashlib.sha256(json.dumps([cfg.model.tiny.to_dict(), dataset.meta, texts],
                                  sort_keys=True).encode()).hexdigest()
  if (folder / "config.json").is_file() and (folder / "key").is_file() and (
      (folder / "key").read_text() == key):
    return folder
  with atomic.directory(folder) as tmp:
    t = cfg.model.tiny
    tiny.build(tmp, texts, hidden_size=t.hidden_size, num_layers=t.num_layers,
               num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
               intermediate_size=t.intermediate_size, seed=t.seed, init_std=t.init_std)
    (tmp / "key").write_text(key)
  return folder


def _tiny_vocabulary_texts(dataset):
  """Texts whose words the tiny tokenizer must know: the items, the description prompts, the
  plain template, and the recommendation question with every rating from 0 to 10 stars and
  every user's profile, the history summary (`finetune.user_stats`) and the target's like-rate
  phrase (`finetune.item_stats`), so that no word of a prompt (the target's *** marks, "stars",
  an occupation) or of an embedded text reads as <unk>."""
  name = dataset.meta["name"]
  texts = [json.dumps(it, ensure_ascii=False) for it in dataset.items]
  texts += [templates.description_prompt(it, name) for it in dataset.items[:50]]
  texts += [templates.plain_text(it, name) for it in dataset.items[:50]]
  titles = [it["title"] for it in dataset.items[:11]]
  history = [(titles[r % len(titles)], r) for r in range(11)]
  texts.append(render.render_prompt(dataset.users[0], history, titles[0], name,
                                    threshold=dataset.meta["label_threshold"]))
  texts += [render.render_prompt(user, [], titles[0], name) for user in dataset.users]
  texts.append(item_stats.vocabulary_text())
  return texts


def load_model(cfg, workdir, dataset):
  """The configured LLM on the configured mesh."""
  m = cfg.model
  if m.path:
    path = m.path
  elif distributed.is_primary():
    path = _tiny_model_folder(cfg, workdir, dataset)
  else:
    path = _tiny_folder(workdir)
    distributed.wait_for((path / "key").is_file, f"process 0 to build {path}")
  mesh = parallel.make_mesh(tuple(tuple(x) for x in m.mesh))
  return load_pretrained(path, dtype=m.dtype, param_dtype=m.param_dtype or None, mesh=mesh,
                         remat=m.remat, attention=m.attention)


def _descriptions_key(cfg):
  spec = [cfg.describe.to_dict(), config_lib.result_config(cfg, "model"),
          [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in model_files(cfg)]]
  return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _resumable(paths, key_file, key):
  """Keep partial work in `paths` only if it was made for the same `key`; else delete it."""
  if key_file.is_file() and key_file.read_text() == key:
    return
  for path in paths:
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink(missing_ok=True)
  atomic.write_text(key_file, key)


def describe(cfg, workdir):
  """descriptions.jsonl, resumable; a changed model or describe config starts it afresh."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  path = workdir / "descriptions.jsonl"
  _resumable([path], workdir / ".descriptions.key",
             _descriptions_key(cfg) + pipeline_data_key(workdir))
  lm = load_model(cfg, workdir, dataset)
  d = cfg.describe
  texts = describe_lib.describe(lm, dataset.items, dataset.meta["name"], path,
                                batch_size=d.batch_size, max_new_tokens=d.max_new_tokens,
                                temperature=d.temperature, top_p=d.top_p, seed=d.seed,
                                max_words=d.max_words)
  missing = [it["id"] for it in dataset.items if it["id"] not in texts]
  if missing:
    raise RuntimeError(f"describe: items without a description: {missing[:10]}")
  log.info("describe: %d descriptions in %s", len(texts), path)


def pipeline_data_key(workdir):
  """Changes whenever the prepared dataset changes (its meta and item list)."""
  meta = Path(workdir) / "data" / "meta.json"
  items = Path(workdir) / "data" / "items.jsonl"
  return hashlib.sha256(meta.read_bytes() + items.read_bytes()).hexdigest()


def item_texts(cfg, workdir, dataset):
  """The text embedded for each item, in canonical order."""
  if cfg.embed.source == "template":
    return [templates.plain_text(it, dataset.meta["name"]) for it in dataset.items]
  done = describe_lib.read_done(Path(workdir) / "descriptions.jsonl")
  return [done[it["id"]] for it in dataset.items]


def embed(cfg, workdir):
  """embeddings/text.npy: mean-pooled LLM states of each item's text, PCA to embed.pca_dim."""
  dataset = data.load_dataset(workdir)
  lm = load_model(cfg, workdir, dataset)
  e = cfg.embed
  pooled = embed_lib.embed_texts(lm, item_texts(cfg, workdir, dataset), pool=e.pool,
                                 batch_size=e.batch_size, max_length=e.max_length)
  vectors = embed_lib.pca(pooled, e.pca_dim)
  save_array(Path(workdir) / "embeddings" / "text.npy", vectors)
  log.info("embed: %s, %s pool -> text vectors %s", e.source, e.pool, vectors.shape)


def cf(cfg, workdir):
  """embeddings/cf.npy: LightGCN item vectors trained on train-period interactions only."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  user, item = dataset.train_interactions()
  held = dataset.splits["valid"] if len(dataset.splits["valid"]) else dataset.splits["test"]
  c = cfg.cf
  checkpoints = workdir / "cf" / "checkpoints"
  key = hashlib.sha256(json.dumps(c.to_dict(), sort_keys=True).encode()).hexdigest()
  _resumable([checkpoints], workdir / "cf" / ".key", key + pipeline_data_key(workdir))
  params, history = lightgcn.train(
      user, item, dataset.num_users, dataset.num_items, dim=c.dim, num_layers=c.layers, lr=c.lr,
      l2=c.l2, batch_size=c.batch_size, epochs=c.epochs, seed=c.seed,
      eval_pairs=(held.user, held.target), k=c.k, checkpoint_dir=checkpoints, log=log.info)
  positives = lightgcn.positives_from_pairs(user, item, dataset.num_users, dataset.num_items)
  graph = lightgcn.build_graph(*positives.pairs(), dataset.num_users, dataset.num_items)
  save_array(workdir / "embeddings" / "cf.npy",
             lightgcn.item_embeddings(params, graph, c.layers))
  save_json(workdir / "cf" / "metrics.json", history)


def _train_items(dataset):
  return np.unique(dataset.train_interactions()[1])


def align(cfg, workdir):
  """embeddings/joint.npy: InfoNCE-aligned projections of the text and CF views."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  text = np.load(workdir / "embeddings" / "text.npy")
  cf = np.load(workdir / "embeddings" / "cf.npy")
  a = cfg.align
  items = np.random.default_rng(a.seed).permutation(_train_items(dataset))
  n_held = max(1, int(round(a.heldout * len(items))))
  params, history = contrastive.train(
      text, cf, np.sort(items[n_held:]), np.sort(items[:n_held]), hidden=a.hidden,
      out_dim=a.dim, temperature=a.temperature, lr=a.lr, weight_decay=a.weight_decay,
      batch_size=min(a.batch_size, len(items) - n_held), epochs=a.epochs, seed=a.seed,
      log=log.info)
  save_array(workdir / "embeddings" / "joint.npy", contrastive.joint(params, text, cf))
  save_json(workdir / "align" / "metrics.json", history)
  log.info("align: held-out cross-view top-1 %.3f", history[-1]["heldout_top1"])


def index(cfg, workdir):
  """index/: the nearest-neighbour index of the mixed vectors, each item's neighbours with
  their recall against exact search (metrics.json), and candidate generation for every user
  evaluated on the test period."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  vectors = np.load(workdir / "embeddings" / "mixed.npy")
  icfg = config_lib.index_config(cfg)
  built = index_lib.build(vectors, icfg)
  k = min(cfg.index.neighbors, len(vectors) - 1)
  neighbors = index_lib.neighbors(built, k)
  quality = {**index_lib.neighbor_recall(built, neighbors), **built.settings(k + 1),
             "requested_backend": icfg.backend, "num_items": len(vectors),
             "missing_slots": float((neighbors < 0).mean())}
  user, item = dataset.train_interactions()
  seen = index_lib.as_csr(np.split(item, np.cumsum(np.bincount(user, minlength=dataset.num_users))[:-1]))
  test = dataset.splits["test"]
  by_user = np.argsort(test.user, kind="stable")
  relevant = index_lib.as_csr(np.split(
      test.target[by_user], np.cumsum(np.bincount(test.user, minlength=dataset.num_users))[:-1]))
  users = candidates.user_vectors(vectors, seen, recent=cfg.index.recent)
  recommended = candidates.recommend(built, users, seen, cfg.index.recommend_n)
  recall, ndcg = candidates.recall_ndcg_at_n(recommended, relevant)
  n = cfg.index.recommend_n
  with atomic.directory(workdir / "index") as tmp:
    if built.backend == "scann":
      built.save(tmp / "scann")
    save_array(tmp / "neighbors.npy", neighbors.astype(np.int32))
    save_json(tmp / "metrics.json", quality)
    save_json(tmp / "recommend.json", {f"recall@{n}": recall, f"ndcg@{n}": ndcg,
                                       "backend": built.backend, "users": dataset.num_users})
  log.info("index: %s over %s; neighbour recall@%d %.4f against exact search on %d items; "
           "test recall@%d %.4f ndcg@%d %.4f", built.backend, vectors.shape, k,
           quality[f"recall@{k}"], quality["queries"], n, recall, n, ndcg)


def retrieve(cfg, workdir):
  """retrieval/{split}.npz: the K history items of every sample's prompt, in prompt order."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  vectors = np.load(workdir / "embeddings" / "mixed.npy")
  r = cfg.retrieval
  with atomic.directory(workdir / "retrieval") as tmp:
    for split in dataset.splits:
      result = history.retrieve(dataset, split, vectors, k=r.k, order=r.order,
                                max_history=cfg.data.max_history, half_life=r.half_life,
                                rerank_short=r.rerank_short, batch_size=r.batch_size)
      history.save(result, tmp / f"{split}.npz")
      filled = float((result["history"] >= 0).sum(1).mean()) if len(result["sample"]) else 0.0
      log.info("retrieve: %s: %d samples, %.1f of %d history items on average (%s)", split,
               len(result["sample"]), filled, r.k, r.order)


_VARIANT_ORDERS = {"simple": ("simple",), "rerank": ("rerank",), "mixed": ("high", "sequential",
                                                                          "simple")}


def _lora_config(cfg):
  """The LoraConfig of finetune.lora, or None under full fine-tuning (finetune.method=full)."""
  if cfg.finetune.method == "full":
    return None
  f = cfg.finetune.lora
  return lora.LoraConfig(rank=f.rank, alpha=f.alpha, dropout=f.dropout, targets=tuple(f.targets),
                         layers=f.layers)


def _scoring_weights(lm, lora_cfg, weights):
  """(adapters, params) that `evaluate.score_examples` takes for trained `weights`."""
  if lora_cfg is not None:
    return {"adapters": weights, "lora_cfg": lora_cfg}
  dtype = jax.tree.leaves(lm.params)[0].dtype
  return {"params": jax.tree.map(lambda x: x.astype(dtype), weights)}


def _examples(dataset, tokenizer, split, results, pairs, *, labels, max_length, item_stats,
              user_stats):
  """Examples of (order, sample index) pairs, built per order and put back in pair order."""
  by_order = {}
  for position, (order, sample) in enumerate(pairs):
    by_order.setdefault(order, []).append((position, sample))
  out = {"input_ids": [None] * len(pairs), "loss_mask": [None] * len(pairs),
         "label": np.zeros(len(pairs), np.int8), "sample": np.zeros(len(pairs), np.int64)}
  for order, items in by_order.items():
    subset = history.take(results[order], [s for _, s in items])
    built = render.build_examples(dataset, subset, tokenizer, split=split, labels=labels,
                                  max_length=max_length, order=order, item_stats=item_stats,
                                  user_stats=user_stats)
    for j, (position, _) in enumerate(items):
      for key in ("input_ids", "loss_mask", "label", "sample"):
        out[key][position] = built[key][j]
  return out


def _eval_examples(cfg, workdir, dataset, lm, split, limit, which):
  """Prompt-only examples of `limit` rows (0: all) of a split's retrieval, `which` ("first" or
  "spread") saying which."""
  result = history.load(Path(workdir) / "retrieval" / f"{split}.npz")
  rows = evaluate.capped_rows(len(result["sample"]), limit, which)
  pairs = [(cfg.retrieval.order, int(s)) for s in result["sample"][rows]]
  return _examples(dataset, lm.tokenizer, split, {cfg.retrieval.order: result}, pairs,
                   labels=False, max_length=cfg.finetune.max_length,
                   item_stats=cfg.finetune.item_stats, user_stats=cfg.finetune.user_stats)


def finetune(cfg, workdir):
  """checkpoints/: LoRA instruction tuning on the training set of finetune.variant, selected
  and early-stopped on the validation AUC; resumes from the latest checkpoint."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  f = cfg.finetune
  key = json.dumps([f.to_dict(), config_lib.result_config(cfg, "retrieval"),
                    config_lib.result_config(cfg, "model")], sort_keys=True, default=str)
  if distributed.is_primary():
    _resumable([workdir / "checkpoints", workdir / "metrics.jsonl"], workdir / ".finetune.key",
               hashlib.sha256(key.encode()).hexdigest() + pipeline_data_key(workdir))
  distributed.barrier("finetune key")
  lm = load_model(cfg, workdir, dataset)
  primary = distributed.is_primary()
  vectors = np.load(workdir / "embeddings" / "mixed.npy")
  orders = _VARIANT_ORDERS.get(f.variant, (cfg.retrieval.order,))
  r = cfg.retrieval
  results = {order: history.retrieve(dataset, "train", vectors, k=r.k, order=order,
                                     max_history=cfg.data.max_history, half_life=r.half_life,
                                     rerank_short=r.rerank_short, batch_size=r.batch_size)
             for order in orders}
  pool = sets.pool(len(dataset.splits["train"]), f.pool_size, f.seed)
  pairs = sets.training_set(f.variant, pool, results, order=r.order, mixed_size=f.mixed_size)
  examples = _examples(dataset, lm.tokenizer, "train", results, pairs,
                       labels=f.loss == "lm", max_length=f.max_length,
                       item_stats=f.item_stats, user_stats=f.user_stats)
  valid = _eval_examples(cfg, workdir, dataset, lm, "valid", f.eval_samples, f.eval_rows)
  yes, no = lm.yes_no_tokens()
  lora_cfg = _lora_config(cfg)

  def eval_fn(weights):
    logits = evaluate.score_examples(lm, valid, yes, no, batch_size=cfg.eval.batch_size,
                                     **_scoring_weights(lm, lora_cfg, weights))
    return {k: v for k, v in evaluate.evaluate_split(valid["label"], logits).items()
            if v is not None}

  per_update = f.batch_size * f.grad_accum
  updates_per_epoch = max(1, -(-len(pairs) // per_update))
  pad = lm.tokenizer.pad_token_id or 0

  def train_batches(position):
    for _, rows in batches.epochs(examples, f.batch_size, f.seed, start=position):
      yield batches.pad_batch(examples, rows, pad)

  summary = loop.fit(lm, lora_cfg, train_batches, steps=updates_per_epoch * f.epochs, lr=f.lr,
                     weight_decay=f.weight_decay, grad_accum=f.grad_accum, warmup=f.warmup,
                     clip_norm=f.clip_norm, loss=f.loss, answer_ids=(yes, no),
                     checkpoint_dir=workdir / "checkpoints",
                     save_every=f.eval_every or updates_per_epoch,
                     eval_fn=eval_fn, eval_every=f.eval_every or updates_per_epoch,
                     patience=f.patience, seed=f.seed, progress=primary,
                     metrics_path=workdir / "metrics.jsonl" if primary else None)
  summary = {k: v for k, v in summary.items() if k != "weights"}
  if summary["status"] == "preempted":
    raise Preempted(f"finetune: SIGTERM at step {summary['step']}; checkpoint saved in "
                    f"{workdir / 'checkpoints'}; rerun the same command to resume")
  if primary:
    save_json(workdir / "finetune.json", {**summary, "examples": len(pairs),
                                          "updates_per_epoch": updates_per_epoch})
  log.info("finetune: %s at step %s; best valid AUC %s at step %s", summary["status"],
           summary["step"], summary["best_auc"], summary["best_step"])


def _baselines(workdir, dataset, fitted, split, examples, scores):
  """The non-LLM baselines' table on the rows the LLM was scored on (logged)."""
  result = history.load(Path(workdir) / "retrieval" / f"{split}.npz")
  found = baselines.scores(fitted, dataset, split, result, examples["sample"])
  table = baselines.compare(examples["label"], scores, found)
  for name, m in table.items():
    log.info("evaluate: %s baseline %s: auc %.4f, LLM minus it %+.4f [%+.4f, %+.4f]", split,
             name, m["auc"], m["auc_diff"], *m["auc_diff_ci"])
  return table


def _restore_checkpoint(cfg, workdir, lm, choice):
  """(scoring weights for `evaluate.score_examples`, step) of eval.checkpoint `choice`."""
  if choice == "none":
    return {}, None
  lora_cfg = _lora_config(cfg)
  steps = results_lib.mean_steps(choice)
  if steps is not None:
    weights = loop.restore_mean_weights(lm, lora_cfg, workdir / "checkpoints", steps)
    return _scoring_weights(lm, lora_cfg, weights), steps[-1]
  keyword = choice in ("best", "latest") or choice.isdigit()
  folder = workdir / "checkpoints" if keyword else Path(choice)
  which = int(choice) if choice.isdigit() else ("latest" if choice == "latest" else "best")
  weights, step = loop.restore_weights(lm, lora_cfg, folder, which)
  return _scoring_weights(lm, lora_cfg, weights), step


def _write_results(workdir, choice, results):
  """eval/{checkpoint}/, replaced whole: each split's json, predictions and baselines."""
  with atomic.directory(results_lib.results_dir(workdir, choice)) as tmp:
    for split, (metrics_dict, examples, scores, table) in results.items():
      evaluate.write_eval(tmp, split, metrics_dict, examples["sample"], examples["label"],
                          scores)
      baselines.write(tmp, split, table)


def evaluate_stage(cfg, workdir):
  """eval/{checkpoint}/{split}.json and predictions: P(yes) of a checkpoint (or zero-shot) on
  each split, with log loss also after one temperature fitted on the validation prompts; and
  {split}_baselines.json beside them, non-LLM baselines fitted on the train split, on the same
  rows. Each checkpoint choice has its own folder (`results.checkpoint_name`)."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  primary = distributed.is_primary()
  fitted = (baselines.fit(dataset, history.load(workdir / "retrieval" / "train.npz"))
            if primary else None)
  lm = load_model(cfg, workdir, dataset)
  yes, no = lm.yes_no_tokens()
  choice = str(cfg.eval.checkpoint)
  trained, step = _restore_checkpoint(cfg, workdir, lm, choice)

  def logits_of(split, limit):
    examples = _eval_examples(cfg, workdir, dataset, lm, split, limit, cfg.eval.rows)
    return examples, evaluate.score_examples(lm, examples, yes, no,
                                             batch_size=cfg.eval.batch_size, **trained)

  valid, valid_logits = logits_of("valid", cfg.finetune.eval_samples)
  temperature = evaluate.fit_temperature(evaluate.logit_gap(valid_logits), valid["label"])
  results = {}
  for split in cfg.eval.splits:
    examples, logits = (valid, valid_logits) if split == "valid" else logits_of(
        split, cfg.eval.max_samples)
    metrics_dict = {**evaluate.evaluate_split(examples["label"], logits, temperature),
                    "step": step, "checkpoint": choice}
    scores = evaluate.sigmoid(evaluate.logit_gap(logits))
    log.info("evaluate: %s (checkpoint %s): auc %.4f logloss %.4f acc %.4f n %d", split,
             metrics.checkpoint_label(choice, step), metrics_dict["auc"], metrics_dict["logloss"],
             metrics_dict["acc"], metrics_dict["n"])
    if primary:
      results[split] = (metrics_dict, examples, scores,
                        _baselines(workdir, dataset, fitted, split, examples, scores))
  if primary:
    _write_results(workdir, choice, results)
    log.info("evaluate: results in %s", results_lib.results_dir(workdir, choice))


def mix(cfg, workdir):
  """embeddings/mixed.npy: the blocks of the configured variant, each scaled by its max norm."""
  workdir = Path(workdir)
  blocks = {name: np.load(workdir / "embeddings" / f"{name}.npy")
            for name in mix_lib.VARIANTS[cfg.mix.variant]}
  mixed = mix_lib.mix(blocks, cfg.mix.variant, dict(cfg.mix.weights))
  save_array(workdir / "embeddings" / "mixed.npy", mixed)
  log.info("mix: %s -> %s", cfg.mix.variant, mixed.shape)
