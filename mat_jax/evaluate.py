"""Robustness evaluation: image-text retrieval, clean and under attack, as the papers' tables report it.

    python -m mat_jax.evaluate --model shapes --attacks pgd,bert,co,sga --eps 1,2,4
    python -m mat_jax.evaluate --model ./clip-vit-b-16 --data flickr30k --text-source bert --bert ./bert-base-uncased

For every attack and budget the adversarial images and captions of the whole test set are generated
batch by batch (on a surrogate model when given: transfer), then the target model scores all images
against all captions. Reported per attack and eps: TR@1/5/10 and IR@1/5/10, Co-Attack's recall drop
(clean minus adversarial, percentage points) and SGA's attack success rate at rank 1 (the share of
queries correct before the attack and wrong after it). Output: a table on stdout, results.json and a
plot of R@1 against eps (recall_vs_eps.png).

Attacks (`ATTACKS`, the attack registry `mat_jax.attacks.spec.ATTACKS`, the names training uses too):
pgd (image PGD against the image's captions, SGA's image attack), apgd (APGD-CE over the whole test
set's captions as classes), bert (BERT-Attack alone, Co-Attack's KL objective), sep (Sep-Attack), co
(Co-Attack), sga (SGA), and the defenses' inner attacks: mat (the image-guided text attack, then
contrastive PGD against the adversarial captions), tecoa, mmcoa, fare and mava (against the attacked
model's own clean features). Every attack runs at the evaluation's budget (`AttackSettings`: steps, step
rule, norm, words changed) at each eps; eps is given in 1/255 units; bert does not depend on it.
Attacks that start with the same text attack (`AttackSpec.text_stage`: bert, sep and co all begin with
the KL BERT-Attack, at every eps) share it: it runs once per batch, and each attack's "seconds" counts
what it ran itself.

`evaluate(...)` is the same thing as a Python function, for the training demo and notebooks; the
command line is `mat_jax.evaluate_cli`, run as `python -m mat_jax.evaluate`. `--task zeroshot` runs
zero-shot classification under attack instead, with its own flags (`mat_jax.zeroshot`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mat_jax import checks, metrics, paths, precompile, rerank, runtime, tables
from mat_jax import runs as runs_lib
from mat_jax.attacks import candidates as candidates_lib
from mat_jax.attacks import multimodal
from mat_jax.attacks import spec as attack_specs
from mat_jax.attacks.runner import AttackInputs, run_attack
from mat_jax.attacks.text import adversarial_captions
from mat_jax.data import corpora, pipeline, shapes
from mat_jax.errors import InputError, MatJaxError
from mat_jax.models.blip import BLIP
from mat_jax.models.clip import CLIP, check_tokens_for
from mat_jax.models.dual_encoder import DualEncoder, split
from mat_jax.models.tokenizers import Tokenizer

ATTACKS = attack_specs.NAMES  # every attack of the registry
DEFAULT_ATTACKS = ("pgd", "apgd", "bert", "sep", "co", "sga")  # the references' evaluation attacks
TEXT_ONLY = tuple(n for n, s in attack_specs.ATTACKS.items() if not s.attacks_image)
NEEDS_TEXT_SOURCE = tuple(n for n, s in attack_specs.ATTACKS.items() if s.attacks_text)
BATCH_CONTRASTIVE = attack_specs.BATCH_CONTRASTIVE  # one image per batch is not attacked (attacks.spec)
TEXT_ONLY_KEY = "text"  # the eps key of text-only attacks in the results
SUMMARY_KEYS = ("tr@1", "ir@1")
# Per-query arrays of keep_ranks, not written to JSON.
RANK_KEYS = ("ranks", "clean_ranks", "text_to_image", "ranks_meaning_preserving")


@dataclasses.dataclass(frozen=True)
class Victim:
  """A model as the evaluator uses it: the functional view, its parameters and its tokenizer."""
  encoder: DualEncoder
  params: Any
  tokenizer: Tokenizer
  name: str = "model"

  @classmethod
  def of(cls, model, params=None, tokenizer=None, name: str = "model") -> "Victim":
    if isinstance(model, Victim):
      if params is not None or tokenizer is not None:  # ignored, they would leave the victim's own in use
        raise InputError(f"{name}: a Victim carries its parameters and tokenizer; pass params and tokenizer with "
                         "its encoder instead (evaluate(victim.encoder, params, tokenizer, ...))")
      return model
    if isinstance(model, (CLIP, BLIP)):
      if params is not None:  # ignored, the model's own would be evaluated
        raise InputError(f"{name}: a {type(model).__name__} carries its parameters; to evaluate other ones pass "
                         "its encoder with them (encoder, _ = models.split(model); evaluate(encoder, params, "
                         "tokenizer, ...))")
      encoder, params = split(model)
    elif isinstance(model, DualEncoder):
      encoder = model
      if params is None:
        raise ValueError("a DualEncoder needs its params: evaluate(encoder, params, tokenizer, ...)")
    else:
      raise TypeError(f"expected a mat_jax CLIP, BLIP or a DualEncoder, got {type(model).__name__}")
    if tokenizer is None:
      raise ValueError(f"{name}: a tokenizer is needed (mat_jax.models.load_tokenizer)")
    # On the device once (a no-op for device arrays): host parameters (a gathered training state, numpy
    # weights) would be uploaded again by every jitted call of the evaluation, per batch.
    return cls(encoder, jax.device_put(params), tokenizer, name)

  @property
  def image_size(self) -> int:
    return self.encoder.config.vision.image_size

  def tokens(self, captions: list[str]):
    """The tokenizer's batch of `captions`, checked against the text tower (ids, end token)."""
    batch = self.tokenizer(captions)
    check_tokens_for(batch.input_ids, batch.attention_mask, self.tokenizer.end_id, self.encoder.config.text,
                     name=f"{self.name}'s tokenizer")
    return batch


def caption_strings(captions) -> list[str]:
  """An evaluation set's captions as strings: bytes (as TFDS records hold them) decoded, not read as
  "b'a red ...'"."""
  return [c.decode() if isinstance(c, bytes) else str(c) for c in captions]


def describe_source(source) -> dict[str, Any] | None:
  """What results.json records of the text attacks' candidate source: its kind and its own settings
  (the substitutes per word are the source's, whatever its caller was asked for)."""
  if source is None:
    return None
  if isinstance(source, candidates_lib.MeaningFilteredSource):
    return {**describe_source(source.base), "meaning_filter": True}
  described: dict[str, Any] = {"kind": type(source).__name__}
  for name in ("top_k", "max_substitutes", "min_logit", "max_candidates"):
    if hasattr(source, name):
      described[name] = getattr(source, name)
  return described


@dataclasses.dataclass(frozen=True)
class AttackSettings:
  """Budgets and hyper-parameters of the attacks (defaults: the references' settings)."""
  steps: int = 10                  # PGD steps of pgd, sep, co, sga
  step_scale: float = attack_specs.SGA_STEP_SCALE  # pgd/sep/sga step = step_scale * eps / steps (0.5/255 at 2/255)
  co_step_scale: float = attack_specs.CO_STEP_SCALE  # Co-Attack's step = 1.25 * eps / steps
  sep_image_loss: str = "cosine"   # Sep-Attack's image loss: "cosine" (SGA's PGD) or "kl" (Co-Attack's code)
  alpha: float = attack_specs.CO_ALPHA  # Co-Attack's text-term weight
  apgd_steps: int = 100            # APGD iterations (FARE's evaluation)
  max_changes: int = 1             # words the text attack may change
  norm: str = "linf"


# ----------------------------------------------------------------------------------------------------
# Batches of an evaluation set
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Batch:
  images: np.ndarray        # int (B,): image indices; the last batch continues from the set's first images
  count: int                # images this batch evaluates (the first `count` rows); the rest are batch-mates only
  captions: np.ndarray      # int (B, K): caption indices; padding slots repeat the image's first caption
  weights: np.ndarray       # float32 (B, K): 1 for real caption slots (batch-mate rows included), 0 for padding slots

  def real_captions(self) -> tuple[np.ndarray, np.ndarray]:
    """(positions in the flattened B*K batch, caption indices) of the real captions of the evaluated rows."""
    weights = self.weights.copy()
    weights[self.count:] = 0.0
    flat = np.flatnonzero(weights.reshape(-1) > 0)
    return flat, self.captions.reshape(-1)[flat]


def _batches(image_to_texts: np.ndarray, batch_size: int) -> list[_Batch]:
  """Fixed-size batches of real images. The last, partial batch is filled up with the set's first images
  (wrapping around) as batch-mates whose results are dropped: the contrastive attacks (tecoa, mat, mmcoa)
  take their negatives from the batch's captions, so every image is attacked among batch_size real
  batch-mates; the other attacks treat each image on its own, and the fill leaves their results as they are."""
  n = len(image_to_texts)
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size={batch_size} must be between 1 and the number of images ({n})")
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n
    count = int(min(batch_size, n - start))
    slots = image_to_texts[idx]
    weights = (slots >= 0).astype(np.float32)
    out.append(_Batch(idx, count, np.where(slots >= 0, slots, slots[:, :1]), weights))
  return out


def _float_images(eval_set, indices: np.ndarray) -> np.ndarray:
  return pipeline.float_pixels(np.asarray(eval_set.images)[indices])


def _float_images_shape(eval_set, n_images: int) -> jax.ShapeDtypeStruct:
  """What `_float_images` gives for `n_images` images, as a shape (nothing read)."""
  return jax.ShapeDtypeStruct((n_images,) + tuple(np.shape(eval_set.images)[1:]), np.float32)


# ----------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------

def check_eps_255(eps_255: float | Sequence[float], norm: str | None = "linf", *,
                  name: str = "eps_255") -> list[float]:
  """Budgets in 1/255 units (one number, or several): finite, >= 0, none in (0, 0.5) (less than half a pixel
  level: a budget in pixel units, 2/255 for 2) and, for L-inf, at most `checks.MAX_LINF_EPS_255` (64). Returns
  them as floats, a repeated budget once (it is attacked once). norm None: not known yet (`eps_budgets`
  reads --eps before --norm), so the L-inf bound is left to the command's check once its flags are read."""
  given = [eps_255] if np.ndim(eps_255) == 0 else eps_255  # one budget is a list of one
  try:  # numbers, not strings ("2") or booleans, which float() would take
    if any(isinstance(e, (str, bytes, bool, np.bool_)) for e in given):
      raise TypeError
    eps_255 = [float(e) for e in given]
  except (TypeError, ValueError):
    raise InputError(f"{name} must be numbers in 1/255 units (e.g. 2 for 2/255, or (1, 2, 4)), got {eps_255!r}") \
        from None
  if len(eps_255) == 0:
    raise InputError(f"no budget in {name}; give at least one in 1/255 units, e.g. 2 for 2/255")
  for e in eps_255:
    if not math.isfinite(e) or e < 0:
      raise InputError(f"{name} must be >= 0 and finite (budgets in 1/255 units, e.g. 2 for 2/255), "
                       f"got {list(eps_255)}")
    if 0 < e < 0.5:
      raise InputError(f"{name}={e:g} is less than half of one pixel level (budgets are in 1/255 units: 2 means "
                       f"2/255); it looks like a budget in pixel units: for {e:g} pass {e * 255:.4g}")
    if norm == "linf" and e > 255:
      raise InputError(f"{name}={e:g} is more than the whole pixel range: budgets are in 1/255 units "
                       "(2 means 2/255)")
    if norm == "linf" and e > checks.MAX_LINF_EPS_255:
      raise InputError(f"{name}={e:g} would let every pixel move by {e:g} of its 255 levels: L-inf budgets above "
                       f"{checks.MAX_LINF_EPS_255} are refused (budgets are in 1/255 units: 2 means 2/255)")
  clash = _key_clash(eps_255)
  if clash:
    raise InputError(f"{name}: {clash}")
  return list(dict.fromkeys(float(e) for e in eps_255))


def eps_key(eps_255: float) -> str:
  """A budget's key in the results (6 significant digits)."""
  return f"{eps_255:g}"


def _key_clash(eps_255: Sequence[float]) -> str | None:
  """Why two different budgets would share one results key (one overwriting the other), or None."""
  seen: dict[str, float] = {}
  for e in eps_255:
    first = seen.setdefault(eps_key(e), float(e))
    if first != float(e):
      return (f"budgets {first!r} and {float(e)!r} are both reported as eps {eps_key(e)!r}; give budgets that "
              "differ within 6 significant digits")
  return None


def evaluate(model, params=None, tokenizer: Tokenizer | None = None, eval_set=None, *,
             attacks: Sequence[str] = DEFAULT_ATTACKS, eps_255: Sequence[float] = (2.0,),
             text_source: candidates_lib.CandidateSource | None = None, surrogate=None,
             settings: AttackSettings = AttackSettings(), batch_size: int = 32, seed: int = 0,
             limit: int | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None, itm_k: int | None = None,
             judge: Callable[[int, str], bool] | None = None, keep_ranks: bool = False,
             lowering_only: bool = False) -> dict | Callable[[], list[jax.stages.Lowered]]:
  """Retrieval recall of `model` clean and under each attack and budget; see the module docstring.

  model: an NNX CLIP, or a DualEncoder with `params`; tokenizer: the model's. eval_set: anything with
  `images` ((N, H, W, 3) uint8 or float32 in [0, 1]), `captions` ((T,) strings) and `text_to_image`
  ((T,) ints), e.g. `mat_jax.data.pipeline.load_eval_set(...)`. eps_255: budgets in 1/255 units.
  text_source: substitutes for the text attacks (e.g. `mat_jax.training.inputs.make_source("bert",
  bert="shapes-mlm")`: BERT-Attack's masked-LM candidates), needed by the attacks that change captions
  (`NEEDS_TEXT_SOURCE`: bert, sep, co, sga, mat, mmcoa).
  surrogate: a `Victim` (or CLIP with its tokenizer as `(model, tokenizer)`)
  that generates the attacks instead of the target (transfer). limit: evaluate the first N images.
  batch_size: images per attack batch (at most N; the last batch is filled up with the first images as
  batch-mates). The contrastive attacks (`BATCH_CONTRASTIVE`: tecoa, mat, mmcoa) take their negatives
  from the batch's captions, so their strength depends on it and they need at least 2; random starts
  are keyed by the batch's index, so `seed` reproduces the numbers at one batch size.
  log: if given, receives one line per attack and budget (R@1 and the time taken).
  itm_k: for a target with an ITM head (BLIP), rank by ITC and re-rank each query's top itm_k by ITM
  (`mat_jax.rerank`, BLIP's evaluation); None ranks by ITC similarity alone.
  judge: meaning-aware scoring. `judge(i, caption)` is True when `caption` still describes the image of
  caption i (an index into eval_set.captions); for the shapes world, `shapes_judge(eval_set)`.
  Returns {"clean": recalls, "attacks": {attack: {eps_key: {"recall", "recall_drop", "asr", "seconds"}}},
  ...}; text-only attacks use the eps key "text". Every attack that perturbs text (`NEEDS_TEXT_SOURCE`)
  also reports "captions_changed" (captions the attack changed) and, with a judge:
    "label_flip_share": the share of changed captions that no longer describe their image (NaN when none
        changed) -- label flips, not adversarial examples;
    "recall_meaning_preserving", "asr_meaning_preserving": recall and ASR of the *meaning-preserving
        attack*: the same adversarial images and captions, except that every label-flipped caption is
        restored to its clean text (what an attacker with a perfect meaning filter achieves at least; the
        images stay as the attack made them, also where a flipped caption guided them).
  keep_ranks: also return every query's rank ("clean_ranks" and each entry's "ranks": (TR ranks (N,),
  IR ranks (T,)) numpy arrays; with a judge also "ranks_meaning_preserving"), for intervals over test
  images (`intervals.interval`); `write_json` leaves them out.

  Before its first attack the evaluation lowers the programs it will call (the clean scoring's, and each
  attack's at the batch shape, `_attack_lowerings`) and compiles them at once on the host's cores
  (`precompile.compile_all`), unless `MAT_JAX_COMPILE_AHEAD=0`. lowering_only: instead of evaluating, return
  the function that makes those lowerings, having run nothing but what prepares them (the text source's
  candidates; APGD's class features); it only traces and lowers, and may be called on another thread.
  `precompile.compile_all` of its lowerings, while the model to be evaluated is still training, makes
  this evaluation of any model of the same architecture and parameter dtypes find its programs compiled.
  """
  target = Victim.of(model, params, tokenizer, "target")
  if surrogate is not None and not isinstance(surrogate, Victim):
    surrogate = Victim.of(surrogate[0], tokenizer=surrogate[1], name="surrogate") \
        if isinstance(surrogate, tuple) else Victim.of(surrogate, name="surrogate")
  attacker = surrogate or target
  if limit is not None and limit < 1:
    raise InputError(f"limit={limit}: evaluate at least 1 image (or None for all)")
  if batch_size < 1:
    raise InputError(f"batch_size={batch_size}: attack at least 1 image per batch")
  if settings.steps < 1 or settings.apgd_steps < 1:
    raise InputError(f"attack steps must be at least 1, got steps={settings.steps}, apgd_steps={settings.apgd_steps}")
  eps_255 = check_eps_255(eps_255, settings.norm)
  attacks = checks.names(attacks, name="attacks")  # one name is a list of one, not its letters
  unknown = [a for a in attacks if a not in ATTACKS]
  if unknown:
    raise attack_specs.UnknownAttackError(f"unknown attacks {unknown}; choose from {ATTACKS}")
  for a in attacks:  # every run's spec, checked before any work (a negative step_scale, a NaN alpha, ...)
    for e in (None,) if a in TEXT_ONLY else eps_255:
      attack_spec(a, settings, _eps_pixels(e))
  if text_source is None and any(a in NEEDS_TEXT_SOURCE for a in attacks):
    raise InputError(f"attacks {[a for a in attacks if a in NEEDS_TEXT_SOURCE]} perturb captions and need a "
                     "text_source (BertMLMSource, LexiconSource or CharEditSource)")
  if isinstance(text_source, candidates_lib.MeaningFilteredSource) and settings.max_changes > 1:
    # Two substitutes that each keep the meaning can change it together ("a middle ... on the side").
    raise InputError(f"the meaning filter checks each substitute alone, so it holds for one changed word; "
                     f"max_changes={settings.max_changes} could combine kept substitutes into a label flip. "
                     "Use max_changes=1 (--max-changes 1) with it")
  if attacker.image_size != target.image_size:
    raise InputError(f"the surrogate takes {attacker.image_size}px images, the target {target.image_size}px; "
                     "transfer needs one image size (evaluate the data at that size)")
  # Values on the host before anything is compiled: inside jit an image in [0, 255] or a NaN pixel is
  # scored without an error, and an index past the images is clamped.
  checks.check_images(eval_set.images, target.image_size, name="eval_set.images", allow_uint8=True)
  checks.check_text_to_image(eval_set.text_to_image, len(eval_set.images), len(eval_set.captions),
                             name="eval_set.text_to_image")

  captions = np.asarray(eval_set.captions)
  text_to_image = np.asarray(eval_set.text_to_image, np.int64)
  n_images = len(eval_set.images)
  caption_index = np.arange(len(captions))  # each evaluated caption's index in eval_set (what a judge is given)
  if limit is not None and limit < n_images:
    n_images = int(limit)
    keep = text_to_image < n_images
    captions, text_to_image, caption_index = captions[keep], text_to_image[keep], caption_index[keep]
  if len(captions) != len(text_to_image):
    raise ValueError(f"{len(captions)} captions but {len(text_to_image)} text_to_image entries")
  image_to_texts = pipeline.image_to_texts(text_to_image, n_images)
  batch_size = min(batch_size, n_images)
  contrastive = [a for a in attacks if a in BATCH_CONTRASTIVE]
  if contrastive and batch_size < 2:
    raise InputError(f"attacks {contrastive} ascend a contrastive loss whose negatives are the other captions of "
                     f"the image's batch; with {batch_size} image per batch there are none and the image is not "
                     "attacked: use a batch size of at least 2 (--batch-size) on at least 2 images")
  batches = _batches(image_to_texts, batch_size)
  caption_list = caption_strings(captions)

  target_tokens = target.tokens(caption_list)
  if itm_k is not None and not rerank.supports_itm(target.encoder):
    raise ValueError(f"itm_k={itm_k}: ITM re-ranking needs a target with an ITM head (BLIP); leave it unset for "
                     f"{type(target.encoder.config).__name__} models")

  # What the attacker needs: its tokenisation, its clean text features (APGD's classes), candidates.
  attacker_tokens = target_tokens if attacker is target else attacker.tokens(caption_list)
  cands = None
  if text_source is not None and any(a in NEEDS_TEXT_SOURCE for a in attacks):
    cands = multimodal.bucketed_candidates(caption_list, attacker.tokenizer, text_source)
  attacker_text_features = None
  if "apgd" in attacks:
    attacker_text_features = jnp.asarray(metrics.embed_texts(attacker.encoder, attacker.params,
                                                              attacker_tokens.input_ids,
                                                              attacker_tokens.attention_mask))

  runs = [(a, None) if a in TEXT_ONLY else (a, e) for a in attacks for e in
          ((None,) if a in TEXT_ONLY else tuple(eps_255))]
  key = jax.random.key(seed)
  # A text stage that several of the runs start with (BERT-, Sep- and Co-Attack's KL BERT-Attack) runs
  # once per batch; its results wait, on the device, for the other runs.
  stages = [attack_spec(a, settings, _eps_pixels(e)).text_stage for a, e in runs]
  shared_stages = {st for st in stages if st is not None and stages.count(st) > 1}

  def attack_batch(run, victims, batch, batch_key, text):
    """One batch of one run on the device: the attack, then the target's features of its images (and their
    tokens for ITM). -> (adversarial images or None, their embeddings, text result, the batch's candidates)."""
    (attack, eps), (attacking, scoring) = run, victims
    adv_images, text_result, batch_cands = _attack_batch(
        attack, attacking, _float_images(eval_set, batch.images), batch, batch_key, eps, settings, attacker_tokens,
        attacker_text_features, text_to_image, cands, text)
    embedded = tokens = None
    if adv_images is not None:
      embedded = metrics.image_embeddings(scoring.encoder, scoring.params, adv_images)
      if itm_k is not None:
        tokens = rerank.batch_image_tokens(scoring.encoder, scoring.params, adv_images)
    return adv_images, embedded, tokens, text_result, batch_cands

  # Parameters committed to devices (restored onto a mesh; host ones, put on the device above, are not): the
  # lowerings would be for parameters without a placement, the calls' for theirs, and each program would
  # compile twice. Such an evaluation compiles each program at its first call.
  committed = _committed(target.params) or _committed(attacker.params)

  def lowerings():
    if committed:
      return []
    return (metrics.retrieval_lowerings(target.encoder, target.params, _float_images_shape(eval_set, n_images),
                                        target_tokens.input_ids, target_tokens.attention_mask, image_batch=batch_size)
            + _attack_lowerings(attack_batch, runs, stages, shared_stages, attacker, target, batches[0], key))

  if lowering_only:
    return lowerings
  if runtime.compile_ahead_enabled():
    started = time.perf_counter()
    if committed:
      done = "parameters committed to devices: each of the evaluation's programs compiles at its first call"
    else:
      try:
        lowered = lowerings()
        precompile.compile_all(lowered)
        done = (f"the evaluation's programs ({len(lowered)} lowerings) compiled in "
                f"{time.perf_counter() - started:.1f} s")
      except MatJaxError:
        raise  # the evaluation's own checks, which the first attack would meet too
      except Exception as err:  # noqa: BLE001  compiling ahead never changes a result: the calls compile
        done = (f"compiling the evaluation's programs ahead failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); each compiles at its first call")
        if log is None:
          warnings.warn(done, RuntimeWarning, stacklevel=2)
    if log is not None:
      log(done)

  # Clean scores, once.
  clean_img = metrics.embed_images(target.encoder, target.params,
                                   _float_images(eval_set, np.arange(n_images)), batch_size)
  clean_txt = metrics.embed_texts(target.encoder, target.params, target_tokens.input_ids,
                                  target_tokens.attention_mask)

  def ranks_of(img, txt, ids, mask, tokens):
    """Ranks by ITC similarity, or re-ranked by ITM (tokens: those of the N images the img features are of)."""
    if itm_k is None:
      return metrics.retrieval_ranks(img @ txt.T, text_to_image)
    i2t, t2i = rerank.itm_rerank(target.encoder, target.params, None, ids, mask, img @ txt.T, k=itm_k,
                                 tokens=tokens)
    return rerank.reranked_ranks(i2t, t2i, text_to_image)

  # ITM re-ranking reads the images' tokens: the clean ones once, for every run that leaves images clean.
  clean_tokens = None if itm_k is None else rerank.image_tokens(
      target.encoder, target.params, _float_images(eval_set, np.arange(n_images)), batch_size)
  clean_ranks = ranks_of(clean_img, clean_txt, target_tokens.input_ids, target_tokens.attention_mask, clean_tokens)
  clean = metrics.recall_from_ranks(*clean_ranks)

  bar = progress_bar(len(runs) * len(batches), progress)
  results: dict[str, dict[str, Any]] = {}
  stage_results: dict[tuple, Any] = {}
  for (attack, eps), stage in zip(runs, stages, strict=True):
    start = time.perf_counter()
    adv_img = np.zeros_like(clean_img)
    adv_tokens = clean_tokens  # an image attack's run writes its images' tokens into a copy, batch by batch
    adv_ids = np.array(target_tokens.input_ids)
    adv_mask = np.array(target_tokens.attention_mask)
    adv_strings: list[str] | None = None if attacker is target else list(caption_list)
    changed = np.zeros(len(caption_list), bool)  # captions the text attack changed
    flipped = np.zeros(len(caption_list), bool)  # ... that no longer describe their image (judge)
    for batch_index, batch in enumerate(batches):
      # Keys depend on the batch only, not on the attack or eps: every attack and budget starts from
      # the same random direction (common random numbers: comparisons are not noisier than need be).
      batch_key = jax.random.fold_in(key, batch_index)
      stage_key = (stage, batch_index) if stage in shared_stages else None
      # Straight from the device: the adversarial pixels never visit the host.
      adv_images, embedded, tokens, text_result, batch_cands = attack_batch(
          (attack, eps), (attacker, target), batch, batch_key, stage_results.get(stage_key))
      if stage_key is not None:
        stage_results[stage_key] = text_result
      real = slice(0, batch.count)
      if adv_images is not None:
        adv_img[batch.images[real]] = np.asarray(embedded)[real]
        if itm_k is not None:
          if adv_tokens is clean_tokens:
            adv_tokens = jnp.copy(clean_tokens)
          adv_tokens = rerank.put_tokens(adv_tokens, jnp.asarray(batch.images[real]), tokens[:batch.count])
      else:
        adv_img[batch.images[real]] = clean_img[batch.images[real]]
      if text_result is not None:
        flat, caption_ids = batch.real_captions()
        changed[caption_ids] = (np.asarray(text_result.changed_words)[flat] >= 0).any(-1)
        if attacker is target:
          adv_ids[caption_ids] = np.asarray(text_result.input_ids)[flat]
          adv_mask[caption_ids] = np.asarray(text_result.attention_mask)[flat]
        strings = adversarial_captions(batch_cands, text_result) \
            if attacker is not target or judge is not None else None
        for f, c in zip(flat, caption_ids, strict=True):
          if attacker is not target:
            adv_strings[c] = strings[f]
          if judge is not None and changed[c]:
            flipped[c] = not judge(int(caption_index[c]), strings[f])
      bar.update(1)
    if adv_strings is not None:
      tokens = target.tokenizer(adv_strings)
      adv_ids, adv_mask = tokens.input_ids, tokens.attention_mask
    adv_txt = metrics.embed_texts(target.encoder, target.params, adv_ids, adv_mask)
    ranks = ranks_of(adv_img, adv_txt, adv_ids, adv_mask, adv_tokens)
    recall = metrics.recall_from_ranks(*ranks)
    entry = {
        "recall": recall,
        "recall_drop": metrics.recall_drop(clean, recall),
        "asr": metrics.attack_success_rate(clean_ranks, ranks),
    }
    if attack in NEEDS_TEXT_SOURCE:
      entry["captions_changed"] = int(changed.sum())
      if judge is not None:
        # The same adversarial set with every label-flipped caption back to its clean text, ranked as the
        # clean and attacked sets are (ITM re-ranking included). A caption's embedding depends on that
        # caption alone, so restoring its tokens restores its clean embedding row.
        flip = flipped[:, None]
        restored_ranks = ranks_of(adv_img, np.where(flip, clean_txt, adv_txt),
                                  np.where(flip, target_tokens.input_ids, adv_ids),
                                  np.where(flip, target_tokens.attention_mask, adv_mask), adv_tokens)
        entry.update(meaning_preserving_scores(changed, flipped, clean_ranks, restored_ranks))
        if not keep_ranks:
          del entry["ranks_meaning_preserving"]
    entry["seconds"] = time.perf_counter() - start
    if keep_ranks:
      entry["ranks"] = ranks
    results.setdefault(attack, {})[TEXT_ONLY_KEY if eps is None else eps_key(eps)] = entry
    if log is not None:
      where = "" if eps is None else f" eps {eps:g}/255"
      log(f"{attack}{where}: TR@1 {recall['tr@1']:.1f} IR@1 {recall['ir@1']:.1f} "
          f"({time.perf_counter() - start:.1f} s)")
  bar.close()
  out = {
      "target": target.name, "surrogate": None if surrogate is None else surrogate.name,
      "num_images": n_images, "num_texts": int(len(caption_list)),
      "eps_255": [float(e) for e in eps_255], "attacks_run": list(attacks),
      "settings": dataclasses.asdict(settings) | {"batch_size": batch_size, "seed": seed, "itm_k": itm_k,
                                                  "text_source": describe_source(text_source)},
      "clean": clean, "attacks": results,
  }
  if keep_ranks:
    out["clean_ranks"] = clean_ranks
    out["text_to_image"] = text_to_image
  return out


def clean_scoring_compilation(encoder: DualEncoder, tokenizer: Tokenizer, eval_set, *,
                              batch_size: int = 32) -> Callable[[Any], None]:
  """The compilation of `evaluate`'s clean scoring of `eval_set` (the target's image and text embeddings at
  its batch shapes, their ranking) as work for another thread: the host's part (tokenising the captions)
  happens here; the returned function, given the parameters `evaluate` will be given as ShapeDtypeStructs
  (host arrays, as a training run's evaluation passes them: no sharding), only lowers and compiles
  (`metrics.retrieval_lowerings`). The attacks' programs are not among them."""
  n_images = len(eval_set.images)
  images = _float_images_shape(eval_set, n_images)
  tokens = tokenizer(caption_strings(eval_set.captions))
  ids, mask = (jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)
               for a in (tokens.input_ids, tokens.attention_mask))
  # One thread: it compiles beside a training run.
  return lambda params: precompile.compile_all(metrics.retrieval_lowerings(
      encoder, params, images, ids, mask, image_batch=min(batch_size, n_images)), workers=1)


def _committed(params: Any) -> bool:
  """Whether any parameter array is committed to its devices (placed explicitly, e.g. restored onto a mesh)."""
  return any(getattr(x, "committed", False) for x in jax.tree.leaves(params))


def _attack_lowerings(attack_batch: Callable, runs: list[tuple[str, float | None]], stages: list, shared_stages: set,
                      attacker: Victim, target: Victim, batch: _Batch, key: jax.Array) -> list[jax.stages.Lowered]:
  """The lowerings of the programs `evaluate`'s runs call on a batch (`attack_batch`, as the loop calls it, traced
  abstractly in the parameters and the key: nothing runs), each once: every batch has the first one's shapes."""
  def every_run(attacker_params, target_params, batch_key):
    victims = dataclasses.replace(attacker, params=attacker_params), dataclasses.replace(target, params=target_params)
    if attacker is target:
      victims = (victims[0], victims[0])
    stage_results = {}
    for run, stage in zip(runs, stages, strict=True):
      text_result = attack_batch(run, victims, batch, batch_key, stage_results.get(stage))[3]
      if stage in shared_stages:
        stage_results.setdefault(stage, text_result)

  def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

  _, lowerings = precompile.collect(every_run, abstract(attacker.params), abstract(target.params),
                                    jax.eval_shape(lambda: key))
  return lowerings


def label_flip_share(entry: Mapping[str, Any]) -> float | None:
  """An attack's share of label flips among the captions it changed (`meaning_preserving_scores`); None
  when it changed none: NaN in `evaluate`'s results, null in their JSON."""
  share = entry.get("label_flip_share")
  return None if share is None or math.isnan(share) else float(share)


def meaning_preserving_scores(changed: np.ndarray, flipped: np.ndarray, clean_ranks, restored_ranks) -> dict[str, Any]:
  """Meaning-aware scores of one text-perturbing attack (see `evaluate`'s docstring).

  changed / flipped (T,) bool: captions the attack changed / changed captions that no longer describe
  their image; restored_ranks: the ranks of the adversarial set with every flipped caption restored,
  computed as the clean ranks were (`clean_ranks`).
  """
  if (flipped & ~changed).any():
    raise ValueError("a caption counts as label-flipped but the attack did not change it")
  n_changed = int(changed.sum())
  return {
      "label_flip_share": float(flipped.sum()) / n_changed if n_changed else float("nan"),
      "recall_meaning_preserving": metrics.recall_from_ranks(*restored_ranks),
      "asr_meaning_preserving": metrics.attack_success_rate(clean_ranks, restored_ranks),
      "ranks_meaning_preserving": restored_ranks,
  }


def shapes_judge(eval_set) -> Callable[[int, str], bool]:
  """The shapes world's judge for `evaluate(judge=...)`: caption i describes its image when it parses to
  a meaning `shapes.consistent` with the image's scene and states as many relations as the set's caption
  i (`shapes.describes`; a caption that does not parse is a label flip)."""
  scenes = getattr(eval_set, "scenes", None)
  if scenes is None:
    raise ValueError("this evaluation set has no scenes; meaning-aware scoring needs the shapes world "
                     "(mat_jax.data.pipeline.load_eval_set on a built shapes dataset)")
  owners = np.asarray(eval_set.text_to_image)
  originals = caption_strings(eval_set.captions)

  def judge(caption_index: int, caption: str) -> bool:
    return shapes.describes(caption, scenes[int(owners[caption_index])], original=originals[caption_index])

  return judge


def shapes_meaning_filter(eval_set) -> Callable[[Sequence[str], int, str], bool]:
  """The shapes world's meaning filter for `candidates.MeaningFilteredSource`: a substitute is kept when
  the caption with it still describes the image of every caption of the set with that text (a caption
  shared by two images must stay true of both; `shapes.describes`, as `shapes_judge` scores)."""
  scenes = getattr(eval_set, "scenes", None)
  if scenes is None:
    raise InputError("this evaluation set has no scenes; the meaning filter checks captions against the "
                     "shapes world's scenes (--data shapes)")
  owners = np.asarray(eval_set.text_to_image)
  of_text: dict[tuple[str, ...], list[tuple[Any, str]]] = {}
  for index, caption in enumerate(caption_strings(eval_set.captions)):
    of_text.setdefault(tuple(caption.split()), []).append((scenes[int(owners[index])], caption))
  cut: dict[tuple[str, ...], list[tuple[tuple[str, ...], Any, str]]] = {}

  def captions_of(words: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any, str]]:
    """The set's captions with these words, as (all their words, scene, caption); a caption longer than
    the context reaches the source cut to its first words (`prepare_candidates`): those it begins."""
    if words in of_text:
      return [(words, scene, original) for scene, original in of_text[words]]
    if words not in cut:
      cut[words] = [(full, scene, original) for full, described in of_text.items() if full[:len(words)] == words
                    for scene, original in described]
    return cut[words]

  def keeps_meaning(words: Sequence[str], position: int, substitute: str) -> bool:
    described = captions_of(tuple(words))
    if not described:  # a caption outside the set: nothing to check it against
      return False
    return all(shapes.describes(" ".join([*full[:position], substitute, *full[position + 1:]]), scene,
                                original=original) for full, scene, original in described)

  return keeps_meaning


def _eps_pixels(eps_255: float | None) -> float | None:
  return None if eps_255 is None else float(eps_255) / 255.0


def attack_spec(attack: str, s: AttackSettings, eps: float | None) -> attack_specs.AttackSpec:
  """The registry's `attack` at the evaluation's budget: eps (pixel units; None for text-only attacks),
  the settings' steps (APGD: apgd_steps), the step rule (scale * eps / steps; Co-Attack's scale for its
  loss), norm, words changed, Co-Attack's alpha and Sep-Attack's image loss."""
  spec = attack_specs.get(attack)
  changes: dict[str, Any] = dict(norm=s.norm, max_changes=s.max_changes, alpha=s.alpha)
  loss = s.sep_image_loss if attack == "sep" else spec.loss
  if spec.attacks_image:
    # Co-Attack's step rule goes with Co-Attack's image losses: its own, and the image-only KL of its code's
    # Sep-Attack.
    changes.update(eps=eps, steps=s.apgd_steps if loss == "apgd_ce" else s.steps, step_size=None,
                   step_scale=s.co_step_scale if loss in ("co", "kl") else s.step_scale)
  if attack == "sep":
    changes["loss"] = loss
  return spec.replace(**changes)


def _attack_batch(attack: str, v: Victim, images: np.ndarray, batch: _Batch, key, eps_255, s: AttackSettings,
                  tokens, text_features, text_to_image, cands, text=None):
  """One batch of one attack on the attacker model -> (adversarial images or None, text result or None,
  the batch's candidates). text: the batch's result of the attack's text stage, if another attack ran it."""
  spec = attack_spec(attack, s, _eps_pixels(eps_255))
  batch_cands = multimodal.select_candidates(cands, batch.captions.reshape(-1)) if spec.attacks_text else None
  positives = None
  if text_features is not None:
    positives = jnp.asarray(text_to_image[None, :] == batch.images[:, None])
  inputs = AttackInputs(jnp.asarray(images), jnp.asarray(tokens.input_ids[batch.captions]),
                        jnp.asarray(tokens.attention_mask[batch.captions]), jnp.asarray(batch.weights),
                        jnp.asarray(batch.images), batch_cands, text_features, positives)
  result = run_attack(spec, v.encoder, v.params, inputs, key, text=text)
  return result.images, result.text, batch_cands


def progress_bar(total: int, enabled: bool) -> tqdm:
  """The bar of an evaluation's attack batches, on stderr; disabled, its `update` and `close` do nothing."""
  return tqdm(total=total, desc="attacking", unit="batch", file=sys.stderr, disable=not enabled)


# ----------------------------------------------------------------------------------------------------
# Reporting: table, JSON, plot
# ----------------------------------------------------------------------------------------------------

# Below every table: what the recall columns' abbreviations stand for.
RECALL_FOOTER = ("tr = text retrieval (image -> text), ir = image retrieval (text -> image); "
                 "@k: a right match in the top k")


def _l2(results: dict) -> bool:
  return results.get("settings", {}).get("norm") == "l2"


def settings_line(results: dict) -> str:
  """The settings the numbers hold for, for titles: the norm, the steps, the seed and the batch size
  (the contrastive attacks' negatives and the random starts depend on it), a meaning filter on the
  text attacks' substitutes and ITM re-ranking when they were applied."""
  s = results.get("settings", {})
  parts = ["L2 radius in 1/255 units" if _l2(results) else "L-inf eps in 1/255 units"]
  if "steps" in s:
    apgd = f" (APGD {s['apgd_steps']})" if "apgd" in results.get("attacks", {}) and "apgd_steps" in s else ""
    parts.append(f"{s['steps']} steps{apgd}")
  parts += [f"{name} {s[key]}" for key, name in (("seed", "seed"), ("batch_size", "batch size")) if key in s]
  if (s.get("text_source") or {}).get("meaning_filter"):
    parts.append("text substitutes meaning-filtered (no label flips)")
  if s.get("itm_k"):
    parts.append(f"ITM re-ranking of the top {s['itm_k']}")
  return ", ".join(parts)


def table_rows(results: dict) -> tuple[list[str], list[list[Any]]]:
  """Header and rows; with meaning-aware scores, also the label-flip share and the ASR of the
  meaning-preserving attack ("-" where an attack changes no text)."""
  entries = [r for per_eps in results["attacks"].values() for r in per_eps.values()]
  meaning = any("label_flip_share" in r for r in entries)
  budget = "L2 radius(/255)" if _l2(results) else "Linf eps(/255)"
  header = ["attack", budget, *metrics.RECALL_KEYS, "drop tr@1", "drop ir@1", "ASR tr@1", "ASR ir@1"]
  if meaning:
    header += ["flips %", "ASR-mp tr@1", "ASR-mp ir@1"]
  rows = [["clean", "-", *(results["clean"][k] for k in metrics.RECALL_KEYS), "-", "-", "-", "-"]
          + ["-"] * (3 * meaning)]
  for attack, per_eps in results["attacks"].items():
    for eps, r in per_eps.items():
      row = [attack, "-" if eps == TEXT_ONLY_KEY else eps, *(r["recall"][k] for k in metrics.RECALL_KEYS),
             *(r["recall_drop"][k] for k in SUMMARY_KEYS), *(r["asr"][k] for k in SUMMARY_KEYS)]
      if meaning:
        row += ([100 * r["label_flip_share"], *(r["asr_meaning_preserving"][k] for k in SUMMARY_KEYS)]
                if "label_flip_share" in r else ["-"] * 3)
      rows.append(row)
  return header, rows


def format_table(results: dict, title: str | None = None) -> str:
  """The results as an aligned text table (recalls and drops in %, ASR in % of the clean hits; flips in %
  of the changed captions; ASR-mp: the meaning-preserving attack's ASR): the title, the `settings_line`
  of an evaluation's results, the table and `RECALL_FOOTER`."""
  header, rows = table_rows(results)
  cells = [[c if isinstance(c, str) else f"{c:.1f}" for c in row] for row in rows]
  lines = [title] if title else []
  if "settings" in results:
    lines.append(settings_line(results))
  lines += tables.aligned(header, cells)
  lines.append(RECALL_FOOTER)
  return "\n".join(lines)


def write_json(results: dict, path: str | Path) -> Path:
  """results.json; NaN (an ASR with no correct query before the attack) becomes null."""
  def clean(value):
    if isinstance(value, dict):
      return {k: clean(v) for k, v in value.items() if k not in RANK_KEYS}
    if isinstance(value, (list, tuple)):
      return [clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
      return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
      return int(value)
    return value

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(clean(results), indent=1, allow_nan=False)
  # An interrupted write leaves the earlier results.json whole.
  return paths.write_text_atomically(path, text)


def plot_recall(results: dict, path: str | Path, *, keys: Sequence[str] = SUMMARY_KEYS) -> Path:
  """R@1 against eps, one line per image/multimodal attack; clean and text-only attacks as flat lines."""
  import matplotlib  # deferred: a heavy import that only plotting needs
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
  for ax, key in zip(axes[0], keys, strict=True):
    ax.axhline(results["clean"][key], color="black", linestyle=":", label="clean")
    for attack, per_eps in results["attacks"].items():
      if TEXT_ONLY_KEY in per_eps:
        ax.axhline(per_eps[TEXT_ONLY_KEY]["recall"][key], linestyle="--", color="grey", label=attack)
        continue
      eps = sorted(per_eps, key=float)
      ax.plot([float(e) for e in eps], [per_eps[e]["recall"][key] for e in eps], marker="o", label=attack)
    ax.set_xlabel("L2 radius (x 1/255)" if _l2(results) else "L-inf eps (x 1/255)")
    ax.set_ylabel(f"{key.upper()} (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  title = f"{results['target']}" + (f" (attacks from {results['surrogate']})" if results.get("surrogate") else "")
  fig.suptitle(f"{title}\n{settings_line(results)}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def load_victim(source: str, tokenizer: str | None = None, **options: Any) -> Victim:
  """A model by source (`mat_jax.runs.load_model`: "shapes", "cache:NAME", a mat_jax training run
  directory, a transformers-layout directory or a hub id) with its tokenizer: `tokenizer` when given, else
  the one stored with the model, else the one beside it (the shapes world's for cached runs).
  `options`: execution options of the model (dtype, scan_layers, attention, remat; see CLIPConfig). A cached run
  must be trained already (`mat_jax.training.loop.ensure_cached_run`; the command line does it)."""
  model, tok = runs_lib.load_model(source)
  if options:
    model = runs_lib.with_options(model, **options)
  context = model.config.text.context_length
  if tokenizer is not None:
    tok = runs_lib.resolve_tokenizer(tokenizer, context)
  if tok is None:
    # The tokenizer beside the weights; a cached run without one is a shapes-world model.
    tok = runs_lib.resolve_tokenizer(runs_lib.SHAPES_SOURCE if runs_lib.cached_name(source) else source, context)
  return Victim.of(model, tokenizer=tok, name=source)


def load_dataset(name: str, tokenizer: Tokenizer, image_size: int, *, split: str = "test",
                 data_dir: str | None = None, limit: int | None = None, log: Callable[[str], None] = print,
                 rare_form_rate: float | None = None):
  """An EvalSet: the shapes world (built on first use at the model's image size; `rare_form_rate` picks its
  lexicon, `shapes.form_picker`) or a built corpus."""
  world = {} if rare_form_rate is None else {"rare_form_rate": rare_form_rate}
  if world and name != "shapes":
    raise ValueError(f"rare_form_rate is a shapes-world option; {name!r} is a built corpus")
  builder = corpora.dataset_builder(name, image_size, data_dir, log=log, **world)
  return pipeline.load_eval_set(corpora.data_source(builder, split), tokenizer, max_images=limit)


def eps_budgets(text: str) -> list[float]:
  """The argparse type of --eps: "1,2,4" -> [1.0, 2.0, 4.0], budgets in 1/255 units checked by `check_eps_255`
  before any work (a NaN or infinite budget would be reported as 0% accuracy, or fail writing the results
  after the whole evaluation), a repeat counted once. The pixel-range bound depends on --norm: the command
  checks it with `check_eps_255(args.eps, args.norm)` once the flags are read."""
  try:
    budgets = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
  try:
    return check_eps_255(budgets, norm=None, name=repr(text))
  except InputError as err:
    raise argparse.ArgumentTypeError(str(err)) from None


def comma_names(choices: Sequence[str], what: str = "attacks") -> Callable[[str], list[str]]:
  """An argparse type: a comma list of names, each one of `choices`."""
  def parse(text: str) -> list[str]:
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))  # a repeat counts once
    unknown = [n for n in names if n not in choices]
    if unknown:
      raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {','.join(choices)}")
    return names
  return parse


if __name__ == "__main__":
  # `python -m mat_jax.evaluate`: the command line sits above the training layer (it trains a cached model
  # when asked for one), so it lives in its own module, imported only here.
  from mat_jax import evaluate_cli
  sys.exit(evaluate_cli.main())
