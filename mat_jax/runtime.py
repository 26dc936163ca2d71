"""Process-wide settings every entry point applies first (`prepare_process`): the persistent compilation
cache, XLA:CPU options that make its entries fast to load, and a garbage collector whose full passes
leave the imports' objects alone and come ten times rarer.

XLA compiles each jitted program once per shape per process; the persistent cache stores the compiled
executables on disk, so a second run of anything (a training run resumed, the evaluation after it, a
benchmark repeated) loads them instead of compiling again. It is on by default:

- directory: `$MAT_JAX_COMPILATION_CACHE` when it names a path, else `$MAT_JAX_CACHE_DIR/jax`, else
  `~/.cache/mat_jax/jax`; JAX's own `JAX_COMPILATION_CACHE_DIR` (or `jax_compilation_cache_dir` set in
  code) wins over both, so a user's explicit choice is kept;
- off: `MAT_JAX_COMPILATION_CACHE=0` (or `off`, `false`, `no`): mat_jax then leaves JAX's settings alone.

Every program is cached, however small or fast to compile: JAX by default skips programs that compile in
under a second and entries smaller than a file-system-dependent size, which leaves most CPU programs (and
the tiny shapes-world models' programs) out, yet those add up to most of a CPU run's compile time.

On CPU, XLA's YNNPACK fusions make a cached executable slow to load: restoring one fusion looks up its
instructions by a linear search, so loading the tiny MAT step took 8.5 s of a 14 s warm start (3.6 s
without them). Without them XLA:CPU runs the same dots through its other kernels at about the same speed
(ViT-B/16 encoding as fast, the tiny pretraining step 4% slower; docs/performance.md), so entry points
turn them off, unless `XLA_FLAGS` already names `--xla_cpu_experimental_ynn_fusion_type`. XLA reads its
flags once, when the first backend starts; after that the setting is left alone.

On a GPU, XLA compiles each matrix multiplication fusion as a Triton kernel and autotunes its tile sizes,
which is most of a small model's compile time: the shapes world's tiny MAT step (batch 64, bf16) compiled
in 51.8 s with them and in 23.3 s with the multiplications left to cuBLAS, stepping in 0.007 s either
way (an H200, jax 0.11.2, 2026-11-28; docs/benchmarks.md). Entry points whose models are all the shapes world's
(`prepare_process(small_models=True)`) turn Triton's GEMMs off; for other models XLA's default stays
until it is measured there. `MAT_JAX_TRITON_GEMM` overrides: `0` turns them off for every model, `1`
keeps XLA's default for every model; a `--xla_gpu_enable_triton_gemm` in `XLA_FLAGS` wins over both.
CPU programs have no such kernels and are the same under either setting.

On an NVIDIA GPU in bf16 the models' attention runs through cuDNN's flash attention
(`models.layers.attend_heads`), whose sequence lengths are padded to a multiple: JAX refuses odd
lengths for it under differentiation (in jax 0.10 its check counts the placeholder of an absent bias as a
bias), and the multiple of 64 the cuDNN path was first measured with pads ViT-B/16's 197 tokens to 256.
`MAT_JAX_CUDNN_LENGTH_MULTIPLE` (default 64) sets that multiple; at 2 the image tower adds its one token
once instead of every attention padding and slicing its activations (`layers.with_tower_tokens`).

Tracing a program creates hundreds of thousands of short-lived Python objects, and the collections of
the oldest generation they trigger walk every object the imports left (about 320,000 after those of
`python -m mat_jax.train`), though none of them is ever garbage. `prepare_process` moves those to the
collector's permanent generation (`gc.freeze`): `bench compile`'s warm start (the tiny MAT step, PGD and
SGA) fell from 11.2–11.7 s to 8.5–10.2 s (docs/performance.md). What a trace itself leaves alive (jaxprs,
the programs' caches) then fills the oldest generation, and CPython walks all of it every tenth
collection of the middle one: the first call of ViT-B/16's MAT step ran six such passes, 1.2 of its 3.5 s
of tracing and lowering. `prepare_process` makes those passes ten times rarer (`FULL_COLLECTION_INTERVAL`);
the young generations, where a step's or a trace's garbage dies, are collected as before, and an old
cycle (one that holds device buffers included) waits at most ten times as many allocations to be freed;
a training run makes one full pass when it returns (`training.loop.train`), for what it leaves behind.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
from jax._src import compilation_cache as cc  # private: the only handle on the settled state
from jax._src import xla_bridge  # private: whether a backend has read XLA_FLAGS yet

from mat_jax.errors import ConfigError
from mat_jax.paths import cache_root

# The values that switch one of mat_jax's environment settings on or off (MAT_JAX_COMPILATION_CACHE,
# MAT_JAX_TRITON_GEMM, MAT_JAX_COMPILE_AHEAD), compared lower-cased.
ON = ("1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")
# XLA flags every entry point adds unless `XLA_FLAGS` sets them (see the module docstring).
_DEFAULT_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Collections of the middle generation between two of the oldest (CPython's default: 10; Python 3.14's
# incremental collector ignores it). See the module docstring.
FULL_COLLECTION_INTERVAL = 100
# The XLA:GPU flag of Triton's GEMM kernels (see the module docstring).
TRITON_GEMM_FLAG = "xla_gpu_enable_triton_gemm"
# The multiple cuDNN's attention lengths are padded to unless MAT_JAX_CUDNN_LENGTH_MULTIPLE says otherwise.
CUDNN_LENGTH_MULTIPLE = 64


def prepare_process(*, small_models: bool = False) -> Path | None:
  """What every entry point does first, before its first compilation: the compilation cache
  (`enable_compilation_cache`, whose directory it returns), XLA's flags (those of every entry point, and
  Triton's GEMMs off on a GPU where `small_models`: every model the command compiles is the shapes
  world's; see the module docstring) and the garbage collector's full passes made rarer, with the imports'
  objects frozen out of them once per process: a later call (a command line run again inside a notebook
  or a test) would also freeze what earlier work left for collection."""
  global _frozen
  if not triton_gemm(small_models):
    _add_xla_flags({TRITON_GEMM_FLAG: "false"})
  if not _frozen:
    gc.freeze()
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, max(full, FULL_COLLECTION_INTERVAL))
    _frozen = True
  return enable_compilation_cache()


def triton_gemm(small_models: bool) -> bool:
  """Whether XLA:GPU may compile matrix multiplications as Triton kernels: `MAT_JAX_TRITON_GEMM` when it is
  set (1 or 0), else not for small models. A value other than those named is an error naming them."""
  value = os.environ.get("MAT_JAX_TRITON_GEMM", "").strip().lower()
  if value in ("", "auto"):
    return not small_models
  if value not in ON + OFF:
    raise ConfigError(f"MAT_JAX_TRITON_GEMM={value!r}: use auto (the default: off for the shapes world's small "
                      "models), 1 (XLA's default, Triton's GEMM kernels on) or 0 (off, cuBLAS for every model)")
  return value in ON


def cudnn_length_multiple() -> int:
  """The multiple the cuDNN attention path pads sequence lengths to: `MAT_JAX_CUDNN_LENGTH_MULTIPLE`, a
  positive even number, when set, else `CUDNN_LENGTH_MULTIPLE` (see the module docstring). Read when a
  program is traced; another value is an error naming the choice."""
  value = os.environ.get("MAT_JAX_CUDNN_LENGTH_MULTIPLE", "").strip()
  if not value:
    return CUDNN_LENGTH_MULTIPLE
  if not value.isdigit() or int(value) < 2 or int(value) % 2:
    raise ConfigError(f"MAT_JAX_CUDNN_LENGTH_MULTIPLE={value!r}: use a positive even number, the multiple cuDNN's "
                      f"attention lengths are padded to (default {CUDNN_LENGTH_MULTIPLE}; 2: only odd lengths "
                      "padded, by one token)")
  return int(value)


def compile_ahead_enabled() -> bool:
  """`MAT_JAX_COMPILE_AHEAD`: whether programs may be compiled before their first call (a run's step on a
  thread while the run sets up, a step's programs at once at its first call, an
  evaluation's programs at once before its first attack): on unless 0 (off, false, no); another value is
  an error naming the choices."""
  value = os.environ.get("MAT_JAX_COMPILE_AHEAD", "1").strip().lower()
  if value not in ("",) + ON + OFF:
    raise ConfigError(f"MAT_JAX_COMPILE_AHEAD={value!r}: use 1 (on, the default) or 0 (off)")
  return value not in OFF


_frozen = False  # whether prepare_process froze the start-up objects


# The backend a cross-compilation builds programs for (`building_for`); None: JAX's default backend. A
# context variable, so a thread that compiles beside it (a step compiled ahead) keeps its own backend.
_target_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_backend", default=None)


def program_backend() -> str:
  """The backend the programs being traced will run on: "cpu", "gpu" or "tpu", as `jax.default_backend()`
  names them. The choices that depend on it (the compute dtype "auto", the attention path "auto", the text
  attack's chunk size, how a non-finite step is skipped, the float32 products' precision) ask here, so a
  cross-compilation for another device (`building_for`) builds that device's programs."""
  return _target_backend.get() or jax.default_backend()


@contextlib.contextmanager
def building_for(backend: str) -> Iterator[None]:
  """Within this context (in this thread), programs are built for `backend` ("gpu": an NVIDIA GPU, "tpu" or
  "cpu") whatever devices this process has: for compiling them ahead for a device without one
  (`python -m mat_jax.bench compile --target`)."""
  if backend not in ("cpu", "gpu", "tpu"):
    raise ValueError(f"building_for({backend!r}): choose cpu, gpu or tpu")
  token = _target_backend.set(backend)
  try:
    yield
  finally:
    _target_backend.reset(token)


def building_for_other_backend() -> bool:
  """Whether the programs being built are for another backend than this process's (`building_for`)."""
  target = _target_backend.get()
  return target is not None and target != jax.default_backend()


def compilation_cache_dir() -> Path | None:
  """Where compiled programs are cached, from the environment (see the module docstring); None when off."""
  setting = os.environ.get("MAT_JAX_COMPILATION_CACHE", "").strip()
  if setting.lower() in OFF:
    return None
  if setting and setting.lower() not in ON:
    return Path(setting).expanduser()
  return cache_root() / "jax"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
  """Turn on JAX's persistent compilation cache for this process; returns its directory, or None when the
  environment switches it off (`MAT_JAX_COMPILATION_CACHE=0`) or the directory cannot be created (a
  warning says so; the command runs without the cache). Also adds the XLA flags of
  `_DEFAULT_XLA_FLAGS` while no backend has started.

  `directory` overrides the environment. Call it at the start of an entry point, before the first
  compilation: JAX decides once per process whether the cache is used. A directory already set through
  JAX's own option (`JAX_COMPILATION_CACHE_DIR`) is kept, unless `directory` is given.
  """
  _add_xla_flags(_DEFAULT_XLA_FLAGS)
  if directory is None:
    path = compilation_cache_dir()
    if path is None:
      return None
    existing = jax.config.jax_compilation_cache_dir
    if existing:
      path = Path(existing)
  else:
    path = Path(directory).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    # The cache only saves compile time: without a usable directory the command still runs, slower.
    print(f"warning: the compilation cache directory {path} cannot be created ({err.strerror}); compiling "
          "without it. Point MAT_JAX_CACHE_DIR (or MAT_JAX_COMPILATION_CACHE) at a writable directory, or set "
          "MAT_JAX_COMPILATION_CACHE=0 to switch the cache off", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_enable_compilation_cache", True)
  # Cache everything: -1 also stops JAX from raising the size threshold for the file system.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  _restart_cache_if_checked()
  return path


def _add_xla_flags(wanted: dict[str, str]) -> None:
  """Append the flags of `wanted` that `XLA_FLAGS` does not name, before XLA reads it (the first backend's
  start); after that the setting is left alone."""
  if xla_bridge.backends_are_initialized():
    return
  flags = os.environ.get("XLA_FLAGS", "")
  missing = [f"--{name}={value}" for name, value in wanted.items() if name not in flags]
  if missing:
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


def _restart_cache_if_checked() -> None:
  """JAX settles whether the cache is used at the first compilation and keeps that answer; when something
  compiled before the cache was configured (an import that ran a jitted function), start over so the
  setting takes effect."""
  if getattr(cc, "_cache_checked", False) or getattr(cc, "_cache_initialized", False):
    cc.reset_cache()
