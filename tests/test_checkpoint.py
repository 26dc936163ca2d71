"""Exact resume after SIGKILL, incompatible checkpoints, and the exported model (subprocess runs)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from mat_jax import checkpoint as checkpoint_lib
from mat_jax import config as config_lib
from mat_jax import runs
from mat_jax.training import loop
from mat_jax.workdir import LOCK_FILE

from helpers import MICRO

STEPS = 30  # checkpoints at 10, 20 (where the run is killed) and 30: keep-2 must drop one

EXPERIMENT = f'''
import ml_collections

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "resume"
  c.model = dict(source="tiny", tokenizer="shapes", overrides="{MICRO}")
  c.data = dict(name="shapes", data_dir=DATA_DIR, build_train=64, build_val=16, build_test=16, image_size=16)
  c.train = dict(batch_size=16, steps={STEPS}, log_every=4, checkpoint_every=10, keep_checkpoints=2)
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
  # Killed by the loop's fault-injection hook right after the save of step 20 is dispatched: the
  # asynchronous write of that checkpoint is cut off mid-way, deterministically.
  killed_env = dict(env, **{loop.FAULT_SIGKILL_ENV: "20"})
  process = subprocess.run(_command(path, workdir), env=killed_env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=600)
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
  # Every 4 steps and at every checkpoint, once: the lines after the killed run's last checkpoint are the
  # resumed run's, and each line's metrics are the uninterrupted run's (its steps since the last line
  # include the steps before the checkpoint, which the checkpoint's own line took out of memory).
  def lines(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]

  def metrics(line):
    return {k: v for k, v in line.items() if not k.endswith(("steps_per_s", "images_per_s"))}

  resumed_lines, reference_lines = lines(workdir), lines(uninterrupted)
  assert [line["step"] for line in resumed_lines] == [4, 8, 10, 12, 16, 20, 24, 28, 30]
  assert [metrics(line) for line in resumed_lines] == [metrics(line) for line in reference_lines]


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


def test_a_tokenizer_that_maps_words_to_other_ids_is_refused(setting, uninterrupted, monkeypatch, tmp_path):
  """The same vocabulary size, two words' ids swapped: the model would read other inputs from step 0 on."""
  root, path, env = setting
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", env["MAT_JAX_CACHE_DIR"])
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(uninterrupted / "model" / name, tmp_path / name)
  spec = json.loads((tmp_path / "tokenizer.json").read_text())
  vocabulary, special = spec["model"]["vocab"], {token["content"] for token in spec["added_tokens"]}
  first, second = [word for word in vocabulary if word not in special][:2]
  vocabulary[first], vocabulary[second] = vocabulary[second], vocabulary[first]
  (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
  before = _tree_listing(uninterrupted)
  config = config_lib.load(path, [f"model.tokenizer={tmp_path}", "model.context_length=24"])
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="fresh --workdir") as err:
    loop.train(config, uninterrupted, mesh_spec="8", log=lambda _: None, progress=False, evaluate=False)
  differing = [line.split(":")[0].strip() for line in str(err.value).splitlines() if line.startswith("  ")]
  assert differing == ["model.tokenizer_vocabulary"], str(err.value)
  assert _tree_listing(uninterrupted) == before


def _tree_listing(directory):
  # The workdir's lock file records who holds the run (a refused run takes the lock too): not run data.
  return sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in directory.rglob("*") if p.is_file() and p.name != LOCK_FILE)


@pytest.mark.parametrize("overrides, differing", [
    (["objective.name=tecoa", "train.towers=all"], "objective.name: checkpoint 'contrastive', this run 'tecoa'"),
    (["seed=1"], "seed: checkpoint 0, this run 1"),
    (["data.augmentations=hflip"], "data.augmentations: checkpoint [], this run ['hflip']"),
    (["data.split=val"], "data.split: checkpoint 'train', this run 'val'"),
    (["data.build_train=40"], "data.build_train: checkpoint 64, this run 40")],
    ids=["objective", "seed", "augmentations", "split", "world_build"])
def test_another_objective_seed_or_data_stream_is_refused(setting, uninterrupted, monkeypatch, overrides,
                                                          differing):
  # Once the default workdir holds a finished run, switching the objective must not "resume" it at its
  # final step (zero steps) and re-export its model under the new name.
  root, path, env = setting
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", env["MAT_JAX_CACHE_DIR"])
  before = _tree_listing(uninterrupted)
  config = config_lib.load(path, overrides)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="fresh --workdir") as err:
    loop.train(config, uninterrupted, mesh_spec="8", log=lambda _: None, progress=False, evaluate=False)
  assert differing in str(err.value)
  assert _tree_listing(uninterrupted) == before  # checkpoints, config.json and model untouched


def test_state_that_does_not_fit_the_checkpoint_is_refused_clearly(tmp_path):
  # A structural mismatch the fingerprint misses: Orbax's error (and its partial_restore advice) becomes
  # the checkpointer's own, naming the step, the directory and the fix; the checkpoint stays as it was.
  import jax
  import jax.numpy as jnp
  import optax

  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
    ckpt.save(5, {"params": params, "opt": optax.sgd(0.1).init(params)})
  before = _tree_listing(tmp_path)
  targets = {"structure": {"params": params, "opt": optax.sgd(0.1, momentum=0.9).init(params)},
             "shape": {"params": {"w": jnp.ones((4, 4)), "b": jnp.zeros(3)}, "opt": optax.sgd(0.1).init(params)}}
  differences = {
      "structure": "the checkpoint holds 2 arrays, this run's state 4; only in this run's state: 1 of shape (3,), "
                   "1 of shape (4, 3)",
      "shape": "the checkpoint holds 2 arrays, this run's state 2; only in the checkpoint: 1 of shape (4, 3); "
               "only in this run's state: 1 of shape (4, 4)"}
  for kind, target in targets.items():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:
      with pytest.raises(checkpoint_lib.IncompatibleCheckpointError) as err:
        ckpt.restore(abstract)
    message = str(err.value)
    assert f"checkpoint at step 5 in {tmp_path / 'checkpoints'}" in message, kind
    assert "fresh --workdir" in message and "partial_restore" not in message, kind
    # Refused from the stored metadata, before Orbax reads any array.
    assert differences[kind] in message, (kind, message)
  assert _tree_listing(tmp_path) == before
  with checkpoint_lib.Checkpointer(tmp_path, {"x": 1}, async_save=False) as ckpt:  # the right target still works
    restored = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                         {"params": params, "opt": optax.sgd(0.1).init(params)}))
  assert restored["params"]["w"].shape == (4, 3)


def test_a_fingerprint_key_added_later_is_compared_only_where_recorded(tmp_path):
  # Checkpoints written before a key joined the fingerprint resume; one that records it is held to it.
  import jax.numpy as jnp

  added = ("text_attack.top_k",)
  older, newer = tmp_path / "older", tmp_path / "newer"
  with checkpoint_lib.Checkpointer(older, {"x": 1}, async_save=False) as ckpt:
    ckpt.save(1, {"w": jnp.ones(2)})
  with checkpoint_lib.Checkpointer(newer, {"x": 1, "text_attack.top_k": 10}, async_save=False) as ckpt:
    ckpt.save(1, {"w": jnp.ones(2)})
  for top_k in (10, 5):
    with checkpoint_lib.Checkpointer(older, {"x": 1, "text_attack.top_k": top_k}, added_keys=added) as ckpt:
      ckpt.check_compatible()
  with checkpoint_lib.Checkpointer(newer, {"x": 1, "text_attack.top_k": 10}, added_keys=added) as ckpt:
    ckpt.check_compatible()
  with checkpoint_lib.Checkpointer(newer, {"x": 1, "text_attack.top_k": 5}, added_keys=added) as ckpt:
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="top_k: checkpoint 10, this run 5"):
      ckpt.check_compatible()
  # Any other key a checkpoint lacks is a difference, as before (e.g. a non-published inner attack).
  with checkpoint_lib.Checkpointer(older, {"x": 1, "objective.attack": "sga"}, added_keys=added) as ckpt:
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="objective.attack: checkpoint '<absent>'"):
      ckpt.check_compatible()


def test_exported_model_and_tokenizer_reload(setting, uninterrupted, monkeypatch):
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", setting[2]["MAT_JAX_CACHE_DIR"])
  model, tokenizer = runs.restore_model(uninterrupted)
  assert model.config.text.width == 32
  ids = tokenizer(["a red circle"]).input_ids
  assert ids.shape == (1, model.config.text.context_length)
  config = (uninterrupted / "config.json").read_text()
  assert f'"steps": {STEPS}' in config


@pytest.mark.slow
def test_a_finished_run_trained_on_sets_its_export_aside(setting, uninterrupted, tmp_path, capsys, monkeypatch):
  """Resumed with more steps and stopped before its new end, the run's model is its newest checkpoint: the
  export of its old end must not be evaluated as the run's (it is kept, set aside)."""
  root, path, env = setting
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", env["MAT_JAX_CACHE_DIR"])
  workdir = tmp_path / "extended"
  shutil.copytree(uninterrupted, workdir)
  exported = load_file(str(workdir / "model" / "model.safetensors"))
  process = subprocess.run(_command(path, workdir) + ["--config.train.steps=50"], capture_output=True, text=True,
                           env=dict(env, **{loop.FAULT_SIGKILL_ENV: "40"}), timeout=600)
  assert process.returncode == -signal.SIGKILL
  assert "now kept in" in process.stdout + process.stderr
  assert not (workdir / "model").exists() and not runs.is_trained(workdir)
  kept = load_file(str(workdir / "superseded_models" / "1" / "model.safetensors"))
  assert all(np.array_equal(kept[k], exported[k]) for k in exported)
  model, _ = runs.restore_model(workdir)
  # The kill cut the asynchronous write of step 40: the newest intact checkpoint is the old end's.
  assert "using its checkpoint at step 30 of 50" in capsys.readouterr().err


def test_an_export_is_read_with_the_context_length_its_run_tokenised_at(tmp_path):
  from flax import nnx

  from mat_jax.data import shapes
  from mat_jax.models import CLIP

  model = CLIP(runs.parse_model_overrides(MICRO, runs.clip_config("tiny")), rngs=nnx.Rngs(0))
  runs.export_model(model, shapes.tokenizer(), tmp_path)
  assert runs.restore_model(tmp_path)[1].context_length == model.config.text.context_length  # no run config
  (tmp_path / "config.json").write_text(json.dumps({"model": {"source": "x", "context_length": 12}}))
  assert runs.restore_model(tmp_path)[1].context_length == 12


def test_a_run_is_restored_computing_as_it_trained(tmp_path, monkeypatch):
  """The demo and the study evaluate what `restore_model` returns: an exported run computes as its run
  trained, as a checkpoint-only one does (read in the loader's float32, a run trained in `auto`'s bfloat16
  on a GPU would be evaluated in float32 there)."""
  import jax
  from flax import nnx

  from mat_jax.data import shapes
  from mat_jax.models import CLIP

  model = CLIP(runs.parse_model_overrides(MICRO, runs.clip_config("tiny")), rngs=nnx.Rngs(0))
  runs.export_model(model, shapes.tokenizer(), tmp_path)
  assert runs.restore_model(tmp_path)[0].config.dtype == "float32"  # a model directory: the loader's default
  (tmp_path / "config.json").write_text(json.dumps({"model": {"source": "x", "dtype": "bfloat16",
                                                              "remat": "nothing_saveable"}}))
  restored = runs.restore_model(tmp_path)[0]
  assert (restored.config.dtype, restored.config.remat, restored.config.attention) == (
      "bfloat16", "nothing_saveable", "auto")
  # The caller's options win, "auto" resolved on this platform; load_model's dtype reaches a run too.
  assert runs.restore_model(tmp_path, dtype="float32")[0].config.dtype == "float32"
  assert runs.load_model(str(tmp_path), dtype="float32")[0].config.dtype == "float32"
  (tmp_path / "config.json").write_text(json.dumps({"model": {"source": "x", "dtype": "auto"}}))
  assert runs.restore_model(tmp_path)[0].config.dtype == "float32"  # the CPU's auto
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert runs.restore_model(tmp_path)[0].config.dtype == "bfloat16"  # an accelerator's
  # The parameters are the export's, whatever the options.
  leaves = [np.asarray(x) for x in jax.tree.leaves(nnx.state(restored, nnx.Param))]
  assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True))


def test_an_export_cut_short_leaves_no_model_or_the_previous_one(tmp_path):
  """`model/config.json` marks a run as trained: an export that fails part-way (here in the tokenizer's
  files) must not leave a model without them, and a failed re-export keeps the model exported before."""
  from flax import nnx

  from mat_jax.data import shapes
  from mat_jax.models import CLIP

  model = CLIP(runs.parse_model_overrides(MICRO, runs.clip_config("tiny")), rngs=nnx.Rngs(0))

  class Unwritable:
    def save_pretrained(self, directory):
      raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    runs.export_model(model, Unwritable(), tmp_path)
  assert not (tmp_path / checkpoint_lib.MODEL_DIR).exists() and not runs.is_trained(tmp_path)
  runs.export_model(model, shapes.tokenizer(), tmp_path)
  exported = sorted(p.name for p in (tmp_path / checkpoint_lib.MODEL_DIR).iterdir())
  assert runs.is_trained(tmp_path) and "tokenizer.json" in exported
  with pytest.raises(OSError, match="disk full"):
    runs.export_model(model, Unwritable(), tmp_path)
  assert sorted(p.name for p in (tmp_path / checkpoint_lib.MODEL_DIR).iterdir()) == exported


def test_read_run_config_reads_an_object_and_names_a_damaged_file(tmp_path):
  from mat_jax.errors import ConfigError

  assert checkpoint_lib.read_run_config(tmp_path) is None  # none
  with pytest.raises(ConfigError, match="cannot be read"):
    checkpoint_lib.read_run_config(tmp_path, required=True)
  path = tmp_path / checkpoint_lib.CONFIG_FILE
  path.write_text('{"model": {"source": "shapes"}}')
  assert checkpoint_lib.read_run_config(tmp_path) == {"model": {"source": "shapes"}}
  for text, message in (("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list, not an object")):
    path.write_text(text)
    assert checkpoint_lib.read_run_config(tmp_path) is None
    with pytest.raises(ConfigError, match=message):
      checkpoint_lib.read_run_config(tmp_path, required=True)
