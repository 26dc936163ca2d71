"""One attack registry for training and evaluation (`mat_jax.attacks.spec`, `mat_jax.attacks.runner`).

The names evaluation runs are the names training can use; an attack run by `evaluate` and the same
attack run as an objective's inner attack give the same adversarial batch for the same key; a MAT run
trains against SGA; unknown names are errors that list the registry.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mat_jax import config as config_lib
from mat_jax import evaluate as ev
from mat_jax import mesh as mesh_lib
from mat_jax import objectives, runs
from flax import nnx

from mat_jax.attacks import LexiconSource, multimodal
from mat_jax.attacks import runner
from mat_jax.attacks import spec as attack_specs
from mat_jax.data import shapes
from mat_jax.models import CLIP, clip_config
from mat_jax.objectives import base
from mat_jax.training import inputs, loop, setup
from mat_jax.training import step as step_lib

ROOT = Path(__file__).resolve().parents[1]
# Each adversarial objective's published inner attack.
PUBLISHED = {"tecoa": "tecoa", "fare": "fare", "mmcoa": "mmcoa", "mava": "mava", "mat": "mat", "matplus": "mat"}


def test_registry_names_are_evaluation_and_training_names(tmp_path):
  assert ev.ATTACKS == attack_specs.NAMES
  assert set(ev.DEFAULT_ATTACKS) <= set(attack_specs.NAMES)
  assert {"pgd", "apgd", "bert", "sep", "co", "sga", "mat"} <= set(attack_specs.NAMES)
  for name, cls in objectives.OBJECTIVES.items():
    assert objectives.hyperparameters(cls).get("attack") == PUBLISHED.get(name)
  assert objectives.Contrastive().inner_attack() is None
  # Every registry name is a valid inner attack of every adversarial objective and an evaluation attack,
  # but an attack of the captions alone for an objective whose loss reads only the adversarial images.
  for objective in PUBLISHED:
    for attack in attack_specs.NAMES:
      if not (attack_specs.get(attack).attacks_image or objectives.OBJECTIVES[objective].reads_adversarial_text):
        with pytest.raises(config_lib.ConfigError, match="changes captions only"):
          config_lib.build({"objective": {"name": objective, "attack": attack}})
        continue
      config = config_lib.build({"objective": {"name": objective, "attack": attack}, "eval": {"attacks": (attack,)}})
      spec = objectives.make(config.objective).inner_attack()
      assert spec.name == attack and spec.eps == config.objective.eps and spec.steps == config.objective.steps


def test_an_objective_s_defaults_are_its_published_attack():
  # Trained at its defaults, a defense runs the registry's spec unchanged: the registry is the one place of its
  # published budget (eps, steps, step size, words changed, MAVA's neighbours), none of it restated elsewhere.
  for name, attack in PUBLISHED.items():
    assert objectives.OBJECTIVES[name]().inner_attack() == attack_specs.get(attack), name


def test_a_registry_change_reaches_the_objective_defaults():
  # The objectives read their defaults from the registry when they are defined: a fresh interpreter that changes
  # every published spec before importing them trains at the changed budgets.
  code = f"""
from mat_jax.attacks import spec
for name in {sorted(set(PUBLISHED.values()))!r}:
  s = spec.ATTACKS[name]
  spec.ATTACKS[name] = s.replace(eps=s.eps / 2, steps=s.steps + 1, step_size=s.step_size / 2,
                                 max_changes=s.max_changes + 1, neighbours=s.neighbours + 1, beta=s.beta / 2)
from mat_jax import objectives
for name, attack in {PUBLISHED!r}.items():
  assert objectives.OBJECTIVES[name]().inner_attack() == spec.ATTACKS[attack], name
print("ok")
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

def test_unknown_attack_names_list_the_registry():
  listed = ", ".join(attack_specs.NAMES)
  with pytest.raises(attack_specs.UnknownAttackError, match=f"unknown attack 'sgaa'. Did you mean 'sga'.*{listed}"):
    attack_specs.get("sgaa")
  with pytest.raises(config_lib.ConfigError, match=rf"objective.attack \(mat\): unknown attack\(s\) \['sgaa'\].*"
                                                   rf"did you mean 'sga'.*{listed}"):
    config_lib.build({"objective": {"name": "mat", "attack": "sgaa"}})
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'objective \(contrastive\).attack'"):
    config_lib.build({"objective": {"name": "contrastive", "attack": "pgd"}})  # clean training has none
  with pytest.raises(ValueError, match=r"unknown attacks \['nope'\]; choose from .*'mat'"):
    ev.evaluate(*_micro(), eval_set=None, attacks=("nope",))


def test_specs_are_checked_and_share_one_step_rule():
  assert attack_specs.step_size_for(2 / 255, 10) == pytest.approx(0.5 / 255)
  assert attack_specs.get("co").pgd_step == pytest.approx(2 / 255 / 10 * 1.25)
  assert attack_specs.get("mat").pgd_step == 1 / 255  # an explicit step wins over the rule
  with pytest.raises(ValueError, match="kind 'text_then_image' runs the image losses"):
    attack_specs.AttackSpec("x", "text_then_image", "cosine", "kl")
  with pytest.raises(ValueError, match="scores its text attack with 'image'"):
    attack_specs.AttackSpec("x", "sga", "sga", "kl")
  with pytest.raises(ValueError, match="set text_objective"):
    attack_specs.get("mat").replace(text_objective=None)
  with pytest.raises(ValueError, match="outside"):
    attack_specs.get("pgd").replace(eps=2.0)
  with pytest.raises(ValueError, match="L-inf budgets only"):
    attack_specs.get("mava").replace(norm="l2", eps=0.5)
  settings = ev.AttackSettings(steps=5, norm="l2", max_changes=2)
  spec = ev.attack_spec("mat", settings, 0.5)
  assert (spec.eps, spec.steps, spec.norm, spec.max_changes) == (0.5, 5, "l2", 2)
  assert spec.pgd_step == pytest.approx(2.5 * 0.5 / 5)  # evaluation's step rule, not training's 1/255
  assert ev.attack_spec("apgd", settings, 0.5).steps == settings.apgd_steps
  # Sep-Attack as Co-Attack's code: its image KL with Co-Attack's step (1.25 eps / steps), not SGA's.
  sep_kl = ev.attack_spec("sep", dataclasses.replace(settings, norm="linf", sep_image_loss="kl"), 2 / 255)
  assert sep_kl.loss == "kl" and sep_kl.pgd_step == pytest.approx(attack_specs.get("co").pgd_step * 10 / 5)
  assert ev.attack_spec("sep", dataclasses.replace(settings, norm="linf"), 2 / 255).pgd_step == pytest.approx(
      2.5 * 2 / 255 / 5)


# ----------------------------------------------------------------------------------------------------
# The same adversarial batch from evaluate and from an objective.

B, K = 4, 2
MICRO = ("vision.image_size=16,vision.layers=1,vision.width=32,vision.heads=2,vision.mlp_dim=64,text.layers=1,"
         "text.width=32,text.heads=2,text.mlp_dim=64,projection_dim=32,text.context_length=24")


def _micro():
  """A random micro CLIP, its params and the shapes tokenizer."""
  model = CLIP(runs.parse_model_overrides(MICRO, clip_config("tiny")), rngs=nnx.Rngs(0))
  return model, None, shapes.tokenizer(context_length=24)


@pytest.fixture(scope="module")
def scene_batch():
  """B shapes-world images with K captions each and their paraphrase candidates (shared by both paths)."""
  model, _, tokenizer = _micro()
  rng = np.random.default_rng(0)
  scenes = [shapes.sample_scene(rng) for _ in range(B)]
  images = np.stack([shapes.render(s, 16) for s in scenes]).astype(np.float32) / 255.0
  captions = [c for s in scenes for c in shapes.captions(s, rng, K)]
  cands = multimodal.bucketed_candidates(captions, tokenizer, LexiconSource(shapes.substitution_table()))
  return model, tokenizer, images, captions, cands


def _training_batch(images, tokens, cands) -> dict:
  """The batch an objective sees: (B, K, ...) per-caption arrays and the candidates as the pipeline's cand_*."""
  batch = {"images": jnp.asarray(images), "image_ids": jnp.arange(B),
           "input_ids": jnp.asarray(tokens.input_ids).reshape(B, K, -1),
           "attention_mask": jnp.asarray(tokens.attention_mask).reshape(B, K, -1)}
  for name in inputs.PER_CAPTION:
    value = np.asarray(getattr(cands, name))
    batch[inputs.PREFIX + name] = jnp.asarray(value.reshape((B, K) + value.shape[1:]))
  batch[inputs.PREFIX + "mask_pieces"] = jnp.broadcast_to(cands.mask_pieces, (B,) + cands.mask_pieces.shape)
  batch[inputs.PREFIX + "mask_length"] = jnp.full((B,), cands.mask_length, jnp.int32)
  return batch


# APGD's classes differ by design (the whole test set's captions in evaluation, the batch's in training).
# One attack of each compiled route in the fast lane; the others run with the slow tests.
FAST = ("bert", "sga", "mat", "tecoa")


@pytest.mark.parametrize("attack", [a if a in FAST else pytest.param(a, marks=pytest.mark.slow)
                                    for a in attack_specs.NAMES if a != "apgd"])
def test_evaluate_and_an_objective_make_the_same_adversarial_batch(scene_batch, attack):
  model, tokenizer, images, captions, cands = scene_batch
  victim = ev.Victim.of(model, tokenizer=tokenizer)
  tokens = victim.tokens(captions)
  settings = ev.AttackSettings(steps=2)
  eps_255 = 4.0
  key = jax.random.key(7)
  # evaluate's path: its batch of B images x K captions, its spec of the attack at eps and its settings.
  eval_batch = ev._batches(np.arange(B * K).reshape(B, K), B)[0]
  spec = ev.attack_spec(attack, settings, eps_255 / 255)
  adv_images, text, _ = ev._attack_batch(attack, victim, images, eval_batch, key, None if spec.kind == "text"
                                         else eps_255, settings, tokens, None, np.repeat(np.arange(B), K), cands)
  # The objective's path: MAT trained against `attack` at the same budget.
  meta = inputs.CandidateMeta(cands.start_id, cands.end_id, cands.pad_id, cands.context_length, cands.text_length)
  objective = objectives.MAT(attack=attack, eps=spec.eps, steps=spec.steps, step_size=spec.pgd_step,
                             text_changes=spec.max_changes, candidate_meta=meta)
  assert objective.inner_attack() == spec.replace(step_size=spec.pgd_step)
  batch = _training_batch(images, tokens, cands)
  _, adv = base.attack_batch(objective, victim.encoder, victim.params, batch, key)
  if spec.attacks_image:
    # The same attack compiled into two different programs: XLA may order the projection's float32
    # arithmetic differently in each (measured: a few pixels of 3,072 apart by 1-2 ulps, 3e-8), while
    # any real difference (a step, a sign, a key) moves a pixel by up to a step size, 2e-2 here.
    np.testing.assert_allclose(np.asarray(adv["images"]), np.asarray(adv_images), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(adv_images) - images).max() > 0
  else:
    assert adv_images is None
    np.testing.assert_array_equal(np.asarray(adv["images"]), images)
  if spec.attacks_text:
    np.testing.assert_array_equal(np.asarray(adv["input_ids"]).reshape(B * K, -1), np.asarray(text.input_ids))
    changed = np.asarray(text.changed_words[:, 0] >= 0, np.float32).reshape(adv["input_ids"].shape[:-1])
    np.testing.assert_array_equal(np.asarray(adv["text_changed"]), changed)  # per caption, as the captions
    assert changed.any()
  else:
    assert text is None and adv["text_changed"].shape == adv["input_ids"].shape[:-1]
    assert not np.asarray(adv["text_changed"]).any()


def test_apgd_on_the_batch_captions_leaves_padding_slots_out(scene_batch):
  # Without whole-set classes APGD ranks the batch's captions: a padding slot (weight 0) is neither a
  # positive nor a negative, so what the slot holds cannot move the adversarial images.
  model, tokenizer, images, captions, _ = scene_batch
  victim = ev.Victim.of(model, tokenizer=tokenizer)
  ids = np.asarray(victim.tokens(captions).input_ids).reshape(B, K, -1)
  mask = np.asarray(victim.tokens(captions).attention_mask).reshape(B, K, -1)
  weights = np.ones((B, K), np.float32)
  weights[0, 1] = 0.0
  spec = attack_specs.get("apgd").replace(eps=4 / 255, steps=4)

  def attacked(slot_caption: int) -> np.ndarray:
    slot_ids, slot_mask = ids.copy(), mask.copy()
    slot_ids[0, 1], slot_mask[0, 1] = ids.reshape(B * K, -1)[slot_caption], mask.reshape(B * K, -1)[slot_caption]
    batch = runner.AttackInputs(jnp.asarray(images), jnp.asarray(slot_ids), jnp.asarray(slot_mask),
                                jnp.asarray(weights))
    return np.asarray(runner.run_attack(spec, victim.encoder, victim.params, batch, jax.random.key(3)).images)

  # The padding slot repeats the image's first caption (evaluation's padding), or holds another image's.
  np.testing.assert_array_equal(attacked(0), attacked(2 * K + 1))


# ----------------------------------------------------------------------------------------------------
# Training against an evaluation attack.

@pytest.mark.parametrize("objective,attack", [("mat", "sga"), pytest.param("tecoa", "co", marks=pytest.mark.slow)])
def test_an_objective_trains_against_an_evaluation_attack(tmp_path, objective, attack):
  # SGA as MAT's inner attack; Co-Attack (captions, then images guided by them) as TeCoA's, which then
  # needs candidates too.
  config = config_lib.build({
      "model": {"source": "tiny", "tokenizer": "shapes", "overrides": MICRO},
      "data": {"name": "shapes", "data_dir": str(tmp_path / "data"), "build_train": 16, "build_val": 8,
               "build_test": 8, "image_size": 16},
      "objective": {"name": objective, "attack": attack, "steps": 1},
      "train": {"batch_size": 8, "steps": 1},
      "text_attack": {"source": "paraphrase", "top_k": 4, "max_targets": 4},
  })
  run = loop.build_run(config, tmp_path / objective, mesh_spec="1", log=lambda _: None)
  assert run.objective.inner_attack().name == attack and run.objective.needs_text_candidates
  assert config_lib.fingerprint(config)["objective.attack"] == attack  # not the published one: recorded
  builder = setup.data_builder(config, 16, log=lambda _: None)
  batch = next(setup.train_iterator(config, builder, run.tokenizer, 8, process_index=0, process_count=1))
  for transform in run.batch_transforms:
    batch = transform(batch)
  state = step_lib.create_state(run.params, run.tx, run.is_trainable, 0, run.shardings)
  fn, reference = loop.make_train_step(run)
  state, metrics = fn(state, mesh_lib.global_batch(batch, run.mesh), reference)
  metrics = jax.device_get(metrics)
  assert int(state.step) == 1 and np.isfinite(metrics["loss"])
  if objective == "mat":
    assert metrics["text_changed"] > 0  # SGA's text attack changed captions the outer loss trained on


def test_the_published_attack_keeps_the_fingerprint():
  # Runs (and checkpoints) of the published recipe resume: their fingerprint does not name the attack.
  config = config_lib.build({"objective": {"name": "mat"}})
  assert "objective.attack" not in config_lib.fingerprint(config)
  assert config.objective.attack == "mat"
