"""TeCoA (Mao et al., ICLR 2023) for retrieval: adversarial images against clean text.

Inner: PGD maximising each image's contrastive cross-entropy against the batch's clean captions (its
own captions positive; the registry's "tecoa" attack). Outer: the symmetric contrastive loss of the
adversarial images with the clean captions (both retrieval directions, as every contrastive objective
here); `symmetric=False` keeps the image->text cross-entropy only, as TeCoA's finetuning.py trains (and,
with one caption per image, as the inner attack ascends; with several, the attack's cross-entropy is of the
image's caption set, `attacks.losses.multi_positive_ce`). The reference fine-tunes the image encoder
(train.towers=vision); "TeCoA-ITR" in the MAT paper fine-tunes all parameters with this cross-modal
objective (train.towers=all). Another `attack` changes how x' is made; the outer loss stays (x', t).
"""

from __future__ import annotations

import dataclasses

from mat_jax.attacks import spec as attack_specs
from mat_jax.objectives import base
from mat_jax.objectives.contrastive import batch_clip_loss


# The published inner attack: the registry's spec is the one place of its budget, the fields' defaults below.
PUBLISHED = attack_specs.get("tecoa")


@dataclasses.dataclass(frozen=True)
class TeCoA(base.Objective):
  name = "tecoa"
  default_towers = "vision"
  needs_negatives = True

  attack: str = PUBLISHED.name  # the inner attack (mat_jax.attacks.spec.ATTACKS)
  eps: float = PUBLISHED.eps
  steps: int = PUBLISHED.steps
  step_size: float = PUBLISHED.step_size
  symmetric: bool = True      # False: the outer loss is the image->text cross-entropy only (TeCoA's code)
  candidate_meta: object = base.internal()

  def inner_attack(self):
    return base.inner_attack(self.attack, eps=self.eps, steps=self.steps, step_size=self.step_size)

  def outer_loss(self, encoder, params, batch, adv, key, reference=None):
    del key, reference
    loss, metrics = batch_clip_loss(encoder, params, adv["images"], batch["input_ids"], batch["attention_mask"],
                                    batch.get("image_ids"))
    if not self.symmetric:
      loss = metrics["i2t_loss"]
    metrics = {f"adv_{k}": v for k, v in metrics.items()}
    metrics["temperature"] = encoder.temperature(params)
    return loss, metrics
