"""Objective formulas on hand-checkable inputs (no model: a stand-in encoder with linear features)."""

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax.attacks import losses
from mat_jax.objectives import base


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
