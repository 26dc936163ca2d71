"""MAVA (Wang et al.): multi-granularity aligned visual adversarial fine-tuning (seed paper 004, eqs. 2-7).

F = image features (unnormalised) of the model being trained, F_org those of the frozen original model
(`reference`), t_1..t_M an image's captions (M = data.captions_per_image), r_j ~ U(−βε, βε) per pixel,
N = `neighbours` samples around the adversarial image v':

    VSSE = 1/N Σ_j ‖F(v' + r_j) − F_org(v)‖²                       (eq. 2)
    CMS  = 1 − 1/M Σ_i cos(F(t_i), 1/N Σ_j F(v' + r_j))            (eq. 3, as a loss)
    SCA  = ½ ‖F(v) − F_org(v)‖²                                     (eq. 4)
    inner = CMS + VSSE (maximised by PGD over v')                   (eq. 5)
    outer = a·CMS + b·VSSE + c·SCA                                  (eq. 6)

Eq. 3 is printed as the cosine similarity itself, which the outer minimisation would push down; the
text (appendix B.3.3: "maximizing cosine similarity ... preserves semantic alignment") makes clear it
is an alignment term, so here CMS is the dissimilarity 1 − cos: the attack lowers the alignment, the
defence restores it. The neighbours are clipped to [0, 1] like any image. The paper does not give β;
the default 0.5 keeps the neighbours inside half the attack budget. Vision tower only (text frozen),
a, b, c = 0.002, 0.4, 0.6, N = 3, 10 PGD steps. The inner attack is the registry's "mava"
(`mat_jax.attacks.losses.mava`); another `attack` changes how v' is made, the outer loss stays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mat_jax.attacks import spec as attack_specs
from mat_jax.attacks.losses import mava_terms
from mat_jax.models.clip import l2_normalize
from mat_jax.objectives import base


# The published inner attack: the registry's spec is the one place of its budget, the fields' defaults below.
PUBLISHED = attack_specs.get("mava")


@dataclasses.dataclass(frozen=True)
class MAVA(base.Objective):
  name = "mava"
  needs_reference = True
  default_towers = "vision"

  attack: str = PUBLISHED.name  # the inner attack (mat_jax.attacks.spec.ATTACKS)
  eps: float = PUBLISHED.eps
  steps: int = PUBLISHED.steps
  step_size: float = PUBLISHED.step_size
  neighbours: int = PUBLISHED.neighbours  # N
  beta: float = PUBLISHED.beta  # neighbours drawn in U(−βε, βε)
  a: float = 0.002            # CMS weight (outer)
  b: float = 0.4              # VSSE weight
  c: float = 0.6              # SCA weight
  candidate_meta: object = base.internal()

  def inner_attack(self):
    return base.inner_attack(self.attack, eps=self.eps, steps=self.steps, step_size=self.step_size,
                             neighbours=self.neighbours, beta=self.beta)

  # The step's key: its first half draws the attack's numbers, its second the outer loss's neighbours.
  def adversarial(self, encoder, params, batch, key, reference=None, text=None):
    if reference is None:
      raise ValueError("MAVA needs the frozen original parameters (reference)")
    adv = super().adversarial(encoder, params, batch, jax.random.split(key)[0], reference, text)
    # The original model's clean features, which the attack's program computes anyway (XLA shares them),
    # passed on to the outer loss rather than computed again there.
    return dict(adv, reference_features=encoder.image_features(base.frozen(reference), batch["images"]))

  def outer_loss(self, encoder, params, batch, adv, key, reference=None):
    del reference
    images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    clean_original = adv["reference_features"]
    # The outer loss's caption features from `params`: with the published vision-only training the text
    # tower is frozen and they are constants; with train.towers=all CMS trains the text tower too.
    captions = l2_normalize(encoder.text_features(params, ids, mask))
    if captions.ndim == 2:
      captions = captions[:, None, :]
    outer_key = jax.random.split(key)[1]
    cms, vsse = mava_terms(encoder, params, adv["images"], outer_key, clean_original, captions,
                           neighbours=self.neighbours, radius=self.beta * self.eps)
    sca = 0.5 * jnp.sum(jnp.square(encoder.image_features(params, images) - clean_original), axis=-1)
    cms, vsse, sca = jnp.mean(cms), jnp.mean(vsse), jnp.mean(sca)
    loss = self.a * cms + self.b * vsse + self.c * sca
    return loss, {"cms": cms, "vsse": vsse, "sca": sca}
