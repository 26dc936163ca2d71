"""TeCoA (Mao et al., ICLR 2023) for retrieval: adversarial images against clean text.

Inner: PGD maximising each image's contrastive cross-entropy against the batch's clean captions (its
own captions positive). Outer: the symmetric contrastive loss of the adversarial images with the clean
captions. The reference fine-tunes the image encoder (train.towers=vision); "TeCoA-ITR" in the MAT paper
fine-tunes all parameters with this cross-modal objective (train.towers=all).
"""

from __future__ import annotations

import dataclasses

from mat_jax.objectives import base
from mat_jax.objectives.contrastive import batch_clip_loss, temperature
from mat_jax.objectives.mat import guided_pgd


@dataclasses.dataclass(frozen=True)
class TeCoA(base.Objective):
  name = "tecoa"
  default_towers = "vision"

  eps: float = 1 / 255
  steps: int = 2
  step_size: float = 1 / 255

  def loss(self, encoder, params, batch, key, reference=None):
    del reference
    attack_params = base.frozen(params)
    images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    image_ids = batch.get("image_ids")
    clean_text = encoder.text_features(attack_params, ids, mask)
    adv_images = guided_pgd(encoder, attack_params, images, clean_text, image_ids, key, eps=self.eps,
                            step_size=self.step_size, steps=self.steps)
    loss, metrics = batch_clip_loss(encoder, params, adv_images, ids, mask, image_ids)
    metrics = {f"adv_{k}": v for k, v in metrics.items()}
    metrics["temperature"] = temperature(encoder.logit_scale(params))
    return loss, metrics
