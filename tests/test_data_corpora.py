"""Dataset builders without TensorFlow: the shapes world and local caption corpora, bad input, the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mat_jax import paths
from mat_jax.data import corpora, shapes
from mat_jax.data.__main__ import main as cli

SHAPES = dict(train=6, val=2, test=4, image_size=32, captions_per_image=5, seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def shapes_builder(data_dir):
  return corpora.build_shapes(data_dir, log=lambda message: None, **SHAPES)


def test_shapes_world_round_trips_through_array_record(shapes_builder, data_dir):
  cfg = corpora.shapes_config(**SHAPES)
  # Readable by name from the files alone, as any tfds dataset.
  again = tfds.builder(f"shapes_world/{cfg.name}", data_dir=str(data_dir))
  assert {k: v.num_examples for k, v in again.info.splits.items()} == {"train": 6, "val": 2, "test": 4}
  assert list(Path(str(shapes_builder.data_path)).glob("*.array_record-*"))
  source = again.as_data_source(split="test")
  for i in range(4):
    record = source[i]
    scene = shapes.scene_for(3, "test", i)
    assert record["image_id"] == i
    np.testing.assert_array_equal(record["image"], shapes.render(scene, 32))  # PNG is lossless
    caps = [c.decode() for c in record["captions"]]
    assert caps == shapes.captions(scene, np.random.default_rng((3, 2, i, 1)), 5)
    stored = shapes.Scene.from_record(record["scene"])
    assert [(o.key, o.size, o.row, o.col) for o in stored.objects] == \
        [(o.key, o.size, o.row, o.col) for o in scene.objects]
    np.testing.assert_allclose([o.x for o in stored.objects], [o.x for o in scene.objects], rtol=1e-6)


def test_a_world_built_by_several_processes_holds_the_records_one_process_makes(tmp_path, monkeypatch):
  # Two builder processes, five tasks: the records come back in index order, each the same as one process
  # makes it, and the dataset they build reads back as the one-process build's (the demo's 10k-scene
  # split is built this way; a split this small is not, unless asked).
  monkeypatch.setattr(corpora, "SCENES_PER_TASK", 3)
  args = (3, "train", 14, 5, None, 32)
  alone = list(corpora.shapes_records(*args, num_processes=1))
  together = list(corpora.shapes_records(*args, num_processes=2))
  assert [(png, caps, sorted(scene)) for png, caps, scene in together] == \
      [(png, caps, sorted(scene)) for png, caps, scene in alone]
  assert len(alone) == 14 and alone[13][1] == shapes.record_text(3, "train", 13, 5)[1]
  monkeypatch.setattr(corpora, "PARALLEL_BUILD_MIN_SCENES", 1)
  built = corpora.build_shapes(tmp_path, log=lambda message: None, **dict(SHAPES, train=14))
  source = corpora.data_source(built, "train")
  for i in range(14):
    np.testing.assert_array_equal(source[i]["image"], shapes.render(shapes.scene_for(3, "train", i), 32))
    assert [c.decode() for c in source[i]["captions"]] == alone[i][1]


def test_a_builder_process_that_dies_is_a_clear_error_and_leaves_no_dataset(tmp_path, monkeypatch):
  import helpers

  monkeypatch.setattr(corpora, "SCENES_PER_TASK", 3)
  monkeypatch.setattr(corpora, "PARALLEL_BUILD_MIN_SCENES", 1)
  monkeypatch.setattr(shapes, "encoded_records", helpers.builder_process_that_dies)
  with pytest.raises(corpora.BuildError, match="ended abruptly .* run the command again"):
    corpora.build_shapes(tmp_path, log=lambda message: None, **dict(SHAPES, train=8))
  config = corpora.shapes_config(**dict(SHAPES, train=8))
  assert not any(p.name != ".lock" for p in (tmp_path / "shapes_world" / config.name).iterdir())


# A build by two builder processes on any machine, of a split small enough to rebuild in a moment.
_POOLED_BUILD = """
import sys
from mat_jax import processes
from mat_jax.data import corpora
corpora.SCENES_PER_TASK, corpora.PARALLEL_BUILD_MIN_SCENES = 20, 1
processes.usable_cores = lambda: 2
corpora.build_shapes(sys.argv[1], **eval(sys.argv[2]))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the processes from /proc")
def test_a_killed_build_takes_its_builder_processes_along_and_its_rerun_the_partial_build(tmp_path):
  """SIGKILL of a build that uses builder processes: they end with it (orphaned, they ran on, blocked, and
  held its stdout open, so `| tee` never ended), and the rerun removes tfds's incomplete.* directory."""
  import subprocess
  import sys
  import time

  import helpers

  sizes = dict(SHAPES, train=400)
  build = subprocess.Popen([sys.executable, "-c", _POOLED_BUILD, str(tmp_path), repr(sizes)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  children = {}
  try:
    deadline = time.monotonic() + 120
    while len(children) < 3 and build.poll() is None and time.monotonic() < deadline:  # 2 builders, 1 tracker
      time.sleep(0.05)
      children = helpers.child_processes(build.pid)
    assert len(children) >= 3, f"the build started {len(children)} processes: {build.poll()=}"
    assert not helpers.survivors_after_kill(build, children)
  finally:
    build.kill()
    helpers.kill_processes(children)
  config_dir = tmp_path / "shapes_world" / corpora.shapes_config(**sizes).name
  assert list(config_dir.glob("incomplete.*"))  # what the killed build left
  built = corpora.build_shapes(tmp_path, log=lambda message: None, **sizes)
  assert len(corpora.data_source(built, "train")) == 400
  assert sorted(p.name for p in config_dir.iterdir()) == [".lock", str(corpora.ShapesWorld.VERSION)]


def test_the_world_builders_start_without_the_main_module(monkeypatch, tmp_path):
  # A spawned process imports its parent's __main__ first: for a command line the whole framework, for a
  # script without a main guard the script, run again. The builders' work lives in mat_jax.data.shapes.
  import importlib.util
  import sys
  from multiprocessing import spawn

  from mat_jax import processes

  main = sys.modules["__main__"]
  monkeypatch.setattr(main, "__spec__", importlib.util.spec_from_loader("my_script", loader=None))
  monkeypatch.setattr(main, "__file__", str(tmp_path / "my_script.py"), raising=False)
  before = (main.__dict__.get("__spec__"), main.__dict__.get("__file__"))
  assert spawn.get_preparation_data("builder").keys() & {"init_main_from_name", "init_main_from_path"}
  with processes.main_module_hidden():
    data = spawn.get_preparation_data("builder")
  assert not data.keys() & {"init_main_from_name", "init_main_from_path"}
  assert (main.__dict__.get("__spec__"), main.__dict__.get("__file__")) == before  # named again after
  # Nor do they start a JAX backend (on a GPU host each would claim the GPU's memory).
  import subprocess

  code = ("from mat_jax.data import shapes; shapes.encoded_records(0, 'train', 0, 2, 5, None, 32); "
          "from jax._src import xla_bridge; print(sorted(xla_bridge._backends))")
  assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_built_dataset_is_reused(shapes_builder, data_dir):
  messages = []
  corpora.build_shapes(data_dir, log=messages.append, **SHAPES)
  assert messages and "reusing" in messages[0]


def _build_shapes_and_say(data_dir):
  messages = []
  builder = corpora.build_shapes(data_dir, log=messages.append, **SHAPES)
  # The builder returned to the process that waited must read the other's splits.
  messages.append(f"train {len(corpora.data_source(builder, 'train'))}")
  return str(builder.data_path), messages


def test_processes_that_find_the_world_missing_at_once_build_it_once(tmp_path):
  # Every process of a multi-host run finds it missing at start; each built its own copy and tfds swapped
  # the finished dataset for the next one under the readers' feet. Now one builds, the others wait for it.
  import concurrent.futures
  import multiprocessing

  with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
    results = list(pool.map(_build_shapes_and_say, [tmp_path] * 2))
  assert results[0][0] == results[1][0]
  said = [" ".join(messages) for _, messages in results]
  assert sum("reusing the dataset" not in s for s in said) == 1, said  # one built it, the other reused it
  assert all(s.endswith("train 6") for s in said), said
  source = tfds.builder(f"shapes_world/{corpora.shapes_config(**SHAPES).name}", data_dir=str(tmp_path))
  assert source.info.splits["train"].num_examples == 6


def test_data_dir_comes_from_argument_then_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "env"))
  assert paths.default_data_dir() == tmp_path / "env"
  assert paths.default_data_dir(tmp_path / "arg") == tmp_path / "arg"
  monkeypatch.delenv(paths.DATA_DIR_ENV)
  assert paths.default_data_dir() == Path("~/.cache/mat_jax/datasets").expanduser()


def test_shapes_config_rejects_bad_sizes():
  with pytest.raises(ValueError, match="train split size"):
    corpora.shapes_config(train=-1)
  with pytest.raises(ValueError, match="all splits are empty"):
    corpora.shapes_config(train=0, val=0, test=0)
  with pytest.raises(ValueError, match="world seed must be >= 0, got -1"):
    corpora.shapes_config(seed=-1)


def test_caption_cleaning_is_the_references_pre_caption():
  clean = corpora.CaptionCleaning()
  assert clean('A Dog-run, on/the "grass"!  (Really?)  ') == "a dog run on the grass really"
  assert clean("x;y:z~w#*") == "xyzw"
  assert clean(" ".join(str(i) for i in range(40))) == " ".join(str(i) for i in range(30))
  assert corpora.CaptionCleaning(max_words=3, lowercase=False)("The Cat sat on") == "The Cat sat"
  assert corpora.NO_CLEANING("Keep, This!") == "Keep, This!"
  # -1 is not "no limit" (that is 0): it would silently drop every caption's last word.
  with pytest.raises(ValueError, match=r"max_words must be >= 0 \(0 keeps every word\), got -1"):
    corpora.CaptionCleaning(max_words=-1)


# --------------------------------------------------------------------------------------------------
# Local corpora.
# --------------------------------------------------------------------------------------------------

def _photo(path: Path, width: int, height: int, seed: int) -> None:
  """A wide or tall image: red centre square, blue margins (to check the centre crop)."""
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[...] = (20, 40, 220)
  side = min(width, height)
  top, left = (height - side) // 2, (width - side) // 2
  pixels[top:top + side, left:left + side] = (220, 30, 30)
  pixels[top + side // 2, left + side // 2] = seed  # differs per image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path, quality=95)


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("corpus")
  sizes = [(96, 48), (40, 80), (64, 64), (120, 60), (50, 100), (70, 70)]
  for i, (w, h) in enumerate(sizes):
    _photo(root / "images" / "part" / f"{i}.jpg", w, h, i)
  splits = ["train", "restval", "val", "test", "test", "test"]
  karpathy = {"images": [
      {"filepath": "part", "filename": f"{i}.jpg", "split": splits[i], "imgid": i,
       "sentences": [{"raw": f"A Red-square, in/the middle #{i}!", "tokens": []}, {"raw": "Second one."}]}
      for i in range(6)]}
  (root / "dataset_toy.json").write_text(json.dumps(karpathy))
  albef_test = [{"image": f"part/{i}.jpg", "caption": [f"Caption {i}.", "Another!"]} for i in (3, 4, 5)]
  (root / "toy_test.json").write_text(json.dumps(albef_test))
  albef_train = [{"image": "part/0.jpg", "caption": "first", "image_id": "0"},
                 {"image": "part/0.jpg", "caption": "second", "image_id": "0"},
                 {"image": "part/1.jpg", "caption": "third", "image_id": "1"}]
  (root / "toy_train.json").write_text(json.dumps(albef_train))
  return root


def _quiet(message: str) -> None:
  del message


def test_karpathy_corpus_builds_with_splits_cleaning_and_centre_crop(corpus_files, data_dir):
  builder = corpora.build_corpus("toykarpathy", [corpus_files / "dataset_toy.json"], corpus_files / "images",
                                 image_size=32, data_dir=data_dir, log=_quiet)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 2, "val": 1, "test": 3}
  test = corpora.data_source(builder, "test")
  assert [test[i]["filename"].decode() for i in range(3)] == ["part/3.jpg", "part/4.jpg", "part/5.jpg"]
  record = test[0]
  assert [c.decode() for c in record["captions"]] == ["a red square in the middle 3", "second one"]
  image = record["image"]
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  # The centre crop keeps the red square and drops the blue margins of the 120x60 image.
  assert image[..., 0].mean() > 180 and image[..., 2].mean() < 60
  assert dict(builder.info.metadata["skipped"]) == {"train": 0, "val": 0, "test": 0}
  assert dict(builder.info.metadata["dropped_captions"]) == {"train": 0, "val": 0, "test": 0}
  # Read back from its files alone (no annotations needed).
  again = corpora.corpus_builder("toykarpathy", 32, data_dir)
  assert again.info.splits["train"].num_examples == 2
  with pytest.raises(ValueError, match="no split 'dev'"):
    corpora.data_source(again, "dev")


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (640, 427), (600, 300), (333, 500), (224, 224)])
def test_resize_and_crop_gives_clips_preprocessed_pixels(width, height):
  # transformers' CLIP image processor (PIL backend, no rescaling or normalisation) is the reference:
  # the same bicubic resize of the shorter side and centre crop, so the same pixels.
  from transformers import CLIPImageProcessorPil

  processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                    do_rescale=False, do_normalize=False)
  pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
  image = Image.fromarray(pixels)
  want = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_array_equal(np.asarray(corpora.resize_and_crop(image, 224), np.float32), want)


def _png_round_trip(image: Image.Image, **save) -> Image.Image:
  """The image as PIL reads it back from a PNG file (its mode and `info`, transparency included)."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", **save)
  read = Image.open(io.BytesIO(buffer.getvalue()))
  read.load()
  return read


def _transparent_image(kind: str, width: int, height: int) -> Image.Image:
  rng = np.random.default_rng(width + height)
  rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  # Fully transparent, half and opaque pixels; the transparent ones keep a stored colour (not white).
  alpha = rng.choice(np.asarray([0, 0, 77, 128, 255], np.uint8), (height, width))
  if kind == "rgba":
    return _png_round_trip(Image.fromarray(np.dstack([rgb, alpha])))
  if kind == "la":
    return _png_round_trip(Image.fromarray(np.dstack([rgb[..., 0], alpha])))
  if kind == "palette":  # one palette index transparent (a tRNS chunk), as GIFs and small PNGs have
    return _png_round_trip(Image.fromarray(rgb).quantize(16), transparency=3)
  assert kind == "rgb-trns"  # one RGB colour transparent: black, one of the image's four
  four = rng.choice(np.asarray([[0, 0, 0], [200, 10, 10], [10, 200, 10], [10, 10, 200]], np.uint8), (height, width))
  return _png_round_trip(Image.fromarray(four), transparency=(0, 0, 0))


@pytest.mark.parametrize("kind", ["rgba", "la", "palette", "rgb-trns"])
@pytest.mark.parametrize("width, height", [(500, 375), (333, 500)])
def test_transparent_images_are_composited_onto_white_as_clips_processor_does(kind, width, height):
  import transformers
  from packaging.version import Version
  from transformers import CLIPImageProcessorPil

  processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                    do_rescale=False, do_normalize=False)
  image = _transparent_image(kind, width, height)
  want = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  got = np.asarray(corpora.resize_and_crop(image, 224), np.float32)
  # The stored colours alone (alpha and transparency dropped), as `convert("RGB")` gives them.
  stored_colours = np.asarray(corpora.resize_and_crop(Image.fromarray(np.asarray(image.convert("RGB"))), 224),
                              np.float32)
  if Version(transformers.__version__) >= Version("5.21"):
    np.testing.assert_array_equal(got, want)
  else:  # the processor composited from 5.21 on; before, it kept the stored colours (docs/data.md)
    np.testing.assert_array_equal(stored_colours, want)
  assert np.abs(stored_colours - got).max() > 100  # not vacuous: compositing changes the pixels


def test_16_bit_grayscale_is_rescaled_to_8_bits_unlike_clips_processor(tmp_path):
  """A 16-bit grayscale PNG (PIL mode I;16) reads as the same image at 8 bits (value / 257, rounded).

  Here the project differs from CLIP's image processor on purpose: it converts through PIL, which clips
  every value above 255 to white, so a 16-bit photo comes out almost all white."""
  rng = np.random.default_rng(0)
  eight = rng.integers(0, 256, (75, 100), dtype=np.uint8)
  path = tmp_path / "gray16.png"
  Image.fromarray(eight.astype(np.uint16) * 257).save(path)
  assert Image.open(path).mode == "I;16"
  with Image.open(path) as wide:
    wide.load()
    np.testing.assert_array_equal(np.asarray(corpora.resize_and_crop(wide, 32)),
                                  np.asarray(corpora.resize_and_crop(Image.fromarray(eight), 32)))
  stored = np.asarray(Image.open(io.BytesIO(corpora.load_image(path, 32, "test"))))
  assert abs(stored.mean() - eight.mean()) < 10, stored.mean()  # clipping at 255 would give about 253
  # Rounding to the nearest 8-bit level, big-endian 16-bit and 32-bit integer (read as 16-bit, clipped) too.
  levels = np.asarray([[0, 128, 129, 385, 386, 65535]], np.uint16)
  want = [[0, 0, 1, 1, 2, 255]]
  np.testing.assert_array_equal(np.asarray(corpora.to_rgb(Image.fromarray(levels)))[..., 0], want)
  big_endian = Image.frombytes("I;16B", (6, 1), levels.astype(">u2").tobytes())
  np.testing.assert_array_equal(np.asarray(corpora.to_rgb(big_endian))[..., 0], want)
  int32 = Image.fromarray(np.asarray([[-5, 128, 129, 385, 386, 70000]], np.int32))
  assert int32.mode == "I"
  np.testing.assert_array_equal(np.asarray(corpora.to_rgb(int32))[..., 0], want)
  # A tRNS grey level (in 16-bit units) is transparent: white, as other transparent pixels.
  transparent = _png_round_trip(Image.fromarray(np.asarray([[257 * 10, 257 * 20]], np.uint16)), transparency=257 * 10)
  assert transparent.mode == "I;16"
  np.testing.assert_array_equal(np.asarray(corpora.to_rgb(transparent)), [[[255] * 3, [20] * 3]])


def test_albef_corpus_merges_captions_and_takes_split_from_name(corpus_files, data_dir):
  builder = corpora.build_corpus(
      "toyalbef", [corpus_files / "toy_test.json", f"train={corpus_files / 'toy_train.json'}"],
      corpus_files / "images", image_size=24, data_dir=data_dir, log=_quiet)
  train = corpora.data_source(builder, "train")
  assert len(train) == 2 and [c.decode() for c in train[0]["captions"]] == ["first", "second"]
  assert [c.decode() for c in corpora.data_source(builder, "test")[2]["captions"]] == ["caption 5", "another"]
  with pytest.raises(corpora.CorpusError, match="cannot tell the split"):
    corpora.read_annotations([corpus_files / "dataset_toy.json"], fmt="albef")


def test_an_image_in_two_albef_files_of_a_split_is_one_entry(tmp_path):
  # Two entries would make its captions in-batch negatives of each other and split its retrieval hits.
  first, second, other = tmp_path / "part1.json", tmp_path / "part2.json", tmp_path / "val.json"
  first.write_text(json.dumps([{"image": "a.jpg", "caption": "a dog runs"}, {"image": "b.jpg", "caption": "a cat"},
                               {"image": "a.jpg", "caption": "a dog"}]))
  second.write_text(json.dumps([{"image": "c.jpg", "caption": "a car"},
                                {"image": "a.jpg", "caption": ["the dog is running", "a dog"]}]))
  other.write_text(json.dumps([{"image": "a.jpg", "caption": "a dog in the val split"}]))
  splits = corpora.read_annotations([f"train={first}", f"train={second}", f"val={other}"])
  # In order of first appearance, the captions in file order (a repeated caption kept, as within a file).
  assert [(e.image, e.captions) for e in splits["train"]] == [
      ("a.jpg", ("a dog runs", "a dog", "the dog is running", "a dog")), ("b.jpg", ("a cat",)),
      ("c.jpg", ("a car",))]
  assert splits["train"][0].where == f"entry 0 (a.jpg) of {first}"
  assert [(e.image, e.captions) for e in splits["val"]] == [("a.jpg", ("a dog in the val split",))]


def test_an_image_twice_in_karpathy_entries_or_a_file_given_twice_is_refused(tmp_path):
  karpathy = tmp_path / "dataset_dup.json"
  karpathy.write_text(json.dumps({"images": [_entry("a.jpg", "test", ["one"]), _entry("b.jpg", "test", ["two"]),
                                             _entry("a.jpg", "test", ["three"])]}))
  with pytest.raises(corpora.CorpusError, match=r"entry 2 \(a\.jpg\) of .* repeats the image of entry 0 \(a\.jpg\) "
                                                r".* in split 'test'"):
    corpora.read_annotations([karpathy])
  # The same image in two splits is two records (the file decides); in two ALBEF files of a split, one.
  karpathy.write_text(json.dumps({"images": [_entry("a.jpg", "test", ["one"]), _entry("a.jpg", "train", ["two"])]}))
  assert sorted(corpora.read_annotations([karpathy])) == ["test", "train"]
  albef = tmp_path / "toy_test.json"
  albef.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}]))
  with pytest.raises(corpora.CorpusError, match="toy_test.json is given twice: its entries would be read twice"):
    corpora.read_annotations([albef, albef])
  # One Karpathy file named once per split is not a repeat.
  assert sorted(corpora.read_annotations([f"test={karpathy}", f"train={karpathy}"])) == ["test", "train"]


def test_a_corpus_built_by_an_older_builder_version_is_rebuilt(corpus_files, data_dir, monkeypatch):
  args = ("toyversion", [corpus_files / "dataset_toy.json"], corpus_files / "images")
  with monkeypatch.context() as patch:
    patch.setattr(corpora.CaptionCorpus, "VERSION", tfds.core.Version("1.1.0"))
    old = corpora.build_corpus(*args, image_size=16, data_dir=data_dir, log=_quiet)
  assert str(old.info.version) == "1.1.0"
  messages = []
  new = corpora.build_corpus(*args, image_size=16, data_dir=data_dir, log=messages.append)
  assert new.info.version == corpora.CaptionCorpus.VERSION != old.info.version
  assert any("was built by version 1.1.0 of the corpus builder" in m for m in messages), messages
  assert corpora.corpus_builder("toyversion", 16, data_dir).info.version == corpora.CaptionCorpus.VERSION
  messages = []
  corpora.build_corpus(*args, image_size=16, data_dir=data_dir, log=messages.append)
  assert messages and "reusing" in messages[0]


def test_rebuilding_with_other_options_is_refused(corpus_files, data_dir, monkeypatch):
  corpora.build_corpus("toyopts", [corpus_files / "dataset_toy.json"], corpus_files / "images", image_size=16,
                       data_dir=data_dir, log=_quiet)
  with pytest.raises(corpora.CorpusError, match="built with other options"):
    corpora.build_corpus("toyopts", [corpus_files / "dataset_toy.json"], corpus_files / "images",
                         image_size=16, cleaning=corpora.NO_CLEANING, data_dir=data_dir, log=_quiet)
  # skip_bad decides which records and captions a corpus holds.
  with pytest.raises(corpora.CorpusError, match="other options .*skip_bad: built with False, now True"):
    corpora.build_corpus("toyopts", [corpus_files / "dataset_toy.json"], corpus_files / "images",
                         image_size=16, skip_bad=True, data_dir=data_dir, log=_quiet)
  # The same files named by relative paths from another directory are the same options.
  monkeypatch.chdir(corpus_files / "images")
  messages = []
  corpora.build_corpus("toyopts", ["../dataset_toy.json"], ".", image_size=16, data_dir=data_dir,
                       log=messages.append)
  assert messages and "reusing" in messages[0]


def test_a_corpus_built_meanwhile_with_other_options_is_refused(corpus_files, data_dir, monkeypatch):
  """Two builds of one name started together: the second waits for the first (`build_once`'s lock) and
  must not return the first one's corpus, made with other options, as its own."""
  files, images = [corpus_files / "dataset_toy.json"], corpus_files / "images"
  original = corpora.build_once

  def another_process_builds_first(builder, *args):
    monkeypatch.setattr(corpora, "build_once", original)
    corpora.build_corpus("toyrace", files, images, image_size=16, data_dir=data_dir, log=_quiet)
    return original(builder, *args)

  monkeypatch.setattr(corpora, "build_once", another_process_builds_first)
  with pytest.raises(corpora.CorpusError, match="built with other options .*cleaning"):
    corpora.build_corpus("toyrace", files, images, image_size=16, cleaning=corpora.NO_CLEANING, data_dir=data_dir,
                         log=_quiet)
  # With the same options the other process's corpus is this one's.
  monkeypatch.setattr(corpora, "build_once", another_process_builds_first)
  shutil.rmtree(data_dir / "caption_corpus" / "toyrace_16px")
  built = corpora.build_corpus("toyrace", files, images, image_size=16, data_dir=data_dir, log=_quiet)
  assert built.info.metadata["build_options"]["cleaning"] == dataclasses.asdict(corpora.CaptionCleaning())


@pytest.fixture()
def bad_corpus(corpus_files, tmp_path) -> Path:
  """The good images plus a corrupt JPEG and a float TIFF in [0, 1] (PIL mode F), which annotations refer to."""
  images = tmp_path / "images"
  images.mkdir()
  for path in (corpus_files / "images" / "part").iterdir():
    (images / path.name).write_bytes(path.read_bytes())
  (images / "corrupt.jpg").write_bytes((images / "0.jpg").read_bytes()[:200])  # truncated JPEG
  Image.fromarray(np.random.default_rng(0).random((48, 96), np.float32)).save(images / "float.tif")
  return tmp_path


def _karpathy(root: Path, entries: list[dict]) -> Path:
  path = root / "dataset_bad.json"
  path.write_text(json.dumps({"images": entries}))
  return path


def _entry(name: str, split: str = "test", captions=("a caption",)) -> dict:
  return {"filename": name, "split": split, "sentences": [{"raw": c} for c in captions]}


@pytest.mark.parametrize("entries, message", [
    ([_entry("0.jpg"), _entry("missing.jpg")], r"missing image file .*missing\.jpg.*; replace the file, or pass "
                                                r"skip_bad=True \(--skip-bad\) to skip its entry"),
    ([_entry("0.jpg"), _entry("corrupt.jpg")], r"corrupt or unreadable image file .*corrupt\.jpg.*--skip-bad"),
    # PIL's RGB conversion clips it: all black.
    ([_entry("0.jpg"), _entry("float.tif")], r"image file .*float\.tif \(entry 1 .* has floating-point pixels "
                                              r"\(PIL mode F.*: convert the image to 8-bit RGB .*--skip-bad"),
    ([_entry("0.jpg"), _entry("1.jpg", captions=())], r"entry 1 \(1\.jpg\) .* has no captions"),
])
def test_bad_records_raise_naming_them_or_are_skipped_and_counted(bad_corpus, data_dir, entries, message):
  annotations = _karpathy(bad_corpus, entries)
  with pytest.raises(corpora.CorpusError, match=message):
    corpora.build_corpus("bad", [annotations], bad_corpus / "images", image_size=16,
                         data_dir=bad_corpus / "data", log=_quiet)
  logged = []
  builder = corpora.build_corpus("bad", [annotations], bad_corpus / "images", image_size=16, skip_bad=True,
                                 data_dir=bad_corpus / "data", log=logged.append)
  assert builder.info.splits["test"].num_examples == 1
  assert builder.info.metadata["skipped"]["test"] == 1
  assert any("skipped 1 bad record" in m for m in logged), logged


def test_an_image_over_pils_pixel_limit_is_named_or_skipped(bad_corpus, monkeypatch):
  # PIL's DecompressionBombError is no OSError; a corrupt size field in a BMP/GIF/TIFF header raises it too.
  from PIL import Image
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # 0.jpg (96x48) stays under it, 120x120 is over twice it
  Image.new("RGB", (120, 120), "red").save(bad_corpus / "images" / "huge.png")
  annotations = _karpathy(bad_corpus, [_entry("0.jpg"), _entry("huge.png")])
  with pytest.raises(corpora.CorpusError, match=r"huge\.png .* claims more pixels than PIL decodes safely"):
    corpora.build_corpus("bomb", [annotations], bad_corpus / "images", image_size=16, data_dir=bad_corpus / "data",
                         log=_quiet)
  builder = corpora.build_corpus("bomb", [annotations], bad_corpus / "images", image_size=16, skip_bad=True,
                                 data_dir=bad_corpus / "data", log=_quiet)
  assert builder.info.metadata["skipped"]["test"] == 1


def test_captions_that_clean_to_nothing_raise_or_are_dropped_and_counted(bad_corpus):
  annotations = _karpathy(bad_corpus, [_entry("0.jpg", captions=("A caption.", "?!")),
                                       _entry("1.jpg", captions=("(...)", "Another one", "...")),
                                       _entry("2.jpg", captions=("#",))])
  with pytest.raises(corpora.CorpusError, match=r"entry 0 \(0\.jpg\) .*: caption '\?!' cleans to nothing; fix "
                     r"the annotation or pass skip_bad=True \(--skip-bad\)"):
    corpora.build_corpus("empty_caps", [annotations], bad_corpus / "images", image_size=16,
                         data_dir=bad_corpus / "data", log=_quiet)
  logged = []
  builder = corpora.build_corpus("empty_caps", [annotations], bad_corpus / "images", image_size=16,
                                 skip_bad=True, data_dir=bad_corpus / "data", log=logged.append)
  test = corpora.data_source(builder, "test")
  assert [[c.decode() for c in test[i]["captions"]] for i in range(len(test))] == [["a caption"], ["another one"]]
  # 2.jpg lost its only caption: one dropped caption and one skipped entry.
  assert builder.info.metadata["dropped_captions"]["test"] == 4
  assert builder.info.metadata["skipped"]["test"] == 1
  assert any(m.startswith("dropped 4 caption(s) that clean to nothing from split 'test'; first: entry 0 (0.jpg)")
             for m in logged), logged


def test_malformed_json_empty_split_and_missing_folder_are_named(bad_corpus):
  broken = bad_corpus / "broken.json"
  broken.write_text('{"images": [ {"filename": "0.jpg",, } ]}')
  with pytest.raises(corpora.CorpusError, match=r"broken\.json is not valid JSON.*line 1"):
    corpora.read_annotations([broken])
  with pytest.raises(corpora.CorpusError, match=r"does not exist"):
    corpora.read_annotations([bad_corpus / "nope.json"])
  with pytest.raises(corpora.CorpusError, match=r"'validation' is not a split; write split=path with split one of "
                                                r"train, val, test"):
    corpora.read_annotations([f"validation={broken}"])
  # A string "sentences" would be read one character per caption.
  stringy = bad_corpus / "stringy.json"
  stringy.write_text('{"images": [{"filename": "0.jpg", "split": "test", "sentences": "a red car"}]}')
  with pytest.raises(corpora.CorpusError, match=r"entry 0 \(0\.jpg\) .*\"sentences\" must be a list .* not str"):
    corpora.read_annotations([stringy])
  empty = bad_corpus / "empty_test.json"
  empty.write_text("[]")
  with pytest.raises(corpora.CorpusError, match=r"empty_test\.json holds no entries \(split 'test'\); check the file"):
    corpora.build_corpus("empty", [empty], bad_corpus / "images", data_dir=bad_corpus / "data", log=_quiet)
  # A split named for a Karpathy file that has none of its entries: the file is named too.
  only_test = _karpathy(bad_corpus, [_entry("0.jpg", "test")])
  with pytest.raises(corpora.CorpusError, match=r"holds no entries of split 'val'; check the file, or leave it out"):
    corpora.read_annotations([f"val={only_test}"])
  all_bad = _karpathy(bad_corpus, [_entry("missing.jpg", "val"), _entry("0.jpg", "test")])
  with pytest.raises(corpora.CorpusError, match="split 'val' is empty"):
    corpora.build_corpus("allbad", [all_bad], bad_corpus / "images", skip_bad=True, image_size=16,
                         data_dir=bad_corpus / "data", log=_quiet)
  with pytest.raises(corpora.CorpusError, match="image folder .* does not exist"):
    corpora.build_corpus("nofolder", [all_bad], bad_corpus / "nowhere", data_dir=bad_corpus / "data",
                         log=_quiet)


@pytest.mark.parametrize("caption, shown", [
    (5, "5"), (None, "null"), ({"raw": "a dog"}, r'\{"raw": "a dog"\}'), (["ok", None], r'\["ok", null\]'),
    ([["nested"]], r'\[\["nested"\]\]'),
], ids=["int", "null", "dict", "list-with-null", "nested-list"])
def test_albef_caption_that_is_not_a_string_or_strings_is_named(tmp_path, caption, shown):
  # A dict would otherwise be read as its keys (the caption "raw"), an int or null fail with a TypeError.
  path = tmp_path / "toy_test.json"
  path.write_text(json.dumps([{"image": "0.jpg", "caption": "fine"}, {"image": "1.jpg", "caption": caption}]))
  with pytest.raises(corpora.CorpusError, match=rf'entry 1 \(1\.jpg\) of .*toy_test\.json: "caption" must be a '
                                                rf"string or strings, got {shown}$"):
    corpora.read_annotations([path])


def test_albef_captions_as_string_list_or_missing_are_read():
  entries = corpora.read_albef("inline.json", data=[{"image": "0.jpg", "caption": "one"},
                                                    {"image": "0.jpg", "caption": ["two", "three"]},
                                                    {"image": "1.jpg"}])
  assert [(e.image, e.captions) for e in entries] == [("0.jpg", ("one", "two", "three")), ("1.jpg", ())]


@pytest.mark.parametrize("split, message", [
    ("tset", r'entry 1 \(1\.jpg\) of .*: "split" is "tset", not one of Karpathy\'s splits train, val, test, '
             r"restval \(restval joins 'train'\)"),
    ("validation", r'"split" is "validation", not one of Karpathy\'s splits train, val, test, restval'),
    (3, r'"split" is 3, not one of'),
    (None, r'entry 1 \(1\.jpg\) of .* has no "split"; every entry of a Karpathy file names its split, one of '
           r"train, val, test, restval"),
], ids=["typo", "validation", "int", "missing"])
def test_karpathy_split_must_be_one_of_karpathys(tmp_path, split, message):
  # Unchecked, a typo made a split of its own (nothing built there would be evaluated) and a missing split
  # put the image in train silently, where it could be a test image.
  bad = {"filename": "1.jpg", "sentences": [{"raw": "a caption"}]}
  if split is not None:
    bad["split"] = split
  path = _karpathy(tmp_path, [_entry("0.jpg"), bad])
  with pytest.raises(corpora.CorpusError, match=message):
    corpora.read_annotations([path])


def test_an_image_path_that_is_not_a_string_is_named(tmp_path):
  with pytest.raises(corpora.CorpusError, match=r'entry 0 of inline\.json: "image" must be a string \(a path\), got 5'):
    corpora.read_albef("inline.json", data=[{"image": 5, "caption": "a dog"}])
  bad = {**_entry("1.jpg"), "filepath": ["part"]}
  with pytest.raises(corpora.CorpusError,
                     match=r'entry 1 of .*: "filepath" must be a string \(a path\), got \["part"\]'):
    corpora.read_annotations([_karpathy(tmp_path, [_entry("0.jpg"), bad])])
  with pytest.raises(corpora.CorpusError, match=r'"filename" must be a string \(a path\), got null'):
    corpora.read_karpathy("inline.json", data={"images": [{**_entry("0.jpg"), "filename": None}]})


def test_karpathy_restval_joins_the_split_given():
  data = {"images": [_entry(f"{i}.jpg", split) for i, split in enumerate(("train", "val", "test", "restval"))]}
  for restval, want in (("train", {"train": ["0.jpg", "3.jpg"], "val": ["1.jpg"], "test": ["2.jpg"]}),
                        ("val", {"train": ["0.jpg"], "val": ["1.jpg", "3.jpg"], "test": ["2.jpg"]})):
    splits = corpora.read_karpathy("inline.json", restval, data)
    assert {name: [e.image for e in entries] for name, entries in splits.items()} == want
  with pytest.raises(corpora.CorpusError, match="restval='trian': the split restval images join is one of"):
    corpora.read_karpathy("inline.json", "trian", data)


def test_cli_reports_a_bad_caption_in_one_line(tmp_path, capsys):
  path = tmp_path / "toy_test.json"
  path.write_text(json.dumps([{"image": "0.jpg", "caption": 7}]))
  (tmp_path / "images").mkdir()
  assert cli(["build", "karpathy", "--annotations", str(path), "--images", str(tmp_path / "images"), "--name",
              "badcaption", "--data-dir", str(tmp_path / "data")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: entry 0 (0.jpg) of ") and '"caption" must be a string or strings, got 7' in err
  assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["build", "shapes", "--train", "-3"], "error: the train split size must be >= 0, got -3"),
    (["build", "shapes", "--rare-form-rate", "2"], "error: rare_form_rate must be in [0, 1]"),
    (["build", "shapes", "--image-size", "8"], "error: image_size 8 is too small to tell shapes apart"),
    (["build", "shapes", "--rare-form-rate", "0", "--captions-per-image", "50"],
     "error: only 44 distinct captions of a scene in 2500 draws; ask for at most 44 captions per image"),
    (["build", "karpathy", "--annotations", "a.json", "--images", ".", "--name", "9lives"],
     "error: dataset name '9lives' must start with a letter"),
    (["mlm", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["build", "karpathy", "--annotations", "a.json", "--images", ".", "--name", "coco", "--restval", "trian"],
     "argument --restval: invalid choice: 'trian'"),
    (["build", "shapes", "--seed", "99999999999999999999"], "argument --seed: use a seed in [0, 2147483647]")])
def test_cli_bad_options_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
  """Reported by the command lines' one error handler (errors.cli_main), as every command line reports them;
  a ValueError from a bug keeps its traceback."""
  try:
    code = cli(argv + ["--data-dir", str(tmp_path / "data")] if argv[0] == "build" else argv)
  except SystemExit as exit_:  # argparse's own errors
    code = exit_.code
  err = capsys.readouterr().err
  assert code == 2 and message in err and "Traceback" not in err, err
  if argv[:2] == ["build", "shapes"]:  # refused before a build started: no dataset directory left behind
    assert not list((tmp_path / "data").glob("shapes_world/*"))


def test_cli_builds_reuses_and_reports(corpus_files, tmp_path, capsys):
  data = str(tmp_path / "data")
  args = ["build", "karpathy", "--annotations", str(corpus_files / "dataset_toy.json"), "--images",
          str(corpus_files / "images"), "--name", "flickr_toy", "--image-size", "16", "--data-dir", data]
  assert cli(args) == 0
  assert "train 2, val 1, test 3" in capsys.readouterr().out
  assert cli(args) == 0
  assert "reusing the dataset already built" in capsys.readouterr().out
  assert cli(["build", "shapes", "--train", "3", "--val", "1", "--test", "2", "--image-size", "24",
              "--data-dir", data]) == 0
  assert "train 3, val 1, test 2" in capsys.readouterr().out
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  assert cli(["build", "karpathy", "--annotations", str(bad), "--images", str(corpus_files / "images"),
              "--name", "broken", "--data-dir", data]) == 2
  assert "bad.json is not valid JSON" in capsys.readouterr().err


def test_the_held_out_forms_world_is_a_build_of_its_own(shapes_builder, data_dir):
  default = corpora.shapes_config(**SHAPES)
  cfg = corpora.shapes_config(**SHAPES, rare_form_rate=0.0)
  assert cfg.name == default.name + "_rare0.0" and "_rare" not in default.name
  # Every digit of the rate names the build: two worlds never share a directory.
  assert corpora.shapes_config(rare_form_rate=0.12345671).name != corpora.shapes_config(rare_form_rate=0.12345674).name
  held_out = corpora.build_shapes(data_dir, log=lambda message: None, **SHAPES, rare_form_rate=0.0)
  source = corpora.data_source(held_out, "test")
  for i in range(4):
    scene = shapes.scene_for(3, "test", i)  # the same scenes, captions in canonical forms
    caps = [c.decode() for c in source[i]["captions"]]
    assert caps == shapes.captions(scene, np.random.default_rng((3, 2, i, 1)), 5, rare_form_rate=0.0)
    assert (caps, source[i]["image_id"]) == (shapes.record_text(3, "test", i, 5, 0.0)[1], i)
  with pytest.raises(ValueError, match=r"rare_form_rate must be in \[0, 1\]"):
    corpora.shapes_config(rare_form_rate=2.0)


def test_builds_leave_no_temporary_directories(tmp_path, monkeypatch, corpus_files):
  """tfds makes a temporary directory to look a new dataset up in its bucket and never removes it; the
  project's builders skip that lookup (`LocalDatasetInfo`), so a build leaves the temp dir as it was."""
  import tempfile

  from mat_jax.data import imagefolder

  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  data = tmp_path / "data"
  corpora.build_shapes(data, log=_quiet, **dict(SHAPES, train=2, val=1, test=1))
  corpora.build_corpus("toyleak", [corpus_files / "dataset_toy.json"], corpus_files / "images", image_size=32,
                       data_dir=data, log=_quiet)
  folder = tmp_path / "folder"
  for name in ("a", "b"):
    (folder / name).mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(folder / name / "0.png")
  imagefolder.build_image_folder(folder, image_size=8, data_dir=data, log=_quiet)
  assert list(scratch.iterdir()) == []


def test_a_corpus_name_is_checked_exactly_before_its_size_is_known(corpus_files, tmp_path):
  """evaluate checks --data before the model that fixes the image size is loaded (or trained, minutes)."""
  with pytest.raises(corpora.CorpusError, match=r"no corpus 'toy' under .* \(the corpora built there: none\)"):
    corpora.check_corpus_built("toy", tmp_path)
  corpora.build_corpus("toy_karpathy", [corpus_files / "dataset_toy.json"], corpus_files / "images", image_size=32,
                       data_dir=tmp_path, log=_quiet)
  corpora.check_corpus_built("toy_karpathy", tmp_path)
  # A prefix of a built corpus's name is not that corpus.
  with pytest.raises(corpora.CorpusError, match=r"no corpus 'toy' .* built there: toy_karpathy\)"):
    corpora.check_corpus_built("toy", tmp_path)
