"""Zero-shot classification: accuracy arithmetic, class embeddings, attacks, the ImageFolder builder, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mat_jax import evaluate as ev
from mat_jax import evaluate_cli
from mat_jax import metrics
from mat_jax import zeroshot as zs
from mat_jax.attacks import image as image_attacks
from mat_jax.data import classification, imagefolder, shapes
from mat_jax.data.corpora import CorpusError
from mat_jax.errors import InputError
from mat_jax.models import l2_normalize

import helpers

SIZE = 16


# ----------------------------------------------------------------------------------------------------
# Fixtures: a micro CLIP on the shapes tokenizer, an MLP stand-in encoder
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A random micro CLIP (16 px) saved in the transformers layout, with the shapes tokenizer beside it."""
  return helpers.save_micro_clip(tmp_path_factory.mktemp("micro_clip"), image_size=SIZE, std=0.05)


@pytest.fixture(scope="module")
def victim(model_dir):
  return ev.load_victim(str(model_dir))


@dataclasses.dataclass(frozen=True)
class MLPDualEncoder(helpers.MLPEncoder):
  """The MLP image side with a text side (the mean of the text's token embeddings): enough for
  `evaluate_zeroshot` without a CLIP's minute-long compilations."""

  def text_embeddings(self, params, input_ids, attention_mask):
    mask = attention_mask[..., None].astype(jnp.float32)
    return l2_normalize((params["tokens"][input_ids] * mask).sum(1) / mask.sum(1))


# ----------------------------------------------------------------------------------------------------
# Arithmetic and class embeddings
# ----------------------------------------------------------------------------------------------------

def test_accuracy_arithmetic_on_a_hand_built_case():
  logits = np.array([[3.0, 1.0, 0.0],   # predicts 0, label 0: right
                     [0.0, 2.0, 2.0],   # tie between 1 and 2: the lower index, 1, is the prediction
                     [1.0, 0.0, 5.0],   # predicts 2, label 1: wrong
                     [0.0, 4.0, 1.0]])  # predicts 1, label 1: right
  labels = np.array([0, 1, 1, 1])
  clean = zs.correct_predictions(logits, labels)
  np.testing.assert_array_equal(clean, [True, True, False, True])
  assert zs.accuracy(clean) == 75.0
  # Image 0 falls to attack a, image 3 to attack b, image 2 is wrong clean: only image 1 is robust.
  a, b = np.array([False, True, True, True]), np.array([True, True, True, False])
  robust = zs.robust_correct(clean, [a, b])
  np.testing.assert_array_equal(robust, [False, True, False, False])
  assert zs.accuracy(robust) == 25.0 and zs.accuracy(a & clean) == 50.0
  with pytest.raises(zs.ZeroShotError, match="no images"):
    zs.accuracy(np.zeros(0, bool))
  # apgd-t's targeted DLR reads the 4 largest logits: by default it runs from 4 classes on.
  assert zs.default_attacks(3) == ["apgd-ce", "pgd"] and zs.default_attacks(4) == list(zs.ATTACKS)


def test_class_embedding_is_the_normalised_mean_of_normalised_prompt_embeddings(victim):
  prompts = [["a red circle", "there is a red circle", "a photo of a red circle"], ["a blue square"],
             ["a green star", "an image of a green star"]]
  got = zs.class_embeddings(victim.encoder, victim.params, victim.tokenizer, prompts)
  flat = [p for ps in prompts for p in ps]
  tok = victim.tokenizer(flat)
  emb = metrics.embed_texts(victim.encoder, victim.params, tok.input_ids, tok.attention_mask)
  start = 0
  for c, ps in enumerate(prompts):
    mean = emb[start:start + len(ps)].mean(axis=0)
    start += len(ps)
    np.testing.assert_allclose(got[c], mean / np.linalg.norm(mean), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_shapes_sets_are_deterministic_and_labelled():
  a = classification.shapes_colour_shape(num_images=60, image_size=SIZE, seed=3)
  b = classification.shapes_colour_shape(num_images=60, image_size=SIZE, seed=3)
  np.testing.assert_array_equal(a.images, b.images)
  assert len(a.class_names) == 49 and a.class_names[0] == "red circle" and a.class_names[-1] == "white ring"
  np.testing.assert_array_equal(a.labels, np.arange(60) % 49)
  assert a.prompts[1][0] == "a red square" and a.prompts[7][0] == "an orange circle"
  # The image of label 8 (orange square) is one orange object: its brightest pixels are orange.
  img = a.images[8].reshape(-1, 3).astype(float)
  top = img[np.argsort(img.sum(1))[-4:]].mean(0) / 255
  assert np.abs(top - np.asarray(shapes.COLOUR_RGB["orange"])).max() < 0.15
  count = classification.shapes_count(num_images=30, image_size=SIZE, seed=0, prompts_per_class=4)
  want = [len(shapes.scene_for(0, "test", i).objects) - 1 for i in range(30)]
  np.testing.assert_array_equal(count.labels, want)
  assert [len(p) for p in count.prompts] == [4, 4, 4]
  assert all(len(shapes.parse(p).mentions) == c + 1 for c, ps in enumerate(count.prompts) for p in ps)


# ----------------------------------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------------------------------

def test_attacks_lower_accuracy_and_compile_once_per_shape():
  rng = np.random.default_rng(0)
  enc = helpers.MLPEncoder()
  params = {"w1": jnp.asarray(rng.normal(size=(8 * 8 * 3, 32)) / 8, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32),
            "logit_scale": jnp.asarray(np.log(50.0), jnp.float32)}
  classes = np.asarray(l2_normalize(jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)))
  images = jnp.asarray(rng.uniform(size=(8, 8, 8, 3)), jnp.float32)
  # Labels = the clean predictions: 100% clean accuracy, so every loss of accuracy is the attack's.
  labels = np.asarray(jnp.argmax(zs._clean_logits(enc, params, jnp.asarray(classes), images), axis=-1))
  settings = zs.Settings(apgd_steps=10, pgd_steps=10, n_targets=3)
  key = jax.random.key(0)
  for attack in zs.ATTACKS:
    untouched = zs.attack_correct(enc, params, classes, images, labels, key, attack=attack, eps=0.0, settings=settings)
    assert bool(jnp.all(untouched)), attack  # eps = 0: the image cannot move
    compiled = zs._attack_correct._cache_size()
    attacked = zs.attack_correct(enc, params, classes, images, labels, jax.random.key(1), attack=attack,
                                 eps=8 / 255, settings=settings)
    assert zs._attack_correct._cache_size() == compiled, f"{attack} recompiled for a new eps"
    assert zs.accuracy(attacked) <= 50.0, (attack, np.asarray(attacked))
  with pytest.raises(zs.ZeroShotError, match="at least 4 classes"):
    zs.attack_correct(enc, params, classes[:3], images, labels % 3, key, attack="apgd-t", eps=0.01)
  with pytest.raises(zs.ZeroShotError, match="unknown attack"):
    zs.attack_correct(enc, params, classes, images, labels, key, attack="fgsm", eps=0.01)
  # Host values are checked as the other composable attacks check them (unchecked: pixels in [0, 255] ran,
  # a label past the classes read as a wrong prediction, uint8 pixels failed inside JAX's random draw).
  host = np.asarray(images)
  for bad, message in [(host * 255, r"in \[0, 1\]"), (np.uint8(host * 255), "uint8")]:
    with pytest.raises(InputError, match=message):
      zs.attack_correct(enc, params, classes, bad, labels, key, attack="pgd", eps=0.01)
  past = labels.copy()
  past[0] = 100
  with pytest.raises(zs.ZeroShotError, match=r"labels must be class indices in \[0, 6\), got values from \d to 100"):
    zs.attack_correct(enc, params, classes, images, past, key, attack="pgd", eps=0.01)
  with pytest.raises(zs.ZeroShotError, match=r"labels must be one integer class index per image \(8,\)"):
    zs.attack_correct(enc, params, classes, images, labels[:3], key, attack="pgd", eps=0.01)
  # The step size follows the attacks' one rule (`spec.step_size_for`), zero steps included (the random
  # start alone), which a copy of the rule divided by.
  start_only = zs.attack_correct(enc, params, classes, images, labels, key, attack="pgd", eps=8 / 255,
                                 settings=zs.Settings(pgd_steps=0))
  assert start_only.shape == (8,)


def _four_classes():
  """(params of MLPDualEncoder, tokenizer, a 4-image set of 4 classes at 8 px)."""
  tokenizer = shapes.tokenizer()
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(8 * 8 * 3, 32)) / 8, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32),
            "tokens": jnp.asarray(rng.normal(size=(tokenizer.vocab_size, 16)), jnp.float32),
            "logit_scale": jnp.asarray(np.log(50.0), jnp.float32)}
  names = ("red circle", "blue square", "green triangle", "white ring")
  data = classification.ClassificationSet(rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8),
                                          np.arange(4, dtype=np.int32), names, tuple((f"a {n}",) for n in names))
  return params, tokenizer, data


def test_results_record_the_apgd_t_targets_that_ran(monkeypatch):
  params, tokenizer, data = _four_classes()
  targets_traced = []
  real_apgd_targeted = image_attacks.apgd_targeted

  def spy(*args, n_targets, **kwargs):
    targets_traced.append(n_targets)
    return real_apgd_targeted(*args, n_targets=n_targets, **kwargs)

  monkeypatch.setattr(image_attacks, "apgd_targeted", spy)
  for requested, ran in [(9, 3), (2, 2)]:  # 4 classes: at most 3 wrong ones to target
    results = zs.evaluate_zeroshot(MLPDualEncoder(), params, tokenizer, data, attacks=["apgd-t"], eps_255=(1,),
                                   settings=zs.Settings(apgd_steps=1, n_targets=requested), batch_size=4)
    assert targets_traced[-1] == ran and results["settings"]["n_targets"] == ran, requested
  without_apgd_t = zs.evaluate_zeroshot(MLPDualEncoder(), params, tokenizer, data, attacks=["pgd"], eps_255=(1,),
                                        settings=zs.Settings(pgd_steps=1), batch_size=4)
  assert without_apgd_t["settings"]["n_targets"] is None


def test_accuracy_under_attack_counts_images_right_clean_and_robust_is_the_worst_over_attacks(monkeypatch):
  """An image wrong clean counts as wrong under attack, whatever the attack's point scores (it may land in
  the right class); robust accuracy is the worst case over every attack at a budget, not the last one's."""
  params, tokenizer, data = _four_classes()
  encoder = MLPDualEncoder()
  classes = zs.class_embeddings(encoder, params, tokenizer, [list(p) for p in data.prompts])
  predicted = np.argmax(zs._clean_logits(encoder, params, jnp.asarray(classes), data.images / np.float32(255)), -1)
  labels = np.asarray(predicted, np.int32).copy()
  labels[3] = (labels[3] + 1) % 4  # images 0-2 right clean, image 3 wrong
  data = dataclasses.replace(data, labels=labels)
  scripted = {"apgd-ce": [False, True, True, True], "pgd": [True, True, True, True]}  # correct at the adversarial point
  monkeypatch.setattr(zs, "attack_correct", lambda *args, attack, **kw: jnp.asarray(scripted[attack]))
  results = zs.evaluate_zeroshot(encoder, params, tokenizer, data, attacks=["apgd-ce", "pgd"], eps_255=(1,),
                                 batch_size=4)
  assert results["clean"]["accuracy"] == 75.0
  assert results["attacks"]["apgd-ce"]["1"]["accuracy"] == 50.0 and results["attacks"]["pgd"]["1"]["accuracy"] == 75.0
  assert results["robust"]["1"]["accuracy"] == 50.0  # images 1 and 2


def test_host_parameters_are_put_on_the_device_once(monkeypatch):
  # Left on the host, every jitted call (class embeddings, clean logits, each attack batch) would upload them.
  params, tokenizer, data = _four_classes()
  received = []

  def recording(encoder, params, *args, **kwargs):
    received.append(all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)))
    raise RuntimeError("stop")

  monkeypatch.setattr(zs, "class_embeddings", recording)
  with pytest.raises(RuntimeError, match="stop"):
    zs.evaluate_zeroshot(MLPDualEncoder(), jax.device_get(params), tokenizer, data, attacks=["pgd"], eps_255=(1,))
  assert received == [True]


def test_budgets_are_checked_as_retrieval_checks_them():
  # evaluate.check_eps_255: budgets sharing a results key would overwrite each other's results.
  params, tokenizer, data = _four_classes()
  for eps_255, message in [((2.0, 2.0000001), r"budgets 2.0 and 2.0000001 are both reported as eps '2'"),
                           ((), "no budget in eps_255"), ((300.0,), "more than the whole pixel range"),
                           ((1.0, float("nan")), "finite")]:
    with pytest.raises(InputError, match=message):
      zs.evaluate_zeroshot(MLPDualEncoder(), params, tokenizer, data, attacks=["pgd"], eps_255=eps_255,
                           settings=zs.Settings(pgd_steps=1), batch_size=4)
  # An L2 budget may exceed 255/255; results are keyed as retrieval keys them.
  results = zs.evaluate_zeroshot(MLPDualEncoder(), params, tokenizer, data, attacks=["pgd"], eps_255=(300.0, 0.5),
                                 settings=zs.Settings(pgd_steps=1, norm="l2"), batch_size=4)
  assert list(results["robust"]) == list(results["attacks"]["pgd"]) == [ev.eps_key(300.0), ev.eps_key(0.5)]
  # A budget given twice (2 and 2.0) runs and is reported once.
  twice = zs.evaluate_zeroshot(MLPDualEncoder(), params, tokenizer, data, attacks=["pgd"], eps_255=(2, 2.0),
                               settings=zs.Settings(pgd_steps=1), batch_size=4)
  assert twice["eps_255"] == [2.0] and list(twice["robust"]) == [ev.eps_key(2.0)]
  # As retrieval's evaluate: a batch size under 1 is refused, not run as 1.
  for batch_size in (0, -3, 2.5):
    with pytest.raises(zs.ZeroShotError, match=rf"batch_size must be an integer >= 1, got {batch_size}"):
      zs.evaluate_zeroshot(MLPDualEncoder(), params, tokenizer, data, attacks=["pgd"], batch_size=batch_size)


def test_limit_on_a_shapes_set_samples_the_rendered_images_class_by_class():
  # shapes-count's scenes hold 1-3 objects in proportions 20/40/40: its first 30 have 8, 11 and 11.
  rendered = zs.load_data("shapes-count", SIZE, num_images=60)
  limited = zs.load_data("shapes-count", SIZE, num_images=60, limit=30)
  np.testing.assert_array_equal(np.bincount(limited.labels, minlength=3), [10, 10, 10])
  keep = classification.classes_in_turn(rendered.labels, 30)  # as an ImageFolder's --limit
  np.testing.assert_array_equal(limited.images, rendered.images[keep])
  np.testing.assert_array_equal(limited.labels, rendered.labels[keep])
  # Without a limit every rendered scene stays, in order.
  whole = classification.shapes_count(num_images=60, image_size=SIZE)
  np.testing.assert_array_equal(rendered.images, whole.images)
  np.testing.assert_array_equal(rendered.labels, whole.labels)
  # colour-shape already cycles through its classes: a limit keeps its first images.
  colour_shape = zs.load_data("shapes-colour-shape", SIZE, num_images=60, limit=10)
  np.testing.assert_array_equal(colour_shape.images,
                                classification.shapes_colour_shape(num_images=60, image_size=SIZE).images[:10])


# ----------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------

def _write_folder(root, classes=("red_circle", "blue_square", "green_star", "white_ring"), per_class=2,
                  sizes=((24, 18), (18, 30))):
  """Class folders of rendered shapes-world objects, PNG and JPEG, in non-square sizes."""
  rng = np.random.default_rng(0)
  for name in classes:
    colour, shape = name.split("_")
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      scene = shapes.single_object_scene(shapes.SHAPES.index(shape), shapes.COLOURS.index(colour), rng)
      w, h = sizes[i % len(sizes)]
      image = Image.fromarray(shapes.render(scene, max(w, h))).resize((w, h))
      image.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
  return root


def test_image_folder_builds_once_with_sorted_labels_and_clip_preprocessing(tmp_path):
  root = _write_folder(tmp_path / "shapes folder", classes=("red_circle", "blue_square", "green_star"))
  (root / "notes.txt").write_text("not an image")  # loose files beside the class folders are ignored
  logs = []
  builder = imagefolder.build_image_folder(root, image_size=SIZE, data_dir=tmp_path / "data", log=logs.append)
  data = imagefolder.load_classification_set(builder)
  assert data.class_names == ("blue square", "green star", "red circle")  # sorted folder names
  np.testing.assert_array_equal(data.labels, [0, 0, 1, 1, 2, 2])
  assert data.images.shape == (6, SIZE, SIZE, 3) and data.images.dtype == np.uint8
  # Shorter side to 16 (bicubic), then the centre crop: the same as the caption corpora's preprocessing.
  from mat_jax.data.corpora import resize_and_crop
  want = np.asarray(resize_and_crop(Image.open(root / "red_circle" / "1.png"), SIZE), np.float32)
  assert np.abs(data.images[5].astype(np.float32) - want).mean() < 4.0  # JPEG round trip
  imagefolder.build_image_folder(root, image_size=SIZE, data_dir=tmp_path / "data", log=logs.append)
  assert any("reusing" in line for line in logs)
  # A changed folder is another dataset (its fingerprint changes), built afresh.
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "red_circle" / "2.png")
  rebuilt = imagefolder.build_image_folder(root, image_size=SIZE, data_dir=tmp_path / "data", log=logs.append)
  again = imagefolder.load_classification_set(rebuilt)
  assert len(again) == 7

  split_root = tmp_path / "split"
  _write_folder(split_root / "train", classes=("red_circle", "blue_square"))
  _write_folder(split_root / "test", classes=("red_circle", "blue_square"), per_class=1)
  split_builder = imagefolder.build_image_folder(split_root, image_size=SIZE, data_dir=tmp_path / "data",
                                                 log=logs.append)
  assert sorted(split_builder.info.splits.keys()) == ["test", "train"]
  assert len(imagefolder.load_classification_set(split_builder, "test")) == 2
  assert len(imagefolder.load_classification_set(split_builder, "train", limit=3)) == 3
  # A limit samples the classes in turn, not the first class's images (records are stored class by class).
  limited = imagefolder.load_classification_set(rebuilt, limit=4)
  np.testing.assert_array_equal(limited.labels, [0, 0, 1, 2])  # each class's first image, then blue's second
  np.testing.assert_array_equal(limited.images, again.images[[0, 1, 2, 4]])


def test_classes_in_turn():
  labels = np.array([2, 2, 0, 0, 0, 1, 2, 1])
  np.testing.assert_array_equal(classification.classes_in_turn(labels, 3), [0, 2, 5])  # first of 0, 1, 2
  np.testing.assert_array_equal(classification.classes_in_turn(labels, 5), [0, 2, 3, 5, 7])  # then the second of 0, 1
  np.testing.assert_array_equal(classification.classes_in_turn(labels, 8), np.arange(8))
  cyclic = np.arange(20) % 7  # a set already in turn (the shapes sets) keeps its first images
  np.testing.assert_array_equal(classification.classes_in_turn(cyclic, 9), np.arange(9))
  data = classification.ClassificationSet(np.zeros((8, 2, 2, 3), np.uint8), labels, ("a", "b", "c"))
  np.testing.assert_array_equal(data.take(3).labels, [2, 0, 1])


def test_image_folder_bad_input_names_the_problem(tmp_path):
  with pytest.raises(CorpusError, match="does not exist"):
    imagefolder.scan(tmp_path / "missing")
  (tmp_path / "flat").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "x.png")
  with pytest.raises(CorpusError, match="no class folders"):
    imagefolder.scan(tmp_path / "flat")
  empty = _write_folder(tmp_path / "empty", classes=("red_circle", "blue_square"))
  (empty / "green_star").mkdir()
  (empty / "green_star" / "readme.txt").write_text("no images here")
  with pytest.raises(CorpusError, match="green_star holds no images"):
    imagefolder.scan(empty)
  split = tmp_path / "split"
  _write_folder(split / "train", classes=("red_circle", "blue_square"))
  _write_folder(split / "test", classes=("red_circle",))
  with pytest.raises(CorpusError, match="different classes.*blue_square"):
    imagefolder.scan(split)
  # Split folders beside another folder: read as one split, train's and test's classes would share labels.
  _write_folder(split / "test", classes=("blue_square",))
  (split / "examples").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(split / "examples" / "preview.png")
  with pytest.raises(CorpusError, match=r"mixes split folders \(test, train: class folders inside\) with other "
                                        r"folders \(examples\)"):
    imagefolder.scan(split)
  # A class that happens to be called "train" (images of its own) stays a class.
  vehicles = tmp_path / "vehicles"
  for name in ("bus", "train"):
    (vehicles / name).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(vehicles / name / "x.png")
  assert sorted(imagefolder.scan(vehicles)[imagefolder.SINGLE_SPLIT]) == ["bus", "train"]
  corrupt = _write_folder(tmp_path / "corrupt", classes=("red_circle", "blue_square"))
  (corrupt / "blue_square" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  with pytest.raises(CorpusError, match="corrupt or unreadable image file .*broken.jpg.*; replace the file or "
                                        "remove it from the folder"):
    imagefolder.build_image_folder(corrupt, image_size=SIZE, data_dir=tmp_path / "data", log=lambda m: None)


def test_class_names_that_tokenise_to_nothing_are_refused(victim):
  images = np.zeros((3, SIZE, SIZE, 3), np.uint8)
  data = classification.ClassificationSet(images, np.array([0, 1, 2]), ("red circle", "zebra crossing", "  "),
                                          name="bad")
  with pytest.raises(zs.ZeroShotError, match=r"\['zebra crossing', '  '\] tokenise to nothing"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, data, templates=("a picture of {}",))
  twice = dataclasses.replace(data, class_names=("red circle", "blue square", "red circle"))
  with pytest.raises(zs.ZeroShotError, match="more than once"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, twice, templates=("{}",))
  # Folders Red_Circle and red_circle: the tokenizer lowercases, so the two classes would be one embedding
  # and the second could never be predicted.
  cased = dataclasses.replace(data, class_names=("Red circle", "blue square", "red circle"))
  with pytest.raises(zs.ZeroShotError, match=r"classes \['Red circle', 'red circle'\] have prompts that tokenise "
                                             r"identically \(the tokenizer lowercases\)"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, cased, templates=("{}",))
  # The shapes tokenizer splits on spaces: "a photo of a red." makes "red." one unknown word, as "blue." is;
  # renaming the classes cannot help, the template can.
  colours = dataclasses.replace(data, class_names=("red", "blue", "green"))
  with pytest.raises(zs.ZeroShotError, match=r"classes \['red', 'blue', 'green'\] tokenise apart alone but "
                                             r"identically inside their prompts \(e.g. 'a photo of a red.'\)"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, colours, templates=("a photo of a {}.",))
  fine = dataclasses.replace(data, class_names=("red circle", "blue square", "green star"))
  with pytest.raises(zs.ZeroShotError, match="no '\\{\\}'"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, fine, templates=("a picture",))
  with pytest.raises(zs.ZeroShotError, match="exceed the model's context"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, fine, templates=("a " * 30 + "{}",))
  with pytest.raises(zs.ZeroShotError, match="at least 4 classes"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, fine, attacks=("apgd-t",),
                         templates=("{}",))
  own = dataclasses.replace(fine, prompts=(("a red circle",), ("a blue square",), ("zebra",)))
  with pytest.raises(zs.ZeroShotError, match="own prompts"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, own, templates=("{}",))
  with pytest.raises(zs.ZeroShotError, match=r"prompts of classes \['green star'\] tokenise to nothing"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, own)


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

def test_command_line_on_an_image_folder_and_a_shapes_set(model_dir, tmp_path, capsys):
  root = _write_folder(tmp_path / "folder")
  out = tmp_path / "out"
  common = ["--task", "zeroshot", "--model", str(model_dir), "--eps", "0,4", "--apgd-steps", "3", "--steps", "2",
            "--batch-size", "3", "--no-progress", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
  # PGD only: each attack's first compilation on a CLIP takes a minute on a loaded 2-core CPU, and the
  # attacks themselves are tested above on the stand-in encoder.
  assert evaluate_cli.main([*common, "--data", str(root), "--attacks", "pgd", "--template", "{}", "--template",
                  "a picture of a {}"]) == 0
  printed = capsys.readouterr().out
  assert "pgd" in printed and "robust" in printed and "0 (clean)" in printed
  results = json.loads((out / "results.json").read_text())
  assert results["num_images"] == 8 and results["num_classes"] == 4
  assert results["class_names"] == ["blue square", "green star", "red circle", "white ring"]
  assert results["templates"] == ["{}", "a picture of a {}"] and results["prompts_per_class"] == [2] * 4
  assert set(results["attacks"]) == {"pgd"} and set(results["robust"]) == {"0", "4"}
  clean = results["clean"]["accuracy"]
  for attack, per_eps in results["attacks"].items():
    assert per_eps["0"]["accuracy"] == clean, attack  # eps = 0 changes nothing
    assert per_eps["4"]["accuracy"] <= clean
    assert results["robust"]["4"]["accuracy"] <= per_eps["4"]["accuracy"]
  assert results["robust"]["0"]["accuracy"] == clean

  # A 3-class shapes set is rendered at the model's size (attacking it would compile every attack again
  # for 3 classes; the attacks' behaviour is covered above).
  count = zs.load_data("shapes-count", SIZE, num_images=5)
  assert count.images.shape == (5, SIZE, SIZE, 3) and count.class_names == classification.COUNT_NAMES

  # Bad input is one error line and exit status 2, as in every command.
  for flags, message in [(["--data", "shapes-count", "--template", "{}"], "--template applies"),
                         (["--attacks", "apgd-ce,fgsm"], "unknown zero-shot attacks"),
                         (["--limit", "0"], "at least 1"), (["--eps", "nan"], "finite"), (["--eps", "inf"], "finite"),
                         (["--eps", ","], "argument --eps: no budget in ','; give at least one")]:
    with pytest.raises(SystemExit):
      evaluate_cli.main([*common, *flags])
    assert message in capsys.readouterr().err


def test_a_broken_model_or_unscaled_pixels_are_refused_not_scored(victim):
  """NaN logits argmax to class 0, so a model with a NaN weight read as accurate on class 0; float pixels in
  [0, 255] scored as nonsense (an attack at eps 0 below clean)."""
  data = classification.shapes_colour_shape(num_images=6, image_size=SIZE)
  broken = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[0, 0].set(jnp.nan) if "visual_projection" in jax.tree_util.keystr(path) else x,
      victim.params)
  with pytest.raises(zs.ZeroShotError, match="are not finite"):
    zs.evaluate_zeroshot(victim.encoder, broken, victim.tokenizer, data, attacks=["pgd"], eps_255=(1,))
  unscaled = dataclasses.replace(data, images=data.images.astype(np.float32))
  with pytest.raises(InputError, match="0-255"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, unscaled, attacks=["pgd"], eps_255=(1,))
  with pytest.raises(zs.ZeroShotError, match="no attack given"):
    zs.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, data, attacks=[], eps_255=(1,))


def test_templates_fill_only_their_braces_pair():
  assert zs.prompts_from_templates(["cat"], ["a {} in {style}", "a {} }{"]) == [["a cat in {style}", "a cat }{"]]


def test_each_data_set_writes_its_own_results_by_default(tmp_path, monkeypatch):
  """The guide's colour x shape and count commands, one after the other, keep both results.json."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "my_folder").mkdir()
  outs = [evaluate_cli.parse_zeroshot_args(["--model", "m", "--data", data]).out
          for data in ("shapes-colour-shape", "shapes-count", "my_folder")]
  assert outs == [str(Path("zeroshot_results") / name) for name in ("shapes-colour-shape", "shapes-count",
                                                                     "my_folder")]
  assert evaluate_cli.parse_zeroshot_args(["--model", "m", "--out", "here"]).out == "here"
  path = ev.write_json({"a": 1.0}, tmp_path / "r" / "results.json")
  assert json.loads(path.read_text()) == {"a": 1.0} and [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_zeroshot_computes_the_models_as_retrieval_does(monkeypatch):
  """The execution flags reach the victim (`auto` is bfloat16 on an accelerator): without them its models
  would compute in the checkpoint's float32 on a GPU."""
  seen = {}

  def load_victim(source, tokenizer=None, **options):
    seen.update(options)
    raise RuntimeError("loaded")

  monkeypatch.setattr(ev, "load_victim", load_victim)
  defaults = evaluate_cli.parse_zeroshot_args(["--model", "m"])
  with pytest.raises(RuntimeError, match="loaded"):
    evaluate_cli.run_zeroshot(defaults)
  assert seen == {"dtype": "float32" if jax.default_backend() == "cpu" else "bfloat16", "scan_layers": False,
                  "attention": "auto", "remat": "none"}
  flags = evaluate_cli.parse_zeroshot_args(["--model", "m", "--dtype", "bfloat16", "--scan-layers", "--attention",
                                            "xla", "--remat", "nothing_saveable"])
  with pytest.raises(RuntimeError, match="loaded"):
    evaluate_cli.run_zeroshot(flags)
  assert seen == {"dtype": "bfloat16", "scan_layers": True, "attention": "xla", "remat": "nothing_saveable"}


def test_zeroshot_flags_are_read_before_a_cached_model_is_trained(tmp_path, monkeypatch, capsys):
  # "shapes" is trained into the cache on first use (minutes): --help or a bad flag must not wait for that.
  from mat_jax.training import loop
  monkeypatch.setattr(loop, "ensure_cached_source", lambda source, **_: pytest.fail("trained before reading the flags"))
  (tmp_path / "afile").write_text("")
  for flags, message in [(["--help"], "usage:"), (["--eps", "nan"], "finite"), (["--bogus-flag"], "unrecognized"),
                         (["--eps", "300"], "more than the whole pixel range"),
                         (["--data", "shapes-count", "--attacks", "apgd-t"], "at least 4 classes"),
                         (["--data", str(tmp_path / "nowhere")], "neither"),
                         (["--data", "shapes-count", "--split", "dev"], "unknown split 'dev'; the shapes world has"),
                         (["--data", str(tmp_path), "--template", "a photo"], "have no '{}'"),
                         (["--seed", "-1"], "argument --seed: use a seed in [0, 2147483647], got -1"),
                         (["--seed", "99999999999999999999"], "argument --seed: use a seed in [0, 2147483647]"),
                         (["--attacks", ","], "--attacks names no attack"),
                         (["--mesh", "garbage"], "cannot parse mesh 'garbage'"),
                         (["--data-dir", str(tmp_path / "afile" / "sub")], "--data-dir"),
                         (["--data", "shapes-count", "--class-names", str(tmp_path / "afile")],
                          "applies to ImageFolder"),
                         (["--data", str(tmp_path), "--class-names", str(tmp_path / "none.txt")], "no such file")]:
    with pytest.raises(SystemExit):
      evaluate_cli.main(["--task", "zeroshot", "--model", "shapes", "--out", str(tmp_path), *flags])
    captured = capsys.readouterr()
    assert message in captured.out + captured.err


def test_class_names_file_names_imagefolder_classes(tmp_path):
  """ImageNet's folders are WordNet ids: their prompts ("a photo of a n01440764.") name nothing, so they
  are refused without --class-names, a file of names in the sorted folders' order or a JSON mapping."""
  root = _write_folder(tmp_path / "ids", classes=("red_circle", "blue_square"), per_class=1)
  for old, wnid in (("blue_square", "n00000002"), ("red_circle", "n00000001")):
    (root / old).rename(root / wnid)
  data_dir = tmp_path / "data"
  with pytest.raises(zs.ZeroShotError, match="WordNet ids .* --class-names FILE"):
    zs.load_data(str(root), SIZE, data_dir=data_dir, log=lambda _: None)
  lines = tmp_path / "names.txt"
  lines.write_text("red circle\nblue square\n")
  data = zs.load_data(str(root), SIZE, data_dir=data_dir, class_names=str(lines), log=lambda _: None)
  assert data.class_names == ("red circle", "blue square") and data.folders == ("n00000001", "n00000002")
  mapping = tmp_path / "names.json"
  mapping.write_text(json.dumps({"n00000002": "blue square", "n00000001": "red circle"}))
  assert zs.read_class_names(mapping, data.folders) == ("red circle", "blue square")
  for text, message in (("red circle\n", "holds 1 names for 2 class folders"),
                        ('{"n00000001": "red circle"}', r"missing \['n00000002'\]"),
                        ('{"n00000001": "red circle", "n00000002": ""}', "non-empty name"),
                        ("{not json", "not valid JSON")):
    lines.write_text(text)
    with pytest.raises(zs.ZeroShotError, match=message):
      zs.read_class_names(lines, data.folders)


@pytest.mark.parametrize("setting", ["1", "0"])
def test_the_attacks_compile_at_once_before_the_first_batch(monkeypatch, setting):
  """One program per attack (the budget is traced), all compiled before the first batch (MAT_JAX_COMPILE_AHEAD,
  on by default): the batches then compile none. Off, the first batch of each attack compiles its own."""
  monkeypatch.setenv("MAT_JAX_COMPILE_AHEAD", setting)
  params, tokenizer, data = _four_classes()
  batches_began, lines = [], []  # where in the compiled programs' list the first batch began
  real = zs._attack_correct

  def batch(*args):
    if not batches_began:
      batches_began.append(len(compiled))
    return real(*args)

  monkeypatch.setattr(zs, "_attack_correct", batch)
  batch.lower = real.lower
  # Step counts no other test uses: programs the session's caches cannot hold yet.
  steps = 3 if setting == "1" else 4
  with helpers.compiled_programs() as compiled:
    results = zs.evaluate_zeroshot(MLPDualEncoder(), params, tokenizer, data, attacks=["apgd-ce", "apgd-t", "pgd"],
                                   eps_255=(1, 2), settings=zs.Settings(apgd_steps=steps, pgd_steps=steps),
                                   batch_size=4, log=lines.append)
  assert set(results["attacks"]) == {"apgd-ce", "apgd-t", "pgd"}
  ahead, in_batches = compiled[:batches_began[0]], compiled[batches_began[0]:]
  if setting == "1":
    assert ahead.count("jit(_attack_correct)") == 3 and "jit(_attack_correct)" not in in_batches, compiled
    assert any("the attacks' 3 programs compiled in" in line for line in lines), lines
  else:
    assert "jit(_attack_correct)" not in ahead and in_batches.count("jit(_attack_correct)") == 3, compiled
