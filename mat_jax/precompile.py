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

Compiling ahead never changes a result: the program is the one the call would compile, and a program
whose real call comes with other shapes (or that `fn` did not reach) compiles at that call as it always
did. Only the programs `fn` calls itself are collected: one reached inside another transformation (a
`jax.jit`, `vmap`, `scan` of `fn`'s) is part of that one's program, not a program of its own.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import inspect
import threading
from typing import Any, Callable, Iterable, Iterator, Sized

import jax
import numpy as np
from jax._src import core as jax_core

from mat_jax import processes

# On this thread inside `collect`: (the trace of the function being collected, its lowerings by program and
# abstract arguments); None outside `collect`.
_collected: contextvars.ContextVar[tuple[Any, dict] | None] = contextvars.ContextVar("mat_jax.precompile",
                                                                                    default=None)


def _current_trace() -> Any:
  # Private: the one handle on which transformation a call is made under (jax.core has no public one).
  return jax_core.trace_ctx.trace


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
    # The static arguments by position and by name, each inferred from the other as jax.jit does
    # (negative positions count from the end of the signature's positional parameters).
    parameters = inspect.signature(fun).parameters
    names = list(parameters)
    positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters.values())
    numbers = jit_kwargs.get("static_argnums", ())
    static_names = jit_kwargs.get("static_argnames", ())
    numbers = {numbers} if isinstance(numbers, int) else set(numbers)
    numbers = {i + positional if i < 0 else i for i in numbers}
    static_names = {static_names} if isinstance(static_names, str) else set(static_names)
    self._static_numbers = numbers | {names.index(n) for n in static_names if n in names}
    self._static_names = static_names | {names[i] for i in numbers if i < len(names)}

  def _lowering_key(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, tuple]:
    """The call's arguments as a lowering takes them (static ones as they are, the others abstract), and the
    key that tells two calls of one program apart as jax.jit's cache does (statics by their own hash)."""
    static, abstract_args, abstract_kwargs = [], [], {}
    for i, a in enumerate(args):
      abstract_args.append(a if i in self._static_numbers else jax.tree.map(_abstract, a))
      static.append(a if i in self._static_numbers else None)
    for k, v in sorted(kwargs.items()):
      abstract_kwargs[k] = v if k in self._static_names else jax.tree.map(_abstract, v)
      static.append((k, v) if k in self._static_names else None)
    dynamic = [a for i, a in enumerate(abstract_args) if i not in self._static_numbers]
    dynamic += [(k, v) for k, v in abstract_kwargs.items() if k not in self._static_names]
    leaves, tree = jax.tree.flatten(dynamic)
    return tuple(abstract_args), abstract_kwargs, (id(self), tuple(static), tree, tuple(leaves))

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    collecting = _collected.get()
    if collecting is not None and _current_trace() is collecting[0]:
      abstract_args, abstract_kwargs, key = self._lowering_key(args, kwargs)
      if key not in collecting[1]:
        # Programs this one calls are inlined into it, not collected apart.
        token = _collected.set(None)
        try:
          collecting[1][key] = self._jitted.lower(*abstract_args, **abstract_kwargs)
        finally:
          _collected.reset(token)
    return self._jitted(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._jitted, name)

  def __get__(self, instance: Any, owner: Any = None) -> Any:
    # As a method, `self` bound as jax.jit binds it.
    return self if instance is None else functools.partial(self, instance)


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

  def traced(*args: Any, **kwargs: Any) -> Any:
    token = _collected.set((_current_trace(), collected))
    try:
      return fn(*args, **kwargs)
    finally:
      _collected.reset(token)

  shapes = jax.eval_shape(traced, *args, **kwargs)
  return shapes, list(collected.values())


def compile_all(lowerings: Iterable[jax.stages.Lowered], *, workers: int | None = None,
                stop: threading.Event | None = None) -> None:
  """Compile `lowerings` on up to `workers` threads (default: one per core this process may run on, at most one
  per lowering) into JAX's caches, each as soon as `lowerings` gives it: a generator's next lowering is traced
  and lowered on this thread, which holds the GIL, while the ones before it compile on the pool's (a train
  step's first program starts compiling once it is lowered, not after all of them;
  docs/performance.md#compile-time).

  The first compilation error is raised once all have finished; an error making a lowering, or an interrupt
  (Ctrl-C), at once, the compilations not started yet dropped (those running finish on their threads). Once
  `stop` is set (by another thread: this one's caller has stopped), no further compilation starts, nor a
  generator's next lowering."""
  def stopped() -> bool:
    return stop is not None and stop.is_set()

  def compile_one(lowered: jax.stages.Lowered) -> None:
    if not stopped():
      lowered.compile()

  def until_stopped() -> Iterator[jax.stages.Lowered]:
    for lowered in lowerings:
      yield lowered
      if stopped():
        return  # a generator's later lowerings are not made

  workers = max(1, workers or processes.usable_cores())
  if isinstance(lowerings, Sized):
    workers = min(workers, max(len(lowerings), 1))
  if workers == 1:
    for lowered in until_stopped():
      compile_one(lowered)
    return
  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="mat_jax precompile")
  try:
    futures = [pool.submit(compile_one, lowered) for lowered in until_stopped()]
    concurrent.futures.wait(futures)
    for future in futures:
      future.result()
  except BaseException:
    pool.shutdown(wait=False, cancel_futures=True)
    raise
  pool.shutdown()
