"""Adversarial attacks on CLIP-style dual encoders: image (PGD, APGD), text (BERT-Attack) and multimodal
(Sep-Attack, Co-Attack, SGA), compiled with JAX.

Two levels:
- one-call functions for notebooks, taking an NNX `CLIP`, pixel images and caption strings:
  `image_attack`, `attack_text`, `sep_attack`, `co_attack`, `sga_attack`;
- the composable, explicit-state parts that training steps and the evaluator use:
  `mat_jax.attacks.image` (pgd, apgd, apgd_targeted, pgd_attack, apgd_attack), `.losses` (the losses
  to maximise), `.text` / `.candidates` (BERT-Attack), `.multimodal` (the compiled multimodal attacks:
  separate_attack, collaborative_attack, set_guidance_attack, bert_attack);
- one description of an attack for both: `.spec` (`AttackSpec`, the step-size rule and the registry
  `spec.ATTACKS` of every attack evaluation runs and every defense's inner attack) and `.runner`
  (`run_attack`: a spec on a batch, through the compiled parts above).

Images are float32 NHWC in [0, 1] and eps is in pixel units (2/255, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax import checks
from mat_jax.attacks import candidates, image, losses, multimodal, runner, spec, text
from mat_jax.attacks.candidates import (BertMLMSource, CandidateSource, CharEditSource, LexiconSource,
                                        TextCandidates, prepare_candidates)
from mat_jax.attacks.image import apgd, apgd_targeted, pgd
from mat_jax.attacks.runner import AttackInputs, AttackResult, run_attack
from mat_jax.attacks.spec import AttackSpec, UnknownAttackError
from mat_jax.attacks.text import AttackedText, TextAttackResult, adversarial_captions, attack_text, text_attack
from mat_jax.errors import InputError
from mat_jax.models.blip import BLIP
from mat_jax.models.clip import CLIP, check_pixels
from mat_jax.models.dual_encoder import split
from mat_jax.models.tokenizers import Tokenizer

__all__ = [
    "image_attack", "attack_text", "sep_attack", "co_attack", "sga_attack", "MultimodalAttack",
    "pgd", "apgd", "apgd_targeted", "text_attack", "adversarial_captions", "prepare_candidates",
    "LexiconSource", "CharEditSource", "BertMLMSource", "CandidateSource", "TextCandidates",
    "TextAttackResult", "AttackedText", "image", "losses", "text", "candidates", "multimodal",
    "AttackSpec", "AttackInputs", "AttackResult", "UnknownAttackError", "run_attack", "runner", "spec",
]


def _key(key) -> jax.Array:
  """The one-call attacks' key: an int seed (default 0) or a key (`checks.as_key`)."""
  return checks.as_key(0 if key is None else key)


def _check_model(model) -> None:
  if not isinstance(model, (CLIP, BLIP)):
    raise TypeError(f"model must be a mat_jax CLIP or BLIP (nnx.Module), got {type(model).__name__}; load one "
                    "with mat_jax.models.load_clip(...) / load_blip(...) or use "
                    "mat_jax.attacks.image.pgd_attack(encoder, params, ...)")


def image_attack(model: CLIP, images, input_ids, attention_mask, *, eps: float, steps: int,
                 step_size: float | None = None, norm: str = "linf", random_start: bool = True,
                 key=None) -> jax.Array:
  """Adversarial images that lower each image's cosine similarity to its paired caption(s) (PGD).

  images: float32 (B, H, W, 3) in [0, 1]. input_ids, attention_mask: (B, L) one caption per image, or
  (B, K, L) K captions per image (the loss sums over them, as SGA's image attack). eps and step_size in
  pixel units (L-inf) or L2 norm; step_size None: the `pgd` spec's rule, 2.5 eps / steps (as sep_attack and
  sga_attack). key: a PRNG key or an int seed (default 0).
  """
  _check_model(model)
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
  image.check_batch(model, images, ids, mask, read_device=True)
  _check_budget(eps, steps, step_size, norm)
  step_size = spec.step_size_for(eps, steps, step_size, spec.ATTACKS["pgd"].step_scale)
  encoder, params = split(model)
  return image.pgd_attack(encoder, params, jnp.asarray(images, jnp.float32), jnp.asarray(ids),
                          jnp.asarray(mask), _key(key), eps=eps, step_size=step_size, steps=steps,
                          norm=norm, random_start=random_start)


@dataclasses.dataclass(frozen=True)
class MultimodalAttack:
  """What the one-call multimodal attacks return."""
  images: np.ndarray               # float32 (B, H, W, 3): the adversarial images
  captions: list[list[str]]        # per image, its adversarial captions (same shape as the input)
  input_ids: np.ndarray            # int32 (B, K, L), the adversarial captions tokenised (padding slots kept)
  attention_mask: np.ndarray       # int32 (B, K, L)


def _flatten_captions(images, captions) -> tuple[list[str], np.ndarray, list[int]]:
  """Image-major caption list padded to K per image, the (B, K) weights, and each image's count."""
  b = np.shape(images)[0]
  if isinstance(captions, str):
    raise TypeError("captions must be a list (one caption or one list of captions per image), not a string")
  nested = [[c] if isinstance(c, str) else list(c) for c in captions]
  if len(nested) != b:
    raise InputError(f"{len(nested)} caption entries for {b} images; give one caption (or a list) per image")
  if any(not caps for caps in nested):
    raise InputError("every image needs at least one caption")
  k = max(len(caps) for caps in nested)
  flat = [caps[i] if i < len(caps) else caps[0] for caps in nested for i in range(k)]
  weights = np.asarray([[1.0 if i < len(caps) else 0.0 for i in range(k)] for caps in nested], np.float32)
  return flat, weights, [len(caps) for caps in nested]


def _check_budget(eps, steps, step_size, norm: str = "linf") -> None:
  """The budget on the host, before the attack compiles: a NaN eps gives NaN images and an eps in 1/255
  units (2 for 2/255) an unbounded perturbation, without an error, once inside `jit`."""
  spec.check_norm(norm)  # first: check_eps's bound depends on the norm
  checks.check_eps(eps, norm=norm)
  checks.check_steps(steps, minimum=0)
  if step_size is not None:
    checks.check_step_size(step_size)


def _multimodal(attack, model: CLIP, tokenizer: Tokenizer, images, captions, source: CandidateSource,
                key, **kwargs) -> MultimodalAttack:
  _check_model(model)
  check_pixels(images, model.config.vision)
  _check_budget(kwargs["eps"], kwargs["steps"], kwargs.get("step_size"), kwargs.get("norm", "linf"))
  key = _key(key)
  flat, weights, counts = _flatten_captions(images, captions)
  text.check_source(source)
  encoder, params = split(model)
  text.check_tokenizer(tokenizer, flat, encoder)
  cands = multimodal.bucketed_candidates(flat, tokenizer, source)
  result = attack(encoder, params, jnp.asarray(images, jnp.float32), cands, key,
                  jnp.asarray(weights), **kwargs)
  adv_captions = adversarial_captions(cands, result.text)
  k = weights.shape[1]
  b = len(counts)
  return MultimodalAttack(
      images=np.asarray(result.images),
      captions=[adv_captions[i * k:i * k + counts[i]] for i in range(b)],
      input_ids=np.asarray(result.text.input_ids).reshape(b, k, -1),
      attention_mask=np.asarray(result.text.attention_mask).reshape(b, k, -1))


def sep_attack(model: CLIP, tokenizer: Tokenizer, images, captions: Sequence, source: CandidateSource, *,
               eps: float = 2 / 255, steps: int = 10, step_size: float | None = None, key=None,
               max_changes: int = 1) -> MultimodalAttack:
  """Sep-Attack: BERT-Attack (KL objective) and image PGD (step 2.5 eps / steps by default), independently.

  captions: one string or one list of strings per image. source: where substitutes come from
  (`LexiconSource(table)`, `CharEditSource()`, `BertMLMSource(bert, bert_tokenizer)`).
  """
  return _multimodal(multimodal.separate_attack, model, tokenizer, images, captions, source, key, eps=eps,
                     steps=steps, step_size=_sga_step(eps, steps, step_size), max_changes=max_changes)


def co_attack(model: CLIP, tokenizer: Tokenizer, images, captions: Sequence, source: CandidateSource, *,
              eps: float = 2 / 255, steps: int = 10, step_size: float | None = None, alpha: float = spec.CO_ALPHA,
              key=None, max_changes: int = 1) -> MultimodalAttack:
  """Co-Attack: BERT-Attack (KL objective), then image PGD on the Co-Attack loss (step eps/steps*1.25)."""
  return _multimodal(multimodal.collaborative_attack, model, tokenizer, images, captions, source, key, eps=eps,
                     steps=steps, step_size=step_size, alpha=alpha, max_changes=max_changes)


def sga_attack(model: CLIP, tokenizer: Tokenizer, images, captions: Sequence, source: CandidateSource, *,
               eps: float = 2 / 255, steps: int = 10, step_size: float | None = None, key=None,
               max_changes: int = 1) -> MultimodalAttack:
  """SGA: image-guided text attack, multi-scale set-level image attack (step 2.5 eps / steps: 0.5/255 at
  2/255 and 10 steps, the reference's), image-guided text attack again."""
  return _multimodal(multimodal.set_guidance_attack, model, tokenizer, images, captions, source, key, eps=eps,
                     steps=steps, step_size=_sga_step(eps, steps, step_size), max_changes=max_changes)


def _sga_step(eps: float, steps: int, step_size: float | None) -> float:
  """SGA's step, 0.5/255 for eps 2/255 in 10 steps, scaled with the budget and the step count."""
  return spec.step_size_for(eps, steps, step_size, spec.SGA_STEP_SCALE)
