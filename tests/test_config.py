"""Experiment files: defaults, validation with helpful errors, overrides, schedules."""

from pathlib import Path

import pytest

from mat_jax import config as config_lib
from mat_jax.training import optim

from helpers import MICRO

# Training experiments (study files, experiments/study_*.py, are `mat_jax.study`'s and tested there).
EXPERIMENTS = sorted(p for p in (Path(__file__).resolve().parents[1] / "experiments").glob("*.py")
                     if not p.name.startswith("study_"))


def _write(tmp_path, body):
  path = tmp_path / "exp.py"
  path.write_text("import ml_collections\n\ndef get_config(arg=None):\n" +
                  "".join(f"  {line}\n" for line in body.splitlines()))
  return path


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_file_loads(path):
  config = config_lib.load(path)
  assert config.train.steps >= 1
  assert config.objective.name
  # The runlocal shrink, where a file offers it, keeps the config valid.
  if "runlocal" in path.read_text():
    small = config_lib.load(f"{path}:runlocal")
    assert small.train.steps <= config.train.steps


def test_file_values_fill_defaults(tmp_path):
  path = _write(tmp_path, "return dict(name='x', train=dict(steps=7))")
  config = config_lib.load(path)
  assert config.train.steps == 7
  assert config.train.batch_size == config_lib.defaults().train.batch_size
  assert config.objective.name == "contrastive"


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
  path = _write(tmp_path, "return dict(train=dict(batchsize=8))")
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.load(path)
  message = str(err.value)
  assert "train.batchsize" in message and "Did you mean 'batch_size'" in message
  assert "steps" in message and "log_every" in message  # the valid keys are listed


def test_unknown_override_key_fails(tmp_path):
  path = _write(tmp_path, "return dict()")
  with pytest.raises(config_lib.ConfigError, match="Did you mean 'steps'"):
    config_lib.load(path, ["--config.train.stpes=3"])
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'trian'"):
    config_lib.load(path, ["trian.steps=3"])
  # A section given a value: named as the section it is, with its keys (not "unknown").
  with pytest.raises(config_lib.ConfigError, match=r"'train' is a section, not a value; set one of its keys, "
                                                   r"e\.g\. --config\.train\.KEY=VALUE \(its keys: batch_size, "):
    config_lib.load(path, ["--config.train=5"])
  with pytest.raises(config_lib.ConfigError, match=r"'schedule.kwargs' is a section"):
    config_lib.load(path, ["schedule.kwargs=3"])
  # A `*.name` override is applied before the file's keys are checked; its typos are still its own.
  mat = _write(tmp_path, "return dict(objective=dict(name='mat'))")
  for override, message in (("objectiv.name=tecoa", "unknown config key 'objectiv'"),
                            ("objective.name=tecoaa", "unknown objective")):
    with pytest.raises(config_lib.ConfigError, match=message) as err:
      config_lib.load(mat, [override])
    assert str(err.value).startswith("override") and str(mat) not in str(err.value)


def test_types_are_checked(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="train.steps must be int"):
    config_lib.load(_write(tmp_path, "return dict(train=dict(steps='10'))"))
  path = _write(tmp_path, "return dict()")
  with pytest.raises(config_lib.ConfigError, match="train.steps=.ten. is not an integer"):
    config_lib.load(path, ["train.steps=ten"])
  with pytest.raises(config_lib.ConfigError, match="not one of"):
    config_lib.load(path, ["schedule.name=exponential"])
  for override, allowed in (("optimizer.eps=0", "> 0"), ("optimizer.b2=1", r"in \[0, 1\)"),
                            ("optimizer.learning_rate=-1e-3", ">= 0"), ("schedule.warmup_steps=-5", ">= 0"),
                            ("optimizer.learning_rate=inf", ">= 0 and finite"),
                            ("optimizer.learning_rate=1e39", r">= 0 and finite in float32 \(at most 3.4e38\)"),
                            ("schedule.end_factor=inf", ">= 0 and finite")):
    with pytest.raises(config_lib.ConfigError, match=f"{override.split('=')[0]}=.* must be {allowed}"):
      config_lib.load(path, [override])


def test_override_values_are_parsed_by_type(tmp_path):
  path = _write(tmp_path, "return dict()")
  config = config_lib.load(path, ["eval.eps=4/255", "train.export=false", "data.augmentations=hflip,eda",
                                  "train.steps=12", "optimizer.learning_rate=3e-4"])
  assert config.eval.eps == pytest.approx(4 / 255)
  assert config.train.export is False
  assert tuple(config.data.augmentations) == ("hflip", "eda")
  assert config.train.steps == 12 and config.optimizer.learning_rate == 3e-4


def test_objective_fields_follow_the_objective(tmp_path):
  path = _write(tmp_path, "return dict(objective=dict(name='contrastive', eps=0.1))")
  with pytest.raises(config_lib.ConfigError, match=r"objective \(contrastive\)"):
    config_lib.load(path)
  with pytest.raises(ValueError, match="unknown objective"):
    config_lib.load(_write(tmp_path, "return dict(objective=dict(name='nope'))"))


def test_objective_switched_by_override(tmp_path):
  path = _write(tmp_path, "return dict(objective=dict(name='mat', eps=4/255, text_changes=2))")
  config = config_lib.load(path, ["objective.name=tecoa", "objective.steps=3"])
  assert config.objective.name == "tecoa" and config.objective.steps == 3
  assert config.objective.eps == pytest.approx(4 / 255)  # shared keys kept
  assert "text_changes" not in config.objective            # MAT-only keys dropped
  with pytest.raises(config_lib.ConfigError, match="text_changes"):
    config_lib.load(path, ["objective.name=tecoa", "objective.text_changes=1"])
  # The file's inner attack was chosen for MAT: TeCoA trains against its own unless an override names one.
  path = _write(tmp_path, "return dict(objective=dict(name='mat', attack='mat'))")
  assert config_lib.load(path, ["objective.name=tecoa"]).objective.attack == "tecoa"
  assert config_lib.load(path, ["objective.name=tecoa", "objective.attack=pgd"]).objective.attack == "pgd"
  assert config_lib.load(path).objective.attack == "mat"


def test_schedule_swapped_by_override(tmp_path):
  path = _write(tmp_path, "return dict(train=dict(steps=100), schedule=dict(name='constant', warmup_steps=10))")
  rates = {}
  for name in ("constant", "cosine", "linear"):
    config = config_lib.load(path, [f"--config.schedule.name={name}"])
    schedule = optim.make_schedule(config.schedule, 1.0, config.train.steps)
    rates[name] = [float(schedule(s)) for s in (0, 5, 10, 55, 99)]
  for values in rates.values():  # the same linear warmup from 0
    assert values[0] == 0.0 and values[1] == pytest.approx(0.5)
  assert rates["constant"][3] == pytest.approx(1.0)
  assert rates["cosine"][3] == pytest.approx(0.5, abs=0.02)
  assert rates["linear"][3] == pytest.approx(0.5, abs=0.02)
  assert rates["cosine"][4] < 0.01 and rates["linear"][4] < 0.02


def test_fingerprint_tracks_shapes_relevant_settings(tmp_path):
  path = _write(tmp_path, "return dict()")
  base = config_lib.fingerprint(config_lib.load(path))
  assert base == config_lib.fingerprint(config_lib.load(path, ["optimizer.learning_rate=0.5"]))
  assert base != config_lib.fingerprint(config_lib.load(path, ["train.towers=vision"]))


def test_cli_reports_config_errors(tmp_path, capsys):
  from mat_jax import train
  path = _write(tmp_path, "return dict()")
  assert train.main(["--config", str(path), "--config.train.stpes=3"]) == 2
  assert "Did you mean 'steps'" in capsys.readouterr().err


def test_fingerprint_covers_what_the_run_trains_for(tmp_path):
  # A resume with another objective, seed or data stream would silently mix two runs.
  path = _write(tmp_path, "return dict(objective=dict(name='mat'))")
  base = config_lib.fingerprint(config_lib.load(path))
  assert base["objective.name"] == "mat" and base["objective.text_changes"] == 1
  for override in ("objective.name=tecoa", "objective.eps=4/255", "objective.clean_weight=0.5", "seed=1",
                   "data.augmentations=hflip"):
    assert base != config_lib.fingerprint(config_lib.load(path, [override, "train.towers=all"])), override
  # Settings that may change between restarts stay out.
  for override in ("schedule.warmup_steps=10", "eval.attacks=co", "train.log_every=5", "train.steps=99"):
    assert base == config_lib.fingerprint(config_lib.load(path, [override])), override


def test_an_attack_of_the_captions_alone_is_refused_for_objectives_that_read_adversarial_images_only(tmp_path):
  for objective in ("tecoa", "fare", "mava"):
    path = _write(tmp_path, f"return dict(objective=dict(name={objective!r}))")
    with pytest.raises(config_lib.ConfigError, match=rf"objective.attack='bert' changes captions only, and "
                                                     rf"{objective}'s loss reads the adversarial images only"):
      config_lib.load(path, ["objective.attack=bert"])
    assert config_lib.load(path, ["objective.attack=sga"]).objective.attack == "sga"
  for objective in ("mat", "matplus", "mmcoa"):  # their losses read the attacked captions
    path = _write(tmp_path, f"return dict(objective=dict(name={objective!r}))")
    assert config_lib.load(path, ["objective.attack=bert"]).objective.attack == "bert"


def test_fingerprint_records_a_tokenizer_cut_shorter_than_the_loaded_models_texts(tmp_path):
  # Weights keep their own context length; model.context_length only shortens the tokenizer, so a resume
  # that changes it would train on captions cut elsewhere.
  from mat_jax.models import clip

  model_config = clip.PRESETS["tiny"]
  path = _write(tmp_path, "return dict()")
  def fingerprint(*overrides):
    return config_lib.fingerprint(config_lib.load(path, list(overrides)), model_config)

  own = model_config.text.context_length
  assert "model.context_length" not in fingerprint()
  assert fingerprint() == fingerprint(f"model.context_length={own}")  # what the model config already says
  assert fingerprint("model.context_length=8")["model.context_length"] == 8
  assert fingerprint() != fingerprint("model.context_length=8") != fingerprint("model.context_length=9")


def test_an_objective_field_added_later_is_fingerprinted_only_off_its_default(tmp_path):
  # TeCoA checkpoints written before `symmetric` existed trained its default: they must still resume,
  # and a run with the other value must not resume them.
  path = _write(tmp_path, "return dict(objective=dict(name='tecoa'))")
  default = config_lib.fingerprint(config_lib.load(path))
  assert "objective.symmetric" not in default
  assert default == config_lib.fingerprint(config_lib.load(path, ["objective.symmetric=true"]))
  assert config_lib.fingerprint(config_lib.load(path, ["objective.symmetric=false"]))["objective.symmetric"] is False
  # MAT's `guided` likewise, and a cached run's key (`result_json`) names it only off its default: the runs
  # of MAT and MAT+ cached before it existed are still found.
  mat = _write(tmp_path, "return dict(objective=dict(name='mat'))")
  guided = config_lib.load(mat)
  assert "objective.guided" not in config_lib.fingerprint(guided) and "guided" not in config_lib.result_json(guided)
  unguided = config_lib.load(mat, ["objective.guided=false"])
  assert config_lib.fingerprint(unguided)["objective.guided"] is False
  assert '"guided": false' in config_lib.result_json(unguided)
  with pytest.raises(config_lib.ConfigError, match="guided=False .* needs an attack whose contrastive PGD follows"):
    config_lib.load(mat, ["objective.guided=false", "objective.attack=sga"])


def test_fingerprint_covers_the_text_threat_and_the_reference_a_run_trains_with(tmp_path):
  # MAT trains against the text attack's candidates: another MLM, source or top-k is another run. FARE's
  # frozen reference is the source model. Objectives without them keep both out (and resume under any).
  def fingerprint(objective, *overrides):
    return config_lib.fingerprint(config_lib.load(_write(tmp_path, f"return dict(objective=dict(name={objective!r}))"),
                                                  list(overrides)))

  assert fingerprint("mat")["text_attack.top_k"] == 10 and "model.source" not in fingerprint("mat")
  for override in ("text_attack.top_k=5", "text_attack.source=paraphrase", "text_attack.max_targets=4"):
    assert fingerprint("mat") != fingerprint("mat", override), override
  assert fingerprint("fare")["model.source"] == "tiny"
  assert not any(k.startswith("text_attack.") for k in fingerprint("fare"))
  assert fingerprint("fare") != fingerprint("fare", "model.source=vit-b-16")
  for objective in ("tecoa", "contrastive"):
    assert fingerprint(objective) == fingerprint(objective, "text_attack.top_k=5", "model.source=vit-b-16"), objective
  # Checkpoints from before these keys were recorded still resume (the checkpointer's added_keys).
  both = {**fingerprint("mat"), **fingerprint("fare")}
  recorded = {k for k in both if k.startswith(("text_attack.", "model.source"))}
  # The data keys recorded later: the split, the image size and the shapes world's build.
  data = {"data.split", "data.image_size", "data.build_train", "data.build_val", "data.build_test"}
  assert data <= set(both)
  # (model.source_run, the cached run a "cache:" source stands for, text_attack.mlm, the cached MLM
  # "shapes-mlm" stands for, and the tokenizer's vocabulary are `runs.run_fingerprint`'s additions.)
  assert recorded | data | {"model.source_run", "text_attack.mlm", "model.tokenizer_vocabulary"} == \
      set(config_lib.ADDED_FINGERPRINT_KEYS)


@pytest.mark.parametrize("name, setting, structural", [
    ("adam", "weight_decay", True), ("sgd", "weight_decay", True), ("sgd", "momentum", True),
    ("adamw", "weight_decay", False), ("adam", "momentum", False)])
def test_fingerprint_tracks_optimizer_state_structure(tmp_path, name, setting, structural):
  import jax
  import jax.numpy as jnp

  path = _write(tmp_path, f"return dict(optimizer=dict(name={name!r}))")
  zero, positive = (config_lib.load(path, [f"optimizer.{setting}={v}"]) for v in (0, 0.5))
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  states = [optim.make_optimizer(c.optimizer, optim.make_schedule(c.schedule, 0.1, 10)).init(params)
            for c in (zero, positive)]
  assert (jax.tree.structure(states[0]) != jax.tree.structure(states[1])) == structural  # the premise
  assert (config_lib.fingerprint(zero) != config_lib.fingerprint(positive)) == structural


def test_unknown_objective_is_a_config_error(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"unknown objective.name 'tceoa'. Did you mean 'tecoa'\? "
                                                    r"Available: contrastive, fare, mat"):
    config_lib.load(_write(tmp_path, "return dict(objective=dict(name='tceoa'))"))
  with pytest.raises(config_lib.ConfigError, match="unknown objective.name 'nope'"):
    config_lib.load(_write(tmp_path, "return dict()"), ["objective.name=nope"])


def test_eval_attacks_are_checked_at_load(tmp_path):
  from mat_jax import evaluate

  path = _write(tmp_path, "return dict()")
  config = config_lib.load(path, [f"eval.attacks={','.join(evaluate.ATTACKS)}"])
  assert set(config.eval.attacks) == set(evaluate.ATTACKS)
  with pytest.raises(config_lib.ConfigError, match=r"eval.attacks: unknown attack\(s\) \['pdg'\].*did you mean 'pgd'"):
    config_lib.load(path, ["eval.attacks=pgd,pdg"])
  with pytest.raises(config_lib.ConfigError, match="data.augmentations: unknown augmentation 'flip'"):
    config_lib.load(path, ["data.augmentations=flip"])
  # t2i_caption's image is true of its one caption only: with other captions or renderings of the scene, refused.
  for layout in ("data.captions_per_image=2", "data.renderings_per_scene=2"):
    with pytest.raises(config_lib.ConfigError, match=r"data.augmentations: t2i_caption .* captions_per_image=1 "
                                                     r"and renderings_per_scene=1"):
      config_lib.load(path, ["data.augmentations=t2i_caption", layout])
  config_lib.load(path, ["data.augmentations=t2i", "data.renderings_per_scene=2"])
  with pytest.raises(config_lib.ConfigError, match=r"eval.attacks: unknown attack\(s\) \['coattack'\]"):
    config_lib.load(_write(tmp_path, "return dict(eval=dict(attacks=('sga', 'coattack')))"))
  # A contrastive attack's negatives are the batch's other captions: one image per batch is refused at load,
  # not by the evaluation after training; attacks of the paired caption take any batch.
  for override in ("eval.batch_size=1", "eval.max_images=1"):
    with pytest.raises(config_lib.ConfigError, match=r"eval.attacks \['tecoa'\] ascend a contrastive loss"):
      config_lib.load(path, ["eval.attacks=pgd,tecoa", override])
    assert config_lib.load(path, ["eval.attacks=pgd", override]).eval.attacks == ("pgd",)
  assert config_lib.load(path, ["eval.attacks=tecoa", "eval.batch_size=2", "eval.max_images=0"])


@pytest.mark.parametrize("text, expected", [
    ("(pgd, co)", ("pgd", "co")), ("[pgd,co]", ("pgd", "co")), ("pgd, co", ("pgd", "co")), ("(pgd)", ("pgd",)),
    ("('pgd',)", ("pgd",)), ("()", ()), ("(hflip, eda:0.3)", ("hflip", "eda:0.3"))])
def test_tuple_overrides_take_bare_words(tmp_path, text, expected):
  path = _write(tmp_path, "return dict()")
  key = "data.augmentations" if "hflip" in text else "eval.attacks"
  assert tuple(config_lib.load(path, [f"{key}={text}"])[key.split(".")[0]][key.split(".")[1]]) == expected


@pytest.mark.parametrize("override, message", [
    ("data.augmentations=[hflip", r"data.augmentations: cannot read '\[hflip' as a list; write a,b or \(a, b\)"),
    ("eval.attacks=(pgd co)", r"eval.attacks: cannot read '\(pgd co\)' as a list"),
    ("eval.attacks=(1)", r"unknown attack\(s\) \[1\]"),
    ("eval.attacks=(1, 2)", r"unknown attack\(s\) \[1, 2\]")])
def test_bad_tuple_overrides_are_config_errors(tmp_path, override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load(_write(tmp_path, "return dict()"), [override])


@pytest.mark.parametrize("objective, key, value, allowed", [
    ("mava", "neighbours", 0, ">= 1"), ("mava", "beta", -0.1, ">= 0"), ("mava", "a", -1.0, ">= 0"),
    ("tecoa", "steps", 0, ">= 1"), ("fare", "step_size", 0.0, "> 0"), ("fare", "eps", -0.01, r"in \[0, 64/255\]"),
    ("mat", "eps", 0.5, r"in \[0, 64/255\]"), ("mat", "text_changes", 0, ">= 1"), ("mat", "clean_weight", -0.5, ">= 0"),
    ("mmcoa", "text_weight", -1.0, ">= 0"), ("mmcoa", "image_weight", -1.0, ">= 0"),
    # inf (or a float32 overflow) made the first step's loss NaN, refused only after compiling.
    ("mat", "clean_weight", float("inf"), ">= 0 and finite in float32"),
    ("mava", "beta", float("inf"), ">= 0 and finite"), ("mmcoa", "text_weight", float("inf"), ">= 0 and finite")])
def test_objective_values_out_of_range_are_refused(tmp_path, objective, key, value, allowed):
  path = _write(tmp_path, f"return dict(objective=dict(name={objective!r}))")
  config_lib.load(path)  # the defaults are in range
  with pytest.raises(config_lib.ConfigError, match=rf"objective.{key}={value!r} \({objective}\) must be {allowed}"):
    config_lib.load(path, [f"objective.{key}={value}"])


def test_a_new_objectives_loss_weight_is_refused_when_negative(tmp_path, monkeypatch):
  """A field named *_weight is a loss weight whatever objective declares it (docs/architecture.md)."""
  import dataclasses

  from mat_jax import objectives

  @dataclasses.dataclass(frozen=True)
  class TeCoAKL(objectives.TeCoA):
    name = "tecoa_kl"
    kl_weight: float = 1.0

  monkeypatch.setitem(objectives.OBJECTIVES, TeCoAKL.name, TeCoAKL)
  path = _write(tmp_path, "return dict(objective=dict(name='tecoa_kl'))")
  assert config_lib.load(path, ["objective.kl_weight=0.5"]).objective.kl_weight == 0.5
  with pytest.raises(config_lib.ConfigError, match=r"objective.kl_weight=-1.0 \(tecoa_kl\) must be >= 0 and finite "
                                                   r"in float32 \(at most 3.4e38\) \(a loss weight\)"):
    config_lib.load(path, ["objective.kl_weight=-1"])


@pytest.mark.parametrize("experiment, overrides", [
    ("shapes_tecoa.py", ["train.batch_size=1"]),
    ("shapes_mat.py", ["train.batch_size=4", "data.renderings_per_scene=4"]),
    ("shapes_clean_ft.py", ["train.batch_size=1"]),
    ("shapes_fare.py", ["train.batch_size=1", "objective.attack=tecoa"])])  # its inner attack's CE is contrastive
def test_a_training_batch_of_one_scene_is_refused_where_the_loss_contrasts_scenes(experiment, overrides):
  """Without a second scene the contrastive loss and its gradient are 0 at every step."""
  path = Path(__file__).resolve().parents[1] / "experiments" / experiment
  with pytest.raises(config_lib.ConfigError, match=r"holds one scene .* has no negative in it, so nothing trains; "
                                                   r"use train.batch_size >= \d+ \(two scenes or more\)"):
    config_lib.load(path, overrides)


def test_a_training_batch_of_one_scene_is_accepted_where_nothing_contrasts_scenes():
  fare = Path(__file__).resolve().parents[1] / "experiments" / "shapes_fare.py"
  assert config_lib.load(fare, ["train.batch_size=1"]).train.batch_size == 1


def test_eval_values_out_of_range_are_refused(tmp_path):
  path = _write(tmp_path, "return dict()")
  assert config_lib.load(path, ["eval.max_images=0"]).eval.max_images == 0  # the whole split
  for override, message in (("eval.max_images=-1", r"eval.max_images=-1 must be >= 0"),
                            ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
                            ("eval.eps=2", r"eval.eps=2.0 must be in \[0, 64/255\]"),
                            ("eval.eps=1", r"eval.eps=1.0 must be in \[0, 64/255\] \(an L-inf budget in pixel units"),
                            # Caught at load, not as a traceback mid-run from the tokenizer or the pipeline.
                            ("model.context_length=2", r"model.context_length=2 must be 0 \(the model's\) or >= 3"),
                            ("text_attack.max_pieces=0", "text_attack.max_pieces=0 must be >= 1"),
                            ("text_attack.top_k=0", "text_attack.top_k=0 must be >= 1"),
                            ("text_attack.max_targets=0", "text_attack.max_targets=0 must be >= 1"),
                            ("text_attack.max_words=-1", r"text_attack.max_words=-1 must be >= 0"),
                            ("train.eval_every=-2", r"train.eval_every=-2: use 0 \(evaluate at the end only\)"),
                            # int32 in the compiled programs: refused at load, not as an OverflowError there.
                            ("seed=99999999999999999999", r"seed=99999999999999999999 does not fit a 32-bit integer"),
                            ("eval.steps=4294967296", r"eval.steps=4294967296 does not fit a 32-bit"),
                            ("seed=-1", r"seed=-1 must be >= 0")):
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.load(path, [override])


def test_shapes_split_sizes_are_checked_at_load(tmp_path):
  """A split the run reads, built empty, is refused before the world is built (it used to build val and
  test, then fail naming data.split); a negative size is a config error, not a ValueError traceback."""
  path = _write(tmp_path, "return dict()")
  assert config_lib.load(path, ["data.build_val=0"]).data.build_val == 0  # a split the run does not train on
  for overrides, message in ((["data.build_train=0"], r"data.split='train' trains on .* data.build_train=0 builds "
                                                      r"it empty; give it scenes"),
                             (["data.build_val=0", "data.split=val"], r"data.split='val' .* data.build_val=0"),
                             (["data.build_val=-3"], r"data.build_val=-3 must be >= 0")):
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.load(path, overrides)
  # A built corpus has no build sizes to check.
  assert config_lib.load(path, ["data.name=flickr30k", "data.build_train=0"]).data.build_train == 0


@pytest.mark.parametrize("name", ["contrastive", "tecoa", "fare", "mmcoa", "mava", "mat", "matplus"])
def test_towers_default_to_the_objectives(tmp_path, name):
  from mat_jax import objectives

  config = config_lib.load(_write(tmp_path, f"return dict(objective=dict(name={name!r}))"))
  expected = objectives.get_class(name).default_towers
  assert config.train.towers == expected
  assert config_lib.fingerprint(config)["train.towers"] == expected
  assert f'"towers": "{expected}"' in config_lib.to_json(config)  # the run's config.json


def test_towers_set_by_the_file_or_an_override_win(tmp_path):
  path = _write(tmp_path, "return dict(objective=dict(name='tecoa'), train=dict(towers='all'))")
  assert config_lib.load(path).train.towers == "all"
  assert config_lib.load(path, ["train.towers=text"]).train.towers == "text"
  assert config_lib.load(path, ["train.towers=default"]).train.towers == "vision"
  # Switching a file without towers to another objective brings that objective's towers.
  plain = _write(tmp_path, "return dict(objective=dict(name='mat'))")
  assert config_lib.load(plain, ["objective.name=fare"]).train.towers == "vision"
  with pytest.raises(config_lib.ConfigError, match="'vsion' is not one of .*'default'"):
    config_lib.load(plain, ["train.towers=vsion"])
  # The shipped files set their towers explicitly (TeCoA-ITR of the shared budget: all towers).
  experiments = Path(__file__).resolve().parents[1] / "experiments"
  assert config_lib.load(experiments / "shapes_tecoa.py").train.towers == "all"
  assert config_lib.load(experiments / "shapes_fare.py").train.towers == "vision"
  assert config_lib.load(experiments / "shapes_mat.py").train.towers == "all"


@pytest.mark.parametrize("override, message", [
    ("--config.objective.name=nope", "unknown objective.name 'nope'"),
    ("--config.eval.attacks=(pgd, pdg)", "unknown attack"),
    ("--config.data.augmentations=[hflip", "cannot read '\\[hflip' as a list"),
    ("--config.objective.neighbours=0", "objective.neighbours=0 (mava) must be >= 1")])
def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys, override, message):
  from mat_jax import train
  path = _write(tmp_path, "return dict(objective=dict(name='mava'))")
  assert train.main(["--config", str(path), "--workdir", str(tmp_path / "run"), override]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message.replace("\\", "") in err
  assert not (tmp_path / "run").exists()


def test_cli_reports_missing_model_and_data_without_a_traceback(tmp_path, capsys, monkeypatch):
  from mat_jax import checkpoint as checkpoint_lib
  from mat_jax import train

  # A checkpointer left open by the failed data setup printed Orbax's thread tracebacks at exit.
  opened, closed = [], []
  init, close = checkpoint_lib.Checkpointer.__init__, checkpoint_lib.Checkpointer.close
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "__init__",
                      lambda self, *a, **k: (opened.append(self), init(self, *a, **k))[1])
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "close", lambda self: (closed.append(self), close(self))[1])
  path = _write(tmp_path, f"return dict(train=dict(batch_size=8), model=dict(overrides={MICRO!r}, tokenizer='shapes'), "
                          f"data=dict(name='nosuch', data_dir={str(tmp_path / 'data')!r}))")
  argv = ["--config", str(path), "--workdir", str(tmp_path / "run"), "--no-progress"]
  # A corpus not built is named first, before any model loads (or downloads, for a hub id).
  assert train.main(argv + ["--config.model.source=/nope"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: no corpus 'nosuch'") and "python -m mat_jax.data build" in err
  assert not opened
  assert train.main(argv + ["--config.data.name=shapes", "--config.model.source=/nope"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "/nope" in err and "Traceback" not in err
  # From Python, the run's data setup fails after its checkpointer opened: it is closed.
  from mat_jax.data import corpora
  from mat_jax.training import loop
  with pytest.raises(corpora.CorpusError, match="no corpus 'nosuch'"):
    loop.train(config_lib.load(path), tmp_path / "run", mesh_spec="1", log=lambda _: None, progress=False)
  assert opened and all(c in closed for c in opened)


def test_a_cached_run_is_keyed_by_what_its_result_depends_on():
  from mat_jax import runs

  path, config = runs.cached_experiment("shapes_clip")
  key = runs.cached_run_dir("shapes_clip", config)
  # Worker processes each make whole batches of the one stream, and the decoded-record cache only skips
  # decoding: neither changes a batch.
  for runtime_only in ("data.worker_count=0", "data.worker_count=3", "data.decoded_cache_mb=0"):
    assert runs.cached_run_dir("shapes_clip", config_lib.load(path, [runtime_only])) == key, runtime_only
  for result in ("train.steps=999", "data.augmentations=hflip", "seed=1"):
    assert runs.cached_run_dir("shapes_clip", config_lib.load(path, [result])) != key, result


def test_a_cached_run_that_starts_from_another_is_keyed_by_it_too(monkeypatch):
  # shapes_mat fine-tunes cache:shapes_clip: an edited clean pretraining is another starting model, so
  # the fine-tuning's cached run (and the fingerprint of its checkpoints) changes with it.
  from mat_jax import runs
  from mat_jax.training import mlm

  _, mat = runs.cached_experiment("shapes_mat")
  assert mat.model.source == "cache:shapes_clip"
  key, upstream = runs.cached_run_dir("shapes_mat", mat), runs.source_run(mat.model.source)
  assert upstream == runs.cached_run_dir("shapes_clip", runs.cached_experiment("shapes_clip")[1]).name
  assert runs.run_fingerprint(mat, None)["model.source_run"] == upstream
  clean = runs.run_fingerprint(runs.cached_experiment("shapes_clip")[1], None)
  assert "model.source_run" not in clean
  # The text threat's MLM as its cache directory: "shapes-mlm" alone does not change with its recipe.
  assert runs.run_fingerprint(mat, None)["text_attack.mlm"] == mlm.cached_dir().name
  assert "text_attack.mlm" not in clean  # no text attack in clean pretraining
  mat.text_attack.source = "paraphrase"
  assert "text_attack.mlm" not in runs.run_fingerprint(mat, None)
  mat.text_attack.source = "bert"
  before = runs.run_fingerprint(mat, None)["text_attack.mlm"]
  monkeypatch.setattr(mlm, "MLM_VERSION", mlm.MLM_VERSION + 1)  # a changed recipe: another threat
  assert runs.run_fingerprint(mat, None)["text_attack.mlm"] != before
  original = runs.cached_experiment

  def edited(name):
    path, config = original(name)
    if name == "shapes_clip":
      config.train.steps = 999
    return path, config

  monkeypatch.setattr(runs, "cached_experiment", edited)
  assert runs.source_run(mat.model.source) != upstream
  assert runs.cached_run_dir("shapes_mat", mat) != key


def test_a_cached_runs_key_follows_its_inner_attack_in_the_registry(monkeypatch):
  # The registry, not the config, fixes an inner attack's losses and text scoring: a run trained against
  # another version of "mmcoa" must not be reused.
  from mat_jax import runs
  from mat_jax.attacks import spec

  _, mmcoa = runs.cached_experiment("shapes_mmcoa")
  key = runs.cached_run_dir("shapes_mmcoa", mmcoa)
  assert runs.result_parts(mmcoa)["inner_attack"]["text_objective"] == "kl"
  assert "inner_attack" not in runs.result_parts(runs.cached_experiment("shapes_clip")[1])  # clean training
  monkeypatch.setitem(spec.ATTACKS, "mmcoa", spec.ATTACKS["mmcoa"].replace(text_objective="image"))
  assert runs.cached_run_dir("shapes_mmcoa", mmcoa) != key


def test_model_overrides_on_loaded_weights_are_refused(tmp_path):
  # Only a preset's architecture can change; on loaded weights an override was silently ignored.
  import helpers
  from mat_jax import runs

  model_dir = helpers.save_micro_clip(tmp_path / "clip")
  config = config_lib.build({"model": {"source": str(model_dir), "overrides": "vision.layers=3"}})
  with pytest.raises(config_lib.ConfigError, match=r"model.overrides='vision.layers=3' changes a preset's "
                                                   r"architecture, but model.source=.* loads trained weights"):
    runs.model_from_config(config)


def test_model_overrides_parse_their_fields_strictly():
  from mat_jax import runs

  base = runs.clip_config("tiny")
  changed = runs.parse_model_overrides("scan_layers=yes,vision.layers=1,vision.layer_norm_eps=1/1000", base)
  assert changed.scan_layers is True and changed.vision.layers == 1 and changed.vision.layer_norm_eps == 1e-3
  # A misspelt bool is refused, not read as false; a sequence field cannot be written between commas.
  for override, message in (("scan_layers=ture", "scan_layers='ture' is not true or false"),
                            ("vision.layers=2.5", "vision.layers='2.5' is not an integer"),
                            ("vision.image_mean=0.5", "vision.image_mean is a sequence"),
                            # Values the model cannot be built with: one error listing them, not a
                            # ZeroDivisionError or an XLA error from inside the model.
                            ("vision.heads=0,vision.layers=-1", r"cannot be built: vision.layers=-1 must be at least "
                                                                r"1; vision.heads=0 must be at least 1"),
                            ("vision.heads=3", "vision.width 256 is not divisible by vision.heads 3"),
                            ("vision.patch_size=64", "vision.patch_size 64 is larger than vision.image_size 48"),
                            ("text.activation=foo", r"text.activation='foo' is not one of \['gelu'"),
                            ("logit_scale_init=nan", "logit_scale_init=nan must be finite"),
                            ("text.context_length=2", r"text.context_length=2 must be at least 3"),
                            ("text.pad_token_id=-1", "text.pad_token_id=-1 is not an id of the"),
                            ("text.pooling=foo", "unknown text pooling 'foo'")):
    with pytest.raises(config_lib.ConfigError, match=message):
      runs.parse_model_overrides(override, base)


def test_a_section_given_as_a_plain_value_is_one_config_error():
  # A schedule or objective written as its name alone (the old schedule choices were plain names).
  for raw, section in [({"schedule": "cosine"}, "schedule"), ({"objective": "tecoa"}, "objective")]:
    with pytest.raises(config_lib.ConfigError, match=f"{section} must be a section"):
      config_lib.build(raw)


def test_objective_keys_of_a_file_that_does_not_name_its_objective_are_checked():
  # The default objective (contrastive) has no eps: a file's stray key is a typo, not dropped in silence.
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'objective \(contrastive\)\.eps'"):
    config_lib.build({"objective": {"eps": 0.1}})
  assert config_lib.build({"objective": {"eps": 0.1}}, ["--config.objective.name=tecoa"]).objective.eps == 0.1


def test_the_shapes_worlds_lexicon_keys_a_run_only_off_the_default_world(tmp_path):
  from mat_jax import runs

  path = _write(tmp_path, "return dict()")
  base = config_lib.fingerprint(config_lib.load(path))
  assert "data.build_rare_form_rate" not in base  # the default world's checkpoints keep their digest
  held_out = config_lib.load(path, ["data.build_rare_form_rate=0"])
  assert config_lib.fingerprint(held_out) == {**base, "data.build_rare_form_rate": 0.0}
  # A default-world checkpoint lacks the key: a held-out-forms run must not resume it.
  assert "data.build_rare_form_rate" not in config_lib.ADDED_FINGERPRINT_KEYS
  assert config_lib.rare_form_rate(held_out) == 0.0 and config_lib.rare_form_rate(config_lib.load(path)) is None
  with pytest.raises(config_lib.ConfigError, match=r"data.build_rare_form_rate=1.5: use a probability"):
    config_lib.load(path, ["data.build_rare_form_rate=1.5"])
  # Cached runs: the default world's key is what it was before the lexicon existed; another world's differs.
  clip_path, clip = runs.cached_experiment("shapes_clip")
  assert "build_rare_form_rate" not in config_lib.result_json(clip)
  held_out_clip = config_lib.load(clip_path, ["data.build_rare_form_rate=0"])
  assert runs.cached_run_dir("shapes_clip", held_out_clip) != runs.cached_run_dir("shapes_clip", clip)


@pytest.mark.parametrize("override, message", [
    (["data.build_rare_form_rate=nan"], "use a probability in"),
    (["data.name=flickr30k", "data.build_rare_form_rate=0"], "picks the shapes world's lexicon, but data.name"),
])
def test_a_lexicon_outside_the_shapes_world_or_not_a_probability_is_refused(tmp_path, override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load(_write(tmp_path, "return dict()"), override)


def test_words_a_training_attack_may_not_write_key_a_run_only_when_there_are_any(tmp_path):
  path = _write(tmp_path, "return dict(objective=dict(name='mat'))")
  base = config_lib.load(path)
  assert base.text_attack.exclude_words == ()
  assert "text_attack.exclude_words" not in config_lib.fingerprint(base)  # MAT checkpoints keep their digest
  assert "exclude_words" not in config_lib.result_json(base)              # and cached runs their key
  excluding = config_lib.load(path, ["text_attack.exclude_words=crimson,box"])
  assert excluding.text_attack.exclude_words == ("crimson", "box")
  assert config_lib.fingerprint(excluding) == {**config_lib.fingerprint(base),
                                               "text_attack.exclude_words": ["crimson", "box"]}
  assert "text_attack.exclude_words" not in config_lib.ADDED_FINGERPRINT_KEYS  # an older checkpoint is refused
  assert config_lib.result_json(excluding) != config_lib.result_json(base)
  for bad in ("text_attack.exclude_words=('dark red',)", "text_attack.exclude_words=('',)"):
    with pytest.raises(config_lib.ConfigError, match="text_attack.exclude_words=.* must list single words"):
      config_lib.load(path, [bad])


def test_remat_is_an_execution_option_that_keys_a_cached_run_only_when_set(tmp_path):
  path = _write(tmp_path, "return dict()")
  base = config_lib.load(path)
  assert base.model.remat == "none" and "remat" not in config_lib.result_json(base)
  remat = config_lib.load(path, ["model.remat=nothing_saveable"])
  # A checkpoint resumes under any policy (the same parameters and numbers) ...
  assert config_lib.fingerprint(remat) == config_lib.fingerprint(base)
  # ... and a cached run trained without one is not taken for one trained with it.
  assert '"remat": "nothing_saveable"' in config_lib.result_json(remat)
  with pytest.raises(config_lib.ConfigError, match="model.remat"):
    config_lib.load(path, ["model.remat=everything"])


def test_cached_run_keys_of_the_demo_stay_what_they_are():
  """Every user's cached world-model runs are found by these keys: a change that moves them (a new config
  key or model field that enters the key at its default) retrains them all. Change the pins only with a
  change that is meant to retrain."""
  from mat_jax import runs

  pinned = {"shapes_clip": "cd7b62accd200484", "shapes_clean_ft": "19928da181533e28",
            "shapes_tecoa": "fe652290ab8a87cb", "shapes_mat": "a7d7af53e65e5ecc"}
  for name, key in pinned.items():
    _, config = runs.cached_experiment(name)
    assert runs.cached_run_dir(name, config).name == f"{name}-{key}"
