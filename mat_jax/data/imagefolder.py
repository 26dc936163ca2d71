"""Any folder of class-named image directories (the ImageFolder layout) as a TFDS array_record dataset.

    ROOT/CLASS_A/x.jpg  ROOT/CLASS_B/y.png ...                     one split, "test"
    ROOT/train/CLASS_A/x.jpg ... ROOT/test/CLASS_A/z.jpg ...       one split per train/val/test folder

Classes are the sorted directory names (label i = the i-th name, as torchvision's ImageFolder), the same
in every split; a name's underscores read as spaces when it fills a prompt ("golden_retriever" ->
"golden retriever"). Images are preprocessed as CLIP's are (transparency composited onto white, shorter
side resized bicubic to `image_size`, centre crop; 16-bit grayscale rescaled to 8 bits where CLIP's
processor clips it: `corpora.resize_and_crop`) and stored as JPEG. The build is Python-only, like
`mat_jax.data.corpora` (tfds' generator builder, PIL encoding, no TensorFlow op). The dataset's name
carries a fingerprint of the folder (every file's path, size and modification time), so an unchanged
folder is built once and reused, and a changed one is built afresh.

Bad input is a `CorpusError` naming the folder or file: a missing root, no class folders, split folders
beside other folders at the top, a class folder without images (an empty class has no accuracy and would
shift every later label), class sets that differ between splits, a corrupt image.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mat_jax import paths
from mat_jax.data import corpora
from mat_jax.data.classification import ClassificationSet, classes_in_turn
from mat_jax.data.corpora import CorpusError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLITS = corpora.SPLITS
SINGLE_SPLIT = "test"


def _visible_dirs(path: Path) -> list[Path]:
  return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(class_dir: Path) -> list[Path]:
  return sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(class_dir).parts))


def _looks_like_split(path: Path) -> bool:
  """Sub-folders and no image directly inside: ROOT/SPLIT/CLASS/IMAGE rather than ROOT/CLASS/IMAGE."""
  direct_images = any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
  return not direct_images and bool(_visible_dirs(path))


def scan(root: str | os.PathLike) -> dict[str, dict[str, list[Path]]]:
  """{split: {class name: image paths}} of an ImageFolder root; see the module docstring."""
  root = Path(root).expanduser()
  if not root.is_dir():
    raise CorpusError(f"image folder {root} does not exist (or is not a directory)")
  top = _visible_dirs(root)
  if top and all(d.name in SPLITS for d in top):
    split_dirs = {d.name: d for d in top}
  else:
    # A class may be called "train" (vehicles), but one holding class-like folders and no image of its
    # own beside other folders is a split: read as a class, its classes would share one label.
    splits_like = [d.name for d in top if d.name in SPLITS and _looks_like_split(d)]
    if splits_like:
      others = [d.name for d in top if d.name not in SPLITS]
      raise CorpusError(f"{root} mixes split folders ({', '.join(splits_like)}: class folders inside) with other "
                        f"folders ({', '.join(others)}); the layout is ROOT/SPLIT/CLASS/IMAGE with only "
                        f"{'/'.join(SPLITS)} at the top, or ROOT/CLASS/IMAGE: move the other folders out of {root}")
    split_dirs = {SINGLE_SPLIT: root}
  layout: dict[str, dict[str, list[Path]]] = {}
  for split, split_dir in split_dirs.items():
    class_dirs = _visible_dirs(split_dir)
    if not class_dirs:
      raise CorpusError(f"{split_dir} has no class folders: the ImageFolder layout is ROOT/CLASS/IMAGE "
                        "(or ROOT/SPLIT/CLASS/IMAGE with SPLIT in train/val/test)")
    classes = {}
    for d in class_dirs:
      files = _images_in(d)
      if not files:
        raise CorpusError(f"class folder {d} holds no images (files ending in {', '.join(IMAGE_EXTENSIONS)}); "
                          "add its images or remove the folder")
      classes[d.name] = files
    layout[split] = classes
  names = {split: sorted(classes) for split, classes in layout.items()}
  first = next(iter(names))
  for split, these in names.items():
    if these != names[first]:
      only_first, only_here = sorted(set(names[first]) - set(these)), sorted(set(these) - set(names[first]))
      raise CorpusError(f"the splits of {root} have different classes: only in {first!r}: {only_first}, only in "
                        f"{split!r}: {only_here}; every split needs the same class folders (labels must agree)")
  return layout


def fingerprint(layout: Mapping[str, Mapping[str, Sequence[Path]]]) -> str:
  """A short hash of every file's split, class, name, size and modification time."""
  digest = hashlib.sha256()
  for split, classes in sorted(layout.items()):
    for name, files in sorted(classes.items()):
      for path in files:
        stat = path.stat()
        digest.update(json.dumps([split, name, path.name, str(path.parent), stat.st_size,
                                  stat.st_mtime_ns]).encode())
  return digest.hexdigest()[:12]


def class_display_name(folder: str) -> str:
  """The class name a prompt reads: underscores as spaces, whitespace collapsed."""
  return " ".join(folder.replace("_", " ").split())


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """The scanned layout and the resolution; only the builder that writes uses the paths."""
  layout: Mapping[str, Mapping[str, Sequence[Path]]] = dataclasses.field(default_factory=dict, repr=False)
  classes: tuple[str, ...] = ()
  image_size: int = 224
  root: str = ""


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """Images of class-named folders, CLIP-preprocessed, with their labels and file names."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Resized as CLIP's processor: the longer side truncated, not rounded.",
                   "1.2.0": "Transparency composited onto white as CLIP's processor does; 16-bit grayscale rescaled "
                            "to 8 bits, not clipped."}
  code_path = corpora.no_code_path

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return corpora.LocalDatasetInfo(
        builder=self,
        description=f"image folder {cfg.root}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(cfg.image_size, cfg.image_size, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=list(cfg.classes)),
            "filename": tfds.features.Text(),
        }),
        disable_shuffling=True,  # record order: classes in label order, files sorted
        metadata=tfds.core.MetadataDict(root=cfg.root, folders=list(cfg.classes)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.builder_config.layout}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config
    items = [(label, path) for label, name in enumerate(cfg.classes) for path in cfg.layout[split][name]]
    def load(item):
      try:
        return corpora.load_image(item[1], cfg.image_size, f"class {cfg.classes[item[0]]!r}, split {split!r}")
      except CorpusError as err:
        raise CorpusError(f"{err}; replace the file or remove it from the folder") from err
    # Decoding dominates and PIL releases the GIL there: threads, in order.
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      for index, ((label, path), image) in enumerate(zip(items, pool.map(load, items), strict=True)):
        yield index, {"image": image, "label": label, "filename": str(path.relative_to(cfg.root))}


def _slug(name: str) -> str:
  slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
  return slug if slug[:1].isalpha() else f"d_{slug}"


def build_image_folder(root: str | os.PathLike, *, image_size: int = 224, data_dir: str | os.PathLike | None = None,
                       overwrite: bool = False, log=print) -> tfds.core.DatasetBuilder:
  """Build (or reuse) `image_folder/<folder name>_<size>px_<fingerprint>` under the data directory."""
  if image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")
  root = Path(root).expanduser().resolve()
  layout = scan(root)
  classes = tuple(sorted(next(iter(layout.values()))))
  name = f"{_slug(root.name)}_{image_size}px_{fingerprint(layout)}"
  config = ImageFolderConfig(name=name, description=f"{root} at {image_size}px", layout=layout, classes=classes,
                             image_size=image_size, root=str(root))
  builder = ImageFolder(config=config, data_dir=str(paths.default_data_dir(data_dir)), file_format="array_record")
  corpora.build_once(builder, overwrite, log, data_dir)  # unwraps our CorpusError from tfds's wrapping
  return builder


def load_classification_set(builder: tfds.core.DatasetBuilder, split: str = SINGLE_SPLIT,
                            limit: int | None = None) -> ClassificationSet:
  """The split's images (uint8) and labels in memory, with the class names prompts read.

  limit: at most this many images, the classes in turn (`classification.classes_in_turn`): the records
  are stored class after class, so their first `limit` would cover only the first few classes."""
  source = corpora.data_source(builder, split)
  if len(source) == 0:
    raise CorpusError(f"split {split!r} of {builder.data_path} holds no images")
  rows = range(len(source))
  if limit is not None and limit < len(source):
    # The labels alone, read without decoding a single image.
    labels_only = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    rows = classes_in_turn(np.asarray([int(labels_only[i]["label"]) for i in rows]), limit)
  records = [source[int(i)] for i in rows]
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.asarray([int(r["label"]) for r in records], np.int32)
  folders = builder.info.features["label"].names
  return ClassificationSet(images, labels, tuple(class_display_name(f) for f in folders), None,
                           f"imagefolder:{builder.info.metadata.get('root', builder.builder_config.name)}",
                           tuple(folders))
