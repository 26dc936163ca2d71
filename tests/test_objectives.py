"""Every defense as a train step: two steps on 8 simulated devices, a micro CLIP, a shapes-world batch
with text-attack candidates. MAT also against one device, and its attacks must raise the loss."""

import functools

import jax
import numpy as np
import pytest

from mat_jax import config as config_lib
from mat_jax import precompile
from mat_jax import runs
from mat_jax import mesh as mesh_lib
from mat_jax.training import inputs, loop, setup
from mat_jax.training import step as step_lib

from helpers import MICRO, compiled_programs

BATCH = 8
# Cheap attacks: one PGD step (MAVA/FARE inner loops run on every call of the loss).
OBJECTIVES = {
    "tecoa": ({"name": "tecoa", "steps": 1}, "vision", 1),
    "fare": ({"name": "fare", "steps": 1}, "vision", 1),
    "mmcoa": ({"name": "mmcoa", "steps": 1}, "all", 1),
    "mava": ({"name": "mava", "steps": 1, "neighbours": 2}, "vision", 2),
    # Beyond the paper: with both towers training, CMS must reach the text tower.
    "mava_all_towers": ({"name": "mava", "steps": 1, "neighbours": 2}, "all", 2),
}


def _config(root, objective, towers="all", k=1):
  return config_lib.build({
      "model": {"source": "tiny", "tokenizer": "shapes", "overrides": MICRO},
      "data": {"name": "shapes", "data_dir": str(root / "data"), "build_train": 32, "build_val": 8,
               "build_test": 8, "image_size": 16, "captions_per_image": k},
      "objective": objective,
      "train": {"batch_size": BATCH, "steps": 2, "towers": towers},
      "optimizer": {"name": "sgd", "momentum": 0.0, "learning_rate": 0.1},
      "schedule": {"name": "constant"},
      "text_attack": {"source": "paraphrase", "top_k": 4, "max_targets": 4},
  })


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("objectives")
  with pytest.MonkeyPatch.context() as patch:  # the module's cache (the shapes tokenizer), restored after it
    patch.setenv("MAT_JAX_CACHE_DIR", str(root / "cache"))
    config = _config(root, {"name": "matplus"}, k=2)
    model, tokenizer = runs.model_from_config(config)
    builder = setup.data_builder(config, 16, log=lambda _: None)
    attach = loop.candidate_transform(config, tokenizer)
    two = attach(next(setup.train_iterator(config, builder, tokenizer, BATCH, process_index=0,
                                           process_count=1)))
    # The same batch with each image's first caption only (per-caption arrays have K on axis 1).
    per_caption = {"captions", "input_ids", "attention_mask"} | {f"cand_{n}" for n in inputs.PER_CAPTION}
    one = {k: v[:, 0] if k in per_caption else v for k, v in two.items()}
    yield root, model, tokenizer, {1: one, 2: two}


def _steps(world, objective, towers, k, spec="8", count=2):
  root, model, tokenizer, batches = world
  run = loop.build_run(_config(root, objective, towers, k), root / "w", mesh_spec=spec, model=model,
                       tokenizer=tokenizer, log=lambda _: None)
  state = step_lib.create_state(run.params, run.tx, run.is_trainable, 0, run.shardings)
  reference = jax.device_put(run.params, run.shardings.params) if run.objective.needs_reference else None
  fn = step_lib.jit_step(step_lib.make_step_fn(run.encoder, run.objective, run.tx, run.is_trainable,
                                               run.schedule), run.shardings, run.mesh)
  history = []
  for _ in range(count):
    state, metrics = fn(state, mesh_lib.global_batch(batches[k], run.mesh), reference)
    history.append(jax.device_get(metrics))
  return run, fn, state, history


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_two_steps_on_8_devices(world, devices, name):
  objective, towers, k = OBJECTIVES[name]
  run, fn, state, history = _steps(world, objective, towers, k)
  assert fn.cache_size() == 1
  assert int(state.step) == 2 and int(state.bad_step) == -1
  assert all(np.isfinite(h["loss"]) for h in history)
  roots = {}
  for (path, new), (old_path, old) in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                                          jax.tree_util.tree_flatten_with_path(run.params)[0], strict=True):
    assert path == old_path
    key = path[0].key
    roots[key] = roots.get(key, False) or not np.array_equal(np.asarray(new), np.asarray(old))
  if towers == "vision":
    assert roots["vision"] and not roots["text"] and not roots["text_projection"]
  else:
    assert roots["vision"] and roots["text"]
  if name == "mmcoa":
    assert history[0]["text_changed"] > 0  # the lexicon attack found substitutions
  if name.startswith("mava"):
    assert {"cms", "vsse", "sca"} <= set(history[0])


def test_matplus_on_8_devices_matches_one_device_and_its_attacks_raise_the_loss(world, devices):
  # MAT+ : MAT on two captions per image (the multi-positive loss); MAT is the same code with one.
  # A large budget: at random init only a strong image attack makes the pairs clearly harder.
  objective = {"name": "matplus", "steps": 2, "eps": 16 / 255, "step_size": 8 / 255, "clean_weight": 1.0}
  run, fn, state8, history8 = _steps(world, objective, "all", 2, "8")
  _, _, state1, history1 = _steps(world, objective, "all", 2, "1")
  assert fn.cache_size() == 1
  for h in history8:
    # The adversarial pairs (1-word text attack, then 2-step PGD guided by it) are harder than clean ones.
    assert h["adv_i2t_loss"] + h["adv_t2i_loss"] > 2 * h["clean_loss"]
    assert h["text_changed"] > 0
  update8 = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in
                            zip(jax.tree.leaves(state8.params), jax.tree.leaves(run.params), strict=True)])
  update1 = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in
                            zip(jax.tree.leaves(state1.params), jax.tree.leaves(run.params), strict=True)])
  assert np.linalg.norm(update1) > 0
  assert np.linalg.norm(update8 - update1) <= 1e-5 * np.linalg.norm(update1)
  np.testing.assert_allclose([h["loss"] for h in history8], [h["loss"] for h in history1], rtol=1e-5)


def test_an_adversarial_step_is_its_parts_programs_compiled_together(world, devices, monkeypatch):
  """MAT's step runs its text attack, its image attack, its gradient and its optimizer update as four programs,
  which its first call compiles at once (one `compile_all` of all four; the calls then compile nothing), and
  computes what the objective's whole loss computes in one program. With an attack without a text stage of
  its own (TeCoA's) the step is three programs, and a clean objective's step the gradient's and the update's."""
  root, model, tokenizer, batches = world
  objective = {"name": "mat", "steps": 2, "eps": 16 / 255, "step_size": 8 / 255}
  run = loop.build_run(_config(root, objective), root / "two", mesh_spec="1", model=model, tokenizer=tokenizer,
                       log=lambda _: None)
  fn = step_lib.jit_step(step_lib.make_step_fn(run.encoder, run.objective, run.tx, run.is_trainable), run.shardings,
                         run.mesh)
  assert len(fn.programs) == 4
  state = step_lib.create_state(run.params, run.tx, run.is_trainable, 0, run.shardings)
  batch = mesh_lib.global_batch(batches[1], run.mesh)
  # What the step should compute: the objective's loss, attack included, as one program, at the step's key.
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  whole_loss, whole_metrics = jax.jit(lambda p, b, k: run.objective.loss(run.encoder, p, b, k))(state.params, batch,
                                                                                                 key)
  compile_all, compiled_together = precompile.compile_all, []

  def recording_compile_all(lowerings, **kwargs):
    lowerings = list(lowerings)  # the step's programs, lowered one after another
    compiled_together.append(len(lowerings))
    return compile_all(lowerings, **kwargs)

  monkeypatch.setattr(precompile, "compile_all", recording_compile_all)
  with compiled_programs() as first:
    state, metrics = fn(state, batch, None)
    jax.block_until_ready(state)
  assert compiled_together == [4], compiled_together
  assert sorted(first) == ["jit(apply)", "jit(attack)", "jit(gradient)", "jit(text_stage)"], first
  with compiled_programs() as compiled:
    state, _ = fn(state, batch, None)
    jax.block_until_ready(state)
  assert compiled == [] and compiled_together == [4] and fn.cache_size() == 1
  np.testing.assert_allclose(float(metrics["loss"]), float(whole_loss), rtol=1e-5)
  assert float(metrics["text_changed"]) == float(whole_metrics["text_changed"]) > 0
  assert int(state.step) == 2 and int(state.bad_step) == -1

  for name, programs in (("tecoa", 3), ("contrastive", 2)):
    other = loop.build_run(_config(root, {"name": name}), root / name, mesh_spec="1", model=model,
                           tokenizer=tokenizer, log=lambda _: None)
    assert len(step_lib.jit_step(step_lib.make_step_fn(other.encoder, other.objective, other.tx, other.is_trainable),
                                 other.shardings, other.mesh).programs) == programs, name

  class NotAnObjective:
    """An inner attack, its adversarial batch without a text stage's argument, and an outer loss."""
    def __init__(self, objective):
      self.inner_attack, self.outer_loss = objective.inner_attack, objective.outer_loss
      self.adversarial = lambda encoder, params, batch, key, reference=None: objective.adversarial(
          encoder, params, batch, key, reference)

  duck = step_lib.jit_step(step_lib.make_step_fn(run.encoder, NotAnObjective(run.objective), run.tx,
                                                 run.is_trainable), run.shardings, run.mesh)
  assert len(duck.programs) == 3  # its attack whole, text stage included
  fresh = step_lib.create_state(run.params, run.tx, run.is_trainable, 0, run.shardings)
  assert len(duck.lower(fresh, batch, None)) == 3


def test_each_of_a_steps_programs_compiles_while_the_next_is_traced(world, devices, monkeypatch):
  """The step's first program (the text stage, the longest to compile) starts compiling as soon as it is
  lowered, before the programs after it are traced, so that on a host with cores to spare the later programs'
  tracing and lowering are off the compilation's critical path. With one compilation thread the order shows
  it: each program's compilation comes before the next program's tracing."""
  root, model, tokenizer, batches = world
  objective = {"name": "mat", "steps": 2, "eps": 16 / 255, "step_size": 8 / 255}
  run = loop.build_run(_config(root, objective), root / "pipelined", mesh_spec="1", model=model,
                       tokenizer=tokenizer, log=lambda _: None)
  fn = step_lib.jit_step(step_lib.make_step_fn(run.encoder, run.objective, run.tx, run.is_trainable), run.shardings,
                         run.mesh)
  state = step_lib.create_state(run.params, run.tx, run.is_trainable, 0, run.shardings)
  # A batch size no other test's step has, so that no compiled program is found in the session's caches.
  batch = mesh_lib.global_batch(jax.tree.map(lambda x: x[:3], batches[1]), run.mesh)
  programs = ("text_stage", "attack", "gradient", "apply")
  kinds = {"/jax/core/compile/jaxpr_trace_duration": "trace", "/jax/core/compile/backend_compile_duration": "compile"}
  events = []

  def record(event, seconds, fun_name=None, **kwargs):
    name = (fun_name or "").removeprefix("jit(").removesuffix(")")
    if event in kinds and name in programs:
      events.append((kinds[event], name))

  monkeypatch.setattr(precompile, "compile_all", functools.partial(precompile.compile_all, workers=1))
  jax.monitoring.register_event_duration_secs_listener(record)
  try:
    fn.compile(state, batch)
  finally:
    jax.monitoring.unregister_event_duration_listener(record)
  assert events == [(kind, program) for program in programs for kind in ("trace", "compile")], events
