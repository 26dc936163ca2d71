"""MAT and MAT+ (Waseda et al., WACV 2026): multimodal adversarial training.

Every step makes multimodal adversarial examples, text first, then the image:
1. the text attack (BERT-Attack's greedy word substitution, `mat_jax.attacks.text.text_attack`) changes
   `text_changes` word(s) of each caption to minimise its cosine similarity to its clean image;
2. image PGD (`mat_jax.attacks.image.pgd`, L∞, `steps` steps of `step_size` within `eps`) maximises the
   contrastive cross-entropy of each image against the batch's ADVERSARIAL captions (its own captions as
   positives), so the image perturbation is guided by the adversarial text;
3. the outer loss is the symmetric contrastive loss on the adversarial pairs (x', t'), plus
   `clean_weight` times the clean pairs' loss.

Both attacks run on the parameters as constants (the outer gradient is taken at the adversarial point).
MAT+ is the same objective fed one-to-many data: K captions per image (`data.captions_per_image`) and
cross-modal / intra-modal augmentations chosen in `data.augmentations` (i2t, t2i, hflip, eda,
image_jitter); the contrastive losses then treat every caption of an image (and every image sharing an
id) as positives, never as negatives (1:N), unless `one_to_one` asks for the 1:1 modelling of the same pairs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mat_jax.attacks import losses as attack_losses
from mat_jax.attacks.candidates import candidates_from_batch
from mat_jax.attacks.image import pgd
from mat_jax.attacks.text import text_attack
from mat_jax.objectives import base
from mat_jax.objectives.contrastive import batch_clip_loss, temperature


def adversarial_texts(encoder, attack_params, batch, meta, guide_features, max_changes: int):
  """Text attack on the batch's captions guided by one image feature per image (B, D).

  Returns adversarial (ids, mask) shaped like the batch's and the fraction of captions changed.
  """
  ids = batch["input_ids"]
  k = base.texts_per_image(ids)
  guide = jnp.repeat(guide_features, k, axis=0)  # one row per flattened caption
  result = text_attack(encoder, attack_params, candidates_from_batch(batch, meta), guide,
                       objective="image", max_changes=max_changes)
  changed = jnp.mean((result.changed_words[:, 0] >= 0).astype(jnp.float32))
  return result.input_ids.reshape(ids.shape), result.attention_mask.reshape(ids.shape), changed


def guided_pgd(encoder, attack_params, images, text_features, image_ids, key, *, eps, step_size, steps):
  """PGD on each image's contrastive cross-entropy against the given (adversarial) texts."""
  batch = images.shape[0]
  k = text_features.shape[1] if text_features.ndim == 3 else 1
  flat = text_features.reshape(batch * k, -1)
  loss_fn = attack_losses.contrastive(
      encoder, attack_params, flat, base.positives(image_ids, batch, k),
      logit_scale=temperature(encoder.logit_scale(attack_params)))
  return pgd(loss_fn, images, key, eps=eps, step_size=step_size, steps=steps)


@dataclasses.dataclass(frozen=True)
class MAT(base.Objective):
  """Multimodal adversarial training (module docstring)."""
  name = "mat"
  needs_text_candidates = True

  eps: float = 2 / 255        # image budget (L∞, pixel units)
  steps: int = 2              # PGD steps in training
  step_size: float = 1 / 255
  text_changes: int = 1       # words the text attack may change per caption
  clean_weight: float = 0.0   # weight of the clean pairs' contrastive loss
  # 1:1 modelling of one-to-many data: each (image, caption) its own pair, an image's other captions
  # negatives (the paper's Fig. 4(b) arm); False: all of an image's captions are positives (1:N).
  one_to_one: bool = False
  candidate_meta: object = base.internal()

  def loss(self, encoder, params, batch, key, reference=None):
    del reference
    attack_params = base.frozen(params)
    images, image_ids = batch["images"], batch.get("image_ids")
    clean_images = encoder.image_features(attack_params, images)
    adv_ids, adv_mask, changed = adversarial_texts(encoder, attack_params, batch, self.candidate_meta,
                                                   clean_images, self.text_changes)
    adv_text = encoder.text_features(attack_params, adv_ids, adv_mask)
    adv_images = guided_pgd(encoder, attack_params, images, adv_text, image_ids, key, eps=self.eps,
                            step_size=self.step_size, steps=self.steps)
    loss, metrics = batch_clip_loss(encoder, params, adv_images, adv_ids, adv_mask, image_ids, self.one_to_one)
    metrics = {f"adv_{k}": v for k, v in metrics.items()}
    if self.clean_weight:
      clean_loss, _ = batch_clip_loss(encoder, params, images, batch["input_ids"], batch["attention_mask"],
                                      image_ids, self.one_to_one)
      metrics["clean_loss"] = clean_loss
      loss = loss + self.clean_weight * clean_loss
    metrics["text_changed"] = changed
    metrics["temperature"] = temperature(encoder.logit_scale(params))
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class MATPlus(MAT):
  """MAT+ : MAT on one-to-many data (K captions per image, cross-modal augmentations; see mat.py)."""
  name = "matplus"
