"""Datasets on disk: tensorflow-datasets builders in the array_record format, built without TensorFlow.

Two builders, read back with `builder.as_data_source()` (random access, numpy records):

- `ShapesWorld` (`shapes_world/<config>`): the procedural world of `mat_jax.data.shapes`, with splits
  train/val/test (10k/1k/1k by default), each record holding `image` (uint8 PNG-coded), `captions` (the
  scene's N distinct captions), `scene` (the structured scene, so augmentations can redraw or re-caption
  it) and `image_id`.
- `CaptionCorpus` (`caption_corpus/<name>_<size>px`): a local image-caption corpus from annotation files
  in the ALBEF/SGA JSON format or Karpathy's `dataset_*.json` format (Flickr30k, COCO, RSICD) plus an
  image folder. Captions are cleaned as the references' `pre_caption` does, images converted to RGB,
  resized (shorter side, bicubic) and centre-cropped as CLIP's processor does (`resize_and_crop`; 16-bit
  grayscale is rescaled where the processor clips it) and stored as JPEG; records hold `image`,
  `captions`, `image_id` and `filename`.

Building is Python-only (tfds' generator builder; images are encoded with PIL, so no TensorFlow op runs).
Datasets live under a data directory: the `data_dir` argument, else $MAT_JAX_DATA_DIR, else
~/.cache/mat_jax/datasets. A dataset that is already built is reused.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mat_jax import paths
from mat_jax import processes
from mat_jax.data import shapes
from mat_jax.errors import InputError, MatJaxError, shown_json
from mat_jax.workdir import WorkdirLock

SPLITS = ("train", "val", "test")
# The `split` values of Karpathy's dataset_*.json files; restval (COCO's extra images) joins another split.
KARPATHY_SPLITS = ("train", "val", "test", "restval")


class CorpusError(MatJaxError, ValueError):
  """Bad corpus input (annotation file, entry or image); the message names the file or entry."""


class BuildError(MatJaxError, RuntimeError):
  """A dataset build that could not finish for a reason outside its input; nothing of it is kept."""


def _download_config(overwrite: bool = False) -> tfds.download.DownloadConfig:
  # try_download_gcs=False: tfds would otherwise ask a Google bucket for a prebuilt copy (network).
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if not overwrite
          else tfds.download.GenerateMode.FORCE_REDOWNLOAD)
  return tfds.download.DownloadConfig(try_download_gcs=False, download_mode=mode)


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """The `DatasetInfo` of a builder whose data exists only here. tfds looks up a not-yet-built dataset's
  info in its Google bucket, after making a temporary directory for it that it never removes: one empty
  /tmp/tmp*tfds per build. These builders are never in the bucket, so the lookup is skipped."""

  def initialize_from_bucket(self) -> None:
    return None


@tfds.core.utils.classproperty
@classmethod
def no_code_path(cls) -> None:
  """tfds looks for a checksums file beside a builder's code through the optional `importlib_resources`
  package (absent here); these builders download nothing, so there is nothing to look for."""
  return None


def is_built(builder: tfds.core.DatasetBuilder) -> bool:
  return (Path(os.fspath(builder.data_path)) / "dataset_info.json").exists()


def build_once(builder: tfds.core.DatasetBuilder, overwrite: bool, log,
               data_dir: str | os.PathLike | None = None) -> tuple[tfds.core.DatasetBuilder, bool]:
  """Build unless already built (or `overwrite`), one process at a time; returns the builder and whether
  it was reused. `data_dir`: the argument the builder's root was resolved from (`paths.default_data_dir`),
  named if the root cannot be written."""
  path = Path(os.fspath(builder.data_path))
  if is_built(builder) and not overwrite:
    log(f"reusing the dataset already built at {path}")
    return builder, True
  paths.writable_data_dir(data_dir)
  path.parent.mkdir(parents=True, exist_ok=True)
  # One builder at a time: every process of a multi-host run, and commands started together, find the
  # dataset missing at once, and tfds replaces a finished dataset with its own copy (under readers' feet).
  # The others wait, then reuse what the first built.
  with WorkdirLock(path.parent, wait=True, flag="the dataset directory", on_wait=log):
    if is_built(builder) and not overwrite:
      log(f"reusing the dataset another process built at {path}")
      # This builder was made before that dataset existed: its info (the splits) is read now.
      builder.info.read_from_directory(builder.data_dir)
      return builder, True
    return _build(builder, path, overwrite), False


def _build(builder: tfds.core.DatasetBuilder, path: Path, overwrite: bool) -> tfds.core.DatasetBuilder:
  # tfds builds into `incomplete.<random>_<version>` beside the version's directory and renames it when done;
  # a build killed outright (SIGKILL, a lost host) leaves it. Under the lock no other build is using one.
  for stale in path.parent.glob(f"{tfds.core.constants.INCOMPLETE_PREFIX}*_{path.name}"):
    shutil.rmtree(stale, ignore_errors=True)
  if overwrite and path.exists():
    shutil.rmtree(path)
  # Nothing is downloaded, but tfds insists on a download directory: keep it out of the data dir.
  with tempfile.TemporaryDirectory(prefix="mat_jax_tfds_") as downloads:
    try:
      builder.download_and_prepare(download_dir=downloads, download_config=_download_config(overwrite))
    except MatJaxError:
      raise
    except Exception as err:  # tfds wraps errors of the generator; unwrap ours so the message stays clear
      cause = err
      while cause is not None and not isinstance(cause, MatJaxError):
        cause = cause.__cause__ or cause.__context__
      if cause is not None:
        raise cause from err
      raise
  return builder


# --------------------------------------------------------------------------------------------------
# The shapes world.
# --------------------------------------------------------------------------------------------------

DEFAULT_SHAPES_IMAGE_SIZE = shapes.BUILD_IMAGE_SIZE
DEFAULT_SHAPES_TRAIN = shapes.BUILD_TRAIN


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
  """Split sizes, resolution, captions per image, the world seed and the captions' lexicon
  (`shapes.form_picker`: None, every surface form equally likely); the name encodes all of them."""
  image_size: int = DEFAULT_SHAPES_IMAGE_SIZE
  train: int = DEFAULT_SHAPES_TRAIN
  val: int = 1_000
  test: int = 1_000
  captions_per_image: int = 5
  seed: int = 0
  rare_form_rate: float | None = None


def shapes_config(image_size: int = DEFAULT_SHAPES_IMAGE_SIZE, train: int = DEFAULT_SHAPES_TRAIN, val: int = 1_000,
                  test: int = 1_000, captions_per_image: int = 5, seed: int = 0,
                  rare_form_rate: float | None = None) -> ShapesWorldConfig:
  for what, n in (("train", train), ("val", val), ("test", test)):
    if n < 0:
      raise InputError(f"the {what} split size must be >= 0, got {n}")
  if train + val + test == 0:
    raise InputError("all splits are empty; ask for at least one image (e.g. train=10000)")
  if seed < 0:
    raise InputError(f"the world seed must be >= 0, got {seed}")
  # Before a build starts (and leaves a directory behind):
  shapes.check_rare_form_rate(rare_form_rate)
  shapes.check_image_size(image_size)
  shapes.check_captions_per_image(captions_per_image, rare_form_rate)
  name = f"{image_size}px_{train}-{val}-{test}_k{captions_per_image}_seed{seed}"
  if rare_form_rate is not None:
    name += f"_rare{float(rare_form_rate)!r}"  # every digit: two worlds never share a directory
  return ShapesWorldConfig(name=name, description=f"shapes world {name}", image_size=image_size,
                           train=train, val=val, test=test, captions_per_image=captions_per_image,
                           seed=seed, rare_form_rate=rare_form_rate)


def scene_features() -> tfds.features.FeaturesDict:
  def per_object(dtype):
    return tfds.features.Tensor(shape=(None,), dtype=dtype)
  return tfds.features.FeaturesDict({
      **{k: per_object(np.int32) for k in ("shape", "colour", "size", "row", "col")},
      **{k: per_object(np.float32) for k in ("x", "y", "extent")},
      "shade": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
      "background": tfds.features.Tensor(shape=(3,), dtype=np.float32),
  })


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
  """The shapes world: rendered scenes, their captions and the scenes themselves."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Larger small objects, position jitter capped at 3% of the side."}
  BUILDER_CONFIGS = [shapes_config()]
  code_path = no_code_path

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return LocalDatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "scene": scene_features(),
            "image_id": tfds.features.Scalar(dtype=np.int32),
        }),
        # Records stay in generation order, so record i is scene i of the split.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    sizes = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config
    records = shapes_records(cfg.seed, split, count, cfg.captions_per_image, cfg.rare_form_rate, cfg.image_size)
    for index, (png, caps, scene) in enumerate(records):
      yield index, {"image": png, "captions": caps, "scene": scene, "image_id": index}


# Scenes one builder process renders and describes per task (about 1 ms each on one core), and the smallest
# split built by several: below it, starting the processes (a second or two: a fresh interpreter importing
# numpy and the shapes world's modules) costs more than it saves.
SCENES_PER_TASK = 500
PARALLEL_BUILD_MIN_SCENES = 4_000


def shapes_build_processes(count: int) -> int:
  """The processes `shapes_records` makes a split of `count` scenes with by default: one per usable core (at
  most one per task) from PARALLEL_BUILD_MIN_SCENES scenes on, else one (the building process itself)."""
  if count < PARALLEL_BUILD_MIN_SCENES:
    return 1
  return min(processes.usable_cores(), -(-count // SCENES_PER_TASK))


def shapes_records(seed: int, split: str, count: int, captions_per_image: int, rare_form_rate: float | None,
                   image_size: int, *, num_processes: int | None = None) -> Iterator[tuple[bytes, list[str], dict]]:
  """A world's split, record by record in index order (`shapes.encoded_records`), made by `num_processes`
  builder processes (None: `shapes_build_processes`; 1: this process makes them). The records are the same
  whoever makes them: each is a function of its index."""
  make = functools.partial(shapes.encoded_records, seed, split, captions_per_image=captions_per_image,
                           rare_form_rate=rare_form_rate, image_size=image_size)
  starts = range(0, count, SCENES_PER_TASK)
  stops = [min(start + SCENES_PER_TASK, count) for start in starts]
  num_processes = min(shapes_build_processes(count) if num_processes is None else num_processes, len(starts))
  # A daemonic process (a worker of a multiprocessing pool) may not start processes of its own.
  if num_processes <= 1 or multiprocessing.current_process().daemon:
    for start, stop in zip(starts, stops, strict=True):
      yield from make(start, stop)
    return
  pool = concurrent.futures.ProcessPoolExecutor(num_processes, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=processes.helper_initializer, initargs=(os.getpid(),))
  try:
    with processes.main_module_hidden():
      tasks = pool.map(make, starts, stops)  # submits every task: the processes all start here
    for chunk in tasks:
      yield from chunk
  except concurrent.futures.BrokenExecutor as err:  # a process pool whose process died
    raise BuildError(f"a process building the {split} split of the shapes world ended abruptly (killed, or out "
                     "of memory); nothing of the build is kept: run the command again to build it") from err
  finally:
    pool.shutdown(wait=True, cancel_futures=True)  # a build that stops early waits for no further task


def build_shapes(data_dir: str | os.PathLike | None = None, *, overwrite: bool = False, log=print,
                 **config: Any) -> tfds.core.DatasetBuilder:
  """Build (or reuse) the shapes world; `config` takes `shapes_config`'s arguments."""
  cfg = shapes_config(**config)
  # By name when it is the registered default (tfds warns about unregistered configs otherwise).
  known = {c.name for c in ShapesWorld.BUILDER_CONFIGS}
  builder = ShapesWorld(config=cfg.name if cfg.name in known else cfg,
                        data_dir=str(paths.default_data_dir(data_dir)), file_format="array_record")
  return build_once(builder, overwrite, log, data_dir)[0]


def dataset_builder(name: str, image_size: int, data_dir: str | os.PathLike | None = None, *, log=print,
                    **shapes_sizes: Any) -> tfds.core.DatasetBuilder:
  """A caption dataset by name: "shapes" (the shapes world, built on first use at `image_size`;
  `shapes_sizes` takes `shapes_config`'s split sizes) or a corpus built with `python -m mat_jax.data`."""
  if name == "shapes":
    return build_shapes(data_dir, image_size=image_size, log=log, **shapes_sizes)
  return corpus_builder(name, image_size, data_dir)


# --------------------------------------------------------------------------------------------------
# Local caption corpora: annotation formats and caption preprocessing.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CaptionCleaning:
  """The references' `pre_caption` (ALBEF, SGA, Co-Attack): lower-case; delete `strip`; `to_space` become
  spaces; collapse whitespace; keep at most `max_words` words (0 = no limit)."""
  lowercase: bool = True
  strip: str = ",.'!?\"()*#:;~"
  to_space: str = "-/"
  max_words: int = 30

  def __post_init__(self):
    if self.max_words < 0:
      raise InputError(f"max_words must be >= 0 (0 keeps every word), got {self.max_words}")

  def __call__(self, caption: str) -> str:
    text = caption.lower() if self.lowercase else caption
    if self.strip:
      text = text.translate({ord(c): None for c in self.strip})
    if self.to_space:
      text = text.translate({ord(c): " " for c in self.to_space})
    words = text.split()
    return " ".join(words[:self.max_words] if self.max_words else words)


NO_CLEANING = CaptionCleaning(lowercase=False, strip="", to_space="", max_words=0)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One image of an annotation file: its path under the image folder and its raw captions."""
  image: str
  captions: tuple[str, ...]
  where: str  # "entry 12 of /path/dataset_flickr30k.json", for error messages


def _load_json(path: Path) -> Any:
  if not path.is_file():
    raise CorpusError(f"annotation file {path} does not exist")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as err:
    raise CorpusError(f"annotation file {path} is not valid JSON: {err.msg} at line {err.lineno}, "
                      f"column {err.colno}") from err
  except UnicodeDecodeError as err:
    raise CorpusError(f"annotation file {path} is not UTF-8 text: {err}") from err


def detect_format(data: Any, path: str | os.PathLike = "the annotations") -> str:
  if isinstance(data, dict) and "images" in data:
    return "karpathy"
  if isinstance(data, list):
    return "albef"
  raise CorpusError(f"unknown annotation format in {path}: expected Karpathy's {{\"images\": [...]}} or the "
                    "ALBEF/SGA list of {\"image\", \"caption\"} entries")


def read_karpathy(path: str | os.PathLike, restval: str = "train", data: Any = None) -> dict[str, list[Entry]]:
  """Karpathy `dataset_*.json`: entries by their `split`; `restval` images join the `restval` split."""
  if restval not in KARPATHY_SPLITS:  # a typo would quietly take COCO's restval images out of training
    raise CorpusError(f"restval={restval!r}: the split restval images join is one of {', '.join(KARPATHY_SPLITS)}")
  path = Path(path)
  data = _load_json(path) if data is None else data
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise CorpusError(f"{path}: a Karpathy annotation file is an object with an \"images\" list")
  splits: dict[str, list[Entry]] = {}
  for i, item in enumerate(data["images"]):
    where = f"entry {i} of {path}"
    if not isinstance(item, dict) or "filename" not in item:
      raise CorpusError(f"{where} has no \"filename\"")
    for key in ("filename", "filepath"):
      if key in item and not isinstance(item[key], str):
        raise CorpusError(f"{where}: \"{key}\" must be a string (a path), got {shown_json(item[key])}")
    where = f"entry {i} ({item['filename']}) of {path}"
    sentences = item.get("sentences") or []
    if not isinstance(sentences, list):
      raise CorpusError(f"{where}: \"sentences\" must be a list of {{\"raw\": caption}} objects, "
                        f"not {type(sentences).__name__}")
    caps = tuple(s["raw"] if isinstance(s, dict) and "raw" in s else s for s in sentences)
    if not all(isinstance(c, str) for c in caps):
      raise CorpusError(f"{where}: every sentence needs a \"raw\" string")
    image = os.path.join(item["filepath"], item["filename"]) if item.get("filepath") else item["filename"]
    # A misspelt split would otherwise become a split of its own, and a missing one be guessed.
    if "split" not in item:
      raise CorpusError(f"{where} has no \"split\"; every entry of a Karpathy file names its split, one of "
                        f"{', '.join(KARPATHY_SPLITS)}")
    split = item["split"]
    if split not in KARPATHY_SPLITS:
      raise CorpusError(f"{where}: \"split\" is {shown_json(split)}, not one of Karpathy's splits "
                        f"{', '.join(KARPATHY_SPLITS)} (restval joins {restval!r})")
    split = restval if split == "restval" else split
    splits.setdefault(split, []).append(Entry(image, caps, where))
  return splits


def read_albef(path: str | os.PathLike, data: Any = None) -> list[Entry]:
  """ALBEF/SGA list of {"image", "caption": str | [str]}; entries of one image (train files) merge."""
  path = Path(path)
  data = _load_json(path) if data is None else data
  if not isinstance(data, list):
    raise CorpusError(f"{path}: an ALBEF/SGA annotation file is a list of {{\"image\", \"caption\"}}")
  by_image: dict[str, Entry] = {}
  for i, item in enumerate(data):
    if not isinstance(item, dict) or "image" not in item:
      raise CorpusError(f"entry {i} of {path} has no \"image\"")
    if not isinstance(item["image"], str):
      raise CorpusError(f"entry {i} of {path}: \"image\" must be a string (a path), got {shown_json(item['image'])}")
    caption = item.get("caption", [])
    # Only a string or a list of them: tuple() of a dict would read its keys as captions.
    if isinstance(caption, str):
      caps = (caption,)
    elif isinstance(caption, (list, tuple)) and all(isinstance(c, str) for c in caption):
      caps = tuple(caption)
    else:
      raise CorpusError(f"entry {i} ({item['image']}) of {path}: \"caption\" must be a string or strings, got "
                        f"{shown_json(caption)}")
    old = by_image.get(item["image"])
    by_image[item["image"]] = Entry(item["image"], (old.captions if old else ()) + caps,
                                    old.where if old else f"entry {i} ({item['image']}) of {path}")
  return list(by_image.values())


def split_from_filename(path: str | os.PathLike) -> str:
  name = Path(path).stem.lower()
  found = [s for s in SPLITS if re.search(rf"(^|[_\-.]){s}($|[_\-.])", name)]
  if len(found) != 1:
    raise CorpusError(f"cannot tell the split of {path} from its name; pass it as SPLIT=PATH "
                      "(e.g. test=flickr30k_test.json)")
  return found[0]


def _annotation_files(annotations: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]
                      ) -> list[tuple[str | None, Path]]:
  """(split or None, path) of each annotation argument: {split: path}, "split=path" or a bare path."""
  if isinstance(annotations, Mapping):
    return [(str(k), Path(v)) for k, v in annotations.items()]
  items = []
  for a in annotations:
    text = str(a)
    split, sep, rest = text.partition("=")
    if sep and split not in SPLITS and not Path(text).exists():
      raise CorpusError(f"annotation argument {text!r}: {split!r} is not a split; write split=path with split "
                        f"one of {', '.join(SPLITS)}, or a bare path")
    items.append((split, Path(rest)) if sep and split in SPLITS else (None, Path(text)))
  return items


def read_annotations(annotations: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                     fmt: str = "auto", restval: str = "train") -> dict[str, list[Entry]]:
  """Entries per split from annotation files.

  `annotations`: a Karpathy file (its entries carry their split); or ALBEF/SGA files given as
  {split: path}, as "split=path" strings, or as paths whose names contain the split (flickr30k_test.json).
  The ALBEF entries of one image merge across the files of a split as within a file: one entry, its
  captions in file order.
  """
  items = _annotation_files(annotations)
  if not items:
    raise CorpusError("no annotation files given")
  splits: dict[str, list[Entry]] = {}
  # Per split: an entry's image -> (its index in the split, whether it came from an ALBEF file). Two records
  # of one image would make its captions in-batch negatives of each other and split its retrieval hits.
  seen: dict[str, dict[str, tuple[int, bool]]] = {}
  if fmt not in ("auto", "karpathy", "albef"):
    raise CorpusError(f"unknown annotation format {fmt!r}; use 'karpathy', 'albef' or 'auto'")
  given: set[tuple[str | None, Path]] = set()
  for split, path in items:
    if (split, path.resolve()) in given:
      raise CorpusError(f"annotation file {path} is given twice{f' for split {split!r}' if split else ''}: its "
                        "entries would be read twice; give each file once")
    given.add((split, path.resolve()))
    data = _load_json(path)  # parsed once: COCO's Karpathy file is 140 MB
    kind = fmt if fmt != "auto" else detect_format(data, path)
    if kind == "karpathy":
      read = read_karpathy(path, restval, data)
      if not any(entries for name, entries in read.items() if split is None or name == split):
        raise CorpusError(f"{path} holds no entries{f' of split {split!r}' if split else ''}; check the file, "
                          "or leave it out")
      chosen = [(name, entry) for name, entries in read.items() if split is None or name == split
                for entry in entries]
    else:
      name = split or split_from_filename(path)
      albef = read_albef(path, data)
      if not albef:
        raise CorpusError(f"{path} holds no entries (split {name!r}); check the file, or leave it out")
      chosen = [(name, entry) for entry in albef]
    for name, entry in chosen:
      entries, where_is = splits.setdefault(name, []), seen.setdefault(name, {})
      if entry.image not in where_is:
        where_is[entry.image] = (len(entries), kind == "albef")
        entries.append(entry)
        continue
      index, from_albef = where_is[entry.image]
      first = entries[index]
      if not (from_albef and kind == "albef"):
        # A Karpathy file has one entry per image; a repeat is a broken or doubly given file.
        raise CorpusError(f"{entry.where} repeats the image of {first.where} in split {name!r}; give each image "
                          "one entry with all its sentences")
      # ALBEF's train files list an image once per caption: its entries merge, across files as within one.
      entries[index] = dataclasses.replace(first, captions=first.captions + entry.captions)
  return splits


# --------------------------------------------------------------------------------------------------
# Images.
# --------------------------------------------------------------------------------------------------

# 16-bit (I;16*) and 32-bit integer (I) grayscale: PIL's convert("RGB") clips their values at 255.
WIDE_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image):
  """8-bit RGB as CLIP's image processor makes it (transformers >= 5.21), transparency (RGBA, LA, a
  palette's or a tRNS colour) composited onto white; unlike the processor, 16-bit grayscale (and 32-bit
  integer, read as 16-bit values) is rescaled to 8 bits (value / 257, rounded) where the processor clips
  it at 255. Floating-point pixels (mode F) are refused: their range (0-1 or 0-255) is unknown, and PIL's
  conversion clips them (0-1 comes out black)."""
  from PIL import Image

  if image.mode == "F":
    raise InputError("floating-point pixels (PIL mode F, e.g. a 32-bit float TIFF), whose range (0-1 or 0-255) "
                     "is unknown: convert the image to 8-bit RGB (a PNG or JPEG)")
  if image.mode in WIDE_GRAY_MODES:
    wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    gray = ((wide + 128) // 257).astype(np.uint8)  # round(value / 257): 257 * x -> x
    transparent = image.info.get("transparency")  # a 16-bit PNG's tRNS: one grey value, in 16-bit units
    if isinstance(transparent, int):
      image = Image.fromarray(np.stack([gray, np.where(wide == transparent, 0, 255).astype(np.uint8)], -1))
    else:
      image = Image.fromarray(gray)
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
  return image.convert("RGB")


def resize_and_crop(image, size: int):
  """CLIP's preprocessing: RGB (`to_rgb`), shorter side to `size` (bicubic), then the centre `size` x
  `size` crop."""
  from PIL import Image

  image = to_rgb(image)
  w, h = image.size
  # The longer side truncated, computed in this order, as torchvision's Resize and transformers'
  # CLIPImageProcessor do: rounding instead shifts the crop's sampling grid on most photo sizes.
  longer = int(size * max(w, h) / min(w, h))
  nw, nh = (longer, size) if w >= h else (size, longer)
  image = image.resize((nw, nh), Image.Resampling.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  return image.crop((left, top, left + size, top + size))


def load_image(path: Path, size: int, where: str, quality: int = 95) -> bytes:
  """The resized, centre-cropped image as JPEG bytes; CorpusError names the file when it is bad."""
  from PIL import Image, UnidentifiedImageError

  if not path.is_file():
    raise CorpusError(f"missing image file {path} ({where})")
  try:
    with Image.open(path) as image:
      image.load()  # decode now: a truncated or corrupt file fails here, not later in training
      out = resize_and_crop(image, size)
  except Image.DecompressionBombError as err:
    # Raised for a picture over PIL's pixel limit, and as often for a corrupt size field in its header.
    raise CorpusError(f"image file {path} ({where}) claims more pixels than PIL decodes safely, a corrupt header "
                      f"or a huge picture: {err}") from err
  except InputError as err:  # a readable image `to_rgb` refuses
    raise CorpusError(f"image file {path} ({where}) has {err}") from err
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
    raise CorpusError(f"corrupt or unreadable image file {path} ({where}): {err}") from err
  buffer = io.BytesIO()
  out.save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# The corpus builder.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class CaptionCorpusConfig(tfds.core.BuilderConfig):
  """What a corpus build reads and how: only the builder that writes uses the paths."""
  # repr=False: tfds logs the config, and COCO has 120k entries.
  entries: Mapping[str, Sequence[Entry]] = dataclasses.field(default_factory=dict, repr=False)
  images: str = ""
  image_size: int = 224
  cleaning: CaptionCleaning = CaptionCleaning()
  skip_bad: bool = False
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)


class CaptionCorpus(tfds.core.GeneratorBasedBuilder):
  """A local image–caption corpus (Flickr30k, COCO, RSICD, ...) from annotations and an image folder."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Resized as CLIP's processor: the longer side truncated, not rounded.",
                   "1.2.0": "Transparency composited onto white as CLIP's processor does; 16-bit grayscale rescaled "
                            "to 8 bits, not clipped; an image in several ALBEF files of a split is one record."}
  code_path = no_code_path

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.skipped: dict[str, list[str]] = {}
    self.dropped: dict[str, list[str]] = {}  # captions that clean to nothing (skip_bad), per split

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size = cfg.image_size
    return LocalDatasetInfo(
        builder=self,
        description=f"caption corpus {cfg.name}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="jpeg"),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "image_id": tfds.features.Scalar(dtype=np.int32),
            "filename": tfds.features.Text(),
        }),
        # Annotation order is kept: record i of the test split is the references' image i.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(build_options=dict(cfg.options), skipped={}, dropped_captions={}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.builder_config.entries}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config
    root = Path(cfg.images)
    skipped = self.skipped.setdefault(split, [])
    written = 0

    def load(entry: Entry) -> bytes | CorpusError:
      try:
        return load_image(root / entry.image, cfg.image_size, entry.where)
      except CorpusError as err:
        return err

    # Decoding and resizing dominate and PIL releases the GIL there: threads, in annotation order.
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      for entry, image in zip(cfg.entries[split], pool.map(load, cfg.entries[split]), strict=True):
        if isinstance(image, CorpusError):
          if not cfg.skip_bad:
            raise CorpusError(f"{image}; replace the file, or pass skip_bad=True (--skip-bad) to skip its "
                              "entry") from image
          skipped.append(str(image))
          continue
        yield written, {"image": image, "captions": [cfg.cleaning(c) for c in entry.captions],
                        "image_id": written, "filename": entry.image}
        written += 1
    self.info.metadata["skipped"][split] = len(skipped)
    self.info.metadata["dropped_captions"][split] = len(self.dropped.get(split, []))
    if not written:
      raise CorpusError(f"split {split!r} is empty: all {len(skipped)} of its images are missing or "
                        f"corrupt (first: {skipped[0] if skipped else '-'})")


def _validate(entries: dict[str, list[Entry]], cleaning: CaptionCleaning, skip_bad: bool,
              skipped: dict[str, list[str]], dropped: dict[str, list[str]]) -> dict[str, list[Entry]]:
  """Reject (or, with skip_bad, drop and note in `dropped`) captions that clean to nothing; reject (or skip)
  entries left without captions; reject empty splits."""
  if not entries:
    raise CorpusError("the annotation files hold no entries")
  kept: dict[str, list[Entry]] = {}
  for split, items in entries.items():
    if not items:
      raise CorpusError(f"split {split!r} has no entries")
    good = []
    for entry in items:
      captions = []
      for caption in entry.captions:
        if cleaning(caption):
          captions.append(caption)
          continue
        # Dropping it silently would change the caption counts and the image-to-text maps.
        message = f"{entry.where}: caption {caption!r} cleans to nothing"
        if not skip_bad:
          raise CorpusError(message + "; fix the annotation or pass skip_bad=True (--skip-bad) to drop it")
        dropped.setdefault(split, []).append(message)
      if not captions:
        message = f"{entry.where} has no captions"
        if not skip_bad:
          raise CorpusError(message + "; fix the entry or pass skip_bad=True (--skip-bad) to skip it")
        skipped.setdefault(split, []).append(message)
        continue
      good.append(dataclasses.replace(entry, captions=tuple(captions)))
    if not good:
      raise CorpusError(f"split {split!r} is empty after skipping {len(items)} entries without captions")
    kept[split] = good
  return kept


def corpus_config_name(name: str, image_size: int) -> str:
  if not re.fullmatch(r"[A-Za-z][\w\-.]*", name):
    raise InputError(f"dataset name {name!r} must start with a letter and use letters, digits, _ - .")
  return f"{name}_{image_size}px"


def build_corpus(name: str, annotations, images: str | os.PathLike, *, image_size: int = 224,
                 fmt: str = "auto", restval: str = "train", cleaning: CaptionCleaning = CaptionCleaning(),
                 skip_bad: bool = False, data_dir: str | os.PathLike | None = None, overwrite: bool = False,
                 log=print) -> tfds.core.DatasetBuilder:
  """Build (or reuse) `caption_corpus/<name>_<image_size>px` from annotation files and an image folder.

  Bad input raises `CorpusError` naming the file or entry; with `skip_bad` bad records (missing or
  corrupt images, entries without captions) are skipped and captions that clean to nothing dropped, and
  both are counted (`log` reports them, and the dataset's metadata keeps the counts: `skipped` and
  `dropped_captions`, per split).
  """
  images = Path(images).expanduser()
  config_name = corpus_config_name(name, image_size)
  root = paths.default_data_dir(data_dir)
  existing = corpus_builder(name, image_size, root, missing_ok=True)
  # Resolved paths, so that a relative path given from another directory matches; skip_bad is an option
  # because it changes which records and captions the corpus holds.
  files = sorted(f"{split}={path.resolve()}" if split else str(path.resolve())
                 for split, path in _annotation_files(annotations))
  options = {"annotations": files, "images": str(images.resolve()), "format": fmt, "restval": restval,
             "cleaning": dataclasses.asdict(cleaning), "skip_bad": skip_bad}
  if existing is not None and not overwrite:
    _check_built_with(existing, options)
    # An older version stores other records or pixels: build this one beside it (reading takes the newest).
    if existing.info.version >= CaptionCorpus.VERSION:
      log(f"reusing the dataset already built at {existing.data_path}")
      return existing
    log(f"{existing.data_path} was built by version {existing.info.version} of the corpus builder; building "
        f"version {CaptionCorpus.VERSION}")
  if not images.is_dir():
    raise CorpusError(f"image folder {images} does not exist")
  skipped: dict[str, list[str]] = {}
  dropped: dict[str, list[str]] = {}
  entries = _validate(read_annotations(annotations, fmt, restval), cleaning, skip_bad, skipped, dropped)
  config = CaptionCorpusConfig(name=config_name, description=f"{name} at {image_size}px", entries=entries,
                               images=str(images), image_size=image_size, cleaning=cleaning,
                               skip_bad=skip_bad, options=options)
  builder = CaptionCorpus(config=config, data_dir=str(root), file_format="array_record")
  builder.skipped, builder.dropped = skipped, dropped
  _, reused = build_once(builder, overwrite, log, data_dir)
  if reused:  # another process built it while this one read the annotations: with these options?
    built = corpus_builder(name, image_size, root)
    _check_built_with(built, options)
    return built
  for split, messages in builder.skipped.items():
    if messages:
      log(f"skipped {len(messages)} bad record(s) of split {split!r}; first: {messages[0]}")
  for split, messages in builder.dropped.items():
    if messages:
      log(f"dropped {len(messages)} caption(s) that clean to nothing from split {split!r}; first: {messages[0]}")
  return corpus_builder(name, image_size, root)


def _check_built_with(existing: tfds.core.DatasetBuilder, options: dict) -> None:
  """Refuse a built corpus of this name made with other build options (annotations, images, cleaning...)."""
  built_with = dict(existing.info.metadata.get("build_options", {}))
  wanted = json.loads(json.dumps(options))
  if built_with and built_with != wanted:
    changed = "; ".join(f"{key}: built with {built_with.get(key)!r}, now {wanted.get(key)!r}"
                        for key in sorted(built_with.keys() | wanted.keys())
                        if built_with.get(key) != wanted.get(key))
    raise CorpusError(f"{existing.data_path} was built with other options ({changed}); pass "
                      "overwrite=True (--overwrite) to rebuild it, or choose another name")


def check_corpus_built(name: str, data_dir: str | os.PathLike | None = None) -> None:
  """That a corpus `name` was built at some image size under the data directory: what can be checked
  before the model that fixes the size is loaded (or trained into the cache first, for minutes)."""
  corpus_config_name(name, 1)  # the name's own check
  root = paths.default_data_dir(data_dir)
  built = _built_corpus_names(root)
  if name not in built:
    raise CorpusError(f"no corpus {name!r} under {root} (the corpora built there: "
                      f"{', '.join(sorted(built)) or 'none'}); build it with\n  python -m "
                      f"mat_jax.data build karpathy --annotations F --images DIR --name {name} --data-dir {root}")


def _built_corpus_names(root: Path) -> set[str]:
  """The names of the corpora built under `root` at any size (their directories are NAME_SIZEpx)."""
  return {p.parent.parent.name.rsplit("_", 1)[0] for p in (root / "caption_corpus").glob("*_*px/*/dataset_info.json")}


def corpus_builder(name: str, image_size: int = 224, data_dir: str | os.PathLike | None = None,
                   missing_ok: bool = False) -> tfds.core.DatasetBuilder | None:
  """The built corpus, read from its files (no annotations or images needed)."""
  root = paths.default_data_dir(data_dir)
  config_dir = root / "caption_corpus" / corpus_config_name(name, image_size)
  # Only finished builds: tfds writes dataset_info.json last (an interrupted build has none). The newest
  # by version number (as text, 1.10.0 would sort before 1.2.0).
  versions = [p for p in config_dir.glob("*") if (p / "dataset_info.json").exists()
              and tfds.core.Version.is_valid(p.name)]
  if versions:
    return tfds.builder_from_directory(str(max(versions, key=lambda p: tfds.core.Version(p.name))))
  if missing_ok:
    return None
  raise CorpusError(f"no corpus {name!r} at {image_size}px under {root}; build it with\n  python -m "
                    f"mat_jax.data build karpathy --annotations F --images DIR --name {name} "
                    f"--image-size {image_size} --data-dir {root}")


def data_source(builder: tfds.core.DatasetBuilder, split: str):
  """Random-access records of one split (numpy arrays; text as bytes)."""
  available = list(builder.info.splits.keys())
  if split not in available:
    raise CorpusError(f"{builder.info.full_name} has no split {split!r}; it has {sorted(available)}")
  return builder.as_data_source(split=split)
