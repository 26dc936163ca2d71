"""One description of an attack for training and evaluation: `AttackSpec`, its step-size rule and the registry.

An `AttackSpec` is a frozen (hashable) value: what the attack does (`kind`, the image `loss`, the text
attack's `text_objective`) and its budget (`eps`, `steps`, `step_size`, `norm`, `max_changes`). The
registry `ATTACKS` names one spec per attack, at the settings of the paper that introduced it: every
attack `mat_jax.evaluate` runs, and every defense's inner attack. The training objectives build their
inner attack from a name in this registry (`config.objective.attack`) and `evaluate()` runs attacks by
the same names, so a defense can be trained against any attack evaluation runs and evaluated against
the attack it trained with. `mat_jax.attacks.runner.run_attack` executes a spec on a batch through
the compiled attacks of `image`, `text` and `multimodal`.

Kinds (how the two modalities are combined):
- "image": an image attack only (PGD on `loss`; APGD for loss "apgd_ce");
- "text": a text attack only (BERT-Attack's greedy word substitution);
- "separate": both, independently: the image loss sees the clean captions (Sep-Attack, MMCoA);
- "text_then_image": the text attack first, then the image attack against the adversarial captions
  (Co-Attack, MAT);
- "sga": SGA's three stages (image-guided text attack, multi-scale image attack against all the
  adversarial captions, text attack again guided by the adversarial image).

Image losses (what PGD maximises; `mat_jax.attacks.losses`): "cosine" (minus the cosine similarity to
the image's captions, SGA's image attack), "kl" (Co-Attack's image-only KL), "co" (Co-Attack's loss),
"sga" (the cosine loss over SGA's rescaled views), "contrastive" (the image->text cross-entropy against
the batch's captions, TeCoA / MAT / MMCoA), "feature" (FARE's squared feature distance to the reference
model's clean features), "mava" (MAVA's CMS + VSSE over noisy neighbours), "apgd_ce" (APGD on the
cross-entropy over a set of captions as classes). Text objectives (`mat_jax.attacks.text`): "kl" (away
from the clean caption's embedding, image-blind; Co-Attack's) and "image" (away from the clean image;
SGA's, MAT's).

The candidate source of the text attack (BERT-Attack's masked LM, the shapes world's paraphrases,
character edits) is not part of a spec: candidates depend only on the clean captions, so a run prepares
them once for all of its attacks (`config.text_attack`, `--text-source`).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax.numpy as jnp
import numpy as np

from mat_jax import checks
from mat_jax.errors import InputError

KINDS = ("image", "text", "separate", "text_then_image", "sga")
TEXT_OBJECTIVES = ("kl", "image")
NORMS = ("linf", "l2")

# SGA's PGD step (0.5/255 at eps 2/255 in 10 steps) as a multiple of eps / steps; Co-Attack's is 1.25.
SGA_STEP_SCALE = 2.5
CO_STEP_SCALE = 1.25
CO_ALPHA = 3.0  # Co-Attack's weight of the text term in its image loss


def check_norm(norm: str, context: str = "") -> None:
  """An InputError for a norm the image attacks do not take; `context` (e.g. "attack 'pgd': ") leads it."""
  if norm not in NORMS:
    raise InputError(f"{context}unknown norm {norm!r}; use one of {NORMS} (L-inf sign steps or L2 steps)")

# The image losses each kind can run, and the text objective it requires (None: any). The compiled
# multimodal attacks fix their text objective: Sep- and Co-Attack score with the KL, SGA with the image.
_SUPPORTED: dict[str, dict[str | None, str | None]] = {
    "image": {"cosine": None, "apgd_ce": None, "contrastive": None, "feature": None, "mava": None},
    "text": {None: None},
    "separate": {"cosine": "kl", "kl": "kl", "contrastive": None, "feature": None, "mava": None},
    "text_then_image": {"co": "kl", "contrastive": None},
    "sga": {"sga": "image"},
}


class UnknownAttackError(InputError):
  """An attack name that is not in the registry."""


def step_size_for(eps: float, steps: int, step_size: float | None = None,
                  scale: float = SGA_STEP_SCALE) -> float:
  """The PGD step: `step_size` when given, else `scale * eps / steps` (SGA's 0.5/255 at 2/255 in 10
  steps with the default scale; Co-Attack's eps / steps * 1.25 with `CO_STEP_SCALE`). `steps` may be traced
  (an attack inside an outer jit), so an array is never read back to the host."""
  if step_size is not None:
    return step_size
  if isinstance(steps, (int, np.integer)):
    return scale * eps / max(int(steps), 1)
  return scale * eps / jnp.maximum(steps, 1)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack and its budget (module docstring). Frozen and hashable: a static part of a compiled step."""
  name: str                           # the registry name (reports, error messages)
  kind: str                           # one of KINDS
  loss: str | None = None             # the image loss (one `_SUPPORTED` lists for the kind); None for kind "text"
  text_objective: str | None = None   # the text attack's scoring (one of TEXT_OBJECTIVES); None: no text attack
  eps: float = 2 / 255                # image budget in pixel units (L-inf) or the L2 radius
  steps: int = 10                     # PGD (or APGD) iterations
  step_size: float | None = None      # PGD step; None: step_scale * eps / steps (`step_size_for`)
  step_scale: float = SGA_STEP_SCALE
  norm: str = "linf"
  max_changes: int = 1                # words the text attack may change per caption
  alpha: float = CO_ALPHA             # Co-Attack's text-term weight (loss "co")
  neighbours: int = 3                 # MAVA's noisy neighbours N (loss "mava")
  beta: float = 0.5                   # MAVA's neighbour range U(-beta eps, beta eps)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise InputError(f"attack {self.name!r}: unknown kind {self.kind!r}; use one of {KINDS}")
    losses = _SUPPORTED[self.kind]
    if self.loss not in losses:
      raise InputError(f"attack {self.name!r}: kind {self.kind!r} runs the image losses "
                       f"{[x for x in losses if x is not None] or 'none (loss=None)'}, not {self.loss!r}")
    needs_text = self.kind != "image"
    if needs_text and self.text_objective not in TEXT_OBJECTIVES:
      raise InputError(f"attack {self.name!r}: kind {self.kind!r} attacks the text; set text_objective to one "
                       f"of {TEXT_OBJECTIVES}, got {self.text_objective!r}")
    if not needs_text and self.text_objective is not None:
      raise InputError(f"attack {self.name!r}: kind 'image' has no text attack; leave text_objective None")
    fixed = losses[self.loss]
    if fixed is not None and self.text_objective != fixed:
      raise InputError(f"attack {self.name!r}: the compiled {self.kind} attack with loss {self.loss!r} scores "
                       f"its text attack with {fixed!r}, not {self.text_objective!r}")
    check_norm(self.norm, f"attack {self.name!r}: ")
    if self.loss == "mava" and self.norm != "linf":
      raise InputError(f"attack {self.name!r}: MAVA's noisy neighbours are drawn per pixel in U(-beta eps, "
                       f"beta eps), which is defined for L-inf budgets only; use norm 'linf', not {self.norm!r}")
    checks.check_eps(self.eps, norm=self.norm, name=f"{self.name}: eps")
    checks.check_steps(self.steps, name=f"{self.name}: steps", minimum=0)
    if self.step_size is not None:
      checks.check_step_size(self.step_size, name=f"{self.name}: step_size")
    # A negative scale would descend the loss: the attack would help the model.
    checks.check_nonnegative(self.step_scale, name=f"{self.name}: step_scale",
                             hint=" (the step is step_scale * eps / steps)")
    checks.check_steps(self.max_changes, name=f"{self.name}: max_changes")
    checks.check_nonnegative(self.alpha, name=f"{self.name}: alpha", hint=" (Co-Attack's text-term weight)")
    checks.check_steps(self.neighbours, name=f"{self.name}: neighbours")
    checks.check_nonnegative(self.beta, name=f"{self.name}: beta", hint=" (MAVA's neighbour range, beta * eps)")

  @property
  def attacks_image(self) -> bool:
    return self.kind != "text"

  @property
  def attacks_text(self) -> bool:
    """The attack changes captions (it needs text-attack candidates)."""
    return self.text_objective is not None

  @property
  def text_stage(self) -> tuple[str, int] | None:
    """What the text attack that starts this attack computes, for attacks that return its captions as
    their own: (text objective, words changed). On one batch, with one model, candidates and chunk
    size, attacks with equal stages change the captions identically (the text attack draws no random
    numbers; its guide is the clean captions or the clean image), so an evaluation runs it once for
    all of them: BERT-Attack, Sep-Attack and Co-Attack share ("kl", 1). None: no text attack, or SGA,
    whose captions come from a second text attack guided by its adversarial image."""
    if not self.attacks_text or self.kind == "sga":
      return None
    return self.text_objective, self.max_changes

  @property
  def pgd_step(self) -> float:
    """The step of its PGD (`step_size_for`); APGD adapts its own."""
    return step_size_for(self.eps, self.steps, self.step_size, self.step_scale)

  def replace(self, **changes: Any) -> "AttackSpec":
    """A copy with other settings (checked again), e.g. a training objective's budget."""
    return dataclasses.replace(self, **changes)


# The registry: each attack at its reference settings (REFERENCE.md). Evaluation replaces the budget
# (eps, steps, step rule, norm) with its own; a training objective with its eps, steps and step_size.
# A defense's own attack (mat, tecoa, mmcoa, fare, mava) is the one place of its published training budget:
# its objective's defaults (mat_jax.objectives) read it, and recipes.DEFENSES trains at those defaults.
ATTACKS: dict[str, AttackSpec] = {spec.name: spec for spec in (
    # SGA's image attack alone: PGD on -sum cos(image, its captions), eps 2/255, 10 steps of 0.5/255.
    AttackSpec("pgd", "image", "cosine"),
    # APGD-CE over a set of captions as classes (FARE's evaluation), 100 iterations.
    AttackSpec("apgd", "image", "apgd_ce", steps=100),
    # BERT-Attack as Co-Attack evaluates it: the KL objective, one word, no image.
    AttackSpec("bert", "text", None, "kl"),
    # Sep-Attack: BERT-Attack (KL) and image PGD against the clean captions, independently.
    AttackSpec("sep", "separate", "cosine", "kl"),
    # Co-Attack: BERT-Attack (KL), then PGD on the Co-Attack loss (alpha 3, step eps / steps * 1.25).
    AttackSpec("co", "text_then_image", "co", "kl", step_scale=CO_STEP_SCALE),
    # SGA: image-guided text attack, multi-scale set-level image attack, text attack again.
    AttackSpec("sga", "sga", "sga", "image"),
    # MAT: the image-guided text attack, then PGD on the contrastive loss against the adversarial captions.
    # The step size is not published: 1/255 assumed (two steps can reach the budget's corners).
    AttackSpec("mat", "text_then_image", "contrastive", "image", eps=2 / 255, steps=2, step_size=1 / 255),
    # TeCoA: PGD on the contrastive loss against the clean captions.
    AttackSpec("tecoa", "image", "contrastive", eps=1 / 255, steps=2, step_size=1 / 255),
    # MMCoA: BERT-Attack with Co-Attack's KL scoring (the reference's `BertAttack`) and contrastive PGD
    # against the clean captions, independently; 10 steps as MMCoA.py's config.
    AttackSpec("mmcoa", "separate", "contrastive", "kl", eps=1 / 255, steps=10, step_size=1 / 255),
    # FARE: PGD on ||f(x') - f_ref(x)||^2 (f_ref: the frozen original model, or the attacked one).
    AttackSpec("fare", "image", "feature", eps=2 / 255, steps=10, step_size=1 / 255),
    # MAVA: PGD on CMS + VSSE over N = 3 noisy neighbours of the adversarial image. Their range
    # U(-beta eps, beta eps) is not published: beta = 0.5 assumed (half the attack budget).
    AttackSpec("mava", "image", "mava", eps=2 / 255, steps=10, step_size=1 / 255),
)}

NAMES = tuple(ATTACKS)
# Attacks that ascend a contrastive loss whose negatives are the other captions of the image's batch
# (tecoa, mat, mmcoa): their strength depends on the batch size, and one image alone is not attacked.
BATCH_CONTRASTIVE = tuple(n for n, s in ATTACKS.items() if s.loss == "contrastive")


def get(name: str) -> AttackSpec:
  """The registry's spec called `name`; an unknown name is an error listing the registry."""
  if name not in ATTACKS:
    close = difflib.get_close_matches(str(name), NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownAttackError(f"unknown attack {name!r}.{hint} Attacks: {', '.join(NAMES)}")
  return ATTACKS[name]


def check_names(names, what: str = "attacks") -> None:
  """Every name in the registry, or one error naming the unknown ones and listing the registry."""
  unknown = [n for n in names if n not in ATTACKS]
  if unknown:
    close = {n: difflib.get_close_matches(str(n), NAMES, n=1) for n in unknown}
    hints = "".join(f" ({n!r}: did you mean {c[0]!r}?)" for n, c in close.items() if c)
    raise UnknownAttackError(f"{what}: unknown attack(s) {unknown}{hints}; choose from {', '.join(NAMES)}")
