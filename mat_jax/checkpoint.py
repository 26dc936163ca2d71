"""Orbax checkpoints of a training run, exact resume, and the files of a run's workdir.

A run's workdir holds:

    checkpoints/<step>/state   params, optimizer state, step, RNG key, NaN flag (TrainState)
    checkpoints/<step>/data    the Grain iterator position, one JSON per process (Grain's handler)
    checkpoints/<step>/meta    the config fingerprint (see below), the step, the input pipeline's layout
                               and the training split's build
    config.json                the full experiment config of the run
    model/                     the final model in the transformers layout + tokenizer files
                               (written and read by `mat_jax.runs`)
    superseded_models/<n>/     earlier ends' exports of a run resumed with more steps

Saves are periodic (keep-N); restarting in the same workdir resumes from the newest complete
checkpoint. Because the per-step key is derived from (seed key, step) and the data position is
restored, a run killed at any point (even SIGKILL in the middle of a save: Orbax writes to a temporary
directory and renames it when complete) ends with the parameters of an uninterrupted run.
A checkpoint written under a config whose fingerprint differs is refused with the list of differing
settings (`mat_jax.config.fingerprint`: what fixes the shapes and the optimizer-state structure, i.e.
model size, towers, optimizer, batch size, dataset, plus what the run trains for: the objective and its
hyper-parameters, the seed, the augmentations, the text threat and the frozen reference it trains with).
A train state that still does not fit the checkpoint
on restore is refused the same way. Refused checkpoints are left as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mat_jax import checks, errors, paths
from mat_jax.errors import ConfigError, Interrupted, MatJaxError, WorkdirError
from mat_jax.workdir import LOCK_FILE, WorkdirLock

STATE, DATA, META = "state", "data", "meta"
MODEL_DIR = "model"
CONFIG_FILE = "config.json"


class IncompatibleCheckpointError(MatJaxError, ValueError):
  """The workdir's checkpoint belongs to another run: a different fingerprint, or a train state whose
  structure or shapes do not fit it."""


class DamagedCheckpointError(MatJaxError):
  """A checkpoint whose files cannot be read back (or no intact checkpoint left in the workdir)."""

  def __init__(self, message: str, reason: str | None = None):
    super().__init__(message)
    self.reason = reason or message


class CheckpointsRemovedError(MatJaxError):
  """The checkpoints a reader (the evaluator) was reading were removed meanwhile, by the keep-N of the live
  run that writes them: not damage."""


class NotARunError(MatJaxError, FileNotFoundError):
  """A directory given as a training run that is not one."""


# A reader of a live run rereads the steps this many times when the run's keep-N removes the checkpoint
# it reads, and gives a checkpoint that fails to read this long to disappear: Orbax deletes a
# checkpoint's files before its directory.
REREADS = 3
REMOVAL_WAIT_S = 3.0

CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKSUM_DIR = "checksums"
DAMAGED_DIR = "damaged_checkpoints"
SUPERSEDED_DIR = "superseded_models"  # exports of a run's earlier end, once it trains on (runs.set_aside_export)


# What a checkpoint's pipeline record says of the training data, beside its layout: the split's build
# and its record count. Recorded from when they were added, so compared only where a checkpoint has them.
DATA_PIPELINE_KEYS = ("data.build", "data.records")


def _pipeline_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  keys = (set(saved) | set(current)) - {k for k in DATA_PIPELINE_KEYS if k not in saved}
  return [k for k in sorted(keys) if saved.get(k) != current.get(k)]


class Checkpointer:
  """Periodic Orbax saves of (train state, data iterator, fingerprint), keep-N, resume."""

  def __init__(self, workdir: str | os.PathLike, fingerprint: Mapping[str, Any], *, max_to_keep: int = 3,
               async_save: bool = True, reader: bool = False, pipeline: Mapping[str, Any] | None = None,
               added_keys: Iterable[str] = ()):
    """pipeline: how the input pipeline is laid out (worker processes, hosts), saved beside its position:
    Grain stores one position per worker and host, which only a pipeline of the same layout can resume.
    added_keys: fingerprint keys that older checkpoints do not record; they are compared only where the
    checkpoint has them."""
    self.workdir = Path(workdir).absolute()
    self.directory = self.workdir / CHECKPOINTS_DIR
    self.fingerprint = dict(fingerprint)
    self.added_keys = frozenset(added_keys)
    self.pipeline = None if pipeline is None else dict(pipeline)
    self._unsealed: list[int] = []  # steps saved by this process whose checksums are not written yet
    # Whether the checkpoint `restore_newest_intact` resumed from had checksums to check it against (a
    # run killed before it wrote them leaves none); None before a restore.
    self.restored_with_checksums: bool | None = None
    # A reader (the evaluator reading a run's model) must not remove the temporary directory of a save
    # that a live run is writing.
    self._options = dict(max_to_keep=max_to_keep, async_save=async_save, cleanup=not reader)
    _quiet_late_async_errors()  # before any save or restore can fail part-way
    self.manager = self._open_manager()

  def _open_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._options["max_to_keep"], create=True, cleanup_tmp_directories=self._options["cleanup"],
        enable_async_checkpointing=self._options["async_save"])
    handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    import grain  # deferred: only runs with a data iterator need it
    handlers[DATA] = grain.checkpoint.CheckpointHandler()
    manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    # Orbax removes a previous run's unfinished saves in a background thread. A process that stops right
    # after the open (every checkpoint damaged) would leave that thread to print a traceback at interpreter
    # shutdown ("cannot schedule new futures"); it is one directory listing, so wait for it here.
    finish_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    if finish_cleanup is not None:
      finish_cleanup()
    return manager

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def check_compatible(self, step: int | None = None) -> None:
    """Raise IncompatibleCheckpointError when the stored fingerprint differs from this run's."""
    step = self.latest_step() if step is None else step
    if step is None:
      return
    saved = self._meta(step).get("fingerprint", {})
    keys = sorted((set(saved) | set(self.fingerprint)) - (self.added_keys - set(saved)))
    diffs = [f"  {k}: checkpoint {saved.get(k, '<absent>')!r}, this run {self.fingerprint.get(k, '<absent>')!r}"
             for k in keys if saved.get(k) != self.fingerprint.get(k)]
    if diffs:
      unchecked = ""
      if not self.has_checksums(step):
        unchecked = (f"\nThis checkpoint has no checksums (its run was stopped before writing them), so these "
                     "recorded settings are unverified: if you did not change the config, its files may be "
                     f"damaged; then move {self.step_dir(step)} aside to resume from the checkpoint before it.")
      raise IncompatibleCheckpointError(
          f"the checkpoint at step {step} in {self.directory} was written by an incompatible config:\n"
          + "\n".join(diffs) + "\nUse a fresh --workdir, or restore the original settings to resume." + unchecked)

  def _meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

  def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
    self.seal()  # the previous save is complete: checksum it before this one starts
    meta = {"fingerprint": self.fingerprint, "step": int(step)}
    if data_iterator is not None and self.pipeline is not None:
      meta["pipeline"] = self.pipeline
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      import grain
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      self._unsealed.append(int(step))
    return saved

  # --------------------------------------------------------------------------------------------------
  # Integrity: a checksum beside each checkpoint, and a restore that falls back past damaged ones.

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def _checksum_path(self, step: int) -> Path:
    return self.workdir / CHECKSUM_DIR / f"{step}.json"

  def seal(self) -> None:
    """Wait for pending saves, then write the SHA-256 of every file of the checkpoints this process saved
    (workdir/checksums/<step>.json, process 0), so that flipped or truncated bytes are found on restore.
    Orbax keeps no checksum of its own. Checksums of checkpoints removed by keep-N go too."""
    if not self._unsealed:
      return
    self.manager.wait_until_finished()
    steps, self._unsealed = self._unsealed, []
    self._write_checksums(steps)

  def seal_completed(self) -> None:
    """`seal` once the pending saves have finished, without waiting for them: called after every step, it
    checksums a checkpoint within a step of its completion, so a run killed later leaves it checked."""
    if self._unsealed and not self.manager.is_saving_in_progress():
      self.seal()

  def has_checksums(self, step: int) -> bool:
    return self._checksum_path(step).exists()

  def _write_checksums(self, steps: Iterable[int]) -> None:
    if jax.process_index() != 0:
      return
    present = set(self.all_steps())
    for step in steps:
      if step in present:
        path = self._checksum_path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomically(path, json.dumps(_file_digests(self.step_dir(step)), indent=0, sort_keys=True))
    for stale in (self.workdir / CHECKSUM_DIR).glob("*.json"):
      if stale.stem.isdigit() and int(stale.stem) not in present:
        stale.unlink(missing_ok=True)

  def verify(self, step: int) -> str | None:
    """None if checkpoint `step` matches its checksums (or has none: a run killed between the save and
    the checksum), else what differs."""
    path = self._checksum_path(step)
    if not path.exists():
      return None
    try:
      expected = json.loads(path.read_text())
    except (OSError, ValueError):
      return None  # a torn checksum file says nothing about the checkpoint
    actual = _file_digests(self.step_dir(step))
    bad = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
    if not bad:
      return None
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"{len(bad)} file(s) differ from the checksums written at save time ({shown})"

  def restore_newest_intact(self, abstract_state: Any, data_iterator: Any = None, *,
                            log: Callable[[str], None] = print, set_aside: bool = True
                            ) -> tuple[Any, int | None]:
    """(train state, step) of the newest checkpoint that reads back intact, or (None, None) when there is
    no checkpoint. A checkpoint that cannot be read, does not match its checksums or holds non-finite
    values is moved to workdir/damaged_checkpoints/ (kept for inspection, out of Orbax's way so the step
    can be saved again), with one line saying so, and the next older one is tried. A checkpoint of an
    incompatible config is refused (IncompatibleCheckpointError), not skipped. `set_aside=False` (a
    reader such as the evaluator, which must not change a run it does not own) skips damaged ones only.
    For a reader, a checkpoint whose directory is gone once its read failed was removed meanwhile by the
    keep-N of the live run that writes it, not damaged: the steps are listed again and the newest not yet
    tried is read (REREADS times at most). Only a reader looks for removals: a run holds its workdir's lock,
    so no other run removes its checkpoints, and in a multi-host run its other processes see process 0 move
    a damaged one aside."""
    damaged: list[str] = []
    tried: set[int] = set()
    removed = 0
    while untried := [step for step in self.all_steps() if step not in tried]:
      step = max(untried)
      tried.add(step)
      try:
        problem = self.verify(step)
        if problem is None:
          state = self.restore(abstract_state, data_iterator, step)
          problem = non_finite(state)
      except IncompatibleCheckpointError:
        raise
      except DamagedCheckpointError as err:
        problem = err.reason
      except Exception as err:  # noqa: BLE001  any read failure of this step: try the previous one
        if _not_the_checkpoints_fault(err):
          raise
        problem = _one_line(err)
      if problem is None:
        if damaged:
          log(f"resuming from the intact checkpoint at step {step} instead")
        self.restored_with_checksums = self.has_checksums(step)
        if not self.restored_with_checksums and set_aside:
          # Killed before its checksums were written: the run goes on from what it holds now, and later
          # damage to it is found like any other checkpoint's.
          self._write_checksums([step])
        return state, step
      if not set_aside and self._removed(step):
        removed += 1
        if removed > REREADS:
          break
        self.manager.reload()  # Orbax caches the steps it listed: the live run has saved others since
        continue
      where = f"moved to {self._set_aside(step)}" if set_aside else "skipped"
      line = f"checkpoint {self.step_dir(step)} is damaged: {problem}; {where}"
      log(line)
      damaged.append(line)
    if removed:
      lock = WorkdirLock(self.workdir)
      raise CheckpointsRemovedError(
          f"the checkpoints in {self.directory} were removed while this command read them, by the run holding "
          f"{lock.path} ({lock.holder()}), which keeps only its newest train.keep_checkpoints; they are not "
          "damaged. Evaluate the run after it ends, or give it a larger train.keep_checkpoints")
    if damaged:
      then = ("Rerunning the same command starts the run from step 0; to keep anything, restore the checkpoint "
              "files from a backup first" if set_aside else "This command moved none of them: to read the run, "
              "restore its checkpoint files from a backup or train it again")
      raise DamagedCheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(damaged) + ". " + then)
    return None, None

  def _removed(self, step: int) -> bool:
    """Whether checkpoint `step`, which failed to read, is gone. While a live run holds the workdir, a
    directory that is still there gets REMOVAL_WAIT_S to go: the run's keep-N may be deleting it, files
    first."""
    deadline = time.monotonic() + (REMOVAL_WAIT_S if WorkdirLock(self.workdir).recorded_holder() else 0)
    while self.step_dir(step).exists():
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.05)
    return True

  def _set_aside(self, step: int) -> Path:
    target = self.workdir / DAMAGED_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      os.replace(self.step_dir(step), target)
      self._checksum_path(step).unlink(missing_ok=True)
    # Orbax caches the steps it found when the manager opened: reopen it on what is left.
    self.manager.close()
    self.manager = self._open_manager()
    return target

  def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
    """The train state (in the shardings of `abstract_state`) and, in place, the iterator position."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self.check_compatible(step)
    stored, wanted = self._stored_arrays(step), _arrays(abstract_state)
    if stored is not None:
      stored_shapes, wanted_shapes = [shape for shape, _ in stored], [shape for shape, _ in wanted]
      if stored_shapes != wanted_shapes:
        # Refused from the metadata, before any array is read: a restore Orbax aborts part-way leaves
        # TensorStore reads running on a closed event loop.
        raise self._misfit(step, _shape_difference(stored_shapes, wanted_shapes))
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]
    except ValueError as err:
      if stored is None or stored == wanted:
        # The stored arrays are this state's (or their metadata is unreadable): the files are damaged.
        reason = f"its files cannot be read ({_one_line(err)})"
        raise DamagedCheckpointError(f"checkpoint {self.step_dir(step)}: {reason}", reason) from err
      # A mismatch the fingerprint and the shapes did not catch (dtypes). Orbax's own advice
      # (partial_restore, strict=False) would resume a different run: name the real fix instead.
      detail = str(err).split("If this mismatch")[0].split(" Truncating/padding")[0].strip()
      raise self._misfit(step, detail if len(detail) <= 600 else detail[:600] + " ...") from err
    if data_iterator is not None:
      self._restore_iterator(step, data_iterator)
    return state

  def _restore_iterator(self, step: int, data_iterator: Any) -> None:
    """The input pipeline's position, in place. A position that does not fit this run's pipeline (another
    number of worker processes or hosts) is an incompatibility to name, not damage: the checkpoint read
    back intact, and moving it aside would throw away a run that resumes with the original layout. A
    position saved by this very layout that Grain cannot read is damage (the older checkpoints are tried)."""
    import grain

    saved = self._meta(step).get("pipeline")
    differing = [] if saved is None or self.pipeline is None else _pipeline_differences(saved, self.pipeline)

    def listed(keys: list[str]) -> str:
      return ", ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {self.pipeline.get(k)!r}" for k in keys)

    data_keys = [k for k in differing if k in DATA_PIPELINE_KEYS]
    if data_keys:
      raise IncompatibleCheckpointError(
          f"the checkpoint at step {step} in {self.directory} read other training data: {listed(data_keys)}. Its "
          "input-pipeline position counts records of that build; resumed on this one it would continue at the "
          "same index of other data. Read the build it trained on (a corpus rebuilt under its name, or by a "
          "newer builder version, replaced it), or use a fresh --workdir.")
    if differing:
      raise self._other_pipeline(step, listed(differing))
    try:
      self.manager.restore(step, args=ocp.args.Composite(**{DATA: grain.checkpoint.CheckpointRestore(data_iterator)}))
    except Exception as err:  # noqa: BLE001  Grain reports a misfit as KeyError, FileNotFoundError, ...
      if _not_the_checkpoints_fault(err):
        raise
      if saved is not None and not _pipeline_differences(saved, self.pipeline or {}):
        reason = f"its input-pipeline position cannot be read ({_one_line(err)})"
        raise DamagedCheckpointError(f"checkpoint {self.step_dir(step)}: {reason}", reason) from err
      raise self._other_pipeline(step, f"Grain could not read it into this pipeline: {_one_line(err)}") from err

  def _other_pipeline(self, step: int, detail: str) -> IncompatibleCheckpointError:
    return IncompatibleCheckpointError(
        f"the input pipeline's position in the checkpoint at step {step} in {self.directory} was saved by a "
        f"pipeline of another layout ({detail}). Grain keeps one position per worker process and per host: "
        "resume with the data.worker_count (-1 resolves to 0 on a CPU backend, up to 8 on an accelerator "
        "host) and the number of processes it was saved with, or use a fresh --workdir.")

  def _misfit(self, step: int, detail: str) -> IncompatibleCheckpointError:
    return IncompatibleCheckpointError(
        f"the checkpoint at step {step} in {self.directory} does not fit this run's train state "
        f"(a setting that changes the parameters or the optimizer state differs):\n  "
        + detail.replace("\n", "\n  ") + "\n"
        "Use a fresh --workdir, or restore the original settings to resume.")

  def _stored_arrays(self, step: int) -> list[tuple[tuple[int, ...], str]] | None:
    """The stored train state's sorted (shape, dtype) per array, from Orbax's metadata; None when that
    cannot be read (damage, which the restore then reports)."""
    try:
      return _arrays(self.manager.item_metadata(step)[STATE])
    except Exception:  # noqa: BLE001  unreadable metadata: damage
      return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.seal()
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _drop_late_async_errors(unraisable: Any) -> None:
  # TensorStore completing a failed save's writes or restore's reads on Orbax's closed event loop.
  if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
    return
  # The array reads abandoned with the failed restore each raise their own copy of its error when their
  # coroutine is collected.
  if getattr(getattr(unraisable.object, "cr_code", None), "co_name", None) in _ABANDONED_READS:
    return
  _previous_unraisablehook(unraisable)


# Orbax's per-array read coroutines (orbax.checkpoint serialization).
_ABANDONED_READS = frozenset({"_read_array_index_and_device_put"})


_previous_unraisablehook = sys.unraisablehook


def _arrays(tree: Any) -> list[tuple[tuple[int, ...], str]]:
  """The sorted (shape, dtype) of a tree's arrays: what a checkpoint and a train state must share,
  whatever their containers (Orbax's metadata is plain dicts, the state dataclasses and optimizer tuples)."""
  return sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def _shape_difference(stored: list[tuple[int, ...]], wanted: list[tuple[int, ...]]) -> str:
  """E.g. `the checkpoint holds 4 arrays, this run's state 6; only in this run's state: 2 of shape (4, 3)`."""
  have, want = Counter(stored), Counter(wanted)

  def listing(counts: Counter) -> str:
    items = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{n} of shape {shape}" for shape, n in items[:6])
    return shown + (f" and {len(items) - 6} more shapes" if len(items) > 6 else "")

  parts = [f"the checkpoint holds {len(stored)} arrays, this run's state {len(wanted)}"]
  if have - want:
    parts.append("only in the checkpoint: " + listing(have - want))
  if want - have:
    parts.append("only in this run's state: " + listing(want - have))
  return "; ".join(parts)


def _quiet_late_async_errors() -> None:
  """When an Orbax save or restore fails part-way (a full disk, a damaged checkpoint), TensorStore's
  remaining writes or reads complete on an event loop Orbax has already closed, and each prints a
  traceback ("Event loop is closed", "Task exception was never retrieved", or the read error again from
  an abandoned read coroutine): dozens to hundreds of tracebacks around the one error that matters,
  which the save's or restore's caller reports itself, some of them after it. Drop exactly those
  (installed once); any other unraisable exception still prints."""
  global _previous_unraisablehook
  if sys.unraisablehook is _drop_late_async_errors:
    return
  _previous_unraisablehook = sys.unraisablehook
  sys.unraisablehook = _drop_late_async_errors
  errors.quiet_unretrieved_async_errors()


def _file_digests(directory: Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory`."""
  out = {}
  for path in sorted(directory.rglob("*")):
    if path.is_file():
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      out[str(path.relative_to(directory))] = digest.hexdigest()
  return out


_all_finite = jax.jit(checks.all_finite)


def non_finite(state: Any) -> str | None:
  """None if every float array of `state` is finite, else a phrase naming how many are not."""
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves or bool(_all_finite(leaves)):
    return None
  bad = sum(not bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  return f"{bad} of its {len(leaves)} parameter/optimizer arrays hold NaN or inf"


def _not_the_checkpoints_fault(err: BaseException) -> bool:
  """A failure of the process, not of the files it reads: an interrupt (SIGTERM arrives as `Interrupted`,
  e.g. a preempted job that was restoring) or memory running out. Counted as damage, it would move an intact
  checkpoint aside, and then the next one."""
  text = str(err)
  return isinstance(err, (Interrupted, MemoryError)) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _one_line(err: BaseException) -> str:
  """An exception as one short line (Orbax and TensorStore errors run over many lines)."""
  text = " ".join(str(err).split()) or type(err).__name__
  text = text if len(text) <= 300 else text[:300] + " ..."
  return f"{type(err).__name__}: {text}"


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with the given shardings: the restore target of a state."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------------
# The run's config.


def check_workdir(workdir: str | os.PathLike) -> None:
  """A workdir a run cannot use is refused before the run writes anything there: one that holds a model
  (weights, or a transformers config.json: the run's own config.json would replace the model's, and its
  checkpoints would sit beside the weights; an exported run keeps its model in `model/`, so a run directory
  never holds one), and one where a name the run writes is taken by the other kind of entry (a file
  `checkpoints`, a directory `config.json`), which would fail part-way with an OS error."""
  path = Path(workdir)
  misplaced = [f"{name} is a file" for name in (CHECKPOINTS_DIR, CHECKSUM_DIR, DAMAGED_DIR, TENSORBOARD_DIR, MODEL_DIR,
                                                SUPERSEDED_DIR)
               if (path / name).exists() and not (path / name).is_dir()]
  misplaced += [f"{name} is a directory" for name in (CONFIG_FILE, METRICS_FILE, LOCK_FILE) if (path / name).is_dir()]
  if misplaced:
    raise WorkdirError(f"the workdir {path} is not laid out as a run's: {', '.join(misplaced)}, where a run writes "
                       "the other kind; move those entries aside or pass another workdir")
  held = sorted(p.name for p in path.glob("model*.safetensors"))
  if (path / "model.safetensors.index.json").exists():
    held.append("model.safetensors.index.json")
  config = read_run_config(path)  # None if damaged: the run's own checks report that
  if config is not None and ("model_type" in config or "architectures" in config):
    held.append(f"{CONFIG_FILE} of a {config.get('model_type', 'transformers')} model")
  if held:
    raise WorkdirError(f"the workdir {path} holds a model ({', '.join(held)}), not a training run: a run would "
                       f"write its own {CONFIG_FILE} over the model's. Pass another workdir; to train from this "
                       f"model, give it as the starting point (--config.model.source={path})")


def read_run_config(workdir: str | os.PathLike, *, required: bool = False) -> dict | None:
  """The directory's CONFIG_FILE as plain data (a run's config, or a transformers model's), or None where
  there is none or it is no JSON object; with `required`, a ConfigError naming the damaged file instead."""
  path = Path(workdir) / CONFIG_FILE
  try:
    raw = json.loads(path.read_text())
  except OSError:
    problem = "cannot be read"
  except ValueError as err:
    problem = f"is not valid JSON ({err})"
  else:
    if isinstance(raw, dict):
      return raw
    problem = f"holds a JSON {type(raw).__name__}, not an object"
  if required:
    raise ConfigError(f"{path} {problem}; it is the run's config, written by mat_jax.train: restore it from "
                      "the run's experiment file")
  return None


def write_run_config(workdir: str | os.PathLike, config_json: str) -> None:
  path = Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  # Read by evaluations of the run while it trains (`runs.restore_model`): never half written.
  paths.write_text_atomically(path, config_json)
