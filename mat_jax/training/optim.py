"""Optax optimizer and learning-rate schedule from the experiment's `optimizer` / `schedule` sections."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def make_schedule(schedule: Any, peak: float, total_steps: int) -> optax.Schedule:
  """constant | cosine | linear, each after a linear warmup of `warmup_steps` from 0."""
  warmup = int(schedule.warmup_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = peak * float(schedule.end_factor)
  if schedule.name == "constant":
    main = optax.constant_schedule(peak)
  elif schedule.name == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(schedule.end_factor))
  elif schedule.name == "linear":
    main = optax.linear_schedule(peak, end, decay_steps)
  else:
    raise ValueError(f"unknown schedule {schedule.name!r}; choose constant, cosine or linear")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: biases, LayerNorm scales, the temperature and the class tokens are not
  decayed. A matrix has two axes longer than 1, so a vector stored with singleton axes (BLIP's class token,
  (1, 1, W)) is a vector, as CLIP's (W,) is."""
  return jax.tree.map(lambda p: sum(d > 1 for d in jnp.shape(p)) >= 2, params)


def make_optimizer(optimizer: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  name = optimizer.name
  wd = float(optimizer.weight_decay)
  parts = []
  if optimizer.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optimizer.grad_clip_norm)))
  if name == "adamw":
    parts.append(optax.adamw(schedule, b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                             weight_decay=wd, mask=_decay_mask))
  elif name == "adam":
    if wd:
      parts.append(optax.masked(optax.add_decayed_weights(wd), _decay_mask))
    parts.append(optax.adam(schedule, b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps))
  elif name == "sgd":
    if wd:
      parts.append(optax.masked(optax.add_decayed_weights(wd), _decay_mask))
    parts.append(optax.sgd(schedule, momentum=optimizer.momentum or None, nesterov=optimizer.nesterov))
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, adam or sgd")
  return optax.chain(*parts)
