"""`python -m mat_jax.bench compile`: compile seconds of the MAT step, PGD and SGA, cold and warm.

Each measurement runs in a fresh Python process (JAX keeps compiled programs in memory, so only a new
process shows what the persistent cache saves): the cold process gets an empty cache directory (a fresh
temporary one, or `--cache-dir`, which must be empty or new), the warm one the same directory, now filled
by the cold run. A program's compile seconds are its first call minus a second, steady call: tracing,
lowering and XLA compilation (or the cache lookup), as a user waits for them; the first call's seconds in
each of the three (JAX's own duration events) follow in parentheses, with the steady call's seconds. The
last line is `compile: cold X s, warm Y s` (the sums over the three programs). `--cold-only` skips the warm
run (last line `compile: cold X s`), for sweeping compiler options one process each: an option that
shortens the compilation shows its price in the steady call.

`--target h100` (or h200, a100; tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e) compiles the MAT step and PGD for that
device on this host, which needs none (`bench.cross_compile`: XLA's deviceless compilation, on a GPU
without autotuning): the programs as they are built for that backend (`runtime.building_for`), lowered from
abstract arguments and compiled once, nothing run; each program's tracing, lowering and XLA seconds, last
line `compile: cold X s`. SGA runs several programs with host work between them, which cannot be compiled
without running them, and is left out. With `--modules DIR` it compiles instead every program a command
lowered into DIR (`JAX_DUMP_IR_TO=DIR`), as that command built them (on a CPU: the CPU's programs), and
prints their seconds by program. With `--kernels` it also prints, for each program, the kernels one
iteration of its heaviest loop launches (an attack step) and the bytes they read and write, by kind and by
what they compute (its heaviest groups: e.g. a GELU's backward pass, a bias's addition), and the whole
program's sums (`cross_compile.loop_traffic`): what a change of the program does to the device's memory
traffic. With `--passes` (any backend) it prints where each program's compilation went: the heaviest of the
events XLA records for the profiler while it compiles (its pass pipelines and passes, fusion, LLVM, PTX to
cubin, autotuning), read from a profile of that first call.

Programs (random weights; the timings do not depend on them): the train step of `python -m mat_jax.train`
with MAT's objective (1-word text attack, 2-step PGD, AdamW; its text attack's, image attack's, gradient's and
optimizer's programs, compiled at once as the step's first call compiles them), 10-step L-inf PGD on the paired-caption
cosine (`attacks.image.pgd_attack`), and SGA (`attacks.multimodal.set_guidance_attack`) on shapes-world images
and captions with paraphrase (synonym-table) candidates.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mat_jax import errors, precompile, runtime
from mat_jax import mesh as mesh_lib
from mat_jax.attacks import image as image_attacks
from mat_jax.attacks import multimodal
from mat_jax.attacks.candidates import LexiconSource, prepare_candidates
from mat_jax.bench import common, cross_compile
from mat_jax.bench.train import lower_mat_step, mat_batch, mat_train_step, step_call
from mat_jax.data import shapes
from mat_jax.models import CLIP, layers, split
from mat_jax.models.clip import COMPUTE_DTYPES, PRESETS, resolve_dtype

PROGRAMS = ("mat_step", "pgd", "sga")
# What a cross-compilation (--target) can compile: programs whose jitted calls can be lowered from abstract
# arguments (the MAT step's, PGD's).
TARGET_PROGRAMS = ("mat_step", "pgd")
# The attacks' budget in PGD and SGA.
_BUDGET = {"eps": 2 / 255, "step_size": 0.5 / 255, "steps": 10}
# The line a worker process prints its measurements on, for the parent to find among other output.
_RESULT_PREFIX = "compile-result: "
# How many groups of kernels that compute the same thing `--kernels` lists, heaviest first.
HEAVIEST_SOURCES = 12
# How many of a compilation's profiler events `--passes` lists, longest first.
HEAVIEST_PASSES = 24
# JAX's profiler event around each compilation it waits for (or its load from the persistent cache).
COMPILE_EVENT = "backend_compile_and_load"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                      help="CLIP architecture (default: tiny on CPU, vit-b-16 on an accelerator)")
  parser.add_argument("--batch", type=errors.positive_int, default=None,
                      help="images per program (default: 8 on CPU, 64 on an accelerator)")
  parser.add_argument("--programs", default=None,
                      help=f"comma-separated subset of {PROGRAMS} (default: all; with --target, {TARGET_PROGRAMS})")
  parser.add_argument("--dtype", default="auto", choices=COMPUTE_DTYPES,
                      help="compute dtype (default auto, as `python -m mat_jax.train`: bfloat16 on an accelerator, "
                           "float32 on CPU; docs/performance.md)")
  parser.add_argument("--scan-layers", action="store_true",
                      help="run the encoder blocks as one lax.scan (CLIPConfig.scan_layers)")
  parser.add_argument("--remat", default="none", choices=layers.REMAT_POLICIES,
                      help="what a backward pass keeps of each encoder block (CLIPConfig.remat)")
  parser.add_argument("--cache-dir", type=errors.directory, default=None,
                      help="persistent cache directory to measure in, empty or new (a filled one would make the "
                           "cold run warm; default: a fresh temporary one)")
  parser.add_argument("--cold-only", action="store_true",
                      help="measure the cold compile only (no warm run): for sweeping compiler options, one "
                           "process per setting, e.g. XLA_FLAGS=... python -m mat_jax.bench compile --cold-only")
  parser.add_argument("--target", default=None, choices=sorted(cross_compile.TARGETS),
                      help="compile the MAT step and PGD for this GPU or TPU on this host, which needs none "
                           "(deviceless XLA, on a GPU without autotuning; needs the gpu-compile or tpu-compile "
                           "extra): cold compile only")
  parser.add_argument("--modules", type=errors.directory, default=None, metavar="DIR",
                      help="with --target: compile the StableHLO modules a command wrote with JAX_DUMP_IR_TO=DIR "
                           "for the target instead, and print their seconds by program")
  parser.add_argument("--kernels", action="store_true",
                      help="with --target: also print the kernels of one iteration of each program's heaviest "
                           "loop (an attack step) and the bytes they read and write, by kind and by what they "
                           "compute, and the whole program's sums")
  parser.add_argument("--passes", action="store_true",
                      help="also print where each program's compilation went: the longest of the events XLA "
                           "records for the profiler while compiling it (pass pipelines, passes, LLVM, PTX to cubin, "
                           "autotuning), from a profile of its first call")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  # The measuring process's: where XLA writes the optimized modules --kernels reads (`_run_for_target`).
  parser.add_argument("--hlo-dump", default=None, help=argparse.SUPPRESS)


def _defaults(args: argparse.Namespace) -> tuple[str, int]:
  on_cpu = runtime.program_backend() == "cpu"
  preset = args.preset or ("tiny" if on_cpu else "vit-b-16")
  batch = args.batch or (8 if on_cpu else 64)
  return preset, batch


def _programs(args: argparse.Namespace) -> list[str]:
  known = TARGET_PROGRAMS if args.target else PROGRAMS
  if args.programs is None:
    return list(known)
  chosen = [p.strip() for p in args.programs.split(",") if p.strip()]
  unknown = sorted(set(chosen) - set(known))
  if unknown or not chosen:
    reason = ("; with --target, SGA (several programs with host work between them) cannot be compiled without "
              "running it" if args.target and "sga" in unknown else "")
    raise errors.InputError(f"--programs {args.programs!r}: choose one or more of {','.join(known)}{reason}")
  return chosen


def _check_cache_dir(path: str) -> None:
  """The cold run needs an empty cache: entries already in `path` would make it a warm run."""
  if os.path.isdir(path):
    with os.scandir(path) as entries:
      filled = any(entries)
    if filled:
      raise errors.InputError(f"--cache-dir {path}: the directory is not empty; the cold run would load its entries "
                       "and report a warm compile as cold. Give an empty or new directory")
  elif os.path.exists(path):
    raise errors.InputError(f"--cache-dir {path}: not a directory")


def run(args: argparse.Namespace) -> int:
  programs = _programs(args)
  if args.target:
    # Before any backend starts; the measuring process inherits the environment.
    platforms = os.environ.get("JAX_PLATFORMS")
    cross_compile.prepare_environment(args.target, os.environ)
    if not platforms:
      jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])  # JAX read the variable at its import
  if args.worker:
    print(_RESULT_PREFIX + json.dumps(measure(args, programs)), flush=True)
    return 0
  if args.modules and not args.target:
    raise errors.InputError("--modules compiles a command's programs for an accelerator: name it with --target")
  if args.kernels and (args.modules or not args.target):
    raise errors.InputError("--kernels reads the programs XLA compiled for an accelerator: give a --target "
                            f"({', '.join(sorted(cross_compile.TARGETS))}) and no --modules")
  if args.target and args.modules:
    return _run_modules(args)
  if args.target:
    return _run_for_target(args, programs)
  if args.cache_dir:
    _check_cache_dir(args.cache_dir)
  # This process only asks which device there is; on a GPU it must not take 75% of its memory (JAX's
  # default preallocation) while the measuring processes run. They get the environment as it was.
  child_env = dict(os.environ)
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  preset, batch = _defaults(args)
  print(f"compile: CLIP {preset}{_options(args)}, batch {batch}, {resolve_dtype(args.dtype)}, programs "
        f"{','.join(programs)} on "
        f"{common.device_summary()}; "
        "each run in a fresh process")
  with tempfile.TemporaryDirectory(prefix="mat_jax_compile_") as tmp:
    cache = args.cache_dir or tmp
    runs = {}
    for label in ("cold",) if args.cold_only else ("cold", "warm"):
      runs[label] = _worker(args, preset, batch, programs, cache, child_env)
      files = sum(len(f) for _, _, f in os.walk(cache))
      print(f"{label}: " + ", ".join(f"{p} {runs[label][p]:.2f} s ({runs[label][p + '_cpu']:.2f} CPU s"
                                     f"{_phases(runs[label], p)}{_steady(runs[label], p)})" for p in programs)
            + f" (cache: {files} files)", flush=True)
      _print_passes(runs[label], programs, label)
  cold = sum(runs["cold"][p] for p in programs)
  if args.cold_only:
    print(f"compile: cold {cold:.1f} s")
    return 0
  rows = [[p, runs["cold"][p], runs["warm"][p], runs["cold"][p] / max(runs["warm"][p], 1e-9)] for p in programs]
  common.print_table("compile seconds (first call minus a steady call)", ["program", "cold s", "warm s", "ratio"],
                     rows)
  warm = sum(runs["warm"][p] for p in programs)
  print(f"compile: cold {cold:.1f} s, warm {warm:.1f} s")
  return 0


def _options(args: argparse.Namespace) -> str:
  """The model's execution options that differ from the defaults, as the report's first line names them."""
  return (" with scan_layers" if args.scan_layers else "") + (f", remat {args.remat}" if args.remat != "none" else "")


def _run_for_target(args: argparse.Namespace, programs: list[str]) -> int:
  """The cold compilation for --target's GPU, in a fresh process with the persistent cache off, so that
  every second is XLA's work, never a load."""
  cross_compile.compile_only_devices(args.target)  # no plugin: one error line here, not the worker's
  with runtime.building_for(cross_compile.backend(args.target)):
    preset, batch = _defaults(args)
    dtype = resolve_dtype(args.dtype)
  target = cross_compile.TARGETS[args.target]
  print(f"compile: CLIP {preset}{_options(args)}, batch {batch}, {dtype}, programs {','.join(programs)}, compiled on "
        f"{common.device_summary()} for {target.description} ({_deviceless(args.target)}, nothing run); "
        "in a fresh process")
  environment = dict(os.environ)
  # The kernels of the module XLA:TPU runs, which `as_text()` does not give (`cross_compile.final_module`); on
  # a GPU it is the same module, and the compile seconds there stay free of the dump's writing.
  dumping = args.kernels and cross_compile.backend(args.target) == "tpu"
  with tempfile.TemporaryDirectory() if dumping else contextlib.nullcontext() as dump:
    if dump:
      environment["XLA_FLAGS"] = f"{environment.get('XLA_FLAGS', '')} {cross_compile.dump_flags(dump)}".strip()
    result = _worker(args, preset, batch, programs, "0", environment, hlo_dump=dump)
  print("cold: " + ", ".join(f"{p} {result[p]:.2f} s ({result[p + '_cpu']:.2f} CPU s{_phases(result, p)})"
                             for p in programs), flush=True)
  _print_passes(result, programs, "cold")
  if args.kernels:
    bandwidth = target.memory_bandwidth
    for p in programs:
      groups = [cross_compile.KernelGroup(*group) for group in result[f"{p}_kernels"]]
      common.print_table(f"{p}: the kernels of one iteration of its heaviest loop, bytes read and written (each "
                         f"operand and result once), and those bytes at the {target.description}'s "
                         f"{bandwidth / 1e12:.2f} TB/s", ["kind", "kernels", "GB", "ms"],
                         [[g.kind, g.kernels, g.bytes / 1e9, g.bytes / bandwidth * 1e3] for g in groups])
      sources = [cross_compile.KernelGroup(*group) for group in result[f"{p}_sources"]]
      common.print_table(f"{p}: the {len(sources)} heaviest groups of that iteration's kernels that compute the same "
                         "thing (the JAX operation that names them, backward where in a gradient, and their "
                         "result)", ["computing", "kind", "kernels", "GB", "ms"],
                         [[g.source, g.kind, g.kernels, g.bytes / 1e9, g.bytes / bandwidth * 1e3] for g in sources],
                         left_columns=2)
      for scope, key in (("per iteration", f"{p}_kernels"), ("in the whole program", f"{p}_program_kernels")):
        groups = [cross_compile.KernelGroup(*group) for group in result[key]]
        other = sum(g.bytes for g in groups if not g.kind.startswith("matmuls"))
        print(f"{p}: {sum(g.kernels for g in groups)} kernels {scope}, {other / 1e9:.2f} GB outside the matmuls "
              f"({other / bandwidth * 1e3:.2f} ms)")
  print(f"compile: cold {sum(result[p] for p in programs):.1f} s")
  return 0


def _print_passes(result: dict, programs: list[str], label: str) -> None:
  """The table of each program's compile events that `--passes` measured (none: nothing printed)."""
  for p in programs:
    if f"{p}_passes" in result:
      common.print_table(f"{p}, {label}: the {len(result[f'{p}_passes'])} longest events XLA recorded in its first "
                         "call's compilation (an event's seconds include those of the events within it; on a pool "
                         "of threads, summed over its threads). The seconds above are the profiled call's: the "
                         "profile slows XLA:TPU's compilation by about half", ["event", "thread", "threads", "count",
                                                                             "seconds"],
                         result[f"{p}_passes"], left_columns=2)


def _run_modules(args: argparse.Namespace) -> int:
  """--target with --modules: a command's dumped programs compiled for the target, summed by program name."""
  target = cross_compile.TARGETS[args.target]
  timings = cross_compile.compile_modules(args.modules, args.target)
  compiled = [(program, seconds) for program, seconds in timings if isinstance(seconds, float)]
  by_program: dict[str, list[float]] = {}
  for program, seconds in compiled:
    by_program.setdefault(program, []).append(seconds)
  rows = sorted(([program, len(s), sum(s), max(s)] for program, s in by_program.items()), key=lambda r: -r[2])
  common.print_table(f"{_xla(args.target)} compile seconds for {target.description} of the {len(timings)} distinct "
                     f"modules in {args.modules} ({_deviceless(args.target)})", ["program", "modules", "seconds",
                                                                                  "largest"], rows)
  failed = [(program, error) for program, error in timings if isinstance(error, str)]
  if failed:
    print(f"{len(failed)} modules did not compile without the device, e.g. {failed[0][0]}: {failed[0][1]}")
  print(f"compile: cold {sum(seconds for _, seconds in compiled):.1f} s")
  return 1 if failed else 0


def _xla(target: str) -> str:
  return "XLA:TPU" if cross_compile.backend(target) == "tpu" else "XLA:GPU"


def _deviceless(target: str) -> str:
  return f"deviceless {_xla(target)}" + ("" if cross_compile.backend(target) == "tpu" else ": no autotuning")


def _steady(result: dict, program: str) -> str:
  """'; steady call S s': what a compiler option that saves compile time may cost every call after."""
  seconds = result.get(f"{program}_steady")
  return "" if seconds is None else f"; steady call {seconds:.3f} s"


def _phases(result: dict, program: str) -> str:
  """'; tracing T s, lowering L s, XLA compile or load X s' of a program's first call, when measured."""
  if f"{program}_xla" not in result:
    return ""
  xla = f"{result['cross_compiled']} compile" if result.get("cross_compiled") else "XLA compile or load"
  phases = ", ".join(f"{xla if phase == 'xla' else phase} {result[f'{program}_{phase}']:.2f} s"
                     for phase in _PHASE_EVENTS)
  if f"{program}_gc" in result:
    phases += (f"; Python's garbage collector within them {result[f'{program}_gc']:.2f} s, "
               f"{result[f'{program}_gc_full']:.0f} full passes")
  return "; " + phases


def _worker(args: argparse.Namespace, preset: str, batch: int, programs: list[str], cache: str,
            base_env: dict[str, str], hlo_dump: str | None = None) -> dict:
  """Run the measurement in a new process with `base_env` and `cache` as its persistent compilation cache
  (and `hlo_dump`, where `base_env`'s XLA_FLAGS make XLA write the modules `--kernels` reads)."""
  command = [sys.executable, "-m", "mat_jax.bench", "compile", "--worker", "--preset", preset,
             "--batch", str(batch), "--programs", ",".join(programs)]
  command += ["--dtype", args.dtype]
  if args.scan_layers:
    command.append("--scan-layers")
  if args.remat != "none":
    command += ["--remat", args.remat]
  if args.target:
    command += ["--target", args.target]
  if args.kernels:
    command.append("--kernels")
  if args.passes:
    command.append("--passes")
  if hlo_dump:
    command += ["--hlo-dump", hlo_dump]
  env = dict(base_env, MAT_JAX_COMPILATION_CACHE=cache)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # it would win over the directory under test
  proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
  if proc.returncode or not lines:
    raise SystemExit(f"the measuring process failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                     f"{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len(_RESULT_PREFIX):])


# ----------------------------------------------------------------------------------------------------
# In the worker process: build and time each program.


# JAX's duration events for the three phases of a first call, by the name the report gives them. Tracing is
# recorded for outermost traces only, and the backend's event covers a compilation or a cache load.
_PHASE_EVENTS = {"tracing": "/jax/core/compile/jaxpr_trace_duration",
                 "lowering": "/jax/core/compile/jaxpr_to_mlir_module_duration",
                 "xla": "/jax/core/compile/backend_compile_duration"}


@contextlib.contextmanager
def _recording_phases() -> Iterator[dict[str, float]]:
  """The wall seconds of each of `_PHASE_EVENTS` that JAX reports within the context, by phase, in the dict
  it yields once the context exits: the events' time spans joined, so that programs compiled at once on
  several threads (the MAT step's two) count the seconds they took together, not their sum."""
  phases = dict.fromkeys(_PHASE_EVENTS, 0.0)
  phase_of = {event: phase for phase, event in _PHASE_EVENTS.items()}
  spans: dict[str, list[tuple[float, float]]] = {phase: [] for phase in _PHASE_EVENTS}

  def listen(event: str, seconds: float, **kwargs) -> None:
    if event in phase_of:  # reported as the event ends, on the thread that ran it
      end = time.perf_counter()
      spans[phase_of[event]].append((end - seconds, end))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield phases
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
    phases.update({phase: _joined_seconds(intervals) for phase, intervals in spans.items()})


def _joined_seconds(intervals: list[tuple[float, float]]) -> float:
  """The length of the union of (start, end) intervals."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(intervals):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


@contextlib.contextmanager
def _profiling(enabled: bool) -> Iterator[list[list]]:
  """With `enabled`, the host events the profiler records within the context, by event and thread, longest
  first (`HEAVIEST_PASSES` of them, [event, thread, threads, count, seconds] each), in the list it yields
  once the context exits. XLA's compilers record their pass pipelines, passes and code generation as such
  events; JAX's traced functions (PjitFunction(...)) are left out, as is the profiler's own bookkeeping.
  Python's tracer stays off: its events would be as many as the interpreter's calls."""
  events: list[list] = []
  if not enabled:
    yield events
    return
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with tempfile.TemporaryDirectory(prefix="mat_jax_passes_") as directory:
    jax.profiler.start_trace(directory, profiler_options=options)
    try:
      yield events
    finally:
      jax.profiler.stop_trace()
    traces = sorted(Path(directory).rglob("*.xplane.pb"))
    if traces:
      events.extend(_longest_events(jax.profiler.ProfileData.from_file(str(traces[-1]))))


# A thread's number at the end of its name (`tf_<pool>/<id>`, `<pool>/<id>`): the threads of a pool share the rest.
_THREAD_ID = re.compile(r"/-?\d+$")


def _longest_events(profile) -> list[list]:
  """A profile's events of XLA's compilations summed by (event, thread pool): a pool's threads are one row,
  the seconds summed over them; the longest `HEAVIEST_PASSES` rows. Only the host's threads (not a GPU's
  kernels, nor the CUDA driver's calls), and only events that start while JAX waits for a compilation
  (`COMPILE_EVENT`), when it recorded one: a first call's run on the host's threads (XLA:CPU's kernels) is
  not its compilation."""
  host = [line for plane in profile.planes if plane.name == "/host:CPU" for line in plane.lines]
  compiling = [(event.start_ns, event.start_ns + event.duration_ns) for line in host for event in line.events
               if event.name == COMPILE_EVENT]
  totals: dict[tuple[str, str], list] = {}  # (event, pool) -> [seconds, count, the threads' names]
  for line in host:
    pool = _THREAD_ID.sub("", line.name.removeprefix("tf_")) or "unnamed pool"
    for event in line.events:
      if event.name.startswith(("$", "PjitFunction(", "ThreadpoolListener::")):
        continue
      if compiling and not any(start <= event.start_ns < end for start, end in compiling):
        continue
      total = totals.setdefault((event.name, pool), [0.0, 0, set()])
      total[0] += event.duration_ns / 1e9
      total[1] += 1
      total[2].add(line.name)
  longest = sorted(totals.items(), key=lambda item: -item[1][0])[:HEAVIEST_PASSES]
  return [[name, pool, len(threads), count, seconds] for (name, pool), (seconds, count, threads) in longest]


def _first_minus_steady(fn, details: dict[str, float], name: str, passes: bool = False) -> float:
  """Wall seconds of the first call beyond a steady one; the same in this process's CPU seconds goes to
  details[f"{name}_cpu"] (compilation is mostly one thread, so CPU seconds show it without other jobs'
  contention), the first call's seconds in each of `_PHASE_EVENTS` to details[f"{name}_{phase}"], the
  seconds Python's garbage collector ran within them to details[f"{name}_gc"] (its full passes, which
  walk every object alive, counted in details[f"{name}_gc_full"]), and the steady call's seconds to
  details[f"{name}_steady"]."""
  collector = {"gc": 0.0, "gc_full": 0, "started": 0.0}

  def collecting(stage: str, info: dict) -> None:
    if stage == "start":
      collector["started"] = time.perf_counter()
      return
    collector["gc"] += time.perf_counter() - collector["started"]
    collector["gc_full"] += info["generation"] == 2

  with _profiling(passes) as events:  # the profile is read after the collector's timing ends
    gc.callbacks.append(collecting)
    try:
      with _recording_phases() as phases:
        start, start_cpu = time.perf_counter(), time.process_time()
        common.block(fn())
        first, first_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    finally:
      gc.callbacks.remove(collecting)
  details.update({f"{name}_{phase}": seconds for phase, seconds in phases.items()})
  if passes:
    details[f"{name}_passes"] = events
  details.update({f"{name}_gc": collector["gc"], f"{name}_gc_full": collector["gc_full"]})
  start, start_cpu = time.perf_counter(), time.process_time()
  common.block(fn())
  steady, steady_cpu = time.perf_counter() - start, time.process_time() - start_cpu
  details[f"{name}_cpu"] = max(first_cpu - steady_cpu, 0.0)
  details[f"{name}_steady"] = steady
  return max(first - steady, 0.0)


def measure(args: argparse.Namespace, programs: list[str]) -> dict[str, float]:
  if not args.target:
    return _measure(args, programs)
  devices = cross_compile.compile_only_devices(args.target)
  with runtime.building_for(cross_compile.backend(args.target)):
    return _measure(args, programs, mesh_lib.make_mesh(1, devices=devices), _xla(args.target))


def _measure(args: argparse.Namespace, programs: list[str], target_mesh=None, compiler: str = "") -> dict[str, float]:
  """Each program's first call minus a steady one; with `target_mesh` (compile-only devices), its lowering
  from abstract arguments and its compilation for them instead (by `compiler`, as the report names it)."""
  preset, batch = _defaults(args)
  tokenizer = shapes.tokenizer(context_length=PRESETS[preset].text.context_length)
  cfg = PRESETS[preset]
  # The shapes tokenizer's vocabulary and special ids, so its captions and paraphrase candidates fit the model.
  cfg = cfg.replace(text=dataclasses.replace(
      cfg.text, vocab_size=max(cfg.text.vocab_size, tokenizer.vocab_size), bos_token_id=tokenizer.start_id,
      eos_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_id))
  cfg = cfg.replace(dtype=resolve_dtype(args.dtype))
  cfg = cfg.replace(scan_layers=bool(args.scan_layers), remat=args.remat)
  # For a cross-compilation only the parameters' shapes and dtypes are needed: none is allocated.
  encoder, params = split(nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0))) if target_mesh
                          else CLIP(cfg, rngs=nnx.Rngs(0)))
  size = cfg.vision.image_size
  rng = np.random.default_rng(0)
  scenes = [shapes.sample_scene(rng) for _ in range(batch)]
  images = jnp.asarray(np.stack([shapes.render(s, size) for s in scenes]).astype(np.float32) / 255)
  out: dict[str, float] = {}
  details: dict[str, float | str] = {"cross_compiled": compiler}
  if "mat_step" in programs:
    if target_mesh:
      host_batch, meta = mat_batch(size, batch, tokenizer, max_targets=8, top_k=10)
      out["mat_step"] = _lower_and_compile(lambda: lower_mat_step(encoder, params, meta, host_batch, target_mesh),
                                           details, "mat_step", args.kernels, args.hlo_dump, args.passes)
    else:
      out["mat_step"] = _first_minus_steady(_mat_step(encoder, params, tokenizer, size, batch), details,
                                            "mat_step", args.passes)
  if "pgd" in programs:
    tokens = tokenizer([shapes.describe(s, rng) for s in scenes])
    ids, mask = jnp.asarray(tokens.input_ids), jnp.asarray(tokens.attention_mask)
    if target_mesh:
      attack = jax.jit(functools.partial(image_attacks.pgd_attack, encoder, **_BUDGET))
      rows, whole = mesh_lib.batch_sharding(target_mesh), NamedSharding(target_mesh, PartitionSpec())
      abstract = functools.partial(_abstract, sharding=whole)
      out["pgd"] = _lower_and_compile(lambda: attack.lower(
          jax.tree.map(abstract, params), *(_abstract(x, rows) for x in (images, ids, mask)),
          abstract(jax.random.key(0))), details, "pgd", args.kernels, args.hlo_dump, args.passes)
    else:
      out["pgd"] = _first_minus_steady(lambda: image_attacks.pgd_attack(
          encoder, params, images, ids, mask, jax.random.key(0), **_BUDGET), details, "pgd", args.passes)
  if "sga" in programs:
    k = 5
    captions = [c for s in scenes for c in shapes.captions(s, rng, k)]
    candidates = prepare_candidates(captions, tokenizer, LexiconSource(shapes.substitution_table()))
    out["sga"] = _first_minus_steady(lambda: multimodal.set_guidance_attack(
        encoder, params, images, candidates, jax.random.key(0), **_BUDGET), details, "sga", args.passes)
  out.update(details)
  return out


def _abstract(x, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _lower_and_compile(lower, details: dict, name: str, kernels: bool = False, dump: str | None = None,
                       passes: bool = False) -> float:
  """Seconds to lower a program (`lower()`: tracing and lowering; a list of lowerings for a program made of
  several, compiled at once as its first call compiles them) and compile it for its devices, as the
  first call of `_first_minus_steady` counts them, nothing run: for compile-only devices. The phases go to
  details[f"{name}_{phase}"], the compilation's CPU seconds in this process to details[f"{name}_cpu"]
  (XLA:GPU runs `ptxas` in processes of its own, which are not counted there); with `kernels`, the kernels
  of its heaviest loop and of the whole program (`cross_compile.loop_traffic`, after the timing) to
  details[f"{name}_kernels"] and details[f"{name}_program_kernels"], and the loop's heaviest groups of
  kernels that compute the same thing to details[f"{name}_sources"], read from the module XLA wrote into
  `dump` where it wrote one (`cross_compile.final_module`); with `passes`, the compilation's longest profiler
  events to details[f"{name}_passes"] (`_profiling`)."""
  with _recording_phases() as phases, _profiling(passes) as events:
    start = time.perf_counter()
    lowered = lower()
    lowerings = lowered if isinstance(lowered, list) else [lowered]
    compiling, compiling_cpu = time.perf_counter(), time.process_time()
    precompile.compile_all(lowerings)  # a program of several (the MAT step's) compiles as the step does
    end, end_cpu = time.perf_counter(), time.process_time()
  compiled = [lowered.compile() for lowered in lowerings]  # the executables compile_all made
  if passes:
    details[f"{name}_passes"] = events
  # A compile-only client's compilation may report no duration event of its own: its wall time is the phase.
  phases["xla"] = end - compiling
  details.update({f"{name}_{phase}": seconds for phase, seconds in phases.items()})
  details[f"{name}_cpu"] = end_cpu - compiling_cpu
  if kernels:
    texts = [c.as_text() if dump is None else cross_compile.final_module(dump, c.as_text()) for c in compiled]
    # A program made of several: its heaviest loop is the heaviest of its programs' loops (the MAT step's
    # text attack's or its PGD's step), its whole program's kernels every program's.
    loops = [cross_compile.loop_traffic(text) for text in texts]
    wholes = [cross_compile.loop_traffic(text, whole_program=True) for text in texts]
    heaviest = cross_compile.heaviest_loop(loops, wholes)
    details[f"{name}_kernels"] = [dataclasses.astuple(g) for g in loops[heaviest]]
    details[f"{name}_program_kernels"] = [dataclasses.astuple(g) for g in cross_compile.merged(wholes)]
    details[f"{name}_sources"] = [dataclasses.astuple(g) for g in
                                  cross_compile.loop_traffic(texts[heaviest], by_source=True)[:HEAVIEST_SOURCES]]
  return end - start


def _mat_step(encoder, params, tokenizer, size: int, batch: int):
  """The MAT train step of `python -m mat_jax.train` on one batch, as a zero-argument call."""

  host_batch, meta = mat_batch(size, batch, tokenizer, max_targets=8, top_k=10)
  step, state, mesh = mat_train_step(encoder, params, meta)
  return step_call(step, state, mesh_lib.global_batch(host_batch, mesh))
