"""MAT and MAT+ (Waseda et al., WACV 2026): multimodal adversarial training.

Every step makes multimodal adversarial examples, text first, then the image:
1. the text attack (BERT-Attack's greedy word substitution, `mat_jax.attacks.text.text_attack`) changes
   `text_changes` word(s) of each caption to minimise its cosine similarity to its clean image;
2. image PGD (`mat_jax.attacks.image.pgd`, L∞, `steps` steps of `step_size` within `eps`) maximises the
   contrastive cross-entropy of each image against the batch's ADVERSARIAL captions (its own captions as
   positives), so the image perturbation is guided by the adversarial text;
3. the outer loss is the symmetric contrastive loss on the adversarial pairs (x', t'), plus
   `clean_weight` times the clean pairs' loss.

Steps 1-2 are the registry's "mat" attack (`mat_jax.attacks.spec`), which evaluation runs too; `attack`
names another (e.g. "sga") to train against it. `guided=False` is the ablation of step 2's guidance: the
same two attacks run independently (the image PGD against the clean captions, as Sep-Attack and MMCoA),
while the outer loss still pairs the adversarial image with the adversarial caption. Both attacks run on
the parameters as constants (the outer gradient is taken at the adversarial point).
MAT+ is the same objective fed one-to-many data: K captions per image (`data.captions_per_image`) and
cross-modal / intra-modal augmentations chosen in `data.augmentations` (i2t, t2i, hflip, eda,
image_jitter); the contrastive losses then treat every caption of an image (and every image sharing an
id) as positives, never as negatives (1:N), unless `one_to_one` asks for the 1:1 modelling of the same pairs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mat_jax.attacks import spec as attack_specs
from mat_jax.errors import InputError
from mat_jax.objectives import base
from mat_jax.objectives.contrastive import batch_clip_loss


# The published inner attack: the registry's spec is the one place of its budget, the fields' defaults below.
PUBLISHED = attack_specs.get("mat")


@dataclasses.dataclass(frozen=True)
class MAT(base.Objective):
  """Multimodal adversarial training (module docstring)."""
  name = "mat"
  reads_adversarial_text = True
  needs_negatives = True

  attack: str = PUBLISHED.name               # the inner attack (mat_jax.attacks.spec.ATTACKS)
  eps: float = PUBLISHED.eps                 # image budget (L∞, pixel units)
  steps: int = PUBLISHED.steps               # PGD steps in training
  step_size: float = PUBLISHED.step_size
  text_changes: int = PUBLISHED.max_changes  # words the text attack may change per caption
  clean_weight: float = 0.0   # weight of the clean pairs' contrastive loss
  # 1:1 modelling of one-to-many data: each (image, caption) its own pair, an image's other captions
  # negatives (the paper's Fig. 4(b) arm); False: all of an image's captions are positives (1:N). It is
  # the outer loss's modelling: the inner attack makes the same adversarial pairs either way (its PGD
  # ascends the loss with all of an image's captions positive), so the arms differ in training only.
  one_to_one: bool = False
  # False: the image attack is guided by the clean captions instead of the adversarial ones (its text
  # attack unchanged), which separates what the guidance does from what training on the adversarial
  # captions does. Only for an attack whose PGD on a defense's loss follows its text attack (mat).
  guided: bool = True
  candidate_meta: object = base.internal()

  def inner_attack(self):
    spec = base.inner_attack(self.attack, eps=self.eps, steps=self.steps, step_size=self.step_size,
                             max_changes=self.text_changes)
    if self.guided:
      return spec
    if spec.kind != "text_then_image" or spec.loss != "contrastive":
      raise InputError(f"objective.guided=False runs the image attack of objective.attack={self.attack!r} against "
                       "the clean captions, which needs an attack whose contrastive PGD follows its text attack "
                       f"(such as 'mat'); this one is of kind {spec.kind!r} with loss {spec.loss!r}. Set "
                       "objective.attack='mat', or leave objective.guided at true")
    return spec.replace(kind="separate")

  def outer_loss(self, encoder, params, batch, adv, key, reference=None):
    del key, reference
    image_ids = batch.get("image_ids")
    loss, metrics = batch_clip_loss(encoder, params, adv["images"], adv["input_ids"], adv["attention_mask"],
                                    image_ids, self.one_to_one)
    metrics = {f"adv_{k}": v for k, v in metrics.items()}
    if self.clean_weight:
      clean_loss, _ = batch_clip_loss(encoder, params, batch["images"], batch["input_ids"], batch["attention_mask"],
                                      image_ids, self.one_to_one)
      metrics["clean_loss"] = clean_loss
      loss = loss + self.clean_weight * clean_loss
    metrics["text_changed"] = jnp.mean(adv["text_changed"])
    metrics["temperature"] = encoder.temperature(params)
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class MATPlus(MAT):
  """MAT+ : MAT on one-to-many data (K captions per image, cross-modal augmentations; see mat.py)."""
  name = "matplus"
