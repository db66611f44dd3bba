"""The `prepare` stage: the raw dataset named by the `data` config block, made canonical."""
import logging
from pathlib import Path

from rallrec_jax import data
from rallrec_jax.stage import Stage

log = logging.getLogger("rallrec_jax")


def prepare(cfg, workdir):
  dataset = data.prepare(cfg.data)
  data.save(dataset, Path(workdir) / "data")
  m = dataset.meta
  log.info("prepare: %s: %d users, %d items, %d ratings; samples %s", m["name"], m["num_users"],
           m["num_items"], m["num_ratings"],
           " / ".join(f"{k} {v:,}" for k, v in m["splits"].items()))
  for note in m["notes"]:
    log.info("prepare: %s", note)


PREPARE = Stage(
    name="prepare",
    help="load the raw dataset and build the canonical one: writes data/ (items.jsonl, "
         "users.jsonl, timelines.npz, samples_{train,valid,test}.npz, meta.json)",
    run=prepare, config_keys=("data",), outputs=("data",),
    external_inputs=lambda cfg: data.input_files(cfg.data))
