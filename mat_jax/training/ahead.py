"""Compiling a run's train step before its first call, on a background thread.

XLA compiles a jitted program at its first call, so a run's first step waits for the step's compilation
after everything that comes before it: the data pipeline's start (worker processes, the first batch and
its text-attack candidates), the checkpoint's restore, the state's creation. That work is mostly the
host's and leaves cores idle, and XLA releases the GIL while it compiles. `compile_step` lowers and
compiles the step from abstract inputs (the state's shapes, dtypes and shardings; the batch's, from
`setup.first_batch`, made before the pipeline starts) as soon as the run is built, and the loop waits
for it just before the first step, which then finds the executable in JAX's caches and only dispatches.

A run that has not started yet can be compiled the same way (`loop.compile_run_ahead`, used by the demo
for its fine-tunings, before the first starts): its step is built from the config, and its executable reaches the
run through the persistent compilation cache, since the run will make its own jitted function. The run's
own compilation ahead waits for it, then loads the executable, instead of compiling it a second time
beside it.

A run that evaluates compiles its evaluation's clean scoring (`evaluate.clean_scoring_compilation`: the
encoders at the evaluation's batch shapes, the ranking) the same way, on a thread that starts once the
step's compilation has finished, beside the training, so that the first evaluation finds them.

A compilation ahead can only save time: were the first batch's shapes other than the compiled ones, the
first call would compile as it always did. An error in the thread is dropped for the same reason: the
program's first call meets it and reports it where it belongs.

`MAT_JAX_COMPILE_AHEAD=0` switches all of them off (default 1: on).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import jax
import ml_collections

from mat_jax import checkpoint as checkpoint_lib
from mat_jax import config as config_lib
from mat_jax import mesh as mesh_lib
from mat_jax import runtime
from mat_jax.training import setup
from mat_jax.training import step as step_lib

# Whether programs may be compiled ahead at all (`MAT_JAX_COMPILE_AHEAD`).
enabled = runtime.compile_ahead_enabled


def later_runs_enabled() -> bool:
  """Whether runs not started yet may be compiled ahead (`loop.compile_run_ahead`): their executables
  reach them through the persistent compilation cache, so only with it on."""
  return enabled() and bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)


class Compilation:
  """`work` (a lowering and compilation) run on a background thread, once the compilations `after` (one, a
  sequence, or None) have finished: one at a time keeps a first step's compilation from sharing the cores
  with later work. `wait()` returns once it has finished or failed (`error`)."""

  def __init__(self, work: Callable[[], Any], *, name: str = "step",
               after: "Compilation | Sequence[Compilation] | None" = None):
    self.error: BaseException | None = None
    earlier = [] if after is None else [after] if isinstance(after, Compilation) else list(after)
    self._thread = threading.Thread(target=self._run, args=(work, earlier), name=f"mat_jax compile ahead: {name}")
    self._thread.start()

  def _run(self, work: Callable[[], Any], earlier: "list[Compilation]") -> None:
    for compilation in earlier:
      compilation.wait()
    try:
      work()
    except BaseException as err:  # noqa: BLE001  the program's first call meets it and reports it
      self.error = err

  def done(self) -> bool:
    return not self._thread.is_alive()

  def wait(self) -> None:
    self._thread.join()


def abstract_state(run: Any) -> Any:
  """The run's train state as ShapeDtypeStructs in its shardings, as `create_state` and a checkpoint's
  restore make it."""
  cfg = run.config
  shapes = jax.eval_shape(lambda p: step_lib.init_state(p, run.tx, run.is_trainable, cfg.seed), run.params)
  return checkpoint_lib.abstract_like(shapes, run.shardings)


def evaluated_params(run: Any) -> Any:
  """The parameters a run's evaluation is given (`loop.host_params` of the state's: host arrays, so no
  sharding), as ShapeDtypeStructs."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_state(run).params)


def abstract_batch(run: Any, builder: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the step takes, as ShapeDtypeStructs: this process's first batch made in this
  thread (`setup.first_batch`, with each batch transform's `stand_in`) and its rows times the processes."""
  cfg = run.config
  local = setup.first_batch(cfg, builder, run.tokenizer, mesh_lib.local_batch_size(cfg.train.batch_size),
                            process_index=jax.process_index(), process_count=jax.process_count(),
                            extra_transforms=[t.stand_in() for t in run.batch_transforms])
  # With the sharding `mesh.global_batch` gives the arrays: JAX's in-memory caches key on it, so that the
  # step's in_shardings alone would lower the same program but not find it at the first call.
  sharding = mesh_lib.batch_sharding(run.mesh)
  return {key: jax.ShapeDtypeStruct((value.shape[0] * jax.process_count(),) + value.shape[1:], value.dtype,
                                    sharding=sharding)
          for key, value in mesh_lib.device_arrays(local).items()}


def compile_step(run: Any, step_fn: Any, reference: Any, builder: Any, *, mesh_spec: str | None = None
                 ) -> Compilation | None:
  """The run's jitted step compiled ahead on a thread, or None where its batch cannot be made apart from the
  pipeline (a batch transform without a `stand_in`). A compilation of the same run's step that
  `loop.compile_run_ahead` started is waited for first, so that this one loads its executable from the cache."""
  if not all(hasattr(t, "stand_in") for t in run.batch_transforms):
    return None
  with _later_lock:
    earlier = _later.pop(_run_key(run.config, mesh_spec), None)
  # The batch is made here, before the pipeline starts: the thread does JAX work only, and never uses the
  # tokenizer or the data source beside the pipeline's threads.
  return Compilation(step_compilation(run, step_fn, reference, builder), name=run.config.name or "step",
                     after=earlier)


def step_compilation(run: Any, step_fn: Any, reference: Any, builder: Any) -> Callable[[], Any]:
  """The lowering and compilation of the run's step as work for a thread; its batch is made here."""
  batch = abstract_batch(run, builder)
  return lambda: step_fn.compile(abstract_state(run), batch, reference)


# Steps of runs not started yet being compiled (`compile_run_ahead`), by `_run_key`.
_later: dict[str, Compilation] = {}
_later_lock = threading.Lock()


def _run_key(config: ml_collections.ConfigDict, mesh_spec: str | None) -> str:
  return config_lib.to_json(config) + f"\nmesh: {mesh_spec}"


def compile_for_later_run(config: ml_collections.ConfigDict, mesh_spec: str | None,
                          compile_: Callable[[], Any]) -> Compilation:
  """Run `compile_` (which compiles the step of the run of `config` on `mesh_spec`; see
  `loop.compile_run_ahead`) on a thread, and remember it for that run's own `compile_step` to wait for."""
  compilation = Compilation(compile_, name=config.name or "run")
  with _later_lock:
    _later[_run_key(config, mesh_spec)] = compilation
  return compilation
