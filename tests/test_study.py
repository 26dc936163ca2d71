"""The shared budget (recipes), the ablation switches (1:1 modelling, N:1 renderings, misaligned captions)
and the study runner: bad input, resumption, the intervals, and the --quick study end to end."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mat_jax import config as config_lib
from mat_jax import intervals, recipes, runs, study
from mat_jax.attacks.candidates import BertMLMSource
from mat_jax.data import corpora, pipeline, shapes
from mat_jax.errors import ConfigError
from mat_jax.models import BertForMaskedLM, bert_config, load_tokenizer, save_bert_mlm
from mat_jax.objectives.contrastive import clip_loss, contrastive_loss
from mat_jax.training import inputs, mlm

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SHARED = ("model", "optimizer", "schedule")


# ----------------------------------------------------------------------------------------------------
# One budget.


def test_every_method_shares_one_budget():
  configs = {m: config_lib.load(EXPERIMENTS / f"shapes_{m}.py") for m in recipes.METHODS}
  base = configs["mat"]
  for method, c in configs.items():
    for section in SHARED:
      assert c[section].to_dict() == base[section].to_dict(), (method, section)
    assert (c.train.steps, c.train.batch_size, c.data.image_size, c.seed) == (
        base.train.steps, base.train.batch_size, base.data.image_size, base.seed), method
    inner = {k: c.objective[k] for k in ("eps", "steps", "step_size") if k in c.objective}
    assert inner in ({}, {"eps": recipes.EPS, "steps": recipes.INNER_STEPS, "step_size": recipes.INNER_STEP_SIZE})
  assert configs["tecoa"].train.towers == "all"  # TeCoA-ITR
  assert configs["fare"].train.towers == configs["mava"].train.towers == "vision"
  assert configs["clean_ft"].objective.name == "contrastive"


def test_a_variant_may_change_only_method_defining_sections():
  c = recipes.finetune("matplus", 1, {"objective": {"one_to_one": True}, "data": {"captions_per_image": 5}})
  assert c.objective.one_to_one and c.data.captions_per_image == 5 and c.seed == 1
  with pytest.raises(ValueError, match="only the method-defining sections"):
    recipes.finetune("mat", variant={"optimizer": {"learning_rate": 1.0}})
  with pytest.raises(ValueError, match="unknown method 'matt'"):
    recipes.finetune("matt")
  # The text attack a method trains against is method-defining too, where the method has one.
  c = recipes.finetune("mat", variant={"text_attack": {"source": "paraphrase"}})
  assert c.text_attack.source == "paraphrase" and c.text_attack.top_k == recipes.TEXT_ATTACK["top_k"]
  assert recipes.finetune("mat").text_attack.source == recipes.TEXT_ATTACK["source"] == "bert"
  with pytest.raises(ValueError, match="tecoa trains against no text attack"):
    recipes.finetune("tecoa", variant={"text_attack": {"source": "paraphrase"}})
  # Never the budget every method shares: the inner attack's strength, the images, the threat's strength.
  for section, values in (("objective", {"eps": 8 / 255, "steps": 10}), ("objective", {"text_changes": 3}),
                          ("objective", {"attack": "sga"}), ("data", {"image_size": 64}),
                          ("text_attack", {"top_k": 50})):
    with pytest.raises(ValueError, match=f"variant {section}.* part of the budget every method shares"):
      recipes.finetune("mat", variant={section: values})


# ----------------------------------------------------------------------------------------------------
# Switches.


def test_one_to_one_treats_an_images_other_captions_as_negatives():
  rng = np.random.default_rng(0)
  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
  images = jnp.asarray(unit(rng.normal(size=(3, 8))), jnp.float32)
  texts = jnp.asarray(unit(rng.normal(size=(3, 2, 8))), jnp.float32)
  scale = jnp.asarray(np.log(10.0), jnp.float32)
  # Compiled whole: run op by op, these few losses cost about a hundred tiny compilations.
  loss = jax.jit(clip_loss, static_argnames="one_to_one")
  one_to_n, _ = loss(images, texts, scale)
  one_to_one, _ = loss(images, texts, scale, one_to_one=True)
  # 1:1 is plain CLIP over the 6 pairs (image repeated per caption), every other pair a negative.
  pairs = jnp.arange(6)
  expected, _ = jax.jit(contrastive_loss)(jnp.repeat(images, 2, axis=0), texts.reshape(6, 8), scale, pairs, pairs)
  np.testing.assert_allclose(one_to_one, expected, rtol=1e-6)
  assert abs(float(one_to_one) - float(one_to_n)) > 1e-3
  # With one caption per image and distinct images the two modellings coincide.
  a, _ = loss(images, texts[:, 0], scale)
  b, _ = loss(images, texts[:, 0], scale, one_to_one=True)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_misalign_writes_a_caption_that_no_longer_fits_its_scene():
  rng = np.random.default_rng(0)
  for i in range(40):
    scene = shapes.scene_for(0, "test", i)
    caption = shapes.describe(scene, rng)
    wrong = shapes.misalign(caption, rng)
    assert len(wrong.split()) == len(caption.split())
    assert not shapes.consistent(shapes.parse(wrong), scene), (caption, wrong)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("study_world")
  builder = corpora.build_shapes(root / "data", train=12, val=0, test=4, seed=3, log=lambda m: None)
  from mat_jax.models.tokenizers import load_tokenizer

  return corpora.data_source(builder, "train"), load_tokenizer(shapes.build_tokenizer(root / "tok"), context_length=24)


def test_renderings_of_one_scene_share_its_id_and_its_captions(world):
  source, tok = world
  it = iter(pipeline.training_pipeline(source, tok, 6, captions_per_image=2, renderings_per_scene=3, seed=1,
                                       process_index=0, process_count=1))
  batch = next(it)
  assert batch["images"].shape[0] == 6 and batch["input_ids"].shape[:2] == (6, 2)
  ids = batch["image_ids"]
  assert (ids[0] == ids[:3]).all() and (ids[3] == ids[3:]).all() and ids[0] != ids[3]
  # Three different renderings of one scene, each captioned truly.
  assert not np.allclose(batch["images"][0], batch["images"][1])
  for i in range(6):
    scene = shapes.Scene.from_record(source[int(ids[i])]["scene"])
    assert all(shapes.consistent(shapes.parse(str(c)), scene) for c in batch["captions"][i])
  with pytest.raises(ValueError, match="must be >= 1 and divide the batch size"):
    pipeline.training_pipeline(source, tok, 4, renderings_per_scene=3, process_index=0, process_count=1)
  # With hflip all renderings of a scene are mirrored or none: each one's captions are positives of the
  # others, so every caption of a scene's renderings must be true of one scene (mirrored or not).
  mirrored = 0
  for seed in range(4):
    batch = next(iter(pipeline.training_pipeline(source, tok, 6, captions_per_image=2, renderings_per_scene=3,
                                                 augmentations="hflip:0.5", seed=seed, process_index=0,
                                                 process_count=1)))
    for first in (0, 3):
      scene = shapes.Scene.from_record(source[int(batch["image_ids"][first])]["scene"])
      captions = [str(c) for i in range(first, first + 3) for c in batch["captions"][i]]
      true_of = [all(shapes.consistent(shapes.parse(c), s) for c in captions)
                 for s in (scene, shapes.flip_scene(scene))]
      assert any(true_of), captions
      mirrored += not true_of[0]
  assert mirrored > 0  # some scenes were mirrored


def test_renderings_must_divide_the_batch_in_the_config():
  raw = recipes.finetune("matplus", variant={"data": {"renderings_per_scene": 5}})
  with pytest.raises(config_lib.ConfigError, match=r"renderings_per_scene=5 must .* divide train.batch_size \(64\)"):
    config_lib.build(raw)
  assert config_lib.build(recipes.finetune("matplus", variant={"data": {"augmentations": ("misalign:0.3",)}}))


# ----------------------------------------------------------------------------------------------------
# The study: bad input.


def _study_file(tmp_path, body: str) -> Path:
  path = tmp_path / "s.py"
  path.write_text("import sys\nsys.path.insert(0, %r)\nfrom study_shapes import get_config as base\n\n"
                  "def get_config(arg=None):\n  c = base('quick')\n%s  return c\n" % (str(EXPERIMENTS), body))
  return path


@pytest.mark.parametrize("body, message", [
    ("  c.arms['x'] = dict(method='tecoaa', variant={}, attacks=('clean',))\n",
     "arm 'x' names unknown method 'tecoaa' \\(did you mean 'tecoa'\\?\\)"),
    ("  c.arms['x'] = dict(method='mat', variant={}, attacks=('clean', 'sgaa'))\n",
     "arm 'x' names unknown attack\\(s\\) \\['sgaa'\\]"),
    ("  c.seeds = 0\n", "seeds=0 must be an integer >= 1"),
    ("  c.arms['x'] = dict(method='mat', variant={'optimizer': {}}, attacks=('clean',))\n",
     "only the method-defining sections"),
    ("  c.arms['x'] = dict(method='mat', variant={'objective': {'eps': 8/255}}, attacks=('clean',))\n",
     "arm 'x': variant objective.eps: part of the budget"),
    ("  c.arms['x'] = dict(method='tecoa', variant={}, attacks=('clean',), step_factor=2)\n",
     "arm 'x' has unknown key\\(s\\) \\['step_factor'\\]; an arm's keys: method, variant, attacks, steps_factor"),
    ("  c.arms['x'] = dict(method='tecoa', variant={}, attacks=('clean',), steps_factor=0.5)\n",
     "arm 'x': steps_factor=0.5: a compute-matched control trains a whole number"),
    ("  c.bootstrap = 2000\n", "the study key 'bootstrap' is not used"),
    ("  c.eval_images = -5\n", "eval_images=-5 must be an integer >= 0"),
    ("  c = type(c)({**c.to_dict(), 'eval_images': 12.0})\n", "eval_images=12.0 must be an integer >= 0"),
    ("  c.eval_images = 1\n", "eval_images=1: an interval over test images needs at least 2"),
    ("  c.eval_batch = 0\n", "eval_batch=0 must be an integer >= 1"),
    ("  c = type(c)({**c.to_dict(), 'eval_batch': 1e2})\n", "eval_batch=100.0 must be an integer >= 1"),
    ("  c.seeds = True\n", "seeds=True must be an integer >= 1"),
    ("  c.eps_255 = -1\n", "eps_255 must be >= 0 and finite"),
    ("  c.eps_255 = float('nan')\n", "eps_255 must be >= 0 and finite"),
    ("  c.eps_255 = 300\n", "eps_255=300 is more than the whole pixel range"),
    # An attack at another budget: one with an image budget, at a valid budget other than the study's,
    # written once (co@4, never co@4.0 beside it).
    ("  c.arms['mat'].attacks = ('clean', 'co@4.0')\n", "arm 'mat': co@4.0: write co@4"),
    ("  c.arms['mat'].attacks = ('clean', 'bert@4')\n", "bert@4: bert has no image budget; write bert"),
    ("  c.arms['mat'].attacks = ('clean', 'co@2')\n", "co@2 is co at the study's own budget \\(eps_255=2\\)"),
    ("  c.arms['mat'].attacks = ('clean', 'co@300')\n", "co@300: eps_255=300 is more than the whole pixel range"),
    ("  c.arms['mat'].attacks = ('clean', 'co@four')\n", "unknown attack\\(s\\) \\['co@four'\\].*ATTACK@E"),
    # An arm trained at another budget: a valid one, not the shared one, for a method with an image attack.
    ("  c.arms['mat'].train_eps_255 = 2\n", "arm 'mat': train_eps_255=2 is the shared budget's ε; leave the key out"),
    ("  c.arms['clean_ft'].train_eps_255 = 4\n", "arm 'clean_ft': clean_ft trains without an image attack"),
    ("  c.arms['mat'].train_eps_255 = 0\n", "arm 'mat': train_eps_255=0: a training budget is a number in \\(0, 64\\]"),
    ("  c.arms['mat'].train_eps_255 = float('inf')\n", "train_eps_255=inf: a training budget is a number in"),
    ("  c.arms['mat'].train_eps_255 = 65\n", "train_eps_255=65: a training budget is a number in \\(0, 64\\]"),
    ("  c.arms['mat'].train_eps_255 = '4'\n", "train_eps_255='4': a training budget is a number in \\(0, 64\\]"),
])
def test_bad_study_files_fail_in_one_line(tmp_path, body, message):
  with pytest.raises(study.StudyError, match=message):
    study.load(_study_file(tmp_path, body))


def test_a_study_dir_refuses_another_studys_training_settings(tmp_path):
  quick = study.load(EXPERIMENTS / "study_shapes.py", quick=True)
  study.check_study_dir(tmp_path, quick)
  study.check_study_dir(tmp_path, quick)  # the same study: accepted (resume)
  other = json.loads(json.dumps(quick))
  other["eps_255"] = 4.0
  other["arms"]["mat"]["variant"] = {"objective": {"one_to_one": True}}
  with pytest.raises(study.StudyError,
                     match=r"differs in arms.mat.variant.objective is new; eps_255: 2.0 there, 4.0 here"):
    study.check_study_dir(tmp_path, other)


def test_shards_adding_arms_at_once_both_keep_theirs(tmp_path, monkeypatch):
  """Two shards start together, each adding an arm: each reads, merges and writes the study file. Without
  one writer at a time the later write drops the other's arm (and its record of how its runs trained)."""
  import threading

  quick = study.load(EXPERIMENTS / "study_shapes.py", quick=True)
  study.check_study_dir(tmp_path, quick)
  write, started, release = study.paths_lib.write_text_atomically, threading.Event(), threading.Event()

  def slow_write(path, text):
    started.set()
    assert release.wait(30)
    return write(path, text)

  with_tecoa, with_fare = (json.loads(json.dumps(quick)) for _ in range(2))
  with_tecoa["arms"]["tecoa"] = {"method": "tecoa", "variant": {}, "attacks": ["clean"]}
  with_fare["arms"]["fare"] = {"method": "fare", "variant": {}, "attacks": ["clean"]}
  monkeypatch.setattr(study.paths_lib, "write_text_atomically", slow_write)
  first = threading.Thread(target=study.check_study_dir, args=(tmp_path, with_tecoa), kwargs=dict(log=print))
  first.start()
  assert started.wait(30)  # the first has read the file and is writing its merge
  monkeypatch.setattr(study.paths_lib, "write_text_atomically", write)
  waited: list[str] = []
  second = threading.Thread(target=study.check_study_dir, args=(tmp_path, with_fare), kwargs=dict(log=waited.append))
  second.start()
  second.join(1.0)
  assert second.is_alive() and waited and waited[0].startswith("waiting for the process holding")
  release.set()
  first.join(30)
  second.join(30)
  recorded = json.loads((tmp_path / study.STUDY_FILE).read_text())
  assert {"tecoa", "fare"} <= set(recorded["arms"]) and {"tecoa", "fare"} <= set(recorded[study.TRAINED_AS])


def test_a_study_dir_takes_more_arms_seeds_attacks_and_test_images_but_not_a_changed_arm(tmp_path):
  quick = study.load(EXPERIMENTS / "study_shapes.py", quick=True)
  study.check_study_dir(tmp_path, quick)
  grown = json.loads(json.dumps(quick))
  grown["arms"]["tecoa"] = {"method": "tecoa", "variant": {}, "attacks": ["clean"]}
  study.check_study_dir(tmp_path, grown)  # an added arm: its runs join the dir's
  assert set(json.loads((tmp_path / study.STUDY_FILE).read_text())["arms"]) == set(grown["arms"])
  fewer = json.loads(json.dumps(quick))
  del fewer["arms"]["mat"]
  study.check_study_dir(tmp_path, fewer)  # a left-out arm: its runs stay in the dir
  assert set(json.loads((tmp_path / study.STUDY_FILE).read_text())["arms"]) == set(grown["arms"])
  # More seeds, other attacks, another test subset: the trained runs are reused, the evaluations on
  # each subset kept apart.
  evaluated = json.loads(json.dumps(grown))
  evaluated.update(seeds=3, eval_images=0)
  evaluated["arms"]["tecoa"]["attacks"] = ["clean", "pgd"]
  study.check_study_dir(tmp_path, evaluated)
  assert json.loads((tmp_path / study.STUDY_FILE).read_text())["seeds"] == 3
  assert study._eval_dir(tmp_path / "r", evaluated) == tmp_path / "r" / "eval" / "test-all"
  assert study._eval_dir(tmp_path / "r", grown) == tmp_path / "r" / "eval" / "test-12"
  # A dir whose file predates a key (here model_overrides) holds the study that omits it.
  plain = {**json.loads(json.dumps(grown)), "model_overrides": None}
  (tmp_path / study.STUDY_FILE).write_text(json.dumps({k: v for k, v in plain.items() if k != "model_overrides"}))
  study.check_study_dir(tmp_path, plain)
  study.check_study_dir(tmp_path, {**plain, "model_overrides": ""})  # empty: no setting either
  with pytest.raises(study.StudyError, match="model_overrides: None there, 'text.layers=3' here"):
    study.check_study_dir(tmp_path, {**plain, "model_overrides": "text.layers=3"})
  changed = json.loads(json.dumps(grown))
  changed["arms"]["tecoa"]["method"] = "fare"
  with pytest.raises(study.StudyError, match=r"differs in arms.tecoa.method"):
    study.check_study_dir(tmp_path, changed)


def test_a_study_dir_with_runs_but_no_study_file_is_refused(tmp_path):
  # Without study.json nothing says what the runs were trained and evaluated under: they are not reused.
  quick = study.load(EXPERIMENTS / "study_shapes.py", quick=True)
  (tmp_path / "runs" / "mat-s0").mkdir(parents=True)
  with pytest.raises(study.StudyError, match=r"holds runs but no study.json.*delete that directory"):
    study.check_study_dir(tmp_path, quick)
  assert not (tmp_path / study.STUDY_FILE).exists()
  study.check_study_dir(tmp_path / "new", quick)  # a new dir (or one without runs) is a new study
  assert (tmp_path / "new" / study.STUDY_FILE).exists()


def test_evaluations_of_a_dir_without_subsets_are_filed_under_its_subset(tmp_path):
  quick = study.load(EXPERIMENTS / "study_shapes.py", quick=True)
  study.check_study_dir(tmp_path, quick)
  flat = tmp_path / "runs" / "mat-s0" / "eval"
  flat.mkdir(parents=True)
  for name in ("co.json", "co.npz"):
    (flat / name).write_text(name)
  study.check_study_dir(tmp_path, {**quick, "eval_images": 0})  # the dir's file says 12 images
  assert sorted(p.name for p in (flat / "test-12").iterdir()) == ["co.json", "co.npz"]
  assert not (flat / "co.npz").exists() and not (flat / "test-all").exists()


def test_a_report_reads_evaluations_of_a_dir_without_subsets_where_they_are(tmp_path):
  # --report-only writes nothing: the older layout's files stay put and are read from the flat eval/.
  quick = study.load(EXPERIMENTS / "study_shapes.py", quick=True)
  study.check_study_dir(tmp_path, quick)
  run = tmp_path / "runs" / "mat-s0"
  (run / "eval").mkdir(parents=True)
  (run / "eval" / "co.json").write_text("{}")
  before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
  study.check_study_dir(tmp_path, quick, reading=True)
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
  recorded = json.loads((tmp_path / study.STUDY_FILE).read_text())
  assert study._eval_dir_to_read(run, quick, recorded) == run / "eval"
  # Another subset than the one the dir recorded: those files are not its evaluations.
  assert study._eval_dir_to_read(run, {**quick, "eval_images": 0}, recorded) == run / "eval" / "test-all"
  study.check_study_dir(tmp_path, quick)  # a run files them under their subset, where a report then reads them
  assert study._eval_dir_to_read(run, quick, recorded) == run / "eval" / "test-12"


def test_a_study_dir_refuses_runs_the_code_now_resolves_otherwise(tmp_path, monkeypatch):
  # The study file unchanged, but the shared budget in recipes.py changed: the dir's finished runs were
  # trained under the old one and must not sit in a table beside runs of the new one.
  quick = study.load(EXPERIMENTS / "study_shapes.py", quick=True)
  study.check_study_dir(tmp_path, quick)
  assert set(json.loads((tmp_path / study.STUDY_FILE).read_text())[study.TRAINED_AS]) == set(quick["arms"])
  monkeypatch.setattr(recipes, "FINETUNE_OPTIMIZER", {**recipes.FINETUNE_OPTIMIZER, "learning_rate": 1e-4})
  with pytest.raises(study.StudyError, match=r"the runs of arm\(s\) .*mat.* were trained under settings"):
    study.check_study_dir(tmp_path, quick)
  monkeypatch.undo()
  # A dir written before the record existed (no trained_as; arms saved without a variant key) is
  # compared on its settings only.
  saved = json.loads((tmp_path / study.STUDY_FILE).read_text())
  del saved[study.TRAINED_AS]
  for arm in saved["arms"].values():
    arm.pop("variant")
  (tmp_path / study.STUDY_FILE).write_text(json.dumps(saved))
  study.check_study_dir(tmp_path, quick)
  assert study.TRAINED_AS in json.loads((tmp_path / study.STUDY_FILE).read_text())


def test_a_study_dir_refuses_evaluations_under_another_text_threat_or_attack_settings(tmp_path, monkeypatch):
  # "shapes-mlm" names the threat in the study file whatever the MLM's recipe: the dir records the MLM's
  # cache directory and the attack settings, so a changed recipe cannot mix two threats in one table.
  from mat_jax import evaluate as evaluate_lib
  from mat_jax.training import mlm

  full = study.load(EXPERIMENTS / "study_shapes.py")  # the quick study's threat is the paraphrase lexicon
  study.check_study_dir(tmp_path, full)
  record = json.loads((tmp_path / study.STUDY_FILE).read_text())[study.EVALUATED_WITH]
  assert record["text_mlm"] == mlm.cached_dir().name and record["attack_settings"]["steps"] == 10
  with monkeypatch.context() as patch:
    patch.setattr(mlm, "MLM_VERSION", mlm.MLM_VERSION + 1)
    with pytest.raises(study.StudyError, match=r"another text threat \(text_mlm: .*also trained against"):
      study.check_study_dir(tmp_path, full)
  evaluation = study._eval_dir(tmp_path / "runs" / "mat-s0", full) / "pgd.npz"
  evaluation.parent.mkdir(parents=True)
  evaluation.write_bytes(b"")
  with monkeypatch.context() as patch:
    patch.setattr(evaluate_lib, "AttackSettings", functools.partial(evaluate_lib.AttackSettings, steps=20))
    with pytest.raises(study.StudyError, match=r"another attack setting \(attack_settings.steps: 10 there, 20 here\)"
                                               r"; delete its runs/\*/eval"):
      study.check_study_dir(tmp_path, full)
    # --report-only reads what the dir holds: it says the difference and writes nothing.
    lines, before = [], (tmp_path / study.STUDY_FILE).read_text()
    study.check_study_dir(tmp_path, full, reading=True, log=lines.append)
    assert len(lines) == 1 and "attack_settings.steps" in lines[0]
    assert (tmp_path / study.STUDY_FILE).read_text() == before
    # Done as the refusal says (the evaluations deleted, the trained runs kept): accepted, the new
    # settings recorded for the evaluations to come.
    shutil.rmtree(tmp_path / "runs" / "mat-s0" / "eval")
    study.check_study_dir(tmp_path, full)
    assert json.loads((tmp_path / study.STUDY_FILE).read_text())[study.EVALUATED_WITH]["attack_settings"]["steps"] == 20
  study.check_study_dir(tmp_path, full)  # back to the defaults, still nothing evaluated: accepted
  # A dir written before the record existed takes the current one.
  saved = json.loads((tmp_path / study.STUDY_FILE).read_text())
  del saved[study.EVALUATED_WITH]
  (tmp_path / study.STUDY_FILE).write_text(json.dumps(saved))
  study.check_study_dir(tmp_path, full)
  assert json.loads((tmp_path / study.STUDY_FILE).read_text())[study.EVALUATED_WITH] == record


def test_the_studys_text_source_keeps_an_arms_own_and_the_threats_mlm():
  quick = study.load(EXPERIMENTS / "study_shapes.py", quick=True)
  arm = study.Arm("mat_chars", "mat", {"text_attack": {"source": "charedit"}}, ("clean",))
  for text_source in ("paraphrase", "bert"):
    settings = {**quick, "text_source": text_source}
    assert study.run_config(settings, arm, 0).text_attack.source == "charedit"
    plain = study.run_config(settings, study.arm_of(settings, "mat"), 0).text_attack
    assert (plain.source, plain.bert) == (text_source, recipes.TEXT_ATTACK["bert"])
    assert study.text_threat(settings) == {**recipes.TEXT_ATTACK, "source": text_source}


def test_the_study_file_argument_names_a_variant():
  full = study.load(EXPERIMENTS / "study_shapes.py")
  alignment = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:full")
  assert set(alignment["arms"]) - set(full["arms"]) == {"mmcoa", "mava", "matplus_text", "matplus_image",
                                                         "matplus_misaligned", "matplus_diverse"}
  assert {**alignment, "arms": None} == {**full, "arms": None}
  with pytest.raises(study.StudyError, match="exclude each other"):
    study.load(f"{EXPERIMENTS / 'study_shapes.py'}:full", quick=True)
  # Some arms of a variant, as it defines them, in its study dir (the same name and settings), so that more
  # seeds for a few claims join the runs the whole study trained.
  chosen = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:full,seeds=5,arms=matplus+matplus_text+matplus_image")
  assert chosen["arms"] == {arm: alignment["arms"][arm] for arm in ("matplus", "matplus_text", "matplus_image")}
  assert {**chosen, "arms": None, "seeds": 3} == {**alignment, "arms": None}
  with pytest.raises(study.StudyError, match=r"no arm matplus_text in this variant; its arms are .*matplus_1to1"):
    study.load(f"{EXPERIMENTS / 'study_shapes.py'}:arms=mat+matplus_text")  # an arm of `full` only
  # Claim 6's arm: MAT whose training text attack is the paraphrase source, evaluated like MAT.
  paraphrase = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:full,paraphrase")
  assert set(paraphrase["arms"]) - set(alignment["arms"]) == {"mat_paraphrase"}
  arm = study.arm_of(paraphrase, "mat_paraphrase")
  assert arm.attacks == tuple(paraphrase["arms"]["mat"]["attacks"])
  assert study.run_config(paraphrase, arm, 0).text_attack.source == "paraphrase"
  assert study.run_config(paraphrase, study.arm_of(paraphrase, "mat"), 0).text_attack.source == "bert"
  claimed = {(better, other) for _, better, other, _ in study.CLAIMS}
  assert {("mat_paraphrase", "mat"), ("mat_paraphrase", "tecoa")} <= claimed


def test_an_mlm_that_does_not_fit_its_tokenizer_is_refused(tmp_path, monkeypatch):
  # The one resolver of candidate sources refuses it (training, evaluation, the demo); the study through it.
  tokenizer = load_tokenizer(mlm.save_tokenizer(tmp_path / "tokenizer"))

  def saved_mlm(vocab_size: int) -> str:
    config = bert_config("tiny", vocab_size=vocab_size, max_position_embeddings=shapes.DEFAULT_CONTEXT_LENGTH)
    return str(save_bert_mlm(BertForMaskedLM(config, rngs=nnx.Rngs(0)), tmp_path / f"mlm-{vocab_size}",
                             tokenizer=tokenizer))

  mismatched = saved_mlm(200)
  message = (rf"the masked LM in {re.escape(mismatched)} predicts 200 tokens but its tokenizer has "
             rf"{tokenizer.vocab_size}: they are not a pair.*text_attack.bert \(--bert\)")
  with pytest.raises(ConfigError, match=message):
    inputs.make_source("bert", bert=mismatched, top_k=5, log=lambda _: None)
  monkeypatch.setattr(recipes, "TEXT_ATTACK", dict(source="bert", bert=mismatched, top_k=5))
  with pytest.raises(study.StudyError, match="text threat .*" + message):
    study.text_sources({"text_source": None}, eval_set=None)
  paired = inputs.make_source("bert", bert=saved_mlm(tokenizer.vocab_size), top_k=5, log=lambda _: None)
  assert isinstance(paired, BertMLMSource) and paired.tokenizer.vocab_size == tokenizer.vocab_size


# ----------------------------------------------------------------------------------------------------
# Intervals.


def test_per_image_values_average_to_the_recalls():
  rng = np.random.default_rng(0)
  tr = (rng.random(50) < 0.6).astype(float)
  count = rng.integers(1, 4, 50).astype(float)
  ir = np.minimum(rng.integers(0, 4, 50), count)
  values = {m: intervals.per_image([(tr, ir, count)] * 2, m) for m in study.METRICS}
  assert values["tr@1"].shape == (2, 50)
  np.testing.assert_allclose(values["tr@1"].mean(1), 100 * tr.mean())
  np.testing.assert_allclose(values["ir@1"].mean(1), 100 * ir.sum() / count.sum())  # IR@1: hits over captions


def test_one_seed_interval_is_students_over_the_images():
  from scipy import stats

  rng = np.random.default_rng(1)
  values = 100 * (rng.random((1, 400)) < 0.6)
  lo, hi = intervals.interval(values)
  half = stats.t.ppf(0.975, 399) * values.std(ddof=1) / np.sqrt(400)
  np.testing.assert_allclose([lo, hi], [values.mean() - half, values.mean() + half])
  assert intervals.interval(values - values) == [0.0, 0.0]  # an arm against itself: no difference, no width
  with pytest.raises(ValueError, match="at least 2 images"):
    intervals.interval(values[:, :1])
  # Unchecked, each gave [nan, nan] or a raw unpacking error.
  for bad, level, message in [(values, 95, r"level=95 must be a fraction in \(0, 1\)"),
                              (np.where(np.arange(400) == 3, np.nan, values), 0.95, "1 non-finite entries"),
                              (values[0], 0.95, r"for one seed pass values\[None\]")]:
    for fn in (intervals.interval, intervals.recall_interval):
      with pytest.raises(ValueError, match=message):
        fn(bad, level)
  assert intervals.recall_interval(values.tolist()) == intervals.recall_interval(values)


def test_the_seed_component_widens_the_interval_with_few_seeds():
  # Only the seeds differ (every image alike within a seed): the interval is Student's t over the S seed
  # means, with S - 1 degrees of freedom.
  from scipy import stats

  seed_means = np.array([60.0, 64.0, 71.0])
  values = np.repeat(seed_means[:, None], 200, axis=1)
  lo, hi = intervals.interval(values)
  half = stats.t.ppf(0.975, 2) * seed_means.std(ddof=1) / np.sqrt(3)
  np.testing.assert_allclose([lo, hi], [seed_means.mean() - half, seed_means.mean() + half], rtol=1e-9)


def _hits(rng, n_images, seeds, effect, seed_sd):
  """A retrieval-like world: an image's difficulty shared by both arms and every seed, a training-seed
  effect per arm and seed, and noise per seed and image; arm "a" better by `effect` (latent units)."""
  difficulty = rng.normal(size=n_images)
  def arm(shift):
    seed = rng.normal(0, seed_sd, seeds)[:, None]
    return 100.0 * (difficulty + 0.5 + shift + seed + rng.normal(0, 0.5, (seeds, n_images)) > 0)
  return arm(effect), arm(0.0)


@pytest.mark.parametrize("seed_sd", [0.0, 0.15])
def test_intervals_of_differences_cover_the_expected_difference_at_95_percent(seed_sd):
  # The population difference: P(d + 0.5 + effect + u + e > 0) over difficulty, seed and noise.
  from scipy import stats

  rng = np.random.default_rng(2)
  scale = np.sqrt(1 + seed_sd ** 2 + 0.25)
  truth = 100 * (stats.norm.cdf(0.6 / scale) - stats.norm.cdf(0.5 / scale))
  trials, covered, null_holds, widths = 600, 0, 0, []
  for _ in range(trials):
    a, b = _hits(rng, 500, 3, 0.1, seed_sd)
    lo, hi = intervals.interval(a - b)
    covered += lo <= truth <= hi
    widths.append(hi - lo)
    a, b = _hits(rng, 500, 3, 0.0, seed_sd)
    null_holds += intervals.interval(a - b)[0] > 0
  # With a seed-to-seed spread (seed_sd 0.15: ~5 points of recall), a percentile bootstrap that resamples
  # the 3 seeds covered ~80%, and Satterthwaite's sum alone 93.7% here (its degrees of freedom grow when the
  # seed part's own estimate comes out small); a 95% interval must cover at least about 95% and, without an
  # effect, lie above 0 at most about 2.5% of the time.
  assert covered / trials >= 0.945, covered / trials
  assert null_holds / trials <= 0.035, null_holds / trials
  # Not by being needlessly wide: 8.6 and 30.8 points on average here (one seed's image part alone: ~5).
  assert np.mean(widths) < {0.0: 10.0, 0.15: 36.0}[seed_sd], np.mean(widths)


def test_ir_values_weigh_images_by_their_captions():
  # IR@1 is all captions' hits over all captions: with 1 to 9 captions an image, its part must weigh by
  # its caption count, or the interval's variance is that of another statistic.
  rng = np.random.default_rng(3)
  count = rng.integers(1, 10, 400).astype(float)
  ir = rng.binomial(count.astype(int), 0.6).astype(float)
  values = intervals.per_image([(np.zeros(400), ir, count)], "ir@1")
  np.testing.assert_allclose(values.mean(), 100 * ir.sum() / count.sum())
  # The variance is the ratio estimator's (delta method): sum((ir - R count)^2) / (N - 1) / mean(count)^2.
  r = ir.sum() / count.sum()
  expected = np.sum((ir - r * count) ** 2) / 399 / count.mean() ** 2 * 100 ** 2
  np.testing.assert_allclose(values.var(ddof=1), expected)


# ----------------------------------------------------------------------------------------------------
# The quick study, end to end, and its resumption.


@pytest.mark.slow
def test_quick_study_runs_and_resumes(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("MAT_JAX_DATA_DIR", str(tmp_path / "data"))
  args = ["--quick", "--study-dir", str(tmp_path / "study"), "--out", str(tmp_path / "out")]
  assert study.main(args) == 0
  first = capsys.readouterr().out
  doc = json.loads((tmp_path / "out" / "shapes_study.json").read_text())
  quick = study.load(EXPERIMENTS / "study_shapes.py", quick=True)
  expected = sum(len(a["attacks"]) for a in quick["arms"].values())
  assert len(doc["runs"]) == expected
  row = doc["runs"][0]
  assert set(row) == {"method", "seed", "attack", "eps_255", "n_images", "recall", "asr", "asr_meaning_preserving",
                      "label_flip_share", "recall_meaning_preserving"}
  report = (tmp_path / "out" / "shapes_study_table.md").read_text()
  assert report.count("Text attacks judged by meaning") == 1
  # The meaning-filtered attack flips nothing: its recall (restored or not) comes with its interval.
  meaning_rows = report.split("Text attacks judged by meaning")[1].splitlines()
  (control,) = [row for row in meaning_rows if row.startswith("| clean_ft |")]
  filtered_cell = control.strip("|").split("|")[-1]
  assert "[" in filtered_cell.split("\\")[-1], control
  assert row["n_images"] == 12 and set(row["recall"]) >= {"tr@1", "tr@5", "tr@10", "ir@1", "ir@5", "ir@10"}
  claim = doc["claims"][0]
  assert set(claim) == {"claim", "metric", "difference", "ci95", "holds"}
  assert claim["ci95"][0] <= claim["difference"] <= claim["ci95"][1]
  assert (tmp_path / "out" / "shapes_study_table.md").read_text().startswith("Recall@1")
  assert (tmp_path / "out" / "shapes_study_methods.png").stat().st_size > 0
  assert first.count("trained") == len(quick["arms"])
  # A rerun reuses every run and evaluation.
  mtimes = {p: p.stat().st_mtime for p in (tmp_path / "study").rglob("eval/test-12/*.npz")}
  assert len(mtimes) == 7  # two arms x (clean, bert, co), and the control's bert_filtered
  assert study.main(args) == 0
  second = capsys.readouterr().out
  assert "trained" not in second and second.count("reused") >= len(quick["arms"])
  assert {p: p.stat().st_mtime for p in mtimes} == mtimes
  # The report alone, from the finished evaluations: the same claims.
  (tmp_path / "out" / "shapes_study.json").unlink()
  assert study.main([*args, "--report-only"]) == 0
  assert "reused" not in capsys.readouterr().out
  again = json.loads((tmp_path / "out" / "shapes_study.json").read_text())
  assert again["claims"] == doc["claims"] and again["cpu_wall_seconds"] is None


def test_report_only_names_the_evaluations_that_are_not_finished(tmp_path):
  quick = study.load(EXPERIMENTS / "study_shapes.py", quick=True)
  with pytest.raises(study.StudyError, match=r"--report-only: .* holds no study \(study.json is missing\)"):
    study.collect(quick, tmp_path)
  study.check_study_dir(tmp_path, quick)
  with pytest.raises(study.StudyError, match=r"--report-only: \d+ evaluation\(s\) not finished .*clean_ft-s0/clean"):
    study.collect(quick, tmp_path)


def test_demo_headline_differences_come_with_paired_intervals():
  from mat_jax.training import demo

  n, k = 300, 2
  rng = np.random.default_rng(0)
  t2i = np.repeat(np.arange(n), k)

  def ranks(p_tr, p_ir):
    return (np.where(rng.random(n) < p_tr, 0, 5), np.where(rng.random(n * k) < p_ir, 0, 5))

  def model(clean, attacked):
    return {"num_images": n, "text_to_image": t2i, "clean_ranks": ranks(clean, clean),
            "attacks": {a: {"2": {"ranks": ranks(p, p)}} for a, p in attacked.items()}}

  results = {"clean fine-tuned": model(0.8, {"pgd": 0.5, "bert": 0.6, "co": 0.3, "sga": 0.2}),
             "TeCoA": model(0.7, {"pgd": 0.6, "bert": 0.6, "co": 0.4, "sga": 0.35}),
             "MAT": model(0.7, {"pgd": 0.6, "bert": 0.7, "co": 0.6, "sga": 0.55})}
  rows = {(what, metric): (d, ci) for what, metric, d, ci in demo.headline(results)}
  d, (lo, hi) = rows[("MAT - TeCoA under sga", "tr@1")]
  assert lo <= d <= hi and lo > 0  # a 20-point gain on 300 images is far outside the noise
  d, (lo, hi) = rows[("sga on the clean fine-tuned model", "ir@1")]
  assert hi < 0 and 3 < hi - lo < 16
  assert ("SGA - PGD on the clean fine-tuned model", "tr@1") in rows
  assert not any("flips restored" in what for what, _ in rows)  # evaluated without a judge
  # With a judge: the same comparison with the label flips restored, where MAT's advantage reverses.
  for name, p in (("TeCoA", 0.9), ("clean fine-tuned", 0.85), ("MAT", 0.6)):
    for attack in demo.MULTIMODAL:
      results[name]["attacks"][attack]["2"].update(ranks_meaning_preserving=ranks(p, p), label_flip_share=1.0)
  rows = {(what, metric): (d, ci) for what, metric, d, ci in demo.headline(results)}
  d, (lo, hi) = rows[("MAT - TeCoA under co, flips restored", "ir@1")]
  assert lo <= d <= hi and hi < 0
  assert rows[("MAT - TeCoA under co", "ir@1")][0] > 0
  assert demo.label_flip_line(results).startswith("clean fine-tuned: co 100%, sga 100%; TeCoA: co 100%")
  # An attack that changed no caption has no share (NaN in memory): left out, not printed as "nan%".
  results["MAT"]["attacks"]["co"]["2"]["label_flip_share"] = float("nan")
  assert demo.label_flip_line(results).endswith("MAT: sga 100%")


def test_the_full_study_file_is_valid_and_covers_the_claims():
  full = study.load(EXPERIMENTS / "study_shapes.py")
  assert full["seeds"] >= 3 and full["eval_images"] == 0  # the numbers: 3 seeds, the whole test split
  cheaper = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:full,seeds=2,eval_images=500")
  assert (cheaper["seeds"], cheaper["eval_images"]) == (2, 500)
  assert set(recipes.METHODS) <= set(study.load(f"{EXPERIMENTS / 'study_shapes.py'}:full")["arms"])
  # The control takes every attack of the default world (the meaning-filtered ones are the heldout study's).
  assert set(full["arms"]["clean_ft"]["attacks"]) == {a for a in study.STUDY_ATTACKS if not a.endswith(study.FILTERED)}
  alignment = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:full")  # claims 4 and 5
  paraphrase = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:full,paraphrase")  # claim 6
  mmcoa = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:mmcoa")  # MMCoA as MMCoA.py, beside the control
  assert mmcoa["name"] != full["name"] and set(mmcoa["arms"]) == {"clean_ft", "mmcoa"}
  with pytest.raises(study.StudyError, match="mmcoa is a study of its own"):
    study.load(f"{EXPERIMENTS / 'study_shapes.py'}:full,mmcoa")
  heldout = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:heldout")  # claim 7
  with pytest.raises(study.StudyError, match="heldout is a study of its own"):
    study.load(f"{EXPERIMENTS / 'study_shapes.py'}:heldout,paraphrase")
  exposure = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:exposure")  # claim 7's exposure control
  with pytest.raises(study.StudyError, match="exposure is a study of its own"):
    study.load(f"{EXPERIMENTS / 'study_shapes.py'}:exposure,paraphrase")
  for claim, better, other, attacks in study.CLAIMS:
    variant = {"4:": alignment, "5:": alignment, "6:": paraphrase, "7:": heldout}.get(claim[:2], full)
    if "mat_no_heldout" in (better, other):
      variant = exposure
    if "mat_unguided" in (better, other):  # MAT without its guidance, beside TeCoA and MAT
      variant = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:guidance")
    if {"tecoa_2x", "fare_4x"} & {better, other}:  # the compute-matched controls, beside claims 1 and 7's arms
      variant = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:{'exposure,' if claim[:2] == '7:' else ''}compute")
    arms = (mmcoa if claim.endswith("MMCoA") else variant)["arms"]
    assert better in arms and other in arms
    assert all(a in arms[better]["attacks"] and a in arms[other]["attacks"] for a in attacks)


def test_shard_names_a_slice_of_the_runs_and_bad_ones_are_refused(capsys):
  assert study._parse_shard("0/1") == (0, 1)
  assert study._parse_shard("1/2") == (1, 2)
  for bad in ("2/2", "1", "-1/2", "a/b", "0/0"):
    with pytest.raises(study.StudyError, match="--shard"):
      study._parse_shard(bad)
  assert study.main(["--quick", "--report-only", "--shard", "0/2"]) != 0
  assert "--report-only writes the whole study's report; leave out --shard" in capsys.readouterr().err


def test_the_meaning_table_shows_label_flips_and_the_recall_with_flips_restored():
  spec = {"name": "t", "seeds": 2, "arms": {"a": {"method": "mat", "variant": {}, "attacks": ["clean", "bert"]}}}

  def bert(flips, tr, ir):
    return {"label_flip_share": flips, "recall_meaning_preserving": {"tr@1": tr, "ir@1": ir}}

  collected = {("a", 0): {"clean": {}, "bert": bert(1.0, 80.0, 70.0)},
               ("a", 1): {"clean": {}, "bert": bert(0.5, 90.0, 72.0)}}
  table = study.meaning_table(spec, collected, 12)
  assert "[95% interval over training seeds and test images: 2 seed(s), 12 test images]" in table
  assert "| arm | bert |" in table
  assert "| a | 75.0 {50.0, 100.0} \\| 85.0 {80.0, 90.0} / 71.0 {70.0, 72.0} |" in table
  # With the per-query ranks kept, the restored recall comes with its interval instead.
  with_intervals = {("a", "bert" + study.MEANING_PRESERVING): {"tr@1": (85.0, [81.5, 88.25]),
                                                              "ir@1": (71.0, [69.0, 73.0])}}
  assert "| a | 75.0 {50.0, 100.0} \\| 85.0 [81.5, 88.2] / 71.0 [69.0, 73.0] |" in study.meaning_table(
      spec, collected, 12, with_intervals)
  # An attack that changed no caption has no label-flip share (null in its JSON, NaN in memory): shown as
  # such, not a crash or "nan".
  for missing in (None, float("nan")):
    unchanged = {seed: {"clean": {}, "bert": bert(missing, 93.0, 90.0)} for seed in (0, 1)}
    assert "| a | – \\| 93.0 {93.0, 93.0} / 90.0 {90.0, 90.0} |" in study.meaning_table(
        spec, {("a", seed): entry for seed, entry in unchanged.items()}, 12)
    mixed = {("a", 0): collected[("a", 0)], ("a", 1): unchanged[1]}
    assert "| a | 100.0 {100.0, 100.0} \\| 86.5 {80.0, 93.0} / 80.0 {70.0, 90.0} |" in study.meaning_table(
        spec, mixed, 12)
  # One seed: the interval is over the test images only, as the main table says.
  one_seed = study.meaning_table(dict(spec, seeds=1), {("a", 0): collected[("a", 0)]}, 12)
  assert "[95% interval over test images (one seed: the model fixed): 1 seed(s), 12 test images]" in one_seed


def _entry(tr_hit, ir_hit, tr_hit_mp=None, ir_hit_mp=None):
  """A study evaluation of 200 images x 2 captions from per-query hit indicators (rank 0 or 9)."""
  t2i = np.repeat(np.arange(len(tr_hit)), 2)
  rank = lambda hit: np.where(hit, 0, 9)  # noqa: E731
  entry = {"tr_rank": rank(tr_hit), "ir_rank": rank(ir_hit), "text_to_image": t2i, "eps_255": 2.0, "n_images": 200,
           "recall": {"tr@1": 100 * np.mean(tr_hit), "ir@1": 100 * np.mean(ir_hit)}}
  if tr_hit_mp is not None:
    entry.update(tr_rank_mp=rank(tr_hit_mp), ir_rank_mp=rank(ir_hit_mp),
                 recall_meaning_preserving={"tr@1": 100 * np.mean(tr_hit_mp), "ir@1": 100 * np.mean(ir_hit_mp)})
  return entry


def test_claims_are_also_tested_on_the_recall_with_flipped_captions_restored():
  rng = np.random.default_rng(0)
  arms = {"mat": {"attacks": ["co"]}, "tecoa": {"attacks": ["co"]}}
  spec = {"seeds": 3, "arms": arms}
  hit = lambda p, n: rng.random(n) < p  # noqa: E731
  # MAT beats TeCoA by recall, but loses once the label flips are restored.
  collected = {(arm, s): {"co": _entry(hit(p, 200), hit(p, 400), hit(q, 200), hit(q, 400))}
               for arm, p, q in (("mat", 0.5, 0.6), ("tecoa", 0.2, 0.9)) for s in range(3)}
  _, claims, table = study.summarise(spec, collected)
  by_metric = {c["metric"]: c for c in claims if c["claim"].startswith("1: MAT > TeCoA")}
  assert by_metric["co tr@1"]["holds"] and by_metric["co tr@1"]["ci95"][0] > 5
  restored = by_metric["co tr@1" + study.MEANING_PRESERVING]
  assert not restored["holds"] and restored["ci95"][1] < -5
  assert ("mat", "co" + study.MEANING_PRESERVING) in table
  # One seed without the restored ranks: no interval for them, and no claim on them.
  del collected[("tecoa", 1)]["co"]["tr_rank_mp"]
  _, claims, table = study.summarise(spec, collected)
  assert ("tecoa", "co" + study.MEANING_PRESERVING) not in table
  assert not any(c["metric"].endswith(study.MEANING_PRESERVING) for c in claims)


def test_a_recalls_interval_stays_within_0_and_100_but_a_differences_does_not():
  # Seeds at 0.5, 1.5 and 0% TR@1: the t interval of the mean reaches below 0, a recall cannot.
  spec = {"seeds": 3, "arms": {"mat": {"attacks": ["co"]}, "tecoa": {"attacks": ["co"]}}}
  hits_of = lambda count, n=200: np.arange(n) < count  # noqa: E731
  collected = {}
  for seed, count in enumerate((1, 3, 0)):
    collected[("mat", seed)] = {"co": _entry(hits_of(count), hits_of(2 * count, 400))}
    collected[("tecoa", seed)] = {"co": _entry(hits_of(count + 150), hits_of(2 * count, 400))}
  _, claims, table = study.summarise(spec, collected)
  mean, (low, high) = table[("mat", "co")]["tr@1"]
  assert mean == pytest.approx(2 / 3) and low == 0.0 and 0 < high < 5
  assert table[("tecoa", "co")]["tr@1"][1][1] <= 100.0
  assert table[("mat", "co")]["tr@1"][1] == intervals.recall_interval(100.0 * np.stack(
      [hits_of(count) for count in (1, 3, 0)]).astype(float))
  (difference,) = [c for c in claims if c["metric"] == "co tr@1"]
  # A difference of two arms may lie below 0, and its interval is not clipped.
  assert difference["difference"] == pytest.approx(-75.0) and difference["ci95"][0] < difference["ci95"][1] < -60


def test_a_text_attacks_evaluation_without_the_restored_ranks_is_rerun(tmp_path):
  np.savez(tmp_path / "co.npz", tr=np.zeros(2), ir=np.zeros(4), text_to_image=np.arange(4) // 2)
  np.savez(tmp_path / "pgd.npz", tr=np.zeros(2), ir=np.zeros(4), text_to_image=np.arange(4) // 2)
  assert not study._is_current(tmp_path, "co") and study._is_current(tmp_path, "pgd")
  assert not study._is_current(tmp_path, "sga")  # never evaluated
  np.savez(tmp_path / "co.npz", tr=np.zeros(2), ir=np.zeros(4), text_to_image=np.arange(4) // 2,
           tr_mp=np.zeros(2), ir_mp=np.zeros(4))
  assert study._is_current(tmp_path, "co")


def test_a_recalls_interval_does_not_collapse_where_no_query_or_every_query_survives():
  # The t interval reads its width from the hits' spread: with none (or all) of 500 queries it is [0, 0];
  # a recall of 0 in 500 images is still consistent with a rate up to 0.76% (Wilson's score interval).
  for hits, expected in ((0, (0.0, 0.7624)), (1, (0.0, 1.1241)), (500, (99.2376, 100.0))):
    values = 100.0 * (np.arange(500) < hits)[None].astype(float)
    assert intervals.recall_interval(values) == pytest.approx(expected, abs=1e-4)
  assert intervals.interval(100.0 * np.zeros((1, 500))) == [0.0, 0.0]
  # At mid-range recalls the two agree; over seeds the t interval's seed part still decides the width.
  rng = np.random.default_rng(0)
  values = 100.0 * (rng.random((3, 500)) < np.array([[0.5], [0.6], [0.7]]))
  t_low, t_high = intervals.interval(values)
  low, high = intervals.recall_interval(values)
  assert (low, high) == (t_low, t_high) and high - low > 20


def test_attacks_that_begin_with_one_text_attack_are_evaluated_together():
  # bert, sep and co start with the same KL BERT-Attack on the MLM's candidates: one evaluate call runs
  # it once per batch. The paraphrase control is BERT-Attack on other candidates: its own call.
  attacks = ("clean", "pgd", "bert", "sep", "co", "sga", "paraphrase")
  assert study.evaluation_groups(attacks, 2.0) == [("clean",), ("pgd",), ("bert", "sep", "co"), ("sga",),
                                                   ("paraphrase",)]
  assert study.evaluation_groups(("co", "clean", "bert"), 2.0) == [("co", "bert"), ("clean",)]


def test_an_attack_at_another_budget_is_evaluated_at_it_and_every_claim_is_tested_there_too(tmp_path, monkeypatch):
  # The study file's `budgets` argument: every arm's attacks with an image budget again at each budget,
  # the text-only ones and clean not; the trained runs are the variant's (its study dir takes them).
  plain = study.load(f"{EXPERIMENTS / 'study_shapes.py'}")
  budgets = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:budgets=1+4")
  assert budgets["arms"]["mat"]["attacks"] == ["clean", "pgd", "bert", "co", "sga", "pgd@1", "co@1", "sga@1",
                                               "pgd@4", "co@4", "sga@4"]
  assert study._training_settings(budgets) == study._training_settings(plain)
  assert study.budgets(budgets) == [1.0, 4.0]
  heldout = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:heldout,budgets=4")
  assert heldout["arms"]["mat"]["attacks"][-3:] == ["pgd@4", "co_filtered@4", "sga_filtered@4"]
  with pytest.raises(study.StudyError, match="budgets=x: \\+-separated numbers"):
    study.load(f"{EXPERIMENTS / 'study_shapes.py'}:budgets=x")
  # Each budget is its own evaluate call (the text stage is not shared across budgets), at that budget.
  assert study.evaluation_groups(("clean", "bert", "co", "co@4", "sga@4", "pgd@0.5"), 2.0) == \
      [("clean",), ("bert", "co"), ("co@4",), ("sga@4",), ("pgd@0.5",)]
  assert [study._evaluated_as(a) for a in ("co@4", "co_filtered@4", "pgd@0.5")] == ["co", "co", "pgd"]
  assert study._source_name("co_filtered@4") == "filtered" and study._source_name("pgd@4") is None
  calls = []

  def evaluate(model, *, attacks, eps_255, **_):
    calls.append((attacks, eps_255))
    key = f"{eps_255[0]:g}"
    entry = lambda: {"seconds": 1.0, "ranks": (np.zeros(3, int), np.zeros(6, int)),  # noqa: E731
                     "recall": {"tr@1": 100.0, "ir@1": 100.0}, "asr": {}}
    return {"attacks": {a: {key: entry()} for a in attacks}, "num_images": 3, "clean": {},
            "clean_ranks": (np.zeros(3, int), np.zeros(6, int)), "text_to_image": np.repeat(np.arange(3), 2)}

  monkeypatch.setattr(study.evaluate_lib, "evaluate", evaluate)
  monkeypatch.setattr(study.evaluate_lib, "shapes_judge", lambda eval_set: None)
  spec = {"eps_255": 2.0, "eval_batch": 3}
  for group in (("co@4",), ("bert", "co")):
    study._evaluate_group(None, None, None, {"bert": None}, group, spec, 0, tmp_path)
  assert calls == [(("co",), (4.0,)), (("bert", "co"), (2.0,))]
  written = [json.loads((tmp_path / f"{a}.json").read_text())["eps_255"] for a in ("co@4", "co", "bert")]
  assert written == [4.0, 2.0, 0.0]
  # Every claim on attacks with an image budget is tested at each budget too, as a claim of its own.
  rng = np.random.default_rng(0)
  hit = lambda p, n: rng.random(n) < p  # noqa: E731
  arms = {"mat": {"attacks": ["co", "co@4"]}, "tecoa": {"attacks": ["co", "co@4"]}}
  collected = {(arm, s): {"co": _entry(hit(p, 200), hit(p, 400)), "co@4": _entry(hit(q, 200), hit(q, 400))}
               for arm, p, q in (("mat", 0.5, 0.2), ("tecoa", 0.2, 0.5)) for s in range(3)}
  spec = {"seeds": 3, "arms": arms, "eps_255": 2.0}
  _, claims, table = study.summarise(spec, collected)
  mat_tecoa = {(c["claim"], c["metric"]): c["holds"] for c in claims if c["claim"].startswith("1: MAT > TeCoA")}
  assert mat_tecoa == {("1: MAT > TeCoA (unimodal AT) under multimodal attacks", "co tr@1"): True,
                       ("1: MAT > TeCoA (unimodal AT) under multimodal attacks", "co ir@1"): True,
                       ("1: MAT > TeCoA (unimodal AT) under multimodal attacks, at eps 4/255", "co@4 tr@1"): False,
                       ("1: MAT > TeCoA (unimodal AT) under multimodal attacks, at eps 4/255", "co@4 ir@1"): False}
  header = study.markdown_table(spec, table, claims, 200).splitlines()
  assert header[0].endswith("eps 2/255 (ATTACK@E: at E/255).") and header[2] == "| arm | co | co@4 |"


def test_the_heldout_study_trains_and_tests_in_the_held_out_forms_world():
  heldout = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:heldout")
  assert heldout["name"] != study.load(EXPERIMENTS / "study_shapes.py")["name"]
  for name in heldout["arms"]:
    config = study.run_config(heldout, study.arm_of(heldout, name), 0)
    assert config.data.build_rare_form_rate == 0.0 and config.model.source == "cache:shapes_clip_heldout"
  # Its starting model is pretrained on the same world, under the clean pretraining recipe.
  _, start = runs.cached_experiment("shapes_clip_heldout")
  assert start.data.build_rare_form_rate == 0.0
  assert {**start.to_dict(), "name": None, "data": None} == \
      {**runs.cached_experiment("shapes_clip")[1].to_dict(), "name": None, "data": None}
  mat = study.run_config(heldout, study.arm_of(heldout, "mat_paraphrase"), 0)
  assert mat.text_attack.source == "paraphrase"
  # The random-synonym arms differ from their method's arm in their data's EDA only (MAT+ from MAT+ without it).
  for name, method in (("clean_ft_eda", "clean_ft"), ("tecoa_eda", "tecoa"), ("mat_eda", "mat"),
                       ("matplus", "matplus_no_eda")):
    edited, plain = (study.run_config(heldout, study.arm_of(heldout, n), 0) for n in (name, method))
    assert [a for a in edited.data.augmentations if a not in plain.data.augmentations] == \
        (["eda:0.2"] if name == "matplus" else ["eda:1.0"])
    assert set(plain.data.augmentations) <= set(edited.data.augmentations)
    assert {**edited.to_dict(), "name": None, "data": {**edited.data.to_dict(), "augmentations": None}} == \
        {**plain.to_dict(), "name": None, "data": {**plain.data.to_dict(), "augmentations": None}}


def test_the_exposure_study_differs_from_mat_in_the_words_its_training_attack_may_write():
  exposure = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:exposure")
  heldout = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:heldout")
  assert set(exposure["arms"]) == {"tecoa", "mat", "mat_no_heldout"}
  assert exposure["name"] != heldout["name"]
  restricted, mat = (study.run_config(exposure, study.arm_of(exposure, n), 0) for n in ("mat_no_heldout", "mat"))
  assert restricted.text_attack.exclude_words == shapes.held_out_forms() and mat.text_attack.exclude_words == ()
  unrestricted = {**restricted.text_attack.to_dict(), "exclude_words": ()}
  assert {**restricted.to_dict(), "name": None, "text_attack": unrestricted} == {**mat.to_dict(), "name": None}
  # TeCoA and MAT train as the heldout study's arms of the same name do.
  for name in ("tecoa", "mat"):
    ours, theirs = (study.run_config(s, study.arm_of(s, name), 0) for s in (exposure, heldout))
    assert {**ours.to_dict(), "name": None} == {**theirs.to_dict(), "name": None}
  assert exposure["arms"]["mat_no_heldout"]["attacks"] == heldout["arms"]["mat"]["attacks"]


def test_a_study_at_another_training_budget_trains_and_attacks_every_arm_at_it():
  # recipes: the inner attack at the new ε with its step size scaled (two steps still reach the boundary), the
  # periodic evaluation at it too; nothing else changes, and the shared budget's configs not at all.
  shared, wider = recipes.finetune("mat"), recipes.finetune("mat", eps_255=4)
  assert (wider.objective.eps, wider.objective.step_size, wider.eval.eps) == (4 / 255, 2 / 255, 4 / 255)
  assert shared.objective.step_size * shared.objective.steps == shared.objective.eps == recipes.EPS
  assert {**wider.to_dict(), "objective": None, "eval": None} == {**shared.to_dict(), "objective": None, "eval": None}
  assert {**wider.objective.to_dict(), "eps": None, "step_size": None} == \
      {**shared.objective.to_dict(), "eps": None, "step_size": None}
  assert recipes.finetune("mat", eps_255=recipes.EPS_255).to_dict() == shared.to_dict()
  assert recipes.finetune("clean_ft", eps_255=4).objective.to_dict() == recipes.finetune("clean_ft").objective.to_dict()
  for bad in (0, -1, float("nan"), float("inf"), 65, True, "4"):
    with pytest.raises(ConfigError, match="eps_255=.*a training budget is a number in \\(0, 64\\]"):
      recipes.finetune("tecoa", eps_255=bad)
  # The study file's train_eps: a study dir of its own, attacked at the budget its arms train at; the arms
  # with an image attack train at it, the clean control as ever.
  path = EXPERIMENTS / "study_shapes.py"
  plain = study.load(f"{path}:seeds=3")
  at_four = study.load(f"{path}:train_eps=4")
  assert (at_four["name"], at_four["eps_255"], plain["eps_255"]) == ("shapes_study_train4", 4.0, 2.0)
  assert set(at_four["arms"]) == set(plain["arms"])
  for name in at_four["arms"]:
    arm = study.arm_of(at_four, name)
    trains_at = None if arm.method == "clean_ft" else 4.0
    assert arm.train_eps_255 == trains_at and study.arm_of(plain, name).train_eps_255 is None
    ours, theirs = (study.run_config(s, study.arm_of(s, name), 0) for s in (at_four, plain))
    assert ours.objective.get("eps") == (None if trains_at is None else 4 / 255)
    assert ours.eval.eps == (theirs.eval.eps if trains_at is None else 4 / 255)
    assert {**ours.to_dict(), "name": None, "objective": None, "eval": None} == \
        {**theirs.to_dict(), "name": None, "objective": None, "eval": None}
  # Its report says which arms trained at which budget.
  header = study.markdown_table(at_four, {}, [], 1000).splitlines()[0]
  trained_arms = ", ".join(name for name in at_four["arms"] if name != "clean_ft")
  assert header.endswith(f"eps 4/255; trained at 4/255: {trained_arms}.")
  assert "trained at" not in study.markdown_table(plain, {}, [], 1000)
  # Its claims are the study's own, at 4/255; other attack budgets join as in any study.
  assert study.claims_of(at_four) == study.claims_of(plain)
  both = study.load(f"{path}:train_eps=4,budgets=2,arms=tecoa+mat")
  assert both["arms"]["mat"]["attacks"] == ["clean", "pgd", "bert", "co", "sga", "pgd@2", "co@2", "sga@2"]
  assert any(name.endswith(", at eps 2/255") for name, *_ in study.claims_of(both))
  # Claim 6's arm and MAT without its guidance join at the same budget, their variants kept.
  joined = study.load(f"{path}:train_eps=4,paraphrase,guidance,arms=mat+mat_paraphrase+mat_unguided")
  paraphrase, unguided = (study.arm_of(joined, name) for name in ("mat_paraphrase", "mat_unguided"))
  assert paraphrase.train_eps_255 == 4.0 and paraphrase.variant == {"text_attack": {"source": "paraphrase"}}
  assert unguided.train_eps_255 == 4.0 and unguided.variant == {"objective": {"guided": False}}
  assert study.run_config(joined, unguided, 0).objective.guided is False
  with pytest.raises(study.StudyError, match="pgd@4 is pgd at the study's own budget"):
    study.load(f"{path}:train_eps=4,budgets=4")
  with pytest.raises(study.StudyError, match="train_eps .* without quick"):
    study.load(f"{path}:quick,train_eps=4")
  with pytest.raises(study.StudyError, match="train_eps=2 is the shared budget's ε"):
    study.load(f"{path}:train_eps=2")


def test_the_compute_matched_controls_are_the_baselines_with_more_steps_and_nothing_else():
  # recipes: k times the shared steps, the schedule stretched alike; every other key as the shared budget.
  tecoa, longer = recipes.finetune("tecoa"), recipes.finetune("tecoa", steps_factor=3)
  assert (longer.train.steps, longer.schedule.warmup_steps) == (3 * tecoa.train.steps, 3 * tecoa.schedule.warmup_steps)
  assert {**longer.to_dict(), "train": None, "schedule": None} == {**tecoa.to_dict(), "train": None, "schedule": None}
  assert {**longer.train.to_dict(), "steps": None} == {**tecoa.train.to_dict(), "steps": None}
  for bad in (0, -1, 1.5, True, "2"):
    with pytest.raises(ConfigError, match="steps_factor=.*whole number"):
      recipes.finetune("tecoa", steps_factor=bad)
  # The study file's `compute` argument adds them beside the variant's arms, evaluated as their method is,
  # and claims 1 and 7 have their compute-matched rows.
  for variant, world in (("", "shapes_study"), ("exposure,", "shapes_study_exposure"),
                         ("heldout,", "shapes_study_heldout")):
    plain = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:{variant}seeds=3")
    matched = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:{variant}compute")
    assert matched["name"] == plain["name"] == world
    # FARE, claim 1's other unimodal baseline, is an arm of the default world only.
    controls = {"tecoa_2x": ("tecoa", 2)} if variant else {"tecoa_2x": ("tecoa", 2), "fare_4x": ("fare", 4)}
    assert set(matched["arms"]) - set(plain["arms"]) == set(controls)
    for name, (method, factor) in controls.items():
      assert matched["arms"][name]["attacks"] == plain["arms"][method]["attacks"]
      assert study.arm_of(matched, name).steps_factor == factor and study.arm_of(matched, method).steps_factor == 1
      ours, theirs = (study.run_config(matched, study.arm_of(matched, n), 0) for n in (name, method))
      assert ours.train.steps == factor * theirs.train.steps
      assert {**ours.to_dict(), "name": None, "train": None, "schedule": None} == \
          {**theirs.to_dict(), "name": None, "train": None, "schedule": None}
    # A study that shrinks the shared budget shrinks the controls' steps alike: they keep their multiple.
    shrunk = {**matched, "budget": {"train": {"steps": 4}, "schedule": {"warmup_steps": 1}}}
    for name, (method, factor) in controls.items():
      ours, theirs = (study.run_config(shrunk, study.arm_of(shrunk, n), 0) for n in (name, method))
      assert (theirs.train.steps, theirs.schedule.warmup_steps) == (4, 1)
      assert (ours.train.steps, ours.schedule.warmup_steps) == (4 * factor, factor)
    # The arms the variant had keep their settings, so its study dir takes the new arm beside its runs.
    assert study._training_settings({**matched, "arms": {a: matched["arms"][a] for a in plain["arms"]}}) == \
        study._training_settings(plain)
  with pytest.raises(study.StudyError, match="compute adds TeCoA"):
    study.load(f"{EXPERIMENTS / 'study_shapes.py'}:mmcoa,compute")
  claimed = {(better, other) for _, better, other, _ in study.CLAIMS}
  assert {("mat", "tecoa_2x"), ("mat", "fare_4x"), ("tecoa_2x", "tecoa"), ("fare_4x", "fare")} <= claimed


def test_meaning_filtered_attacks_run_their_attack_on_the_filtered_source():
  assert [study._evaluated_as(a) for a in ("bert_filtered", "co_filtered", "sga_filtered")] == ["bert", "co", "sga"]
  assert {study._source_name(a) for a in ("bert_filtered", "co_filtered", "sga_filtered")} == {"filtered"}
  assert study._source_name("co") == "bert"
  # bert_filtered and co_filtered begin with the same text attack on the filtered candidates: one call.
  groups = study.evaluation_groups(("clean", "bert", "bert_filtered", "co_filtered", "sga_filtered"), 2.0)
  assert groups == [("clean",), ("bert",), ("bert_filtered", "co_filtered"), ("sga_filtered",)]


def test_a_study_of_its_own_reports_beside_the_shapes_study_never_over_it():
  assert study.default_out("shapes_study") == study.DEFAULT_OUT
  for arg, folder in (("mmcoa", "mmcoa"), ("heldout", "heldout"), ("exposure", "exposure")):
    name = study.load(f"{EXPERIMENTS / 'study_shapes.py'}:{arg}")["name"]
    assert study.default_out(name) == study.DEFAULT_OUT / folder


@pytest.mark.parametrize("how", [["--quick"], ["--config", f"{EXPERIMENTS / 'study_shapes.py'}:quick"],
                                 ["--config", f"{EXPERIMENTS / 'study_shapes.py'}:quick,eval_images=6"]])
def test_the_quick_study_reports_into_its_study_dir_however_it_is_named(tmp_path, monkeypatch, how):
  written = []
  monkeypatch.setattr(study, "run", lambda *a, **k: {"collected": {}, "wall_seconds": 0.0, "compilations": 0})
  monkeypatch.setattr(study, "report", lambda s, r, out: written.append(out) or {})
  assert study.main([*how, "--study-dir", str(tmp_path / "study")]) == 0
  assert written == [tmp_path / "study"]


def test_mesh_is_where_the_studys_runs_train(tmp_path, monkeypatch, capsys):
  args = ["--quick", "--study-dir", str(tmp_path / "study"), "--out", str(tmp_path / "out")]
  monkeypatch.setattr(study, "run", lambda *a, **k: pytest.fail("ran before checking --mesh"))
  assert study.main([*args, "--mesh", "data=3x"]) == 2
  assert "cannot parse mesh 'data=3x'" in capsys.readouterr().err
  # A mesh the runs' batch does not divide is refused before the world is built and the clean model trained.
  assert study.main([*args, "--mesh", "3"]) == 2
  assert "error: arm 'clean_ft' of the study: the global batch size 16 is not divisible by the 3 devices" in \
      capsys.readouterr().err
  asked = []

  def record(*_, mesh_spec=None, **__):
    asked.append(mesh_spec)
    return {"collected": {}, "wall_seconds": 0.0, "compilations": 0}

  monkeypatch.setattr(study, "run", record)
  monkeypatch.setattr(study, "report", lambda *a, **k: {})
  study.main([*args, "--mesh", "2"])
  assert asked == ["2"]
