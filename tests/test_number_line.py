"""The tiny decoder's number line: number tokens placed on one line and kept there in training."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rallrec_jax.llm import number_line, tiny
from rallrec_jax.llm.api import load_pretrained
from rallrec_jax.train import finetune, step as step_lib
from tests.test_train_step import left_padded


def off_line(rows, positions):
  """Largest distance of `rows` from their least-squares line a + t b, fitted by numpy."""
  design = np.stack([np.ones_like(positions), positions], axis=1)
  coef, *_ = np.linalg.lstsq(design, rows, rcond=None)
  return float(np.abs(design @ coef - rows).max())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A tiny decoder whose vocabulary holds the numbers 0..30 but not 17, its rows on a line."""
  texts = [" ".join(str(n) for n in range(31) if n != 17) + " Yes No"]
  return tiny.build(tmp_path_factory.mktemp("tiny"), texts, hidden_size=16,
                    intermediate_size=32, num_heads=2, num_kv_heads=1, init_std=0.3,
                    number_line=(10, 20))


def test_tokens_skip_numbers_outside_the_vocabulary_and_need_two(folder):
  tok = load_pretrained(folder).tokenizer
  ids, positions = number_line.tokens(tok, 10, 20)
  assert [tok.convert_ids_to_tokens(int(i)) for i in ids] == [
      str(n) for n in range(10, 21) if n != 17]
  np.testing.assert_allclose(positions, [(n - 10) / 10 for n in range(10, 21) if n != 17])
  with pytest.raises(ValueError, match="number line 40..90: 0 of its numbers"):
    number_line.tokens(tok, 40, 90)


def test_build_places_the_rows_between_the_ends_and_leaves_the_rest(folder, tmp_path):
  texts = [" ".join(str(n) for n in range(31) if n != 17) + " Yes No"]
  free = tiny.build(tmp_path, texts, hidden_size=16, intermediate_size=32, num_heads=2,
                    num_kv_heads=1, init_std=0.3)
  lm, free_lm = load_pretrained(folder), load_pretrained(free)
  ids, positions = number_line.tokens(lm.tokenizer, 10, 20)
  got = np.asarray(lm.params["embed_tokens"]["embedding"])
  want = np.asarray(free_lm.params["embed_tokens"]["embedding"])
  assert off_line(got[ids], positions) < 1e-6 and off_line(want[ids], positions) > 0.1
  np.testing.assert_allclose(got[ids[[0, -1]]], want[ids[[0, -1]]])
  np.testing.assert_allclose(got[ids[3]], 0.7 * want[ids[0]] + 0.3 * want[ids[-1]], atol=1e-6)
  others = np.setdiff1d(np.arange(len(got)), ids)
  np.testing.assert_array_equal(got[others], want[others])


def test_keep_on_line_lands_the_rows_on_their_least_squares_line():
  rng = np.random.default_rng(0)
  ids, positions = np.array([2, 5, 6, 9]), np.array([0.0, 0.2, 0.7, 1.0])
  params = {"embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)},
            "norm": {"weight": jnp.ones(3)}}
  updates = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  moved, _ = number_line.keep_on_line(ids, positions).update(updates, optax.EmptyState(), params)
  new = np.asarray(params["embed_tokens"]["embedding"] + moved["embed_tokens"]["embedding"])
  free = np.asarray(params["embed_tokens"]["embedding"] + updates["embed_tokens"]["embedding"])
  # The rows land where numpy's least-squares fit of where they would have gone puts them.
  design = np.stack([np.ones(4), positions], axis=1)
  fit = design @ np.linalg.lstsq(design, free[ids], rcond=None)[0]
  np.testing.assert_allclose(new[ids], fit, atol=1e-5)
  others = np.setdiff1d(np.arange(12), ids)
  np.testing.assert_array_equal(new[others], free[others])
  np.testing.assert_array_equal(moved["norm"]["weight"], updates["norm"]["weight"])


def test_full_fine_tuning_keeps_the_line_and_moves_it(folder):
  """AdamW updates of every weight: the number rows move, stay on a line, and the loss falls."""
  lm = load_pretrained(folder)
  ids, positions = number_line.tokens(lm.tokenizer, 10, 20)
  optimizer = finetune.make_optimizer(1e-2, 20, weight_decay=0.1,
                                      number_line=(ids, positions))
  yes, no = lm.yes_no_tokens()
  train = step_lib.make_train_step(lm.cfg, None, optimizer, "answer", (yes, no))
  state = step_lib.init_train_state(jax.random.key(0),
                                    step_lib.initial_weights(jax.random.key(0), lm, None),
                                    optimizer)
  batch = left_padded(length=8)
  batch["input_ids"] = np.where(batch["attention_mask"] > 0,
                                ids[batch["input_ids"] % len(ids)], batch["input_ids"])
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  start = np.asarray(lm.params["embed_tokens"]["embedding"])[ids]
  losses = []
  for _ in range(20):
    state, metrics = train(state, lm.params, batch)
    losses.append(float(metrics["loss"]))
  rows = np.asarray(state["weights"]["embed_tokens"]["embedding"])[ids]
  assert np.abs(rows - start).max() > 0.05
  assert off_line(rows, positions) < 1e-5
  assert losses[-1] < losses[0] - 0.1
