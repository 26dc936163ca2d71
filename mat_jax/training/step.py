"""The train state and the jitted train step that serves every objective.

    step(state, batch, reference) -> (state, metrics)

(inner attack) + loss + gradient with respect to the trainable towers + Optax update, compiled once per
batch shape, data-parallel (and FSDP) through the shardings of its inputs and outputs, with the state's
buffers donated. The per-step key is `fold_in(state.rng, state.step)`, so a resumed run draws exactly the
numbers an uninterrupted run draws.

A step runs as up to four programs, each compiled and dispatched apart: the inner attack's text stage
(`Objective.adversarial_text`, when its attack starts with one), the inner attack's adversarial batch
(`Objective.adversarial`), the gradient of the loss (`Objective.outer_loss` of that batch, or `loss` for an
objective without an inner attack) and the optimizer's update. The attack's parameters are constants of
the gradient, so nothing crosses between the programs but the text stage's captions, the adversarial
batch, the gradient and its finiteness, and they are dispatched one after the other with no host
synchronisation between them. They compile at once, each on a thread as soon as it is lowered, while the
next one is traced (`precompile.compile_all`): XLA's passes over a program are mostly sequential, so one
program's compilation leaves a host's other cores idle; compiled alone, the longest of the ViT-B/16 MAT
step's four (its text stage) takes 55–60% of the time of its whole inner attack
(docs/performance.md#compile-time).

Non-finite loss or gradient norm: the update is skipped (the parameters stay the last good ones) and
`state.bad_step` records the first such step; the loop reads it when it reads the metrics, so there is
no extra host synchronisation per step. An update that makes a parameter non-finite from finite gradients
(a learning rate that overflows it) is recorded there too; the loop then stops without saving that state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mat_jax import checks, precompile, runtime
from mat_jax import mesh as mesh_lib
from mat_jax.models import DualEncoder
from mat_jax.objectives import Objective

# Top-level parameter names per tower: CLIP's, then BLIP's (whose text tower holds the ITM cross-attention).
TOWERS = {
    "vision": ("vision", "visual_projection", "vision_proj"),
    "text": ("text", "text_projection", "text_proj"),
}


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: updates applied so far
  params: nnx.State      # the whole model (trainable and frozen parts)
  opt_state: Any         # over the trainable part only
  rng: jax.Array         # uint32 (2,) raw key; per-step keys are folded from it
  bad_step: jax.Array    # int32 scalar: first step with a non-finite loss/gradient, -1 if none


# BLIP's parameters that only image-text matching uses: the ITM head and the text encoder's
# cross-attention. No objective here has an ITM loss, so they never train: with no gradient, weight
# decay alone would move them (AdamW shrinks every trainable matrix) and the ITM re-ranking would drift.
ITM_ONLY = ("itm_head", "cross", "cross_ln")


def _itm_only(path: tuple) -> bool:
  return path[0] == "itm_head" or any(key in ITM_ONLY for key in path)


def trainable_filter(towers: str, train_logit_scale: bool = True) -> Callable[[tuple, Any], bool]:
  """An nnx filter selecting the parameters that train: towers = all | vision | text (never ITM_ONLY)."""
  if towers == "all":
    return lambda path, _: (train_logit_scale or path[0] != "logit_scale") and not _itm_only(path)
  if towers not in TOWERS:
    raise ValueError(f"unknown towers {towers!r}; choose all, vision or text")
  roots = TOWERS[towers]
  return lambda path, _: path[0] in roots and not _itm_only(path)


def split_params(params: nnx.State, is_trainable) -> tuple[nnx.State, nnx.State]:
  trainable, frozen = nnx.split_state(params, is_trainable, ...)
  if not jax.tree.leaves(trainable):
    raise ValueError("no parameter is trainable with this train.towers setting")
  return trainable, frozen


def init_state(params: nnx.State, tx: optax.GradientTransformation, is_trainable, seed: int) -> TrainState:
  return _fresh_state(params, tx, is_trainable, seed_key_data(seed))


def seed_key_data(seed: int) -> jax.Array:
  """The run's raw key, uint32 (2,): what `TrainState.rng` starts as."""
  return jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)


def _fresh_state(params: nnx.State, tx: optax.GradientTransformation, is_trainable, rng: jax.Array) -> TrainState:
  trainable, _ = split_params(params, is_trainable)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable), rng=rng,
                    bad_step=jnp.full((), -1, jnp.int32))


def state_shardings(params: nnx.State, tx: optax.GradientTransformation, is_trainable, mesh: Mesh,
                    mode: str = "replicated", rules: Any = None) -> TrainState:
  """Shardings of every leaf of the train state: parameters by the mesh rules, optimizer moments
  like the parameter they belong to, counters replicated."""
  replicated = mesh_lib.replicated(mesh)
  param_sh = mesh_lib.param_shardings(params, mesh, mode, rules)
  trainable_sh, _ = nnx.split_state(param_sh, is_trainable, ...)
  trainable, _ = split_params(params, is_trainable)
  abstract_opt = jax.eval_shape(tx.init, trainable)
  opt_sh = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, trainable_sh,
                                 transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated,
                    bad_step=replicated)


def create_state(params: nnx.State, tx: optax.GradientTransformation, is_trainable, seed: int,
                 shardings: TrainState) -> TrainState:
  """The initial state, built directly in its shardings (parameters copied, moments created). The key
  is an argument of the program, not a constant in it, so runs that differ only in their seed share it
  (one persistent-cache entry serves every seed)."""
  params = jax.device_put(params, shardings.params)
  make = jax.jit(lambda p, rng: _fresh_state(p, tx, is_trainable, rng), out_shardings=shardings)
  return make(params, np.asarray(seed_key_data(seed)))  # host values: as every process has them


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """The pure train step's programs, in the order a step calls them (not yet jitted):

      text(state, batch, reference) -> the inner attack's text stage        (None: no text stage of its own)
      attack(state, batch, text, reference) -> the adversarial batch         (None: no inner attack)
      gradient(state, batch, adv, reference) -> (gradient, finite, metrics)
      apply(state, gradient, finite) -> state

  where `text` and `adv` are None when their program is. `is_trainable` selects the parameters the gradient
  is of."""
  text: Callable | None
  attack: Callable | None
  gradient: Callable
  apply: Callable
  is_trainable: Callable


def make_step_fn(encoder: DualEncoder, objective: Objective, tx: optax.GradientTransformation,
                 is_trainable, schedule: optax.Schedule | None = None) -> StepFunctions:
  """The pure train step (not yet jitted; `jit_step` compiles it)."""

  def step_key(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def text_stage(state: TrainState, batch: dict[str, jax.Array], reference: nnx.State | None):
    del reference  # the text stage attacks the trained model
    return objective.adversarial_text(encoder, state.params, batch)

  def attack(state: TrainState, batch: dict[str, jax.Array], text: Any, reference: nnx.State | None):
    # The text stage's result only where its program ran: an objective without one may not take it.
    given = () if text is None else (text,)
    return objective.adversarial(encoder, state.params, batch, step_key(state), reference, *given)

  def gradient(state: TrainState, batch: dict[str, jax.Array], adv: dict[str, jax.Array] | None,
               reference: nnx.State | None):
    key = step_key(state)
    trainable, frozen = nnx.split_state(state.params, is_trainable, ...)

    def loss_fn(trainable_params):
      params = nnx.merge_state(trainable_params, frozen)
      if adv is None:
        return objective.loss(encoder, params, batch, key, reference)
      return objective.outer_loss(encoder, params, batch, adv, key, reference)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    # The gradient's norm is finite iff every gradient is and their squares do not overflow float32 (a
    # square that does would make Adam's second moment infinite: a bad step too). One norm serves the
    # check and the metric: checking each array apart and selecting on the result made XLA:CPU compile
    # the ViT-B/16 step's gradient and update for minutes (docs/performance.md).
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return grads, finite, metrics

  def apply(state: TrainState, grads: nnx.State, finite: jax.Array) -> TrainState:
    trainable, frozen = nnx.split_state(state.params, is_trainable, ...)

    def update(trainable, opt_state):
      updates, opt_state = tx.update(grads, opt_state, trainable)
      # The learned temperature stays in its model's range, as CLIP's and BLIP's trainers keep it.
      return encoder.clamp_logit_scale(optax.apply_updates(trainable, updates)), opt_state

    # A non-finite step changes nothing but the counters: the parameters stay the last good ones.
    if _skip_with_conditional():
      new_trainable, opt_state = jax.lax.cond(finite, update, lambda *old: old, trainable, state.opt_state)
    else:
      new_trainable, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                              update(trainable, state.opt_state), (trainable, state.opt_state))
    good = finite & checks.all_finite(new_trainable)
    return TrainState(
        step=state.step + 1,
        params=nnx.merge_state(new_trainable, frozen),
        opt_state=opt_state,
        rng=state.rng,
        bad_step=jnp.where((state.bad_step < 0) & ~good, state.step, state.bad_step),
    )

  # An objective without an inner attack (or any object with a `loss` alone) has no attack's programs, one
  # without `has_text_stage` (not an `Objective`) no text stage's.
  has_attack = getattr(objective, "inner_attack", lambda: None)() is not None
  has_text = has_attack and getattr(objective, "has_text_stage", False)
  return StepFunctions(text_stage if has_text else None, attack if has_attack else None, gradient, apply, is_trainable)


def _skip_with_conditional() -> bool:
  """How a non-finite step is skipped: `lax.cond` around the update on XLA:CPU, where it runs in place
  (ViT-B/16's AdamW update 194 ms, as unguarded; selecting the new or the old values instead makes XLA
  copy Adam's moments first: 776 ms and 1.2 GB more); a select on accelerators, where XLA:GPU reads a
  conditional's predicate on the host, a synchronisation in every step (docs/performance.md)."""
  return runtime.program_backend() == "cpu"


class TrainStep:
  """The jitted train step `(state, batch, reference) -> (state, metrics)` of `StepFunctions`: the inner
  attack's programs (its text stage, then the adversarial batch; the state's parameters read, nothing
  donated, their results split over the batch axes as the batch is), the gradient's (the gradient in the
  trainable parameters' shardings) and the optimizer's (the state donated and kept in its shardings). At its
  first call for a batch shape, or ahead of it (`compile`), the programs compile at once, each on a thread;
  with `MAT_JAX_COMPILE_AHEAD=0`, each at its first call, one after the other."""

  def __init__(self, functions: StepFunctions, shardings: TrainState, mesh: Mesh, reference_shardings: Any = None):
    batch_sh = mesh_lib.batch_sharding(mesh)
    replicated = mesh_lib.replicated(mesh)
    gradient_sh, _ = nnx.split_state(shardings.params, functions.is_trainable, ...)
    self._text = self._attack = None
    if functions.text is not None:
      self._text = jax.jit(functions.text, in_shardings=(shardings, batch_sh, reference_shardings),
                           out_shardings=batch_sh)
    if functions.attack is not None:
      self._attack = jax.jit(functions.attack, in_shardings=(shardings, batch_sh, batch_sh, reference_shardings),
                             out_shardings=batch_sh)
    self._gradient = jax.jit(functions.gradient, in_shardings=(shardings, batch_sh, batch_sh, reference_shardings),
                             out_shardings=(gradient_sh, replicated, replicated))
    # The state donated: its buffers become the new state's (the gradient has no result of its shape left to be).
    self._apply = jax.jit(functions.apply, donate_argnums=(0,), in_shardings=(shardings, gradient_sh, replicated),
                          out_shardings=shardings)
    self._batch_sharding, self._gradient_sharding, self._replicated = batch_sh, gradient_sh, replicated
    # The batches' signatures (`_batch_signature`) whose programs were compiled, or left to their calls.
    self._prepared: set = set()

  @property
  def programs(self) -> tuple:
    """The jitted programs, in the order a step calls them."""
    return tuple(p for p in (self._text, self._attack, self._gradient, self._apply) if p is not None)

  def lower(self, state: Any, batch: dict, reference: Any = None) -> list[jax.stages.Lowered]:
    """The lowerings of the step's programs for these arguments (arrays, or ShapeDtypeStructs with their
    shardings, as the call's arguments will have them), in the order a step calls them; nothing is compiled.
    Each program's inputs from the one before are its results' shapes in the shardings the call gives them."""
    return list(self._lower_each(state, batch, reference))

  def _lower_each(self, state: Any, batch: dict, reference: Any) -> Iterator[jax.stages.Lowered]:
    """`lower`'s lowerings one at a time, each made when the one before has been taken."""
    def as_batch(out_info):
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._batch_sharding), out_info)

    text = adv = None
    if self._text is not None:
      lowered = self._text.lower(state, batch, reference)
      yield lowered
      text = as_batch(lowered.out_info)
    if self._attack is not None:
      lowered = self._attack.lower(state, batch, text, reference)
      yield lowered
      adv = as_batch(lowered.out_info)
    lowered = self._gradient.lower(state, batch, adv, reference)
    yield lowered
    grads_info, finite_info, _ = lowered.out_info
    grads = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), grads_info,
                         self._gradient_sharding)
    finite = jax.ShapeDtypeStruct(finite_info.shape, finite_info.dtype, sharding=self._replicated)
    yield self._apply.lower(state, grads, finite)

  def compile(self, state: Any, batch: dict, reference: Any = None) -> None:
    """Compile the step's programs for these arguments at once into JAX's caches, where the calls find them:
    each program's compilation starts as soon as it is lowered, while the next one is traced."""
    precompile.compile_all(self._lower_each(state, batch, reference))
    self._prepared.add(_batch_signature(batch))

  def __call__(self, state: TrainState, batch: dict, reference: Any = None) -> tuple[TrainState, dict]:
    signature = _batch_signature(batch)
    if signature not in self._prepared:  # a new batch shape: its programs compile at once
      self._prepared.add(signature)
      if runtime.compile_ahead_enabled():
        self.compile(state, batch, reference)
    text = None if self._text is None else self._text(state, batch, reference)
    adv = None if self._attack is None else self._attack(state, batch, text, reference)
    grads, finite, metrics = self._gradient(state, batch, adv, reference)
    return self._apply(state, grads, finite), metrics

  def cache_size(self) -> int:
    """How many times the step was compiled: each program's compilations (one per batch shape each)."""
    return max(program._cache_size() for program in self.programs)


def _batch_signature(batch: Any) -> tuple:
  """What tells the step's compilations apart, of what changes between calls: the batch's structure and
  its leaves' shapes, dtypes and shardings (the state's and the reference's are the run's throughout)."""
  leaves, structure = jax.tree.flatten(batch)
  return structure, tuple((np.shape(leaf), str(getattr(leaf, "dtype", type(leaf).__name__)),
                           getattr(leaf, "sharding", None)) for leaf in leaves)


def jit_step(functions: StepFunctions, shardings: TrainState, mesh: Mesh, reference_shardings: Any = None) -> TrainStep:
  """Compile boundary: state donated and kept in its shardings, batch split over the batch axes."""
  return TrainStep(functions, shardings, mesh, reference_shardings)
