"""Experiment files as data: `recipes.parse_arg`, every experiment file with every argument it takes, and
the errors of a bad argument."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from mat_jax import config as config_lib
from mat_jax import errors, objectives, recipes, study
from mat_jax.models import weights

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SHAPES = ("clip", "clean_ft", "fare", "mat", "matplus", "mava", "mmcoa", "tecoa")
# Files whose first argument picks a method, with its choices (as the files document them).
CHOICES = {
    "flickr30k": ("mat", "matplus", "tecoa", "fare", "mmcoa", "mava", "clean"),
    "coco": ("mat", "matplus", "tecoa", "fare", "mmcoa", "mava", "clean"),
    "flickr30k_blip": ("clean", "mat", "matplus", "tecoa"),
    "shapes_blip": ("clean", "tecoa", "mat", "matplus"),
}
DEFAULTS = {"flickr30k": "mat", "coco": "mat", "flickr30k_blip": "mat", "shapes_blip": "clean"}
CASES = [(f"shapes_{m}", arg) for m in SHAPES for arg in (None, "runlocal")] + [
    (name, arg) for name, choices in CHOICES.items()
    for arg in (None, "runlocal", *choices, *(f"{c},runlocal" for c in choices))]


# ----------------------------------------------------------------------------------------------------
# parse_arg.


def test_parse_arg_reads_typed_values():
  args = recipes.parse_arg("runlocal,steps=10,dataset=coco,lr=2/255,eps=1e-5", runlocal=False, steps=100,
                           dataset="flickr30k", lr=0.1, eps=0.0)
  assert (args.runlocal, args.steps, args.dataset) == (True, 10, "coco")
  assert type(args.steps) is int and args.lr == pytest.approx(2 / 255) and args.eps == 1e-5
  assert recipes.parse_arg(None, runlocal=False, steps=3).to_dict() == {"runlocal": False, "steps": 3}
  assert recipes.parse_arg("", runlocal=False).runlocal is False
  assert recipes.parse_arg(" runlocal = no , ", runlocal=True).runlocal is False
  assert recipes.parse_arg("runlocal=YES", runlocal=False).runlocal is True


def test_parse_arg_bare_word_is_the_first_key():
  spec = dict(defense=("mat", ("mat", "tecoa", "fare")), runlocal=False)
  assert recipes.parse_arg("tecoa,runlocal", **spec).to_dict() == {"defense": "tecoa", "runlocal": True}
  assert recipes.parse_arg("runlocal,fare", **spec).to_dict() == {"defense": "fare", "runlocal": True}
  assert recipes.parse_arg("defense=fare", **spec).defense == "fare"
  assert recipes.parse_arg(None, **spec).to_dict() == {"defense": "mat", "runlocal": False}
  # A free string as the first key takes any bare word.
  assert recipes.parse_arg("coco", dataset="flickr30k", runlocal=False).dataset == "coco"


@pytest.mark.parametrize("arg, message", [
    ("runlcal", r"unknown argument 'runlcal'. Did you mean 'runlocal'\? Arguments: defense=mat\|tecoa "
                r"\(or the value alone\), runlocal, steps=<int>"),
    ("matt", r"unknown argument 'matt'. Did you mean 'mat'\?"),
    ("defense=matt", r"defense='matt' is not one of mat, tecoa. Did you mean 'mat'\?"),
    ("stpes=3", r"unknown argument 'stpes'. Did you mean 'steps'\?"),
    ("steps=ten", r"argument steps='ten' is not an integer"),
    ("steps", r"argument 'steps' needs a value: write steps=<int>"),
    ("runlocal=maybe", r"write runlocal=true or runlocal=false"),
    ("mat,tecoa", r"argument defense is given twice \('mat' and 'tecoa'\)"),
    ("runlocal,runlocal=false", r"argument runlocal is given twice"),
])
def test_parse_arg_refuses_bad_arguments(arg, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    recipes.parse_arg(arg, defense=("mat", ("mat", "tecoa")), runlocal=False, steps=10)


def test_parse_arg_refuses_bad_values_of_each_type():
  with pytest.raises(config_lib.ConfigError, match=r"lr='fast' is not a number \(e.g. 0.01, 1e-5 or 2/255\)"):
    recipes.parse_arg("lr=fast", lr=0.1)
  with pytest.raises(config_lib.ConfigError, match="lr='1/0' is not a number"):
    recipes.parse_arg("lr=1/0", lr=0.1)
  with pytest.raises(config_lib.ConfigError, match="unknown argument 'quick'. The file takes no argument"):
    recipes.parse_arg("quick")


def test_parse_arg_refuses_a_bad_spec():
  with pytest.raises(TypeError, match="the default of 'sizes' is a list"):
    recipes.parse_arg(None, sizes=[1, 2])
  with pytest.raises(TypeError, match="default among the choices"):
    recipes.parse_arg(None, defense=("matt", ("mat", "tecoa")))


# ----------------------------------------------------------------------------------------------------
# The experiment files.


@pytest.mark.parametrize("name, arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_every_experiment_file_builds(name, arg):
  path = EXPERIMENTS / f"{name}.py"
  config = config_lib.load(path if arg is None else f"{path}:{arg}")
  full_arg = ",".join(p for p in (arg or "").split(",") if p != "runlocal")
  full = config_lib.load(f"{path}:{full_arg}" if full_arg else path)
  assert config.train.steps >= 1 and config.objective.name
  if arg is not None and "runlocal" in arg:
    assert config.train.steps < full.train.steps and config.train.batch_size < full.train.batch_size
    assert config.eval.max_images < full.eval.max_images
    if name.startswith("shapes_"):  # a random model: no cached clean model, no MLM to train
      assert config.model.source in ("tiny", "blip-tiny")
      assert config.text_attack.source == "paraphrase"
    else:  # the published model on the real corpus, a few steps
      assert config.model.source == full.model.source and config.data.name == full.data.name
    # Named apart: `python -m mat_jax.train` names the default workdir after the run, and the real run
    # would refuse the smoke test's checkpoints there.
    assert config.name == f"{full.name}_runlocal"
    # runlocal shrinks the run; what is trained (objective, towers, data) stays the same.
    assert config.objective.to_dict() == full.objective.to_dict()
    assert (config.train.towers, config.data.captions_per_image) == (full.train.towers,
                                                                      full.data.captions_per_image)


def test_a_smoke_test_given_a_text_attack_by_override_trains_no_masked_lm():
  """runlocal cannot know the overrides that follow it: a TeCoA trained against SGA, whose inner attack changes
  captions, still draws them from the paraphrase source."""
  config = config_lib.load(f"{EXPERIMENTS / 'shapes_tecoa.py'}:runlocal", ["objective.attack=sga"])
  assert objectives.make(config.objective).needs_text_candidates
  assert config.text_attack.source == "paraphrase"


def test_the_shared_text_threat_goes_to_the_methods_whose_attack_changes_captions():
  for method, spec in recipes.METHODS.items():
    config = config_lib.build(recipes.finetune(method))
    changes_captions = objectives.make(spec["objective"]).needs_text_candidates
    assert changes_captions == (method in ("mat", "matplus", "mmcoa"))
    if changes_captions:
      assert config.text_attack.to_dict() == {**config.text_attack.to_dict(), **recipes.TEXT_ATTACK}


@pytest.mark.parametrize("name", DEFAULTS)
def test_naming_the_default_argument_is_the_default_config(name):
  path = EXPERIMENTS / f"{name}.py"
  assert config_lib.load(f"{path}:{DEFAULTS[name]}").to_dict() == config_lib.load(path).to_dict()


def test_the_argument_picks_the_published_settings():
  mava = config_lib.load(f"{EXPERIMENTS / 'flickr30k.py'}:mava")
  assert (mava.name, mava.train.towers, mava.data.captions_per_image) == ("flickr30k_mava", "vision", 5)
  assert (mava.optimizer.name, mava.optimizer.learning_rate, mava.objective.neighbours) == ("adamw", 1e-4, 3)
  mmcoa = config_lib.load(f"{EXPERIMENTS / 'coco.py'}:mmcoa").optimizer  # MMCoA.py's torch.optim.Adam
  assert (mmcoa.name, mmcoa.learning_rate, mmcoa.weight_decay, mmcoa.b1, mmcoa.b2, mmcoa.eps) == (
      "adam", 1e-6, 0.2, 0.9, 0.98, 1e-6)
  coco = config_lib.load(f"{EXPERIMENTS / 'coco.py'}:tecoa")
  assert (coco.name, coco.data.name, coco.optimizer.name, coco.train.towers) == ("coco_tecoa", "coco", "sgd",
                                                                               "vision")
  assert coco.train.steps == recipes.CLIP_EPOCHS * 113_287 // recipes.CLIP_BATCH
  # Each defense's inner image attack as its reference trains it: (eps, steps, step size) in 1/255.
  published = {"mat": (2, 2, 1), "matplus": (2, 2, 1), "tecoa": (1, 2, 1), "fare": (2, 10, 1),
               "mmcoa": (1, 10, 1), "mava": (2, 10, 1)}  # MMCoA.py's config: epsilon 1, num_iters 10
  for defense, budget in published.items():
    objective = config_lib.load(f"{EXPERIMENTS / 'flickr30k.py'}:{defense}").objective
    assert (round(objective.eps * 255, 6), objective.steps, round(objective.step_size * 255, 6)) == budget
  blip = config_lib.load(f"{EXPERIMENTS / 'flickr30k_blip.py'}:matplus")
  assert (blip.data.image_size, blip.data.captions_per_image, blip.optimizer.weight_decay) == (384, 5, 0.05)
  assert blip.train.steps == 3_398  # BLIP's 6 epochs over its 145,000 image-caption pairs, batch 256
  # BLIP's cosine is set once per epoch (train_retrieval.py's cosine_lr_schedule, min_lr 0): constant within one.
  from mat_jax.training import optim
  rate = optim.make_schedule(blip.schedule, blip.optimizer.learning_rate, blip.train.steps)
  for epoch, first, last in ((0, 0, 565), (1, 566, 1132), (5, 2832, 3397)):
    expected = 1e-5 * (1 + math.cos(math.pi * epoch / 6)) / 2
    assert [float(rate(first)), float(rate(last))] == pytest.approx([expected, expected], rel=1e-6), epoch
  # The shapes BLIP defenses train the CLIP methods' objective and data.
  shapes_matplus = config_lib.load(EXPERIMENTS / "shapes_matplus.py")
  blip_matplus = config_lib.load(f"{EXPERIMENTS / 'shapes_blip.py'}:matplus")
  assert blip_matplus.objective.to_dict() == shapes_matplus.objective.to_dict()
  assert tuple(blip_matplus.data.augmentations) == tuple(shapes_matplus.data.augmentations)


def test_a_defense_lists_only_what_differs_from_its_objective():
  # A published hyper-parameter or tower lives once, in the objective (its inner attack's budget in the attack
  # registry); an entry of DEFENSES restating one would go stale when it is corrected there.
  for defense, spec in recipes.DEFENSES.items():
    cls = objectives.get_class(spec["objective"]["name"])
    defaults = objectives.hyperparameters(cls)
    assert all(defaults[k] != v for k, v in spec["objective"].items() if k != "name"), defense
    assert spec.get("towers") != cls.default_towers, defense
    config = config_lib.load(f"{EXPERIMENTS / 'flickr30k.py'}:{defense}")
    assert config.objective.to_dict() == {"name": cls.name, **defaults, **spec["objective"]}, defense
    assert config.train.towers == spec.get("towers", cls.default_towers), defense

@pytest.mark.parametrize("method", ("tecoa", "mat", "matplus"))
def test_shapes_blip_defenses_train_the_towers_of_the_clip_methods(method):
  # TeCoA is TeCoA-ITR (all towers) in both files, not the objective's default (vision).
  clip = config_lib.load(EXPERIMENTS / f"shapes_{method}.py")
  for arg in (method, f"{method},runlocal"):
    blip = config_lib.load(f"{EXPERIMENTS / 'shapes_blip.py'}:{arg}")
    assert blip.train.towers == clip.train.towers == recipes.METHODS[method]["towers"], arg


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.py")), ids=lambda p: p.stem)
def test_experiment_files_are_data(path):
  """No importlib between experiment files, no hand parsing: `arg` goes to recipes.parse_arg only."""
  tree = ast.parse(path.read_text())
  imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
              for alias in node.names} | {node.module for node in ast.walk(tree)
                                          if isinstance(node, ast.ImportFrom)}
  assert not {"importlib", "importlib.util", "sys"} & imported, imported
  get_config = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_config")
  uses = [n for n in ast.walk(get_config) if isinstance(n, ast.Name) and n.id == "arg"]
  calls = [n for n in ast.walk(get_config) if isinstance(n, ast.Call)
           and getattr(n.func, "attr", None) == "parse_arg" and any(a in uses for a in n.args)]
  assert len(uses) == len(calls) == 1, f"{path.name}: read `arg` with recipes.parse_arg(arg, ...) only"


def test_the_study_file_takes_quick_only():
  assert study.load(EXPERIMENTS / "study_shapes.py", quick=True)["name"] == "shapes_study_quick"
  with pytest.raises(config_lib.ConfigError, match="unknown argument 'quik'. Did you mean 'quick'"):
    config_lib.read_experiment_file(EXPERIMENTS / "study_shapes.py", "quik")


# ----------------------------------------------------------------------------------------------------
# Errors.


def test_a_bad_argument_is_one_line_naming_file_line_and_argument(tmp_path, capsys):
  from mat_jax import train

  path = EXPERIMENTS / "flickr30k.py"
  with pytest.raises(config_lib.ConfigError, match=r"flickr30k.py:\d+: get_config\('matt,runlocal'\): unknown "
                                                    r"argument 'matt'. Did you mean 'mat'\?"):
    config_lib.load(f"{path}:matt,runlocal")
  assert train.main(["--config", f"{EXPERIMENTS / 'shapes_clip.py'}:runlcal", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "Did you mean 'runlocal'?" in err


def test_an_argument_to_a_file_that_takes_none(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text("def get_config():\n  return {}\n")
  with pytest.raises(config_lib.ConfigError, match=r"get_config takes no argument, but 'runlocal' was given"):
    config_lib.load(f"{path}:runlocal")
  assert config_lib.load(path).train.steps >= 1


def test_a_recipe_refusing_a_value_names_the_line(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text("from mat_jax import recipes\n\n\ndef get_config(arg=None):\n"
                  "  return recipes.finetune('matt')\n")
  with pytest.raises(config_lib.ConfigError, match=rf"{path}:5: get_config\(\): unknown method 'matt'"):
    config_lib.load(path)


def test_one_config_error_class():
  assert config_lib.ConfigError is errors.ConfigError is weights.ConfigError
  assert issubclass(errors.ConfigError, errors.MatJaxError) and issubclass(errors.ConfigError, ValueError)
