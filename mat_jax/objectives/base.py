"""The objective interface shared by every defense, so that one jitted train step serves them all.

An objective is a frozen dataclass: its fields are the static hyper-parameters (hashable, so they are
part of the compiled step's identity) and `loss` is a pure function (for an objective with an inner
attack, the composition of two, below, which the train step calls apart)

    loss(encoder, params, batch, key, reference) -> (scalar loss, metrics dict of scalars)

`params` is the full parameter state being trained (the train step differentiates through it with
respect to the trainable towers only); `reference` is the frozen original model's parameters for the
objectives that anchor to it (FARE, MAVA; `needs_reference`), else None. Inner attacks run on
`jax.lax.stop_gradient(params)`: adversarial examples are inputs of the outer loss, not functions of
the parameters (as in every reference implementation).

An adversarial objective's loss is its parts, which the train step compiles as programs of their own
(`mat_jax.training.step`):

    adversarial_text(encoder, params, batch) -> the text stage's result          (when `has_text_stage`)
    adversarial(encoder, params, batch, key, reference, text) -> adversarial batch  (the inner attack)
    outer_loss(encoder, params, batch, adv, key, reference) -> (loss, metrics)   (what is differentiated)

and `loss` is `outer_loss` of `adversarial`'s batch, which runs the text stage itself when it is not given.
An objective without an inner attack defines `loss`.

`batch` is the device batch: `images` (B, H, W, 3) in [0, 1], `input_ids`/`attention_mask` (B, L) or
(B, K, L), `image_ids` (B,), and for objectives with a text attack (`needs_text_candidates`) the
candidate arrays the input pipeline attached (see `mat_jax.training.inputs`).

An adversarial objective names its inner attack in its `attack` field: a name of the attack registry
(`mat_jax.attacks.spec.ATTACKS`, the names `mat_jax.evaluate` runs), by default the published one
(mat for MAT and MAT+, tecoa, mmcoa, fare, mava), at the objective's own budget (eps, steps, step_size,
text_changes), whose defaults are the published spec's (each module's `PUBLISHED`: the registry is the one
place of a defense's published budget). `attack_batch` runs it (`mat_jax.attacks.runner.run_attack`) and the
objective takes from the adversarial batch what its formula uses: MAT the adversarial pairs (x', t'), MMCoA
(x, t') and (x', t), TeCoA, FARE and MAVA the adversarial images x' only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mat_jax.attacks import spec as attack_specs
from mat_jax.attacks.losses import positives as positives  # the objectives' name for it
from mat_jax.attacks.candidates import candidates_from_batch
from mat_jax.attacks.runner import AttackInputs, AttackResult, run_attack, text_stage
from mat_jax.attacks.spec import AttackSpec
from mat_jax.attacks.text import TextAttackResult
from mat_jax.models import DualEncoder

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  name: ClassVar[str] = ""
  # The frozen original parameters are passed as `reference` (FARE, MAVA).
  needs_reference: ClassVar[bool] = False
  # The published recipe's towers; the config's train.towers decides.
  default_towers: ClassVar[str] = "all"
  # The loss reads the attacked captions (MAT, MMCoA); the others read only the attacked images, so an
  # attack of the captions alone would leave them training on clean inputs.
  reads_adversarial_text: ClassVar[bool] = False
  # The loss contrasts each image with the batch's other scenes' captions: a batch of one scene has no
  # negative, and the loss and its gradient are 0.
  needs_negatives: ClassVar[bool] = False

  def inner_attack(self) -> AttackSpec | None:
    """The attack the objective trains against (None: clean training). Adversarial objectives name it in
    their `attack` field (a `mat_jax.attacks.spec.ATTACKS` name, by default the published one) and set
    its budget from their own fields."""
    return None

  @property
  def needs_text_candidates(self) -> bool:
    """The batch must carry text-attack candidates: the inner attack changes captions."""
    spec = self.inner_attack()
    return spec is not None and spec.attacks_text

  @property
  def contrasts_scenes(self) -> bool:
    """The loss, or the inner attack's (a contrastive cross-entropy: tecoa, mat, mmcoa), needs another scene
    in the batch to be anything but 0."""
    spec = self.inner_attack()
    return self.needs_negatives or (spec is not None and spec.loss == "contrastive")

  @property
  def has_text_stage(self) -> bool:
    """The inner attack starts with a text attack that can run apart (`AttackSpec.text_stage`: MAT's, MMCoA's;
    not SGA's, whose captions come from a text attack after its image attack)."""
    spec = self.inner_attack()
    return spec is not None and spec.text_stage is not None

  def adversarial_text(self, encoder: DualEncoder, params: nnx.State, batch: dict[str, jax.Array]
                       ) -> TextAttackResult:
    """The inner attack's text stage alone (`runner.text_stage`), on the parameters as constants: what
    `adversarial` takes as `text`. Only when `has_text_stage`."""
    return text_stage(self.inner_attack(), encoder, frozen(params), attack_inputs(self, batch))

  def adversarial(self, encoder: DualEncoder, params: nnx.State, batch: dict[str, jax.Array], key: jax.Array,
                  reference: nnx.State | None = None, text: TextAttackResult | None = None) -> dict[str, jax.Array]:
    """The inner attack's adversarial batch (`attack_batch`), the parameters (and the reference) as the
    attack's constants; `text`: `adversarial_text`'s result (None: the attack runs its text stage). Only for
    an objective with an inner attack."""
    frozen_reference = None if reference is None else frozen(reference)
    return attack_batch(self, encoder, frozen(params), batch, key, frozen_reference, text)[1]

  def outer_loss(self, encoder: DualEncoder, params: nnx.State, batch: dict[str, jax.Array],
                 adv: dict[str, jax.Array], key: jax.Array,
                 reference: nnx.State | None = None) -> tuple[jax.Array, Metrics]:
    """The loss on the clean batch and `adversarial`'s batch `adv`, differentiated by the train step."""
    raise NotImplementedError(f"objective {type(self).__name__} has an inner attack and defines no outer_loss")

  def loss(self, encoder: DualEncoder, params: nnx.State, batch: dict[str, jax.Array],
           key: jax.Array, reference: nnx.State | None = None) -> tuple[jax.Array, Metrics]:
    if self.inner_attack() is None:
      raise NotImplementedError(f"objective {type(self).__name__} defines no loss")
    adv = self.adversarial(encoder, params, batch, key, reference)
    return self.outer_loss(encoder, params, batch, adv, key, reference)


def internal(default: Any = None) -> Any:
  """A field the run fills in (e.g. the tokenizer's static candidate layout), not a config key."""
  return dataclasses.field(default=default, metadata={"internal": True})


def hyperparameters(cls: type[Objective]) -> dict[str, Any]:
  """The objective's configurable fields and their defaults."""
  return {f.name: f.default for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def frozen(params: nnx.State) -> nnx.State:
  """The parameters as inner attacks see them: constants of the outer gradient."""
  return jax.lax.stop_gradient(params)


def inner_attack(name: str, **budget: Any) -> AttackSpec:
  """The registry's attack `name` at the objective's budget (eps, steps, step_size, max_changes, ...)."""
  return attack_specs.get(name).replace(**budget)


def attack_inputs(objective: Objective, batch: dict[str, jax.Array]) -> AttackInputs:
  """The batch as the objective's inner attack takes it, with the candidates the pipeline attached when the
  attack changes captions."""
  spec = objective.inner_attack()
  candidates = candidates_from_batch(batch, objective.candidate_meta) if spec.attacks_text else None
  return AttackInputs(batch["images"], batch["input_ids"], batch["attention_mask"], image_ids=batch.get("image_ids"),
                      candidates=candidates)


def attack_batch(objective: Objective, encoder: DualEncoder, params: nnx.State, batch: dict[str, jax.Array],
                 key: jax.Array, reference: nnx.State | None = None, text: TextAttackResult | None = None
                 ) -> tuple[AttackResult, dict[str, jax.Array]]:
  """Run the objective's inner attack on the batch (params are the attack's constants, see `frozen`); `text`:
  the result of its text stage (`Objective.adversarial_text`), None to run it here.

  Returns the attack's result and the adversarial batch shaped like the clean one: images, input_ids,
  attention_mask (clean where the attack leaves a modality alone) and text_changed (1.0 for each caption
  the text attack changed, else 0.0; shaped as the captions, input_ids less its last axis). Every array
  has the batch's leading axis, so the adversarial batch is split over the mesh as the batch is.
  """
  ids, mask = batch["input_ids"], batch["attention_mask"]
  result = run_attack(objective.inner_attack(), encoder, params, attack_inputs(objective, batch), key, reference,
                      text=text)
  adv = {"images": batch["images"] if result.images is None else result.images, "input_ids": ids,
         "attention_mask": mask, "text_changed": jnp.zeros(ids.shape[:-1], jnp.float32)}
  if result.text is not None:
    adv["input_ids"] = result.text.input_ids.reshape(ids.shape)
    adv["attention_mask"] = result.text.attention_mask.reshape(ids.shape)
    adv["text_changed"] = (result.text.changed_words[:, 0] >= 0).astype(jnp.float32).reshape(ids.shape[:-1])
  return result, adv
