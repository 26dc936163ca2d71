"""MMCoA (Zhou et al., 2024): multimodal contrastive adversarial training.

L = λ_t · CLIPLoss(x, t') + λ_i · CLIPLoss(x', t): the clean images aligned with adversarial texts and
the adversarial images with the clean texts, where CLIPLoss is the *sum* of the image->text and
text->image cross-entropies, as the reference (MMCoA.py) adds them: twice the mean `clip_loss` returns.
The scale matters with the reference's optimizer, Adam whose weight decay is an L2 term added to the
gradient: half the loss would double the decay's relative weight. x' by PGD on the contrastive
cross-entropy against the clean texts; t' by BERT-Attack with Co-Attack's scoring (the reference builds
its text attacker as `BertAttack` with the "kl" objective: each word and substitute chosen by how far it
moves the caption's embedding from the clean caption's, no image involved), `text_changes` words. The
two attacks are independent (unlike MAT, whose image attack sees t' and whose text attack is guided by
the image): the registry's "mmcoa". The reference's PGD takes 10 steps of 1/255 within ε = 1/255
(`num_iters`, `step_size`, `epsilon` of its configs/Ad_cifar100_PGD.yaml); it trains all parameters
(Adam lr 1e-6, wd 0.2), λ_t = λ_i = 0.5.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mat_jax.attacks import spec as attack_specs
from mat_jax.objectives import base
from mat_jax.objectives.contrastive import batch_clip_loss


# The published inner attack: the registry's spec is the one place of its budget, the fields' defaults below.
PUBLISHED = attack_specs.get("mmcoa")


@dataclasses.dataclass(frozen=True)
class MMCoA(base.Objective):
  name = "mmcoa"
  reads_adversarial_text = True
  needs_negatives = True

  attack: str = PUBLISHED.name  # the inner attack (mat_jax.attacks.spec.ATTACKS)
  eps: float = PUBLISHED.eps
  steps: int = PUBLISHED.steps
  step_size: float = PUBLISHED.step_size
  text_changes: int = PUBLISHED.max_changes
  text_weight: float = 0.5    # λ_t
  image_weight: float = 0.5   # λ_i
  candidate_meta: object = base.internal()

  def inner_attack(self):
    return base.inner_attack(self.attack, eps=self.eps, steps=self.steps, step_size=self.step_size,
                             max_changes=self.text_changes)

  def outer_loss(self, encoder, params, batch, adv, key, reference=None):
    del key, reference
    images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    image_ids = batch.get("image_ids")
    text_loss, text_metrics = batch_clip_loss(encoder, params, images, adv["input_ids"], adv["attention_mask"],
                                              image_ids)
    image_loss, image_metrics = batch_clip_loss(encoder, params, adv["images"], ids, mask, image_ids)
    # clip_loss is the mean of the two directions; the reference's CLIPLoss is their sum.
    text_loss, image_loss = 2 * text_loss, 2 * image_loss
    loss = self.text_weight * text_loss + self.image_weight * image_loss
    return loss, {"adv_text_loss": text_loss, "adv_image_loss": image_loss,
                  "adv_text_i2t_acc": text_metrics["i2t_acc"], "adv_image_i2t_acc": image_metrics["i2t_acc"],
                  "text_changed": jnp.mean(adv["text_changed"]), "temperature": encoder.temperature(params)}
