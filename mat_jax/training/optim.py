"""Optax optimizer and learning-rate schedule from the experiment's `optimizer` / `schedule` sections.

`schedule.name` is a built-in (constant | cosine | linear, shaped by `end_factor`) or any Optax schedule
constructor as `optax.NAME` (`optax.exponential_decay`, `optax.polynomial_schedule`, ...) called with the
keyword arguments of `schedule.kwargs`. Either is the main schedule after `warmup_steps` of linear warm-up
from 0 to `optimizer.learning_rate`, its steps counted from the end of the warm-up.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

BUILTIN_SCHEDULES = ("constant", "cosine", "linear")
OPTAX_PREFIX = "optax."
# Required constructor parameters that schedule.kwargs may leave out, filled from the config: the
# learning rate the warm-up ends at, and the length of the main schedule.
PEAK_PARAMETERS = ("init_value", "peak_value", "value")
# Beside `peak_value`, `init_value` is where the constructor's own warm-up starts (optax.warmup_*): from 0,
# as the built-in warm-up; filled with the peak, the warm-up would be flat.
WARMUP_START_PARAMETER = "init_value"
LENGTH_PARAMETERS = ("transition_steps", "decay_steps")


def optax_schedules() -> dict[str, Callable[..., optax.Schedule]]:
  """The Optax schedule constructors by their config name (`optax.exponential_decay`, ...): the functions
  of `optax.schedules` named *_schedule or *_decay (not join_schedules, whose arguments are callables)."""
  return {OPTAX_PREFIX + name: fn for name, fn in vars(optax.schedules).items()
          if inspect.isfunction(fn) and not name.startswith("_") and name.endswith(("_schedule", "_decay"))}


def schedule_parameters(name: str) -> Mapping[str, inspect.Parameter]:
  """The parameters of the Optax schedule constructor `name` (`optax.NAME`); empty for a built-in or an
  unknown name."""
  fn = optax_schedules().get(name)
  return inspect.signature(fn).parameters if fn is not None else {}


def check_schedule_name(name: str) -> None:
  """ValueError for a `schedule.name` that is neither a built-in nor an Optax schedule constructor."""
  if name in BUILTIN_SCHEDULES:
    return
  known = optax_schedules()
  if name in known:
    return
  bare = name[len(OPTAX_PREFIX):] if name.startswith(OPTAX_PREFIX) else name
  close = difflib.get_close_matches(OPTAX_PREFIX + bare, list(known), n=1, cutoff=0.5)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  raise ValueError(f"schedule.name={name!r} is not one of {', '.join(BUILTIN_SCHEDULES)} or an Optax schedule "
                   f"constructor.{hint} Optax schedules: {', '.join(sorted(known))}")


def optax_schedule_arguments(name: str, kwargs: Mapping[str, Any], peak: float, main_steps: int
                             ) -> dict[str, Any]:
  """The keyword arguments `optax.NAME` is called with: `kwargs`, plus the required parameters they leave
  out that the config gives (PEAK_PARAMETERS: `peak`, except a warm-up's start, 0; LENGTH_PARAMETERS:
  `main_steps`, the steps after warm-up). ValueError naming the constructor and its parameters for a
  parameter it does not take or a required one missing."""
  parameters = schedule_parameters(name)
  signature = ", ".join(parameters)
  unknown = sorted(set(kwargs) - set(parameters))
  if unknown:
    close = difflib.get_close_matches(unknown[0], list(parameters), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"schedule.kwargs: {name} takes no {', '.join(map(repr, unknown))}.{hint} "
                     f"Its parameters: {signature}")
  arguments = {key: _step_keys(value) for key, value in kwargs.items()}
  for key, parameter in parameters.items():
    if key in arguments or parameter.default is not inspect.Parameter.empty:
      continue
    if key == WARMUP_START_PARAMETER and "peak_value" in parameters:
      arguments[key] = 0.0
    elif key in PEAK_PARAMETERS:
      arguments[key] = peak
    elif key in LENGTH_PARAMETERS:
      arguments[key] = main_steps
    else:
      raise ValueError(f"schedule.kwargs: {name} needs {key!r} (set schedule.kwargs.{key}); its parameters: "
                       f"{signature}")
  return arguments


def _step_keys(value: Any) -> Any:
  """A step-keyed mapping (`boundaries_and_scales`) with the int keys Optax compares with steps: config.json
  stores them as strings."""
  if isinstance(value, Mapping):
    return {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v for k, v in value.items()}
  return value


def make_schedule(schedule: Any, peak: float, total_steps: int) -> optax.Schedule:
  """The main schedule `schedule.name` after a linear warmup of `warmup_steps` from 0 to `peak`."""
  warmup = int(schedule.warmup_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = peak * float(schedule.end_factor)
  kwargs = schedule.get("kwargs") or {}
  kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)  # a ConfigDict is no Mapping
  check_schedule_name(schedule.name)
  if schedule.name in BUILTIN_SCHEDULES and kwargs:
    raise ValueError(f"schedule.kwargs ({', '.join(kwargs)}) are the arguments of an optax.* schedule; "
                     f"{schedule.name!r} takes warmup_steps and end_factor")
  if schedule.name == "constant":
    main = optax.constant_schedule(peak)
  elif schedule.name == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(schedule.end_factor))
  elif schedule.name == "linear":
    main = optax.linear_schedule(peak, end, decay_steps)
  else:
    main = optax_schedules()[schedule.name](**optax_schedule_arguments(schedule.name, kwargs, peak, decay_steps))
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
