"""Orbax checkpoints of a training run, exact resume, and the exported model.

A run's workdir holds:

    checkpoints/<step>/state   params, optimizer state, step, RNG key, NaN flag (TrainState)
    checkpoints/<step>/data    the Grain iterator position, one JSON per process (Grain's handler)
    checkpoints/<step>/meta    the config fingerprint (see below) and the step
    config.json                the full experiment config of the run
    model/                     the final model in the transformers layout + tokenizer files

Saves are periodic (keep-N); restarting in the same workdir resumes from the newest complete
checkpoint. Because the per-step key is derived from (seed key, step) and the data position is
restored, a run killed at any point (even SIGKILL in the middle of a save: Orbax writes to a temporary
directory and renames it when complete) ends with the parameters of an uninterrupted run.
A checkpoint written under a config whose fingerprint differs is refused with the list of differing
settings (`mat_jax.config.fingerprint`: what fixes the shapes and the optimizer-state structure, i.e.
model size, towers, optimizer, batch size, dataset, plus what the run trains for: the objective and its
hyper-parameters, the seed, the augmentations). A train state that still does not fit the checkpoint
on restore is refused the same way. Refused checkpoints are left as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

STATE, DATA, META = "state", "data", "meta"
MODEL_DIR = "model"
CONFIG_FILE = "config.json"


class IncompatibleCheckpointError(ValueError):
  """The workdir's checkpoint belongs to another run: a different fingerprint, or a train state whose
  structure or shapes do not fit it."""


class Checkpointer:
  """Periodic Orbax saves of (train state, data iterator, fingerprint), keep-N, resume."""

  def __init__(self, workdir: str | os.PathLike, fingerprint: Mapping[str, Any], *, max_to_keep: int = 3,
               async_save: bool = True):
    self.workdir = Path(workdir).absolute()
    self.directory = self.workdir / "checkpoints"
    self.fingerprint = dict(fingerprint)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    import grain  # deferred: only runs with a data iterator need it
    handlers[DATA] = grain.checkpoint.CheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def check_compatible(self, step: int | None = None) -> None:
    """Raise IncompatibleCheckpointError when the stored fingerprint differs from this run's."""
    step = self.latest_step() if step is None else step
    if step is None:
      return
    stored = self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    saved = stored.get("fingerprint", {})
    keys = sorted(set(saved) | set(self.fingerprint))
    diffs = [f"  {k}: checkpoint {saved.get(k, '<absent>')!r}, this run {self.fingerprint.get(k, '<absent>')!r}"
             for k in keys if saved.get(k) != self.fingerprint.get(k)]
    if diffs:
      raise IncompatibleCheckpointError(
          f"the checkpoint at step {step} in {self.directory} was written by an incompatible config:\n"
          + "\n".join(diffs) + "\nUse a fresh --workdir, or restore the original settings to resume.")

  def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
    items = {STATE: ocp.args.StandardSave(state),
             META: ocp.args.JsonSave({"fingerprint": self.fingerprint, "step": int(step)})}
    if data_iterator is not None:
      import grain
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
    """The train state (in the shardings of `abstract_state`) and, in place, the iterator position."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self.check_compatible(step)
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]
    except ValueError as err:
      # A structure or shape mismatch the fingerprint did not catch. Orbax's own advice
      # (partial_restore, strict=False) would resume a different run: name the real fix instead.
      detail = str(err).split("If this mismatch")[0].split(" Truncating/padding")[0].strip()
      detail = detail if len(detail) <= 600 else detail[:600] + " ..."  # Orbax may list every parameter
      raise IncompatibleCheckpointError(
          f"the checkpoint at step {step} in {self.directory} does not fit this run's train state "
          f"(a setting that changes the parameters or the optimizer state differs):\n  "
          + detail.replace("\n", "\n  ") + "\n"
          "Use a fresh --workdir, or restore the original settings to resume.") from err
    if data_iterator is not None:
      import grain
      self.manager.restore(step, args=ocp.args.Composite(**{DATA: grain.checkpoint.CheckpointRestore(data_iterator)}))
    return state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with the given shardings: the restore target of a state."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------------
# The exported model.


def export_model(model: Any, tokenizer: Any, workdir: str | os.PathLike) -> Path:
  """Write the model in the transformers layout (config.json + model.safetensors) and the tokenizer
  files beside it, so that `load_clip` / transformers' `CLIPModel.from_pretrained` read it (`load_blip` /
  `BlipForImageTextRetrieval` for a BLIP)."""
  from mat_jax.models import save_blip, save_clip
  from mat_jax.models.blip import BlipConfig

  directory = Path(workdir) / MODEL_DIR
  directory.mkdir(parents=True, exist_ok=True)
  config = model[0].config if isinstance(model, tuple) else model.config
  (save_blip if isinstance(config, BlipConfig) else save_clip)(model, directory)
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
  return directory


def write_run_config(workdir: str | os.PathLike, config_json: str) -> None:
  path = Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config_json)


def restore_model(workdir: str | os.PathLike) -> tuple[Any, Any]:
  """(CLIP model, tokenizer) of a run: its exported model, else its newest checkpoint.

  The tokenizer is None for runs without one (synthetic data).
  """
  from mat_jax.models import load_blip, load_clip
  from mat_jax.models.blip import is_blip
  from mat_jax.models.tokenizers import load_tokenizer

  workdir = Path(workdir)
  exported = workdir / MODEL_DIR
  if (exported / "config.json").exists():
    model = (load_blip if is_blip(exported) else load_clip)(exported)
    tokenizer = None
    if (exported / "tokenizer.json").exists() or (exported / "vocab.json").exists():
      tokenizer = load_tokenizer(exported, context_length=model.config.text.context_length)
    return model, tokenizer
  if not (workdir / CONFIG_FILE).exists():
    raise FileNotFoundError(f"{workdir} is not a mat_jax run directory: it has neither {MODEL_DIR}/ "
                            f"(the exported model) nor {CONFIG_FILE}; pass the --workdir of a training run")
  from mat_jax import config as config_lib
  from mat_jax.training import setup

  config = config_lib.build(json.loads((workdir / CONFIG_FILE).read_text()), origin=str(workdir / CONFIG_FILE))
  return setup.model_from_checkpoint(config, workdir)
