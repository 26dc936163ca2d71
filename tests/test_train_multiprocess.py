"""A 2-process run (jax.distributed on localhost, 4 CPU devices each) of TeCoA makes the same update as one
process with 8 devices; the processes stop at one step when their signals come at different steps, and
wait for process 0's final evaluation before they exit. The workers are this file run as a script
(imports come after XLA_FLAGS is set)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import MICRO, xla_flags

BATCH = 16
CACHED = "cached_multiprocess"  # an experiment both processes need from the cache


def _config(root):
  from mat_jax import config as config_lib
  return config_lib.build({
      "name": "multiprocess",
      "model": {"source": "tiny", "tokenizer": "shapes", "overrides": MICRO},
      "data": {"name": "shapes", "data_dir": str(Path(root) / "data"), "build_train": 64, "build_val": 16,
               "build_test": 16, "image_size": 16},
      "train": {"batch_size": BATCH, "steps": 2, "log_every": 1, "checkpoint_every": 2},
      "optimizer": {"name": "sgd", "momentum": 0.0, "learning_rate": 0.5},
      "schedule": {"name": "constant"},
      # An objective with an inner attack: its step is three programs, which both processes compile and run.
      "objective": {"name": "tecoa", "steps": 1},
  })


def _global_batch(config, tokenizer):
  """One fixed global batch of the shapes world (the same in every process)."""
  from mat_jax.training import setup
  builder = setup.data_builder(config, 16, log=lambda _: None)
  return next(setup.train_iterator(config, builder, tokenizer, BATCH, process_index=0, process_count=1))


def _repeating(batch):
  """A checkpointable Grain iterator that yields `batch` forever."""
  import grain
  return iter(grain.MapDataset.source([batch]).repeat().to_iter_dataset())


def _train(root, workdir, rows, mesh_spec):
  from mat_jax import runs
  from mat_jax.training import loop
  config = _config(root)
  model, tokenizer = runs.model_from_config(config)
  batch = {k: v[rows] for k, v in _global_batch(config, tokenizer).items()}
  return loop.train(config, workdir, mesh_spec=mesh_spec, log=print, progress=False, evaluate=False,
                    data_iterator=_repeating(batch), model=model, tokenizer=tokenizer)


def _worker(port, process_id, root):
  from mat_jax import mesh as mesh_lib
  mesh_lib.initialize_distributed(f"localhost:{port}", 2, process_id)
  import jax
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  half = BATCH // 2
  _train(root, Path(root) / "two_processes", slice(process_id * half, (process_id + 1) * half), None)
  # Both processes need a "cache:NAME" model that is not trained yet: they train it together (one
  # process holding the lock and the others waiting for it would leave it alone in Orbax's collectives).
  from mat_jax import runs
  from mat_jax.training import loop
  runs.EXPERIMENTS_DIR = Path(root) / "experiments"
  loop.ensure_cached_run(CACHED, log=print)


# The stop test: each process sends itself SIGTERM when it fetches the batch of its step here (seen after
# that step), three steps apart, as when a scheduler's signals reach the hosts at different times.
SIGNAL_AT_STEP = (5, 8)
# The final evaluation of process 0 takes longer than jax.distributed's shutdown timeout (300 s by default,
# lowered here): a process leaving `train` before it would make the shutdown barrier abort both.
SHUTDOWN_TIMEOUT_S, EVALUATION_S = 3, 7


class _SignalAt:
  """The batches of `iterator`, sending this process SIGTERM when the batch of step `step` is fetched."""

  def __init__(self, iterator, step):
    self.iterator, self.step, self.fetched = iterator, step, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.fetched == self.step:
      os.kill(os.getpid(), signal.SIGTERM)
    self.fetched += 1
    return next(self.iterator)

  # Grain saves an iterator that is not its own DatasetIterator as the JSON bytes its get_state returns.
  def get_state(self):
    return json.dumps(self.iterator.get_state()).encode()

  def set_state(self, state):
    self.iterator.set_state(json.loads(state))


def _stop_worker(port, process_id, root):
  """Train until both signals have come, then resume the run to its end with a slow final evaluation."""
  import time
  import jax
  jax.distributed.initialize(f"localhost:{port}", 2, process_id, shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  from mat_jax import errors, runs
  from mat_jax.training import loop
  workdir = Path(root) / "stopped"
  config = _config(root)
  config.train.update(steps=1000, checkpoint_every=1000, log_every=1000)
  model, tokenizer = runs.model_from_config(config)
  half = BATCH // 2
  batch = {k: v[process_id * half:(process_id + 1) * half] for k, v in _global_batch(config, tokenizer).items()}
  iterator = _SignalAt(_repeating(batch), SIGNAL_AT_STEP[process_id])
  try:
    loop.train(config, workdir, log=print, progress=False, evaluate=False, data_iterator=iterator, model=model,
               tokenizer=tokenizer)
  except errors.Interrupted as err:
    print(f"process {process_id}: {err} (exit code {err.exit_code})", flush=True)

  def slow_evaluation(self, params):
    time.sleep(EVALUATION_S)
    return {"clean/tr@1": 50.0}

  loop.Evaluator.__call__ = slow_evaluation
  config.train.steps = 12
  result = loop.train(config, workdir, log=print, progress=False, evaluate=True, data_iterator=_repeating(batch),
                      model=model, tokenizer=tokenizer)
  print(f"process {process_id}: finished at step {result.step}", flush=True)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_make_the_update_of_one_process_with_8_devices(tmp_path, devices, monkeypatch):
  import numpy as np
  from safetensors.numpy import load_file
  from mat_jax import runs
  from mat_jax.models import save_clip

  monkeypatch.setenv("MAT_JAX_CACHE_DIR", str(tmp_path / "cache"))
  config = _config(tmp_path)
  model, tokenizer = runs.model_from_config(config)  # builds the tokenizer once, for all
  _global_batch(config, tokenizer)                                  # and the dataset
  save_clip(model, tmp_path / "initial")

  experiments = tmp_path / "experiments"
  experiments.mkdir()
  cached = {**config.to_dict(), "name": CACHED}
  cached["train"].update(steps=1, checkpoint_every=1, export=True)
  (experiments / f"{CACHED}.py").write_text(f"def get_config(arg=None):\n  return {cached!r}\n")
  monkeypatch.setattr(runs, "EXPERIMENTS_DIR", experiments)
  cached_dir = runs.cached_run_dir(CACHED, runs.cached_experiment(CACHED)[1])
  env = dict(os.environ, XLA_FLAGS=xla_flags(device_count=4), JAX_PLATFORMS="cpu")
  port = _free_port()
  workers = [subprocess.Popen([sys.executable, __file__, str(port), str(i), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  one = _train(tmp_path, tmp_path / "one_process", slice(None), "8")  # meanwhile, the reference
  for worker in workers:
    out, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, out[-3000:]

  two = tmp_path / "two_processes"
  # Each process saved its own data-iterator position; only process 0 wrote logs and the model.
  assert {p.name for p in (two / "checkpoints" / "2" / "data").iterdir()} >= {
      "process_0-of-2.json", "process_1-of-2.json"}
  assert len((two / "metrics.jsonl").read_text().splitlines()) == 2
  initial = load_file(str(tmp_path / "initial" / "model.safetensors"))
  reference = load_file(str(one.model_dir / "model.safetensors"))
  distributed = load_file(str(two / "model" / "model.safetensors"))
  update = np.concatenate([(reference[k] - initial[k]).ravel() for k in sorted(initial)])
  difference = np.concatenate([(distributed[k] - reference[k]).ravel() for k in sorted(initial)])
  assert np.linalg.norm(update) > 0
  assert np.linalg.norm(difference) <= 1e-5 * np.linalg.norm(update)
  assert runs.is_trained(cached_dir)
  logged = [json.loads(line) for line in (cached_dir / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in logged if "train/loss" in line] == [1]  # trained once, by both processes


@pytest.mark.slow
def test_signals_at_different_steps_stop_all_processes_at_one_step_and_all_wait_for_the_evaluation(
    tmp_path, devices):
  from mat_jax import runs
  config = _config(tmp_path)
  _global_batch(config, runs.model_from_config(config)[1])  # the dataset, built once for both processes
  env = dict(os.environ, XLA_FLAGS=xla_flags(device_count=4), JAX_PLATFORMS="cpu",
             MAT_JAX_CACHE_DIR=str(tmp_path / "cache"))
  port = _free_port()
  workers = [subprocess.Popen([sys.executable, __file__, str(port), str(i), str(tmp_path), "stop"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  for worker in workers:
    try:
      out, _ = worker.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for other in workers:
        other.kill()
      raise
    outputs.append(out)
    assert worker.returncode == 0, out[-3000:]

  # Process 0 saw its signal after step 6, process 1 after step 9: both stopped after step 9, within the
  # margin the first one set, and wrote one checkpoint together.
  for process_id, out in enumerate(outputs):
    assert f"process {process_id}: interrupted at step 9; last checkpoint 9 in" in out, out[-3000:]
    assert "(exit code 143)" in out
  assert (tmp_path / "stopped" / "checkpoints" / "12").is_dir()
  assert {p.name for p in (tmp_path / "stopped" / "checkpoints" / "9" / "data").iterdir()} >= {
      "process_0-of-2.json", "process_1-of-2.json"}
  # The resumed run ended on both processes, after process 0's final evaluation.
  assert "resumed from the checkpoint at step 9" in outputs[0]
  assert re.search(r"evaluation \(.*\): clean/tr@1 50\.0", outputs[0]), outputs[0][-3000:]
  for process_id, out in enumerate(outputs):
    assert f"process {process_id}: finished at step 12" in out, out[-3000:]


if __name__ == "__main__":
  if sys.argv[4:] == ["stop"]:
    _stop_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
  else:
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
