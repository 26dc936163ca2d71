"""Objective formulas on hand-checkable inputs (no model: a stand-in encoder with linear features)."""

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax.attacks import losses
from mat_jax.objectives import base
from mat_jax.objectives.contrastive import clip_loss
from mat_jax.objectives.fare import FARE
from mat_jax.objectives.mat import MAT
from mat_jax.objectives.mava import MAVA
from mat_jax.objectives.mmcoa import MMCoA
from mat_jax.objectives.tecoa import TeCoA


class _MeanColour:
  """image_features = the mean colour of each image (B, 3)."""

  def image_features(self, params, images):
    return params * jnp.mean(images, axis=(1, 2))


def test_mava_terms_follow_equations_2_and_3():
  images = jnp.stack([jnp.full((2, 2, 3), 0.5), jnp.full((2, 2, 3), 0.2)])
  original = jnp.array([[0.5, 0.5, 0.0], [0.0, 0.2, 0.2]])
  captions = jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])  # unit vectors, M = 2 per image
  # beta = 0: the N neighbours coincide with the adversarial image, so the terms are exact.
  cms, vsse = losses.mava_terms(_MeanColour(), jnp.asarray(1.0), images, jax.random.key(0), original, captions,
                                neighbours=3, radius=0.0)
  feats = np.array([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]])
  np.testing.assert_allclose(vsse, ((feats - np.asarray(original)) ** 2).sum(-1), rtol=1e-6)
  unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  expected_cms = 1 - np.einsum("bd,bkd->bk", unit, np.asarray(captions)).mean(-1)
  np.testing.assert_allclose(cms, expected_cms, rtol=1e-6)


def test_mava_neighbours_stay_within_beta_eps():
  images = jnp.full((1, 4, 4, 3), 0.5)
  # With identity-like features the VSSE term is the mean squared shift of the mean colour: bounded
  # by (beta * eps)^2 per channel (beta = 0.5, eps = 8/255).
  _, vsse = losses.mava_terms(_MeanColour(), jnp.asarray(1.0), images, jax.random.key(1),
                              jnp.full((1, 3), 0.5), jnp.ones((1, 1, 3)) / np.sqrt(3), neighbours=64,
                              radius=0.5 * 8 / 255)
  assert 0 < float(vsse[0]) <= 3 * (0.5 * 8 / 255) ** 2


def test_positives_cover_an_images_captions_and_shared_ids():
  mask = np.asarray(base.positives(jnp.array([4, 5, 4]), 3, 2))
  expected = np.array([[1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(np.asarray(base.positives(None, 2, 1)), np.eye(2, dtype=bool))


class _UnitFeatures:
  """A dual encoder whose embeddings are given: image i -> images[i, 0, 0], caption j -> input_ids[j]."""

  def image_embeddings(self, params, images):
    feats = images[:, 0, 0]
    return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)

  def text_embeddings(self, params, input_ids, attention_mask):
    feats = input_ids.astype(jnp.float32)
    return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)

  def temperature(self, params):
    return jnp.asarray(10.0)


def _cross_entropy(logits):
  shifted = logits - logits.max(1, keepdims=True)
  return float(-np.mean(np.diag(shifted) - np.log(np.exp(shifted).sum(1))))


def test_mmcoa_adds_the_two_directions_cross_entropies_as_its_reference(monkeypatch):
  # MMCoA.py: λ_t·(CE(x, t') + CE(t', x)) + λ_i·(CE(x', t) + CE(t, x')), each CE a mean over the batch:
  # the sum of the two directions, where clip_loss takes their mean.
  rng = np.random.default_rng(0)
  images, adv_images = (jnp.asarray(rng.normal(size=(3, 1, 1, 4)), jnp.float32) for _ in range(2))
  ids, adv_ids = (jnp.asarray(rng.integers(1, 9, size=(3, 4)), jnp.int32) for _ in range(2))
  adversarial = {"images": adv_images, "input_ids": adv_ids, "attention_mask": jnp.ones((3, 4), jnp.int32),
                 "text_changed": jnp.asarray(1.0)}
  monkeypatch.setattr(base, "attack_batch", lambda *args: (None, adversarial))
  batch = {"images": images, "input_ids": ids, "attention_mask": jnp.ones((3, 4), jnp.int32)}
  loss, metrics = MMCoA(text_weight=0.3, image_weight=0.7).loss(_UnitFeatures(), None, batch, jax.random.key(0))

  def unit(x):
    x = np.asarray(x, np.float64).reshape(3, -1)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  def clip_loss(image, text):  # the reference's CLIPLoss: both directions summed
    logits = 10.0 * unit(image) @ unit(text).T
    return _cross_entropy(logits) + _cross_entropy(logits.T)

  text_term, image_term = clip_loss(images, adv_ids), clip_loss(adv_images, ids)
  np.testing.assert_allclose(float(metrics["adv_text_loss"]), text_term, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["adv_image_loss"]), image_term, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 0.3 * text_term + 0.7 * image_term, rtol=1e-5)


def test_tecoa_trains_both_directions_or_image_to_text_only_as_its_reference(monkeypatch):
  # TeCoA's finetuning.py: criterion(logits_per_image, target), the image->text CE of the adversarial images
  # against the clean captions; symmetric (the default) averages it with the text->image CE.
  rng = np.random.default_rng(1)
  images, adv_images = (jnp.asarray(rng.normal(size=(3, 1, 1, 4)), jnp.float32) for _ in range(2))
  ids = jnp.asarray(rng.integers(1, 9, size=(3, 4)), jnp.int32)
  monkeypatch.setattr(base, "attack_batch", lambda *args: (None, {"images": adv_images}))
  batch = {"images": images, "input_ids": ids, "attention_mask": jnp.ones((3, 4), jnp.int32)}
  unit = [np.asarray(x, np.float64).reshape(3, -1) for x in (adv_images, ids)]
  logits = 10.0 * np.einsum("id,td->it", *[u / np.linalg.norm(u, axis=-1, keepdims=True) for u in unit])
  image_to_text, text_to_image = _cross_entropy(logits), _cross_entropy(logits.T)
  symmetric, _ = TeCoA().loss(_UnitFeatures(), None, batch, jax.random.key(0))
  reference, _ = TeCoA(symmetric=False).loss(_UnitFeatures(), None, batch, jax.random.key(0))
  np.testing.assert_allclose(float(symmetric), 0.5 * (image_to_text + text_to_image), rtol=1e-5)
  np.testing.assert_allclose(float(reference), image_to_text, rtol=1e-5)


class _MeanColourText(_MeanColour):
  """_MeanColour with text features: caption -> its token ids as a vector (params do not touch them)."""

  def text_features(self, params, input_ids, attention_mask):
    return input_ids.astype(jnp.float32)


def test_fare_pulls_adversarial_features_to_the_frozen_reference_not_to_the_trained_model(monkeypatch):
  # FARE: ‖f_θ(x') − f_orig(x)‖², f_orig the frozen `reference`. Were the target taken from the trained
  # params, the anchor to the original model would be gone (and the clean distance would be 0 here).
  images = jnp.stack([jnp.full((2, 2, 3), 0.5), jnp.full((2, 2, 3), 0.2)])
  adv_images = images + jnp.array([0.03, -0.03, 0.01])
  monkeypatch.setattr(base, "attack_batch", lambda *args: (None, {"images": adv_images}))
  params, reference = jnp.asarray(2.0), jnp.asarray(1.0)  # f_θ = 2·mean colour, f_orig = 1·mean colour
  loss, metrics = FARE().loss(_MeanColour(), params, {"images": images}, jax.random.key(0), reference)
  colour, adv_colour = np.array([[0.5] * 3, [0.2] * 3]), np.array([[0.53, 0.47, 0.51], [0.23, 0.17, 0.21]])
  expected_adv = np.mean(np.sum((2.0 * adv_colour - colour) ** 2, -1))
  expected_clean = np.mean(np.sum((2.0 * colour - colour) ** 2, -1))
  np.testing.assert_allclose(float(loss), expected_adv, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["adv_distance"]), expected_adv, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["clean_distance"]), expected_clean, rtol=1e-5)


def test_mava_outer_loss_weighs_cms_vsse_and_sca_as_equation_6(monkeypatch):
  # outer = a·CMS + b·VSSE + c·SCA (eqs. 2-4, 6), each term a batch mean, F from params and F_org from the
  # reference. beta = 0: the neighbours coincide with the adversarial image, so every term is exact.
  images = jnp.stack([jnp.full((2, 2, 3), 0.5), jnp.full((2, 2, 3), 0.2)])
  adv_images = images + jnp.array([0.03, -0.03, 0.01])
  ids = jnp.array([[[1, 0, 0], [1, 1, 0]], [[0, 0, 2], [0, 1, 1]]], jnp.int32)  # M = 2 captions per image
  monkeypatch.setattr(base, "attack_batch", lambda *args: (None, {"images": adv_images}))
  batch = {"images": images, "input_ids": ids, "attention_mask": jnp.ones_like(ids)}
  objective = MAVA(a=0.2, b=0.3, c=0.5, beta=0.0)
  loss, metrics = objective.loss(_MeanColourText(), jnp.asarray(2.0), batch, jax.random.key(0), jnp.asarray(1.0))
  colour, adv_colour = np.array([[0.5] * 3, [0.2] * 3]), np.array([[0.53, 0.47, 0.51], [0.23, 0.17, 0.21]])
  original, adv_feats, clean_feats = colour, 2.0 * adv_colour, 2.0 * colour
  vsse = np.mean(np.sum((adv_feats - original) ** 2, -1))
  captions = np.asarray(ids, np.float64) / np.linalg.norm(np.asarray(ids, np.float64), axis=-1, keepdims=True)
  unit = adv_feats / np.linalg.norm(adv_feats, axis=-1, keepdims=True)
  cms = np.mean(1 - np.einsum("bd,bkd->bk", unit, captions).mean(-1))
  sca = np.mean(0.5 * np.sum((clean_feats - original) ** 2, -1))
  for name, value in (("cms", cms), ("vsse", vsse), ("sca", sca)):
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(float(loss), 0.2 * cms + 0.3 * vsse + 0.5 * sca, rtol=1e-5)


def _symmetric_ce(image, text):
  """CLIP's loss of 1:1 pairs (row i of image with row i of text), temperature 10, by hand."""
  def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = 10.0 * unit(image) @ unit(text).T
  return 0.5 * (_cross_entropy(logits) + _cross_entropy(logits.T))


def _mat_batches(rng, captions):
  """A clean and an adversarial batch for _UnitFeatures: 3 images, `captions` captions each (0: (B, L))."""
  shape = (3, 4) if captions == 0 else (3, captions, 4)
  batches = []
  for _ in range(2):
    images = jnp.asarray(rng.normal(size=(3, 1, 1, 4)), jnp.float32)
    ids = jnp.asarray(rng.integers(1, 9, size=shape), jnp.int32)
    batches.append({"images": images, "input_ids": ids, "attention_mask": jnp.ones(shape, jnp.int32),
                    "text_changed": jnp.asarray(1.0)})
  return batches


def test_mat_adds_clean_weight_times_the_clean_pairs_loss(monkeypatch):
  # MAT's outer loss: CLIP loss on the adversarial pairs (x', t') + clean_weight · CLIP loss on (x, t).
  clean, adversarial = _mat_batches(np.random.default_rng(2), 0)
  monkeypatch.setattr(base, "attack_batch", lambda *args: (None, adversarial))
  adv_term = _symmetric_ce(adversarial["images"].reshape(3, -1), adversarial["input_ids"])
  clean_term = _symmetric_ce(clean["images"].reshape(3, -1), clean["input_ids"])
  loss, metrics = MAT(clean_weight=0.5).loss(_UnitFeatures(), None, clean, jax.random.key(0))
  np.testing.assert_allclose(float(metrics["clean_loss"]), clean_term, rtol=1e-5)
  np.testing.assert_allclose(float(loss), adv_term + 0.5 * clean_term, rtol=1e-5)
  unweighted, _ = MAT().loss(_UnitFeatures(), None, clean, jax.random.key(0))
  np.testing.assert_allclose(float(unweighted), adv_term, rtol=1e-5)


def test_mat_one_to_one_models_each_caption_as_its_own_pair(monkeypatch):
  # The study's matplus_1to1 arm: with K = 2 captions per image, one_to_one makes each (image, caption k)
  # a pair of its own (the image repeated K times, its other caption a negative) in both the adversarial
  # and the clean term; ignoring it would train the 1:N arm, whose loss differs.
  clean, adversarial = _mat_batches(np.random.default_rng(3), 2)
  monkeypatch.setattr(base, "attack_batch", lambda *args: (None, adversarial))

  def pairs(batch):  # the 1:1 pairs: images repeated K times against the flattened captions
    images = np.repeat(np.asarray(batch["images"]).reshape(3, -1), 2, axis=0)
    return images, np.asarray(batch["input_ids"]).reshape(6, -1)

  def clip_terms(batch, one_to_one):  # clip_loss on the objective's inputs, adversarial or clean
    encoder = _UnitFeatures()
    image = encoder.image_embeddings(None, batch["images"])
    text = encoder.text_embeddings(None, batch["input_ids"], None)
    return float(clip_loss(image, text, jnp.asarray(10.0), one_to_one=one_to_one)[0])

  one_to_one, _ = MAT(clean_weight=0.5, one_to_one=True).loss(_UnitFeatures(), None, clean, jax.random.key(0))
  one_to_n, _ = MAT(clean_weight=0.5).loss(_UnitFeatures(), None, clean, jax.random.key(0))
  expected = _symmetric_ce(*pairs(adversarial)) + 0.5 * _symmetric_ce(*pairs(clean))
  np.testing.assert_allclose(float(one_to_one), expected, rtol=1e-5)
  np.testing.assert_allclose(float(one_to_one), clip_terms(adversarial, True) + 0.5 * clip_terms(clean, True),
                             rtol=1e-5)
  np.testing.assert_allclose(float(one_to_n), clip_terms(adversarial, False) + 0.5 * clip_terms(clean, False),
                             rtol=1e-5)
  assert abs(float(one_to_one) - float(one_to_n)) > 1e-2
