"""Run an `AttackSpec` on a batch: the one entry point that the training objectives and `evaluate()` share.

`run_attack(spec, encoder, params, inputs, key)` routes the spec to the compiled attacks: image PGD and
APGD (`mat_jax.attacks.image`), BERT-Attack (`mat_jax.attacks.text`), Sep-Attack, Co-Attack and SGA
(`mat_jax.attacks.multimodal`), and the PGD of the defenses' losses (contrastive, feature distance,
MAVA) compiled here. It is traceable: the evaluator calls it per batch, a training step inside its own
`jit` (the compiled parts are inlined there). With the same spec, inputs and key, both get the same
adversarial batch.

The batch (`AttackInputs`) is B images with K captions each, image-major, as the evaluator and the
one-to-many training data lay them out; (B, L) captions are K = 1.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from mat_jax import checks, precompile
from mat_jax.attacks import image as image_attacks
from mat_jax.attacks import losses
from mat_jax.attacks import multimodal
from mat_jax.attacks.candidates import TextCandidates
from mat_jax.attacks.spec import AttackSpec
from mat_jax.attacks.text import TextAttackResult, text_attack
from mat_jax.models.clip import check_tokens_for, l2_normalize
from mat_jax.models.dual_encoder import DualEncoder


@dataclasses.dataclass(frozen=True)
class AttackInputs:
  """One batch as an attack sees it (arrays on the device, or traced inside a training step)."""
  images: jax.Array                              # float32 (B, H, W, 3) in [0, 1]
  input_ids: jax.Array                           # int (B, K, L) or (B, L): the clean captions
  attention_mask: jax.Array                      # like input_ids
  caption_weights: jax.Array | None = None       # (B, K): 0 for padding caption slots; None: all real
  image_ids: jax.Array | None = None             # (B,): images sharing an id share their captions (positives)
  candidates: TextCandidates | None = None       # the B*K captions' substitutes (image-major); text attacks
  class_features: jax.Array | None = None        # APGD's classes (M, D); None: the batch's captions
  class_positives: jax.Array | None = None       # (B, M) each image's own classes (with class_features)

  @property
  def captions_per_image(self) -> int:
    return self.input_ids.shape[1] if self.input_ids.ndim == 3 else 1

  def flat_captions(self) -> tuple[jax.Array, jax.Array]:
    """The clean captions as (B*K, L) rows, image-major."""
    length = self.input_ids.shape[-1]
    return self.input_ids.reshape(-1, length), self.attention_mask.reshape(-1, length)


@dataclasses.dataclass(frozen=True)
class AttackResult:
  """The adversarial batch: images (None when the attack leaves them clean) and the text attack's result
  for the B*K captions (None when it leaves the text clean)."""
  images: jax.Array | None
  text: TextAttackResult | None


def run_attack(spec: AttackSpec, encoder: DualEncoder, params: nnx.State, inputs: AttackInputs, key: jax.Array,
               reference: nnx.State | None = None, *, chunk_size: int | None = None,
               text: TextAttackResult | None = None) -> AttackResult:
  """The adversarial batch of `spec` on `inputs` against `params`.

  reference: the parameters whose clean image features anchor the "feature" and "mava" losses (a
  defense's frozen original model); None: `params` themselves (the attacked model's own features).
  chunk_size: texts per encoder call in the text attack (None: its default).
  text: the result of the spec's text stage (`AttackSpec.text_stage`) on these inputs, model and chunk
  size (`text_stage`, or an attack with the same stage; it is used as it is); None: the text attack runs here.
  """
  if spec.attacks_text and inputs.candidates is None:
    raise ValueError(f"attack {spec.name!r} changes captions and needs their candidates (inputs.candidates): "
                     "prepare them with mat_jax.attacks.multimodal.bucketed_candidates, or in training with "
                     "the input pipeline's AttachCandidates")
  if text is not None and spec.text_stage is None:
    raise ValueError(f"attack {spec.name!r} has no shareable text stage (AttackSpec.text_stage is None); "
                     "pass text=None")
  key = checks.as_key(key)
  _check_inputs(encoder, inputs)
  images, cands, weights = inputs.images, inputs.candidates, inputs.caption_weights
  k = inputs.captions_per_image
  text_kw = dict(max_changes=spec.max_changes, chunk_size=chunk_size)
  pgd_kw = dict(eps=spec.eps, step_size=spec.pgd_step, steps=spec.steps, norm=spec.norm)

  # The compiled attacks of the references, as they are.
  if spec.kind == "sga":
    r = multimodal.set_guidance_attack(encoder, params, images, cands, key, weights, **pgd_kw, **text_kw)
    return AttackResult(r.images, r.text)
  if spec.kind == "text_then_image" and spec.loss == "co":
    r = multimodal.collaborative_attack(encoder, params, images, cands, key, weights, alpha=spec.alpha, **pgd_kw,
                                        **text_kw, text=text)
    return AttackResult(r.images, r.text)
  if spec.kind == "separate" and spec.loss in ("cosine", "kl"):
    r = multimodal.separate_attack(encoder, params, images, cands, key, weights, image_loss=spec.loss, **pgd_kw,
                                   **text_kw, text=text)
    return AttackResult(r.images, r.text)
  if spec.kind == "image" and spec.loss == "cosine":
    ids, mask = _per_image(inputs.input_ids), _per_image(inputs.attention_mask)
    return AttackResult(image_attacks.pgd_attack(encoder, params, images, ids, mask, key, weights, **pgd_kw), None)
  if spec.kind == "image" and spec.loss == "apgd_ce":
    # The classes: given ones (e.g. a whole eval set's captions), or else the batch's real captions.
    features, positives, class_weights = inputs.class_features, inputs.class_positives, None
    if features is None:
      features = encoder.text_features(params, *inputs.flat_captions())
      positives = losses.positives(inputs.image_ids, images.shape[0], k)
      class_weights = weights
    return AttackResult(image_attacks.apgd_attack(encoder, params, images, features, positives, key, eps=spec.eps,
                                                  steps=spec.steps, norm=spec.norm, text_weights=class_weights),
                        None)

  # The defenses' attacks: an optional text attack, then PGD on the defense's loss, guided by the
  # clean captions ("image", "separate") or by the adversarial ones ("text_then_image").
  if spec.attacks_text and text is None:
    text = text_stage(spec, encoder, params, inputs, chunk_size=chunk_size)
  if spec.kind == "text":
    return AttackResult(None, text)
  guide_ids, guide_mask = inputs.flat_captions()
  if spec.kind == "text_then_image":
    guide_ids, guide_mask = text.input_ids, text.attention_mask
  adv = _defense_images(encoder, params, params if reference is None else reference, images, guide_ids, guide_mask,
                        weights, inputs.image_ids, key, spec.eps, spec.pgd_step, spec.steps, spec.beta * spec.eps,
                        loss=spec.loss, norm=spec.norm, neighbours=spec.neighbours)
  return AttackResult(adv, text)


def _check_inputs(encoder: DualEncoder, inputs: AttackInputs) -> None:
  """The batch against the model, for free (`image_attacks.check_batch`: static shapes, and values of host
  arrays only; a training step's batch is traced, evaluation's checked once by its entry point). Captions
  given on the host with their candidates are checked against the candidates' tokenizer as
  `evaluate.Victim.tokens` checks them (ids within the model's table, its end token where the tower pools)."""
  image_attacks.check_batch(encoder, inputs.images, inputs.input_ids, inputs.attention_mask)
  text = getattr(getattr(encoder, "config", None), "text", None)
  cands = inputs.candidates
  if cands is not None and hasattr(text, "vocab_size") and not isinstance(inputs.input_ids, jax.Array):
    check_tokens_for(*inputs.flat_captions(), cands.end_id, text, name="candidates' tokenizer")


def _per_image(x: jax.Array) -> jax.Array:
  return x[:, None] if x.ndim == 2 else x


def text_stage(spec: AttackSpec, encoder: DualEncoder, params: nnx.State, inputs: AttackInputs, *,
               chunk_size: int | None = None) -> TextAttackResult:
  """The text attack `spec` starts with (`AttackSpec.text_stage`), alone: BERT-Attack's KL objective
  (image-blind) or away from the clean image. `run_attack(..., text=)` takes its result, so a caller may run
  it as a program of its own (the train step does); `run_attack` runs it when not given."""
  if spec.text_stage is None:
    raise ValueError(f"attack {spec.name!r} has no text stage of its own (AttackSpec.text_stage is None)")
  if inputs.candidates is None:
    raise ValueError(f"attack {spec.name!r} changes captions and needs their candidates (inputs.candidates)")
  text_kw = dict(max_changes=spec.max_changes, chunk_size=chunk_size)
  if spec.text_objective == "kl":
    return multimodal.bert_attack(encoder, params, inputs.candidates, **text_kw)
  guide = multimodal.caption_guides(encoder, params, inputs.images, captions_per_image=inputs.captions_per_image)
  return text_attack(encoder, params, inputs.candidates, guide, objective="image", **text_kw)


@precompile.jit(static_argnames=("encoder", "loss", "norm", "neighbours"))
def _defense_images(encoder, params, reference, images, guide_ids, guide_mask, weights, image_ids, key, eps,
                    step_size, steps, radius, *, loss, norm, neighbours):
  """PGD on a defense's inner loss; guide_ids/mask (B*K, L) are the captions that guide it."""
  b = images.shape[0]
  k = guide_ids.shape[0] // b
  if loss == "contrastive":
    # Each image against all of the batch's guiding captions, its own (and its id's) as positives.
    texts = encoder.text_features(params, guide_ids, guide_mask)
    loss_fn = losses.contrastive(encoder, params, texts, losses.positives(image_ids, b, k),
                                 logit_scale=encoder.temperature(params),
                                 text_weights=weights)
  elif loss == "feature":
    loss_fn = losses.feature_distance(encoder, params, encoder.image_features(reference, images))
  elif loss == "mava":
    captions = l2_normalize(encoder.text_features(params, guide_ids, guide_mask)).reshape(b, k, -1)
    loss_fn = losses.mava(encoder, params, encoder.image_features(reference, images), captions,
                          neighbours=neighbours, radius=radius, caption_weights=weights)
  else:
    raise ValueError(f"no defense image loss {loss!r}")
  return image_attacks.pgd(loss_fn, images, key, eps=eps, step_size=step_size, steps=steps, norm=norm)
