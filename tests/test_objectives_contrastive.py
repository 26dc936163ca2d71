"""The symmetric InfoNCE, with one and with several positives per image (hand-computed cases)."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mat_jax import models

from mat_jax.objectives.contrastive import clip_loss, contrastive_loss


def _normalise(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _nll(positive, negatives):
  return -positive + math.log(math.exp(positive) + sum(math.exp(n) for n in negatives))


def test_one_caption_per_image_is_clips_cross_entropy():
  rng = np.random.default_rng(0)
  img, txt = _normalise(rng.normal(size=(5, 8))), _normalise(rng.normal(size=(5, 8)))
  loss, metrics = clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(10.0))
  logits = 10.0 * img @ txt.T
  labels = np.arange(5)
  expected = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  assert set(metrics) >= {"i2t_loss", "t2i_loss", "i2t_acc", "t2i_acc"}


def test_multi_positive_hand_computed():
  # Two images, two captions each; temperature 1 so the logits are the cosines.
  img = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  txt = np.array([[[1.0, 0.0], [0.6, 0.8]],     # captions of image 0
                  [[0.0, 1.0], [0.8, 0.6]]], np.float32)  # captions of image 1
  loss, metrics = clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(1.0))
  # logits rows: image 0 -> [1, .6, 0, .8], image 1 -> [0, .8, 1, .6]. Each positive competes with
  # the other image's captions only (never with its own image's other caption).
  i2t = [_nll(1.0, [0.0, 0.8]), _nll(0.6, [0.0, 0.8]),   # image 0 with t0, t1; negatives t2, t3
         _nll(1.0, [0.0, 0.8]), _nll(0.6, [0.0, 0.8])]   # image 1 with t2, t3; negatives t0, t1
  # Text -> image: each caption against the one other image.
  t2i = [_nll(1.0, [0.0]), _nll(0.6, [0.8]), _nll(1.0, [0.0]), _nll(0.6, [0.8])]
  expected = 0.5 * (np.mean(i2t) + np.mean(t2i))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["i2t_loss"]), np.mean(i2t), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["t2i_loss"]), np.mean(t2i), rtol=1e-6)
  # The loss that wrongly treats an image's other caption as a negative is different.
  naive = np.mean([_nll(1.0, [0.6, 0.0, 0.8]), _nll(0.6, [1.0, 0.0, 0.8])])
  assert abs(np.mean(i2t) - naive) > 0.1


def test_shared_image_ids_are_positives():
  rng = np.random.default_rng(1)
  img = _normalise(rng.normal(size=(3, 4)))
  img[2] = img[0]
  txt = _normalise(rng.normal(size=(3, 4)))
  ids = jnp.asarray([7, 8, 7])
  loss, _ = clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(1.0), ids)
  # Same as the group formulation written out: images 0 and 2 both own texts 0 and 2.
  groups_loss, _ = contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(1.0),
                                    jnp.asarray([0, 1, 0]), jnp.asarray([0, 1, 0]))
  np.testing.assert_allclose(float(loss), float(groups_loss), rtol=1e-6)
  distinct, _ = clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(1.0))
  assert abs(float(loss) - float(distinct)) > 1e-3


@pytest.mark.parametrize("family, log_scale, multiplier", [
    ("clip", math.log(20.0), 20.0), ("clip", 10.0, 100.0), ("clip", -3.0, math.exp(-3.0)),
    # BLIP clamps temp to [0.001, 0.5]: multipliers from 2 to 1000.
    ("blip", math.log(500.0), 500.0), ("blip", 10.0, 1000.0), ("blip", 0.1, 2.0)])
def test_temperature_is_clamped_as_the_model_trains_it(family, log_scale, multiplier):
  model = (models.CLIP(models.clip_config("tiny"), rngs=nnx.Rngs(0)) if family == "clip"
           else models.BLIP(models.blip_config("blip-tiny"), rngs=nnx.Rngs(0)))
  model.logit_scale[...] = log_scale
  encoder, params = models.split(model)
  np.testing.assert_allclose(float(encoder.temperature(params)), multiplier, rtol=1e-6)
  assert float(encoder.logit_scale(params)) == pytest.approx(log_scale)  # stored as trained
