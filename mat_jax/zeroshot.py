"""Zero-shot classification, clean and under attack: TeCoA's and FARE's headline robustness metric.

    python -m mat_jax.evaluate --task zeroshot --model shapes --data shapes-colour-shape --eps 1,2,4
    python -m mat_jax.evaluate --task zeroshot --model ./clip-vit-b-16 --data ./imagenet_val --limit 1000

A class is the average of its prompts' L2-normalised text embeddings, normalised again (CLIP's prompt
ensembling; TeCoA and FARE evaluate this way). An image's logits are the model's temperature (its
clamped exp(logit_scale)) x the cosines to the classes; its prediction is the top class. The attacks
maximise a classification loss on these logits inside the eps-ball (L-inf by default, eps in 1/255
units), with the step rules of `mat_jax.attacks.image`:

- `apgd-ce`: APGD on the cross-entropy (AutoAttack's first attack);
- `apgd-t`: APGD-T, one APGD run on the targeted DLR loss per target class, the targets being each
  image's `n_targets` (9) highest-scoring wrong classes at the clean image (AutoAttack's second attack;
  the pair is what RobustBench runs and what FARE reports). It needs at least 4 classes (the loss's
  denominator uses the 4th largest logit), so on 3-class sets it is left out of the default list;
- `pgd`: PGD on the cross-entropy, step 2.5 eps / steps, symmetric random start.

Accuracy is reported clean, per attack and budget, and robust: an image counts as robustly classified at
a budget when it is classified correctly clean and after every attack run at that budget (the worst
case per image, as AutoAttack's ensemble). Every attack batch is one jitted call that returns only the
per-image correctness; eps and the step size are traced, so each attack compiles once per batch shape.

Data (`--data`): `shapes-colour-shape` and `shapes-count` (`mat_jax.data.classification`, rendered at the
model's resolution) or a path to an ImageFolder directory (`mat_jax.data.imagefolder`, built once into
the data directory). The model is any `DualEncoder`-style encoder: `image_embeddings`, `text_embeddings`
and `temperature` of explicit parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax import checks, errors, metrics, precompile, runtime, tables
from mat_jax import evaluate as ev
from mat_jax.attacks import image as image_attacks
from mat_jax.attacks import losses
from mat_jax.attacks import spec as attack_specs
from mat_jax.data import classification, imagefolder, pipeline
from mat_jax.data.classification import SHAPES_TASKS, ClassificationSet
from mat_jax.models.clip import check_tokens_for
from mat_jax.models.tokenizers import Tokenizer

ATTACKS = ("apgd-ce", "apgd-t", "pgd")
DATASETS = tuple(f"shapes-{t}" for t in SHAPES_TASKS)
# Prompts for photographs of a class, CLIP-style (`{}` is the class name).
DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.",
                     "a bright photo of a {}.", "a cropped photo of the {}.", "a photo of the small {}.",
                     "a photo of the large {}.")
TARGETED_MIN_CLASSES = 4  # the targeted DLR loss reads the 4 largest logits


class ZeroShotError(errors.InputError):
  """Bad zero-shot input (class names, prompts, attack settings); the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Attack hyper-parameters; the defaults are the references' (AutoAttack's APGD, Madry's PGD step)."""
  apgd_steps: int = 100       # APGD-CE and each APGD-T run (FARE's evaluation)
  n_targets: int = 9          # APGD-T targets (AutoAttack), capped at classes - 1 (`targets_per_image`)
  restarts: int = 1           # APGD-CE restarts
  pgd_steps: int = 10
  pgd_step_scale: float = attack_specs.SGA_STEP_SCALE  # PGD step = pgd_step_scale * eps / pgd_steps
  norm: str = "linf"


# ----------------------------------------------------------------------------------------------------
# Classes from prompts
# ----------------------------------------------------------------------------------------------------

def prompts_from_templates(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
  """Each class's prompts: every template with `{}` replaced by the class name."""
  if not templates:
    raise ZeroShotError("no prompt templates given; pass at least one, e.g. 'a photo of a {}.'")
  missing = [t for t in templates if "{}" not in t]
  if missing:
    raise ZeroShotError(f"prompt templates {missing} have no '{{}}' where the class name goes")
  # Only "{}" is a field: other braces ("{style}", a lone "{") are the template's own text.
  return [[t.replace("{}", name) for t in templates] for name in class_names]


def _meaningful_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
  """The ids of `text`'s words that are neither special nor unknown tokens."""
  unknown = getattr(tokenizer.hf, "unk_token_id", None)
  special = {tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id, unknown}
  return [i for piece in tokenizer.encode_words(text.split()) for i in piece if i not in special]


def check_classes(tokenizer: Tokenizer, class_names: Sequence[str], prompts: Sequence[Sequence[str]],
                  names_in_prompts: bool) -> None:
  """Raise a ZeroShotError naming every class whose name (when prompts are made from it) or prompts
  tokenise to nothing the model knows, every duplicate, and every prompt the context cannot hold."""
  if len(class_names) < 2:
    raise ZeroShotError(f"zero-shot classification needs at least 2 classes, got {list(class_names)}")
  duplicates = sorted({n for n in class_names if list(class_names).count(n) > 1})
  if duplicates:
    raise ZeroShotError(f"class names {duplicates} occur more than once: their prompts, and so their "
                        "classes, would be identical; rename the classes (folders)")
  if names_in_prompts:
    empty = [n for n in class_names if not _meaningful_tokens(tokenizer, n)]
    if empty:
      raise ZeroShotError(f"class names {empty} tokenise to nothing the model knows (no token, or only unknown "
                          "tokens): their class embedding would not depend on the class. Rename them with words "
                          "in the tokenizer's vocabulary")
  empty_prompts = [name for name, ps in zip(class_names, prompts, strict=True)
                   if not ps or not any(_meaningful_tokens(tokenizer, p) for p in ps)]
  if empty_prompts:
    raise ZeroShotError(f"the prompts of classes {empty_prompts} tokenise to nothing the model knows; give "
                        "prompts in the tokenizer's vocabulary")
  # Names that differ only where the tokenizer does not look (case, under a lowercasing tokenizer) give
  # identical prompts too: the later class could never be predicted, ties going to the lower index.
  flat = [p for ps in prompts for p in ps]
  encoded = [tuple(p) for p in tokenizer.encode_words(flat)]
  pieces = iter(encoded)
  classes: dict[tuple, list[str]] = {}
  for name, ps in zip(class_names, prompts, strict=True):
    classes.setdefault(tuple(next(pieces) for _ in ps), []).append(name)
  same = [names for names in classes.values() if len(names) > 1]
  if same and names_in_prompts:
    alone = [tuple(ids) for ids in tokenizer.encode_words(list(same[0]))]
    if len(set(alone)) == len(alone):  # the names differ; the templates around them hide it
      example = prompts[list(class_names).index(same[0][0])][0]
      raise ZeroShotError(f"classes {same[0]} tokenise apart alone but identically inside their prompts (e.g. "
                          f"{example!r}): the templates' punctuation or wording joins the class words into tokens "
                          "the tokenizer does not know. Give templates that keep the word apart, e.g. --template "
                          "'a photo of a {}'")
  if same:
    raise ZeroShotError(f"classes {same[0]} have prompts that tokenise identically (the tokenizer "
                        f"{'lowercases' if same[0][0].lower() == same[0][1].lower() else 'does not tell them apart'}"
                        "): their class embeddings would be the same; rename or merge the classes (folders)")
  frame = int(tokenizer.start_id is not None) + int(tokenizer.end_id is not None)
  long = [p for p, ids in zip(flat, encoded, strict=True) if len(ids) + frame > tokenizer.context_length]
  if long:
    raise ZeroShotError(f"{len(long)} prompt(s) exceed the model's context of {tokenizer.context_length} tokens "
                        f"and would be cut (e.g. {long[0]!r}); use shorter class names or templates")


def class_embeddings(encoder, params, tokenizer: Tokenizer, prompts: Sequence[Sequence[str]],
                     batch_size: int = 1024) -> np.ndarray:
  """(C, D) class embeddings: each class's prompt embeddings (L2-normalised) averaged, then normalised."""
  flat = [p for ps in prompts for p in ps]
  owner = np.repeat(np.arange(len(prompts)), [len(ps) for ps in prompts])
  tokens = tokenizer(flat)
  text_cfg = getattr(getattr(encoder, "config", None), "text", None)
  if text_cfg is not None:
    check_tokens_for(tokens.input_ids, tokens.attention_mask, tokenizer.end_id, text_cfg, name="tokenizer")
  emb = metrics.embed_texts(encoder, params, tokens.input_ids, tokens.attention_mask, batch_size)
  sums = np.zeros((len(prompts), emb.shape[1]), np.float64)
  np.add.at(sums, owner, emb.astype(np.float64))
  mean = sums / np.bincount(owner, minlength=len(prompts))[:, None]
  return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Accuracy arithmetic
# ----------------------------------------------------------------------------------------------------

def correct_predictions(logits, labels) -> np.ndarray:
  """(N,) bool: the top class (lowest index on ties) is the label."""
  return np.argmax(np.asarray(logits), axis=-1) == np.asarray(labels)


def accuracy(correct) -> float:
  """Percentage of True entries."""
  correct = np.asarray(correct, bool)
  if correct.size == 0:
    raise ZeroShotError("accuracy of no images: evaluate at least one")
  return 100.0 * float(np.mean(correct))


def robust_correct(clean: np.ndarray, per_attack: Sequence[np.ndarray]) -> np.ndarray:
  """Correct clean and under every attack: the worst case per image."""
  out = np.asarray(clean, bool).copy()
  for c in per_attack:
    out &= np.asarray(c, bool)
  return out


def targets_per_image(n_targets: int, num_classes: int) -> int:
  """The target classes APGD-T runs per image: `n_targets`, at most every wrong class."""
  return min(int(n_targets), num_classes - 1)


# ----------------------------------------------------------------------------------------------------
# Compiled batches
# ----------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _clean_logits(encoder, params, classes, images):
  return losses.retrieval_logits(encoder, params, classes)(images)


@functools.partial(jax.jit, static_argnums=(0, 8, 9, 10, 11, 12))
def _attack_correct(encoder, params, classes, images, labels, key, eps, step_size, attack, steps, norm,
                    n_targets, restarts):
  """One batch under one attack -> ((B,) bool, correct at the adversarial point; whether every adversarial
  logit is finite). Only these leave the device."""
  logits_fn = losses.retrieval_logits(encoder, params, classes)
  positives = jax.nn.one_hot(labels, classes.shape[0], dtype=jnp.bool_)
  if attack == "apgd-ce":
    adv = image_attacks.apgd(losses.logit_loss(logits_fn, positives), images, key, eps=eps, steps=steps, norm=norm,
                             restarts=restarts)
  elif attack == "apgd-t":
    adv = image_attacks.apgd_targeted(logits_fn, positives, images, key, eps=eps, steps=steps,
                                      n_targets=n_targets, norm=norm)
  elif attack == "pgd":
    adv = image_attacks.pgd(losses.logit_loss(logits_fn, positives), images, key, eps=eps, step_size=step_size,
                            steps=steps, norm=norm)
  else:
    raise ValueError(f"unknown attack {attack!r}; choose from {ATTACKS}")
  logits = logits_fn(adv)
  return jnp.argmax(logits, axis=-1) == labels, jnp.all(jnp.isfinite(logits))


def _check_finite(finite: Any, what: str) -> None:
  """NaN logits argmax to class 0: a broken model would read as accurate on class 0, clean and attacked."""
  if not bool(np.all(finite)):
    raise ZeroShotError(f"{what} are not finite (NaN/inf). Usual causes: NaN weights, non-finite pixels, or "
                        "prompt token ids outside the text model's vocabulary (a tokenizer that does not belong "
                        "to the model)")


def check_settings(settings: Settings, *, min_steps: int = 1) -> None:
  """The attack settings, on the host: integer counts (a float would be truncated), steps >= `min_steps`
  (an evaluation attacks; `attack_correct` may run the random start alone), targets and restarts >= 1,
  the PGD step scale a finite number >= 0 (a negative one descends the loss), a known norm."""
  for field in ("apgd_steps", "pgd_steps", "n_targets", "restarts"):
    value = getattr(settings, field)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ZeroShotError(f"Settings.{field} must be an integer, got {value!r} ({type(value).__name__})")
  if min(settings.apgd_steps, settings.pgd_steps) < min_steps or min(settings.n_targets, settings.restarts) < 1:
    steps = "apgd_steps, pgd_steps, n_targets and restarts must be >= 1" if min_steps == 1 else \
        f"apgd_steps and pgd_steps must be >= {min_steps}, n_targets and restarts >= 1"
    raise ZeroShotError(f"{steps}, got {settings}")
  checks.check_nonnegative(settings.pgd_step_scale, name="Settings.pgd_step_scale",
                           hint=" (the PGD step is pgd_step_scale * eps / pgd_steps)")
  attack_specs.check_norm(settings.norm)


def attack_correct(encoder, params, classes, images, labels, key, *, attack: str, eps: float,
                   settings: Settings = Settings()) -> jax.Array:
  """Correctness (B,) of a batch after `attack` at `eps` (pixel units); compiled once per attack and shape."""
  if attack not in ATTACKS:
    raise ZeroShotError(f"unknown attack {attack!r}; choose from {ATTACKS}")
  check_settings(settings, min_steps=0)
  key = image_attacks.checked_key(key, settings.norm, eps=eps)
  n_classes = int(np.shape(classes)[0])
  # Free checks only, as the composable attacks make them: shapes, and the values of host arrays.
  vision = getattr(getattr(encoder, "config", None), "vision", None)
  checks.check_images(images, getattr(vision, "image_size", None), read_device=False)
  if not isinstance(labels, jax.Array):
    labels_host = np.asarray(labels)
    if labels_host.shape != (np.shape(images)[0],) or not np.issubdtype(labels_host.dtype, np.integer):
      raise ZeroShotError(f"labels must be one integer class index per image ({np.shape(images)[0]},), got shape "
                          f"{labels_host.shape} and dtype {labels_host.dtype}")
    if labels_host.size and (labels_host.min() < 0 or labels_host.max() >= n_classes):
      raise ZeroShotError(f"labels must be class indices in [0, {n_classes}), got values from {labels_host.min()} to "
                          f"{labels_host.max()}")
  if attack == "apgd-t" and n_classes < TARGETED_MIN_CLASSES:
    raise ZeroShotError(f"apgd-t's targeted DLR loss needs at least {TARGETED_MIN_CLASSES} classes, this set has "
                        f"{n_classes}; use apgd-ce and pgd")
  correct, finite = _attack_correct(*_attack_arguments(encoder, params, classes, images, labels, key, attack=attack,
                                                       eps=eps, settings=settings))
  _check_finite(finite, f"the logits of the images under {attack}")
  return correct


def _attack_arguments(encoder, params, classes, images, labels, key, *, attack: str, eps: float,
                      settings: Settings) -> tuple:
  """`_attack_correct`'s arguments for one batch, statics positional (jit keys its cache on how they are
  passed); `images` may be a `jax.ShapeDtypeStruct` (a lowering ahead of the call)."""
  n_classes = int(np.shape(classes)[0])
  steps = settings.pgd_steps if attack == "pgd" else settings.apgd_steps
  step_size = attack_specs.step_size_for(eps, settings.pgd_steps, scale=settings.pgd_step_scale)
  return (encoder, params, jnp.asarray(classes), images, jnp.asarray(labels, jnp.int32), key, jnp.float32(eps),
          jnp.float32(step_size), attack, int(steps), settings.norm, targets_per_image(settings.n_targets, n_classes),
          int(settings.restarts))


# ----------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------

def default_attacks(num_classes: int) -> list[str]:
  """Every attack that applies to a set of this many classes (apgd-t needs 4)."""
  return [a for a in ATTACKS if a != "apgd-t" or num_classes >= TARGETED_MIN_CLASSES]


def evaluate_zeroshot(encoder, params, tokenizer: Tokenizer, data: ClassificationSet, *,
                      attacks: Sequence[str] | None = None, eps_255: Sequence[float] = (1.0, 2.0, 4.0),
                      templates: Sequence[str] | None = None, settings: Settings = Settings(),
                      batch_size: int = 64, seed: int = 0, limit: int | None = None, progress: bool = False,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Clean, per-attack and robust zero-shot accuracy of `(encoder, params)` on `data`.

  Prompts: the set's own (the shapes world's), else `templates` (default `DEFAULT_TEMPLATES`) filled with
  the class names. attacks: default every one that applies (`default_attacks`). eps_255: budgets in 1/255
  units. Batches have a fixed size (the last is padded by repeating its last image), and every attack
  and budget of a batch starts from the same key (common random numbers).
  Returns {"clean": {"accuracy"}, "attacks": {attack: {eps: {"accuracy", "seconds"}}},
  "robust": {eps: {"accuracy"}}, "per_class_clean", "settings", ...}; settings["n_targets"] is the targets
  APGD-T ran (`targets_per_image`), None when it did not run.
  """
  if limit is not None and limit < 1:
    raise ZeroShotError(f"limit={limit}: evaluate at least 1 image (or None for all)")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ZeroShotError(f"batch_size must be an integer >= 1, got {batch_size!r}")  # as retrieval's evaluate
  data = data.take(limit)
  if len(data) == 0:
    raise ZeroShotError(f"{data.name} holds no images")
  check_settings(settings)
  eps_255 = ev.check_eps_255(eps_255, settings.norm)  # as retrieval: one results key per budget, run once
  n_classes = len(data.class_names)
  # One name is a list of one, as in retrieval's evaluate (not its letters).
  attacks = default_attacks(n_classes) if attacks is None else checks.names(attacks, name="attacks")
  if not attacks:
    raise ZeroShotError("no attack given: robust accuracy over no attack would be the clean accuracy; name at "
                        f"least one of {ATTACKS} (or None for all that apply)")
  unknown = [a for a in attacks if a not in ATTACKS]
  if unknown:
    raise ZeroShotError(f"unknown attacks {unknown}; choose from {ATTACKS}")
  if "apgd-t" in attacks and n_classes < TARGETED_MIN_CLASSES:
    raise ZeroShotError(f"apgd-t's targeted DLR loss needs at least {TARGETED_MIN_CLASSES} classes; {data.name} has "
                        f"{n_classes}. Leave apgd-t out (--attacks apgd-ce,pgd)")
  names_in_prompts = data.prompts is None
  if templates and not names_in_prompts:
    raise ZeroShotError(f"{data.name} brings its own prompts per class; templates apply to sets without them "
                        "(e.g. an ImageFolder)")
  prompts = prompts_from_templates(data.class_names, templates or DEFAULT_TEMPLATES) if names_in_prompts \
      else [list(p) for p in data.prompts]
  check_classes(tokenizer, data.class_names, prompts, names_in_prompts)
  # Values on the host, as retrieval checks them: float pixels in [0, 255] would be clipped into [0, 1] by
  # the attacks but not by the clean pass, and report nonsense.
  checks.check_images(data.images, name=f"{data.name} images", allow_uint8=True)
  params = jax.device_put(params)  # once: host parameters would be uploaded again by every jitted call
  classes = jnp.asarray(class_embeddings(encoder, params, tokenizer, prompts))
  _check_finite(jnp.isfinite(classes), "the class embeddings")

  n = len(data)
  batch_size = min(batch_size, n)
  batches = metrics.fixed_size_batches(n, batch_size)  # the last one filled up with repeats of the last image
  labels = np.asarray(data.labels, np.int32)
  clean_logits = np.concatenate([np.asarray(_clean_logits(encoder, params, classes,
                                                          pipeline.float_pixels(data.images[idx])))[:real]
                                 for idx, real in batches])
  _check_finite(np.isfinite(clean_logits), "the clean images' logits")
  clean = correct_predictions(clean_logits, labels)
  per_class = {name: (accuracy(clean[labels == c]) if np.any(labels == c) else None)
               for c, name in enumerate(data.class_names)}
  if log:
    log(f"{data.name}: {n} images, {n_classes} classes; clean accuracy {accuracy(clean):.1f}%")

  key = jax.random.key(seed)
  if runtime.compile_ahead_enabled():
    # One program per attack (the budget is traced), compiled at once on the host's cores before the first
    # batch (docs/performance.md#an-evaluations-programs-at-once).
    started = time.perf_counter()
    images = jax.ShapeDtypeStruct((batch_size,) + tuple(np.shape(data.images)[1:]), np.float32)
    first = batches[0][0]
    precompile.compile_all([_attack_correct.lower(*_attack_arguments(
        encoder, params, classes, images, labels[first], jax.random.fold_in(key, 0), attack=attack,
        eps=eps_255[0] / 255.0, settings=settings)) for attack in attacks])
    if log:
      log(f"the attacks' {len(attacks)} programs compiled in {time.perf_counter() - started:.1f} s")
  bar = ev.progress_bar(len(attacks) * len(eps_255) * len(batches), progress)
  results: dict[str, dict[str, Any]] = {}
  robust: dict[str, dict[str, float]] = {}
  for eps in eps_255:
    budget = ev.eps_key(eps)
    under_attack = []
    for attack in attacks:
      start = time.perf_counter()
      correct = np.zeros(n, bool)
      for b, (idx, real) in enumerate(batches):
        # The key depends on the batch only: every attack and budget starts from the same draw.
        images = jnp.asarray(pipeline.float_pixels(data.images[idx]))
        out = attack_correct(encoder, params, classes, images, labels[idx], jax.random.fold_in(key, b),
                             attack=attack, eps=eps / 255.0, settings=settings)
        correct[idx[:real]] = np.asarray(out)[:real]
        bar.update(1)
      # An image misclassified clean is not robust, whatever the attack returned.
      correct &= clean
      under_attack.append(correct)
      seconds = time.perf_counter() - start
      results.setdefault(attack, {})[budget] = {"accuracy": accuracy(correct), "seconds": seconds}
      if log:
        log(f"{attack} eps {budget}/255: accuracy {accuracy(correct):.1f}% ({seconds:.1f} s)")
    robust[budget] = {"accuracy": accuracy(robust_correct(clean, under_attack))}
  bar.close()
  # The targets APGD-T ran (the request capped by the classes), not the request; None when it did not run.
  targets_run = targets_per_image(settings.n_targets, n_classes) if "apgd-t" in attacks else None
  return {
      "dataset": data.name, "num_images": n, "num_classes": n_classes, "class_names": list(data.class_names),
      "prompts_per_class": [len(p) for p in prompts], "templates": None if not names_in_prompts else
      list(templates or DEFAULT_TEMPLATES), "eps_255": [float(e) for e in eps_255], "attacks_run": attacks,
      "settings": dataclasses.asdict(settings) | {"n_targets": targets_run, "batch_size": batch_size, "seed": seed},
      "clean": {"accuracy": accuracy(clean)}, "per_class_clean": per_class, "attacks": results, "robust": robust,
  }


# ----------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------

def format_table(results: dict, title: str | None = None) -> str:
  """Accuracy (%) per budget: one column per attack, then the worst case over them."""
  attacks = list(results["attacks"])
  header = ["eps(/255)", *attacks, "robust"]
  rows = [["0 (clean)", *(f"{results['clean']['accuracy']:.1f}" for _ in attacks),
           f"{results['clean']['accuracy']:.1f}"]]
  for eps in map(ev.eps_key, results["eps_255"]):
    rows.append([eps, *(f"{results['attacks'][a][eps]['accuracy']:.1f}" for a in attacks),
                 f"{results['robust'][eps]['accuracy']:.1f}"])
  return "\n".join(([title] if title else []) + tables.aligned(header, rows))


# ----------------------------------------------------------------------------------------------------
# Data (`--data`; the command line is `mat_jax.evaluate_cli`'s)
# ----------------------------------------------------------------------------------------------------

# ImageNet's folder names: WordNet ids, which tokenise to word pieces that name nothing.
_WORDNET_ID = re.compile(r"n\d{8}")


def load_data(name: str, image_size: int, *, split: str = "test", num_images: int = 980, seed: int = 0,
              data_dir: str | None = None, limit: int | None = None, class_names: str | None = None,
              log: Callable[[str], None] = print) -> ClassificationSet:
  """`shapes-colour-shape`, `shapes-count` (`num_images` rendered at `image_size`) or an ImageFolder
  directory; `limit` then keeps that many images, the classes in turn (`classification.classes_in_turn`).
  class_names: an ImageFolder's class names file (`read_class_names`); without one, folders named by
  WordNet ids (ImageNet's) are refused: their prompts would name nothing."""
  if name in DATASETS:
    # All `num_images` are rendered first: the first `limit` scenes would follow shapes-count's 20/40/40 mix.
    rendered = classification.shapes_set(name.removeprefix("shapes-"), num_images=num_images, image_size=image_size,
                                         seed=seed, split=split)
    return rendered.take(limit)
  builder = imagefolder.build_image_folder(_image_folder(name), image_size=image_size, data_dir=data_dir, log=log)
  data = imagefolder.load_classification_set(builder, split, limit)
  if class_names:
    return dataclasses.replace(data, class_names=read_class_names(class_names, data.folders))
  if all(_WORDNET_ID.fullmatch(f) for f in data.folders):
    raise ZeroShotError(f"{data.name}: the class folders are WordNet ids ({data.folders[0]}, ...), which name "
                        "nothing in a prompt; give the classes' names with --class-names FILE")
  return data


def check_data(name: str, *, num_images: int, split: str, attacks: Sequence[str] | None) -> None:
  """What `load_data` and the attacks would refuse, known from the request alone: checked before a cached
  model is trained (minutes). attacks None: every attack that applies (`default_attacks`)."""
  if name not in DATASETS:
    _image_folder(name)
    return
  classification.check_request(num_images, split)
  n_classes = len(classification.shapes_class_names(name.removeprefix("shapes-")))
  if attacks and "apgd-t" in attacks and n_classes < TARGETED_MIN_CLASSES:
    raise ZeroShotError(f"apgd-t's targeted DLR loss needs at least {TARGETED_MIN_CLASSES} classes; {name} has "
                        f"{n_classes}. Leave apgd-t out (--attacks apgd-ce,pgd)")


def _image_folder(name: str) -> Path:
  """--data as an ImageFolder directory, or the error that names what --data may be."""
  path = Path(name).expanduser()
  if not path.is_dir():
    raise ZeroShotError(f"--data {name!r} is neither {' nor '.join(DATASETS)} nor an image folder (a directory "
                        "of class-named folders of images)")
  return path


def read_class_names(path: str | os.PathLike, folders: Sequence[str]) -> tuple[str, ...]:
  """The classes' names from `path`: one per line in the folders' (sorted) order, or a JSON object mapping
  every folder to its name."""
  path = Path(path).expanduser()
  try:
    text = path.read_text(encoding="utf-8")
  except OSError as err:
    raise ZeroShotError(f"--class-names {path}: cannot read it ({err.strerror or err})") from None
  if text.lstrip().startswith("{"):
    try:
      mapping = json.loads(text)
    except ValueError as err:
      raise ZeroShotError(f"--class-names {path} is not valid JSON: {err}") from None
    missing = [f for f in folders if f not in mapping]
    extra = sorted(set(mapping) - set(folders))
    if missing or extra or not all(isinstance(v, str) and v.strip() for v in mapping.values()):
      raise ZeroShotError(f"--class-names {path} must map every class folder to a non-empty name: missing "
                          f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unknown {extra[:5]}")
    return tuple(mapping[f].strip() for f in folders)
  names = [line.strip() for line in text.splitlines() if line.strip()]
  if len(names) != len(folders):
    raise ZeroShotError(f"--class-names {path} holds {len(names)} names for {len(folders)} class folders; give "
                        "one per line, in the sorted folders' order")
  return tuple(names)
