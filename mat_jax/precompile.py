"""Compiling the programs a computation is about to call, several at once, before it calls them.

XLA compiles a jitted program at its first call, so a computation that calls a sequence of programs (an
evaluation: each attack's text stage, its image PGD, the encoders) compiles them one after another, each
mostly on one thread, while the host's other cores idle. Their shapes are known before the first one
runs. `collect(fn, *args)` traces `fn` abstractly (`jax.eval_shape`: nothing runs) and lowers every
`precompile.jit` program it reaches, for the arguments it reaches it with, statics included; `compile_all`
compiles those lowerings on a pool of threads (XLA releases the GIL while it compiles) into JAX's caches,
where the real calls then find them: in memory, or, in another process, in the persistent compilation
cache.

A `precompile.jit` program is `jax.jit` of the function in every other respect: called outside `collect`,
or traced inside another program (a training step that inlines an attack), it only adds one lookup of a
context variable. Collecting is per thread: the programs other threads call meanwhile are theirs.

Collecting can only save time: a program whose real call comes with other shapes (or that `fn` did not
reach) compiles at that call as it always did.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import inspect
import os
from typing import Any, Callable

import jax
import numpy as np

# The lowerings being collected on this thread, by program and abstract arguments; None outside `collect`.
_collected: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mat_jax.precompile", default=None)


def _abstract(x: Any) -> Any:
  """A traced argument (an array, concrete or traced, or a Python scalar) as the shape, dtype and weak type
  that a jitted call gives it; a None or another pytree node's leaf as it is."""
  if isinstance(x, (jax.Array, jax.core.Tracer, np.ndarray, np.generic, bool, int, float, complex)):
    aval = jax.typeof(x)  # numpy's int64 canonicalised as a call does it (int32 without x64)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)
  return x


class Program:
  """`jax.jit(fun, **jit_kwargs)` that, called inside `collect` on this thread, also lowers itself for its
  arguments (once per program and abstract arguments). `lower`, `trace`, `eval_shape` and the rest are
  the jitted function's."""

  def __init__(self, fun: Callable, **jit_kwargs: Any):
    self._jitted = jax.jit(fun, **jit_kwargs)
    functools.update_wrapper(self, fun)
    # The static arguments by position and by name, each inferred from the other as jax.jit does.
    names = list(inspect.signature(fun).parameters)
    numbers = jit_kwargs.get("static_argnums", ())
    static_names = jit_kwargs.get("static_argnames", ())
    numbers = {numbers} if isinstance(numbers, int) else set(numbers)
    static_names = {static_names} if isinstance(static_names, str) else set(static_names)
    self._static_numbers = numbers | {names.index(n) for n in static_names if n in names}
    self._static_names = static_names | {names[i] for i in numbers if i < len(names)}

  def _abstract_arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments as a lowering takes them: static ones as they are, the others abstract."""
    return (tuple(a if i in self._static_numbers else jax.tree.map(_abstract, a) for i, a in enumerate(args)),
            {k: v if k in self._static_names else jax.tree.map(_abstract, v) for k, v in kwargs.items()})

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    collected = _collected.get()
    if collected is not None:
      abstract_args, abstract_kwargs = self._abstract_arguments(args, kwargs)
      leaves, tree = jax.tree.flatten((abstract_args, abstract_kwargs))
      key = (id(self), tree, tuple(leaves))
      if key not in collected:
        # Programs this one calls are inlined into it, not collected apart.
        token = _collected.set(None)
        try:
          collected[key] = self._jitted.lower(*abstract_args, **abstract_kwargs)
        finally:
          _collected.reset(token)
    return self._jitted(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._jitted, name)


def jit(fun: Callable | None = None, **jit_kwargs: Any) -> Any:
  """`jax.jit` whose programs `collect` can lower ahead; as `jax.jit`, a decorator with or without arguments
  (`@precompile.jit`, `@precompile.jit(static_argnums=0)`)."""
  if fun is None:
    return lambda f: Program(f, **jit_kwargs)
  return Program(fun, **jit_kwargs)


def collect(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, list[jax.stages.Lowered]]:
  """`jax.eval_shape(fn, *args, **kwargs)` (shapes and dtypes of its result; nothing runs), and the
  lowering of every `precompile.jit` program `fn` calls, once per program and abstract arguments, in the
  order of their first calls."""
  collected: dict = {}
  token = _collected.set(collected)
  try:
    shapes = jax.eval_shape(fn, *args, **kwargs)
  finally:
    _collected.reset(token)
  return shapes, list(collected.values())


def compile_all(lowerings: list[jax.stages.Lowered], *, workers: int | None = None) -> None:
  """Compile `lowerings` on up to `workers` threads (default: one per core, at most one per lowering),
  into JAX's caches. The first error is raised once all have finished."""
  if not lowerings:
    return
  workers = max(1, min(len(lowerings), workers or os.cpu_count() or 1))
  if workers == 1:
    for lowered in lowerings:
      lowered.compile()
    return
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="mat_jax precompile") as pool:
    for future in [pool.submit(lowered.compile) for lowered in lowerings]:
      future.result()
