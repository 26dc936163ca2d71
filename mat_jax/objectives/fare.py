"""FARE (Schlarmann et al., ICML 2024): unsupervised adversarial fine-tuning of the vision tower.

Inner and outer loss ‖f_θ(x') − f_orig(x)‖² on unnormalised image features, f_orig the frozen original
model (`reference`): the attack (the registry's "fare") pushes the fine-tuned features of x' away from
the original clean features, training pulls them back. No text is used; the published recipe trains
the vision tower only (train.towers=vision), ε 2 or 4/255, 10 steps of 1/255, AdamW lr 1e-5, wd 1e-4.
Another `attack` changes how x' is made; the outer loss uses x' only.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mat_jax.attacks import spec as attack_specs
from mat_jax.objectives import base


# The published inner attack: the registry's spec is the one place of its budget, the fields' defaults below.
PUBLISHED = attack_specs.get("fare")


@dataclasses.dataclass(frozen=True)
class FARE(base.Objective):
  name = "fare"
  needs_reference = True
  default_towers = "vision"

  attack: str = PUBLISHED.name  # the inner attack (mat_jax.attacks.spec.ATTACKS)
  eps: float = PUBLISHED.eps
  steps: int = PUBLISHED.steps
  step_size: float = PUBLISHED.step_size
  candidate_meta: object = base.internal()

  def inner_attack(self):
    return base.inner_attack(self.attack, eps=self.eps, steps=self.steps, step_size=self.step_size)

  def adversarial(self, encoder, params, batch, key, reference=None, text=None):
    if reference is None:
      raise ValueError("FARE needs the frozen original parameters (reference)")
    adv = super().adversarial(encoder, params, batch, key, reference, text)
    # The attack's anchor and the clean images' features, which its program computes anyway (XLA shares them),
    # passed on to the outer loss rather than computed again there.
    target = encoder.image_features(base.frozen(reference), batch["images"])
    clean = encoder.image_features(base.frozen(params), batch["images"])
    return dict(adv, reference_features=target, clean_distance=jnp.sum(jnp.square(clean - target), axis=-1))

  def outer_loss(self, encoder, params, batch, adv, key, reference=None):
    del batch, key, reference
    distance = jnp.sum(jnp.square(encoder.image_features(params, adv["images"]) - adv["reference_features"]), axis=-1)
    loss = jnp.mean(distance)
    return loss, {"adv_distance": loss, "clean_distance": jnp.mean(adv["clean_distance"])}
