"""Recipes for experiment files: the settings experiments share, and the parsing of their argument.

This is the module to read (and extend) when writing an experiment file (big_vision's `configs/common.py`).
An experiment file in experiments/ is data: `get_config(arg)` reads its argument with `parse_arg`, calls
the recipe of its setting and shrinks it with a `runlocal` function when asked. What two files share is a
function here, never an import of one experiment file by another. docs/training.md shows how to write one.

Arguments (`FILE.py:ARG`):

- `parse_arg(arg, **defaults)`: "mat,runlocal" or "runlocal,steps=10" -> typed values; an unknown key, a
  value outside its choices or of the wrong type is a `ConfigError` listing what the file understands.

The shapes world (tiny CLIP and BLIP on a procedural world; the demo and the study):

- `pretrain()`: clean contrastive pretraining of the tiny CLIP from random weights, long enough that
  more steps no longer move its clean recall much (docs/results/shapes_study.md shows the curve). Every
  defense starts from this checkpoint ("cache:shapes_clip").
- `finetune(method)`: ONE fine-tuning budget for every method: the same starting checkpoint, steps,
  global batch (images), optimizer, schedule, image size, inner attack budget (ε, PGD steps, step size)
  and text threat. Only what defines a method varies: its objective and hyper-parameters, the towers it
  trains (the published choice: vision for FARE and MAVA, all for the cross-modal objectives, TeCoA-ITR
  included), and for the one-to-many methods the captions per image and augmentations. Its one
  departure, `steps_factor`, is for compute-matched controls: k times the steps for a method whose step
  costs a k-th of another's; `eps_255` moves the whole budget to another ε, for every method alike.
- `shapes_base(name)`: name, seed and data of any shapes-world experiment (experiments/shapes_blip.py).
- `runlocal(config)`: shrinks any of them to a smoke test (a random tiny model, a few steps) in one place.

Experiment files return `finetune("mat")` etc.; the study (`mat_jax.study`) builds its arms from the
same function with `variant` changes, so an experiment file and a study arm of one method are the same run.

Real corpora (Flickr30k, COCO) with the published models and each paper's settings:

- `corpus_base(name, dataset, image_size)`: the text threat (BERT-Attack with bert-base-uncased), the
  evaluation and the mesh every such run shares;
- `published_defense(config, defense)`: a defense's objective, towers and data as its paper trains it;
- `clip_vitb16(dataset, train_images, defense)`: CLIP ViT-B/16 fine-tuned on a corpus
  (experiments/flickr30k.py and coco.py);
- `runlocal_corpus(config)`: a smoke test of such a run (the same model and corpus, 4 steps of 8 images).
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Mapping

import ml_collections

from mat_jax import checks, config, objectives
from mat_jax.errors import ConfigError

# ----------------------------------------------------------------------------------------------------
# The argument of an experiment file.

def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.FrozenConfigDict:
  """An experiment file's argument (the text after `FILE.py:`) as typed values, one per key of `defaults`.

  `arg` is a comma-separated list of `key=value` items and bare words. Each default fixes its key's type:
  bool (`true/false/yes/no/1/0`), int, float (`1e-5`, `2/255`) or str; a `(default, choices)` pair is a
  str key whose value must be one of `choices`. A bare word that names a bool key sets it (`runlocal` is
  `runlocal=true`); any other bare word is the value of the FIRST key when that key is a str or a choice
  (`mat,runlocal` with `defense=("mat", DEFENSES), runlocal=False`). A key that is not in `defaults`, a
  value that does not read as its type or is not among its choices, and a key given twice are each a
  `ConfigError` listing the arguments the file understands. `None` or "" gives the defaults.

      args = parse_arg("runlocal,steps=10,dataset=coco", runlocal=False, steps=100, dataset="flickr30k")
      args.runlocal, args.steps, args.dataset   # True, 10, "coco"
  """
  choices = {key: _choices_of(key, spec) for key, spec in defaults.items()}
  values = {key: spec[0] if isinstance(spec, tuple) else spec for key, spec in defaults.items()}
  first = next(iter(defaults), None)
  positional = first if first is not None and isinstance(values[first], str) else None
  given: dict[str, str] = {}
  for item in (part.strip() for part in (arg or "").split(",")):
    if not item:
      continue
    key, sep, text = (part.strip() for part in item.partition("="))
    if not sep:
      if isinstance(values.get(key), bool):
        text = "true"
      elif positional is not None and key not in values and (choices[positional] is None
                                                              or item in choices[positional]):
        key, text = positional, item
      elif key in values:
        raise ConfigError(f"argument {item!r} needs a value: write {key}=<{type(values[key]).__name__}>")
      else:
        raise _unknown_argument(item, defaults)
    if key not in values:
      raise _unknown_argument(key, defaults)
    if key in given:
      raise ConfigError(f"argument {key} is given twice ({given[key]!r} and {item!r})")
    given[key] = item
    values[key] = _read(key, text, values[key], choices[key], defaults)
  return ml_collections.FrozenConfigDict(values)


def _choices_of(key: str, spec: Any) -> tuple[str, ...] | None:
  """The allowed values of a `(default, choices)` key (None for a free one); a bad spec is the file's bug."""
  if isinstance(spec, tuple):
    if len(spec) != 2 or not isinstance(spec[1], (tuple, list)) or spec[0] not in spec[1]:
      raise TypeError(f"parse_arg: {key}={spec!r}: a key with choices is (default, choices) with the default "
                      "among the choices")
    return tuple(spec[1])
  if not isinstance(spec, (bool, int, float, str)):
    # A comma separates the arguments, so a list cannot be one.
    raise TypeError(f"parse_arg: the default of {key!r} is a {type(spec).__name__}; an argument is a bool, "
                    "int, float or str, or (default, choices)")
  return None


def _read(key: str, text: str, default: Any, choices: tuple[str, ...] | None,
          defaults: Mapping[str, Any]) -> Any:
  if choices is not None:
    if text not in choices:
      close = difflib.get_close_matches(text, choices, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"{key}={text!r} is not one of {', '.join(choices)}.{hint} {_understood(defaults)}")
    return text
  return config.parse_scalar(text, default, f"argument {key}={text!r}",
                             bool_hint=f"; write {key}=true or {key}=false (or {key} alone for true)")


def _unknown_argument(item: str, defaults: Mapping[str, Any]) -> ConfigError:
  words = [w for key, spec in defaults.items()
           for w in ([key, *spec[1]] if isinstance(spec, tuple) else [key])]
  close = difflib.get_close_matches(item, words, n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return ConfigError(f"unknown argument {item!r}.{hint} {_understood(defaults)}")


def _understood(defaults: Mapping[str, Any]) -> str:
  """What a file's `parse_arg` call accepts, for an error message."""
  if not defaults:
    return "The file takes no argument."
  parts = []
  for i, (key, spec) in enumerate(defaults.items()):
    if isinstance(spec, tuple):
      part = f"{key}={'|'.join(spec[1])}"
    elif isinstance(spec, bool):
      part = key
    else:
      part = f"{key}=<{type(spec).__name__}>"
    if i == 0 and isinstance(spec, (tuple, str)):
      part += " (or the value alone)"
    parts.append(part)
  return f"Arguments: {', '.join(parts)} (comma-separated)."


# ----------------------------------------------------------------------------------------------------
# The shapes world.

IMAGE_SIZE = 48
EPS_255 = 2.0         # every method's training ε and the evaluation ε, in 1/255 units (MAT's; TeCoA and MMCoA
EPS = EPS_255 / 255   # train at 1/255, MAVA's TeCoA and FARE also at 4/255)
INNER_STEPS = 2       # PGD steps of every inner image attack (MAT's; FARE, MAVA and MMCoA publish 10)
INNER_STEP_SIZE = EPS / INNER_STEPS  # 1/255: the two steps reach the boundary
TEXT_CHANGES = 1      # words the training text attack changes (BERT-Attack as MAT uses it)

# The text threat: the shapes-world BERT MLM (top-k 10, no meaning filter), in training and evaluation, of
# the methods whose inner attack changes captions (their objective's `needs_text_candidates`).
TEXT_ATTACK = dict(source="bert", bert="shapes-mlm", top_k=10)

# The fine-tuning budget shared by every method.
FINETUNE_STEPS = 150
FINETUNE_BATCH = 64
FINETUNE_OPTIMIZER = dict(name="adamw", learning_rate=2e-4, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
FINETUNE_SCHEDULE = dict(name="cosine", warmup_steps=15, end_factor=0.1)

_INNER = dict(eps=EPS, steps=INNER_STEPS, step_size=INNER_STEP_SIZE)

# What defines each method: objective (+ hyper-parameters), towers, data. The inner image attack is the
# shared budget above for all of them (FARE, MAVA and MMCoA publish 10 PGD steps): an equal attack budget
# (ε, steps, step size), not equal compute, since MAVA's PGD encodes N neighbours per step and MAT, MAT+
# and MMCoA add a text attack. MAVA's β = 0.5 (neighbours drawn in U(−βε, βε)) is assumed: the paper
# gives no value.
METHODS: dict[str, dict[str, Any]] = {
    "clean_ft": dict(objective=dict(name="contrastive"), towers="all"),
    "tecoa": dict(objective=dict(name="tecoa", **_INNER), towers="all"),  # TeCoA-ITR (MAT paper)
    "fare": dict(objective=dict(name="fare", **_INNER), towers="vision"),
    "mmcoa": dict(objective=dict(name="mmcoa", **_INNER, text_changes=TEXT_CHANGES), towers="all"),
    "mava": dict(objective=dict(name="mava", **_INNER, neighbours=3, beta=0.5, a=0.002, b=0.4, c=0.6),
                 towers="vision", data=dict(captions_per_image=5)),
    "mat": dict(objective=dict(name="mat", **_INNER, text_changes=TEXT_CHANGES), towers="all"),
    # MAT+: the world's human captions (k = 3 of 5 per image, I2T) plus cross-modal (i2t, t2i) and
    # text (EDA) augmentation, all as 1:N positives.
    "matplus": dict(objective=dict(name="matplus", **_INNER, text_changes=TEXT_CHANGES), towers="all",
                    data=dict(captions_per_image=3, augmentations=("i2t:0.3", "t2i:0.3", "eda:0.2"))),
}


def check_train_eps_255(eps_255: Any, *, name: str = "eps_255") -> float:
  """A training budget in 1/255 units: a number above 0 and at most the L-inf bound every attack keeps
  (`checks.MAX_LINF_EPS_255`). Returns it as a float; ConfigError, naming `name`, otherwise."""
  if (isinstance(eps_255, bool) or not isinstance(eps_255, (int, float)) or not math.isfinite(eps_255)
      or not 0 < eps_255 <= checks.MAX_LINF_EPS_255):
    raise ConfigError(f"{name}={eps_255!r}: a training budget is a number in (0, {checks.MAX_LINF_EPS_255}], in "
                      "1/255 units (2 means 2/255)")
  return float(eps_255)


def has_image_attack(method: str) -> bool:
  """Whether `method` trains against an inner image attack (whose ε `finetune`'s eps_255 moves)."""
  return "eps" in METHODS[method]["objective"]


# The periodic evaluation of a fine-tuned shapes-world model.
SHAPES_EVAL = dict(split="test", max_images=200, attacks=("pgd",), eps=EPS, steps=10)


# The held-out-forms world: captions use every word's canonical form only (`shapes.form_picker`), so the
# synonyms that the masked LM proposes and a meaning-preserving text attack keeps are words no caption of
# the world holds (experiments/shapes_clip_heldout.py, the study's `heldout` arms; docs/text_threat.md).
HELDOUT_FORMS_WORLD = dict(build_rare_form_rate=0.0)


def shapes_base(name: str, seed: int = 0) -> ml_collections.ConfigDict:
  """Name, seed and data of a shapes-world experiment (48 px images, one caption per image)."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = seed
  c.data = dict(name="shapes", image_size=IMAGE_SIZE, captions_per_image=1)
  return c


def pretrain(seed: int = 0, world: Mapping[str, Any] | None = None,
             name: str = "shapes_clip") -> ml_collections.ConfigDict:
  """Clean contrastive pretraining of the tiny CLIP (the starting model of every method); `world`: data
  keys of another shapes world (HELDOUT_FORMS_WORLD)."""
  c = shapes_base(name, seed)
  c.data.update(world or {})
  c.model = dict(source="tiny", tokenizer="shapes")
  c.objective = dict(name="contrastive")
  c.train = dict(batch_size=128, steps=1000, log_every=50, checkpoint_every=100, eval_every=100)
  c.optimizer = dict(name="adamw", learning_rate=1e-3, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
  c.schedule = dict(name="cosine", warmup_steps=50, end_factor=0.05)
  c.eval = dict(split="test", max_images=1000, attacks=(), eps=EPS, steps=10)  # the clean-recall curve
  return c


# What a variant of a method may change: its objective's own hyper-parameters, its data's captions and
# augmentations, and which text attack it trains against (e.g. {"source": "paraphrase"}: meaning-preserving
# substitutions only; {"exclude_words": (...)}: the threat less words it may not write). Never the shared
# budget: the inner attack (which one, its ε, steps, step size, words changed), the images, the text threat's
# strength.
VARIANT_SECTIONS = ("objective", "data", "text_attack")
VARIANT_DATA_KEYS = ("captions_per_image", "augmentations", "renderings_per_scene")
VARIANT_TEXT_ATTACK_KEYS = ("source", "bert", "exclude_words")
BUDGET_OBJECTIVE_KEYS = ("name", "attack", "eps", "steps", "step_size", "text_changes")


def finetune(method: str, seed: int = 0, variant: Mapping[str, Any] | None = None,
             name: str | None = None, text_attack: Mapping[str, Any] | None = None,
             steps_factor: int = 1, eps_255: float = EPS_255) -> ml_collections.ConfigDict:
  """`method` under the shared fine-tuning budget; `variant` changes the method-defining parts only
  (VARIANT_SECTIONS: e.g. {"data": {"augmentations": ("eda",)}}, {"objective": {"one_to_one": True}},
  {"text_attack": {"source": "paraphrase"}}). text_attack: the shared text threat of the methods that
  train against one (default TEXT_ATTACK), before the variant's changes.

  steps_factor k > 1 is the one departure from the shared budget, for a compute-matched control: the
  budget is equal steps, not equal compute, and a method whose step costs a k-th of another's (TeCoA
  against MAT, which adds a text attack) trains k times the steps, its schedule stretched alike (warm-up
  k times longer, the cosine over all the steps), on k times the images; everything else as shared.

  eps_255 moves the whole budget to another ε (in 1/255 units; the literature trains at 1/255 and 4/255 as
  well): every method's inner attack at that ε, its PGD step size scaled with it (ε / INNER_STEPS, as the
  shared 1/255 at 2/255, so the two steps still reach the boundary), and the periodic evaluation's attack."""
  if method not in METHODS:
    raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
  if not isinstance(steps_factor, int) or isinstance(steps_factor, bool) or steps_factor < 1:
    raise ConfigError(f"steps_factor={steps_factor!r}: a compute-matched control trains a whole number (>= 1) "
                      "of times the shared steps")
  check_train_eps_255(eps_255)
  spec = METHODS[method]
  c = shapes_base(name or f"shapes_{method}", seed)
  c.model = dict(source="cache:shapes_clip")
  c.data.update(spec.get("data", {}))
  c.objective = dict(spec["objective"])
  c.eval = dict(SHAPES_EVAL)
  if eps_255 != EPS_255:  # the shared budget's configs stay as they are, and so their runs' cache keys
    eps = eps_255 / 255
    if has_image_attack(method):
      c.objective.update(eps=eps, step_size=eps / INNER_STEPS)
    c.eval["eps"] = eps
  if trains_against_text_attack(c.objective):
    c.text_attack = dict(TEXT_ATTACK if text_attack is None else text_attack)
  c.train = dict(batch_size=FINETUNE_BATCH, steps=FINETUNE_STEPS * steps_factor, towers=spec["towers"],
                 log_every=10, checkpoint_every=50)
  c.optimizer = dict(FINETUNE_OPTIMIZER)
  c.schedule = dict(FINETUNE_SCHEDULE, warmup_steps=FINETUNE_SCHEDULE["warmup_steps"] * steps_factor)
  for section, values in (variant or {}).items():
    if section not in VARIANT_SECTIONS:
      raise ConfigError(f"variant section {section!r}: only the method-defining sections "
                        f"{', '.join(VARIANT_SECTIONS)} may vary under the shared budget")
    if section not in c:
      raise ConfigError(f"variant section {section!r}: {method} trains against no text attack; only "
                        f"{', '.join(m for m in METHODS if trains_against_text_attack(METHODS[m]['objective']))} "
                        "have one to change")
    budget = {"objective": [k for k in values if k in BUDGET_OBJECTIVE_KEYS],
              "data": [k for k in values if k not in VARIANT_DATA_KEYS],
              "text_attack": [k for k in values if k not in VARIANT_TEXT_ATTACK_KEYS]}[section]
    if budget:
      may = {"objective": "its hyper-parameters but " + ", ".join(BUDGET_OBJECTIVE_KEYS),
             "data": ", ".join(VARIANT_DATA_KEYS), "text_attack": ", ".join(VARIANT_TEXT_ATTACK_KEYS)}[section]
      raise ConfigError(f"variant {section}.{', '.join(budget)}: part of the budget every method shares; a variant "
                        f"may change {section}: {may}")
    c[section].update(dict(values))
  return c


def runlocal(c: ml_collections.ConfigDict, preset: str = "tiny") -> ml_collections.ConfigDict:
  """A smoke test of any shapes-world experiment: a random model of `preset` (tiny CLIP, or "blip-tiny";
  no cached clean model needed), a few small steps, and the paraphrase text source (no MLM to train).
  Named apart (`NAME_runlocal`): its default workdir is not the real run's, which would refuse its checkpoints."""
  c.name = f"{c.name}_runlocal" if c.name else c.name
  c.model = dict(source=preset, tokenizer="shapes")
  c.train.update(batch_size=16, steps=10, log_every=2, checkpoint_every=5, eval_every=0)
  c.schedule.warmup_steps = 2
  c.eval.max_images = 50
  # Set whatever the objective: an override given after this (--config.objective.attack=sga) may add a text attack.
  c.text_attack = dict(source="paraphrase", top_k=10)
  return c


def trains_against_text_attack(objective: Mapping[str, Any]) -> bool:
  """Whether the objective section's inner attack changes captions (and so needs a text threat)."""
  return objectives.make(objective).needs_text_candidates


# ----------------------------------------------------------------------------------------------------
# Real corpora: published models with each paper's settings (REFERENCE.md; a value a paper leaves out
# is marked "assumed").

# BERT-Attack as the multimodal attacks use it: bert-base-uncased proposals, top-k 10; wide enough
# fixed shapes for real captions' words.
BERT_ATTACK = dict(source="bert", bert="bert-base-uncased", top_k=10, max_pieces=16, max_targets=16)
CORPUS_EVAL = dict(split="test", max_images=1000, attacks=("pgd",), eps=2 / 255, steps=10, batch_size=64)

# What each defense's paper trains. Its hyper-parameters are its objective's defaults, where they live once:
# the inner attack's budget (ε, steps, step size, words changed) in the attack registry
# (mat_jax.attacks.spec.ATTACKS, whose comments say which values are assumed), the others in the objective
# (mat_jax.objectives), and so are its towers (`Objective.default_towers`). An entry names the objective
# and adds only what differs from those defaults (hyper-parameters, `towers`) and the data it needs.
DEFENSES: dict[str, dict[str, Any]] = {
    # MAT (WACV 2026): PGD guided by a BERT-Attack text; all parameters.
    "mat": dict(objective=dict(name="mat")),
    # MAT+: MAT with the 5 human captions per image (I2T(Human)) and the multi-positive loss.
    "matplus": dict(objective=dict(name="matplus"), data=dict(captions_per_image=5)),
    # TeCoA: PGD on the contrastive loss; vision tower.
    "tecoa": dict(objective=dict(name="tecoa")),
    # FARE: ||f(x') - f_orig(x)||^2; vision tower.
    "fare": dict(objective=dict(name="fare")),
    # MMCoA: λ_t CLIPLoss(x, t') + λ_i CLIPLoss(x', t) at MMCoA.py's config; all parameters.
    "mmcoa": dict(objective=dict(name="mmcoa")),
    # MAVA: CMS + VSSE inside, a·CMS + b·VSSE + c·SCA outside, 5 captions per image; vision tower.
    # MAVA fine-tunes on the COCO test split (5k images) and evaluates on Flickr30k; these recipes train
    # every defense on the corpus's train split (docs/differences.md).
    "mava": dict(objective=dict(name="mava"), data=dict(captions_per_image=5)),
    # Contrastive fine-tuning without attacks (the baseline).
    "clean": dict(objective=dict(name="contrastive")),
}

CLIP_VITB16 = "openai/clip-vit-base-patch16"
# An epoch here is one pass over the training IMAGES (one caption drawn per image per visit, or K for
# MAT+ and MAVA); BLIP's recipe (experiments/flickr30k_blip.py) counts its (image, caption) pairs, as
# BLIP's code does.
CLIP_EPOCHS = 10  # MAVA's (10, "as TeCoA"); assumed for the others (MAT and MAT+ publish none; MMCoA's 30
                  # are over CIFAR-100, a classification set)
CLIP_BATCH = 128  # assumed (global batch; the papers train on 1-4 GPUs)
# Each defense's optimizer for CLIP ViT-B/16.
CLIP_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "mat": dict(name="adamw", learning_rate=1e-5, weight_decay=0.2),  # assumed (CLIP fine-tuning)
    "matplus": dict(name="adamw", learning_rate=1e-5, weight_decay=0.2),  # assumed, as mat
    "tecoa": dict(name="sgd", learning_rate=1e-5, momentum=0.9),  # lr assumed for fine-tuning
    "fare": dict(name="adamw", learning_rate=1e-5, weight_decay=1e-4),
    "mmcoa": dict(name="adam", learning_rate=1e-6, weight_decay=0.2, b2=0.98, eps=1e-6),  # MMCoA.py's Adam
    "mava": dict(name="adamw", learning_rate=1e-4, weight_decay=1e-4),
    "clean": dict(name="adamw", learning_rate=1e-5, weight_decay=0.2),  # assumed, as mat
}


def corpus_base(name: str, dataset: str, image_size: int) -> ml_collections.ConfigDict:
  """Name, seed, data, text threat, evaluation and mesh of a run on a real corpus built by
  `python -m mat_jax.data build` (`dataset` is its name)."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0
  c.data = dict(name=dataset, image_size=image_size, captions_per_image=1)
  c.text_attack = dict(BERT_ATTACK)
  c.eval = dict(CORPUS_EVAL)
  c.mesh = dict(param_sharding="replicated")
  return c


def published_defense(c: ml_collections.ConfigDict, defense: str) -> ml_collections.ConfigDict:
  """Set `c.objective`, `c.train.towers` and the data `defense` needs, as its paper trains it (DEFENSES)."""
  if defense not in DEFENSES:
    raise ConfigError(f"unknown defense {defense!r}; choose from {', '.join(DEFENSES)}")
  spec = DEFENSES[defense]
  c.objective = dict(spec["objective"])
  c.train.towers = spec.get("towers", objectives.get_class(c.objective["name"]).default_towers)
  c.data.update(spec.get("data", {}))
  return c


def clip_vitb16(dataset: str, train_images: int, defense: str) -> ml_collections.ConfigDict:
  """CLIP ViT-B/16 (OpenAI weights, transformers layout) fine-tuned with `defense` on the corpus `dataset`
  of `train_images` training images: CLIP_EPOCHS epochs of CLIP_BATCH images, cosine schedule."""
  if defense not in CLIP_OPTIMIZERS:
    raise ConfigError(f"unknown defense {defense!r}; choose from {', '.join(CLIP_OPTIMIZERS)}")
  steps = CLIP_EPOCHS * train_images // CLIP_BATCH
  c = corpus_base(f"{dataset}_{defense}", dataset, image_size=224)
  c.model = dict(source=CLIP_VITB16, tokenizer="")
  c.train = dict(batch_size=CLIP_BATCH, steps=steps, towers="all", log_every=50, checkpoint_every=1000)
  c.schedule = dict(name="cosine", warmup_steps=min(500, steps // 10), end_factor=0.0)  # assumed
  c.optimizer = dict(CLIP_OPTIMIZERS[defense])
  return published_defense(c, defense)


def runlocal_corpus(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A smoke test of a run on a real corpus: the same model and data, 4 steps of 8 images, a checkpoint
  every 2 steps, 16 evaluation images; named apart, as `runlocal`."""
  c.name = f"{c.name}_runlocal" if c.name else c.name
  c.train.update(batch_size=8, steps=4, log_every=1, checkpoint_every=2)
  c.schedule.warmup_steps = min(c.schedule.warmup_steps, 1)
  c.eval.max_images = 16
  return c
