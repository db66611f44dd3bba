"""The representation stages end to end on the shrunk quickstart, against the artifact contract."""
import json

import numpy as np
import pytest

from rallrec_jax import data, pipeline
from rallrec_jax.text import describe
from tests.test_config import load_config

STAGES = ["prepare", "describe", "embed", "cf", "align", "mix", "index", "retrieve"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("quickstart")
  cfg = load_config("quickstart", "runlocal=true")
  status = pipeline.run(cfg, workdir, stages=STAGES)
  return cfg, workdir, status


def test_every_stage_runs_and_writes_the_contract(run):
  cfg, workdir, status = run
  assert status == {name: "ran" for name in STAGES}
  ds = data.load_dataset(workdir)
  n = ds.num_items
  assert sorted(describe.read_done(workdir / "descriptions.jsonl")) == list(range(n))
  dims = {"text": cfg.embed.pca_dim, "cf": cfg.cf.dim, "joint": cfg.align.dim,
          "mixed": cfg.embed.pca_dim + cfg.cf.dim + cfg.align.dim}
  for name, dim in dims.items():
    array = np.load(workdir / "embeddings" / f"{name}.npy")
    assert array.shape == (n, dim) and array.dtype == np.float32 and np.isfinite(array).all()
  neighbors = np.load(workdir / "index" / "neighbors.npy")
  assert neighbors.shape == (n, cfg.index.neighbors)
  assert not (neighbors == np.arange(n)[:, None]).any()
  assert json.loads((workdir / "index" / "recommend.json").read_text())["recall@10"] > 0
  for name in data.SPLITS:
    got = np.load(workdir / "retrieval" / f"{name}.npz")
    samples = ds.splits[name]
    assert got["history"].shape == (len(samples), cfg.retrieval.k)
    np.testing.assert_array_equal(got["user"], samples.user[got["sample"]])
    np.testing.assert_array_equal(got["target"], samples.target[got["sample"]])
    start, end = ds.history_bounds(samples)
    for i in range(0, len(samples), 97):
      chosen = got["history"][i][got["history"][i] >= 0]
      available = ds.timelines.item[start[i]:end[i]]
      assert len(chosen) == min(cfg.retrieval.k, len(available))
      assert set(chosen) <= set(available)
  metrics = json.loads((workdir / "cf" / "metrics.json").read_text())
  assert len(metrics) == cfg.cf.epochs and "recall@20" in metrics[-1]


def test_rerun_skips_and_a_changed_key_reruns_only_downstream(run):
  cfg, workdir, _ = run
  assert set(pipeline.run(cfg, workdir, stages=STAGES).values()) == {"skipped"}
  cfg = load_config("quickstart", "runlocal=true")
  cfg.retrieval.order = "simple"
  status = pipeline.run(cfg, workdir, stages=STAGES)
  assert [s for s, v in status.items() if v == "ran"] == ["retrieve"]
  got = np.load(workdir / "retrieval" / "test.npz")
  ds = data.load_dataset(workdir)
  start, end = ds.history_bounds(ds.splits["test"])
  i = int(np.argmax(end - start))
  last = ds.timelines.item[max(start[i], end[i] - cfg.retrieval.k):end[i]]
  np.testing.assert_array_equal(got["history"][i][:len(last)], last)
