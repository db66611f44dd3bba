"""The LoRA training loop: learning, exact resume, completion, accumulation, resharding."""
import dataclasses
import json
import logging
import os
import signal

import jax
import numpy as np
import pytest

from rallrec_jax import parallel
from rallrec_jax.llm import load_pretrained, lora
from rallrec_jax.llm.model import unstack_layers
from rallrec_jax.stage import Preempted
from rallrec_jax.train import finetune, fit, loop
from tests.llm_fixtures import tiny_hf_model

LORA = lora.LoraConfig(rank=4, dropout=0.0, targets=("q_proj", "v_proj"))
STEPS, LR, LENGTH, DATASET = 6, 2e-2, 8, 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_llama")
  tiny_hf_model(folder, "llama")
  return folder


@pytest.fixture(scope="module")
def lm(folder):
  return load_pretrained(folder)


def example(i):
  """Example i of a small repeating dataset: random ids, the last token is the target."""
  ids = np.random.default_rng(i % DATASET).integers(4, 64, LENGTH)
  loss_mask = np.zeros(LENGTH, np.int32)
  loss_mask[-1] = 1
  return ids, loss_mask


def batches(batch_size):
  """A `train_batches_fn` of consecutive examples from `position` on."""
  def from_position(position):
    while True:
      ids, loss_mask = zip(*(example(i) for i in range(position, position + batch_size)))
      yield {"input_ids": np.stack(ids), "attention_mask": np.ones((batch_size, LENGTH), np.int32),
             "loss_mask": np.stack(loss_mask)}
      position += batch_size
  return from_position


def score(adapters):
  """A deterministic stand-in for an evaluation that depends on the adapters."""
  return {"auc": float(sum(np.sum(np.asarray(x)) for x in jax.tree.leaves(adapters)))}


def preempt_on_first_eval(adapters):
  """Send SIGTERM to this process, as a scheduler would, then evaluate as usual."""
  os.kill(os.getpid(), signal.SIGTERM)
  return score(adapters)


def run(lm, workdir, batch_size=8, **kwargs):
  kwargs = dict(steps=STEPS, lr=LR, checkpoint_dir=workdir / "checkpoints", save_every=2,
                eval_fn=score, eval_every=3, metrics_path=workdir / "metrics.jsonl",
                progress=False) | kwargs
  return fit(lm, LORA, batches(batch_size), **kwargs)


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapters(a, b, tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol),
               a, b)


@pytest.fixture(scope="module")
def full_run(lm, tmp_path_factory):
  """(workdir, summary) of one uninterrupted 6-step run."""
  workdir = tmp_path_factory.mktemp("full")
  return workdir, run(lm, workdir)


def test_loss_decreases(full_run):
  workdir, summary = full_run
  records = read_metrics(workdir)
  assert summary["status"] == "complete" and summary["step"] == STEPS
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert records[-1]["loss"] < records[0]["loss"] - 0.1
  assert records[0]["lr"] == pytest.approx(LR) and records[-1]["lr"] < LR
  assert [r["examples_seen"] for r in records] == [8 * s for s in range(1, STEPS + 1)]
  assert [r["step"] for r in records if "eval" in r] == [3, 6]
  assert summary["best_step"] in (3, 6)


def test_resume_after_sigterm_matches_uninterrupted_run(lm, full_run, tmp_path):
  with pytest.raises(Preempted, match="at step 3, checkpoint saved in"):
    run(lm, tmp_path, eval_fn=preempt_on_first_eval)
  second = run(lm, tmp_path)
  assert second["status"] == "complete" and second["step"] == STEPS
  assert_same_adapters(second["weights"], full_run[1]["weights"], 1e-6)
  resumed, full = read_metrics(tmp_path), read_metrics(full_run[0])
  assert len(resumed) == len(full)
  for r, f in zip(resumed, full):
    assert r["step"] == f["step"] and r["examples_seen"] == f["examples_seen"]
    assert r["loss"] == pytest.approx(f["loss"], abs=1e-6)
    assert r["lr"] == pytest.approx(f["lr"], abs=1e-9)
    assert r.get("eval", {}).get("auc") == pytest.approx(f.get("eval", {}).get("auc"), abs=1e-6)
  assert (second["best_step"], second["best_auc"]) == pytest.approx(
      (full_run[1]["best_step"], full_run[1]["best_auc"]), abs=1e-6)


def test_rerun_of_complete_run_trains_nothing(lm, full_run, caplog):
  workdir, summary = full_run
  before = (workdir / "metrics.jsonl").read_text()
  with caplog.at_level(logging.WARNING, logger="rallrec_jax.train.loop"):
    again = run(lm, workdir)
  assert again["status"] == "already_complete" and again["step"] == STEPS
  assert "ALREADY COMPLETE" in caplog.text
  assert (workdir / "metrics.jsonl").read_text() == before
  assert_same_adapters(again["weights"], summary["weights"], 0)


def test_resume_in_the_other_layout_matches_uninterrupted_run(lm, folder, full_run, tmp_path):
  scanned = load_pretrained(folder, scan_layers="true")
  with pytest.raises(Preempted, match="at step 3"):
    run(scanned, tmp_path, eval_fn=preempt_on_first_eval)
  second = run(lm, tmp_path)
  assert second["status"] == "complete" and second["step"] == STEPS
  assert_same_adapters(second["weights"], full_run[1]["weights"], 1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpoints_hold_layers_apart_in_either_layout(lm, folder, tmp_path, method):
  scanned = load_pretrained(folder, scan_layers="true")
  lora_cfg = dataclasses.replace(LORA, layers=1) if method == "lora" else None
  summary = fit(scanned, lora_cfg, batches(4), steps=2, lr=LR,
                checkpoint_dir=tmp_path / "checkpoints", save_every=1, progress=False)
  per_layer = unstack_layers(summary["weights"], lm.cfg.num_layers)
  unrolled, _ = finetune.restore_weights(lm, lora_cfg, tmp_path / "checkpoints", "latest")
  assert_same_adapters(unrolled, per_layer, 0)
  restacked, _ = finetune.restore_weights(scanned, lora_cfg, tmp_path / "checkpoints", "latest")
  assert_same_adapters(restacked, summary["weights"], 0)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_restore_weights_reads_a_clipped_accumulated_run(lm, tmp_path, method):
  lora_cfg = LORA if method == "lora" else None
  summary = fit(lm, lora_cfg, batches(4), steps=2, lr=LR, grad_accum=2, clip_norm=0.5,
                checkpoint_dir=tmp_path / "checkpoints", save_every=1, progress=False)
  latest, step = finetune.restore_weights(lm, lora_cfg, tmp_path / "checkpoints", "latest")
  assert step == 2
  assert_same_adapters(latest, summary["weights"], 0)
  first, _ = finetune.restore_weights(lm, lora_cfg, tmp_path / "checkpoints", 1)
  with pytest.raises(AssertionError):
    assert_same_adapters(first, summary["weights"], 1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_mean_weights_are_the_average_of_the_steps(lm, tmp_path, method):
  lora_cfg = LORA if method == "lora" else None
  fit(lm, lora_cfg, batches(4), steps=3, lr=LR, checkpoint_dir=tmp_path / "checkpoints",
      save_every=1, progress=False)
  steps = [finetune.restore_weights(lm, lora_cfg, tmp_path / "checkpoints", s)[0] for s in (1, 3)]
  mean = finetune.restore_mean_weights(lm, lora_cfg, tmp_path / "checkpoints", [1, 3])
  for got, a, b in zip(jax.tree.leaves(mean), *map(jax.tree.leaves, steps)):
    assert got.dtype == a.dtype and got.sharding == a.sharding
    want = (np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, steps)))


def test_grad_accum_matches_larger_batch(lm, full_run, tmp_path):
  accumulated = run(lm, tmp_path, batch_size=4, grad_accum=2)
  assert accumulated["examples_seen"] == full_run[1]["examples_seen"]
  assert_same_adapters(accumulated["weights"], full_run[1]["weights"], 1e-5)


def test_checkpoint_from_8_devices_restores_on_4(folder, tmp_path):
  mesh8 = parallel.make_mesh((("data", 8),))
  mesh4 = parallel.make_mesh((("data", 4),), jax.devices()[:4])
  trained = run(load_pretrained(folder, mesh=mesh8), tmp_path, steps=2, eval_fn=None)
  restored = run(load_pretrained(folder, mesh=mesh4), tmp_path, steps=2, eval_fn=None)
  assert restored["status"] == "already_complete"
  assert_same_adapters(restored["weights"], trained["weights"], 0)
  for leaf in jax.tree.leaves(restored["weights"]):
    assert leaf.sharding.mesh.devices.size == 4


def test_checkpoint_of_another_rank_is_an_error(lm, full_run):
  with pytest.raises(ValueError, match="rank = 4.*needs 2"):
    fit(lm, lora.LoraConfig(rank=2, dropout=0.0, targets=LORA.targets), batches(8), steps=STEPS,
        checkpoint_dir=full_run[0] / "checkpoints", save_every=2, progress=False)


def flat(adapters):
  """An evaluation that never improves after its first result."""
  del adapters
  return {"auc": 0.5}


def test_early_stop_after_patience_then_rerun_is_complete(lm, tmp_path):
  stopped = run(lm, tmp_path, eval_fn=flat, eval_every=1, patience=2)
  assert stopped["status"] == "early_stopped" and stopped["step"] == 3
  assert (stopped["best_step"], stopped["best_auc"]) == (1, 0.5)
  assert run(lm, tmp_path, eval_fn=flat, eval_every=1, patience=2)["status"] == "already_complete"


class Killed(BaseException):
  """Stands for SIGKILL: nothing after it runs, no checkpoint is saved on the way out."""


def kill_after_logging(monkeypatch, last):
  """Make the run die right after it logs step `last`, leaving half of the next record."""
  write = loop._Metrics.write

  def write_then_die(self, record):
    write(self, record)
    if record["step"] == last:
      with self.path.open("a", encoding="utf-8") as f:
        f.write('{"step": %d, "loss": 0.' % (last + 1))
      raise Killed

  monkeypatch.setattr(loop._Metrics, "write", write_then_die)


def deterministic_fields(record):
  """The fields of a metrics record that do not depend on wall-clock time."""
  return {"step": record["step"], "loss": record["loss"], "lr": record["lr"],
          "examples_seen": record["examples_seen"], "auc": record.get("eval", {}).get("auc", -1.0)}


# Checkpoints at steps 2 and 4: killed before the first one, while writing step 4's (its
# record is logged first) and after it.
@pytest.mark.parametrize("last", [1, 4, 5])
def test_metrics_hold_each_step_once_after_a_kill(lm, full_run, tmp_path, monkeypatch, last):
  with monkeypatch.context() as patch:
    kill_after_logging(patch, last)
    with pytest.raises(Killed):
      run(lm, tmp_path)
  logged = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in logged[:-1]] == list(range(1, last + 1))
  resumed = run(lm, tmp_path)
  assert resumed["status"] == "complete" and resumed["step"] == STEPS
  records, full = read_metrics(tmp_path), read_metrics(full_run[0])
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  for got, want in zip(records, full, strict=True):
    assert deterministic_fields(got) == pytest.approx(deterministic_fields(want), abs=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_abstract_state_is_the_layout_of_a_fresh_one(lm, method):
  lora_cfg = LORA if method == "lora" else None
  optimizer, _ = finetune._trainer(lm.cfg, lora_cfg, STEPS, LR, 0.0, 2)
  fresh = finetune._fresh_state(lm, lora_cfg, optimizer, 0)
  got = finetune.abstract_state(lm, lora_cfg, optimizer)
  assert jax.tree.structure(got) == jax.tree.structure(fresh)
  for a, x in zip(jax.tree.leaves(got), jax.tree.leaves(fresh)):
    assert (a.shape, a.dtype) == (x.shape, x.dtype)
    assert a.sharding.is_equivalent_to(x.sharding, x.ndim), (a.sharding, x.sharding)
