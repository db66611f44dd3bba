"""The two-view alignment (InfoNCE, training, joint embedding) and the block mixture."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rallrec_jax.align import contrastive, mix

QUIET = {"progress": False}


def _unit_rows(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax_rows(x):
  shifted = x - x.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _two_views(n, noise=0.3, seed=0, latent=8):
  """Text and cf as different random nonlinear maps of one shared latent, plus noise."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, latent))

  def nonlinear(hidden, out):
    a = rng.normal(size=(latent, hidden)) / np.sqrt(latent)
    b = rng.normal(size=(hidden, out)) / np.sqrt(hidden)
    return np.tanh(z @ a) @ b + noise * rng.normal(size=(n, out))

  return nonlinear(64, 32).astype(np.float32), nonlinear(48, 24).astype(np.float32)


# InfoNCE


def test_info_nce_matches_numpy_in_both_directions():
  rng = np.random.default_rng(0)
  zt, zc = _unit_rows(rng, 6, 5), _unit_rows(rng, 6, 5)
  logits = zt @ zc.T / 0.2
  text_to_cf = -np.mean(np.diag(_log_softmax_rows(logits)))
  cf_to_text = -np.mean(np.diag(_log_softmax_rows(logits.T)))
  assert abs(text_to_cf - cf_to_text) > 1e-3  # the two directions differ on these inputs
  got = float(contrastive.info_nce(jnp.asarray(zt), jnp.asarray(zc), 0.2))
  np.testing.assert_allclose(got, 0.5 * (text_to_cf + cf_to_text), rtol=1e-5)


def test_info_nce_is_symmetric_in_the_views():
  rng = np.random.default_rng(1)
  zt, zc = jnp.asarray(_unit_rows(rng, 8, 4)), jnp.asarray(_unit_rows(rng, 8, 4))
  np.testing.assert_allclose(contrastive.info_nce(zt, zc, 0.1),
                             contrastive.info_nce(zc, zt, 0.1), rtol=1e-6)


def test_loss_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    params = contrastive.init(jax.random.PRNGKey(0), 3, 2, hidden=4, out_dim=3)
    rng = np.random.default_rng(2)
    batch = {"text": rng.normal(size=(5, 3)), "cf": rng.normal(size=(5, 2))}
    direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)

    @jax.jit
    def numeric_and_analytic(params, direction, eps=1e-5):
      """Central difference of the loss along `direction`, and grad . direction."""
      def at(step):
        moved = jax.tree.map(lambda p, d: p + step * d, params, direction)
        return contrastive.loss(moved, batch, 0.15)
      grads = jax.grad(contrastive.loss)(params, batch, 0.15)
      analytic = sum(jnp.vdot(g, d) for g, d in
                     zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
      return (at(eps) - at(-eps)) / (2 * eps), analytic

    numeric, analytic = numeric_and_analytic(params, direction)
    np.testing.assert_allclose(numeric, analytic, rtol=1e-6)


# Training


SETTINGS = dict(hidden=64, out_dim=32, temperature=0.1, lr=3e-3, batch_size=200, **QUIET)
TRAIN, HELDOUT = np.arange(800), np.arange(800, 1000)


@pytest.fixture(scope="module")
def views():
  return _two_views(1000)


@pytest.fixture(scope="module")
def trained(views):
  text, cf = views
  params, history = contrastive.train(text, cf, TRAIN, HELDOUT, epochs=15, **SETTINGS)
  return text, cf, HELDOUT, params, history


def test_alignment_learns_to_match_held_out_items(trained):
  text, cf, heldout, params, history = trained
  untrained = contrastive.init(jax.random.PRNGKey(0), 32, 24, hidden=64, out_dim=32)
  chance = contrastive.top1(*contrastive.project(untrained, text[heldout], cf[heldout]))
  final = history[-1]["heldout_top1"]
  assert [h["epoch"] for h in history] == list(range(1, 16))
  assert history[-1]["loss"] < history[0]["loss"]
  assert final > 0.3 and final > chance + 0.25, (final, chance)
  own = contrastive.top1(*contrastive.project(params, text[heldout], cf[heldout]))
  np.testing.assert_allclose(own, final)


def test_joint_rows_are_unit_float32(trained):
  text, cf, _, params, _ = trained
  z = contrastive.joint(params, text, cf)
  assert z.dtype == np.float32 and z.shape == (1000, 32)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def short_runs(views):
  """Three short runs: twice on the same data, once with the held-out vectors replaced.

  They share the main run's shapes and settings, so they reuse its compiled step.
  """
  text, cf = views
  other_text, other_cf = text.copy(), cf.copy()
  other_text[HELDOUT] = np.random.default_rng(9).normal(size=(len(HELDOUT), text.shape[1]))
  other_cf[HELDOUT] = 5.0
  runs = [contrastive.train(t, c, TRAIN, HELDOUT, epochs=2, seed=4, **SETTINGS)[0]
          for t, c in ((text, cf), (text, cf), (other_text, other_cf))]
  return text, cf, runs


def test_training_is_deterministic_for_a_seed(short_runs):
  text, cf, (first, second, _) = short_runs
  np.testing.assert_array_equal(contrastive.joint(first, text, cf),
                                contrastive.joint(second, text, cf))


def test_held_out_items_do_not_influence_training(short_runs):
  _, _, (first, _, other) = short_runs
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other)):
    np.testing.assert_array_equal(a, b)


def test_train_rejects_overlapping_splits():
  text, cf = _two_views(20)
  with pytest.raises(ValueError, match="both train and held-out"):
    contrastive.train(text, cf, np.arange(12), np.arange(10, 20), epochs=1, **QUIET)


# Mixture


def _blocks(n=7, seed=0):
  rng = np.random.default_rng(seed)
  return {"text": rng.normal(size=(n, 5)) * 3.0, "cf": rng.normal(size=(n, 4)) * 0.1,
          "joint": _unit_rows(rng, n, 3)}


def test_mix_scales_each_block_to_its_weight_in_text_cf_joint_order():
  blocks = _blocks()
  out = mix.mix(blocks, "mix3", weights={"cf": 2.0, "joint": 0.5})
  assert out.dtype == np.float32 and out.shape == (7, 12)
  parts = {"text": out[:, :5], "cf": out[:, 5:9], "joint": out[:, 9:]}
  for name, weight in (("text", 1.0), ("cf", 2.0), ("joint", 0.5)):
    np.testing.assert_allclose(np.linalg.norm(parts[name], axis=1).max(), weight, rtol=1e-6)
    scale = weight / np.linalg.norm(blocks[name], axis=1).max()
    np.testing.assert_allclose(parts[name], blocks[name] * scale, rtol=1e-5)


def test_mixed_cosine_matches_numpy():
  blocks = _blocks()
  out = mix.mix(blocks, "mix", weights={"text": 0.7})
  t = 0.7 * blocks["text"] / np.linalg.norm(blocks["text"], axis=1).max()
  c = blocks["cf"] / np.linalg.norm(blocks["cf"], axis=1).max()
  x = np.concatenate([t, c], axis=1)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_allclose(mix.cosine(out[:3], out), x[:3] @ x.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant, names", [("text", ["text"]), ("cf", ["cf"]),
                                            ("mix", ["text", "cf"]),
                                            ("mix3", ["text", "cf", "joint"])])
def test_variants_pick_their_blocks(variant, names):
  blocks = _blocks()
  expected = np.concatenate(
      [blocks[n] / np.linalg.norm(blocks[n], axis=1).max() for n in names], axis=1)
  np.testing.assert_allclose(mix.mix(blocks, variant), expected, rtol=1e-5)


def test_mix_defaults_to_mix3():
  blocks = _blocks()
  np.testing.assert_array_equal(mix.mix(blocks), mix.mix(blocks, "mix3"))


@pytest.mark.parametrize("change, variant, weights, message", [
    (lambda b: b.pop("joint"), "mix3", None, "needs block 'joint'"),
    (lambda b: None, "mix4", None, "unknown mix variant 'mix4'"),
    (lambda b: b.update(cf=b["cf"][:5]), "mix", None, "different row counts"),
    (lambda b: None, "mix", {"jiont": 1.0}, "unknown blocks \\['jiont'\\]"),
    (lambda b: None, "mix", {"cf": -1.0}, "non-negative"),
    (lambda b: b.update(text=np.zeros((7, 5))), "text", None, "block 'text' has largest row"),
])
def test_mix_errors_name_the_problem(change, variant, weights, message):
  blocks = _blocks()
  change(blocks)
  with pytest.raises(ValueError, match=message):
    mix.mix(blocks, variant, weights)
