"""The generic train step and the training loop on a micro CLIP and a tiny shapes world.

Data-parallel equivalence (1 device vs 8, replicated vs FSDP), one compilation per shape, a loss that
falls, the run's outputs (metrics, checkpoints, exported model), and the NaN stop.
"""

import functools
import json
import math
import os
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mat_jax import config as config_lib
from mat_jax import mesh as mesh_lib
from mat_jax import precompile
from mat_jax import runs
from mat_jax.data import pipeline
from mat_jax.training import loop, setup
from mat_jax.training import step as step_lib

from helpers import MICRO

# Learns quickly (16 patches of 4 px, width 64): the loss-falls test.
LEARNER = ("vision.image_size=16,vision.patch_size=4,vision.layers=1,vision.width=64,vision.heads=4,"
           "vision.mlp_dim=128,text.layers=1,text.width=64,text.heads=4,text.mlp_dim=128,projection_dim=64")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("train")
  with pytest.MonkeyPatch.context() as patch:  # restored after the module
    patch.setenv("MAT_JAX_CACHE_DIR", str(root / "cache"))  # the shapes tokenizer is cached there
    yield root


def micro_config(root, overrides=(), **sections):
  raw = {
      "name": "micro",
      "model": {"source": "tiny", "tokenizer": "shapes", "overrides": MICRO},
      "data": {"name": "shapes", "data_dir": str(root / "data"), "build_train": 64, "build_val": 16,
               "build_test": 16, "image_size": 16},
      "train": {"batch_size": 16, "steps": 4, "log_every": 2, "checkpoint_every": 2},
      "optimizer": {"name": "sgd", "momentum": 0.0, "learning_rate": 0.5},
      "schedule": {"name": "constant"},
  }
  for section, values in sections.items():
    raw.setdefault(section, {}).update(values)
  return config_lib.build(raw, overrides)


@pytest.fixture(scope="module")
def case(root):
  """A micro model, its SGD step pieces and one real batch of the shapes world."""
  config = micro_config(root)
  run = loop.build_run(config, root / "unused", mesh_spec="1", log=lambda _: None)
  builder = setup.data_builder(config, 16, log=lambda _: None)
  iterator = setup.train_iterator(config, builder, run.tokenizer, 16, process_index=0, process_count=1)
  batch = next(iterator)
  return run, batch


def _two_steps(run, batch, spec, mode="replicated", rules=None):
  mesh = mesh_lib.make_mesh(spec)
  shardings = step_lib.state_shardings(run.params, run.tx, run.is_trainable, mesh, mode, rules)
  state = step_lib.create_state(run.params, run.tx, run.is_trainable, 0, shardings)
  fn = step_lib.jit_step(step_lib.make_step_fn(run.encoder, run.objective, run.tx, run.is_trainable,
                                               run.schedule), shardings, mesh)
  losses = []
  for _ in range(2):
    state, metrics = fn(state, mesh_lib.global_batch(batch, mesh), None)
    losses.append(float(metrics["loss"]))
  return fn, state, losses


def _update(params, before):
  return np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                         for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True)])


@pytest.fixture(scope="module")
def one_device(case):
  run, batch = case
  fn, state, losses = _two_steps(run, batch, "1")
  return _update(state.params, run.params), losses


def test_two_steps_on_8_devices_match_one_device(case, one_device, devices):
  run, batch = case
  fn, state, losses = _two_steps(run, batch, "8")
  assert fn.cache_size() == 1  # compiled once for both steps
  assert int(state.step) == 2 and int(state.bad_step) == -1
  update = _update(state.params, run.params)
  reference, reference_losses = one_device
  assert np.linalg.norm(reference) > 0
  assert np.linalg.norm(update - reference) <= 1e-5 * np.linalg.norm(reference)
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
  # Parameters stay replicated, every device holds them whole.
  kernel = state.params["vision"]["blocks"][0]["fc1"]["kernel"]
  assert kernel.sharding.is_fully_replicated


def test_fsdp_step_matches_one_device(case, one_device, devices):
  run, batch = case
  fn, state, _ = _two_steps(run, batch, "data=4,fsdp=2", "fsdp")
  kernel = state.params["vision"]["blocks"][0]["fc1"]["kernel"]
  assert not kernel.sharding.is_fully_replicated
  assert kernel.addressable_shards[0].data.shape == (32, 32)  # (32, 64) split over fsdp=2
  update = _update(state.params, run.params)
  reference, _ = one_device
  assert np.linalg.norm(update - reference) <= 1e-5 * np.linalg.norm(reference)


def test_logical_sharding_over_the_data_axis_matches_one_device(case, one_device, devices):
  # ZeRO-style: parameters split over the data-parallel devices themselves (no fsdp axis).
  run, batch = case
  fn, state, _ = _two_steps(run, batch, "8", "logical", "embed=data")
  kernel = state.params["vision"]["blocks"][0]["fc1"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (4, 64)  # (32, 64): embed over data=8
  update = _update(state.params, run.params)
  reference, _ = one_device
  assert np.linalg.norm(update - reference) <= 1e-5 * np.linalg.norm(reference)


class _UnusableGradient:
  """An objective whose loss is 0 and whose gradient is infinite ("inf": the square root at 0) or finite
  with a square that overflows float32 ("overflow": 1e20 times a parameter)."""

  def __init__(self, kind):
    self.kind = kind

  def loss(self, encoder, params, batch, key, reference=None):
    scale = encoder.logit_scale(params)
    zero = scale - jax.lax.stop_gradient(scale)
    return (jnp.sqrt(zero) if self.kind == "inf" else 1e20 * zero), {}


@pytest.mark.parametrize("skip", ["conditional", "select"])
@pytest.mark.parametrize("kind", ["inf", "overflow"])
def test_a_step_with_an_unusable_gradient_changes_no_parameter(case, kind, skip, monkeypatch):
  # Both ways of skipping the update: a conditional (XLA:CPU) and a select (accelerators).
  monkeypatch.setattr(step_lib, "_skip_with_conditional", lambda: skip == "conditional")
  run, batch = case
  tx = optax.adam(1e-2)  # a state that a skipped step must leave alone (the case's SGD has none)
  mesh = mesh_lib.make_mesh("1")
  shardings = step_lib.state_shardings(run.params, tx, run.is_trainable, mesh)
  state = step_lib.create_state(run.params, tx, run.is_trainable, 0, shardings)
  # One good step first, so the optimizer state is not all zeros; the state is donated: keep copies.
  good = step_lib.jit_step(step_lib.make_step_fn(run.encoder, run.objective, tx, run.is_trainable), shardings, mesh)
  state, _ = good(state, mesh_lib.global_batch(batch, mesh), None)
  params, opt_state = (jax.tree.map(np.array, tree) for tree in (state.params, state.opt_state))
  fn = step_lib.jit_step(step_lib.make_step_fn(run.encoder, _UnusableGradient(kind), tx, run.is_trainable),
                         shardings, mesh)
  after, metrics = fn(state, mesh_lib.global_batch(batch, mesh), None)
  assert float(metrics["loss"]) == 0.0 and not np.isfinite(float(metrics["grad_norm"]))
  assert int(after.step) == 2 and int(after.bad_step) == 1
  assert not np.any(_update(after.params, params))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after.opt_state), opt_state)


@pytest.mark.parametrize("skip", ["conditional", "select"])
def test_an_update_that_overflows_a_parameter_is_a_bad_step(case, skip, monkeypatch):
  # Finite loss and gradients, but a learning rate that carries a parameter past float32's range: the step
  # is recorded, so the loop stops before it saves that state (which would otherwise pass for a good one).
  monkeypatch.setattr(step_lib, "_skip_with_conditional", lambda: skip == "conditional")
  run, batch = case
  tx = optax.sgd(3e38)
  mesh = mesh_lib.make_mesh("1")
  shardings = step_lib.state_shardings(run.params, tx, run.is_trainable, mesh)
  state = step_lib.create_state(run.params, tx, run.is_trainable, 0, shardings)
  fn = step_lib.jit_step(step_lib.make_step_fn(run.encoder, run.objective, tx, run.is_trainable), shardings, mesh)
  after, metrics = fn(state, mesh_lib.global_batch(batch, mesh), None)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(after.bad_step) == 0


class _Probe:
  """loss = -3·logit_scale + 4·(one projection weight), so the gradient's norm is exactly 5 and a descent step
  raises the temperature; its metric `draw` is a uniform number from the step's key."""

  def loss(self, encoder, params, batch, key, reference=None):
    loss = -3.0 * encoder.logit_scale(params) + 4.0 * params["visual_projection"]["kernel"][...][0, 0]
    return loss, {"draw": jax.random.uniform(key)}


def test_the_steps_metrics_key_and_donated_state(case, devices):
  # Logged grad_norm is the global L2 norm (not its square); learning_rate is the rate of the update the step
  # applied (schedule(step) before the increment, not the next one's); each step draws from its own key,
  # fold_in(seed key, step), which is what makes a resumed run draw the uninterrupted run's numbers; and the
  # state passed in is donated (its buffers reused: without it a step holds two copies of params and moments).
  # A step that carries the temperature past CLIP's bound leaves it projected onto the bound.
  run, batch = case
  tx = optax.sgd(1.0)  # logit_scale: 2.66 + 3 > log(100)
  is_trainable = lambda path, _: path[0] in ("logit_scale", "visual_projection")  # noqa: E731  a small step
  mesh = mesh_lib.make_mesh("1")
  shardings = step_lib.state_shardings(run.params, tx, is_trainable, mesh)
  state = step_lib.create_state(run.params, tx, is_trainable, 7, shardings)
  fn = step_lib.jit_step(step_lib.make_step_fn(run.encoder, _Probe(), tx, is_trainable, lambda s: 0.5 * s),
                         shardings, mesh)
  draws = []
  for step in range(2):
    before = state
    state, metrics = fn(state, mesh_lib.global_batch(batch, mesh), None)
    assert float(metrics["grad_norm"]) == pytest.approx(5.0, rel=1e-6)
    assert float(metrics["learning_rate"]) == 0.5 * step
    draws.append(float(metrics["draw"]))
    assert before.params["visual_projection"]["kernel"][...].is_deleted()
    assert float(state.params["logit_scale"][...]) == pytest.approx(math.log(100.0))
  seed_key = jax.random.key(7)
  assert draws == [pytest.approx(float(jax.random.uniform(jax.random.fold_in(seed_key, s)))) for s in range(2)]


def test_the_initial_state_program_takes_the_seed_as_an_argument(case, monkeypatch):
  # Runs that differ only in their seed (a study's) must share the program that builds their state, so
  # that one persistent-cache entry serves them all: the key is an argument, not a constant of the program.
  run, _ = case
  mesh = mesh_lib.make_mesh("1")
  shardings = step_lib.state_shardings(run.params, run.tx, run.is_trainable, mesh)
  programs = []
  real_jit = jax.jit

  def recording_jit(fn, **kwargs):
    jitted = real_jit(fn, **kwargs)

    def call(*args):
      programs.append(jitted.lower(*args).as_text())
      return jitted(*args)
    return call

  monkeypatch.setattr(step_lib.jax, "jit", recording_jit)
  states = [step_lib.create_state(run.params, run.tx, run.is_trainable, seed, shardings) for seed in (0, 7)]
  assert len(programs) == 2 and programs[0] == programs[1]
  for seed, state in zip((0, 7), states, strict=True):
    np.testing.assert_array_equal(state.rng, jax.random.key_data(jax.random.key(seed)))
    assert state.rng.dtype == jnp.uint32


def test_a_temperature_past_its_bound_still_trains_and_is_projected_back(case):
  # OpenAI's CLIP stores logit_scale 4.6052, just above log(100): the losses read 100, but the gradient
  # must reach the parameter (CLIP's and BLIP's trainers clamp the parameter, not its gradient), and the
  # update is projected back into the range. A plain clip's zero gradient froze it for good.
  run, batch = case
  bound = math.log(100.0)
  temperature_grad = jax.grad(lambda s: run.encoder.temperature({"logit_scale": s}))
  assert float(temperature_grad(jnp.asarray(5.0))) == pytest.approx(100.0, rel=1e-5)
  assert float(temperature_grad(jnp.asarray(2.0))) == pytest.approx(math.exp(2.0), rel=1e-5)
  params = jax.tree.map(lambda x: x, run.params)
  params["logit_scale"] = params["logit_scale"].replace(jnp.asarray(5.0, jnp.float32))
  mesh = mesh_lib.make_mesh("1")
  shardings = step_lib.state_shardings(params, run.tx, run.is_trainable, mesh)
  state = step_lib.create_state(params, run.tx, run.is_trainable, 0, shardings)
  fn = step_lib.jit_step(step_lib.make_step_fn(run.encoder, run.objective, run.tx, run.is_trainable), shardings, mesh)
  state, metrics = fn(state, mesh_lib.global_batch(batch, mesh), None)
  assert float(metrics["temperature"]) == pytest.approx(100.0, rel=1e-5)
  after = float(state.params["logit_scale"][...])
  assert after <= bound + 1e-6
  state, _ = fn(state, mesh_lib.global_batch(batch, mesh), None)
  assert float(state.params["logit_scale"][...]) <= bound + 1e-6


def test_vision_tower_only_leaves_the_text_tower(case, devices):
  run, batch = case
  is_trainable = step_lib.trainable_filter("vision")
  trainable, frozen = step_lib.split_params(run.params, is_trainable)
  assert "vision" in trainable and "visual_projection" in trainable
  assert "text" in frozen and "logit_scale" in frozen and "text" not in trainable


class _NaNAt:
  """Poisons the images of the n-th batch (0-based)."""

  def __init__(self, n):
    self.n, self.count = n, 0

  def __call__(self, batch):
    self.count += 1
    if self.count - 1 == self.n:
      batch = dict(batch, images=np.full_like(batch["images"], np.nan))
    return batch


def test_loss_falls_then_nan_stops_the_run_keeping_the_last_good_checkpoint(root, devices):
  # 16 training images: every batch is the whole split (reshuffled), so 60 steps fit it well.
  config = micro_config(root, train={"steps": 80, "log_every": 10, "checkpoint_every": 20, "eval_every": 40},
                        optimizer={"name": "adam", "learning_rate": 1e-3}, data={"build_train": 16},
                        model={"overrides": LEARNER},
                        eval={"attacks": ("pgd",), "steps": 1, "max_images": 8, "batch_size": 8})
  model, tokenizer = runs.model_from_config(config)
  builder = setup.data_builder(config, 16, log=lambda _: None)
  from mat_jax.data import corpora, pipeline
  dataset = pipeline.training_pipeline(corpora.data_source(builder, "train"), tokenizer, 16)
  workdir = root / "falls"
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 65 .*last good checkpoint \(step 60\)"):
    loop.train(config, workdir, mesh_spec="8", log=lambda _: None, progress=False, evaluate=True,
               data_iterator=iter(dataset.map(_NaNAt(65))), model=model, tokenizer=tokenizer)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  lines = [r for r in records if "train/loss" in r]
  evaluations = [r for r in records if "eval/clean/tr@1" in r]
  # The periodic evaluation at step 40: clean retrieval and PGD on the 8 test images.
  assert [r["step"] for r in evaluations] == [40]
  assert evaluations[0]["eval/pgd@2/tr@1"] <= evaluations[0]["eval/clean/tr@1"] + 1e-6
  losses = [r["train/loss"] for r in lines]
  assert len(losses) == 6  # logged every 10 steps up to step 60; the NaN is found at step 70
  assert losses[-1] < losses[0] - 1.0, losses  # from ln 16 = 2.77 at the start
  accuracy = [r["train/i2t_acc"] for r in lines]
  assert accuracy[-1] > 0.3 > accuracy[0]  # in-batch retrieval well above chance (1/16)
  assert {"train/images_per_s", "train/steps_per_s", "train/learning_rate"} <= set(lines[0])
  assert (workdir / "tensorboard").is_dir() and (workdir / "config.json").exists()
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 60  # the NaN step was never saved
  # No exported model: restore_model reads the newest checkpoint, whose parameters are finite.
  restored, restored_tokenizer = runs.restore_model(workdir)
  from flax import nnx
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(restored)))
  assert restored.config.vision.patch_size == 4 and restored_tokenizer.vocab_size == tokenizer.vocab_size


def test_a_failing_final_evaluation_keeps_the_exported_model(root, devices, monkeypatch):
  def broken(self, params):
    raise RuntimeError("evaluation broke")

  monkeypatch.setattr(loop.Evaluator, "__call__", broken)
  workdir = root / "export_first"
  with pytest.raises(RuntimeError, match="evaluation broke"):
    loop.train(micro_config(root, train={"steps": 2}), workdir, mesh_spec="1", log=lambda _: None,
               progress=False, evaluate=True)
  assert (workdir / "model" / "config.json").exists() and (workdir / "model" / "model.safetensors").exists()


def test_resume_logs_each_step_once(root, devices):
  config = micro_config(root, train={"steps": 4, "log_every": 1, "checkpoint_every": 2})
  workdir = root / "relog"
  loop.train(config, workdir, mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  # As if killed after logging steps 3 and 4 but before checkpoint 4 was complete.
  import shutil
  shutil.rmtree(workdir / "checkpoints" / "4")
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "train/lo')  # a torn last line
  loop.train(config, workdir, mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]


def test_a_periodic_evaluation_lost_to_a_kill_is_made_on_resume(root, devices):
  # The evaluation of step 2 runs after checkpoint 2 is saved: killed during it, the run resumes at step 2
  # and made it never. A resumed run makes the evaluation of its starting step, logged once.
  config = micro_config(root, train={"steps": 4, "log_every": 2, "checkpoint_every": 2, "eval_every": 2},
                        eval={"attacks": (), "max_images": 8, "batch_size": 8})
  workdir = root / "lost_evaluation"
  loop.train(config, workdir, mesh_spec="1", log=lambda _: None, progress=False, evaluate=True)
  import shutil
  shutil.rmtree(workdir / "checkpoints" / "4")
  shutil.rmtree(workdir / "model")
  metrics = workdir / "metrics.jsonl"
  lines = metrics.read_text().splitlines()
  metrics.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 2
                             and not any(k.startswith("eval/") for k in json.loads(line))))
  loop.train(config, workdir, mesh_spec="1", log=lambda _: None, progress=False, evaluate=True)
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [r["step"] for r in records if "eval/clean/tr@1" in r] == [2, 4]
  # Resumed once more at step 2 with its evaluation logged: it is made again, and still logged once.
  shutil.rmtree(workdir / "checkpoints" / "4")
  shutil.rmtree(workdir / "model")
  loop.train(config, workdir, mesh_spec="1", log=lambda _: None, progress=False, evaluate=True)
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [r["step"] for r in records if "eval/clean/tr@1" in r] == [2, 4]
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4]


def _logged_losses(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_a_logged_line_averages_every_step_since_the_last_one(root, devices):
  """A checkpoint's step is logged too (a run resumed from it logs what the uninterrupted run logs)."""
  each = root / "log_each"
  loop.train(micro_config(root, train={"steps": 4, "log_every": 1, "checkpoint_every": 4}), each, mesh_spec="1",
             log=lambda _: None, progress=False, evaluate=False)
  every_four = root / "log_every_four"
  loop.train(micro_config(root, train={"steps": 4, "log_every": 4, "checkpoint_every": 3}), every_four,
             mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  per_step = _logged_losses(each)
  assert _logged_losses(every_four) == {3: pytest.approx(np.mean([per_step[s] for s in (1, 2, 3)]), rel=1e-6),
                                        4: pytest.approx(per_step[4], rel=1e-6)}
  every_two = root / "log_every_two"
  loop.train(micro_config(root, train={"steps": 4, "log_every": 2, "checkpoint_every": 4}), every_two,
             mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  assert _logged_losses(every_two) == {2: pytest.approx(np.mean([per_step[s] for s in (1, 2)]), rel=1e-6),
                                       4: pytest.approx(np.mean([per_step[s] for s in (3, 4)]), rel=1e-6)}


def test_a_refused_run_leaves_the_workdir_config_alone(root, devices):
  workdir = root / "refused"
  loop.train(micro_config(root, train={"steps": 2, "checkpoint_every": 2}), workdir, mesh_spec="1",
             log=lambda _: None, progress=False, evaluate=False)
  before = (workdir / "config.json").read_text()
  with pytest.raises(config_lib.ConfigError, match="already holds a checkpoint at step 2"):
    loop.train(micro_config(root, train={"steps": 1, "checkpoint_every": 1}), workdir, mesh_spec="1",
               log=lambda _: None, progress=False, evaluate=False)
  assert (workdir / "config.json").read_text() == before  # what restores the run's model reads


@pytest.mark.parametrize("when, message", [
    ("step", "interrupted at step 3; last checkpoint 3"),
    ("save", "interrupted at step 3; last checkpoint 3"),  # after the step's stop flag was read
    ("wait", "interrupted after the last step; last checkpoint 3 .* to export and evaluate"),
])
def test_a_signal_during_the_last_step_stops_the_run_after_its_checkpoint(root, devices, monkeypatch, when, message):
  import signal

  from mat_jax import checkpoint as checkpoint_lib
  from mat_jax import errors

  stops, make_train_step, calls = [], loop.make_train_step, []

  class RecordedStop(loop._StopSignals):
    def __init__(self):
      super().__init__()
      stops.append(self)

  def signalled_make_train_step(run):
    step_fn, reference = make_train_step(run)

    def step(state, batch, ref):
      calls.append(1)
      if when == "step" and len(calls) == 3:  # SIGTERM arrives while the last step runs (as the handler sees it)
        stops[0]._handle(signal.SIGTERM, None)
      return step_fn(state, batch, ref)
    return step, reference

  closed, close = [], loop.MetricWriter.close

  def recorded_close(writer):
    closed.append(writer)
    close(writer)

  inject_fault, wait = loop._inject_fault, checkpoint_lib.Checkpointer.wait

  def signalled_after_the_save(done):
    if when == "save" and done == 3:
      stops[0]._handle(signal.SIGTERM, None)
    inject_fault(done)

  def signalled_wait(ckpt):
    if when == "wait":  # the loop's last wait: the final checkpoint being written out
      stops[0]._handle(signal.SIGTERM, None)
    wait(ckpt)

  monkeypatch.setattr(loop, "_StopSignals", RecordedStop)
  monkeypatch.setattr(loop, "make_train_step", signalled_make_train_step)
  monkeypatch.setattr(loop, "_inject_fault", signalled_after_the_save)
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "wait", signalled_wait)
  monkeypatch.setattr(loop.MetricWriter, "close", recorded_close)
  workdir = root / f"signal_last_step_{when}"
  with pytest.raises(errors.Interrupted, match=message) as stopped:
    loop.train(micro_config(root, train={"steps": 3, "checkpoint_every": 10}), workdir, mesh_spec="1",
               log=lambda _: None, progress=False, evaluate=False)
  assert stopped.value.signum == signal.SIGTERM
  assert (workdir / "checkpoints" / "3").is_dir() and not (workdir / "model").exists()
  assert closed and closed[0].jsonl.closed  # metrics.jsonl and TensorBoard are not left open


def test_truncate_metrics_keeps_lines_up_to_the_resume_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 10, "a": 1}\n{"step": 20, "a": 2}\n{"step": 20, "eval/b": 3}\n{"step": 30, "a": 4}\n'
                  '{"step": 40, "a"')
  loop.truncate_metrics(path, 20)
  assert path.read_text() == '{"step": 10, "a": 1}\n{"step": 20, "a": 2}\n{"step": 20, "eval/b": 3}\n'
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left
  loop.truncate_metrics(tmp_path / "absent.jsonl", 5)  # a fresh workdir: nothing to do
  # A finished run evaluated again: its evaluation lines at the final step go, its train line stays.
  loop.truncate_metrics(path, 20, drop_evaluation_at_step=True)
  assert path.read_text() == '{"step": 10, "a": 1}\n{"step": 20, "a": 2}\n'


def test_missing_split_is_a_config_error(root):
  config = micro_config(root, data={"split": "training"}, eval={"split": "tset"})
  builder = setup.data_builder(config, 16, log=lambda _: None)
  with pytest.raises(config_lib.ConfigError, match=r"data.split='training': .* it has \['test', 'train', 'val'\]"):
    setup.train_iterator(config, builder, None, 16, process_index=0, process_count=1)
  with pytest.raises(config_lib.ConfigError, match="eval.split='tset'"):
    setup.eval_set(config, builder, None)
  # A run that evaluates checks its eval.split before it trains, not at its first evaluation.
  steps = []
  with pytest.raises(config_lib.ConfigError, match="eval.split='tset'"):
    loop.train(micro_config(root, eval={"split": "tset"}), root / "mistyped_eval_split", mesh_spec="1",
               log=steps.append, progress=False, evaluate=True)
  assert not any((root / "mistyped_eval_split" / "checkpoints").iterdir())  # no step trained


def test_a_shapes_split_built_empty_names_its_size_key():
  from types import SimpleNamespace

  def builder(name):
    return SimpleNamespace(info=SimpleNamespace(name=name, full_name=f"{name}/48px/1.1.0",
                                                splits={"train": None, "val": None}))

  with pytest.raises(config_lib.ConfigError, match=r"eval.split='test': .* it has \['train', 'val'\] \(the shapes "
                                                   r"world leaves out a split built with no scenes: set "
                                                   r"data.build_test > 0\)"):
    setup.check_split(builder("shapes_world"), "test", "eval.split")
  with pytest.raises(config_lib.ConfigError, match=r"it has \['train', 'val'\]$"):  # a built corpus: no hint
    setup.check_split(builder("flickr30k"), "test", "eval.split")


def test_a_data_image_size_other_than_the_models_is_refused_for_every_dataset(monkeypatch):
  """A corpus is read at the model's input size, so a data.image_size saying another (which the run's
  config.json and fingerprint record) is refused, as for the shapes world (before it is built); a corpus
  not built at the model's size is named first."""
  from mat_jax.data import corpora

  opened = []
  monkeypatch.setattr(corpora, "dataset_builder", lambda name, size, *a, **k: opened.append((name, size)))
  for name, built in (("shapes", "built at it on first use"), ("flickr30k", "--image-size 224")):
    config = config_lib.build({"data": {"name": name, "image_size": 384}})
    with pytest.raises(config_lib.ConfigError, match=rf"the model takes 224px images but data.image_size is 384; "
                                                     rf"set data.image_size=224 \(.*{built}"):
      setup.data_builder(config, 224)
  assert opened == [("flickr30k", 224)]  # the shapes world was not built


def test_demo_table_puts_the_models_side_by_side():
  from mat_jax.training import demo

  def result(clean, pgd):
    def recall(r):
      return {"tr@1": r, "ir@1": r / 2}
    return {"clean": recall(clean), "attacks": {"pgd": {"2": {"recall": recall(pgd)}},
                                                "bert": {"text": {"recall": recall(pgd + 1)}}}}

  table = demo.side_by_side({"TeCoA": result(60.0, 40.0), "MAT": result(62.0, 55.0)}).splitlines()
  assert table[0].split() == ["attack", "eps(/255)", "TeCoA", "TR@1", "TeCoA", "IR@1", "MAT", "TR@1", "MAT", "IR@1"]
  assert table[2].split() == ["clean", "-", "60.0", "30.0", "62.0", "31.0"]
  # Under attack each cell also shows the change from that model's clean recall.
  assert table[3].split() == ["pgd", "2", "40.0", "(-20.0)", "20.0", "(-10.0)", "55.0", "(-7.0)", "27.5", "(-3.5)"]
  assert table[4].split() == ["bert", "text", "41.0", "(-19.0)", "20.5", "(-9.5)", "56.0", "(-6.0)", "28.0", "(-3.0)"]


def test_the_demos_runs_without_candidates_compile_while_the_masked_lm_trains(monkeypatch, tmp_path):
  """The fine-tunings whose batches need no masked LM start compiling before it is resolved (trained on first
  use), the one that reads candidates after it; the first fine-tuning starts once all are under way."""
  from mat_jax.training import demo

  events = []

  class Started:
    def wait(self):
      pass

  class Stop(Exception):
    pass

  def compile_run_ahead(config, **kwargs):
    events.append(f"compile {config.name}")
    return Started()

  def evaluation_inputs(*args):
    events.append("masked LM and the evaluation's inputs")
    return None, None

  def train(config, *args, **kwargs):
    events.append(f"train {config.name}")
    raise Stop

  monkeypatch.setattr(demo.loop, "run_mesh", lambda *args: None)
  monkeypatch.setattr(demo.setup, "data_builder", lambda *args, **kwargs: None)
  monkeypatch.setattr(demo.loop, "ensure_cached_run", lambda *args, **kwargs: None)
  monkeypatch.setattr(demo.ahead, "enabled", lambda: True)
  monkeypatch.setattr(demo.ahead, "later_runs_enabled", lambda: True)
  monkeypatch.setattr(demo.runs, "model_from_config", lambda config: (None, None))
  monkeypatch.setattr(demo.loop, "compile_run_ahead", compile_run_ahead)
  monkeypatch.setattr(demo, "_evaluation_inputs", evaluation_inputs)
  monkeypatch.setattr(demo, "_evaluation_lowering", lambda *args: lambda: [])
  monkeypatch.setattr(demo.loop, "train", train)
  with pytest.raises(Stop):
    demo.main(tmp_path, log=lambda _: None, progress=False)
  assert events == ["compile shapes_clean_ft", "compile shapes_tecoa", "masked LM and the evaluation's inputs",
                    "compile shapes_mat", "train shapes_clean_ft"]


def test_logged_metrics_are_fetched_after_the_next_step_is_dispatched(root, devices, monkeypatch):
  """A log step's metrics are read one step late (the device keeps a step queued); a checkpoint step's
  at once (its state must be known finite before the save)."""
  events = []
  make_train_step = loop.make_train_step

  def recording_make_train_step(run):
    step_fn, reference = make_train_step(run)

    def step(state, batch, ref):
      events.append("step")
      return step_fn(state, batch, ref)
    return step, reference

  device_get = jax.device_get

  def recording_device_get(x):
    events.append("fetch")
    return device_get(x)

  monkeypatch.setattr(loop, "make_train_step", recording_make_train_step)
  monkeypatch.setattr(loop.jax, "device_get", recording_device_get)
  config = micro_config(root, train={"steps": 5, "log_every": 2, "checkpoint_every": 5})
  workdir = root / "overlap"
  loop.train(config, workdir, mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  monkeypatch.undo()
  # Steps 1, 2 (logged: deferred), 3, the fetch of 2, 4 (deferred), 5, the fetch of 4, then step 5's own
  # fetch (metrics and the finite flag together) before its checkpoint.
  train_loop = events[events.index("step"):][:8]
  assert train_loop == ["step", "step", "step", "fetch", "step", "step", "fetch", "fetch"], events
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == [2, 4, 5]


def test_the_host_runs_at_most_two_steps_ahead_of_the_device(root, devices, monkeypatch):
  """Between metric fetches the loop waits for the step before last after each dispatch, so queued
  steps (and their batches in device memory) stay bounded however long `log_every` is."""
  events, outputs = [], []
  make_train_step = loop.make_train_step

  def recording_make_train_step(run):
    step_fn, reference = make_train_step(run)

    def step(state, batch, ref):
      state, metrics = step_fn(state, batch, ref)
      outputs.append(metrics)
      events.append(f"step {len(outputs)}")
      return state, metrics
    return step, reference

  block_until_ready = jax.block_until_ready

  def recording_block_until_ready(x):
    events.extend(f"wait {i + 1}" for i, out in enumerate(outputs) if out is x)
    return block_until_ready(x)

  monkeypatch.setattr(loop, "make_train_step", recording_make_train_step)
  monkeypatch.setattr(loop.jax, "block_until_ready", recording_block_until_ready)
  config = micro_config(root, train={"steps": 5, "log_every": 100, "checkpoint_every": 100})
  loop.train(config, root / "in_flight", mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  monkeypatch.undo()
  assert events == ["step 1", "step 2", "step 3", "wait 1", "step 4", "wait 2", "step 5", "wait 3"], events



@pytest.mark.parametrize("slow, bound", [("batches", "input-bound"), ("device", "device-bound"),
                                         ("dispatch", "dispatch-bound")])
def test_a_run_says_where_its_steps_time_went(root, devices, monkeypatch, slow, bound):
  """After its first step a run's wall time is split by what its thread waited for: a pipeline slower than
  the device shows as time waiting for batches, a slower device as time waiting for steps in flight, a
  host slow to launch the steps as their dispatch."""
  delay = 0.2
  if slow == "batches":
    next_batch = loop._next_batch
    def slow_next_batch(*args):
      time.sleep(delay)
      return next_batch(*args)
    monkeypatch.setattr(loop, "_next_batch", slow_next_batch)
  elif slow == "dispatch":
    make_train_step = loop.make_train_step
    def slow_make_train_step(run):
      step_fn, reference = make_train_step(run)
      def step(*args):
        time.sleep(delay)
        return step_fn(*args)
      return step, reference
    monkeypatch.setattr(loop, "make_train_step", slow_make_train_step)
  else:
    block_until_ready = jax.block_until_ready
    def slow_block_until_ready(x):
      time.sleep(delay)
      return block_until_ready(x)
    monkeypatch.setattr(loop.jax, "block_until_ready", slow_block_until_ready)
  lines = []
  config = micro_config(root, train={"steps": 6, "log_every": 100, "checkpoint_every": 100})
  result = loop.train(config, root / f"split_{slow}", mesh_spec="1", log=lines.append, progress=False,
                      evaluate=False)
  monkeypatch.undo()
  split = result.time_split
  # Steps 2-6: five batches and dispatches; the host waits for steps 1-4 once they are two behind, from step 3.
  assert split.steps == 5
  assert split.seconds[slow] >= delay * (4 if slow == "device" else 5)
  for other in {"batches", "device", "dispatch"} - {slow}:
    assert split.seconds[other] < split.seconds[slow] / 2, (other, split.seconds)
  assert sum(split.seconds.values()) + split.rest == pytest.approx(split.total)
  line = next(line for line in lines if line.startswith("steps 2-6 took"))
  assert bound in line, line


def _programs_obtained_in_first_step(config, workdir, monkeypatch):
  """The JAX events of obtaining a program (XLA compiling one, the persistent cache loading one) raised while
  the run's first step call runs, on any thread (a step's first call compiles its programs on threads of
  their own)."""
  from jax import monitoring

  events, inside = [], {"first_call": False}

  def record(event, *args, **kwargs):
    if inside["first_call"] and event in ("/jax/core/compile/backend_compile_duration",
                                                          "/jax/compilation_cache/cache_hits"):
      events.append(event)

  monitoring.register_event_duration_secs_listener(record)
  monitoring.register_event_listener(record)
  make_train_step, calls = loop.make_train_step, []

  def recording_make_train_step(run):
    step_fn, reference = make_train_step(run)

    class FirstCallRecorded:
      def compile(self, *args):
        return step_fn.compile(*args)

      def __call__(self, *args):
        calls.append(1)
        inside["first_call"] = len(calls) == 1
        try:
          return step_fn(*args)
        finally:
          inside["first_call"] = False
    return FirstCallRecorded(), reference

  monkeypatch.setattr(loop, "make_train_step", recording_make_train_step)
  try:
    loop.train(config, workdir, mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  finally:
    monkeypatch.undo()
    monitoring.unregister_event_duration_listener(record)
    monitoring.unregister_event_listener(record)
  assert calls
  return events


@pytest.mark.parametrize("objective,setting", [("contrastive", "1"), ("contrastive", "0"),
                                               pytest.param("mat", "1", marks=pytest.mark.slow),
                                               pytest.param("mat", "0", marks=pytest.mark.slow)])
def test_the_step_compiled_ahead_is_the_program_the_first_step_runs(root, devices, monkeypatch, objective,
                                                                      setting):
  """The step compiles on a thread from the state's and the first batch's shapes while the pipeline starts
  (MAT_JAX_COMPILE_AHEAD, on by default): its first call then neither compiles nor loads a program. Off,
  the first call obtains it (so the check can fail), compiling or, after the run before, loading it."""
  monkeypatch.setenv("MAT_JAX_COMPILE_AHEAD", setting)
  sections = {"train": {"steps": 2, "log_every": 2, "checkpoint_every": 2}}
  if objective == "mat":  # batches with text-attack candidates: the transform's stand-in shapes them
    sections.update(objective={"name": "mat", "steps": 1},
                    text_attack={"source": "paraphrase", "top_k": 4, "max_targets": 4})
  events = _programs_obtained_in_first_step(micro_config(root, **sections), root / f"ahead_{objective}_{setting}",
                                            monkeypatch)
  assert (events == []) == (setting != "0"), events


class ReadsRecorded:
  """A data source that leaves a file in `directory` once it is read outside the thread that made it (a
  pipeline's reader thread or worker process)."""

  def __init__(self, source, directory):
    self.source, self.directory = source, directory
    self.maker = (os.getpid(), threading.get_ident())

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    if (os.getpid(), threading.get_ident()) != self.maker:
      (self.directory / "read").touch()
    return self.source[index]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_pipeline_reads_while_the_step_compiles_and_stops_with_the_run(root, devices, monkeypatch, tmp_path,
                                                                           workers):
  """The run's pipeline starts reading (its worker processes, its first batches) once the run's position is
  known, not at the first step: while the step's compilation is waited for, a record has been read by the
  pipeline (not by the first batch made for the compilation, in the run's own thread). When the run ends
  its pipeline stops: no reading thread nor worker process is left behind."""
  from mat_jax.training import ahead

  split_source = setup._split_source
  monkeypatch.setattr(setup, "_split_source", lambda *args: ReadsRecorded(split_source(*args), tmp_path))
  waited_after_a_read = []
  wait = ahead.Compilation.wait

  def recorded_wait(self):
    deadline = time.monotonic() + 120
    while not (tmp_path / "read").exists() and time.monotonic() < deadline:
      time.sleep(0.01)
    waited_after_a_read.append((tmp_path / "read").exists())
    wait(self)

  monkeypatch.setattr(ahead.Compilation, "wait", recorded_wait)
  made = []  # held here, so that only the run's closing can stop its pipeline (not the garbage collector)
  train_iterator = setup.train_iterator
  monkeypatch.setattr(setup, "train_iterator", lambda *args, **kwargs: made.append(
      train_iterator(*args, **kwargs)) or made[-1])
  threads, processes = set(threading.enumerate()), _child_processes()
  config = micro_config(root, data={"worker_count": workers}, train={"steps": 2, "checkpoint_every": 2})
  lines = []
  loop.train(config, root / f"reads_early_{workers}", mesh_spec="1", log=lines.append, progress=False,
             evaluate=False)
  assert waited_after_a_read == [True] and len(made) == 1
  # The run says where its start-up went, once.
  (startup,) = [line for line in lines if line.startswith("first step")]
  total, compiling, first_batch, first_call = map(float, re.fullmatch(
      r"first step ([\d.]+) s after the run's start: waited ([\d.]+) s for the step's compilation ahead, "
      r"([\d.]+) s for the first batch; the first call took ([\d.]+) s", startup).groups())
  assert compiling + first_batch + first_call <= total + 0.2
  assert _pipeline_threads_left(threads) == []
  assert [command for pid, command in _child_processes().items() if pid not in processes] == []


def test_a_run_that_fails_before_its_first_step_stops_its_pipeline(root, devices, monkeypatch):
  made = []
  train_iterator = setup.train_iterator
  monkeypatch.setattr(setup, "train_iterator", lambda *args, **kwargs: made.append(
      train_iterator(*args, **kwargs)) or made[-1])

  def no_state(*args, **kwargs):
    raise MemoryError("no room for the state")

  monkeypatch.setattr(loop.step_lib, "create_state", no_state)  # after the pipeline has started reading
  threads = set(threading.enumerate())
  config = micro_config(root, train={"steps": 2, "checkpoint_every": 2})
  with pytest.raises(MemoryError, match="no room"):
    loop.train(config, root / "fails_early", mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  assert len(made) == 1
  assert _pipeline_threads_left(threads) == []


def test_the_runs_batches_reach_the_devices_in_the_pipelines_thread(root, devices, monkeypatch):
  """Each batch's host-to-device copy is the pipeline's last stage (`mesh.OnDevices`), made in its prefetch
  thread: the training loop's thread dispatches steps on batches already on the devices."""
  on_main_thread = []
  make = jax.make_array_from_process_local_data

  def recorded(*args, **kwargs):
    on_main_thread.append(threading.current_thread() is threading.main_thread())
    return make(*args, **kwargs)

  monkeypatch.setattr(jax, "make_array_from_process_local_data", recorded)
  config = micro_config(root, train={"steps": 3, "checkpoint_every": 3})
  loop.train(config, root / "on_devices", mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  assert on_main_thread and not any(on_main_thread), on_main_thread


def test_a_finished_run_leaves_no_batch_of_its_worker_processes_behind(root, devices):
  """A run with worker processes gets its batches in shared memory. When it returns, its closed pipeline's
  last batches are freed (the run's reference cycles collected), not left to the collector's next full
  pass, which a process training one run after another would wait long for."""
  import gc

  from grain._src.python.ipc.shared_memory_array import SharedMemoryArray  # Grain's batches from its workers

  config = micro_config(root, data={"worker_count": 2}, train={"steps": 2, "checkpoint_every": 2})
  loop.train(config, root / "batches_freed", mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  assert [a.shape for a in gc.get_objects() if issubclass(type(a), SharedMemoryArray)] == []


def test_a_worker_process_that_dies_is_a_clear_error(root, devices, monkeypatch):
  import helpers

  split_source = setup._split_source
  monkeypatch.setattr(setup, "_split_source", lambda *args: helpers.DiesInWorkers(split_source(*args)))
  config = micro_config(root, data={"worker_count": 2}, train={"steps": 2, "checkpoint_every": 2})
  with pytest.raises(pipeline.WorkerDiedError, match=r"worker process of the input pipeline ended abruptly before "
                     r"step 1 .*last checkpoint: none yet. Rerun the same command to resume; data.worker_count=0 "
                     r"reads in this process instead"):
    loop.train(config, root / "worker_dies", mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)


def _pipeline_threads_left(before: set) -> list[str]:
  """Grain's threads started since `before` still running after a few seconds (a closed pipeline's reader
  threads end once their current read is done)."""
  started = [t for t in threading.enumerate() if t.name.startswith("grain") and t not in before]
  for thread in started:
    thread.join(timeout=10)
  return [t.name for t in started if t.is_alive()]


def _child_processes() -> dict[int, str]:
  """This process's children (of all its threads) but multiprocessing's resource tracker, by pid."""
  children = {}
  for task in os.listdir(f"/proc/{os.getpid()}/task"):
    try:
      pids = open(f"/proc/{os.getpid()}/task/{task}/children").read().split()
    except OSError:  # the thread has ended
      continue
    for pid in map(int, pids):
      try:
        command = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
      except OSError:  # the process has ended
        continue
      if "resource_tracker" not in command:
        children[pid] = command
  return children


def test_a_later_runs_step_compiled_ahead_reaches_it_through_the_cache(root, devices, monkeypatch):
  """`loop.compile_run_ahead` (the demo's later fine-tunings) compiles a run's step before the run starts;
  the run's own compilation ahead waits for it, then loads the executable from the persistent cache
  instead of compiling it a second time."""
  from jax import monitoring

  events = []

  def record(event, *args, **kwargs):
    thread = threading.current_thread()
    if thread.name.startswith("mat_jax compile ahead") and event in (
        "/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_hits"):
      events.append((thread.ident, event))

  # Each compilation ahead compiles its step's programs on its own thread, one after the other (not on a
  # pool's threads, which compilations still running from other tests may share), so that every event
  # tells whose it is.
  monkeypatch.setattr(precompile, "compile_all", functools.partial(precompile.compile_all, workers=1))
  # A learning rate no other test uses: step programs the session's cache cannot hold yet.
  config = micro_config(root, optimizer={"learning_rate": 0.375}, train={"steps": 2, "checkpoint_every": 2})
  monitoring.register_event_duration_secs_listener(record)
  monitoring.register_event_listener(record)
  try:
    later = loop.compile_run_ahead(config, mesh_spec="1", log=lambda _: None)
    loop.train(config, root / "later", mesh_spec="1", log=lambda _: None, progress=False, evaluate=False)
  finally:
    monitoring.unregister_event_duration_listener(record)
    monitoring.unregister_event_listener(record)
  assert later.done() and later.error is None
  ahead_of_run = [event for ident, event in events if ident == later._thread.ident]
  own = [event for ident, event in events if ident != later._thread.ident]
  # The clean step's two programs (the gradient's and the optimizer's) compiled, not found; then loaded.
  assert ahead_of_run == ["/jax/core/compile/backend_compile_duration"] * 2, events
  assert own.count("/jax/compilation_cache/cache_hits") == 2, events


def test_an_unknown_compile_ahead_setting_names_the_choices(monkeypatch, capsys):
  from mat_jax import train as train_cli
  from mat_jax.training import ahead

  for value, expected in (("", True), ("ON", True), ("1", True), ("off", False), ("0", False)):
    monkeypatch.setenv("MAT_JAX_COMPILE_AHEAD", value)
    assert ahead.enabled() == expected
  monkeypatch.setenv("MAT_JAX_COMPILE_AHEAD", "sometimes")
  with pytest.raises(config_lib.ConfigError, match=r"COMPILE_AHEAD='sometimes': use 1 \(on, the default\) or 0"):
    ahead.enabled()
  assert train_cli.main([]) != 0  # the command line stops before any work, naming the variable
  assert "MAT_JAX_COMPILE_AHEAD" in capsys.readouterr().err

def _tensorboard_events(directory):
  """Every Event of the TFRecord event files in `directory` (length, crc, record, crc)."""
  import struct

  from tensorboardX.proto import event_pb2

  events = []
  for path in sorted(directory.iterdir()):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[at + 12:at + 12 + length])
      events.append(event)
      at += 12 + length + 4
  return events


def test_a_resumed_run_hides_tensorboards_points_after_its_checkpoint(tmp_path):
  # The jsonl drops the lines a dead run logged after its last checkpoint; TensorBoard must hide them too,
  # or it shows those steps twice.
  loop.MetricWriter(tmp_path, resume_step=None).close()
  writer = loop.MetricWriter(tmp_path, resume_step=40)
  writer.write(41, {"loss": 1.0}, "train/")
  writer.close()
  starts = [e.step for e in _tensorboard_events(tmp_path / "tensorboard") if e.HasField("session_log")
            and e.session_log.status == e.session_log.START]
  assert starts == [41]  # points at steps >= 41 of earlier files are purged; the checkpoint's own stay


def _micro_experiment(root, monkeypatch, directory: str, name: str) -> None:
  """experiments/<name>.py in a fresh experiments directory: a 1-step micro run, for "cache:<name>"."""
  experiments = root / directory
  experiments.mkdir()
  raw = micro_config(root, train={"steps": 1, "checkpoint_every": 1}).to_dict()
  (experiments / f"{name}.py").write_text(f"def get_config(arg=None):\n  return {raw!r}\n")
  monkeypatch.setattr(runs, "EXPERIMENTS_DIR", experiments)


def test_an_unfinished_run_from_a_cached_model_is_read_back(root, monkeypatch, devices, capsys):
  # Evaluating a run that is still training (no exported model) reads its newest checkpoint under the
  # fingerprint the training wrote, which names the cached starting run; the reader once left that out
  # and refused the checkpoint as another run's.
  _micro_experiment(root, monkeypatch, "cached_for_reading", "cached_start")
  loop.ensure_cached_run("cached_start", log=lambda _: None, mesh_spec="1")
  config = micro_config(root, model={"source": "cache:cached_start", "overrides": ""},
                        train={"steps": 2, "checkpoint_every": 2, "export": False})
  workdir = root / "from_cached_start"
  loop.train(config, workdir, mesh_spec="1", log=lambda _: None, evaluate=False, progress=False)
  assert not runs.is_trained(workdir)
  capsys.readouterr()
  model, _ = runs.restore_model(workdir)
  assert model.config.vision.image_size == 16
  # The intermediate model is named as such: its numbers must not pass for the run's.
  assert f"note: {workdir} has no exported model" in capsys.readouterr().err


def test_a_missing_cached_run_trains_on_the_commands_mesh(root, monkeypatch, devices):
  # `--mesh` applies to the cached starting model too, and one that does not fit its batch fails before
  # anything trains, naming that run.
  _micro_experiment(root, monkeypatch, "cached_experiments", "cached_micro")
  run_dir = runs.cached_run_dir("cached_micro", runs.cached_experiment("cached_micro")[1])
  with pytest.raises(mesh_lib.MeshError, match=r"cache:cached_micro is not in the cache yet and trains on the same "
                                               r"mesh first .*: the global batch size 16 is not divisible"):
    loop.ensure_cached_run("cached_micro", log=lambda _: None, mesh_spec="3")
  assert not run_dir.exists()
  lines = []
  loop.ensure_cached_run("cached_micro", log=lines.append, mesh_spec="2")
  assert any("mesh data=2, fsdp=1" in line for line in lines) and runs.is_trained(run_dir)


def test_an_unexported_run_gets_the_cached_model_it_started_from(tmp_path, monkeypatch):
  """Read from its checkpoint, an unexported run is built on its starting model: evaluating it trains that
  cached model first, as evaluating the cached model itself does (it used to fail, saying the command lines
  do this on their own)."""
  import json

  from mat_jax import checkpoint as checkpoint_lib

  asked = []
  monkeypatch.setattr(loop, "ensure_cached_run", lambda name, **kw: asked.append(name))
  run = tmp_path / "stopped_early"
  (run / "checkpoints").mkdir(parents=True)
  (run / checkpoint_lib.CONFIG_FILE).write_text(json.dumps({"model": {"source": "cache:shapes_clip"}}))
  loop.ensure_cached_source(str(run))
  assert asked == ["shapes_clip"]
  (run / checkpoint_lib.MODEL_DIR).mkdir()
  (run / checkpoint_lib.MODEL_DIR / "config.json").write_text("{}")  # exported: its own weights suffice
  loop.ensure_cached_source(str(run))
  assert asked == ["shapes_clip"]


def test_cached_models_without_the_experiment_files_name_the_install(tmp_path, monkeypatch):
  """A non-editable install (a wheel) has the package but not experiments/: say so, not "no experiment"."""
  from mat_jax import runs

  monkeypatch.setattr(runs, "EXPERIMENTS_DIR", tmp_path / "site-packages" / "experiments")
  with pytest.raises(config_lib.ConfigError, match=r"the experiment files are not at .*pip install -e \."):
    runs.cached_experiment("shapes_clip")
  monkeypatch.setattr(runs, "EXPERIMENTS_DIR", tmp_path)
  with pytest.raises(config_lib.ConfigError, match="there is no experiment"):
    runs.cached_experiment("shapes_clip")


def test_a_runs_evaluation_reports_label_flips_in_percent_as_its_recalls():
  results = {"clean": {"tr@1": 50.0}, "attacks": {
      "bert": {"text": {"recall": {"tr@1": 25.0}, "label_flip_share": 0.8,
                        "recall_meaning_preserving": {"tr@1": 40.0}}},
      "pgd": {"2": {"recall": {"tr@1": 10.0}}}}}
  assert loop.flatten_results(results) == {"clean/tr@1": 50.0, "bert/tr@1": 25.0, "bert/label_flips_pct": 80.0,
                                           "bert/mp_tr@1": 40.0, "pgd@2/tr@1": 10.0}


@pytest.mark.parametrize("setting", ["1", "0"])
def test_the_evaluations_clean_scoring_is_compiled_ahead_beside_the_training(root, devices, monkeypatch, setting):
  """A run that evaluates compiles its clean scoring's programs (the encoders at the evaluation's batch
  shapes, the ranking) on a thread after its step's: the first evaluation then obtains no program. Off,
  it does (so the check can fail)."""
  from jax import monitoring

  monkeypatch.setenv("MAT_JAX_COMPILE_AHEAD", setting)
  events, inside, calls = [], threading.local(), []

  def record(event, *args, **kwargs):
    if getattr(inside, "evaluating", False) and event in ("/jax/core/compile/backend_compile_duration",
                                                           "/jax/compilation_cache/cache_hits"):
      events.append(event)

  call = loop.Evaluator.__call__

  def recorded_call(self, params):
    calls.append(1)
    inside.evaluating = len(calls) == 1
    try:
      return call(self, params)
    finally:
      inside.evaluating = False

  monkeypatch.setattr(loop.Evaluator, "__call__", recorded_call)
  # Eval batch sizes and test-set sizes no other test uses: programs the session's caches cannot hold yet.
  batch_size, images = (7, 13) if setting == "1" else (9, 11)
  config = micro_config(root, train={"steps": 2, "log_every": 2, "checkpoint_every": 2, "eval_every": 2},
                        eval={"attacks": (), "batch_size": batch_size, "max_images": images})
  monitoring.register_event_duration_secs_listener(record)
  monitoring.register_event_listener(record)
  try:
    result = loop.train(config, root / f"eval_ahead_{setting}", mesh_spec="1", log=lambda _: None, progress=False)
  finally:
    monitoring.unregister_event_duration_listener(record)
    monitoring.unregister_event_listener(record)
  assert calls and "clean/tr@1" in result.evaluation
  assert (events == []) == (setting != "0"), events


@pytest.mark.slow
def test_a_run_whose_pipeline_makes_candidates_compiles_no_evaluation_beside_it(root, devices, monkeypatch):
  """MAT's batches carry text-attack candidates, which the masked LM makes on the pipeline's thread: no
  third thread compiles beside those two (loop._train); the contrastive runs above do."""
  started = []
  monkeypatch.setattr(loop.Evaluator, "compile_ahead", lambda self, after: started.append(after))
  config = micro_config(root, train={"steps": 1, "log_every": 1, "checkpoint_every": 1, "eval_every": 1},
                        eval={"attacks": (), "max_images": 8}, objective={"name": "mat", "steps": 1},
                        text_attack={"source": "paraphrase", "top_k": 4, "max_targets": 4})
  result = loop.train(config, root / "mat_eval", mesh_spec="1", log=lambda _: None, progress=False)
  assert started == [] and "clean/tr@1" in result.evaluation
