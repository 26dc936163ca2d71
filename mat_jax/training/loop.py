"""The training loop: build a run from its config, resume it, step, log, checkpoint, evaluate, export.

    result = train(config, workdir, mesh_spec="data=4,fsdp=2")

Host work per step: fetch this process's batch, place it as a global array, dispatch the compiled step.
The host reads device values (metrics and the non-finite flag) only every `train.log_every` steps, one
step late (after the next step is dispatched), and before every checkpoint, so the device runs ahead.
Only process 0 writes logs, metrics (JSONL + TensorBoard), the run config and the exported model; every
process takes part in checkpoints (each saves its own data-iterator position). The processes of a
multi-host run stop after a signal at one agreed step (`_StopAgreement`), and all of them leave `train`
only once process 0 has exported and evaluated the final model.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from mat_jax import checkpoint as checkpoint_lib
from mat_jax import config as config_lib
from mat_jax import errors, objectives, paths, runs
from mat_jax import evaluate as evaluate_lib
from mat_jax import mesh as mesh_lib
from mat_jax.attacks import candidates
from mat_jax.data import pipeline
from mat_jax.models import CLIP, DualEncoder, layers, split
from mat_jax.training import ahead, inputs, mlm, optim, setup
from mat_jax.training import step as step_lib
from mat_jax.workdir import WorkdirLock

Log = Callable[[str], None]

# Steps the host may dispatch ahead of the device. Unbounded, the loop would run up to `log_every` steps
# ahead between two metric fetches, each queued step holding its batch (and its buffers) in device
# memory, and the input pipeline would race the device for the host's cores; two keep the device fed.
MAX_STEPS_IN_FLIGHT = 2

# Multi-host stop: a process that gets SIGINT/SIGTERM after step d publishes the stop step d + this margin.
# Another process that has finished dispatching step s has waited for step s - MAX_STEPS_IN_FLIGHT to
# complete, which needs this process's dispatch of that step: no process can have passed step
# d + MAX_STEPS_IN_FLIGHT, and one that reaches the step after it has waited for this process's step d,
# dispatched after the key was published, so it reads the key in time.
STOP_MARGIN_STEPS = MAX_STEPS_IN_FLIGHT + 1

# How long the processes of a multi-host run wait for one another at the end of a run: for process 0's
# export and final evaluation (hours on a large eval set under attack), or at the final step's stop check
# for the slowest process's checkpoint save. Long enough never to cut a real run short; a process that dies
# instead fails the wait through the coordination service's heartbeats.
END_OF_RUN_TIMEOUT_S = 72 * 3600


class NonFiniteLossError(errors.MatJaxError, RuntimeError):
  """The loss, a gradient or an updated parameter became NaN/inf; the run stopped, its last good checkpoint is kept."""


class NonFiniteWeightsError(errors.MatJaxError, ValueError):
  """The model a run starts from holds NaN/inf parameters."""


@dataclasses.dataclass
class RunResult:
  workdir: Path
  step: int
  metrics: dict[str, float]          # the last logged averages
  evaluation: dict[str, Any] | None  # the final evaluation, if any
  model_dir: Path | None             # the exported model
  time_split: "TimeSplit | None" = None  # where the steps after the first went (None: fewer than two steps run)


# ----------------------------------------------------------------------------------------------------
# Where a run's time goes.


class TimeSplit:
  """The wall seconds of a run's training thread after its first step, by what it was waiting for.

  The loop dispatches steps asynchronously, so a part is time the thread spent blocked: on the input
  pipeline for the next batch ("batches": the run is input-bound where this leads), on the device for a
  step in flight or for metrics ("device": device-bound), in the step's dispatch (the host's own work of
  launching a step's programs: dispatch-bound where this leads, as small models on a fast device can be),
  in checkpoint saves and in periodic evaluations; "rest" is everything else (logging, the progress bar).
  The first step is left out: its start-up is reported apart (compilation, the first batch)."""

  PARTS = ("batches", "device", "dispatch", "checkpoints", "evaluations")

  def __init__(self) -> None:
    self.restart()

  def restart(self) -> None:
    """Count from now, with nothing counted yet."""
    self.seconds = dict.fromkeys(self.PARTS, 0.0)
    self.steps, self.total = 0, 0.0
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def part(self, name: str):
    started = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - started

  def stop(self, steps: int) -> None:
    """The run's loop has ended after `steps` steps since `restart`."""
    self.steps, self.total = steps, time.perf_counter() - self._start

  @property
  def rest(self) -> float:
    return max(self.total - sum(self.seconds.values()), 0.0)

  def describe(self, first_step: int) -> str:
    """One line: where the steps after the first went, and what bounds them."""
    def share(seconds: float) -> str:
      return f"{seconds:.1f} s ({100 * seconds / max(self.total, 1e-9):.0f}%)"

    parts = {**self.seconds, "rest": self.rest}
    words = {"batches": "waiting for batches", "device": "waiting for the device", "dispatch": "dispatching steps",
             "checkpoints": "saving checkpoints", "evaluations": "evaluating", "rest": "the rest"}
    verdict = {"batches": "input-bound: the pipeline delivered batches slower than the device took them",
               "device": "device-bound: the pipeline kept up",
               "dispatch": "dispatch-bound: the host launched the steps slower than the device ran them",
               }[max(("batches", "device", "dispatch"), key=parts.get)]
    return (f"steps {first_step + 1}-{first_step + self.steps} took {self.total:.1f} s "
            f"({self.steps / max(self.total, 1e-9):.2f} steps/s): "
            + ", ".join(f"{words[name]} {share(seconds)}" for name, seconds in parts.items())
            + f"; {verdict}")


# ----------------------------------------------------------------------------------------------------
# Metric writing (process 0 only).


class MetricWriter:
  """Appends {"step": s, ...} lines to metrics.jsonl and scalars to TensorBoard (workdir/tensorboard).

  `resume_step`: the step the run (re)starts from. Lines of later steps were logged by a run that died
  after its last checkpoint; the resumed run logs those steps again, so they are dropped first.
  `reevaluated`: the resumed run is a finished one that evaluates its final model again: the evaluation
  lines at `resume_step` go too, so each evaluation is logged once.
  """

  def __init__(self, workdir: Path, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None, reevaluated: bool = False):
    self.enabled = enabled
    self.jsonl = None
    self.tb = None
    if not enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / checkpoint_lib.METRICS_FILE
    if resume_step is not None:
      truncate_metrics(path, resume_step, drop_evaluation_at_step=reevaluated)
    self.jsonl = open(path, "a")
    if tensorboard:
      # TensorBoard hides the earlier event files' points after the resume step, as the jsonl drops them.
      purge = None if resume_step is None else resume_step + 1
      self.tb = SummaryWriter(str(workdir / checkpoint_lib.TENSORBOARD_DIR), purge_step=purge)

  def write(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
    if not self.enabled:
      return
    scalars = {f"{prefix}{k}": float(v) for k, v in values.items() if np.ndim(v) == 0}
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for key, value in scalars.items():
        self.tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self.jsonl is not None:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def truncate_metrics(path: Path, step: int, *, drop_evaluation_at_step: bool = False) -> None:
  """Keep the lines of `path` up to `step` (without the evaluation lines at `step` itself when
  `drop_evaluation_at_step`); a torn last line (a kill mid-write) goes too. Atomic: the kept lines go to
  a temporary file that replaces the original."""
  if not path.exists():
    return
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
      record_step = record["step"]
    except (ValueError, KeyError, TypeError):
      record, record_step = {}, None
    evaluation = any(key.startswith("eval/") for key in record)
    if drop_evaluation_at_step and record_step == step and evaluation:
      dropped += 1
    elif isinstance(record_step, int) and record_step <= step:
      kept.append(line + "\n")
    else:
      dropped += 1
  if dropped:
    paths.write_text_atomically(path, "".join(kept))


# ----------------------------------------------------------------------------------------------------
# A run: everything the loop needs, built from the config.


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  workdir: Path
  mesh: Any
  model: CLIP
  encoder: DualEncoder
  params: nnx.State
  tokenizer: Any
  objective: objectives.Objective
  schedule: Any
  tx: Any
  is_trainable: Any
  shardings: step_lib.TrainState
  fingerprint: dict[str, Any]
  batch_transforms: tuple = ()   # host-side additions to each batch (text-attack candidates)

  @property
  def global_batch_size(self) -> int:
    return self.config.train.batch_size


def run_mesh(config: ml_collections.ConfigDict, mesh_spec: str | None = None):
  """The run's device mesh (`--mesh`, else config.mesh.shape, else all devices on `data`), checked
  against the global batch size."""
  mesh = mesh_lib.make_mesh(mesh_spec if mesh_spec is not None else (config.mesh.shape or None))
  mesh_lib.check_batch_size(config.train.batch_size, mesh)
  renderings, local = config.data.renderings_per_scene, mesh_lib.local_batch_size(config.train.batch_size)
  if jax.process_count() > 1 and local % renderings:  # each process reads whole scenes of its share
    raise mesh_lib.MeshError(
        f"data.renderings_per_scene={renderings} does not divide the {local} images each of the "
        f"{jax.process_count()} processes reads (train.batch_size={config.train.batch_size} is split over them); "
        f"use a train.batch_size that is a multiple of {jax.process_count() * renderings}")
  if config.mesh.param_sharding == "logical":  # checked here, before any model is built or trained
    unknown = sorted(set(mesh_lib.parse_logical_rules(config.mesh.logical_rules)) - set(layers.LOGICAL_AXES))
    if unknown:
      raise mesh_lib.MeshError(f"mesh.logical_rules names {unknown}, which no parameter has; the models' logical "
                               f"axes are {list(layers.LOGICAL_AXES)}")
  mesh_lib.check_param_sharding(mesh, config.mesh.param_sharding, config.mesh.logical_rules)
  return mesh


def build_run(config: ml_collections.ConfigDict, workdir: str | Path, *, mesh_spec: str | None = None,
              model: CLIP | None = None, tokenizer: Any = None, log: Log = print) -> Run:
  """Mesh, model, objective, optimizer and shardings of a run (no data, no state yet)."""
  mesh = run_mesh(config, mesh_spec)
  if model is None:
    model, tokenizer = runs.model_from_config(config)
  encoder, params = split(model)
  objective = objectives.make(config.objective)
  transforms = ()
  if objective.needs_text_candidates:
    if tokenizer is None:
      raise config_lib.ConfigError(f"objective {objective.name} attacks the text and needs a tokenizer; "
                                   "set model.tokenizer")
    attach = candidate_transform(config, tokenizer, log=log)
    objective = dataclasses.replace(objective, candidate_meta=attach.meta)
    transforms = (attach,)
  schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate, config.train.steps)
  tx = optim.make_optimizer(config.optimizer, schedule)
  is_trainable = step_lib.trainable_filter(config.train.towers, config.train.train_logit_scale)
  shardings = step_lib.state_shardings(params, tx, is_trainable, mesh, config.mesh.param_sharding,
                                       config.mesh.logical_rules)
  return Run(config, Path(workdir), mesh, model, encoder, params, tokenizer, objective, schedule, tx,
             is_trainable, shardings, runs.run_fingerprint(config, model.config, tokenizer), transforms)


def candidate_transform(config: ml_collections.ConfigDict, tokenizer: Any, *, log: Log = print
                        ) -> inputs.AttachCandidates:
  """The batch transform attaching text-attack candidates, sized by `config.text_attack`: the same
  source as the evaluation's (`inputs.make_source`), so a defense trains against the attack it is
  evaluated with unless the config says otherwise."""
  ta = config.text_attack
  source = inputs.make_source(ta.source, bert=ta.bert, top_k=ta.top_k, log=log)
  if ta.exclude_words:
    source = candidates.ExcludedWordsSource(source, ta.exclude_words)
  max_words = ta.max_words or tokenizer.context_length - 2
  # The arrays hold every substitute the source gives a word, as the evaluation's do: the BERT source's
  # multi-piece words get up to 24 combinations, more than its top_k of one-piece words.
  width = max(ta.top_k, source.max_substitutes)
  return inputs.AttachCandidates(tokenizer, source, max_words=max_words, max_pieces=ta.max_pieces,
                                 top_k=width, max_targets=ta.max_targets)


def make_train_step(run: Run) -> tuple[Callable, nnx.State | None]:
  """The run's jitted step `(state, device batch, reference) -> (state, metrics)` and the `reference`
  it takes: the starting parameters, placed, for objectives that anchor to them; else None."""
  reference = (jax.device_put(run.params, run.shardings.params) if run.objective.needs_reference else None)
  step_fn = step_lib.jit_step(step_lib.make_step_fn(run.encoder, run.objective, run.tx, run.is_trainable,
                                                    run.schedule), run.shardings, run.mesh)
  return step_fn, reference


def compile_run_ahead(config: ml_collections.ConfigDict, *, mesh_spec: str | None = None,
                      log: Log = print) -> ahead.Compilation:
  """Compile the step of a run that has not started, on a thread. Here, on the calling thread, it trains
  what the run needs (a cached starting model, the shapes world's masked LM of a text attack), builds the
  run (its model loaded) and makes its first batch; the thread only lowers and compiles. The executable
  reaches the run, which makes its own jitted step, through the persistent compilation cache; the run's
  own compilation ahead waits for this one (`ahead.compile_step`)."""
  ensure_cached_source(config.model.source, log=log, mesh_spec=mesh_spec)
  if objectives.make(config.objective).needs_text_candidates and config.text_attack.source == "bert":
    mlm.resolve_bert(config.text_attack.bert, log=log)
  run = build_run(config, Path("."), mesh_spec=mesh_spec, log=lambda _: None)
  step_fn, reference = make_train_step(run)
  builder = setup.data_builder(config, run.model.config.vision.image_size, log=lambda _: None)
  return ahead.compile_for_later_run(config, mesh_spec, ahead.step_compilation(run, step_fn, reference, builder))


# ----------------------------------------------------------------------------------------------------
# The loop.


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, mesh_spec: str | None = None,
          log: Log = print, progress: bool = True, evaluate: bool = True,
          data_iterator: Any = None, model: CLIP | None = None, tokenizer: Any = None,
          lock: bool = True) -> RunResult:
  """Train (or resume) the run in `workdir` to `config.train.steps` steps.

  `data_iterator` replaces the configured input pipeline (it must yield this process's batches and
  have get_state/set_state); `model`/`tokenizer` replace `config.model.source`. The workdir is locked
  for the whole run (`mat_jax.workdir.WorkdirLock`; `lock=False` when the caller holds it already).
  SIGINT/SIGTERM stop the run at the end of the current step, after a checkpoint of that step
  (`errors.Interrupted`: "interrupted at step N; last checkpoint M; rerun the same command to resume");
  the processes of a multi-host run stop at one agreed step (`_StopAgreement`).
  """
  workdir = Path(workdir).expanduser().absolute()
  checkpoint_lib.check_workdir(workdir)
  main = mesh_lib.is_main_process()
  held = WorkdirLock(workdir) if lock and main else None
  if held is not None:
    held.acquire()  # before anything is written: a second run in this workdir is refused here
  try:
    result = _train(config, workdir, mesh_spec=mesh_spec, log=log, progress=progress, evaluate=evaluate,
                    data_iterator=data_iterator, model=model, tokenizer=tokenizer)
  finally:
    if held is not None:
      held.release()
  # What the run left in reference cycles is freed now, not at the collector's next full pass (rare:
  # runtime.FULL_COLLECTION_INTERVAL): its closed input pipeline's last batches, in worker processes'
  # shared memory and on the devices, which a process training one run after another would pile up.
  gc.collect()
  return result


def ensure_cached_run(name: str, *, log: Log = print, mesh_spec: str | None = None) -> Path:
  """The run directory of experiments/<name>.py in the cache (`mat_jax.runs.cached_run`), trained now if
  it is not there yet, on `mesh_spec` (the command's --mesh): the explicit step that fills the cache,
  which the command lines take for the "cache:NAME" / "shapes" model sources they are given (loading a
  model never trains one)."""
  path, config = runs.cached_experiment(name)
  run_dir = runs.cached_run_dir(name, config)
  # The processes of a multi-host run train the missing run together, so they decide together, as the
  # main process sees the cache.
  if mesh_lib.main_process_says(runs.is_trained(run_dir)):
    return run_dir
  try:  # before any training: a mesh that does not fit this run's batch fails now, naming this run
    run_mesh(config, mesh_spec)
  except mesh_lib.MeshError as err:
    raise mesh_lib.MeshError(f"{runs.CACHE_PREFIX}{name} is not in the cache yet and trains on the same mesh "
                             f"first ({path}): {err}") from None
  main = mesh_lib.is_main_process()
  # Two commands needing the same cached model: the second waits for the first's training, then uses it.
  # The main process holds the lock for all processes, as in `train`.
  lock = WorkdirLock(run_dir, wait=True, on_wait=log) if main else contextlib.nullcontext()
  with lock:
    if mesh_lib.main_process_says(runs.is_trained(run_dir)):
      return run_dir
    if main:
      log(f"{runs.CACHE_PREFIX}{name} is not in the cache yet: training it now with {path} into {run_dir}")
    ensure_cached_source(config.model.source, log=log, mesh_spec=mesh_spec)  # a cached run may start from another
    train(config, run_dir, mesh_spec=mesh_spec, log=log, lock=False)  # resumes a run that was interrupted
  return run_dir


def ensure_cached_source(source: str, *, log: Log = print, mesh_spec: str | None = None) -> None:
  """Train the cached run a model source names ("shapes", "cache:NAME"), if any and not there yet; for a
  run directory without its exported model (read from its checkpoint, built on the model it started
  from), the cached run it started from."""
  seen = set()
  while source not in seen:  # runs naming each other end the walk
    seen.add(source)
    name = runs.cached_name(source)
    if name is not None:
      ensure_cached_run(name, log=log, mesh_spec=mesh_spec)
      return
    path = Path(source).expanduser()
    upstream = runs.starting_source(source) if runs.is_run_dir(path) and not runs.is_trained(path) else None
    if upstream is None:
      return
    source = upstream


def training_data_record(builder: Any, split: str) -> dict[str, Any]:
  """What a checkpoint records of its training data (`checkpoint.DATA_PIPELINE_KEYS`): the build read
  (dataset/config/version) and the split's record count."""
  return {"data.build": f"{builder.name}/{builder.builder_config.name}/{builder.version}",
          "data.records": int(builder.info.splits[split].num_examples)}


def pipeline_layout(worker_count: int, processes: int) -> dict[str, Any]:
  """What a checkpoint records of the input pipeline that saved its position, which only the same layout
  can read: Grain keeps one position per worker process and per host."""
  layout: dict[str, Any] = {"data.worker_count": worker_count, "processes": processes}
  if worker_count > 0:
    # Worker processes read whole batches (`pipeline.training_pipeline`): the position in a checkpoint
    # made when they read examples counts examples, which this pipeline would take for batches.
    layout["worker_reads"] = "batches"
  return layout


def _train(config: ml_collections.ConfigDict, workdir: Path, *, mesh_spec: str | None, log: Log, progress: bool,
           evaluate: bool, data_iterator: Any, model: CLIP | None, tokenizer: Any) -> RunResult:
  run_start = time.perf_counter()
  main = mesh_lib.is_main_process()
  say = log if main else (lambda _: None)
  run = build_run(config, workdir, mesh_spec=mesh_spec, model=model, tokenizer=tokenizer, log=say)
  cfg = run.config
  if data_iterator is None and run.tokenizer is None:
    # Else the pipeline would fail at its first caption, after the data is built and the workdir written.
    raise config_lib.ConfigError(
        f"model.source={cfg.model.source!r} brings no tokenizer and model.tokenizer is empty, so the captions "
        "cannot be tokenized; set model.tokenizer ('shapes' for the shapes world, or a transformers tokenizer "
        "directory or hub id)")
  split_arrays, arrays = mesh_lib.sharded_count(run.shardings.params)
  say(f"run {cfg.name or '(unnamed)'}: objective {run.objective.name}, mesh {mesh_lib.describe(run.mesh)}, "
      f"parameters {cfg.mesh.param_sharding} ({split_arrays} of {arrays} arrays split), "
      f"{cfg.train.steps} steps of {cfg.train.batch_size} images, towers {cfg.train.towers}, "
      f"workdir {workdir}")
  # The layout of the pipeline this run builds (a caller's own iterator has one this run cannot know).
  layout = None if data_iterator is not None else pipeline_layout(
      pipeline.resolve_worker_count(cfg.data.worker_count), jax.process_count())
  # From here a signal is held until a safe point: raised where it arrives, inside Orbax's restore, JAX's
  # cache reads or asyncio callbacks (code that catches Exception), it was swallowed or hung the process.
  stop = _StopSignals()

  def stop_if_signalled() -> None:
    if stop.signum is not None:
      raise errors.Interrupted(f"interrupted by {signal.Signals(stop.signum).name} before training started; rerun "
                               "the same command to resume", stop.signum)

  try:
    ckpt = checkpoint_lib.Checkpointer(workdir, run.fingerprint, max_to_keep=cfg.train.keep_checkpoints,
                                       pipeline=layout, added_keys=config_lib.ADDED_FINGERPRINT_KEYS)
  except BaseException:
    stop.restore()
    raise
  try:
    try:
      ckpt.check_compatible()  # before any data work: a mismatch is reported at once
    except checkpoint_lib.IncompatibleCheckpointError:
      # Unless the checkpoint fails its checksums: then its config says nothing (a flipped byte), and the
      # restore below sets it aside and falls back to an intact one.
      if not ckpt.verify(ckpt.latest_step()):
        raise
    stop_if_signalled()
  except (checkpoint_lib.IncompatibleCheckpointError, errors.Interrupted):
    stop.restore()
    ckpt.close()
    raise
  except Exception:  # noqa: BLE001, S110  unreadable metadata: a damaged checkpoint, handled by the restore below
    pass
  # Until the loop's own try: a failure in the data setup, the restore or the step's construction closes
  # the checkpointer (left open, Orbax's threads outlive the error and print tracebacks at exit).
  writer = bar = None
  own_iterator = data_iterator is None  # the pipeline this run builds, starts and closes
  try:
    builder = None
    if data_iterator is None or (evaluate and main):
      builder = setup.data_builder(cfg, run.model.config.vision.image_size, log=say)
    if evaluate and main:
      setup.check_split(builder, cfg.eval.split, "eval.split")
    step_fn, reference = make_train_step(run)
    # The step compiles on a thread while the pipeline starts and the state is restored or created (a
    # caller's own iterator gives no batch to compile for without consuming one).
    latest = ckpt.latest_step()
    steps_left = latest is None or latest < cfg.train.steps
    compiling = (ahead.compile_step(run, step_fn, reference, builder, mesh_spec=mesh_spec)
                 if data_iterator is None and steps_left and ahead.enabled() else None)
    if data_iterator is None:
      # Its batches reach the loop on the devices: the pipeline's prefetch thread copies them there.
      data_iterator = setup.train_iterator(
          cfg, builder, run.tokenizer, mesh_lib.local_batch_size(cfg.train.batch_size),
          process_index=jax.process_index(), process_count=jax.process_count(),
          extra_transforms=(*run.batch_transforms, mesh_lib.OnDevices(run.mesh)))
      # The records the saved position counts in: a corpus rebuilt under its name would resume at the same
      # index of other data.
      ckpt.pipeline.update(training_data_record(builder, cfg.data.split))
    stop_if_signalled()

    _check_steps_cover(ckpt, cfg.train.steps, workdir)
    state, start = None, None
    if ckpt.latest_step() is not None:
      state, start = ckpt.restore_newest_intact(ahead.abstract_state(run), data_iterator, log=say)
    stop_if_signalled()
    if own_iterator:
      # Its worker processes and first batches now, beside the state's creation and the step's compilation,
      # not after them at the first step's `next`; a restore (above) has set its position.
      pipeline.start_reading(data_iterator)
    resumed = start is not None
    if resumed:
      say(f"resumed from the checkpoint at step {start}")
      superseded = runs.set_aside_export(workdir) if main and start < cfg.train.steps else None
      if superseded is not None:
        say(f"the run trains on past its exported model, now kept in {superseded}; it exports again at step "
            f"{cfg.train.steps}")
    else:
      _check_starting_params(run.params, cfg.model.source)
      state = step_lib.create_state(run.params, run.tx, run.is_trainable, cfg.seed, run.shardings)
      start = 0
    if main:  # only once the workdir's checkpoints are known to fit: a refused run leaves config.json alone
      checkpoint_lib.write_run_config(workdir, config_lib.to_json(cfg))

    evaluator = Evaluator(run, builder, say) if evaluate and main and builder is not None else None
    # Rerunning a finished run (how one re-exports it) evaluates its final model again, and a run resumed
    # at a step with a periodic evaluation makes that evaluation again (below): their old lines go.
    periodic_at_start = (resumed and start < cfg.train.steps and bool(cfg.train.eval_every)
                         and start % cfg.train.eval_every == 0)
    if (evaluator is not None and steps_left and not periodic_at_start and ahead.enabled()
        and not run.batch_transforms):
      # Its clean scoring's programs compile beside the training, after the step's. Not beside a run whose
      # pipeline runs device programs of its own (the text attack's candidates): the one crash seen on a
      # GPU came from a third thread's programs beside those two (docs/performance.md).
      evaluator.compile_ahead(after=compiling)
    writer = MetricWriter(workdir, enabled=main, resume_step=start,
                          reevaluated=evaluator is not None and (start == cfg.train.steps or periodic_at_start))
    bar = _progress_bar(cfg.train.steps, start, enabled=main and progress)
    agreement = _StopAgreement(stop, cfg.train.steps)
    compile_wait_start = time.perf_counter()
    if compiling is not None:
      compiling.wait()  # the first step then only dispatches; a failure there is the first call's to report
    waited_for_compilation = time.perf_counter() - compile_wait_start
    stop_if_signalled()
  except BaseException:
    stop.restore()
    ckpt.close()
    for opened in (writer, bar):
      if opened is not None:
        opened.close()
    if own_iterator and data_iterator is not None:
      _close_pipeline(data_iterator, say)
    raise
  last_metrics: dict[str, float] = {}
  pending: list[dict[str, jax.Array]] = []
  in_flight: collections.deque[dict[str, jax.Array]] = collections.deque()
  # A logged step's metrics are fetched after the next step is dispatched: reading them waits for that
  # step to finish, and with the next one already queued the device does not idle while the host logs.
  deferred: tuple[int, list[dict[str, jax.Array]], jax.Array] | None = None
  clock, clock_step = time.perf_counter(), start
  last_saved = start if start else None
  startup: str | None = None  # where the run's start-up went (a run resumed at its end takes no step)
  split = TimeSplit()  # where the steps after the first go (restarted at the first step's dispatch)

  def check_finite(bad: int) -> None:
    _check_finite(bad, last_saved, workdir, resumed_at=start if resumed else None,
                  clipping=cfg.optimizer.grad_clip_norm > 0, reference=run.objective.needs_reference,
                  resumed_with_checksums=bool(ckpt.restored_with_checksums))

  def write_train_metrics(done: int, values: list[dict[str, Any]]) -> None:
    nonlocal clock, clock_step, last_metrics
    now = time.perf_counter()
    rate = (done - clock_step) / max(now - clock, 1e-9)
    clock, clock_step = now, done
    last_metrics = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    last_metrics.update(steps_per_s=rate, images_per_s=rate * cfg.train.batch_size)
    writer.write(done, last_metrics, "train/")
    bar.set_postfix(loss=f"{last_metrics['loss']:.4f}", steps_s=f"{rate:.2f}",
                    images_s=f"{rate * cfg.train.batch_size:.1f}", refresh=False)

  def evaluate_if_due(done: int, final: bool) -> None:
    """The periodic evaluation (`train.eval_every`); the final one follows the export."""
    if evaluate and cfg.train.eval_every and done % cfg.train.eval_every == 0 and not final:
      gathered = host_params(state.params)  # every process: a collective when FSDP spans hosts
      if evaluator:
        writer.write(done, evaluator(gathered), "eval/")

  try:
    if periodic_at_start:
      # The run that saved this checkpoint evaluated after the save, so a kill may have lost it; every
      # process decides alike (the gathering of parameters is a collective when FSDP spans hosts).
      evaluate_if_due(start, False)
    for step in range(start, cfg.train.steps):
      batch_wait = time.perf_counter()
      with split.part("batches"):
        local = _next_batch(data_iterator, step, last_saved, workdir)
        batch = mesh_lib.global_batch(local, run.mesh)
      call = time.perf_counter()
      with split.part("dispatch"):
        state, metrics = step_fn(state, batch, reference)
      if step == start:  # where a run's start-up went, said once the progress bar is closed
        called = time.perf_counter()
        startup = (f"first step {called - run_start:.1f} s after the run's start: waited "
                   f"{waited_for_compilation:.1f} s for the step's compilation ahead, {call - batch_wait:.1f} s "
                   f"for the first batch; the first call took {called - call:.1f} s")
        split.restart()
      pending.append(metrics)
      in_flight.append(metrics)
      if len(in_flight) > MAX_STEPS_IN_FLIGHT:
        with split.part("device"):
          jax.block_until_ready(in_flight.popleft())
      if deferred is not None:
        with split.part("device"):
          logged_step, values, bad = jax.device_get(deferred)
        deferred = None
        check_finite(int(bad))
        write_train_metrics(logged_step, values)
      done = step + 1
      final = done == cfg.train.steps
      stopping = agreement.stopping(done)  # read once: a signal arriving later in the step waits for the next
      log_now = done % cfg.train.log_every == 0 or final
      save_now = done % cfg.train.checkpoint_every == 0 or final or stopping
      if save_now:  # a checkpoint is written only after its state is known to be finite
        # Its step is logged too: the steps since the last line are only in memory, and a run resumed from
        # this checkpoint (after a stop or a kill) would begin a line of its own steps only. Logged by every
        # run, a resumed run's lines are the uninterrupted run's.
        with split.part("device"):
          values, bad = jax.device_get((pending, state.bad_step))
          pending = []
        check_finite(int(bad))
        write_train_metrics(done, values)
      elif log_now:
        # A copy: the next step donates the state's buffers, bad_step's included.
        deferred, pending = (done, pending, jnp.copy(state.bad_step)), []
      with split.part("checkpoints"):
        if save_now:
          ckpt.save(done, state, data_iterator)
          last_saved = done
        ckpt.seal_completed()  # a finished save's checksums now, not at the next save: a kill may come first
      _inject_fault(done)
      bar.update(1)
      if final:
        stopping = agreement.stopping_at_end(stopping)
      if stopping:  # also at the last step: the run stops as asked; rerunning it exports and evaluates
        ckpt.wait()
        evaluate_if_due(done, final)  # the resumed run starts after this step and would never evaluate it
        raise errors.Interrupted(f"interrupted at step {done}; last checkpoint {last_saved} in "
                                 f"{workdir / 'checkpoints'}; rerun the same command to resume", agreement.signum)
      with split.part("evaluations"):
        evaluate_if_due(done, final)
    with split.part("checkpoints"):
      ckpt.wait()
    split.stop(cfg.train.steps - start - 1)
    if agreement.signalled_after_the_end():  # the final checkpoint is complete; rerunning exports and evaluates
      raise errors.Interrupted(f"interrupted after the last step; last checkpoint {last_saved} in "
                               f"{workdir / 'checkpoints'}; rerun the same command to export and evaluate",
                               agreement.signum)
  except BaseException:
    writer.close()  # an in-process caller (the study) goes on: no file handles or writer threads left behind
    raise
  finally:
    stop.restore()
    bar.close()
    ckpt.close()
    if own_iterator:  # its reading ahead stops, and its worker processes with it (after the last save's read)
      _close_pipeline(data_iterator, say)

  if startup is not None:
    say(startup)
  if split.steps > 0:
    say(split.describe(first_step=start + 1))
  model_dir, evaluation = None, None
  try:
    final_params = host_params(state.params)
    # Export first: a failing final evaluation must not lose the trained model.
    if cfg.train.export and main:
      model_dir = runs.export_model(run.encoder.merge(final_params), run.tokenizer, workdir)
      say(f"exported the model to {model_dir}")
    if evaluator:
      evaluation = evaluator(final_params)
      writer.write(cfg.train.steps, evaluation, "eval/")
      if evaluation:
        say(f"evaluation ({evaluator.describe()}): " + ", ".join(f"{k} {v:.1f}" for k, v in evaluation.items()))
  finally:
    writer.close()
    # The other processes wait for process 0's export and evaluation: a process that left would start
    # jax.distributed's shutdown, whose barrier times out (300 s by default) and aborts every process.
    agreement.wait_for_all("end")
  return RunResult(workdir, cfg.train.steps, last_metrics, evaluation, model_dir,
                   split if split.steps > 0 else None)


def _next_batch(data_iterator: Any, step: int, last_saved: int | None, workdir: Path) -> dict[str, Any]:
  """The batch of `step` (host arrays from a caller's iterator, device arrays from the run's own); Grain's
  report of a worker process that died becomes an error naming the last checkpoint and the fix."""
  try:
    return next(data_iterator)
  except RuntimeError as err:
    if not pipeline.worker_died(err):
      raise
    where = f"step {last_saved} in {workdir / 'checkpoints'}" if last_saved else "none yet"
    raise pipeline.WorkerDiedError(
        f"a worker process of the input pipeline ended abruptly before step {step + 1} (killed, or out of "
        f"memory? {err}); last checkpoint: {where}. Rerun the same command to resume; data.worker_count=0 "
        "reads in this process instead") from err


def _close_pipeline(iterator: Any, log: Log) -> None:
  """Stop the run's input pipeline (its reader threads, its worker processes). A failure here is reported, not
  raised: the run's outcome (its checkpoints, its export, or the error that ended it) does not depend on it."""
  try:
    iterator.close()
  except Exception as err:  # noqa: BLE001  cleanup only
    log(f"warning: the input pipeline did not close cleanly ({type(err).__name__}: {err}); its worker "
        "processes end with this process")


def _check_finite(bad: int, last_saved: int | None, workdir: Path, *, resumed_at: int | None = None,
                  clipping: bool = False, reference: bool = False, resumed_with_checksums: bool = True) -> None:
  """Raise NonFiniteLossError naming the first non-finite step `bad` (the state's sticky `bad_step`, read
  on the host; -1 if none). `clipping`: whether the run clips gradients (optimizer.grad_clip_norm > 0);
  `reference`: whether the objective keeps a frozen reference model (`_settings_advice`);
  `resumed_with_checksums`: whether the checkpoint resumed from had checksums to be checked against."""
  if bad < 0:
    return
  checkpoints = workdir / checkpoint_lib.CHECKPOINTS_DIR
  if resumed_at is not None and bad == resumed_at:
    # The restore checked the checkpoint (its checksums, finite values), so the step's own inputs and
    # settings are the suspects: a NaN from the data repeats at this step on every rerun, and moving the
    # checkpoint away would only retrain up to it. Without checksums its files were not checked: a
    # damaged byte that still reads as a finite number is a suspect too.
    restored = checkpoints / str(resumed_at)
    if resumed_with_checksums:
      checked = "which was checked on restore (its checksums and finite values) and is kept. "
    else:
      checked = ("whose values were finite but whose files could not be checked: its run was stopped before "
                 f"writing its checksums. If the same command ran fine up to this step before, move {restored} "
                 "aside and rerun to resume from the checkpoint before it; otherwise, ")
    raise NonFiniteLossError(
        f"the loss, a gradient or an updated parameter became NaN/inf at step {bad}, the first step after "
        f"restoring the checkpoint {restored}, {checked}A rerun meets this step's batch again from it: check "
        f"that batch's inputs (images, captions) or "
        f"{_settings_advice(clipping, workdir, checkpoint=True, reference=reference)} "
        f"{_diverged_checkpoint_advice(checkpoints, resumed_at, sentence=True)}")
  kept = (f"the last good checkpoint (step {last_saved}) is kept in {checkpoints}"
          if last_saved is not None else "no checkpoint had been written yet")
  if last_saved is not None and bad == last_saved:  # the step right after that checkpoint
    kept += _diverged_checkpoint_advice(checkpoints, last_saved)
  if bad == 0:
    raise NonFiniteLossError(
        f"the loss, a gradient or an updated parameter became NaN/inf at the very first step (step 0); {kept}. "
        "The starting parameters are finite, so check the inputs (images, captions) and the objective's "
        "settings; with a finite loss and gradients, the step's update overflowed a parameter: lower "
        "optimizer.learning_rate.")
  advice = _settings_advice(clipping, workdir, checkpoint=last_saved is not None, reference=reference)
  raise NonFiniteLossError(
      f"the loss, a gradient or an updated parameter became NaN/inf at step {bad} (0-based); the run stopped "
      f"and {kept}. Check the inputs of that step, or {advice}")


def _diverged_checkpoint_advice(checkpoints: Path, step: int, sentence: bool = False) -> str:
  """For a NaN at the step right after checkpoint `step`: an update can blow parameters up to huge finite
  values one step before they turn NaN, and such a checkpoint passes every check. A parenthesis to append,
  or with `sentence` a sentence of its own."""
  advice = (f"a rerun from checkpoint {step} fails here again with a lower learning rate, that checkpoint holds "
            f"finite but diverged weights: move {checkpoints / str(step)} out of {checkpoints} to resume from the "
            "one before it")
  return f"If {advice}." if sentence else f" (if {advice})"


def _settings_advice(clipping: bool, workdir: Path, *, checkpoint: bool, reference: bool = False) -> str:
  """What to change after a NaN, and what rerunning in `workdir` then does. Whether gradients are clipped is
  part of the checkpoints' config fingerprint (the clip norm itself is not): a workdir whose checkpoints were
  written without clipping refuses a rerun with it. `reference`: the objective keeps the starting model as
  a frozen reference (FARE, MAVA), which a run started from the checkpoint's weights would replace."""
  if not checkpoint:
    return ("lower optimizer.learning_rate or set optimizer.grad_clip_norm; rerunning in the same workdir "
            "starts from step 0.")
  if clipping:
    return ("lower optimizer.learning_rate or optimizer.grad_clip_norm; rerunning in the same workdir "
            "resumes from that checkpoint.")
  refused = ("lower optimizer.learning_rate; rerunning in the same workdir resumes from that checkpoint. "
             "Turning on gradient clipping (optimizer.grad_clip_norm > 0) changes the run's config, so this "
             "workdir refuses it: train the clipped run in a fresh --workdir")
  if reference:  # the checkpoint's weights would become the frozen reference the objective measures against
    return (f"{refused}, from the start (this objective keeps the starting model as its frozen reference, so "
            "starting from the checkpoint's weights would change what it is trained towards).")
  return (f"{refused}, from the start or from the weights of that checkpoint with "
          f"--config.model.source={workdir} (and no model.overrides; the optimizer state and the schedule "
          "start afresh).")


def _check_starting_params(params: nnx.State, source: str) -> None:
  """NaN/inf in the parameters a run starts from are the model's fault, not the learning rate's."""
  if checkpoint_lib.non_finite(params) is None:  # one compiled reduction; the names only when needed
    return
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  bad = [jax.tree_util.keystr(path) for path, x in leaves
         if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(np.asarray(x)).all()]
  if bad:
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise NonFiniteWeightsError(
        f"the starting model (model.source={source!r}) has NaN/inf in {len(bad)} parameter arrays ({shown}); "
        "training cannot start from it: re-export or re-download the weights, or start from a preset")


def _check_steps_cover(ckpt: checkpoint_lib.Checkpointer, steps: int, workdir: Path) -> None:
  """A workdir already past `train.steps` would export its later model under a config that says fewer
  steps: refuse, naming both and the two ways out."""
  latest = ckpt.latest_step()
  if latest is not None and latest > steps:
    ckpt.close()
    raise config_lib.ConfigError(
        f"train.steps={steps} but {workdir} already holds a checkpoint at step {latest}; to continue or export "
        f"that run pass --config.train.steps={latest} (or more), or pass a fresh --workdir to train {steps} steps")


class _StopSignals:
  """SIGINT/SIGTERM while training: remember the signal, so the loop stops after the current step with a
  checkpoint of it. A second signal acts at once (the previous handlers are back in place)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    try:
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    except ValueError:  # not the main thread: signals keep their handlers
      self.restore()

  def _handle(self, signum: int, frame: Any) -> None:
    self.signum = signum
    self.restore()

  def restore(self) -> None:
    previous, self._previous = self._previous, {}
    for signum, handler in previous.items():
      signal.signal(signum, handler)


# Numbers the runs of this process, the same way on every process (they all call `train` in the same order),
# so each run has its own keys in the coordination service's store, which outlives a run.
_RUN_NUMBERS = itertools.count()


class _StopAgreement:
  """The step at which a signalled run stops, the same on every process.

  One process: the step at which the signal is seen. Several: a process seeing its signal publishes a stop
  step `STOP_MARGIN_STEPS` ahead in the coordination service's key-value store (the first process to
  publish wins), and every process reads that key, without blocking, at each step until it is there. At
  the final step, which every process checkpoints anyway, they publish what they saw and meet at a barrier
  before reading it. No device synchronisation is added to the steps.
  """

  def __init__(self, signals: _StopSignals, steps: int):
    self.signals, self.steps = signals, steps
    self.client = mesh_lib.coordination_client()
    self.prefix = f"mat_jax/train/{next(_RUN_NUMBERS)}"
    self.stop_key = f"{self.prefix}/stop"
    self.stop_step: int | None = None  # the agreed step, once known
    self.signum: int | None = None

  def stopping(self, done: int) -> bool:
    """Whether the run stops after step `done` (its checkpoint is written first)."""
    if self.client is None:
      self.signum = self.signals.signum
      return self.signum is not None
    if self.stop_step is None:
      self._read()
    if self.stop_step is None and self.signals.signum is not None:
      self._publish(min(done + STOP_MARGIN_STEPS, self.steps))
    return self.stop_step is not None and done >= self.stop_step

  def stopping_at_end(self, stopping: bool) -> bool:
    """At the final step, after its checkpoint: whether the run stops there instead of finishing. One
    process: whether a signal has come, during the final save too; several agree at a barrier (the key set
    before any of them reads)."""
    if self.client is None:
      self.signum = self.signals.signum
      return self.signum is not None
    if self.stop_step is None and self.signals.signum is not None:
      self._publish(self.steps)
    self.wait_for_all("final step")
    self._read()
    return self.stop_step is not None

  def signalled_after_the_end(self) -> bool:
    """One process: whether a signal came after the final step's agreement, while the last checkpoint was
    written out (several processes have agreed at the final step and finish together)."""
    if self.client is None and self.signals.signum is not None:
      self.signum = self.signals.signum
      return True
    return False

  def wait_for_all(self, name: str) -> None:
    """A barrier of all processes (nothing with one process)."""
    if self.client is not None:
      self.client.wait_at_barrier(f"{self.prefix}/{name}", END_OF_RUN_TIMEOUT_S * 1000)

  def _publish(self, step: int) -> None:
    try:
      self.client.key_value_set(self.stop_key, f"{step}:{self.signals.signum}", allow_overwrite=False)
    except jax.errors.JaxRuntimeError as err:
      if "ALREADY_EXISTS" not in str(err):
        raise
    self._read()  # ours, or the one another process published first

  def _read(self) -> None:
    entries = self.client.key_value_dir_get(self.prefix)
    value = dict(entries).get(self.stop_key)
    if value is not None:
      step, signum = value.split(":")
      self.stop_step, self.signum = int(step), int(signum)


FAULT_SIGKILL_ENV = "MAT_JAX_FAULT_SIGKILL_AFTER_STEP"


def _inject_fault(step: int) -> None:
  """Fault injection for the resume tests: SIGKILL this process right after `step` (its checkpoint save,
  if any, has been dispatched and is still being written)."""
  if os.environ.get(FAULT_SIGKILL_ENV) == str(step):
    os.kill(os.getpid(), signal.SIGKILL)


def _progress_bar(total: int, initial: int, enabled: bool):
  return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)


def host_params(params: nnx.State) -> nnx.State:
  """The parameters as host numpy arrays, gathered across processes when they are sharded there."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
    return jax.device_get(params)
  return jax.device_get(multihost_utils.process_allgather(params, tiled=True))


class Evaluator:
  """Periodic evaluation through `mat_jax.evaluate.evaluate`: retrieval recall on the eval split, clean
  and under `config.eval.attacks` at `config.eval.eps`. Runs on process 0 only (no collectives)."""

  def __init__(self, run: Run, builder, log: Log):
    self.run, self.builder, self.log = run, builder, log
    self._data = None
    self._source = None
    self._judge = None
    self._compiling: ahead.Compilation | None = None

  def describe(self) -> str:
    """What the evaluation's figures are of, for its log line (known once it has run)."""
    if self._data is None:
      return "recall %"
    return (f"{self.run.config.eval.split} split, {self._data.num_images} images and {self._data.num_texts} "
            "captions; recall and label flips in %")

  def _load(self) -> None:
    """The eval set, and the text attacks' candidate source and judge where the attacks need them."""
    cfg = self.run.config
    if self._data is None:
      self._data = setup.eval_set(cfg, self.builder, self.run.tokenizer)
      if any(a in evaluate_lib.NEEDS_TEXT_SOURCE for a in cfg.eval.attacks):
        self._source = inputs.make_source(cfg.text_attack.source, bert=cfg.text_attack.bert,
                                          top_k=cfg.text_attack.top_k, log=self.log)
        if self._data.scenes is not None:  # the shapes world: meaning-aware scoring
          self._judge = evaluate_lib.shapes_judge(self._data)

  def _can_evaluate(self) -> bool:
    return self.run.tokenizer is not None and self.builder is not None

  def compile_ahead(self, after: ahead.Compilation | None) -> None:
    """Compile the clean scoring's programs on a thread once `after` (the step's compilation) is done, so
    that the first evaluation finds them; the eval set is read and tokenised here first."""
    if not self._can_evaluate():
      return
    self._load()
    run = self.run
    compile_for = evaluate_lib.clean_scoring_compilation(run.encoder, run.tokenizer, self._data,
                                                         batch_size=run.config.eval.batch_size)
    self._compiling = ahead.Compilation(lambda: compile_for(ahead.evaluated_params(run)), name="evaluation",
                                        after=after)

  def __call__(self, params: nnx.State) -> dict[str, float]:
    cfg = self.run.config
    if not self._can_evaluate():
      return {}
    self._load()
    if self._compiling is not None:
      self._compiling.wait()  # else its programs would compile a second time here
    settings = evaluate_lib.AttackSettings(steps=cfg.eval.steps)
    results = evaluate_lib.evaluate(self.run.encoder, params, self.run.tokenizer, self._data,
                                    attacks=tuple(cfg.eval.attacks), eps_255=(cfg.eval.eps * 255,),
                                    text_source=self._source, settings=settings,
                                    batch_size=cfg.eval.batch_size, seed=cfg.seed, progress=False,
                                    log=self.log, judge=self._judge)
    return flatten_results(results)


def flatten_results(results: dict) -> dict[str, float]:
  """{"clean/tr@1": ..., "pgd@2/tr@1": ..., "bert/ir@1": ...} from `evaluate`'s nested results."""
  out = {f"clean/{k}": float(v) for k, v in results["clean"].items()}
  for attack, budgets in results["attacks"].items():
    for eps_key, entry in budgets.items():
      name = attack if eps_key == "text" else f"{attack}@{eps_key}"
      out.update({f"{name}/{k}": float(v) for k, v in entry["recall"].items()})
      if "label_flip_share" in entry:  # in percent, as every other figure here (and `evaluate`'s flips %)
        out[f"{name}/label_flips_pct"] = 100.0 * float(entry["label_flip_share"])
        out.update({f"{name}/mp_{k}": float(v) for k, v in entry["recall_meaning_preserving"].items()})
  return out
