"""Exact resume after SIGKILL, incompatible checkpoints, and the exported model (subprocess runs)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from mat_jax import checkpoint as checkpoint_lib
from mat_jax import config as config_lib
from mat_jax.training import loop

MICRO = ("vision.image_size=16,vision.layers=1,vision.width=32,vision.heads=2,vision.mlp_dim=64,"
         "text.layers=1,text.width=32,text.heads=2,text.mlp_dim=64,projection_dim=32")
STEPS = 80

EXPERIMENT = f'''
import ml_collections

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "resume"
  c.model = dict(source="tiny", tokenizer="shapes", overrides="{MICRO}")
  c.data = dict(name="shapes", data_dir=DATA_DIR, build_train=64, build_val=16, build_test=16, image_size=16)
  c.train = dict(batch_size=16, steps={STEPS}, log_every=10, checkpoint_every=10, keep_checkpoints=2)
  c.optimizer = dict(name="adamw", learning_rate=1e-3, weight_decay=0.01)
  c.schedule = dict(name="cosine", warmup_steps=5)
  return c
'''


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  path = root / "resume.py"
  path.write_text(f"DATA_DIR = {str(root / 'data')!r}\n" + EXPERIMENT)
  env = dict(os.environ)
  env.update(MAT_JAX_CACHE_DIR=str(root / "cache"),
             # The three runs compile the same step: the second and third load it from this cache.
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return root, path, env


def _command(path, workdir):
  return [sys.executable, "-m", "mat_jax.train", "--config", str(path), "--workdir", str(workdir),
          "--mesh", "8", "--no-progress", "--no-eval"]


def _run(path, workdir, env):
  done = subprocess.run(_command(path, workdir), env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


@pytest.fixture(scope="module")
def uninterrupted(setting):
  root, path, env = setting
  workdir = root / "full"
  _run(path, workdir, env)
  return workdir


@pytest.mark.slow
def test_sigkill_and_restart_end_with_the_same_parameters(setting, uninterrupted):
  root, path, env = setting
  workdir = root / "killed"
  process = subprocess.Popen(_command(path, workdir), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  first = workdir / "checkpoints" / "10"
  while not first.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert not (workdir / "model").exists()
  killed_at = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert killed_at < STEPS

  out = _run(path, workdir, env)
  assert "resumed from the checkpoint at step" in out
  resumed = load_file(str(workdir / "model" / "model.safetensors"))
  reference = load_file(str(uninterrupted / "model" / "model.safetensors"))
  assert resumed.keys() == reference.keys()
  for name in reference:
    np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
  # keep-N: only the newest checkpoints remain.
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [STEPS - 10, STEPS]


def test_incompatible_config_is_refused(setting, uninterrupted, monkeypatch):
  root, path, env = setting
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", env["MAT_JAX_CACHE_DIR"])
  config = config_lib.load(path, [f"model.overrides={MICRO.replace('text.width=32', 'text.width=64')}",
                                  "train.towers=vision"])
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError) as err:
    loop.train(config, uninterrupted, mesh_spec="8", log=lambda _: None, progress=False, evaluate=False)
  message = str(err.value)
  assert "model.text.width: checkpoint 32, this run 64" in message
  assert "train.towers" in message and "fresh --workdir" in message


def test_exported_model_and_tokenizer_reload(setting, uninterrupted, monkeypatch):
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", setting[2]["MAT_JAX_CACHE_DIR"])
  model, tokenizer = checkpoint_lib.restore_model(uninterrupted)
  assert model.config.text.width == 32
  ids = tokenizer(["a red circle"]).input_ids
  assert ids.shape == (1, model.config.text.context_length)
  config = (uninterrupted / "config.json").read_text()
  assert f'"steps": {STEPS}' in config
