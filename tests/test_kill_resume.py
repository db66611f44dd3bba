"""A fine-tune killed by SIGKILL (a real OS kill: no exception, no clean-up) and then rerun
holds each step's record once, with the losses of one uninterrupted run.

The fine-tunes run in child processes that execute this file as a script: full fine-tuning of
the shrunk quickstart's decoder (2 layers, width 32, 2 query heads on 1 KV head) on a data mesh
over the 8 fake CPU devices, with a checkpoint every `SAVE_EVERY` updates. A child that is to
be killed blocks in its data iterator once it has logged the step it is killed at, so it never
runs past the kill point however slowly the test polls; the SIGKILL still lands wherever the
child is, a checkpoint being written included. The children share a persistent compilation
cache, which halves the time of every child after the first; five JAX processes still take
about 55 s on 2 CPU cores, so the test is slow:

  python -m pytest -q -m slow tests/test_kill_resume.py
"""
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, EVAL_EVERY, BATCH, LENGTH, DATASET, LR = 12, 4, 3, 8, 16, 24, 3e-3
# The wall-clock fields of a metrics record: they differ between any two runs.
TIMING = ("tokens_per_s", "mfu", "eta_s")
TIMEOUT_S, POLL_S = 240, 0.02
TEXTS = ["the user will like this movie", "a rating of 4 stars", "it is of the drama genre",
         "the user watched and read the book"]


def batches(vocab_size, hold=0):
  """A `train_batches_fn` over a small repeating dataset; with `hold`, the iterator blocks
  when asked for the batch after step `hold`, until the test kills the process."""
  def from_position(position):
    while True:
      if hold and position == hold * BATCH:
        time.sleep(TIMEOUT_S)
        raise SystemExit(f"held after step {hold} for {TIMEOUT_S} s and not killed")
      rows = [np.random.default_rng(i % DATASET).integers(8, vocab_size, LENGTH)
              for i in range(position, position + BATCH)]
      loss_mask = np.ones((BATCH, LENGTH), np.int32)
      loss_mask[:, :LENGTH // 2] = 0
      yield {"input_ids": np.stack(rows), "attention_mask": np.ones((BATCH, LENGTH), np.int32),
             "loss_mask": loss_mask}
      position += BATCH
  return from_position


def score(weights):
  """A deterministic stand-in for an evaluation that depends on every trained weight."""
  import jax  # pylint: disable=import-outside-toplevel
  return {"auc": float(sum(np.mean(np.asarray(x)) for x in jax.tree.leaves(weights)))}


def child(folder, workdir, hold, build):
  """The fine-tune a child process runs (after building the decoder, with `build`); prints
  its summary, less the weights. Logs go to stderr, where the test reads the resume step."""
  logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
  logging.getLogger("rallrec_jax").setLevel(logging.INFO)
  # pylint: disable=import-outside-toplevel
  from rallrec_jax import parallel
  from rallrec_jax.llm import load_pretrained, tiny, tokenizer
  from rallrec_jax.train import fit
  # pylint: enable=import-outside-toplevel
  if build:
    tiny.build(folder, TEXTS, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
               init_std=0.1)
  # Fine-tuning never tokenizes, and importing transformers would add 1.5 s to every child.
  tokenizer.load = lambda folder: None
  lm = load_pretrained(folder, mesh=parallel.make_mesh((("data", 8),)))
  workdir = Path(workdir)
  summary = fit(lm, None, batches(lm.cfg.vocab_size, hold), steps=STEPS, lr=LR, warmup=2,
                checkpoint_dir=workdir / "checkpoints", save_every=SAVE_EVERY, eval_fn=score,
                eval_every=EVAL_EVERY, metrics_path=workdir / "metrics.jsonl", progress=False)
  print(json.dumps({k: v for k, v in summary.items() if k != "weights"}))


class Child(contextlib.AbstractContextManager):
  """One fine-tune in a child process, killed on leaving the `with` if still running. Its
  output goes to files in its workdir, so a full pipe never blocks it."""

  def __init__(self, env, folder, workdir, hold=0, build=False):
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(self.workdir.glob("stdout.*")))
    self.stdout_path, self.stderr_path = (self.workdir / f"{s}.{n}" for s in ("stdout", "stderr"))
    with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
      self.proc = subprocess.Popen(
          [sys.executable, __file__, str(folder), str(self.workdir), str(hold), str(int(build))],
          cwd=REPO, env=env, stdout=out, stderr=err)

  def __exit__(self, *exc):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()

  def log(self):
    return self.stderr_path.read_text()

  def output(self):
    return f"--- stdout\n{self.stdout_path.read_text()}\n--- stderr (end)\n{self.log()[-4000:]}"

  def finish(self):
    """The summary of a run that must complete within the timeout."""
    try:
      self.proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
      pytest.fail(f"fine-tune in {self.workdir} still running after {TIMEOUT_S} s\n"
                  f"{self.output()}")
    assert self.proc.returncode == 0, self.output()
    return json.loads(self.stdout_path.read_text().splitlines()[-1])

  def kill_when_logged(self, step):
    """Poll metrics.jsonl until it holds `step`, SIGKILL the child; the steps it logged."""
    deadline = time.monotonic() + TIMEOUT_S
    while step not in logged_steps(self.workdir):
      if self.proc.poll() is not None:
        pytest.fail(f"fine-tune exited ({self.proc.returncode}) before logging step {step}\n"
                    f"{self.output()}")
      if time.monotonic() > deadline:
        pytest.fail(f"no step {step} in {self.workdir / 'metrics.jsonl'} after {TIMEOUT_S} s "
                    f"(logged {logged_steps(self.workdir)})\n{self.output()}")
      time.sleep(POLL_S)
    os.kill(self.proc.pid, signal.SIGKILL)
    self.proc.wait(TIMEOUT_S)
    assert self.proc.returncode == -signal.SIGKILL, self.output()
    return logged_steps(self.workdir)


def logged_steps(workdir):
  """The steps of the complete lines of metrics.jsonl so far (none before it exists)."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return []
  return [json.loads(line)["step"] for line in path.read_text().splitlines(keepends=True)
          if line.endswith("\n")]


def read_metrics(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def deterministic(record):
  """A record less its wall-clock fields, its evaluation flattened for `pytest.approx`."""
  out = {k: v for k, v in record.items() if k not in TIMING and k != "eval"}
  out.update({f"eval_{k}": v for k, v in record.get("eval", {}).items()})
  return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A child's environment: JAX on the CPU with this process's fake devices, and a shared
  persistent compilation cache (cached or not, a step's results are the same)."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ["XLA_FLAGS"],
              PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
  """(decoder folder, records, summary) of one uninterrupted run, which builds the decoder."""
  folder = tmp_path_factory.mktemp("decoder")
  workdir = tmp_path_factory.mktemp("uninterrupted")
  with Child(env, folder, workdir, build=True) as run:
    summary = run.finish()
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert summary["status"] == "complete" and summary["step"] == STEPS
  return folder, records, summary


# Checkpoints every 4 steps: killed two steps past the one at step 4 (it resumes there), and as
# soon as step 8's record is logged, which comes just before its checkpoint is written: the kill
# lands before or while it is (the run resumes from step 4) or after (from step 8).
@pytest.mark.slow
@pytest.mark.parametrize("kill_at, resumable", [(6, (4,)), (8, (4, 8))],
                         ids=["between_checkpoints", "at_a_checkpoint"])
def test_sigkilled_fine_tune_resumes_to_the_uninterrupted_records(env, uninterrupted, tmp_path,
                                                                  kill_at, resumable):
  folder, want, want_summary = uninterrupted
  with Child(env, folder, tmp_path, hold=kill_at) as killed:
    assert killed.kill_when_logged(kill_at) == list(range(1, kill_at + 1))
  with Child(env, folder, tmp_path) as resumed:
    summary = resumed.finish()
  start = re.search(r"resuming from \S+ at step (\d+)", resumed.log())
  assert start and int(start.group(1)) in resumable, resumed.output()
  got = read_metrics(tmp_path)
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))
  start = int(start.group(1))
  if start < kill_at:
    assert f"dropped {kill_at - start} records after step {start}" in resumed.log()
  for g, w in zip(got, want, strict=True):
    assert deterministic(g) == pytest.approx(deterministic(w), rel=1e-5, abs=1e-7), g["step"]
  assert summary["status"] == "complete" and summary["step"] == STEPS
  assert (summary["examples_seen"], summary["best_step"]) == (
      want_summary["examples_seen"], want_summary["best_step"])
  assert (summary["best_auc"], summary["final_loss"]) == pytest.approx(
      (want_summary["best_auc"], want_summary["final_loss"]), rel=1e-5)


if __name__ == "__main__":
  child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
