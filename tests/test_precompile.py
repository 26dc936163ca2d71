"""`mat_jax.precompile`: the programs a computation calls, lowered from an abstract trace and compiled ahead."""

from __future__ import annotations

import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mat_jax import precompile

import helpers


@pytest.fixture
def compiled():
  """The names of the programs XLA compiles (or the persistent cache loads) while the test runs."""
  with helpers.compiled_programs() as names:
    yield names


@precompile.jit(static_argnums=2)
def _scaled_noise(x, key, scale, shift):
  return jnp.sin(x) * scale + jax.random.normal(key, x.shape) + shift


@precompile.jit
def _inner(x):
  return x * 3


@precompile.jit
def _outer(x):
  return _inner(x) + 1


def _module(lowered) -> str:
  return re.search(r"module @(\w+)", lowered.as_text()).group(1)


def test_collect_lowers_each_program_once_per_abstract_arguments_and_runs_nothing(compiled):
  calls = []

  def computation(key, x):
    calls.append(isinstance(x, jax.core.Tracer))
    a = _scaled_noise(x * 2, jax.random.fold_in(key, 1), 3, 0.5)
    b = _scaled_noise(x, key, 3, 0.25)     # same shapes and statics: lowered once
    c = _scaled_noise(x, key, 4, 0.25)     # another static value: another program
    d = _scaled_noise(x[:2], key, 3, 0.5)  # another shape: another program
    return a + b + c, d, _outer(x)

  x = np.ones((5, 7), np.float32)
  shapes, lowerings = precompile.collect(computation, jax.eval_shape(lambda: jax.random.key(0)), x)
  assert calls == [True]  # traced once, abstractly
  assert (shapes[0].shape, shapes[1].shape, shapes[2].shape) == ((5, 7), (2, 7), (5, 7))
  # _inner runs inside _outer's program: not a program of its own.
  assert [_module(lowered) for lowered in lowerings] == ["jit__scaled_noise"] * 3 + ["jit__outer"]
  assert compiled == []  # lowered, neither compiled nor run


def test_the_real_calls_find_what_compile_all_compiled(compiled):
  x = np.full((3, 11), 0.5, np.float32)

  def computation(key):
    return _scaled_noise(jnp.asarray(x), key, 2, 0.125), _outer(jnp.asarray(x))

  _, lowerings = precompile.collect(computation, jax.eval_shape(lambda: jax.random.key(0)))
  precompile.compile_all(lowerings, workers=2)
  assert sorted(compiled) == ["jit(_outer)", "jit(_scaled_noise)"]
  key = jax.random.key(1)
  compiled.clear()
  out = _scaled_noise(jnp.asarray(x), key, 2, 0.125)
  np.testing.assert_allclose(out, jnp.sin(x) * 2 + jax.random.normal(key, x.shape) + 0.125, rtol=1e-6)
  _outer(jnp.asarray(x))
  assert "jit(_scaled_noise)" not in compiled and "jit(_outer)" not in compiled, compiled
  # Without collect first, the first call compiles (the check above can fail).
  _scaled_noise(jnp.asarray(x[:1]), key, 2, 0.125)
  assert "jit(_scaled_noise)" in compiled


def test_only_the_collecting_thread_collects():
  started, release = threading.Event(), threading.Event()

  def other_thread():
    started.wait()
    _inner(jnp.ones((13,)))  # called while the main thread collects
    release.set()

  thread = threading.Thread(target=other_thread)
  thread.start()

  def computation(x):
    started.set()
    release.wait(timeout=60)
    return _outer(x)

  _, lowerings = precompile.collect(computation, jax.ShapeDtypeStruct((13,), jnp.float32))
  thread.join()
  assert [_module(lowered) for lowered in lowerings] == ["jit__outer"]


def test_a_failed_compilation_is_raised_once_all_have_finished():
  class Failing:
    def compile(self):
      raise RuntimeError("no such kernel")

  finished = []

  class Fine:
    def compile(self):
      finished.append(1)

  with pytest.raises(RuntimeError, match="no such kernel"):
    precompile.compile_all([Failing(), Fine(), Fine()], workers=2)
  assert finished == [1, 1]
  precompile.compile_all([])  # nothing to compile


def test_each_lowering_compiles_while_the_next_is_made():
  """A generator's lowerings compile as they come: the first is compiling while the generator, on the calling
  thread, makes the second (as a train step traces its next program). Consumed whole before compiling, the
  generator would wait for the first compilation in vain."""
  first_compiling = threading.Event()

  class First:
    def compile(self):
      first_compiling.set()

  class Second:
    def compile(self):
      pass

  def lowerings():
    yield First()
    assert first_compiling.wait(timeout=30), "the first lowering was not compiling while the next was made"
    yield Second()

  precompile.compile_all(lowerings(), workers=2)


def test_once_stopped_a_generators_next_lowering_is_not_made():
  stop, made = threading.Event(), []

  class Lowered:
    def compile(self):
      pass

  def lowerings():
    for i in range(3):
      made.append(i)
      if i == 1:
        stop.set()  # as the thread that started the compilations would, having stopped meanwhile
      yield Lowered()

  for workers in (1, 2):
    stop.clear()
    made.clear()
    precompile.compile_all(lowerings(), workers=workers, stop=stop)
    assert made == [0, 1], (workers, made)


def test_an_error_making_a_lowering_is_raised_at_once():
  """Not after the compilations under way: the lowerings after a failed one will not be made."""
  import time

  class Slow:
    def compile(self):
      time.sleep(1.0)

  def lowerings():
    yield Slow()
    raise ValueError("cannot trace the second program")

  begin = time.perf_counter()
  with pytest.raises(ValueError, match="cannot trace the second program"):
    precompile.compile_all(lowerings(), workers=2)
  assert time.perf_counter() - begin < 0.9
  time.sleep(1.1)  # the running compilation ends on its thread before the next test


def test_a_program_reached_inside_another_transformation_is_not_collected():
  # Inside a jax.jit (or vmap, scan) of the collected function a program is part of that one's program: its
  # own lowering would be compiled for nothing.
  def computation(x):
    return jax.jit(lambda y: _outer(y))(x) + jax.vmap(_inner)(x[None])[0] + _inner(x)

  _, lowerings = precompile.collect(computation, jax.ShapeDtypeStruct((6,), jnp.float32))
  assert [_module(lowered) for lowered in lowerings] == ["jit__inner"]


class _Scale:
  """A static argument hashed by identity that holds an array (jax.jit takes it as it is)."""

  def __init__(self, factor):
    self.factor = np.asarray(factor)


@precompile.jit(static_argnums=-1)
def _with_static_last(x, scale):
  return x * scale.factor


class _Model:
  def __init__(self, shift):
    self.shift = shift

  @precompile.jit(static_argnums=0)
  def shifted(self, x):
    return x + self.shift


def test_programs_take_their_arguments_as_jax_jit_does():
  scale, x = _Scale(3.0), jnp.arange(4.0)
  model = _Model(2.0)
  np.testing.assert_allclose(_with_static_last(x, scale), x * 3)
  np.testing.assert_allclose(model.shifted(x), x + 2)  # a method: self bound, as jax.jit binds it

  def computation(y):
    return _with_static_last(y, scale) + _with_static_last(y, scale) + model.shifted(y)

  _, lowerings = precompile.collect(computation, jax.ShapeDtypeStruct((4,), jnp.float32))
  assert [_module(lowered) for lowered in lowerings] == ["jit__with_static_last", "jit_shifted"]


def test_an_interrupt_drops_the_compilations_not_started(monkeypatch):
  import concurrent.futures
  import time

  started = []

  class Slow:
    def compile(self):
      started.append(1)
      time.sleep(1.0)

  def interrupted_wait(futures, *args, **kwargs):
    time.sleep(0.2)
    raise KeyboardInterrupt  # Ctrl-C reaches the thread waiting for the compilations here

  monkeypatch.setattr(concurrent.futures, "wait", interrupted_wait)
  begin = time.perf_counter()
  with pytest.raises(KeyboardInterrupt):
    precompile.compile_all([Slow() for _ in range(8)], workers=2)
  assert time.perf_counter() - begin < 0.9  # not after the running ones, let alone all eight
  monkeypatch.undo()
  time.sleep(1.2)
  assert len(started) == 2  # the two running finished; the six queued never started


def test_once_stopped_no_further_compilation_starts():
  import time

  stop, started, both = threading.Event(), [], threading.Barrier(2)

  class Slow:
    def compile(self):
      started.append(1)
      if len(started) <= 2:
        both.wait(timeout=10)  # the two workers' first compilations both under way
      stop.set()  # as the thread that started the compilations would, having stopped meanwhile
      time.sleep(0.1)

  precompile.compile_all([Slow() for _ in range(6)], workers=2, stop=stop)
  assert len(started) == 2  # the two that had started; the four queued were dropped
  started.clear()
  precompile.compile_all([Slow()], workers=1, stop=stop)
  assert started == []
