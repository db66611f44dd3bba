"""The generic training loop: model selection and early stopping, exact resume, SIGTERM."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rallrec_jax.stage import Preempted
from rallrec_jax.train import loop

ROWS, PER_STEP, STEPS = 4, 2, 6
OPTIMIZER = optax.adam(0.1)


def init():
  w = jnp.zeros(3)
  return {"w": w, "opt": OPTIMIZER.init(w)}


@jax.jit
def step(state, batch):
  loss, grad = jax.value_and_grad(lambda w: jnp.mean((batch["x"] - w) ** 2))(state["w"])
  updates, opt = OPTIMIZER.update(grad, state["opt"], state["w"])
  return {"w": optax.apply_updates(state["w"], updates), "opt": opt}, {"loss": loss}


def batches(position):
  """Steps of PER_STEP batches of ROWS examples, example i drawn from seed i."""
  def batch(start):
    return {"x": np.stack([np.random.default_rng(i).normal(size=3)
                           for i in range(start, start + ROWS)])}
  while True:
    yield [batch(position + j * ROWS) for j in range(PER_STEP)]
    position += PER_STEP * ROWS


def scripted(values):
  """An evaluation returning `values` in turn as "score"."""
  values = iter(values)
  return lambda state: {"score": next(values)}


def options(tmp_path, **kwargs):
  return loop.Options(**{"steps": STEPS, "checkpoint_dir": tmp_path / "checkpoints",
                         "save_every": 2, "metric": "score", "progress": False,
                         "metrics_path": tmp_path / "metrics.jsonl"} | kwargs)


def records(tmp_path):
  return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode, best", [("max", (2, 0.9)), ("min", (3, 0.1))])
def test_early_stopping_keeps_the_best_step_of_the_metric(tmp_path, mode, best):
  opts = options(tmp_path, mode=mode, patience=2)
  result = loop.fit(init, step, batches, opts, evaluate=scripted([0.5, 0.9, 0.1, 0.6, 0.7]))
  stop = best[0] + 2
  assert (result.status, result.step, result.best_step, result.best_value) == (
      "early_stopped", stop, *best)
  assert [r["eval"]["score"] for r in records(tmp_path)] == [0.5, 0.9, 0.1, 0.6, 0.7][:stop]
  again = loop.fit(init, step, batches, opts, evaluate=scripted([]))
  assert (again.status, again.step, again.best_step) == ("already_complete", stop, best[0])


def test_records_hold_the_mean_of_the_step_and_the_examples_seen(tmp_path):
  result = loop.fit(init, step, batches, options(tmp_path, metric=None))
  rows = records(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert [r["examples_seen"] for r in rows] == [PER_STEP * ROWS * s for s in range(1, 7)]
  assert result.position == STEPS * PER_STEP * ROWS and result.history == rows
  first = next(batches(0))
  state, losses = init(), []
  for batch in first:
    state, metrics = step(state, batch)
    losses.append(metrics["loss"])
  assert rows[0]["loss"] == pytest.approx(float(np.mean(jax.device_get(losses))), rel=1e-6)


class Killed(BaseException):
  """Stands for SIGKILL: nothing after it runs, no checkpoint is saved on the way out."""


def test_resume_after_a_kill_gives_the_uninterrupted_state(tmp_path):
  whole = loop.fit(init, step, batches, options(tmp_path / "whole"),
                   evaluate=lambda state: {"score": float(jnp.sum(state["w"]))})
  calls = []

  def dying(state, batch):
    calls.append(1)
    if len(calls) > 5 * PER_STEP:   # killed within step 6: the last checkpoint is step 4's
      raise Killed
    return step(state, batch)

  evaluate = lambda state: {"score": float(jnp.sum(state["w"]))}  # noqa: E731
  with pytest.raises(Killed):
    loop.fit(init, dying, batches, options(tmp_path / "cut"), evaluate=evaluate)
  assert len(records(tmp_path / "cut")) == 5
  resumed = loop.fit(init, step, batches, options(tmp_path / "cut"), evaluate=evaluate)
  assert resumed.status == "complete" and resumed.step == STEPS
  for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(whole.state)):
    np.testing.assert_array_equal(a, b)
  timing = ("eta_s",)
  assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == [
      {k: v for k, v in r.items() if k not in timing} for r in whole.history]
  assert (resumed.best_step, resumed.best_value) == (whole.best_step, whole.best_value)


def test_sigterm_saves_the_step_and_raises_preempted(tmp_path):
  def preempt_at_3(state):
    if records_so_far() == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return {"score": 0.0}

  def records_so_far():
    path = tmp_path / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0

  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(Preempted, match="at step 3, checkpoint saved in .*checkpoints"):
    loop.fit(init, step, batches, options(tmp_path, save_every=100), evaluate=preempt_at_3)
  assert signal.getsignal(signal.SIGTERM) is previous
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [3]
  resumed = loop.fit(init, step, batches, options(tmp_path), evaluate=scripted([0.0] * 3))
  assert resumed.status == "complete" and [r["step"] for r in resumed.history] == list(
      range(1, STEPS + 1))


def test_without_checkpoints_sigterm_still_stops_at_the_end_of_the_step(tmp_path):
  def preempt(state):
    os.kill(os.getpid(), signal.SIGTERM)
    return {"score": 0.0}

  with pytest.raises(Preempted, match="at step 1, no checkpoint; rerun the same command to "
                                      "start again"):
    loop.fit(init, step, batches, options(tmp_path, checkpoint_dir=None), evaluate=preempt)


def test_options_are_frozen_and_check_the_mode():
  with pytest.raises(ValueError, match="mode"):
    loop.Options(steps=1, mode="up")
  with pytest.raises(AttributeError):
    loop.Options(steps=1).steps = 2
