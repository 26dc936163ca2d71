"""Image classification sets for zero-shot evaluation: the shapes world's two class sets.

A `ClassificationSet` is images, integer labels, class names and, per class, either the prompts whose
averaged text embedding stands for the class or nothing (then `mat_jax.zeroshot` fills prompt templates
with the class names, as CLIP does for ImageNet). Two sets come from the shapes world, deterministic
from a seed and rendered at any resolution (no files):

- `colour-shape`: single-object scenes, 49 classes "red circle", ..., "white ring", balanced (image i
  shows class i mod 49 in a random cell and size). Prompts: the world's caption frames around the
  noun phrase ("a red circle", "there is a red circle", "a picture of a red circle", ...).
- `count`: the world's ordinary scenes (`shapes.scene_for`, 1-3 objects in proportions 20/40/40%),
  labelled by how many objects they hold. The world's vocabulary has no number words, so a count class
  is described the way its scenes are: by the captions of `prompts_per_class` random scenes with that
  many objects, whose averaged embedding is the class prototype (a prompt ensemble built from the
  describer rather than from templates).

Folders of class-named image directories are read by `mat_jax.data.imagefolder`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mat_jax.data import shapes
from mat_jax.errors import InputError

SHAPES_TASKS = ("colour-shape", "count")
# The world's caption openings (`shapes._compose`'s intros) around a noun phrase with its article.
SHAPES_TEMPLATES = ("{}", "there is {}", "a picture of {}", "an image of {}", "a photo of {}",
                    "an image showing {}")
COUNT_NAMES = ("one object", "two objects", "three objects")
# Stream ids mixed into the seed, apart from the split ids 0-2 that `scene_for` uses for its scenes.
_COLOUR_SHAPE_STREAM = 10
_COUNT_PROMPT_STREAM = 11


@dataclasses.dataclass(frozen=True)
class ClassificationSet:
  """Images with integer labels and the classes' names (and prompts, when the set defines them)."""
  images: np.ndarray                                 # (N, H, W, 3) uint8, or float32 in [0, 1]
  labels: np.ndarray                                 # (N,) int, in [0, len(class_names))
  class_names: tuple[str, ...]
  prompts: tuple[tuple[str, ...], ...] | None = None  # per class; None: fill templates with the names
  name: str = "classification"
  folders: tuple[str, ...] | None = None              # an ImageFolder's class folders, whose names these are

  def __post_init__(self):
    n = len(self.images)
    if self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise InputError(f"{self.name}: images must be (N, H, W, 3), got shape {self.images.shape}")
    if np.shape(self.labels) != (n,):
      raise InputError(f"{self.name}: {n} images but labels of shape {np.shape(self.labels)}")
    if n and (int(np.min(self.labels)) < 0 or int(np.max(self.labels)) >= len(self.class_names)):
      raise InputError(f"{self.name}: labels must lie in [0, {len(self.class_names)}), got "
                       f"[{int(np.min(self.labels))}, {int(np.max(self.labels))}]")
    if self.prompts is not None and len(self.prompts) != len(self.class_names):
      raise InputError(f"{self.name}: {len(self.class_names)} classes but prompts for {len(self.prompts)}")

  def __len__(self) -> int:
    return len(self.images)

  def take(self, limit: int | None) -> "ClassificationSet":
    """`limit` images, the classes in turn (`classes_in_turn`; all when None)."""
    if limit is None or limit >= len(self):
      return self
    keep = classes_in_turn(self.labels, limit)
    return dataclasses.replace(self, images=self.images[keep], labels=self.labels[keep])


def classes_in_turn(labels: np.ndarray, limit: int) -> np.ndarray:
  """Indices (in set order) of `limit` images taken class by class in turn: every class's k-th image,
  in set order, before any class's (k+1)-th. A set stored class after class (an ImageFolder) is then
  limited to an even sample of its classes, not to its first few; a set whose labels already cycle
  through the classes in label order keeps its first `limit` images."""
  labels = np.asarray(labels)
  by_class = np.argsort(labels, kind="stable")
  sorted_labels = labels[by_class]
  turn = np.empty(len(labels), np.int64)
  turn[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels)  # k within the class
  return np.sort(np.lexsort((labels, turn))[:limit])


def _with_article(phrase: str) -> str:
  return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def colour_shape_names() -> tuple[str, ...]:
  """The 49 classes, colour-major: label = colour index * 7 + shape index."""
  return tuple(f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES)


def shapes_colour_shape(num_images: int = 980, image_size: int = shapes.DEFAULT_IMAGE_SIZE, seed: int = 0,
                        split: str = "test") -> ClassificationSet:
  """Single-object scenes, balanced over the 49 colour x shape classes; see the module docstring."""
  check_request(num_images, split)
  names = colour_shape_names()
  images = np.empty((num_images, image_size, image_size, 3), np.uint8)
  labels = np.arange(num_images) % len(names)
  for i, label in enumerate(labels):
    colour, shape = divmod(int(label), len(shapes.SHAPES))
    rng = np.random.default_rng((seed, _COLOUR_SHAPE_STREAM, shapes.SPLIT_IDS[split], i))
    images[i] = shapes.render(shapes.single_object_scene(shape, colour, rng), image_size)
  prompts = tuple(tuple(t.format(_with_article(n)) for t in SHAPES_TEMPLATES) for n in names)
  return ClassificationSet(images, labels.astype(np.int32), names, prompts, "shapes-colour-shape")


def shapes_count(num_images: int = 1000, image_size: int = shapes.DEFAULT_IMAGE_SIZE, seed: int = 0,
                 split: str = "test", prompts_per_class: int = 64) -> ClassificationSet:
  """The world's scenes of `split` labelled by object count (label = count - 1); see the module docstring."""
  check_request(num_images, split)
  if prompts_per_class < 1:
    raise InputError(f"prompts_per_class must be >= 1, got {prompts_per_class}")
  images = np.empty((num_images, image_size, image_size, 3), np.uint8)
  labels = np.empty((num_images,), np.int32)
  for i in range(num_images):
    scene = shapes.scene_for(seed, split, i)
    images[i] = shapes.render(scene, image_size)
    labels[i] = len(scene.objects) - 1
  prompts = []
  for count in range(1, shapes.MAX_OBJECTS + 1):
    rng = np.random.default_rng((seed, _COUNT_PROMPT_STREAM, count))
    prompts.append(tuple(shapes.describe(shapes.sample_scene(rng, count), rng) for _ in range(prompts_per_class)))
  return ClassificationSet(images, labels, COUNT_NAMES, tuple(prompts), "shapes-count")


def shapes_set(task: str, **kwargs) -> ClassificationSet:
  """`colour-shape` or `count` (keyword arguments as for `shapes_colour_shape` / `shapes_count`)."""
  if task == "colour-shape":
    return shapes_colour_shape(**kwargs)
  if task == "count":
    return shapes_count(**kwargs)
  raise InputError(f"unknown shapes-world class set {task!r}; use one of {SHAPES_TASKS}")


def shapes_class_names(task: str) -> tuple[str, ...]:
  """The classes of a shapes-world class set (`colour-shape` or `count`), without rendering it."""
  if task == "colour-shape":
    return colour_shape_names()
  if task == "count":
    return COUNT_NAMES
  raise InputError(f"unknown shapes-world class set {task!r}; use one of {SHAPES_TASKS}")


def check_request(num_images: int, split: str) -> None:
  """A shapes-world class set's request: at least one image, a split the world has."""
  if num_images < 1:
    raise InputError(f"num_images must be >= 1, got {num_images}")
  if split not in shapes.SPLIT_IDS:
    raise InputError(f"unknown split {split!r}; the shapes world has {sorted(shapes.SPLIT_IDS)}")

