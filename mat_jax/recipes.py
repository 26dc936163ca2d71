"""The shapes world's shared budgets, imported by the experiment files (big_vision's `configs/common.py`).

Two budgets:

- `pretrain()`: clean contrastive pretraining of the tiny CLIP from random weights, long enough that
  more steps no longer move its clean recall much (docs/results/shapes_study.md shows the curve). Every
  defense starts from this checkpoint ("cache:shapes_clip").
- `finetune(method)`: ONE fine-tuning budget for every method: the same starting checkpoint, steps,
  global batch (images), optimizer, schedule, image size, inner attack budget (ε, PGD steps, step size)
  and text threat. Only what defines a method varies: its objective and hyper-parameters, the towers it
  trains (the published choice: vision for FARE and MAVA, all for the cross-modal objectives, TeCoA-ITR
  included), and for the one-to-many methods the captions per image and augmentations.

`runlocal(config)` shrinks any of them to a smoke test (a random tiny CLIP, a few steps) in one place.
Experiment files return `finetune("mat")` etc.; the study (`mat_jax.study`) builds its arms from the
same function with `variant` changes, so an experiment file and a study arm of one method are the same run.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

IMAGE_SIZE = 48
EPS = 2 / 255         # every method's training ε and the evaluation ε (the papers' 2/255)
INNER_STEPS = 2       # PGD steps of every inner image attack (MAT's; FARE/MAVA publish 10, see METHODS)
INNER_STEP_SIZE = 1 / 255
TEXT_CHANGES = 1      # words the training text attack changes (BERT-Attack as MAT uses it)

# The text threat: the shapes-world BERT MLM (top-k 10, no meaning filter), in training and evaluation.
TEXT_ATTACK = dict(source="bert", bert="shapes-mlm", top_k=10)

# The fine-tuning budget shared by every method.
FINETUNE_STEPS = 150
FINETUNE_BATCH = 64
FINETUNE_OPTIMIZER = dict(name="adamw", learning_rate=2e-4, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
FINETUNE_SCHEDULE = dict(name="cosine", warmup_steps=15, end_factor=0.1)

_INNER = dict(eps=EPS, steps=INNER_STEPS, step_size=INNER_STEP_SIZE)

# What defines each method: objective (+ hyper-parameters), towers, data. The inner image attack is the
# shared budget above for all of them (FARE and MAVA publish 10 PGD steps; here every method pays the
# same 2-step attack per training step, so the comparison is at equal compute).
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


def _base(name: str, seed: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = seed
  c.data = dict(name="shapes", image_size=IMAGE_SIZE, captions_per_image=1)
  return c


def pretrain(seed: int = 0) -> ml_collections.ConfigDict:
  """Clean contrastive pretraining of the tiny CLIP (the starting model of every method)."""
  c = _base("shapes_clip", seed)
  c.model = dict(source="tiny", tokenizer="shapes")
  c.objective = dict(name="contrastive")
  c.train = dict(batch_size=128, steps=1000, log_every=50, checkpoint_every=100, eval_every=100)
  c.optimizer = dict(name="adamw", learning_rate=1e-3, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
  c.schedule = dict(name="cosine", warmup_steps=50, end_factor=0.05)
  c.eval = dict(split="test", max_images=1000, attacks=(), eps=EPS, steps=10)  # the clean-recall curve
  return c


def finetune(method: str, seed: int = 0, variant: Mapping[str, Any] | None = None,
             name: str | None = None) -> ml_collections.ConfigDict:
  """`method` under the shared fine-tuning budget; `variant` changes the method-defining parts only
  (`objective`, `data` keys: e.g. {"data": {"augmentations": ("eda",)}}, {"objective": {"one_to_one": True}})."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
  spec = METHODS[method]
  c = _base(name or f"shapes_{method}", seed)
  c.model = dict(source="cache:shapes_clip")
  c.data.update(spec.get("data", {}))
  c.objective = dict(spec["objective"])
  if c.objective["name"] in ("mat", "matplus", "mmcoa"):
    c.text_attack = dict(TEXT_ATTACK)
  c.train = dict(batch_size=FINETUNE_BATCH, steps=FINETUNE_STEPS, towers=spec["towers"], log_every=10,
                 checkpoint_every=50)
  c.optimizer = dict(FINETUNE_OPTIMIZER)
  c.schedule = dict(FINETUNE_SCHEDULE)
  c.eval = dict(split="test", max_images=200, attacks=("pgd",), eps=EPS, steps=10)
  for section, values in (variant or {}).items():
    if section not in ("objective", "data"):
      raise ValueError(f"variant section {section!r}: only the method-defining sections objective and data "
                       "may vary under the shared budget")
    c[section].update(dict(values))
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A smoke test of any experiment: a random tiny CLIP (no cached clean model), a few small steps, and
  the paraphrase text source (no MLM to train)."""
  c.model = dict(source="tiny", tokenizer="shapes")
  c.train.update(batch_size=16, steps=10, log_every=2, checkpoint_every=5, eval_every=0)
  c.schedule.warmup_steps = 2
  c.eval.max_images = 50
  if "text_attack" in c:
    c.text_attack = dict(source="paraphrase", top_k=10)
  return c
