"""FARE (Schlarmann et al., ICML 2024): unsupervised adversarial fine-tuning of the vision tower.

Inner and outer loss ‖f_θ(x') − f_orig(x)‖² on unnormalised image features, f_orig the frozen original
model (`reference`): the attack pushes the fine-tuned features of x' away from the original clean
features, training pulls them back. No text is used; the published recipe trains the vision tower only
(train.towers=vision), ε 2 or 4/255, 10 steps of 1/255, AdamW lr 1e-5, wd 1e-4.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mat_jax.attacks import losses as attack_losses
from mat_jax.attacks.image import pgd
from mat_jax.objectives import base


@dataclasses.dataclass(frozen=True)
class FARE(base.Objective):
  name = "fare"
  needs_reference = True
  default_towers = "vision"

  eps: float = 2 / 255
  steps: int = 10
  step_size: float = 1 / 255

  def loss(self, encoder, params, batch, key, reference=None):
    if reference is None:
      raise ValueError("FARE needs the frozen original parameters (reference)")
    images = batch["images"]
    target = encoder.image_features(base.frozen(reference), images)
    loss_fn = attack_losses.feature_distance(encoder, base.frozen(params), target)
    adv_images = pgd(loss_fn, images, key, eps=self.eps, step_size=self.step_size, steps=self.steps)
    distance = jnp.sum(jnp.square(encoder.image_features(params, adv_images) - target), axis=-1)
    loss = jnp.mean(distance)
    clean = jnp.mean(jnp.sum(jnp.square(encoder.image_features(base.frozen(params), images) - target), -1))
    return loss, {"adv_distance": loss, "clean_distance": clean}
