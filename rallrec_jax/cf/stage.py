"""The `cf` stage: LightGCN item vectors from the interactions before the validation period."""
import hashlib
import json
from pathlib import Path

from rallrec_jax import config, data, stage
from rallrec_jax.cf import lightgcn
from rallrec_jax.stage import Stage

def cf(cfg, workdir):
  """embeddings/cf.npy: LightGCN item vectors trained on train-period interactions only."""
  workdir = Path(workdir)
  dataset = data.load_dataset(workdir)
  user, item = dataset.train_interactions()
  held = dataset.splits["valid"] if len(dataset.splits["valid"]) else dataset.splits["test"]
  c = cfg.cf
  checkpoints, records = workdir / "cf" / "checkpoints", workdir / "cf" / "metrics.jsonl"
  key = hashlib.sha256(json.dumps(config.result_config(cfg, "cf"), sort_keys=True).encode()
                       ).hexdigest()
  stage.resumable([checkpoints, records], workdir / "cf" / ".key", key + stage.data_key(workdir))
  params, history = lightgcn.train(
      user, item, dataset.num_users, dataset.num_items, dim=c.dim, num_layers=c.layers, lr=c.lr,
      l2=c.l2, batch_size=c.batch_size, epochs=c.epochs, seed=c.seed,
      eval_pairs=(held.user, held.target), k=c.k, checkpoint_dir=checkpoints,
      save_every=c.save_every, metrics_path=records)
  positives = lightgcn.positives_from_pairs(user, item, dataset.num_users, dataset.num_items)
  graph = lightgcn.build_graph(*positives.pairs(), dataset.num_users, dataset.num_items)
  stage.save_array(workdir / "embeddings" / "cf.npy",
                   lightgcn.item_embeddings(params, graph, c.layers))
  stage.save_json(workdir / "cf" / "metrics.json", history)


CF = Stage(
    name="cf",
    help="LightGCN (BPR) on the interactions before the validation period, resumable: writes "
         "embeddings/cf.npy, cf/metrics.json (validation recall/NDCG)",
    run=cf, config_keys=("cf",), deps=("prepare",),
    outputs=("embeddings/cf.npy", "cf/metrics.json"),
    resumes=("cf/checkpoints", "cf/metrics.jsonl"))
