"""Image attacks in pixel space: PGD (L-inf, L2, optional momentum) and APGD, composed from small parts.

An attack is `attack(loss_fn, images, key, *, eps, ...) -> adversarial images`: an initialisation
(a random start in the eps-ball, or none), a loss to maximise (`mat_jax.attacks.losses`), a step rule
(sign steps for L-inf, normalised gradients for L2, optional momentum) and a projection (the eps-ball,
then the [0, 1] box). The whole K-step loop is one `lax.fori_loop`, so an attack traces into the
surrounding `jit` (an evaluation batch, or a training step) as one compiled computation. `eps` and
`step_size` are ordinary (traceable) arguments: `jax.vmap` over eps works, and one compilation serves
every budget. The result carries `stop_gradient`: a training step differentiates the loss at the
adversarial point, never through the attack.

Images are float32 NHWC in [0, 1]; eps and step sizes are in the same pixel units (2/255, ...).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mat_jax import checks, precompile
from mat_jax.attacks import losses
from mat_jax.attacks.losses import LossFn
from mat_jax.attacks.spec import check_norm
from mat_jax.errors import InputError
from mat_jax.models.dual_encoder import DualEncoder

_TINY = 1e-12


def _per_example(x: jax.Array, values: jax.Array) -> jax.Array:
  """Broadcast per-example values (B,) against images (B, H, W, C)."""
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def _l2_norms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def checked_key(key, norm: str, **budget) -> jax.Array:
  """What a composable attack checks for free before it traces, returning its key: the norm, the budget
  where it is given as host numbers (`checks.check_attack_numbers`; traced and device values are the entry
  point's to check) and the key (`checks.as_key`)."""
  check_norm(norm)
  checks.check_attack_numbers(norm=norm, **budget)
  return checks.as_key(key)


# ----------------------------------------------------------------------------------------------------
# Parts: initialisation, step direction, projection
# ----------------------------------------------------------------------------------------------------

def random_init(key: jax.Array, images: jax.Array, eps, norm: str = "linf") -> jax.Array:
  """A symmetric random start: uniform in the L-inf cube [-eps, eps]^n, or uniform in the L2 ball."""
  check_norm(norm)
  if norm == "linf":
    delta = jax.random.uniform(key, images.shape, images.dtype, -1.0, 1.0) * eps
  else:
    dir_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(dir_key, images.shape, images.dtype)
    direction = direction / _per_example(images, jnp.maximum(_l2_norms(direction), _TINY))
    n = images[0].size
    radius = eps * jax.random.uniform(radius_key, (images.shape[0],), images.dtype) ** (1.0 / n)
    delta = direction * _per_example(images, radius)
  return project(images + delta, images, eps, norm)


def project(x: jax.Array, images: jax.Array, eps, norm: str = "linf") -> jax.Array:
  """Onto the eps-ball around `images`, then into the [0, 1] pixel box (which only shrinks the step)."""
  delta = x - images
  if norm == "linf":
    delta = jnp.clip(delta, -eps, eps)
  else:
    norms = _l2_norms(delta)
    delta = delta * _per_example(delta, jnp.minimum(1.0, eps / jnp.maximum(norms, _TINY)))
  return jnp.clip(images + delta, 0.0, 1.0)


def ascent_direction(grad: jax.Array, norm: str = "linf") -> jax.Array:
  """The steepest-ascent unit step for the norm: sign(g) for L-inf, g / ||g||_2 for L2."""
  if norm == "linf":
    return jnp.sign(grad)
  return grad / _per_example(grad, jnp.maximum(_l2_norms(grad), _TINY))


def per_example_value_and_grad(loss_fn: LossFn) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """(x, key) -> (losses (B,), d sum(losses) / dx). Per-example gradients, since losses are per image."""

  def summed(x, key):
    values = loss_fn(x, key)
    if values.ndim != 1 or values.shape[0] != x.shape[0]:
      raise ValueError(f"an attack loss must return one value per image, shape ({x.shape[0]},); got "
                       f"{values.shape}. Build it with mat_jax.attacks.losses (per-example losses).")
    return jnp.sum(values), values

  grad_fn = jax.grad(summed, has_aux=True)

  def value_and_grad(x, key):
    grad, values = grad_fn(x, key)
    return values, grad

  return value_and_grad


# ----------------------------------------------------------------------------------------------------
# PGD
# ----------------------------------------------------------------------------------------------------

def pgd(loss_fn: LossFn, images: jax.Array, key: jax.Array, *, eps, step_size, steps,
        norm: str = "linf", random_start: bool = True, momentum: float = 0.0,
        keep_best: bool = False) -> jax.Array:
  """Projected gradient ascent on `loss_fn` within the eps-ball (Madry et al.; SGA's ImageAttacker).

  x_0 = clip(x + U(-eps, eps)) (or x); x_{t+1} = project(x_t + step_size * direction(g_t)), with
  g_t the gradient of the summed per-example loss, or with momentum mu > 0 (a Python float) the
  MI-FGSM accumulator g_t = mu g_{t-1} + grad_t / mean|grad_t|. `steps` may be a traced integer.
  Each step draws the loss's key as fold_in(key, t), so for a fixed key the first n iterates do not
  depend on the total number of steps.

  keep_best: return, per image, the iterate with the highest loss (the start and the final point
  included; one extra forward pass) instead of the last one. With it, the returned loss never
  decreases as `steps` grows for a fixed key (each run's iterates are a prefix of a longer run's).
  """
  key = checked_key(key, norm, eps=eps, step_size=step_size, steps=steps)
  images = jax.lax.stop_gradient(images)
  init_key, loop_key = jax.random.split(key)
  x = random_init(init_key, images, eps, norm) if random_start else images
  value_and_grad = per_example_value_and_grad(loss_fn)
  batch = images.shape[0]

  def body(t, state):
    x, velocity, best_x, best_loss = state
    values, grad = value_and_grad(x, jax.random.fold_in(loop_key, t))
    if keep_best:
      better = values > best_loss
      best_x = jnp.where(_per_example(x, better), x, best_x)
      best_loss = jnp.where(better, values, best_loss)
    if momentum:
      grad = grad / _per_example(grad, jnp.maximum(jnp.mean(jnp.abs(grad), axis=(1, 2, 3)), _TINY))
      velocity = momentum * velocity + grad
    else:
      velocity = grad
    x = project(x + step_size * ascent_direction(velocity, norm), images, eps, norm)
    return x, velocity, best_x, best_loss

  state = (x, jnp.zeros_like(x), x, jnp.full((batch,), -jnp.inf, jnp.float32))
  x, _, best_x, best_loss = jax.lax.fori_loop(0, steps, body, state)
  if keep_best:
    final = loss_fn(x, jax.random.fold_in(loop_key, steps))
    x = jnp.where(_per_example(x, final > best_loss), x, best_x)
  return jax.lax.stop_gradient(x)


# ----------------------------------------------------------------------------------------------------
# APGD (Croce & Hein 2020, as AutoAttack runs it)
# ----------------------------------------------------------------------------------------------------

def apgd_schedule(steps: int) -> tuple[int, int, int]:
  """AutoAttack's checkpoint schedule: first window, minimum window, window decrement (in steps)."""
  return max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)


def _apgd_start(key: jax.Array, images: jax.Array, eps, norm: str) -> jax.Array:
  """AutoAttack's start: a random corner-scaled point (L-inf: max |delta| = eps; L2: on the sphere)."""
  if norm == "linf":
    t = jax.random.uniform(key, images.shape, images.dtype, -1.0, 1.0)
    t = t / _per_example(t, jnp.maximum(jnp.max(jnp.abs(t), axis=(1, 2, 3)), _TINY))
  else:
    t = jax.random.normal(key, images.shape, images.dtype)
    t = t / _per_example(t, jnp.maximum(_l2_norms(t), _TINY))
  return jnp.clip(images + eps * t, 0.0, 1.0)


def _apgd_run(loss_fn: LossFn, images: jax.Array, key: jax.Array, *, eps, steps: int, norm: str,
              rho: float, alpha: float, random_start: bool) -> tuple[jax.Array, jax.Array]:
  """One APGD run -> (best iterate, its loss) per image."""
  first_window, min_window, decrement = apgd_schedule(steps)
  value_and_grad = per_example_value_and_grad(loss_fn)
  start_key, loop_key = jax.random.split(key)
  x0 = _apgd_start(start_key, images, eps, norm) if random_start else images
  loss0, grad0 = value_and_grad(x0, jax.random.fold_in(loop_key, steps))
  batch = images.shape[0]

  def body(i, s):
    # Momentum step: z = P(x + eta * dir(g)); x' = P(x + a (z - x) + (1 - a)(x - x_prev)), a = 1 at
    # the first step (plain gradient step), 0.75 afterwards.
    a = jnp.where(i > 0, alpha, 1.0)
    eta = _per_example(images, s["step"])
    z = project(s["x"] + eta * ascent_direction(s["grad"], norm), images, eps, norm)
    x_new = project(s["x"] + a * (z - s["x"]) + (1.0 - a) * (s["x"] - s["x_prev"]), images, eps, norm)
    values, grad = value_and_grad(x_new, jax.random.fold_in(loop_key, i))

    increases = s["increases"] + (values > s["last_loss"]).astype(jnp.int32)
    better = values > s["best_loss"]
    best_x = jnp.where(_per_example(images, better), x_new, s["best_x"])
    best_grad = jnp.where(_per_example(images, better), grad, s["best_grad"])
    best_loss = jnp.where(better, values, s["best_loss"])

    # Checkpoint: halve the step of every image whose loss rose in at most rho of the window's steps,
    # or whose best loss did not improve since the previous checkpoint (unless halved there), and
    # restart those images from their best point.
    counter = s["counter"] + 1
    at_check = counter == s["window"]
    oscillating = increases.astype(jnp.float32) <= s["window"].astype(jnp.float32) * rho
    stalled = jnp.logical_not(s["reduced"]) & (s["best_at_check"] >= best_loss)
    reduce = at_check & (oscillating | stalled)
    reduce_b = _per_example(images, reduce)
    return dict(
        x=jnp.where(reduce_b, best_x, x_new),
        x_prev=s["x"],
        grad=jnp.where(reduce_b, best_grad, grad),
        step=jnp.where(reduce, s["step"] / 2.0, s["step"]),
        last_loss=values,
        increases=jnp.where(at_check, 0, increases),
        best_x=best_x, best_grad=best_grad, best_loss=best_loss,
        best_at_check=jnp.where(at_check, best_loss, s["best_at_check"]),
        reduced=jnp.where(at_check, reduce, s["reduced"]),
        counter=jnp.where(at_check, 0, counter),
        window=jnp.where(at_check, jnp.maximum(s["window"] - decrement, min_window), s["window"]),
    )

  state = dict(
      x=x0, x_prev=x0, grad=grad0,
      step=jnp.full((batch,), 2.0, jnp.float32) * eps,
      # AutoAttack compares the first step with a zero-initialised buffer; the start's loss is the
      # meaningful previous value.
      last_loss=loss0,
      increases=jnp.zeros((batch,), jnp.int32),
      best_x=x0, best_grad=grad0, best_loss=loss0, best_at_check=loss0,
      reduced=jnp.ones((batch,), bool),  # no "stalled" test at the first checkpoint
      counter=jnp.zeros((), jnp.int32),
      window=jnp.asarray(first_window, jnp.int32),
  )
  final = jax.lax.fori_loop(0, steps, body, state)
  return final["best_x"], final["best_loss"]


def apgd(loss_fn: LossFn, images: jax.Array, key: jax.Array, *, eps, steps: int = 100,
         norm: str = "linf", restarts: int = 1, rho: float = 0.75, alpha: float = 0.75,
         random_start: bool = True) -> jax.Array:
  """Auto-PGD: step size 2 eps halved at checkpoints, momentum alpha = 0.75, best-iterate tracking.

  Returns, per image, the highest-loss point found over all restarts (AutoAttack returns the first
  misclassified point, which only exists for top-1 success; retrieval is scored at R@1/5/10, so the
  loss maximiser is the useful output). `steps` is static (it fixes the checkpoint schedule); `eps`
  is traced. `loss_fn` must give per-image losses that depend on that image only.
  """
  key = checked_key(key, norm, eps=eps, steps=steps)
  if restarts < 1:
    raise ValueError(f"restarts must be >= 1, got {restarts}")
  images = jax.lax.stop_gradient(images)
  def run(k):
    return _apgd_run(loss_fn, images, k, eps=eps, steps=steps, norm=norm, rho=rho, alpha=alpha,
                              random_start=random_start)

  def restart(carry, k):
    best_x, best_loss = carry
    x, values = run(k)
    better = values > best_loss
    return (jnp.where(_per_example(images, better), x, best_x), jnp.where(better, values, best_loss)), None

  keys = jax.random.split(key, restarts)
  first = run(keys[0])
  (best_x, _), _ = jax.lax.scan(restart, first, keys[1:])
  return jax.lax.stop_gradient(best_x)


def apgd_targeted(logits_fn: losses.LogitsFn, positives: jax.Array, images: jax.Array, key: jax.Array, *,
                  eps, steps: int = 100, n_targets: int = 9, norm: str = "linf", rho: float = 0.75,
                  alpha: float = 0.75, random_start: bool = True) -> jax.Array:
  """APGD-T: one APGD run on the targeted DLR loss per target, the targets being each image's
  `n_targets` highest-scoring wrong texts at the clean image (AutoAttack's choice). Per image, the
  run with the largest final margin (best wrong text minus best right text) is kept. Every image needs
  `n_targets` wrong texts: an image with fewer spends its remaining runs aiming at its own (or padding)
  texts, which run but cannot help it (`apgd_attack` checks this where the shapes tell it).
  """
  key = checked_key(key, norm, eps=eps, steps=steps)
  images = jax.lax.stop_gradient(images)
  clean = logits_fn(images)
  if n_targets > clean.shape[-1] - 1:
    raise ValueError(f"n_targets={n_targets} needs more than {n_targets} texts to rank; the logits "
                     f"cover {clean.shape[-1]}. Lower n_targets or score against more texts.")
  negatives_first = jnp.where(positives, -jnp.inf, clean)
  targets = jax.lax.top_k(negatives_first, n_targets)[1]  # (B, n_targets)

  def one_target(carry, inputs):
    best_x, best_margin = carry
    target, k = inputs
    loss_fn = losses.logit_loss(logits_fn, positives, lambda z, p: losses.targeted_dlr(z, p, target))
    x, _ = _apgd_run(loss_fn, images, k, eps=eps, steps=steps, norm=norm, rho=rho, alpha=alpha,
                     random_start=random_start)
    m = losses.margin(logits_fn(x), positives)
    better = m > best_margin
    return (jnp.where(_per_example(images, better), x, best_x), jnp.where(better, m, best_margin)), None

  init = (images, losses.margin(clean, positives))
  (best_x, _), _ = jax.lax.scan(one_target, init, (targets.T, jax.random.split(key, n_targets)))
  return jax.lax.stop_gradient(best_x)


# ----------------------------------------------------------------------------------------------------
# Compiled image-only attacks on a dual encoder (evaluation baselines, the notebook API)
# ----------------------------------------------------------------------------------------------------

def check_batch(encoder: DualEncoder, images, input_ids=None, attention_mask=None, *,
                read_device: bool = False) -> None:
  """A batch against the model: the images' shape and dtype for a model with a vision config, and token
  ids of the images' batch ((B, L) or (B, K, L)) that the text tower can take. Values are read for host
  (numpy) arrays, and for device arrays only with `read_device` (a one-call attack, once per call): the
  composable attacks' device arrays come from an entry point that checked them once (evaluation, a
  training step), and reading them back would stall every batch."""
  config = getattr(encoder, "config", None)
  vision = getattr(config, "vision", None)
  if hasattr(vision, "image_size"):
    checks.check_images(images, vision.image_size, read_device=read_device)
  if input_ids is None:
    return
  n_images, ids_shape = np.shape(images)[0], np.shape(input_ids)
  if len(ids_shape) not in (2, 3) or ids_shape[0] != n_images:
    hint = "; a single caption needs a batch axis: input_ids[None]" if len(ids_shape) == 1 else ""
    raise InputError(f"input_ids must be (B, L) or (B, K, L) with B = {n_images} images, got {ids_shape}{hint}")
  text = getattr(config, "text", None)
  if hasattr(text, "vocab_size"):
    # Against the model's positions (a BLIP takes any length up to its table, beyond its context length).
    checks.check_token_ids(_rows(input_ids, read_device), _rows(attention_mask, read_device), text.positions,
                           text.vocab_size, read_device=read_device)


def _rows(tokens, read_device: bool):
  """(B, K, L) tokens as (B * K, L) rows for `checks.check_token_ids`; a device array whose values are
  not read as its shape and dtype alone (reshaping it would dispatch a program in every batch)."""
  shape = np.shape(tokens)
  rows = (int(np.prod(shape[:-1])), shape[-1])
  if not isinstance(tokens, jax.Array):
    return np.reshape(tokens, rows)
  if read_device or checks.is_traced(tokens):
    return tokens.reshape(rows)
  return jax.ShapeDtypeStruct(rows, tokens.dtype)


def pgd_attack(encoder: DualEncoder, params: nnx.State, images: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array, key: jax.Array, caption_weights: jax.Array | None = None, *,
               eps, step_size, steps, norm: str = "linf", random_start: bool = True,
               momentum: float = 0.0, keep_best: bool = False) -> jax.Array:
  """PGD lowering each image's cosine similarity to its caption(s) (SGA's image attack, no rescaling).

  input_ids, attention_mask: (B, L) one caption per image or (B, K, L) K captions per image;
  caption_weights (B, K): 0 for padding caption slots. eps, step_size, steps are traced (one
  compilation per shape serves every budget).
  """
  key = checked_key(key, norm, eps=eps, step_size=step_size, steps=steps)
  check_batch(encoder, images, input_ids, attention_mask)
  if caption_weights is None:
    caption_weights = jnp.ones(input_ids.shape[:2] if input_ids.ndim == 3 else (input_ids.shape[0], 1),
                               jnp.float32)
  # Static arguments positionally, always: jit keys its cache on how arguments are passed.
  return _pgd_attack(encoder, params, images, input_ids, attention_mask, key, caption_weights, eps, step_size,
                     steps, norm, bool(random_start), float(momentum), bool(keep_best))


@precompile.jit(static_argnums=(0, 10, 11, 12, 13))
def _pgd_attack(encoder, params, images, input_ids, attention_mask, key, caption_weights, eps, step_size, steps,
                norm, random_start, momentum, keep_best):
  texts = encoder.text_features(params, input_ids, attention_mask)
  loss = losses.paired_cosine(encoder, params, texts, caption_weights)
  return pgd(loss, images, key, eps=eps, step_size=step_size, steps=steps, norm=norm,
             random_start=random_start, momentum=momentum, keep_best=keep_best)


def apgd_attack(encoder: DualEncoder, params: nnx.State, images: jax.Array, text_features: jax.Array,
                positives: jax.Array, key: jax.Array, *, eps, steps: int = 100, norm: str = "linf",
                restarts: int = 1, n_targets: int = 0, text_weights: jax.Array | None = None) -> jax.Array:
  """APGD-CE (n_targets = 0) or APGD-T with the targeted DLR loss (n_targets > 0) on retrieval logits.

  The classes are M texts (e.g. every caption of the evaluation set): text_features (M, D), and
  positives (B, M) bool marks each image's own captions. Logits use the model's logit scale. `steps`
  fixes APGD's checkpoint schedule and is static; eps is traced. APGD-T runs one APGD per target and
  ignores `restarts`. text_weights: 0 for padding texts (e.g. a batch's padding caption slots, (B, K)),
  which are then neither positives nor negatives; None: all M are real.
  """
  key = checked_key(key, norm, eps=eps, steps=steps)
  check_batch(encoder, images)
  b, m = images.shape[0], text_features.shape[0]
  if tuple(positives.shape) != (b, m):
    # Broadcast, a (B, 1) column would mark the first text (or every text) as each image's own.
    raise InputError(f"positives must be (images, texts) = ({b}, {m}): one row per image marking its own texts "
                     f"among the {m} of text_features, got shape {tuple(positives.shape)}")
  if text_weights is not None and text_weights.size != m:
    raise InputError(f"text_weights must hold one weight per text ({m}; (M,) or (B, K) with B * K = M), got shape "
                     f"{tuple(text_weights.shape)}")
  if n_targets and isinstance(text_weights, np.ndarray) and np.count_nonzero(text_weights) < 4:
    # Padding texts are at the lowest logit: counted as texts, one would be among the DLR's top 4 and make
    # its denominator huge and its gradient 0, so APGD-T would return its random start. (Checked on a host
    # array only: a device array is not read back.)
    raise ValueError(f"APGD-T's targeted DLR ranks at least 4 texts, and {np.count_nonzero(text_weights)} of the "
                     f"{m} texts have a nonzero weight (the others are padding); score each image against more "
                     "texts (a bigger batch or the whole eval set)")
  if n_targets and text_weights is not None and text_weights.ndim == 2:
    # (B, K) caption slots: each image owns K of the M texts, leaving it M - K wrong ones to aim at.
    wrong = text_features.shape[0] - text_weights.shape[1]
    if n_targets > wrong:
      raise ValueError(f"n_targets={n_targets}: each image has {text_weights.shape[1]} caption slots of its own "
                       f"among the {text_features.shape[0]} texts, leaving {wrong} wrong texts to aim at; lower "
                       "n_targets or score against more texts")
  return _apgd_attack(encoder, params, images, text_features, positives, text_weights, key, eps, int(steps), norm,
                      int(restarts), int(n_targets))


@precompile.jit(static_argnums=(0, 8, 9, 10, 11))
def _apgd_attack(encoder, params, images, text_features, positives, text_weights, key, eps, steps, norm, restarts,
                 n_targets):
  logits_fn, positives = losses.without_padding(losses.retrieval_logits(encoder, params, text_features), positives,
                                                text_weights)
  if n_targets:
    return apgd_targeted(logits_fn, positives, images, key, eps=eps, steps=steps, n_targets=n_targets,
                         norm=norm)
  return apgd(losses.logit_loss(logits_fn, positives), images, key, eps=eps, steps=steps, norm=norm,
              restarts=restarts)
