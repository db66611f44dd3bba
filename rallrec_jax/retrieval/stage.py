"""The `index` and `retrieve` stages: the nearest-neighbour index of the mixed vectors with its
candidate generation, and the K history items of every sample's prompt."""
import logging
from pathlib import Path

import numpy as np

from rallrec_jax import atomic, data, stage
from rallrec_jax import config as config_lib
from rallrec_jax.eval import metrics
from rallrec_jax.retrieval import candidates, history, index as index_lib
from rallrec_jax.stage import Stage

log = logging.getLogger("rallrec_jax")


def index(cfg, workdir):
  """index/: the nearest-neighbour index of the mixed vectors, each item's M neighbours with
  their recall@M and recall@10 against exact search (metrics.json), and candidate generation
  for every user evaluated on the test period."""
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
  seen = index_lib.as_csr(
      np.split(item, np.cumsum(np.bincount(user, minlength=dataset.num_users))[:-1]))
  test = dataset.splits["test"]
  by_user = np.argsort(test.user, kind="stable")
  relevant = index_lib.as_csr(np.split(
      test.target[by_user], np.cumsum(np.bincount(test.user, minlength=dataset.num_users))[:-1]))
  users = candidates.user_vectors(vectors, seen, recent=cfg.index.recent)
  recommended = candidates.recommend(built, users, seen, cfg.index.recommend_n)
  recall, ndcg = metrics.recall_ndcg_at_n(recommended, relevant.offsets, relevant.items)
  n = cfg.index.recommend_n
  with atomic.directory(workdir / "index") as tmp:
    if built.backend == "scann":
      built.save(tmp / "scann")
    stage.save_array(tmp / "neighbors.npy", neighbors.astype(np.int32))
    stage.save_json(tmp / "metrics.json", quality)
    stage.save_json(tmp / "recommend.json", {f"recall@{n}": recall, f"ndcg@{n}": ndcg,
                                             "backend": built.backend, "users": dataset.num_users})
  said = ", ".join(f"{key} {value:.4f}" for key, value in quality.items()
                   if key.startswith("recall@"))
  log.info("index: %s over %s; neighbour %s against exact search on %d items; "
           "test recall@%d %.4f ndcg@%d %.4f", built.backend, vectors.shape, said,
           quality["queries"], n, recall, n, ndcg)


def retrieve(cfg, workdir):
  """retrieval/{split}.npz: the K history items of every sample's prompt, in prompt order."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  vectors = np.load(workdir / "embeddings" / "mixed.npy")
  r = cfg.retrieval
  with atomic.directory(workdir / "retrieval") as tmp:
    for split in dataset.splits:
      result = history.retrieve_configured(dataset, split, vectors, r, cfg.data.max_history)
      history.save(result, tmp / f"{split}.npz")
      filled = float((result["history"] >= 0).sum(1).mean()) if len(result["sample"]) else 0.0
      log.info("retrieve: %s: %d samples, %.1f of %d history items on average (%s)", split,
               len(result["sample"]), filled, r.k, r.order)


INDEX = Stage(
    name="index",
    help="nearest-neighbour index of the mixed vectors (index.backend auto: exact search below "
         "5,000 items, ScaNN above), top-M neighbours per item and their recall@M and "
         "recall@10 against exact search, candidate generation evaluated on the test period: "
         "writes index/ (scann/, neighbors.npy, metrics.json, recommend.json)",
    run=index, config_keys=("index",), deps=("prepare", "mix"), outputs=("index",), version=2)
RETRIEVE = Stage(
    name="retrieve",
    help="for every sample, the K history items of its prompt (retrieval.order, default the "
         "paper's rerank) by cosine on the mixed vectors: writes retrieval/{split}.npz",
    run=retrieve, config_keys=("retrieval", "data.max_history"), deps=("prepare", "mix"),
    outputs=("retrieval",))
