"""A 2-process run (jax.distributed on localhost, 4 CPU devices each) makes the same update as one
process with 8 devices. The worker is this file run as a script (imports come after XLA_FLAGS is set)."""

import json
import os
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


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
