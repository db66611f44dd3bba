"""The `describe` and `embed` stages: item descriptions by the LLM, then their text vectors."""
import hashlib
import json
import logging
from pathlib import Path

from rallrec_jax import config as config_lib
from rallrec_jax import data, stage, workdir_model
from rallrec_jax.stage import Stage
from rallrec_jax.text import describe as describe_lib, embed as embed_lib, templates

log = logging.getLogger("rallrec_jax")


def _descriptions_key(cfg):
  spec = [cfg.describe.to_dict(), config_lib.result_config(cfg, "model"),
          [(str(p), p.stat().st_size, p.stat().st_mtime_ns)
           for p in workdir_model.model_files(cfg)]]
  return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def describe(cfg, workdir):
  """descriptions.jsonl, resumable; a changed model or describe config starts it afresh."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  path = workdir / "descriptions.jsonl"
  stage.resumable([path], workdir / ".descriptions.key",
                  _descriptions_key(cfg) + stage.data_key(workdir))
  lm = workdir_model.load_model(cfg, workdir, dataset)
  d = cfg.describe
  texts = describe_lib.describe(lm, dataset.items, dataset.meta["name"], path,
                                batch_size=d.batch_size, max_new_tokens=d.max_new_tokens,
                                temperature=d.temperature, top_p=d.top_p, seed=d.seed,
                                max_words=d.max_words)
  missing = [it["id"] for it in dataset.items if it["id"] not in texts]
  if missing:
    raise RuntimeError(f"describe: items without a description: {missing[:10]}")
  log.info("describe: %d descriptions in %s", len(texts), path)


def item_texts(cfg, workdir, dataset):
  """The text embedded for each item, in canonical order."""
  if cfg.embed.source == "template":
    return [templates.plain_text(it, dataset.meta["name"]) for it in dataset.items]
  done = describe_lib.read_done(Path(workdir) / "descriptions.jsonl")
  return [done[it["id"]] for it in dataset.items]


def embed(cfg, workdir):
  """embeddings/text.npy: mean-pooled LLM states of each item's text, PCA to embed.pca_dim."""
  dataset = data.load_dataset(workdir)
  lm = workdir_model.load_model(cfg, workdir, dataset)
  e = cfg.embed
  pooled = embed_lib.embed_texts(lm, item_texts(cfg, workdir, dataset), pool=e.pool,
                                 batch_size=e.batch_size, max_length=e.max_length)
  vectors = embed_lib.pca(pooled, e.pca_dim)
  stage.save_array(Path(workdir) / "embeddings" / "text.npy", vectors)
  log.info("embed: %s, %s pool -> text vectors %s", e.source, e.pool, vectors.shape)


DESCRIBE = Stage(
    name="describe",
    help="generate an LLM description of every item (resumable): writes descriptions.jsonl",
    run=describe, config_keys=("describe", "model"), deps=("prepare",),
    outputs=("descriptions.jsonl",), external_inputs=workdir_model.model_files,
    needed=lambda cfg: cfg.embed.source == "description", resumes=("descriptions.jsonl",))
EMBED = Stage(
    name="embed",
    help="mean-pooled LLM hidden states of each item's description (or plain template), PCA: "
         "writes embeddings/text.npy",
    run=embed, config_keys=("embed", "model"),
    deps=lambda cfg: ("prepare", "describe") if cfg.embed.source == "description" else (
        "prepare",),
    outputs=("embeddings/text.npy",), external_inputs=workdir_model.model_files)
