"""Retrieval quality without an LLM: does a representation retrieve more useful history?

Each test sample's label is predicted from its K retrieved history items alone: the user's
mean rating plus the similarity-weighted mean of the retrieved ratings' deviations from it.
The test AUC of that prediction compares the representations (text, cf, mix, mix3) and orders
(last K against similarity, with and without the recency rerank) before paying for an LLM.
The pipeline runs up to `mix` in a workdir first: on MovieLens 100K by default (the text view
comes from $RALLREC_SMOLLM2 when set, else from the tiny random decoder, which carries no
semantics), or on the dataset and representations of a config file (`--config`).
"""
import os
from pathlib import Path

import numpy as np

from rallrec_jax import config as config_lib
from rallrec_jax import data, numeric, pipeline
from rallrec_jax.align import mix as mix_lib
from rallrec_jax.eval import metrics
from rallrec_jax.retrieval import history

KS = (5, 10, 20, 30)
# (row name, representation, order): the orders that decide which K items are used.
ROWS = (("simple", "mix3", "simple"), ("text", "text", "high"), ("cf", "cf", "high"),
        ("mix", "mix", "high"), ("mix3", "mix3", "high"), ("mix3+rerank", "mix3", "rerank"))


def ml100k_config(ml100k, model_dir=None, embed_source="template"):
  """ML-100K with the base config's representations (the default of this benchmark)."""
  cfg = config_lib.base_config()
  cfg.data.name, cfg.data.path = "ml100k", str(ml100k)
  cfg.model.path = model_dir or ""
  cfg.embed.source = embed_source
  return cfg


def prepare_workdir(workdir, cfg):
  """Run the pipeline up to `mix` (describing items first when the text view needs it)."""
  stages = ["prepare", "embed", "cf", "align", "mix"]
  if cfg.embed.source == "description":
    stages.insert(1, "describe")
  pipeline.run(cfg, workdir, stages=stages)


def _ratings_of(dataset, samples, items):
  """Ratings [N, K] the samples' users gave the retrieved `items` (NaN where -1)."""
  t = dataset.timelines
  row_user = np.repeat(np.arange(dataset.num_users, dtype=np.int64), np.diff(t.offsets))
  keys = row_user * dataset.num_items + t.item
  order = np.argsort(keys, kind="stable")
  query = samples.user[:, None].astype(np.int64) * dataset.num_items + np.maximum(items, 0)
  rows = order[np.searchsorted(keys[order], query)]
  return np.where(items >= 0, t.rating[rows], np.nan)


def predict(dataset, samples, items, vectors):
  """User mean + similarity-weighted mean deviation of the retrieved items' ratings."""
  start, end = dataset.history_bounds(samples)
  cumulative = np.r_[0.0, np.cumsum(dataset.timelines.rating, dtype=np.float64)]
  sums = cumulative[end] - cumulative[start]
  lengths = end - start
  user_mean = np.where(lengths > 0, sums / np.maximum(lengths, 1), 3.5)
  unit = numeric.unit_rows(np.asarray(vectors, np.float32))
  sims = np.einsum("nkd,nd->nk", unit[np.maximum(items, 0)], unit[samples.target])
  weights = np.where(items >= 0, np.maximum(sims, 0.0) + 1e-6, 0.0)
  deviation = np.nan_to_num(_ratings_of(dataset, samples, items) - user_mean[:, None])
  total = weights.sum(1)
  return user_mean + np.where(total > 0, (weights * deviation).sum(1) / np.maximum(total, 1e-12),
                              0.0)


def bench_retrieval_quality(workdir, cfg):
  """One dict per (row, K): test AUC, with `simple` at the same K as the competitor."""
  prepare_workdir(workdir, cfg)
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  blocks = {name: np.load(workdir / "embeddings" / f"{name}.npy") for name in mix_lib.BLOCKS}
  vectors = {name: mix_lib.mix(blocks, name) for name in mix_lib.VARIANTS}
  test = dataset.splits["test"]
  results = []
  for k in KS:
    aucs = {}
    for name, representation, order in ROWS:
      got = history.retrieve(dataset, "test", vectors[representation], k=k, order=order)
      score = predict(dataset, test, got["history"], vectors[representation])
      aucs[name] = metrics.auc(test.label, score)
    for name, representation, order in ROWS:
      results.append({"bench": "retrieval_quality", "row": name, "representation": representation,
                      "order": order, "k": k, "value": round(aucs[name], 4), "unit": "test AUC",
                      "competitor": "simple (last K)", "competitor_value": round(aucs["simple"], 4),
                      "ratio": round(aucs[name] / aucs["simple"], 4),
                      "data": cfg.data.name, "text_model": cfg.model.path or "tiny random decoder",
                      "text_source": cfg.embed.source, "text_pool": cfg.embed.pool,
                      "samples": len(test)})
  return results


def default_ml100k():
  here = Path(__file__).resolve().parents[2]
  return Path(os.environ.get("RALLREC_ML100K", here.parent / "shared" / "data" / "ml-100k"))
