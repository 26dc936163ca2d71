"""PGD / APGD and the attack losses: constraints, determinism, compilation, what each guarantees.

The attack algorithms only see `loss_fn(images, key)`; their guarantees do not depend on CLIP, so a
small nonlinear stand-in encoder (a two-layer MLP with the DualEncoder interface) keeps these tests
fast. The CLIP path is exercised end to end in test_multimodal.py and test_evaluate.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mat_jax import attacks
from mat_jax.attacks import image as I
from mat_jax.attacks import losses as L
from mat_jax.errors import InputError
from mat_jax.models import l2_normalize

import helpers

B, H, D, K = 6, 8, 16, 3
ENC = helpers.MLPEncoder()


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(H * H * 3, 32)) / 8, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(32, D)), jnp.float32),
            "logit_scale": jnp.asarray(np.log(20.0), jnp.float32)}
  images = rng.uniform(size=(B, H, H, 3)).astype(np.float32)
  images[0, :2] = 0.0  # pixels on the box edges: projection must keep them inside [0, 1]
  images[1, :2] = 1.0
  texts = jnp.asarray(rng.normal(size=(B, K, D)), jnp.float32)
  return params, jnp.asarray(images), texts


def _cosine_pgd(params, images, texts, key, eps, step_size, steps, *, norm, keep_best, momentum=0.0):
  loss = L.paired_cosine(ENC, params, texts)
  return I.pgd(loss, images, key, eps=eps, step_size=step_size, steps=steps, norm=norm,
               keep_best=keep_best, momentum=momentum)


pgd_linf = jax.jit(functools.partial(_cosine_pgd, norm="linf", keep_best=True))
pgd_l2 = jax.jit(functools.partial(_cosine_pgd, norm="l2", keep_best=False, momentum=0.9))
cosine_loss = jax.jit(lambda params, images, texts: L.paired_cosine(ENC, params, texts)(images, None))


def test_linf_stays_in_ball_and_box_and_eps0_is_identity(setup):
  params, images, texts = setup
  eps = 4 / 255
  adv = pgd_linf(params, images, texts, jax.random.key(0), eps, 1 / 255, 10)
  # 1e-6: the round-off of x + clip(x' - x) in float32, far below one 8-bit level (3.9e-3).
  assert float(jnp.max(jnp.abs(adv - images))) <= eps + 1e-6
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  assert float(jnp.max(jnp.abs(adv - images))) > 0.5 * eps  # it did move
  same = pgd_linf(params, images, texts, jax.random.key(0), 0.0, 1 / 255, 10)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(images))


def test_l2_with_momentum_stays_in_ball_and_box(setup):
  params, images, texts = setup
  eps = 0.5
  adv = pgd_l2(params, images, texts, jax.random.key(0), eps, 0.2, 8)
  norms = jnp.sqrt(jnp.sum(jnp.square(adv - images), axis=(1, 2, 3)))
  assert float(norms.max()) <= eps * (1 + 1e-5)
  assert float(norms.min()) > 0.5 * eps
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  assert np.all(np.asarray(cosine_loss(params, adv, texts)) > np.asarray(cosine_loss(params, images, texts)))


def test_fixed_seed_is_reproducible_and_the_key_matters(setup):
  params, images, texts = setup
  a = pgd_linf(params, images, texts, jax.random.key(3), 4 / 255, 1 / 255, 5)
  b = pgd_linf(params, images, texts, jax.random.key(3), 4 / 255, 1 / 255, 5)
  c = pgd_linf(params, images, texts, jax.random.key(4), 4 / 255, 1 / 255, 5)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_best_iterate_loss_never_decreases_with_steps(setup):
  # What is guaranteed: for a fixed key the iterates of a k-step run are a prefix of a longer run's,
  # so the best loss over them can only grow with k. (The last iterate's loss, and recall, carry no
  # such guarantee: a sign step can overshoot.)
  params, images, texts = setup
  key = jax.random.key(7)
  losses = [np.asarray(cosine_loss(params, pgd_linf(params, images, texts, key, 8 / 255, 3 / 255, k), texts))
            for k in range(6)]
  for before, after in zip(losses, losses[1:], strict=False):
    assert np.all(after >= before)
  assert np.all(losses[-1] > losses[0])


def test_each_attack_compiles_once_per_shape(setup):
  params, images, texts = setup
  for eps, steps in [(1 / 255, 2), (3 / 255, 4), (0.02, 7)]:
    pgd_linf(params, images, texts, jax.random.key(1), eps, eps / 4, steps)
  assert pgd_linf._cache_size() == 1


def test_vmap_over_eps(setup):
  params, images, texts = setup
  eps_values = jnp.asarray([0.0, 2 / 255, 8 / 255])
  batched = jax.jit(jax.vmap(lambda e: pgd_linf(params, images, texts, jax.random.key(5), e, e / 4, 6)))
  stacked = batched(eps_values)
  for e, adv in zip(eps_values, stacked, strict=True):
    single = pgd_linf(params, images, texts, jax.random.key(5), e, e / 4, 6)
    np.testing.assert_allclose(np.asarray(adv), np.asarray(single), atol=1e-6)
    assert float(jnp.max(jnp.abs(adv - images))) <= float(e) + 1e-6


@jax.jit
def _apgd_vs_pgd(params, images, texts, key):
  """Equal budget (20 gradient evaluations) on the multi-positive CE over all B*K texts."""
  flat = texts.reshape(B * K, D)
  positives = jnp.repeat(jnp.eye(B, dtype=bool), K, axis=1)
  logits_fn = L.retrieval_logits(ENC, params, flat)
  loss = L.logit_loss(logits_fn, positives)
  eps = 4 / 255
  x_apgd = I.apgd(loss, images, key, eps=eps, steps=20)
  x_pgd = I.pgd(loss, images, key, eps=eps, step_size=eps / 4, steps=20)
  x_t = I.apgd_targeted(logits_fn, positives, images, key, eps=eps, steps=10, n_targets=3)
  return (loss(images, key), loss(x_apgd, key), loss(x_pgd, key), x_t,
          L.margin(logits_fn(images), positives), L.margin(logits_fn(x_t), positives))


def test_apgd_reaches_at_least_pgd_loss_and_apgd_t_raises_the_margin(setup):
  params, images, texts = setup
  clean, apgd_loss, pgd_loss, x_t, clean_margin, t_margin = _apgd_vs_pgd(params, images, texts,
                                                                         jax.random.key(0))
  assert np.all(np.asarray(apgd_loss) > np.asarray(clean))
  # Not a theorem; on this fixed case APGD's adaptive step size and best-iterate tracking win for
  # the batch as a whole, as in Croce & Hein's comparisons.
  assert float(jnp.sum(apgd_loss)) >= float(jnp.sum(pgd_loss))
  # APGD-T keeps, per image, the run with the largest margin, starting from the clean image's:
  # guaranteed never to lower it.
  assert np.all(np.asarray(t_margin) >= np.asarray(clean_margin))
  assert float(jnp.max(jnp.abs(x_t - images))) <= 4 / 255 + 1e-6


def test_errors_name_the_problem(setup):
  params, images, texts = setup
  # Both raise while tracing, before anything runs.
  with pytest.raises(InputError, match="unknown norm"):
    jax.jit(lambda x: I.pgd(lambda a, k: jnp.zeros(B), x, jax.random.key(0), eps=0.1, step_size=0.1,
                            steps=1, norm="l1"))(images)
  with pytest.raises(ValueError, match="one value per image"):
    jax.jit(lambda x: I.pgd(lambda a, k: jnp.sum(a), x, jax.random.key(0), eps=0.1, step_size=0.1,
                            steps=1))(images)
  # APGD-T over a batch's captions: each image owns K of the B*K texts, so it has B*K - K targets at most.
  positives = jnp.repeat(jnp.eye(B, dtype=bool), K, axis=1)
  with pytest.raises(ValueError, match=f"n_targets={B * K - K + 1}: .* leaving {B * K - K} wrong texts"):
    I.apgd_attack(ENC, params, images, texts.reshape(B * K, D), positives, jax.random.key(0), eps=0.1, steps=2,
                  n_targets=B * K - K + 1, text_weights=jnp.ones((B, K)))
  # Fewer than 4 real texts among padding ones: the targeted DLR would have a padding text in its top 4, its
  # gradient 0, and APGD-T would return its random start.
  three = np.zeros(B * K, np.float32)
  three[:3] = 1
  with pytest.raises(ValueError, match=r"targeted DLR ranks at least 4 texts, and 3 of the \d+ texts have a nonzero "
                                       "weight"):
    I.apgd_attack(ENC, params, images, texts.reshape(B * K, D), positives, jax.random.key(0), eps=0.1, steps=2,
                  n_targets=1, text_weights=three)


@pytest.fixture(scope="module")
def micro_clip():
  """A one-block CLIP with zero weights (numpy-initialised: nothing compiles); the checks run before it is used."""
  from mat_jax.models import CLIP, clip_config
  from mat_jax.models.clip import TextConfig, VisionConfig

  cfg = clip_config("tiny", vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32),
                    text=TextConfig(vocab_size=50, context_length=8, width=16, layers=1, heads=2, mlp_dim=32,
                                    eos_token_id=3, bos_token_id=2, pad_token_id=0),
                    projection_dim=8)
  return helpers.numpy_initialised(CLIP, cfg, lambda path, leaf, rng: np.zeros(leaf.shape, leaf.dtype))


@pytest.mark.parametrize("ids, kwargs, message", [
    (np.array([2, 5, 3, 0], np.int32), {},
     r"input_ids must be \(B, L\) or \(B, K, L\) with B = 2 images, got \(4,\); a single caption needs a batch "
     r"axis: input_ids\[None\]"),
    (np.array([[2, 5, 3, 0]] * 3, np.int32), {}, r"with B = 2 images, got \(3, 4\)$"),
    (np.array([[2, 5, 3, 0]] * 2, np.int32), {"norm": "l3"},
     r"unknown norm 'l3'; use one of \('linf', 'l2'\)"),
    # The norm is checked before eps, whose bound depends on it: not "eps=2 is outside [0, 1]".
    (np.array([[2, 5, 3, 0]] * 2, np.int32), {"norm": "l3", "eps": 2.0}, "unknown norm 'l3'"),
], ids=["1-d ids", "batch mismatch", "norm", "norm before eps"])
def test_image_attack_bad_arguments_are_input_errors(micro_clip, ids, kwargs, message):
  # InputError is a ValueError too: code that caught the ValueError these were before still catches them.
  images = np.full((2, 16, 16, 3), 0.5, np.float32)
  args = {"eps": 2 / 255, "steps": 1, "step_size": 1 / 255, **kwargs}
  with pytest.raises(InputError, match=message) as raised:
    attacks.image_attack(micro_clip, images, ids, (ids > 0).astype(np.int32), **args)
  assert isinstance(raised.value, ValueError)


def test_multimodal_attack_caption_count_is_an_input_error(micro_clip):
  images = np.full((2, 16, 16, 3), 0.5, np.float32)
  with pytest.raises(InputError, match="1 caption entries for 2 images"):
    attacks.co_attack(micro_clip, None, images, ["a"], None)
  with pytest.raises(InputError, match="every image needs at least one caption"):
    attacks.sga_attack(micro_clip, None, images, ["a", []], None)


# ----------------------------------------------------------------------------------------------------
# Loss definitions (eager, on the stand-in encoder)
# ----------------------------------------------------------------------------------------------------

def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_kl(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@jax.jit
def _all_losses(params, adv, f_clean, texts, weights):
  return dict(
      co=L.co_attack(ENC, params, f_clean, texts, alpha=3.0, text_weights=weights)(adv, None),
      cosine=L.paired_cosine(ENC, params, texts, weights)(adv, None),
      fare=L.feature_distance(ENC, params, f_clean)(adv, None),
      image_kl=L.image_kl(ENC, params, f_clean)(adv, None),
      contrastive=L.contrastive(ENC, params, texts[:, 0])(adv, None),
      f_adv=ENC.image_features(params, adv))


def test_co_attack_and_other_losses_match_their_formulas(setup):
  params, images, texts = setup
  rng = np.random.default_rng(1)
  adv = np.clip(np.asarray(images) + rng.uniform(-0.03, 0.03, images.shape), 0, 1).astype(np.float32)
  f_clean = np.asarray(jax.jit(ENC.image_features)(params, images))
  t = np.asarray(texts)
  weights = np.ones((B, K), np.float32)
  weights[2, 1:] = 0.0  # image 2 has a single real caption
  got = {k: np.asarray(v) for k, v in _all_losses(params, adv, f_clean, texts, weights).items()}
  f_adv = got["f_adv"]

  image_term = _np_kl(_np_softmax(_unit(f_clean)), _np_softmax(_unit(f_adv)))
  text_terms = _np_kl(_np_softmax(_unit(t)), _np_softmax(_unit(f_adv))[:, None, :])
  want = image_term + 3.0 * (text_terms * weights).sum(1) / weights.sum(1)
  np.testing.assert_allclose(got["co"], want, rtol=1e-4, atol=1e-6)
  want = -((_unit(f_adv)[:, None, :] * _unit(t)).sum(-1) * weights).sum(1)
  np.testing.assert_allclose(got["cosine"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["fare"], ((f_adv - f_clean) ** 2).sum(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["image_kl"], image_term, rtol=1e-4, atol=1e-6)
  # Contrastive CE with the identity positives = the ordinary cross-entropy.
  logits = 20.0 * _unit(f_adv) @ _unit(t[:, 0]).T
  want = -np.log(_np_softmax(logits)[np.arange(B), np.arange(B)])
  np.testing.assert_allclose(got["contrastive"], want, rtol=1e-4, atol=1e-5)


def test_retrieval_logits_use_the_clamped_temperature_of_the_contrastive_loss(setup):
  # A logit scale trained past log(100) is used at 100, as CLIP's contrastive loss uses it; below, as it is.
  params, images, texts = setup
  classes = texts[:, 0]
  cosines = np.asarray(ENC.image_embeddings(params, images) @ l2_normalize(classes).T)
  for log_scale, multiplier in ((np.log(20.0), 20.0), (np.log(100.0) + 1.0, 100.0)):
    scaled = {**params, "logit_scale": jnp.asarray(log_scale, jnp.float32)}
    np.testing.assert_allclose(np.asarray(L.retrieval_logits(ENC, scaled, classes)(images)), multiplier * cosines,
                               rtol=1e-5, atol=1e-5)


def test_dlr_losses():
  logits = jnp.asarray([[5.0, 3.0, 1.0, 0.0, -1.0], [0.0, 4.0, 2.0, 1.0, 3.0]])
  positives = jnp.asarray([[True, False, False, False, False], [True, False, False, False, False]])
  # Row 0: correct (5 vs 3): -(5 - 3) / (5 - 1). Row 1: wrong (0 vs 4): (4 - 0) / (4 - 2).
  np.testing.assert_allclose(np.asarray(L.dlr(logits, positives)), [-0.5, 2.0], rtol=1e-6)
  targets = jnp.asarray([2, 4])
  # Row 0: (1 - 5) / (5 - (1 + 0) / 2); row 1: (3 - 0) / (4 - (2 + 1) / 2).
  np.testing.assert_allclose(np.asarray(L.targeted_dlr(logits, positives, targets)),
                             [-4 / 4.5, 3 / 2.5], rtol=1e-6)
  with pytest.raises(ValueError, match="at least 4 texts"):
    L.targeted_dlr(logits[:, :3], positives[:, :3], targets)


@jax.jit
def _sga_views(params, images, texts, key):
  base = L.paired_cosine(ENC, params, texts)
  scaled = L.multi_scale(base)
  values, grad = jax.value_and_grad(lambda x: jnp.sum(scaled(x, key)))(images)
  # multi_scale draws its views with the first half of the key.
  views = L.scaled_views(images, jax.random.split(key)[0])
  return dict(views=jnp.stack(views), scaled=values, summed=sum(jnp.sum(base(v, None)) for v in views),
              grad=grad, plain=jax.grad(lambda x: jnp.sum(base(x, None)))(images))


def test_sga_scaled_views_are_differentiable(setup):
  params, images, texts = setup
  out = _sga_views(params, images, texts, jax.random.key(0))
  assert out["views"].shape == (1 + len(L.SGA_SCALES),) + images.shape
  # The multi-scale loss is the sum of the base loss over the image and its rescaled views.
  np.testing.assert_allclose(float(out["scaled"]), float(out["summed"]), rtol=1e-5)
  grad, plain = out["grad"], out["plain"]
  assert bool(jnp.all(jnp.isfinite(grad)))
  # The rescaled views contribute: the gradient is not the plain one.
  assert float(jnp.linalg.norm(grad - plain)) > 1e-3 * float(jnp.linalg.norm(plain))


def test_bicubic_resize_matches_pytorch():
  import torch
  x = np.random.default_rng(0).uniform(size=(2, 16, 12, 3)).astype(np.float32)
  for h, w in [(8, 6), (7, 5), (20, 15)]:  # halving, an uneven shrink, an enlargement
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                                           align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(L.resize_bicubic(jnp.asarray(x), h, w)), want, atol=2e-6)
  # Down and up again leaves a flat image flat: the views rescale, they do not shift or tint.
  flat = jnp.full((1, 16, 16, 3), 0.5)
  np.testing.assert_allclose(np.asarray(L.resize_bicubic(L.resize_bicubic(flat, 8, 8), 16, 16)), 0.5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# The step rules against small references (toy losses with known gradients, numpy loops)
# ----------------------------------------------------------------------------------------------------

# Per image, a sum of sines over 4 "pixels" (images (8, 1, 1, 4)): many local maxima within the ball, so the
# sign steps overshoot, the loss oscillates, and APGD's checkpoints halve steps and restart from best points.
_rng = np.random.default_rng(0)
_W = _rng.uniform(6.0, 14.0, (8, 1, 1, 4)).astype(np.float32)
_P = _rng.uniform(0.0, 2 * np.pi, (8, 1, 1, 4)).astype(np.float32)
_X0 = _rng.uniform(0.2, 0.8, (8, 1, 1, 4)).astype(np.float32)
del _rng


def _sines(x, key=None):
  return jnp.sum(jnp.sin(_W * x + _P), axis=(1, 2, 3))


def _np_sines(x):
  """(losses, gradients) of _sines in float64."""
  w, p = _W.astype(np.float64), _P.astype(np.float64)
  return np.sin(w * x + p).sum((1, 2, 3)), w * np.cos(w * x + p)


def _np_apgd_linf(images, start, eps, steps, rho=0.75, alpha=0.75):
  """Croce & Hein's APGD (AutoAttack's apgd_attack, L-inf) on _sines from `start`, written as their loop.

  Returns (best point, its loss, the number of checkpoint restarts that moved an image away from its current
  iterate): the last tells the comparison below exercises the halving and the restart from x_max."""
  first, min_window, decrement = I.apgd_schedule(steps)
  col = lambda v: v[:, None, None, None]  # noqa: E731
  proj = lambda x: np.clip(np.clip(x, images - eps, images + eps), 0.0, 1.0)  # noqa: E731
  x = x_old = start.astype(np.float64)
  loss_best, grad = _np_sines(x)
  x_best, grad_best, loss_last, loss_best_last_check = x, grad, loss_best, loss_best
  step = np.full(len(x), 2.0 * eps)
  increases = np.zeros(len(x))
  reduced_last_check = np.ones(len(x), bool)
  counter, k, moved = 0, first, 0
  for i in range(steps):
    a = alpha if i > 0 else 1.0
    z = proj(x + col(step) * np.sign(grad))
    x, x_old = proj(x + a * (z - x) + (1 - a) * (x - x_old)), x
    loss, grad = _np_sines(x)
    increases += loss > loss_last
    loss_last = loss
    better = loss > loss_best
    x_best, grad_best = np.where(col(better), x, x_best), np.where(col(better), grad, grad_best)
    loss_best = np.where(better, loss, loss_best)
    counter += 1
    if counter == k:
      reduce = (increases <= k * rho) | (~reduced_last_check & (loss_best_last_check >= loss_best))
      moved += int(np.sum(reduce & ~better))
      step = np.where(reduce, step / 2.0, step)
      x, grad = np.where(col(reduce), x_best, x), np.where(col(reduce), grad_best, grad)
      increases[:] = 0
      reduced_last_check, loss_best_last_check = reduce, loss_best
      counter, k = 0, max(k - decrement, min_window)
  return x_best, loss_best, moved


@jax.jit
def _apgd_on_sines(images, key):
  """APGD with three restarts, and each restart's run on its own with its random start (apgd gives restart r
  the key split(key, 3)[r]; a run draws its start with the first half of that key)."""
  keys = jax.random.split(key, 3)
  runs = jax.vmap(lambda k: I._apgd_run(_sines, images, k, eps=0.25, steps=20, norm="linf", rho=0.75, alpha=0.75,
                                        random_start=True))(keys)
  starts = jax.vmap(lambda k: I._apgd_start(jax.random.split(k)[0], images, 0.25, "linf"))(keys)
  return I.apgd(_sines, images, key, eps=0.25, steps=20, restarts=3), *runs, starts


def test_apgd_follows_autoattack_step_halving_momentum_and_restarts():
  restarted, run_x, run_loss, starts = (np.asarray(a) for a in _apgd_on_sines(jnp.asarray(_X0), jax.random.key(0)))
  # Each run step for step as the reference: a step never halved at the checkpoints, a missing momentum term
  # (0.75 (z - x) + 0.25 (x - x_prev)), or an image not restarted from its best point after a halving would
  # each send the trajectories apart (the reference restarts images off their current iterate).
  for x, loss, start in zip(run_x, run_loss, starts, strict=True):
    want, want_loss, moved = _np_apgd_linf(_X0, start, 0.25, 20)
    assert moved > 10
    np.testing.assert_allclose(x, want, atol=1e-5)
    np.testing.assert_allclose(loss, want_loss, atol=1e-5)
  # Restarts: per image, the point of the run with the highest loss, whichever restart found it; here a
  # later restart wins for some images, so a result that never replaced the first run's would differ.
  winner = np.argmax(run_loss, axis=0)
  assert np.any(winner > 0) and np.any(winner == 0)
  np.testing.assert_array_equal(restarted, run_x[winner, np.arange(len(winner))])


def _target_loss(x, key=None):
  """-(x - c)^2 per image: image 0's maximum (c = 0.55) lies between the sign steps of 0.03 from 0.5, image 1's
  (c = 0.7) beyond three of them."""
  return -jnp.sum(jnp.square(x - jnp.asarray([0.55, 0.7])[:, None, None, None]), axis=(1, 2, 3))


@jax.jit
def _pgd_options(images, key):
  mi_fgsm = I.pgd(_sines, images, key, eps=0.25, step_size=0.05, steps=8, random_start=False, momentum=1.0)
  best = I.pgd(_target_loss, jnp.full((2, 1, 1, 1), 0.5), key, eps=0.1, step_size=0.03, steps=3, random_start=False,
               keep_best=True)
  return mi_fgsm, best


def test_pgd_momentum_normalises_each_gradient_and_keep_best_includes_the_final_iterate():
  mi_fgsm, best = (np.asarray(a) for a in _pgd_options(jnp.asarray(_X0), jax.random.key(0)))
  # MI-FGSM (Dong et al.): g_t = mu g_{t-1} + grad_t / mean|grad_t|, x_{t+1} = P(x_t + step sign(g_t)). Without
  # the normalisation a large gradient would outweigh the accumulated direction, and the path would differ.
  x, velocity = _X0.astype(np.float64), 0.0
  for _ in range(8):
    grad = _np_sines(x)[1]
    velocity = velocity + grad / np.mean(np.abs(grad), axis=(1, 2, 3), keepdims=True)
    x = np.clip(np.clip(x + 0.05 * np.sign(velocity), _X0 - 0.25, _X0 + 0.25), 0.0, 1.0)
  np.testing.assert_allclose(mi_fgsm, x, atol=1e-5)
  # Iterates 0.5, 0.53, 0.56 and then 0.53 (image 0: the best is the earlier 0.56) or 0.59 (image 1: the last
  # iterate, which keep_best scores with its extra forward pass, is the best).
  np.testing.assert_allclose(best.ravel(), [0.56, 0.59], atol=1e-6)


def test_l2_random_start_is_uniform_in_the_ball():
  # Uniform in the n-ball: the share of the ball's volume within the start's radius, (radius / eps)^n, is uniform
  # on [0, 1] (radius eps U^(1/n)). A radius of eps U would crowd the starts near the centre: U^3, median 1/8.
  images = jnp.full((4000, 1, 1, 3), 0.5)
  delta = np.asarray(jax.jit(I.random_init, static_argnums=3)(jax.random.key(0), images, 0.3, "l2")) - 0.5
  volume_share = (np.linalg.norm(delta.reshape(4000, 3), axis=1) / 0.3) ** 3
  assert volume_share.max() <= 1.0 + 1e-5
  np.testing.assert_allclose(np.quantile(volume_share, [0.25, 0.5, 0.75]), [0.25, 0.5, 0.75], atol=0.03)
