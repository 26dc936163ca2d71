"""Multimodal attacks on dual encoders, compiled: Sep-Attack, Co-Attack, SGA (and the text-only baseline).

A batch is B images with K captions each. The captions' substitution candidates come from
`mat_jax.attacks.candidates.prepare_candidates` over the B*K captions in image-major order (the K
captions of image 0, then those of image 1, ...); `caption_weights` (B, K) marks real captions (0 for
padding slots of images with fewer than K captions). Everything on the device -- the text attack's
scoring (`mat_jax.attacks.text.text_attack`), the image PGD and the encoders -- runs in compiled
functions, a few per attack, with the arrays staying on the device in between; eps, step size and steps
are traced, so one compilation per batch shape serves every budget.

What each attack does (Co-Attack: Zhang et al. 2022; SGA: Lu et al. 2023; REFERENCE.md):
- Sep-Attack: the unimodal attacks side by side, neither seeing the other's output: BERT-Attack with
  the KL objective (independent of the image) and image PGD against the clean captions (SGA's cosine
  loss; Co-Attack's code uses its image-only KL, `image_loss="kl"`).
- Co-Attack: BERT-Attack with the KL objective first; then PGD on
  KL(s(n(e_I(x))) || s(n(e_I(x')))) + alpha KL(s(n(e_T(t'))) || s(n(e_I(x')))), alpha = 3, step eps/steps*1.25,
  the text term averaged over an image's K captions.
  The reference starts from a one-sided U(0, eps) perturbation, a quirk; the start here is symmetric.
- SGA: (1) text attack guided by the clean image, (2) image PGD against all of the image's adversarial
  captions, each step on the image and its noisy rescalings {0.5, 0.75, 1.25, 1.5} (gradients through
  the resizes), (3) the text attack again from the clean captions, guided by the adversarial image.
Transfer (generate on a surrogate, evaluate on a target) is the evaluator's job: the adversarial
images are pixels, the adversarial captions go back to strings (`text.adversarial_captions`) for the
target's tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mat_jax import checks, precompile
from mat_jax.attacks import image as image_attacks
from mat_jax.attacks import losses
from mat_jax.attacks.candidates import TextCandidates, prepare_candidates
from mat_jax.attacks.spec import CO_ALPHA, CO_STEP_SCALE, step_size_for
from mat_jax.attacks.text import TextAttackResult, assemble, text_attack
from mat_jax.models.dual_encoder import DualEncoder

IMAGE_LOSSES = ("cosine", "kl")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["images", "text"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class MultimodalResult:
  """Adversarial images (B, H, W, 3) and the text attack's result for the B*K captions."""
  images: jax.Array
  text: TextAttackResult


def _captions_per_image(images, candidates: TextCandidates) -> int:
  n, b = candidates.word_pieces.shape[0], images.shape[0]
  if n % b:
    raise ValueError(f"{n} captions for {b} images: give every image the same number K of caption slots "
                     "(image-major order, padding slots weighted 0 in caption_weights)")
  return n // b


def _weights(caption_weights, b: int, k: int) -> jax.Array:
  if caption_weights is None:
    return jnp.ones((b, k), jnp.float32)
  if caption_weights.shape != (b, k):
    raise ValueError(f"caption_weights must be (images, captions per image) = ({b}, {k}), got "
                     f"{caption_weights.shape}")
  return jnp.asarray(caption_weights, jnp.float32)


def _text_kw(max_changes: int, chunk_size: int | None) -> dict:
  """The text attack's settings; chunk_size None keeps `text_attack`'s default."""
  return dict(max_changes=max_changes) | ({} if chunk_size is None else dict(chunk_size=chunk_size))


# The device parts. Each multimodal attack is a short sequence of these compiled functions and of the
# compiled `text_attack`; arrays stay on the device between them (no host round trip), and the parts
# that attacks share (the KL text attack of Sep- and Co-Attack, SGA's two image-guided text attacks)
# are compiled once instead of once per attack.

@precompile.jit(static_argnames=("encoder", "captions_per_image"))
def caption_guides(encoder: DualEncoder, params: nnx.State, images: jax.Array, *,
                   captions_per_image: int) -> jax.Array:
  """Each caption's guiding image features (B*K, D), image-major, for the image-guided text attack."""
  return jnp.repeat(encoder.image_features(params, images), captions_per_image, axis=0)


@precompile.jit(static_argnames=("encoder", "norm", "image_loss"))
def _sep_images(encoder, params, images, candidates, weights, key, eps, step_size, steps, *, norm, image_loss):
  b, k = weights.shape
  if image_loss == "cosine":
    clean_ids, clean_mask = assemble(candidates)
    loss = losses.paired_cosine(encoder, params, encoder.text_features(params, clean_ids, clean_mask).reshape(b, k, -1),
                           weights)
  else:
    loss = losses.image_kl(encoder, params, encoder.image_features(params, images))
  return image_attacks.pgd(loss, images, key, eps=eps, step_size=step_size, steps=steps, norm=norm)


@precompile.jit(static_argnames=("encoder", "norm"))
def _co_images(encoder, params, images, adv_ids, adv_mask, weights, key, eps, step_size, steps, alpha, *, norm):
  b, k = weights.shape
  adv_text = encoder.text_features(params, adv_ids, adv_mask).reshape(b, k, -1)
  loss = losses.co_attack(encoder, params, encoder.image_features(params, images), adv_text, alpha=alpha,
                     text_weights=weights)
  return image_attacks.pgd(loss, images, key, eps=eps, step_size=step_size, steps=steps, norm=norm)


@precompile.jit(static_argnames=("encoder", "norm", "scales"))
def _sga_images(encoder, params, images, adv_ids, adv_mask, weights, key, eps, step_size, steps, noise_std, *,
                norm, scales):
  b, k = weights.shape
  adv_text = encoder.text_features(params, adv_ids, adv_mask).reshape(b, k, -1)
  loss = losses.multi_scale(losses.paired_cosine(encoder, params, adv_text, weights), scales, noise_std)
  return image_attacks.pgd(loss, images, key, eps=eps, step_size=step_size, steps=steps, norm=norm)


# The attacks. Traceable (usable inside an outer jit, e.g. a training step), and without host syncs.
# Named apart from the one-call wrappers of `mat_jax.attacks` (sep_attack, co_attack, sga_attack), which
# take a model and strings: these take the explicit (encoder, params) and prepared candidates.

def separate_attack(encoder: DualEncoder, params: nnx.State, images: jax.Array, candidates: TextCandidates,
               key: jax.Array, caption_weights: jax.Array | None = None, *, eps, step_size, steps,
               norm: str = "linf", image_loss: str = "cosine", max_changes: int = 1,
               chunk_size: int | None = None, text: TextAttackResult | None = None) -> MultimodalResult:
  """Sep-Attack: independent BERT-Attack (KL objective) and image PGD (against the clean captions).

  text: the BERT-Attack result on these candidates, if already computed (`bert_attack`); None: run it.
  """
  if image_loss not in IMAGE_LOSSES:
    raise ValueError(f"unknown image_loss {image_loss!r}; use one of {IMAGE_LOSSES}")
  key = image_attacks.checked_key(key, norm, eps=eps, step_size=step_size, steps=steps)
  b, k = images.shape[0], _captions_per_image(images, candidates)
  weights = _weights(caption_weights, b, k)
  if text is None:
    text = bert_attack(encoder, params, candidates, max_changes=max_changes, chunk_size=chunk_size)
  adv = _sep_images(encoder, params, images, candidates, weights, key, eps, step_size, steps, norm=norm,
                    image_loss=image_loss)
  return MultimodalResult(adv, text)


def collaborative_attack(encoder: DualEncoder, params: nnx.State, images: jax.Array, candidates: TextCandidates,
              key: jax.Array, caption_weights: jax.Array | None = None, *, eps, steps, step_size=None,
              alpha: float = CO_ALPHA, norm: str = "linf", max_changes: int = 1,
              chunk_size: int | None = None, text: TextAttackResult | None = None) -> MultimodalResult:
  """Co-Attack: BERT-Attack (KL objective), then image PGD on the Co-Attack loss against its result.

  step_size: default eps / steps * 1.25, the reference's.
  text: the BERT-Attack result on these candidates, if already computed (`bert_attack`); None: run it.
  """
  key = image_attacks.checked_key(key, norm, eps=eps, step_size=step_size, steps=steps)
  if checks.host_number(alpha):
    checks.check_nonnegative(alpha, name="alpha", hint=" (the weight of Co-Attack's text term, 3 in the reference)")
  b, k = images.shape[0], _captions_per_image(images, candidates)
  weights = _weights(caption_weights, b, k)
  step_size = step_size_for(eps, steps, step_size, CO_STEP_SCALE)
  if text is None:
    text = bert_attack(encoder, params, candidates, max_changes=max_changes, chunk_size=chunk_size)
  adv = _co_images(encoder, params, images, text.input_ids, text.attention_mask, weights, key, eps, step_size,
                   steps, alpha, norm=norm)
  return MultimodalResult(adv, text)


def set_guidance_attack(encoder: DualEncoder, params: nnx.State, images: jax.Array, candidates: TextCandidates,
               key: jax.Array, caption_weights: jax.Array | None = None, *, eps, step_size, steps,
               scales: Sequence[float] = losses.SGA_SCALES, noise_std: float = 0.05, norm: str = "linf",
               max_changes: int = 1, chunk_size: int | None = None) -> MultimodalResult:
  """SGA: image-guided text attack, set-level multi-scale image attack, image-guided text attack again."""
  key = image_attacks.checked_key(key, norm, eps=eps, step_size=step_size, steps=steps)
  b, k = images.shape[0], _captions_per_image(images, candidates)
  weights = _weights(caption_weights, b, k)
  text_kw = dict(objective="image", **_text_kw(max_changes, chunk_size))
  # (1) Captions pushed away from their clean image.
  first = text_attack(encoder, params, candidates,
                      caption_guides(encoder, params, images, captions_per_image=k), **text_kw)
  # (2) The image pushed away from all of its adversarial captions, at every scale.
  adv = _sga_images(encoder, params, images, first.input_ids, first.attention_mask, weights, key, eps,
                    step_size, steps, noise_std, norm=norm, scales=tuple(scales))
  # (3) From the clean captions again, now away from the adversarial image.
  final = text_attack(encoder, params, candidates, caption_guides(encoder, params, adv, captions_per_image=k),
                      **text_kw)
  return MultimodalResult(adv, final)


def bert_attack(encoder: DualEncoder, params: nnx.State, candidates: TextCandidates, *,
                max_changes: int = 1, chunk_size: int | None = None) -> TextAttackResult:
  """The text-only baseline (BERT-Attack as Co-Attack evaluates it): the KL objective, no image."""
  return text_attack(encoder, params, candidates, None, objective="kl",
                     **_text_kw(max_changes, chunk_size))


# ----------------------------------------------------------------------------------------------------
# Host helpers: batches of candidates
# ----------------------------------------------------------------------------------------------------

def _next_power_of_two(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def bucketed_candidates(captions, tokenizer, source, **kwargs) -> TextCandidates:
  """`prepare_candidates` with array sizes rounded up to a few buckets (words and targets to multiples
  of 8, pieces, candidates and the scored text length to powers of two), so that different batches of
  captions usually share one compiled text attack. Nothing is cut: every size only grows. Sizes the
  caller gives (e.g. top_k, max_targets, which also limit how many candidates and words are kept) stay
  as given."""

  c = prepare_candidates(captions, tokenizer, source, **kwargs)
  words, pieces = c.word_pieces.shape[1:]
  targets, top_k = c.sub_lengths.shape[1:]
  capacity = tokenizer.context_length - (tokenizer.start_id is not None) - (tokenizer.end_id is not None)
  max_words = max(words, min(-(-words // 8) * 8, capacity))
  sizes = dict(max_words=max_words, max_pieces=_next_power_of_two(pieces), top_k=_next_power_of_two(top_k),
               max_targets=max(targets, min(-(-targets // 8) * 8, max_words)),
               text_length=min(tokenizer.context_length, _next_power_of_two(c.text_length)))
  sizes = {k: v for k, v in sizes.items() if kwargs.get(k) is None}
  current = dict(max_words=words, max_pieces=pieces, top_k=top_k, max_targets=targets, text_length=c.text_length)
  if all(current[k] == v for k, v in sizes.items()):
    return c
  # The source caches its substitutes per caption: the second pass only re-packs the arrays.
  return prepare_candidates(captions, tokenizer, source, **(kwargs | sizes))


def select_candidates(candidates: TextCandidates, rows: Sequence[int] | np.ndarray) -> TextCandidates:
  """The candidates of some captions (rows may repeat), host text included: prepare the candidates of
  a whole evaluation set once (one set of array sizes, so one compilation) and slice batches out."""
  rows = np.asarray(rows, np.int64)
  per_caption = {f: np.asarray(getattr(candidates, f))[rows]
                 for f in ("word_pieces", "word_lengths", "target_words", "target_valid", "sub_pieces",
                           "sub_lengths")}
  text = {}
  if candidates.has_text:
    text = {f: tuple(getattr(candidates, f)[r] for r in rows) for f in ("captions", "words", "substitutes")}
  return candidates.replace(**per_caption, **text)
