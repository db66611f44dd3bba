"""The `align` and `mix` stages: the joint view of text and CF vectors, then the mixed vectors
that retrieval compares."""
import logging
from pathlib import Path

import numpy as np

from rallrec_jax import data, stage
from rallrec_jax.align import contrastive, mix as mix_lib
from rallrec_jax.stage import Stage

log = logging.getLogger("rallrec_jax")

# The stage that makes each block of a mix variant.
BLOCK_STAGES = {"text": "embed", "cf": "cf", "joint": "align"}


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
      batch_size=min(a.batch_size, len(items) - n_held), epochs=a.epochs, seed=a.seed)
  stage.save_array(workdir / "embeddings" / "joint.npy", contrastive.joint(params, text, cf))
  stage.save_json(workdir / "align" / "metrics.json", history)
  log.info("align: held-out cross-view top-1 %.3f", history[-1]["heldout_top1"])


def mix(cfg, workdir):
  """embeddings/mixed.npy: the blocks of the configured variant, each scaled by its max norm."""
  workdir = Path(workdir)
  blocks = {name: np.load(workdir / "embeddings" / f"{name}.npy")
            for name in mix_lib.VARIANTS[cfg.mix.variant]}
  mixed = mix_lib.mix(blocks, cfg.mix.variant, dict(cfg.mix.weights))
  stage.save_array(workdir / "embeddings" / "mixed.npy", mixed)
  log.info("mix: %s -> %s", cfg.mix.variant, mixed.shape)


ALIGN = Stage(
    name="align",
    help="contrastive (InfoNCE) alignment of the text and CF views of train-period items: "
         "writes embeddings/joint.npy, align/metrics.json",
    run=align, config_keys=("align",), deps=("prepare", "embed", "cf"),
    outputs=("embeddings/joint.npy", "align/metrics.json"))
MIX = Stage(
    name="mix",
    help="the retrieval embedding: text, cf and joint blocks scaled and concatenated per "
         "mix.variant: writes embeddings/mixed.npy",
    run=mix, config_keys=("mix",),
    deps=lambda cfg: ("prepare",) + tuple(BLOCK_STAGES[block]
                                          for block in mix_lib.VARIANTS[cfg.mix.variant]),
    outputs=("embeddings/mixed.npy",))
