"""MMCoA (Zhou et al., 2024): multimodal contrastive adversarial training.

L = λ_t · CLIPLoss(x, t') + λ_i · CLIPLoss(x', t): the clean images aligned with adversarial texts and
the adversarial images with the clean texts. x' by PGD on the contrastive cross-entropy against the
clean texts; t' by the BERT-Attack greedy substitution (`text_changes` words) minimising each caption's
similarity to its clean image (the text attack the VLP references run for retrieval). The two attacks
are independent (unlike MAT, the image attack does not see t'). The reference trains all parameters
(Adam lr 1e-6, wd 0.2), λ_t = λ_i = 0.5.
"""

from __future__ import annotations

import dataclasses

from mat_jax.objectives import base
from mat_jax.objectives.contrastive import batch_clip_loss, temperature
from mat_jax.objectives.mat import adversarial_texts, guided_pgd


@dataclasses.dataclass(frozen=True)
class MMCoA(base.Objective):
  name = "mmcoa"
  needs_text_candidates = True

  eps: float = 1 / 255
  steps: int = 2
  step_size: float = 1 / 255
  text_changes: int = 1
  text_weight: float = 0.5    # λ_t
  image_weight: float = 0.5   # λ_i
  candidate_meta: object = base.internal()

  def loss(self, encoder, params, batch, key, reference=None):
    del reference
    attack_params = base.frozen(params)
    images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    image_ids = batch.get("image_ids")
    clean_images = encoder.image_features(attack_params, images)
    adv_ids, adv_mask, changed = adversarial_texts(encoder, attack_params, batch, self.candidate_meta,
                                                   clean_images, self.text_changes)
    clean_text = encoder.text_features(attack_params, ids, mask)
    adv_images = guided_pgd(encoder, attack_params, images, clean_text, image_ids, key, eps=self.eps,
                            step_size=self.step_size, steps=self.steps)
    text_loss, text_metrics = batch_clip_loss(encoder, params, images, adv_ids, adv_mask, image_ids)
    image_loss, image_metrics = batch_clip_loss(encoder, params, adv_images, ids, mask, image_ids)
    loss = self.text_weight * text_loss + self.image_weight * image_loss
    return loss, {"adv_text_loss": text_loss, "adv_image_loss": image_loss,
                  "adv_text_i2t_acc": text_metrics["i2t_acc"], "adv_image_i2t_acc": image_metrics["i2t_acc"],
                  "text_changed": changed, "temperature": temperature(encoder.logit_scale(params))}
