"""Objective formulas on hand-checkable inputs (no model: a stand-in encoder with linear features)."""

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax.attacks import losses
from mat_jax.objectives import base
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
