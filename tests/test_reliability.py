"""Bad inputs and faults: one `error:` line per user error, host checks before jit, the workdir lock,
damaged checkpoints, interrupts, and settings that used to be ignored (docs/reliability.md's table)."""

import asyncio
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mat_jax import attacks, checks, errors, evaluate, evaluate_cli, metrics, paths, runs, train
from mat_jax import checkpoint as checkpoint_lib
from mat_jax import config as config_lib
from mat_jax.models import CLIP, clip_config, split
from mat_jax.training import loop, setup
from mat_jax.workdir import LOCK_FILE, WorkdirLock, WorkdirLockedError

from helpers import MICRO
from test_train import micro_config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("reliability")
  with pytest.MonkeyPatch.context() as patch:  # module-scoped: the function-level fixture cannot serve
    patch.setenv("MAT_JAX_CACHE_DIR", str(root / "cache"))
    yield root


def _quiet(_):
  pass


# ----------------------------------------------------------------------------------------------------
# The command-line wrapper.


def _fails_with(exc):
  def fn(argv):
    raise exc
  return fn


def test_a_user_error_is_one_line_and_exit_2(capsys):
  assert errors.cli_main(_fails_with(config_lib.ConfigError("train.steps must be int"))) == 2
  err = capsys.readouterr().err
  assert err == "error: train.steps must be int\n"


def test_a_bug_keeps_its_traceback():
  with pytest.raises(ZeroDivisionError):
    errors.cli_main(_fails_with(ZeroDivisionError("bug")))


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    # How Orbax/TensorStore report it from a background write.
    ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")],
    ids=["oserror", "orbax"])
def test_a_full_disk_is_one_line_naming_the_directory_and_free_space(tmp_path, capsys, exc, monkeypatch):
  asyncio_log = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_log, "filters", [])
  assert errors.cli_main(_fails_with(exc), output_dir=lambda: tmp_path) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: no space left on the device holding ")
  assert str(tmp_path) in err and " free)" in err and "rerun the same command" in err
  # The failed write's future, collected at exit, must not print the same error again after that line.
  unretrieved = logging.LogRecord("asyncio", logging.ERROR, __file__, 0,
                                  "_GatheringFuture exception was never retrieved", None, None)
  assert not asyncio_log.filter(unretrieved)


def test_train_names_its_workdir_when_the_disk_fills(tmp_path, capsys, monkeypatch):
  """Orbax reports a full disk without a file name: the line names the run's workdir, not the current
  directory."""
  def fill(*args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")

  monkeypatch.setattr(loop, "train", fill)
  monkeypatch.setattr(loop, "ensure_cached_source", lambda *args, **kwargs: None)
  workdir = tmp_path / "run"
  assert train.main(["--config", str(runs.EXPERIMENTS_DIR / "shapes_clip.py"), "--workdir", str(workdir)]) == 2
  assert f"error: no space left on the device holding {workdir} (" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["retrieval", "zeroshot"])
def test_evaluate_names_its_out_dir_when_the_disk_fills(task, tmp_path, capsys, monkeypatch):
  """A full disk reported without a file name: the line names --out, for either task (zero-shot's named the
  current directory)."""
  def fill(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(evaluate, "load_victim", fill)
  monkeypatch.setattr(loop, "ensure_cached_source", lambda *args, **kwargs: None)
  out = tmp_path / "results"
  assert evaluate_cli.main(["--task", task, "--model", "shapes", "--attacks", "pgd", "--out", str(out)]) == 2
  assert f"error: no space left on the device holding {out} (" in capsys.readouterr().err


def test_data_build_names_its_data_dir_when_the_disk_fills(tmp_path, capsys, monkeypatch):
  """tfds and array_record report a full disk without a file name: the line names the data dir, not the
  current directory."""
  from mat_jax.data import __main__ as data_cli
  from mat_jax.data import corpora

  def fill(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(corpora, "build_shapes", fill)
  data_dir = tmp_path / "datasets"
  monkeypatch.setenv("MAT_JAX_DATA_DIR", str(data_dir))
  assert data_cli.main(["build", "shapes", "--train", "2"]) == 2
  assert f"error: no space left on the device holding {data_dir} (" in capsys.readouterr().err


def test_ctrl_c_and_sigterm_report_an_interrupt(capsys):
  assert errors.cli_main(_fails_with(KeyboardInterrupt())) == 130
  assert capsys.readouterr().err == "interrupted\n"
  message = "interrupted at step 3; last checkpoint 3 in /w/checkpoints; rerun the same command to resume"
  assert errors.cli_main(_fails_with(errors.Interrupted(message, signal.SIGTERM))) == 143
  assert capsys.readouterr().err == message + "\n"


def test_out_under_a_regular_file_is_refused_before_the_evaluation(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  # --model does not exist either: the --out check comes first, before any model is loaded.
  assert evaluate_cli.main(["--model", str(tmp_path / "nope"), "--out", str(blocker / "results")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: --out {blocker / 'results'}: {blocker} is a file") and "Traceback" not in err


@pytest.mark.parametrize("argv", [["train", "--workdir", ""], ["evaluate", "--model", "tiny", "--out", " "],
                                  ["study", "--study-dir", ""]])
def test_an_empty_directory_flag_is_refused_not_read_as_its_default(argv, capsys):
  """`--workdir ''` trained into runs/<name>, `--out ''` wrote into the current directory."""
  from mat_jax import study
  main = {"train": train.main, "evaluate": evaluate_cli.main, "study": study.main}[argv[0]]
  with pytest.raises(SystemExit) as exit_:
    main(argv[1:])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and "expected a directory, got an empty string; leave the flag out" in err, err


@pytest.mark.parametrize("entry, kind", [("checkpoints", "file"), ("tensorboard", "file"), ("checksums", "file"),
                                         (".lock", "directory"), ("metrics.jsonl", "directory"),
                                         ("config.json", "directory")])
def test_a_workdir_entry_of_the_wrong_kind_is_refused_before_the_run_writes(tmp_path, capsys, entry, kind):
  """Each failed part-way with a raw OS error (IsADirectoryError, NotADirectoryError, FileExistsError)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / entry).mkdir() if kind == "directory" else (workdir / entry).write_text("")
  assert train.main(["--config", str(runs.EXPERIMENTS_DIR / "shapes_clip.py"), "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err
  assert err == (f"error: the workdir {workdir} is not laid out as a run's: {entry} is a {kind}, where a run "
                 "writes the other kind; move those entries aside or pass another workdir\n")
  assert sorted(p.name for p in workdir.iterdir()) == [entry]


def test_a_workdir_that_is_a_file_is_refused(tmp_path, capsys):
  path = tmp_path / "exp.py"
  path.write_text("def get_config(arg=None):\n  return {'train': {'steps': 2}}\n")
  workdir = tmp_path / "run"
  workdir.write_text("not a directory")
  assert train.main(["--config", str(path), "--workdir", str(workdir)]) == 2
  assert f"{workdir} is a file" in capsys.readouterr().err


def test_an_unwritable_workdir_is_refused(tmp_path, monkeypatch):
  # The file system's refusal is injected: permission bits do not stop root, who runs CI.
  def refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")

  monkeypatch.setattr(errors.tempfile, "NamedTemporaryFile", refuse)
  with pytest.raises(errors.WorkdirError, match=r"is not writable \(Permission denied\)"):
    errors.check_writable_dir(tmp_path / "run", "--workdir")


def _read_only(monkeypatch, directory):
  """Directories and files made under `directory` fail as on a read-only file system. Injected, like the test
  above's refusal: permission bits do not stop root, who runs CI."""
  make_dir, temporary_file = os.mkdir, errors.tempfile.NamedTemporaryFile

  def refused(path):
    return path is not None and Path(path).absolute().is_relative_to(directory)

  def read_only_mkdir(path, *args, **kwargs):
    if refused(path):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return make_dir(path, *args, **kwargs)

  def read_only_temporary_file(*args, dir=None, **kwargs):
    if refused(dir):
      raise OSError(errno.EROFS, "Read-only file system")
    return temporary_file(*args, dir=dir, **kwargs)

  monkeypatch.setattr(os, "mkdir", read_only_mkdir)
  monkeypatch.setattr(errors.tempfile, "NamedTemporaryFile", read_only_temporary_file)


@pytest.mark.parametrize("command", ["build shapes", "tokenizer", "train"])
def test_a_read_only_data_dir_from_the_environment_is_one_line(root, tmp_path, monkeypatch, capsys, command):
  """A read-only data dir given by $MAT_JAX_DATA_DIR (or the default) is one line, as --data-dir is, for a
  build, the tokenizer, and a run whose data is not built yet (unchecked: an OSError traceback from the
  first write)."""
  from mat_jax.data import __main__ as data_cli

  data_dir = tmp_path / "datasets"
  data_dir.mkdir()
  monkeypatch.setenv("MAT_JAX_DATA_DIR", str(data_dir))
  _read_only(monkeypatch, data_dir)
  if command == "train":
    exp = _experiment(tmp_path, "def get_config(arg=None):\n  return " + repr({
        "name": "micro", "model": {"source": "tiny", "tokenizer": "shapes", "overrides": MICRO},
        "data": {"build_train": 64, "build_val": 16, "build_test": 16, "image_size": 16}}) + "\n")
    assert train.main(["--config", str(exp), "--workdir", str(tmp_path / "run")]) == 2
  else:
    assert data_cli.main([*command.split(), *(["--train", "4"] if command == "build shapes" else [])]) == 2
  assert capsys.readouterr().err == (f"error: $MAT_JAX_DATA_DIR {data_dir} is not writable (Read-only file "
                                     "system); pass a directory you can write to\n")


def test_a_read_only_data_dir_serves_what_it_holds(tmp_path, monkeypatch):
  """Only a build checks that the data dir can be written: a shared, read-only copy of built data serves."""
  from mat_jax.data import corpora, shapes

  monkeypatch.setenv("MAT_JAX_DATA_DIR", str(tmp_path))
  sizes = dict(train=4, val=1, test=1, image_size=16)
  corpora.build_shapes(log=_quiet, **sizes)
  tokenizer_dir = shapes.build_tokenizer()
  _read_only(monkeypatch, tmp_path)
  messages = []
  corpora.build_shapes(log=messages.append, **sizes)
  assert shapes.build_tokenizer() == tokenizer_dir and messages[0].startswith("reusing the dataset")


def test_evaluate_reports_a_missing_model_config_in_one_line(tmp_path, capsys):
  (tmp_path / "model").mkdir()
  assert evaluate_cli.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "config.json" in err and "Traceback" not in err


def test_evaluate_names_a_run_config_without_checkpoints_as_a_run(tmp_path, capsys):
  """Read as a transformers directory, a run that never checkpointed got the advice to save weights with
  save_pretrained."""
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(config_lib.to_json(config_lib.build({})))
  assert evaluate_cli.main(["--model", str(run), "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err == (f"error: {run} holds a run config but no checkpoints/ and no exported model; "
                                     "train it first (python -m mat_jax.train) or pass another run\n")


def test_models_inspect_reports_invalid_json_in_one_line(tmp_path, capsys):
  from mat_jax.models import __main__ as models_cli
  (tmp_path / "config.json").write_text("{not json")
  assert models_cli.main(["inspect", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {tmp_path / 'config.json'} is not valid JSON")


def test_a_truncated_safetensors_file_is_named(micro_clip, tmp_path):
  from mat_jax.models import load_clip, save_clip
  save_clip(micro_clip, tmp_path)
  weights = tmp_path / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:40])
  with pytest.raises(errors.MatJaxError, match=f"{weights} is not a readable safetensors file"):
    load_clip(tmp_path)


def test_a_tokenizer_that_does_not_fit_the_loaded_model_is_refused_before_training(micro_clip, tmp_path):
  # Refused only by the final evaluation before: a whole run trained on texts pooled at the wrong token.
  from mat_jax.models import save_clip
  save_clip(micro_clip, tmp_path / "model")
  (tmp_path / "tok").mkdir()
  (tmp_path / "tok" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[MASK]", "a", "photo", "[SEP]"]))
  config = config_lib.build({"model": {"source": str(tmp_path / "model"), "tokenizer": str(tmp_path / "tok")}})
  eos = micro_clip.config.text.eos_token_id
  with pytest.raises(errors.ConfigError, match=rf"model.source='{tmp_path / 'model'}': the tokenizer of "
                                               rf"{tmp_path / 'tok'}'s end token id is 6 but the text tower pools "
                                               rf"at its eos_token_id {eos}"):
    runs.model_from_config(config)


def test_a_preset_without_a_tokenizer_is_refused_before_any_data_or_workdir(root, tmp_path, monkeypatch):
  """The defaults' case (model.source a preset, model.tokenizer empty): the pipeline failed at its first
  caption with a TypeError, after building the world and writing the workdir."""
  monkeypatch.setattr(setup, "data_builder", lambda *a, **k: pytest.fail("built the data first"))
  config = micro_config(root, model={"tokenizer": ""})
  with pytest.raises(config_lib.ConfigError, match="model.source='tiny' brings no tokenizer and model.tokenizer "
                                                   "is empty.*set model.tokenizer \\('shapes'"):
    loop.train(config, tmp_path / "run", mesh_spec="1", log=_quiet, progress=False)
  # Nothing but the workdir's lock: no checkpoints, config.json or metrics.
  assert {path.name for path in (tmp_path / "run").iterdir()} <= {LOCK_FILE}


def test_data_cli_refuses_a_negative_image_size(capsys):
  from mat_jax.data import __main__ as data_cli
  with pytest.raises(SystemExit) as exit_:
    data_cli.main(["build", "shapes", "--image-size", "-5"])
  assert exit_.value.code == 2
  assert "argument --image-size: must be at least 1, got -5" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_:  # refused before the world is built (minutes with its defaults)
    data_cli.main(["ambiguity", "--split", "tset"])
  assert exit_.value.code == 2 and "invalid choice: 'tset'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Experiment files.


def _experiment(tmp_path, body):
  path = tmp_path / "exp.py"
  path.write_text(body)
  return path


def test_a_syntax_error_in_an_experiment_file_names_file_and_line(tmp_path, capsys):
  path = _experiment(tmp_path, "def get_config(arg=None):\n  c = dict(\n  return c\n")
  assert train.main(["--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {path}:") and "syntax error" in err and "Traceback" not in err


def test_a_config_that_is_not_a_python_file_is_named(tmp_path, capsys):
  run_config = tmp_path / "config.json"  # a run's config.json handed back to --config
  run_config.write_text("{}")
  for path in (run_config, tmp_path):
    assert train.main(["--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is not an experiment file: --config takes a Python file") and \
        "Traceback" not in err


def test_an_experiment_argument_may_hold_colons(tmp_path):
  path = _experiment(tmp_path, "def get_config(arg=None):\n"
                               "  return {'model': {'source': arg.split('=', 1)[1] if arg else 'tiny'}}\n")
  assert config_lib.load(f"{path}:source=cache:shapes_clip").model.source == "cache:shapes_clip"


def test_an_ignored_experiment_argument_is_refused(tmp_path, capsys):
  path = _experiment(tmp_path, "def get_config(arg=None):\n  c = {'train': {'steps': 100}}\n"
                               "  if arg == 'runlocal':\n    c['train']['steps'] = 5\n  return c\n")
  assert config_lib.load(f"{path}:runlocal").train.steps == 5
  assert train.main(["--config", f"{path}:runlcal", "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert "'runlcal' changes nothing" in err and "Did you mean 'runlocal'?" in err
  assert not (tmp_path / "run" / "config.json").exists()


def test_get_config_raising_is_one_line_naming_the_line(tmp_path):
  path = _experiment(tmp_path, "def get_config(arg=None):\n  if arg not in (None, 'mat'):\n"
                               "    raise ValueError(f'unknown defense {arg!r}')\n  return {}\n")
  with pytest.raises(config_lib.ConfigError, match=rf"{path}:3: get_config\('matt'\) failed: ValueError: "
                                                    "unknown defense 'matt'"):
    config_lib.load(f"{path}:matt")


# ----------------------------------------------------------------------------------------------------
# Checks of host values before jit.


@pytest.fixture(scope="module")
def micro_clip():
  cfg = clip_config("tiny")
  cfg = runs.parse_model_overrides(f"{MICRO},text.context_length=24", cfg)
  return CLIP(cfg, rngs=nnx.Rngs(0))


def _images(value=0.5, shape=(2, 16, 16, 3)):
  return np.full(shape, value, np.float32)


@pytest.mark.parametrize("images,message", [
    (_images(shape=(2, 16, 16, 4)), r"RGBA \(4 channels\): convert them to RGB"),
    (_images(shape=(2, 16, 16, 1)), r"grayscale \(1 channel\): convert them to RGB"),
    (_images(shape=(0, 16, 16, 3)), "empty batch"),
    (_images(np.nan), "hold 1536 NaN value"),
    (_images(200.0), "0-255 pixel values: divide by 255"),
    (_images(-0.5), r"\[-1, 1\]: map them with \(x \+ 1\) / 2"),
], ids=["rgba", "gray", "empty", "nan", "0-255", "-1..1"])
def test_bad_pixels_get_the_right_advice(micro_clip, images, message):
  with pytest.raises(errors.InputError, match=message):
    checks.check_images(images, 16)
  encoder, params = split(micro_clip)
  with pytest.raises(errors.InputError, match=message):  # the metrics' jitted embedding is guarded too
    metrics.embed_images(encoder, params, images)


def _eval_set(images, text_to_image):
  return types.SimpleNamespace(images=images, captions=[f"a red square {i}" for i in range(len(text_to_image))],
                               text_to_image=np.asarray(text_to_image))


@pytest.fixture(scope="module")
def shapes_tokenizer(root):
  from mat_jax.data import shapes
  return shapes.tokenizer(context_length=24)


@pytest.mark.parametrize("images,text_to_image,message", [
    (_images(255.0), [0, 1], "0-255 pixel values"),
    (_images(-1.0), [0, 1], r"\[-1, 1\]"),
    (_images(), [0, -1], r"text_to_image\[1\] = -1 is not an image index: there are 2 images"),
    (_images(), [0, 4], r"text_to_image\[1\] = 4 is not an image index"),
    (_images(), [0, 0], "image 1 has no caption"),
], ids=["0-255", "-1..1", "negative", "past", "uncaptioned"])
def test_evaluate_checks_its_inputs_before_jit(micro_clip, shapes_tokenizer, images, text_to_image, message):
  with pytest.raises(errors.InputError, match=message):
    evaluate.evaluate(micro_clip, tokenizer=shapes_tokenizer, eval_set=_eval_set(images, text_to_image),
                      attacks=("pgd",), progress=False)


def test_evaluate_refuses_budgets_that_are_not_finite(micro_clip, shapes_tokenizer):
  with pytest.raises(errors.InputError, match=">= 0 and finite"):
    evaluate.evaluate(micro_clip, tokenizer=shapes_tokenizer, eval_set=_eval_set(_images(), [0, 1]),
                      attacks=("pgd",), eps_255=(float("nan"),), progress=False)


@pytest.mark.parametrize("eps,message", [
    (float("nan"), "eps=nan is not a finite number"),
    (2.0, r"eps is in pixel units \[0, 1\]; 2/255 ≈ 0.0078"),
    (-0.1, "must be >= 0")])
def test_attack_budgets_are_checked(micro_clip, eps, message):
  ids = np.array([[1, 5, 2] + [0] * 21] * 2, np.int32)
  mask = (ids > 0).astype(np.int32) | (np.arange(24) < 3)
  with pytest.raises(errors.InputError, match=message):
    attacks.image_attack(micro_clip, _images(), ids, mask, eps=eps, steps=2, step_size=0.01)
  with pytest.raises(errors.InputError, match=message):
    attacks.co_attack(micro_clip, None, _images(), ["a", "b"], None, eps=eps)


def test_ids_longer_than_the_model_name_both_lengths(micro_clip):
  ids = np.ones((2, 100), np.int32)
  encoder, params = split(micro_clip)
  with pytest.raises(errors.InputError, match="length 100 but the text model has 24 positions.*context_length=24"):
    metrics.embed_texts(encoder, params, ids, ids)


# ----------------------------------------------------------------------------------------------------
# The workdir lock.


def test_a_mistyped_preset_is_named_as_one():
  config = config_lib.load(runs.EXPERIMENTS_DIR / "shapes_clip.py", ["--config.model.source=tiyn"])
  with pytest.raises(runs.ModelSourceError, match="model.source='tiyn' is not a preset \\(did you mean 'tiny'\\?"):
    runs.model_from_config(config)


def test_a_second_run_in_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
  with WorkdirLock(tmp_path):
    with pytest.raises(WorkdirLockedError, match=rf"in use by another run \(PID {os.getpid()} on host "
                                                  rf"{socket.gethostname()} since"):
      WorkdirLock(tmp_path).acquire()
  with WorkdirLock(tmp_path) as lock:  # released: free again
    assert lock.held


def test_train_refuses_a_locked_workdir_in_one_line(tmp_path, capsys):
  path = _experiment(tmp_path, "def get_config(arg=None):\n  return {'train': {'steps': 2}}\n")
  with WorkdirLock(tmp_path / "run"):
    assert train.main(["--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: --workdir {tmp_path / 'run'} is in use by another run (PID {os.getpid()}")
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("held", ["weights", "config"])
def test_a_model_directory_is_refused_as_a_workdir_and_keeps_its_config(tmp_path, capsys, held):
  path = _experiment(tmp_path, "def get_config(arg=None):\n  return {'train': {'steps': 2}}\n")
  model = tmp_path / "model"
  model.mkdir()
  model_config = json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]})
  if held == "weights":
    (model / "model.safetensors").write_bytes(b"")
  else:
    (model / "config.json").write_text(model_config)
  assert train.main(["--config", str(path), "--workdir", str(model)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: the workdir {model} holds a model (") and "not a training run" in err
  assert f"--config.model.source={model}" in err
  assert sorted(p.name for p in model.iterdir()) == (["model.safetensors"] if held == "weights" else ["config.json"])
  if held == "config":
    assert (model / "config.json").read_text() == model_config
    with pytest.raises(errors.WorkdirError, match="config.json of a clip model"):  # the Python API alike
      loop.train(config_lib.load(path), model, log=_quiet)


def test_the_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
  code = ("import os, signal, sys; from mat_jax.workdir import WorkdirLock; "
          f"WorkdirLock({str(tmp_path)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
  done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.getcwd()), check=False)
  assert done.returncode == -signal.SIGKILL
  assert (tmp_path / LOCK_FILE).read_text().startswith("PID ")  # the dead holder's record stays behind
  with WorkdirLock(tmp_path):
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"PID {os.getpid()} ")


# ----------------------------------------------------------------------------------------------------
# Damaged checkpoints (a small state: the Checkpointer alone).


def _state(value=1.0):
  params = {"w": jnp.full((4, 3), value), "b": jnp.zeros(3)}
  return {"params": params, "opt": optax.adam(0.1).init(params)}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())


def _two_checkpoints(workdir, newest=None):
  with checkpoint_lib.Checkpointer(workdir, {"x": 1}, async_save=False) as ckpt:
    ckpt.save(1, _state(1.0))
    ckpt.save(2, newest if newest is not None else _state(2.0))


def test_a_finished_save_is_checksummed_without_waiting_for_the_next(tmp_path):
  """The loop asks after every step: a save still being written is left alone, a finished one is
  checksummed at once, not when the next save starts (a kill in between left it unchecked for good)."""
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=True) as ckpt:
    ckpt.save(1, _state(1.0))
    ckpt.wait()
    assert not ckpt.has_checksums(1)  # written, not yet sealed
    ckpt.seal_completed()
    assert ckpt.has_checksums(1) and ckpt.verify(1) is None


def test_resuming_from_a_checkpoint_without_checksums_says_so_and_writes_them(tmp_path):
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    ckpt.save(1, _state(1.0))
    ckpt.save(2, _state(2.0))
  (tmp_path / checkpoint_lib.CHECKSUM_DIR / "2.json").unlink()  # as a kill before the seal leaves it
  # Its stored config then differs unverified: perhaps damage, not another config (the advice says both).
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 2}, async_save=False) as ckpt:
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                       match=r"(?s)x: checkpoint 1, this run 2.*has no checksums.*move .*checkpoints/2 aside"):
      ckpt.check_compatible()
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    _, step = ckpt.restore_newest_intact(_abstract(), log=_quiet)
    assert step == 2 and ckpt.restored_with_checksums is False
    assert ckpt.has_checksums(2)  # the resumed run protects it from here on
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    ckpt.restore_newest_intact(_abstract(), log=_quiet)
    assert ckpt.restored_with_checksums is True
  with pytest.raises(loop.NonFiniteLossError, match=r"files could not be checked.*move .*checkpoints/2 aside"):
    loop._check_finite(2, 2, tmp_path, resumed_at=2, resumed_with_checksums=False)


def _data_file(step_dir):
  return next((step_dir / "state" / "d").iterdir())


def _truncate(step_dir):
  f = _data_file(step_dir)
  f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


def _flip(step_dir):
  f = _data_file(step_dir)
  data = bytearray(f.read_bytes())
  for i in range(0, min(len(data), 64 * 7), 7):
    data[i] ^= 0xFF
  f.write_bytes(bytes(data))


def _empty(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def _flip_fingerprint_digit(step_dir):
  """One flipped bit in the stored config fingerprint (a digit becomes the next): damage that reads as
  another config unless the checksums are consulted first."""
  meta = step_dir / "meta" / "metadata"
  text = meta.read_text()
  digit = next(i for i, c in enumerate(text) if c.isdigit() and c in "02468")
  meta.write_text(text[:digit] + chr(ord(text[digit]) + 1) + text[digit + 1:])


DAMAGE = {
    "truncated": _truncate,
    "flipped-fingerprint": _flip_fingerprint_digit,
    "flipped": _flip,
    "no-manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "garbage-metadata": lambda d: (d / "meta" / "metadata").write_text("{garbage"),
    "empty": _empty,
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, how):
  _two_checkpoints(tmp_path)
  DAMAGE[how](tmp_path / "checkpoints" / "2")
  lines = []
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    state, step = ckpt.restore_newest_intact(_abstract(), log=lines.append)
    assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0
    assert ckpt.all_steps() == [1]
    ckpt.save(2, _state(3.0))  # the step can be written again: the damaged one is out of the way
  assert len(lines) == 2 and lines[0].startswith(f"checkpoint {tmp_path / 'checkpoints' / '2'} is damaged: ")
  assert lines[1] == "resuming from the intact checkpoint at step 1 instead"
  if how in ("truncated", "flipped"):  # found by the checksum before Orbax reads a byte
    assert "differ from the checksums written at save time" in lines[0]
  assert len(list((tmp_path / checkpoint_lib.DAMAGED_DIR).iterdir())) == 1  # kept for inspection


def test_non_finite_restored_values_are_damage(tmp_path):
  _two_checkpoints(tmp_path, newest=_state(float("nan")))
  lines = []
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    _, step = ckpt.restore_newest_intact(_abstract(), log=lines.append)
  assert step == 1 and "arrays hold NaN or inf" in lines[0]


@pytest.mark.parametrize("failure", [errors.Interrupted("interrupted by SIGTERM", signal.SIGTERM), MemoryError(),
                                     RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")])
def test_an_interrupt_or_lack_of_memory_while_restoring_moves_no_checkpoint(tmp_path, monkeypatch, failure):
  # A preempted job is often signalled while it restores: the signal, or a device too small for the state,
  # says nothing about the files, and the intact checkpoint must stay where it is.
  _two_checkpoints(tmp_path)

  def fail(self, step):
    raise failure

  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    monkeypatch.setattr(checkpoint_lib.Checkpointer, "verify", fail)
    with pytest.raises(type(failure)):
      ckpt.restore_newest_intact(_abstract(), log=_quiet)
    monkeypatch.undo()
    assert ckpt.all_steps() == [1, 2]
  assert not (tmp_path / checkpoint_lib.DAMAGED_DIR).exists()


def test_no_intact_checkpoint_is_one_error(tmp_path):
  _two_checkpoints(tmp_path)
  for step in ("1", "2"):
    _flip(tmp_path / "checkpoints" / step)
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    with pytest.raises(checkpoint_lib.DamagedCheckpointError, match="no intact checkpoint in .*starts the run"):
      ckpt.restore_newest_intact(_abstract(), log=_quiet)


def test_orbax_cleanup_thread_is_finished_when_the_checkpointer_opens(tmp_path, monkeypatch):
  # Left running, the thread of a manager opened just before the process stops on "no intact checkpoint"
  # printed "cannot schedule new futures after interpreter shutdown" at exit. Slowed here to make it certain.
  from orbax.checkpoint._src.path import temporary_paths

  listing, finished = temporary_paths.cleanup_temporary_paths, []

  async def slow_listing(*args, **kwargs):
    await asyncio.sleep(0.3)
    result = await listing(*args, **kwargs)
    finished.append(True)
    return result

  monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_listing)
  _two_checkpoints(tmp_path)
  assert len(finished) == 1
  _flip(tmp_path / "checkpoints" / "2")
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    ckpt.restore_newest_intact(_abstract(), log=_quiet)  # sets step 2 aside and reopens the manager
    assert len(finished) == 3


def test_a_reader_skips_damage_without_moving_it(tmp_path):
  _two_checkpoints(tmp_path)
  _flip(tmp_path / "checkpoints" / "2")
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, reader=True) as ckpt:
    _, step = ckpt.restore_newest_intact(_abstract(), log=_quiet, set_aside=False)
  assert step == 1 and (tmp_path / "checkpoints" / "2").is_dir()


def _live_run_holds(workdir):
  (workdir / LOCK_FILE).write_text("PID 4242 on host h since 2025-01-01 00:00:00\n")


@pytest.mark.parametrize("removal", ["removed", "being removed"])
def test_a_reader_rereads_the_steps_when_the_live_run_removes_the_checkpoint_it_reads(tmp_path, monkeypatch, removal):
  """`evaluate --model RUN` on a run that trains: while the reader checks step 2, the run finishes its save of
  step 3 (written under a temporary name until then, its checksums not yet written) and its keep-N removes
  step 2, files first. Neither is damage: the reader reads step 3 and says nothing."""
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(float(step)))
  checkpoints = tmp_path / "checkpoints"
  os.rename(checkpoints / "3", checkpoints / "3.orbax-checkpoint-tmp")
  (tmp_path / checkpoint_lib.CHECKSUM_DIR / "3.json").unlink()
  _live_run_holds(tmp_path)
  verify, reads, deletions = checkpoint_lib.Checkpointer.verify, [], []

  def live_run_moves_on(self, step):
    if not reads:
      os.rename(checkpoints / "3.orbax-checkpoint-tmp", checkpoints / "3")
      if removal == "removed":
        shutil.rmtree(checkpoints / "2")
      else:  # the files go now, the directory once the read has failed
        for f in (checkpoints / "2").rglob("*"):
          if f.is_file():
            f.unlink()
        deletions.append(threading.Timer(0.5, shutil.rmtree, [checkpoints / "2"]))
        deletions[0].start()
    reads.append(step)
    return verify(self, step)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "verify", live_run_moves_on)
  lines = []
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, reader=True) as ckpt:
    state, step = ckpt.restore_newest_intact(_abstract(), log=lines.append, set_aside=False)
  for deletion in deletions:
    deletion.join()
  assert reads == [2, 3] and step == 3 and float(state["params"]["w"][0, 0]) == 3.0
  assert lines == []  # neither "damaged" nor "step 0"


def test_a_reader_whose_checkpoints_the_live_run_keeps_removing_says_so(tmp_path, monkeypatch):
  """Every checkpoint the reader reads is gone by then (a run that saves every step and keeps one): a bounded
  number of rereads, then one error naming the run and what to do, neither "damaged" nor "step 0"."""
  _two_checkpoints(tmp_path)
  _live_run_holds(tmp_path)
  verify, reads = checkpoint_lib.Checkpointer.verify, []

  def saved_anew_and_removed(self, step):  # the run saves the next step and removes this one
    shutil.copytree(self.step_dir(step), self.step_dir(step + 1))
    shutil.copy(self._checksum_path(step), self._checksum_path(step + 1))
    shutil.rmtree(self.step_dir(step))
    reads.append(step)
    return verify(self, step)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "verify", saved_anew_and_removed)
  lines = []
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, reader=True) as ckpt:
    with pytest.raises(checkpoint_lib.CheckpointsRemovedError) as raised:
      ckpt.restore_newest_intact(_abstract(), log=lines.append, set_aside=False)
  assert reads == [2, 3, 4, 5][:checkpoint_lib.REREADS + 1]
  message = str(raised.value)
  assert message.startswith(f"the checkpoints in {tmp_path / 'checkpoints'} were removed while this command read "
                            f"them, by the run holding {tmp_path / LOCK_FILE} (PID 4242 on host h since ")
  assert "train.keep_checkpoints" in message and "after it ends" in message and "step 0" not in message
  assert lines == []


def test_a_reader_finding_every_checkpoint_damaged_moves_none_and_starts_nothing(tmp_path):
  _two_checkpoints(tmp_path)
  for step in ("1", "2"):
    _flip(tmp_path / "checkpoints" / step)
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, reader=True) as ckpt:
    with pytest.raises(checkpoint_lib.DamagedCheckpointError, match="no intact checkpoint in .*moved none") as raised:
      ckpt.restore_newest_intact(_abstract(), log=_quiet, set_aside=False)
  assert "step 0" not in str(raised.value) and (tmp_path / "checkpoints" / "2").is_dir()


def test_an_incompatible_checkpoint_is_refused_not_skipped(tmp_path):
  _two_checkpoints(tmp_path)
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 2}, async_save=False) as ckpt:
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="x: checkpoint 1, this run 2"):
      ckpt.restore_newest_intact(_abstract(), log=_quiet)
  assert (tmp_path / "checkpoints" / "2").is_dir()


def test_the_late_async_errors_of_a_failed_restore_are_dropped(monkeypatch):
  """What Orbax's abandoned reads print after a failed restore (which reports the error itself): the read
  coroutines' own copies of it and asyncio's unretrieved-exception lines. Anything else still prints."""
  passed_on = []
  monkeypatch.setattr(checkpoint_lib, "_previous_unraisablehook", passed_on.append)

  async def _read_array_index_and_device_put():
    pass

  async def another_coroutine():
    pass

  late, other = _read_array_index_and_device_put(), another_coroutine()
  for coroutine in (late, other):
    checkpoint_lib._drop_late_async_errors(types.SimpleNamespace(object=coroutine, exc_value=Exception("read")))
    coroutine.close()
  assert [u.object for u in passed_on] == [other]
  keep = errors._NoUnretrievedExceptions().filter
  for message, kept in [("Task exception was never retrieved", False),
                        ("_GatheringFuture exception was never retrieved", False), ("something else", True)]:
    assert keep(logging.LogRecord("asyncio", logging.ERROR, __file__, 0, message, None, None)) is kept


def test_a_checkpointer_drops_the_late_async_errors_of_a_failed_save(tmp_path, monkeypatch):
  """A save that fails part-way (a full disk) leaves TensorStore's other writes to end on Orbax's closed event
  loop, each printing "Event loop is closed": hundreds of lines around the one error line, some after it.
  A checkpointer drops those from when it opens, not only once it restores; any other one still prints."""
  passed_on = []
  monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
  monkeypatch.setattr(checkpoint_lib, "_previous_unraisablehook", checkpoint_lib._previous_unraisablehook)
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    ckpt.save(1, _state())
  closed = types.SimpleNamespace(object=None, exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(object=None, exc_value=RuntimeError("a bug"))
  for unraisable in (closed, other):
    sys.unraisablehook(unraisable)
  assert passed_on == [other]


_FULL_DISK_AT_SAVE = """
import errno, sys
import jax
from orbax.checkpoint._src.path import async_path
from mat_jax import checkpoint, errors

async def full(path, text):  # the save's first metadata file, written while its arrays are being written
  raise OSError(errno.ENOSPC, "No space left on device")

async_path.write_text = full

def save(argv):
  state = {f"w{i}": jax.random.normal(jax.random.key(i), (512, 512)) for i in range(20)}
  with checkpoint.Checkpointer(sys.argv[1], {"x": 1}) as ckpt:
    ckpt.save(1, state)
  return 0

sys.exit(errors.cli_main(save, output_dir=lambda: sys.argv[1]))
"""


@pytest.mark.slow
def test_a_full_disk_during_a_save_ends_in_its_error_line(tmp_path):
  """End to end, in a process of its own (the late errors are printed as it exits)."""
  done = subprocess.run([sys.executable, "-c", _FULL_DISK_AT_SAVE, str(tmp_path / "run")], capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()), check=False, timeout=300)
  lines = done.stderr.splitlines()
  assert done.returncode == 2 and lines[-1].startswith(f"error: no space left on the device holding {tmp_path}")
  assert "Event loop is closed" not in done.stderr


class _Position:
  """A stand-in for a Grain iterator (the bytes protocol of Grain's checkpoint handler); `fits` says
  whether a stored position restores into it."""

  def __init__(self, fits=True):
    self.fits, self.state = fits, None

  def get_state(self):
    return b'{"next_index": 3}'

  def set_state(self, state):
    if not self.fits:
      raise KeyError("exhausted")  # what a multi-worker Grain iterator raises on a one-process position
    json.loads(state)  # Grain parses the position as JSON
    self.state = state

  def start_prefetch(self):
    pass


@pytest.mark.parametrize("recorded", [True, False])
def test_a_pipeline_of_another_layout_is_refused_not_set_aside(tmp_path, recorded):
  """The input position of another worker count or number of hosts is named as such; the checkpoint, intact,
  stays where it is. With the layout recorded the refusal names it before Grain reads anything; a
  checkpoint without it (or a caller's own iterator) is refused on Grain's error."""
  saved = {"data.worker_count": 0, "processes": 1} if recorded else None
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False, pipeline=saved) as ckpt:
    ckpt.save(1, _state(1.0), _Position())
  layout = {"data.worker_count": 2, "processes": 1}
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False, pipeline=layout) as ckpt:
    want = "data.worker_count: checkpoint 0, this run 2" if recorded else "could not read it.*exhausted"
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match=want):
      ckpt.restore_newest_intact(_abstract(), _Position(fits=recorded), log=_quiet)
  assert (tmp_path / "checkpoints" / "1").is_dir() and not (tmp_path / checkpoint_lib.DAMAGED_DIR).exists()
  position = _Position()
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False, pipeline=saved) as ckpt:
    _, step = ckpt.restore_newest_intact(_abstract(), position, log=_quiet)
  assert step == 1 and position.state == b'{"next_index": 3}'  # the original layout resumes


def test_a_position_saved_when_workers_read_examples_is_refused(tmp_path):
  """Worker processes read whole batches now; a checkpoint whose workers read examples (its layout says
  nothing of it) holds a position in examples, which must not be taken for a position in batches."""
  from mat_jax.training import loop

  assert loop.pipeline_layout(0, 1) == {"data.worker_count": 0, "processes": 1}  # in-process: unchanged
  older = {"data.worker_count": 2, "processes": 1}
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False, pipeline=older) as ckpt:
    ckpt.save(1, _state(1.0), _Position())
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False, pipeline=loop.pipeline_layout(2, 1)) as ckpt:
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                       match="worker_reads: checkpoint None, this run 'batches'.*fresh --workdir"):
      ckpt.restore_newest_intact(_abstract(), _Position(), log=_quiet)
  assert (tmp_path / "checkpoints" / "1").is_dir()


def test_a_position_in_another_build_of_the_training_data_is_refused(tmp_path):
  """A corpus rebuilt under its name (another builder version, --overwrite) holds other records: the saved
  position would continue at the same index of other data. Checkpoints from before the build was recorded
  resume as before."""
  from mat_jax.training import loop

  layout = {"data.worker_count": 0, "processes": 1}
  built = {**layout, "data.build": "caption_corpus/flickr30k_224px/1.2.0", "data.records": 29000}
  with checkpoint_lib.Checkpointer(tmp_path / "run", {"x": 1}, async_save=False, pipeline=built) as ckpt:
    ckpt.save(1, _state(1.0), _Position())
  for changed in ({"data.records": 28999}, {"data.build": "caption_corpus/flickr30k_224px/1.3.0"}):
    with checkpoint_lib.Checkpointer(tmp_path / "run", {"x": 1}, async_save=False,
                                     pipeline={**built, **changed}) as ckpt:
      key = next(iter(changed))
      with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                         match=rf"read other training data: {key}: checkpoint .*same index of other data"):
        ckpt.restore_newest_intact(_abstract(), _Position(), log=_quiet)
  with checkpoint_lib.Checkpointer(tmp_path / "run", {"x": 1}, async_save=False, pipeline=built) as ckpt:
    assert ckpt.restore_newest_intact(_abstract(), _Position(), log=_quiet)[1] == 1
  with checkpoint_lib.Checkpointer(tmp_path / "older", {"x": 1}, async_save=False, pipeline=layout) as ckpt:
    ckpt.save(1, _state(1.0), _Position())
  with checkpoint_lib.Checkpointer(tmp_path / "older", {"x": 1}, async_save=False, pipeline=built) as ckpt:
    assert ckpt.restore_newest_intact(_abstract(), _Position(), log=_quiet)[1] == 1
  # What the loop records of a built dataset.
  from mat_jax.data import corpora
  builder = corpora.build_shapes(tmp_path / "data", train=6, val=0, test=2, image_size=16, log=_quiet)
  record = loop.training_data_record(builder, "train")
  assert record == {"data.build": f"shapes_world/{builder.builder_config.name}/{builder.version}", "data.records": 6}


@pytest.mark.parametrize("how", ["garbage", "missing"])
def test_an_unreadable_position_of_this_layout_is_damage(tmp_path, how):
  """A run killed before it sealed its newest checkpoint (no checksum to catch the damage) whose input
  position then cannot be read: the layout is this run's, so the files are damaged, and the run resumes
  from the checkpoint before."""
  layout = {"data.worker_count": 0, "processes": 1}
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False, pipeline=layout) as ckpt:
    ckpt.save(1, _state(1.0), _Position())
    ckpt.save(2, _state(2.0), _Position())
  (tmp_path / checkpoint_lib.CHECKSUM_DIR / "2.json").unlink()
  data = tmp_path / "checkpoints" / "2" / checkpoint_lib.DATA
  if how == "garbage":
    for f in data.iterdir():
      f.write_text("garbage")
  else:
    shutil.rmtree(data)
  lines, position = [], _Position()
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False, pipeline=layout) as ckpt:
    state, step = ckpt.restore_newest_intact(_abstract(), position, log=lines.append)
  assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0 and position.state == b'{"next_index": 3}'
  assert "input-pipeline position cannot be read" in lines[0] and lines[1].endswith("at step 1 instead")
  assert len(list((tmp_path / checkpoint_lib.DAMAGED_DIR).iterdir())) == 1


# ----------------------------------------------------------------------------------------------------
# Training runs (micro CLIP, tiny shapes world).


@pytest.fixture(scope="module")
def trained(root):
  """A finished 4-step run with checkpoints at 2 and 4."""
  config = micro_config(root, train={"steps": 4, "log_every": 2, "checkpoint_every": 2})
  workdir = root / "trained"
  loop.train(config, workdir, mesh_spec="1", log=_quiet, progress=False, evaluate=False)
  return config, workdir


def test_fewer_steps_than_the_checkpoint_are_refused(root, trained):
  _, workdir = trained
  before = (workdir / "model" / "model.safetensors").stat().st_mtime_ns
  with pytest.raises(config_lib.ConfigError, match=r"train.steps=2 but .* checkpoint at step 4; .*"
                                                   r"--config.train.steps=4 .* fresh --workdir"):
    loop.train(micro_config(root, train={"steps": 2}), workdir, mesh_spec="1", log=_quiet, progress=False,
               evaluate=False)
  assert (workdir / "model" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("how", ["flipped", "garbage-metadata", "flipped-fingerprint"])
def test_a_run_resumes_past_a_damaged_checkpoint(root, trained, how):
  config, source = trained
  workdir = root / f"damaged_run_{how}"
  shutil.copytree(source, workdir)
  shutil.rmtree(workdir / "model")
  DAMAGE[how](workdir / "checkpoints" / "4")
  lines = []
  loop.train(config, workdir, mesh_spec="1", log=lines.append, progress=False, evaluate=False)
  assert any("checkpoints/4 is damaged" in line for line in lines)
  assert "resumed from the checkpoint at step 2" in lines
  assert (workdir / "model" / "model.safetensors").exists()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]


def test_a_signal_while_a_restarted_run_restores_stops_it_once_restored(root, trained, monkeypatch):
  # Raised where it arrived, the command line's SIGTERM met Orbax's and JAX's own `except Exception` (lost:
  # the run went on to the end) or an asyncio callback (the process hung, holding the workdir lock). Held
  # until the restore returns, it stops the run there, and no checkpoint is set aside.
  import time

  config, source = trained
  workdir = root / "signal_in_restore"
  shutil.copytree(source, workdir)
  shutil.rmtree(workdir / "model")
  restore = checkpoint_lib.Checkpointer.restore_newest_intact

  def signalled_restore(self, *args, **kwargs):
    try:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.1)  # the handler runs here
    except Exception:  # noqa: BLE001, S110  as the libraries' own code does
      pass
    return restore(self, *args, **kwargs)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore_newest_intact", signalled_restore)
  previous = signal.signal(signal.SIGTERM, errors._raise_interrupt)  # as `errors.cli_main` has it
  try:
    with pytest.raises(errors.Interrupted, match="interrupted by SIGTERM before training started") as err:
      loop.train(config, workdir, mesh_spec="1", log=_quiet, progress=False, evaluate=False)
    assert signal.getsignal(signal.SIGTERM) is errors._raise_interrupt  # the command line's handler is back
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert err.value.signum == signal.SIGTERM
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
  assert not (workdir / checkpoint_lib.DAMAGED_DIR).exists() and not (workdir / "model").exists()


def test_a_setup_that_fails_leaves_the_signal_handlers_as_they_were(root, trained):
  # The run holds signals from its setup on; a failure before the loop (here the metrics file is a
  # directory) must give them back, or the caller's next Ctrl-C would be swallowed.
  config, source = trained
  workdir = root / "metrics_is_a_directory"
  shutil.copytree(source, workdir)
  shutil.rmtree(workdir / "model")
  (workdir / "metrics.jsonl").unlink()
  (workdir / "metrics.jsonl").mkdir()
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with pytest.raises(OSError):
    loop.train(config, workdir, mesh_spec="1", log=_quiet, progress=False, evaluate=False)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_run_whose_export_lost_its_weights_says_how_to_export_again(root, trained):
  # The generic advice (write the weights with save_pretrained) does not fit a run's own export.
  config, source = trained
  workdir = root / "export_without_weights"
  shutil.copytree(source, workdir)
  (workdir / "model" / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"model holds no weights .*the run's export is incomplete\. Rerun its "
                                              r"training command with --workdir .* to export it again"):
    runs.restore_model(workdir)
  loop.train(config, workdir, mesh_spec="1", log=_quiet, progress=False, evaluate=False)  # the advice, followed
  model, _ = runs.restore_model(workdir)
  assert (workdir / "model" / "model.safetensors").exists() and model.config.vision.image_size == 16


def test_evaluating_a_run_skips_its_damaged_checkpoint_without_moving_it(root, trained, capsys):
  _, source = trained
  workdir = root / "damaged_read"
  shutil.copytree(source, workdir)
  shutil.rmtree(workdir / "model")
  _flip(workdir / "checkpoints" / "4")
  model, _ = runs.restore_model(workdir)
  assert f"checkpoint {workdir / 'checkpoints' / '4'} is damaged" in capsys.readouterr().err
  assert (workdir / "checkpoints" / "4").is_dir() and not (workdir / checkpoint_lib.DAMAGED_DIR).exists()
  assert model.config.vision.image_size == 16


def test_nan_right_after_a_restore_keeps_the_checked_checkpoint(root, trained):
  # The restore checked the checkpoint, and a NaN from the data repeats at the same step on every rerun:
  # calling the checkpoint damaged sent users back to step 0 to meet the same NaN again.
  config, source = trained
  workdir = root / "nan_after_restore"
  shutil.copytree(source, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  model, tokenizer = runs.model_from_config(config)
  builder = setup.data_builder(config, 16, log=_quiet)
  from mat_jax.data import corpora, pipeline
  dataset = pipeline.training_pipeline(corpora.data_source(builder, "train"), tokenizer, 16)
  poisoned = iter(dataset.map(lambda b: dict(b, images=np.full_like(b["images"], np.nan))))
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 2, the first step after restoring the checkpoint "
                                                    r".*checkpoints/2, which was checked on restore .* is kept\. "
                                                    r"A rerun meets this step's batch again") as err:
    loop.train(config, workdir, mesh_spec="1", log=_quiet, progress=False, evaluate=False,
               data_iterator=poisoned, model=model, tokenizer=tokenizer)
  assert "damaged" not in str(err.value) and (workdir / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize("last_saved, advice", [(None, "starts from step 0"), (4, "resumes from that checkpoint")])
def test_a_non_finite_step_says_what_a_rerun_does(tmp_path, last_saved, advice):
  with pytest.raises(loop.NonFiniteLossError, match=f"at step 7 .*; rerunning in the same workdir {advice}"):
    loop._check_finite(7, last_saved, tmp_path)


def test_a_non_finite_step_right_after_a_checkpoint_says_it_may_hold_diverged_weights(tmp_path):
  # An update of 1e29 is finite: the checkpoint written with it passes every check, and the NaN comes one
  # step later. Rerunning from it with a lower learning rate then fails at once, every time.
  checkpoints = tmp_path / "checkpoints"
  for last_saved, resumed_at in ((7, None), (4, 7)):
    with pytest.raises(loop.NonFiniteLossError) as err:
      loop._check_finite(7, last_saved, tmp_path, resumed_at=resumed_at)
    assert f"move {checkpoints / '7'} out of {checkpoints} to resume from the one before it" in str(err.value)
  with pytest.raises(loop.NonFiniteLossError) as err:  # a NaN steps after the last save: nothing to say
    loop._check_finite(9, 7, tmp_path)
  assert "diverged" not in str(err.value)


@pytest.mark.parametrize("resumed_at", [None, 7])
def test_a_non_finite_step_sends_a_run_without_clipping_to_a_fresh_workdir_to_turn_it_on(tmp_path, resumed_at):
  # Whether gradients are clipped is part of the checkpoints' fingerprint: a rerun in the same workdir with
  # clipping turned on is refused, so the message must not advise it; a changed clip norm resumes.
  with pytest.raises(loop.NonFiniteLossError) as unclipped:
    loop._check_finite(7, 4, tmp_path, resumed_at=resumed_at, clipping=False)
  message = str(unclipped.value)
  assert "set optimizer.grad_clip_norm" not in message
  assert "optimizer.grad_clip_norm > 0) changes the run's config, so this workdir refuses it" in message
  assert f"a fresh --workdir, from the start or from the weights of that checkpoint with " \
         f"--config.model.source={tmp_path}" in message
  with pytest.raises(loop.NonFiniteLossError, match="lower optimizer.learning_rate or optimizer.grad_clip_norm; "
                                                    "rerunning in the same workdir resumes from that checkpoint"):
    loop._check_finite(7, 4, tmp_path, resumed_at=resumed_at, clipping=True)
  # FARE and MAVA keep the starting model as their frozen reference: starting from the checkpoint's
  # weights would replace it, so only a fresh start is advised.
  with pytest.raises(loop.NonFiniteLossError) as anchored:
    loop._check_finite(7, 4, tmp_path, resumed_at=resumed_at, clipping=False, reference=True)
  assert "a fresh --workdir, from the start (this objective keeps the starting model as its frozen reference" \
         in str(anchored.value) and "--config.model.source" not in str(anchored.value)


def test_nan_starting_weights_are_not_blamed_on_the_learning_rate(root):
  config = micro_config(root)
  model, tokenizer = runs.model_from_config(config)
  model.visual_projection.kernel[...] = model.visual_projection.kernel[...].at[0, 0].set(jnp.nan)
  with pytest.raises(loop.NonFiniteWeightsError, match=r"starting model .* NaN/inf in 1 parameter arrays") as err:
    loop.train(config, root / "nan_weights", mesh_spec="1", log=_quiet, progress=False, evaluate=False,
               model=model, tokenizer=tokenizer)
  assert "learning_rate" not in str(err.value)


class _SigintAt:
  """Sends this process SIGINT while the n-th batch (1-based) is fetched: a Ctrl-C during step n."""

  def __init__(self, n):
    self.n, self.count = n, 0

  def __call__(self, batch):
    self.count += 1
    if self.count == self.n:
      os.kill(os.getpid(), signal.SIGINT)
    return batch


def _batches(config, tokenizer, interrupt_at=None):
  from mat_jax.data import corpora, pipeline
  builder = setup.data_builder(config, 16, log=_quiet)
  dataset = pipeline.training_pipeline(corpora.data_source(builder, "train"), tokenizer, 16)
  return iter(dataset.map(_SigintAt(interrupt_at)))


def test_ctrl_c_saves_the_step_and_says_how_to_resume(root):
  config = micro_config(root, train={"steps": 6, "log_every": 2, "checkpoint_every": 4})
  workdir = root / "interrupted"
  model, tokenizer = runs.model_from_config(config)
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
  with pytest.raises(errors.Interrupted, match=r"interrupted at step 3; last checkpoint 3 in .*; rerun the same "
                                               "command to resume") as err:
    loop.train(config, workdir, mesh_spec="1", log=_quiet, progress=False, evaluate=False,
               data_iterator=_batches(config, tokenizer, interrupt_at=3), model=model, tokenizer=tokenizer)
  assert err.value.exit_code == 130
  assert signal.getsignal(signal.SIGINT) is before  # the handler given back
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3]
  assert not (workdir / LOCK_FILE).read_text()  # released
  lines = []
  loop.train(config, workdir, mesh_spec="1", log=lines.append, progress=False, evaluate=False,
             data_iterator=_batches(config, tokenizer), model=model, tokenizer=tokenizer)
  assert "resumed from the checkpoint at step 3" in lines
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # Every step in one line: 1-2; 3, written with the stop's checkpoint (only in memory until then, it was
  # lost with the stopped run); 4, the resumed run's; 5-6.
  assert steps == [2, 3, 4, 6]


def test_a_stop_at_an_evaluation_step_evaluates_before_it_stops(root):
  # The resumed run starts after the stop's step: an evaluation due there is made before stopping, or never.
  config = micro_config(root, train={"steps": 4, "log_every": 2, "checkpoint_every": 4, "eval_every": 3},
                        eval={"max_images": 8, "attacks": ()})
  workdir = root / "interrupted_at_evaluation"
  model, tokenizer = runs.model_from_config(config)
  with pytest.raises(errors.Interrupted, match=r"interrupted at step 3; last checkpoint 3"):
    loop.train(config, workdir, mesh_spec="1", log=_quiet, progress=False, evaluate=True,
               data_iterator=_batches(config, tokenizer, interrupt_at=3), model=model, tokenizer=tokenizer)
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines if any(key.startswith("eval/") for key in line)] == [3]


def test_an_unknown_dataset_or_split_is_a_user_error(root, trained):
  config, _ = trained
  with pytest.raises(errors.MatJaxError, match="no corpus 'flikr30k'"):
    evaluate.load_dataset("flikr30k", None, 16, data_dir=str(root / "data"))
  from mat_jax.data import corpora
  builder = setup.data_builder(config, 16, log=_quiet)
  with pytest.raises(errors.MatJaxError, match=r"has no split 'tset'; it has \["):
    corpora.data_source(builder, "tset")


def test_a_run_source_takes_the_configured_context_length_and_tokenizer(root, trained):
  # A run directory brings its own tokenizer; model.context_length and model.tokenizer still apply to it.
  _, workdir = trained
  _, stored = runs.model_from_config(config_lib.build({"model": {"source": str(workdir)}}))
  assert stored is not None and stored.context_length > 8
  _, shorter = runs.model_from_config(config_lib.build({"model": {"source": str(workdir), "context_length": 8}}))
  assert shorter.context_length == 8 and shorter(["a red square"]).input_ids.shape == (1, 8)
  assert stored.context_length > 8  # the run's own tokenizer is not changed
  named = config_lib.build({"model": {"source": str(workdir), "tokenizer": "shapes", "context_length": 8}})
  assert runs.model_from_config(named)[1].context_length == 8


def test_a_context_longer_than_the_model_names_both(root, tmp_path):
  from mat_jax.models import save_clip
  save_clip(CLIP(runs.parse_model_overrides("text.context_length=24", clip_config("tiny")), rngs=nnx.Rngs(0)),
            tmp_path)
  config = config_lib.build({"model": {"source": str(tmp_path), "tokenizer": "shapes", "context_length": 100}})
  with pytest.raises(config_lib.ConfigError, match=r"model.context_length=100 but the text model of .* has 24 "
                                                   r"positions; set model.context_length=24"):
    runs.model_from_config(config)


def test_a_data_directory_that_is_a_file_is_named_with_where_it_came_from(tmp_path, monkeypatch):
  blocker = tmp_path / "afile"
  blocker.write_text("not a directory")
  monkeypatch.setenv("MAT_JAX_DATA_DIR", str(blocker))
  with pytest.raises(errors.WorkdirError, match=rf"^\$MAT_JAX_DATA_DIR {blocker}: {blocker} is a file, not a "
                                                r"directory; pass another \$MAT_JAX_DATA_DIR$"):
    paths.default_data_dir()
  with pytest.raises(errors.WorkdirError, match=r"pass another data_dir \(--data-dir, data.data_dir\)"):
    paths.default_data_dir(blocker / "datasets")
  monkeypatch.delenv("MAT_JAX_DATA_DIR")
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / ".cache").write_text("")
  with pytest.raises(errors.WorkdirError, match=r"pass another data directory \(the default; set \$MAT_JAX_DATA_DIR\)"):
    paths.default_data_dir()


def test_a_write_cut_short_leaves_the_old_file_whole(tmp_path, monkeypatch):
  """study.json, a run's config.json, results and checksums are read by other processes while they are
  rewritten: a write is all or nothing, and leaves no partial file behind."""
  path = tmp_path / "study.json"
  paths.write_text_atomically(path, '{"arms": 1}')
  assert path.read_text() == '{"arms": 1}'

  def disk_full(src, dst):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "replace", disk_full)
  with pytest.raises(OSError, match="No space left"):
    paths.write_text_atomically(path, '{"arms": 2}')
  assert path.read_text() == '{"arms": 1}' and [p.name for p in tmp_path.iterdir()] == ["study.json"]
