"""The shapes world: a procedural image–caption world that trains a tiny CLIP on a CPU in minutes.

A scene holds 1–3 objects. Each object has categorical attributes (one of 7 shapes, 7 colours, 2 sizes
and a cell of a 3x3 grid) and render-time jitter within those categories (position inside the cell,
extent inside the size band, a slight shade of its colour); the background is a dark grey with a tint.
Distinct objects of one scene never share a cell nor a (shape, colour) pair, so every caption that names
all objects by colour and shape refers to them unambiguously.

- `sample_scene(rng)` / `scene_for(seed, split, index)`: scenes, deterministic from a seed.
- `render(scene, image_size)`: uint8 RGB, anti-aliased by 4x4 supersampling (numpy only).
- `describe(scene, rng)` / `captions(scene, rng, n)`: captions from several templates and a synonym
  lexicon; they always name every object (colour + shape) and vary in wording and in which sizes,
  positions and relations they mention — the one-to-many relation of real captions. `rare_form_rate`
  (`form_picker`) makes the non-canonical synonyms rare or absent: the held-out-forms world.
- `parse(caption)` -> `Meaning` and `consistent(meaning, scene)`: the describer's grammar read back, so
  ambiguity can be measured on stored captions and augmentations can be checked to keep the meaning.
- `substitution_table()`: the lexicon as a meaning-preserving word-substitution table for text attacks.
- Augmentations (plain functions of numpy arrays, strings and a `np.random.Generator`, for Grain
  transforms): `i2t` (fresh captions), `rerender` / `t2i` (a new rendering of the scene / of a caption's
  meaning), `hflip` (image and left/right words together), `eda` (synonym replacement, swap, deletion and
  insertion of non-critical words), `image_jitter` (colour, brightness, noise, small shifts).
- `build_tokenizer(directory)`: a word-level tokenizer over the world's vocabulary, saved in the
  transformers tokenizer-file layout for `mat_jax.models.tokenizers.load_tokenizer`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from mat_jax import paths
from mat_jax.errors import InputError
from mat_jax.models import tokenizers as tokenizers_lib
from mat_jax.workdir import WorkdirLock

# --------------------------------------------------------------------------------------------------
# The world's categories and their surface forms (the lexicon).
# --------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "white")
SIZES = ("small", "large")

# sRGB in [0, 1]. Hues far apart, so colour jitter and anti-aliasing never make one look like another.
COLOUR_RGB = {
    "red": (0.85, 0.17, 0.17),
    "orange": (0.96, 0.57, 0.12),
    "yellow": (0.92, 0.85, 0.18),
    "green": (0.18, 0.69, 0.27),
    "blue": (0.18, 0.37, 0.89),
    "purple": (0.57, 0.25, 0.79),
    "white": (0.93, 0.93, 0.93),
}

# Every surface form of a category means exactly that category; the first form is the canonical one.
SHAPE_WORDS = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "star": ("star", "pentagram"),
    "cross": ("cross", "plus"),
    "ring": ("ring", "hoop", "donut"),
}
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "amber", "tangerine"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet"),
    "white": ("white", "ivory", "snowy"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
# Row and column words of position phrases ("in the top left corner", "in the middle right").
ROW_WORDS = {0: ("top", "upper"), 1: ("middle", "centre", "center"), 2: ("bottom", "lower")}
COL_WORDS = {0: ("left",), 1: ("middle", "centre", "center"), 2: ("right",)}
CENTRE_WORDS = ("middle", "centre", "center")
# Relation phrases; "left"/"right" are relations only when followed by "of".
RELATION_PHRASES = {
    "left": (("to", "the", "left", "of"), ("left", "of"), ("on", "the", "left", "of")),
    "right": (("to", "the", "right", "of"), ("right", "of"), ("on", "the", "right", "of")),
    "above": (("above",), ("over",)),
    "below": (("below",), ("under",), ("beneath",), ("underneath",)),
}
PICTURE_WORDS = ("picture", "image", "photo")

# Words an edit may delete, swap or insert without changing what a caption says about the scene.
NON_CRITICAL = frozenset({"a", "an", "the", "there", "is", "and", "with", "together", "showing", "picture",
                          "image", "photo", "just", "here", "visible", "clearly"})
INSERTABLE = ("here", "visible", "clearly", "just")
# Words whose left/right meaning a horizontal flip reverses.
MIRROR_WORDS = {"left": "right", "right": "left"}

MAX_OBJECTS = 3
MAX_CAPTION_WORDS = 16
DEFAULT_IMAGE_SIZE = 64
# The default dataset build is the demo's: 48 px, the tiny CLIP preset's input (one 16-px patch per grid
# cell), 10k training scenes (mat_jax.data.corpora builds it; experiment configs default to it).
BUILD_IMAGE_SIZE = 48
BUILD_TRAIN = 10_000
DEFAULT_CONTEXT_LENGTH = 24
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

_SHAPE_OF = {w: s for s, forms in SHAPE_WORDS.items() for w in forms}
_COLOUR_OF = {w: c for c, forms in COLOUR_WORDS.items() for w in forms}
_SIZE_OF = {w: s for s, forms in SIZE_WORDS.items() for w in forms}
_RELATION_OF = {"above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
                "underneath": "below"}
_ROW_OF = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_POSITION_WORDS = frozenset(_ROW_OF) | {"left", "right"} | set(CENTRE_WORDS)


# --------------------------------------------------------------------------------------------------
# Scenes.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object: categories (indices into SHAPES, COLOURS, SIZES; grid row and column) and render jitter.

  Geometry is in fractions of the image side, so a scene renders at any resolution.
  """
  shape: int
  colour: int
  size: int
  row: int
  col: int
  x: float                            # centre, 0 = left edge
  y: float                            # centre, 0 = top edge
  extent: float                       # half-size of the shape's bounding box
  shade: tuple[float, float, float]   # RGB offset added to the colour

  @property
  def key(self) -> tuple[int, int]:
    return self.shape, self.colour


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[SceneObject, ...]
  background: tuple[float, float, float]  # RGB in [0, 1]

  def to_record(self) -> dict[str, np.ndarray]:
    """The scene as named numpy arrays (one entry per object), the layout stored in the datasets."""
    objs = self.objects
    def ints(f):
      return np.asarray([getattr(o, f) for o in objs], np.int32)
    def floats(f):
      return np.asarray([getattr(o, f) for o in objs], np.float32)
    return {
        "shape": ints("shape"), "colour": ints("colour"), "size": ints("size"), "row": ints("row"),
        "col": ints("col"), "x": floats("x"), "y": floats("y"), "extent": floats("extent"),
        "shade": np.asarray([o.shade for o in objs], np.float32).reshape(len(objs), 3),
        "background": np.asarray(self.background, np.float32),
    }

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> "Scene":
    n = len(record["shape"])
    objects = tuple(
        SceneObject(int(record["shape"][i]), int(record["colour"][i]), int(record["size"][i]),
                    int(record["row"][i]), int(record["col"][i]), float(record["x"][i]),
                    float(record["y"][i]), float(record["extent"][i]),
                    tuple(float(v) for v in np.asarray(record["shade"][i])))
        for i in range(n))
    return cls(objects, tuple(float(v) for v in np.asarray(record["background"])))


# Extent bands of the two sizes (half-size, fraction of the image side): large is ~1.35x small, and a
# large object still fits its grid cell (half-side 1/6) so objects never overlap. Small objects stay
# large enough to show their shape at 48 px (~10 px across).
_EXTENT = {0: (0.09, 0.105), 1: (0.125, 0.145)}
_CELL = 1.0 / 3.0
_MARGIN = 0.01
# Position jitter inside the cell (fraction of the side). Kept small: a ViT with one patch per cell
# must otherwise learn every shape at every offset, and shape recognition is what the world tests.
_MAX_SHIFT = 0.03
_SHADE = 0.06
_COUNT_PROBS = (0.2, 0.4, 0.4)


def _jitter(shape: int, colour: int, size: int, row: int, col: int, rng: np.random.Generator) -> SceneObject:
  """Render-time attributes drawn within the categories: what a new rendering may change."""
  extent = float(rng.uniform(*_EXTENT[size]))
  slack = min(_MAX_SHIFT, max(0.0, _CELL / 2 - extent - _MARGIN))
  x = (col + 0.5) * _CELL + float(rng.uniform(-slack, slack))
  y = (row + 0.5) * _CELL + float(rng.uniform(-slack, slack))
  shade = tuple(float(v) for v in rng.uniform(-_SHADE, _SHADE, 3))
  return SceneObject(shape, colour, size, row, col, x, y, extent, shade)


def _background(rng: np.random.Generator) -> tuple[float, float, float]:
  grey = rng.uniform(0.08, 0.22)
  return tuple(float(v) for v in np.clip(grey + rng.uniform(-0.03, 0.03, 3), 0.0, 1.0))


def sample_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
  """A random scene: 1–3 objects with distinct (shape, colour) pairs in distinct grid cells."""
  n = int(np.searchsorted(np.cumsum(_COUNT_PROBS), rng.random(), side="right")) + 1 \
      if num_objects is None else num_objects
  if not 1 <= n <= MAX_OBJECTS:
    raise ValueError(f"num_objects must be in 1..{MAX_OBJECTS}, got {num_objects}")
  kinds = rng.choice(len(SHAPES) * len(COLOURS), n, replace=False)
  cells = rng.choice(9, n, replace=False)
  sizes = rng.integers(0, len(SIZES), n)
  objects = tuple(
      _jitter(int(k) // len(COLOURS), int(k) % len(COLOURS), int(s), int(c) // 3, int(c) % 3, rng)
      for k, c, s in zip(kinds, cells, sizes, strict=True))
  return Scene(objects, _background(rng))


def scene_for(seed: int, split: str, index: int) -> Scene:
  """The `index`-th scene of a split: the same for a given seed on every machine."""
  if split not in SPLIT_IDS:
    raise ValueError(f"unknown split {split!r}; the shapes world has {sorted(SPLIT_IDS)}")
  return sample_scene(np.random.default_rng((seed, SPLIT_IDS[split], index)))


def rerender_scene(scene: Scene, rng: np.random.Generator) -> Scene:
  """The same categories with fresh jitter (position in cell, extent in size band, shade, background)."""
  objects = tuple(_jitter(o.shape, o.colour, o.size, o.row, o.col, rng) for o in scene.objects)
  return Scene(objects, _background(rng))


def flip_scene(scene: Scene) -> Scene:
  """The scene mirrored left-right (what `hflip` does to the image)."""
  return Scene(tuple(dataclasses.replace(o, col=2 - o.col, x=1.0 - o.x) for o in scene.objects),
               scene.background)


# --------------------------------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------------------------------

_STAR_INNER = 0.42


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Five-pointed star, one point up: fold the angle into one half-spike and test against its edge."""
  rho = np.hypot(u, v)
  spike = 2 * np.pi / 5
  phi = np.abs(np.mod(np.arctan2(u, -v) + spike / 2, spike) - spike / 2)  # 0 along a point
  px, py = rho * np.cos(phi), rho * np.sin(phi)
  bx, by = _STAR_INNER * np.cos(spike / 2), _STAR_INNER * np.sin(spike / 2)
  # Inside when on the same side of the edge (1, 0) -> (bx, by) as the centre.
  return (bx - 1.0) * py - by * (px - 1.0) >= 0


# Unit shapes in local coordinates (u right, v down), extent 1.
_MASKS = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": lambda u, v: (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.05,
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0)),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55**2),
}


def check_image_size(image_size: int) -> None:
  if image_size < 16:
    raise InputError(f"image_size {image_size} is too small to tell shapes apart; use at least 16")


def render(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
  """uint8 (S, S, 3) RGB; edges anti-aliased by averaging `supersample`² samples per pixel."""
  check_image_size(image_size)
  s, ss = image_size, supersample
  image = np.empty((s, s, 3), np.float32)
  image[:] = scene.background
  offsets = (np.arange(ss, dtype=np.float32) + 0.5) / ss
  for obj in scene.objects:
    cx, cy, ext = obj.x * s, obj.y * s, obj.extent * s
    x0, x1 = max(int(cx - ext) - 1, 0), min(int(np.ceil(cx + ext)) + 1, s)
    y0, y1 = max(int(cy - ext) - 1, 0), min(int(np.ceil(cy + ext)) + 1, s)
    xs = ((np.arange(x0, x1, dtype=np.float32)[:, None] + offsets).ravel() - cx) / ext
    ys = ((np.arange(y0, y1, dtype=np.float32)[:, None] + offsets).ravel() - cy) / ext
    inside = _MASKS[SHAPES[obj.shape]](xs[None, :], ys[:, None])
    coverage = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3), dtype=np.float32)[..., None]
    colour = np.clip(np.asarray(COLOUR_RGB[COLOURS[obj.colour]], np.float32) + obj.shade, 0.0, 1.0)
    patch = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = patch + (colour - patch) * coverage
  return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Captions: meaning, describer, parser.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mention:
  """What a caption says about one object; None = not mentioned."""
  shape: int
  colour: int
  size: int | None = None
  row: int | None = None
  col: int | None = None


@dataclasses.dataclass(frozen=True)
class Meaning:
  """A caption's content: every object mentioned, plus relations (subject, relation, object)."""
  mentions: tuple[Mention, ...]
  relations: tuple[tuple[int, str, int], ...] = ()


class CaptionParseError(ValueError):
  """A caption the shapes-world grammar cannot read."""


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  # rng.random() is a few times cheaper than rng.integers(), and captions make dozens of picks.
  return options[int(rng.random() * len(options))]


FormPicker = Callable[[np.random.Generator, Sequence[Any]], Any]


def form_picker(rare_form_rate: float | None = None) -> FormPicker:
  """How a caption chooses among a word's surface forms (a size, colour, shape, row, column or centre word,
  or a relation phrase): `rare_form_rate` None, every form equally likely (the default world); a rate r
  in [0, 1], the canonical (first) form, except with probability r one of the others, equally likely.

  r = 0 is the held-out-forms world: the other forms ("crimson", "box", "upper", "beneath", ...) never
  appear in its captions, though they are in the tokenizer's vocabulary and the masked LM, trained on
  the default world's captions, proposes them, as a general-purpose BERT proposes words a fine-tuning
  corpus lacks. A meaning-preserving text attack (`--meaning-filter`) then has substitutes that a model
  trained on the world's captions has never read (docs/text_threat.md).
  """
  if rare_form_rate is None:
    return _pick
  check_rare_form_rate(rare_form_rate)

  def pick(rng: np.random.Generator, forms: Sequence[Any]) -> Any:
    if len(forms) == 1 or rng.random() >= rare_form_rate:
      return forms[0]
    return forms[1 + int(rng.random() * (len(forms) - 1))]

  return pick


def check_rare_form_rate(rare_form_rate: float | None) -> None:
  if rare_form_rate is not None and not 0.0 <= rare_form_rate <= 1.0:
    raise InputError(f"rare_form_rate must be in [0, 1] (or None: every surface form equally likely), "
                     f"got {rare_form_rate}")


def _article(next_word: str) -> str:
  return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(m: Mention, rng: np.random.Generator, form: FormPicker, definite: bool = False) -> list[str]:
  words = [] if m.size is None else [form(rng, SIZE_WORDS[SIZES[m.size]])]
  words += [form(rng, COLOUR_WORDS[COLOURS[m.colour]]), form(rng, SHAPE_WORDS[SHAPES[m.shape]])]
  return ["the" if definite else _article(words[0])] + words


def _position_phrase(row: int | None, col: int | None, rng: np.random.Generator, form: FormPicker) -> list[str]:
  if row is not None and col is not None:
    if (row, col) == (1, 1):
      return [_pick(rng, ("in", "at")), "the", form(rng, CENTRE_WORDS)]
    words = ["in", "the", form(rng, ROW_WORDS[row]), form(rng, COL_WORDS[col])]
    if row != 1 and col != 1 and rng.random() < 0.5:
      words.append("corner")
    return words
  if row is not None:
    word = form(rng, ROW_WORDS[row])
    return _pick(rng, (["at", "the", word], ["near", "the", word], ["in", "the", word, "part"]))
  word = COL_WORDS[col][0]
  return _pick(rng, (["on", "the", word], ["on", "the", word, "side"], ["at", "the", word]))


def _sample_position(obj: SceneObject, rng: np.random.Generator) -> tuple[int | None, int | None]:
  """Full cell, or only the row / only the column when that part is informative (not the middle)."""
  options = [(obj.row, obj.col)] * 3
  if obj.row != 1:
    options.append((obj.row, None))
  if obj.col != 1:
    options.append((None, obj.col))
  return _pick(rng, options)


def _true_relations(a: SceneObject, b: SceneObject) -> list[str]:
  rels = []
  if a.col != b.col:
    rels.append("left" if a.col < b.col else "right")
  if a.row != b.row:
    rels.append("above" if a.row < b.row else "below")
  return rels


def _compose(scene: Scene, rng: np.random.Generator, form: FormPicker) -> tuple[list[str], Meaning]:
  """One caption draft and its meaning (may exceed the word limit; the caller retries)."""
  objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
  n = len(objs)
  mode = _pick(rng, ("plain", "position", "position")) if n == 1 else \
      _pick(rng, ("plain", "position", "relation", "relation"))
  positions: list[tuple[int | None, int | None]] = [(None, None)] * n
  if mode == "position":
    # One or two objects placed: more would make captions long, and the rest follow from the others.
    placed = rng.choice(n, min(n, 1 + int(rng.integers(2))), replace=False)
    for i in placed:
      positions[i] = _sample_position(objs[i], rng)
  mentions = tuple(Mention(o.shape, o.colour, o.size if rng.random() < 0.4 else None, *positions[i])
                   for i, o in enumerate(objs))

  def np_(i: int, definite: bool = False) -> list[str]:
    words = _noun_phrase(mentions[i], rng, form, definite)
    if positions[i] != (None, None):
      words += _position_phrase(*positions[i], rng, form)
    return words

  intro = _pick(rng, ([], [], ["there", "is"], ["a", "picture", "of"],
                      ["an", "image", "of"], ["a", "photo", "of"], ["an", "image", "showing"]))
  relations: tuple[tuple[int, str, int], ...] = ()
  if mode == "relation":
    rel = _pick(rng, _true_relations(objs[0], objs[1]))
    relations = ((0, rel, 1),)
    phrase = list(form(rng, RELATION_PHRASES[rel]))
    if rng.random() < 0.35:
      words = np_(0, definite=True) + ["is"] + phrase + np_(1, definite=True)
    else:
      words = intro + np_(0) + phrase + np_(1)
    if n == 3:
      words += [_pick(rng, ("and", "with"))] + np_(2)
  elif n == 1:
    if positions[0] != (None, None) and rng.random() < 0.3:
      words = _position_phrase(*positions[0], rng, form) + ["there", "is"] + _noun_phrase(mentions[0], rng, form)
    elif positions[0] != (None, None) and rng.random() < 0.3:
      words = _noun_phrase(mentions[0], rng, form, definite=True) + ["is"] + _position_phrase(*positions[0], rng, form)
    else:
      words = intro + np_(0)
  else:
    joiner = _pick(rng, (["and"], ["with"], ["together", "with"])) if n == 2 else ["and"]
    words = list(intro)
    for i in range(n):
      words += (joiner if i == n - 1 else []) + np_(i)
  return words, Meaning(mentions, relations)


def describe_with_meaning(scene: Scene, rng: np.random.Generator, rare_form_rate: float | None = None
                          ) -> tuple[str, Meaning]:
  """A caption of at most MAX_CAPTION_WORDS words and the meaning it encodes (`form_picker` for
  `rare_form_rate`)."""
  form = form_picker(rare_form_rate)
  for _ in range(100):
    words, meaning = _compose(scene, rng, form)
    if len(words) <= MAX_CAPTION_WORDS:
      return " ".join(words), meaning
  raise RuntimeError("no caption within the word limit in 100 draws; the templates are inconsistent")


def describe(scene: Scene, rng: np.random.Generator, rare_form_rate: float | None = None) -> str:
  """One caption of the scene."""
  return describe_with_meaning(scene, rng, rare_form_rate)[0]


def captions(scene: Scene, rng: np.random.Generator, n: int = 5, rare_form_rate: float | None = None) -> list[str]:
  """`n` distinct captions of the scene (the image's one-to-many text)."""
  found: dict[str, None] = {}
  for _ in range(50 * n):
    found.setdefault(describe(scene, rng, rare_form_rate))
    if len(found) == n:
      return list(found)
  raise InputError(f"only {len(found)} distinct captions of a scene in {50 * n} draws; ask for at most "
                   f"{len(found)} captions per image")


def record_text(seed: int, split: str, index: int, captions_per_image: int,
                rare_form_rate: float | None = None) -> tuple[Scene, list[str]]:
  """The scene and captions of record `index` of a built world's split, without rendering its image (what
  the built dataset stores; the masked LM trains on the default world's)."""
  scene = scene_for(seed, split, index)
  # The captions' randomness is separate from the scene's: same scenes for any caption count or lexicon.
  rng = np.random.default_rng((seed, SPLIT_IDS[split], index, 1))
  return scene, captions(scene, rng, captions_per_image, rare_form_rate)


def encoded_records(seed: int, split: str, start: int, stop: int, captions_per_image: int,
                    rare_form_rate: float | None, image_size: int) -> list[tuple[bytes, list[str], dict]]:
  """Records start..stop-1 of a built world's split as its dataset stores them: the image as PNG bytes,
  the captions, the scene's arrays (`Scene.to_record`). Work for one of the builder's processes: it
  depends on nothing but its arguments."""
  from PIL import Image

  out = []
  for index in range(start, stop):
    scene, caps = record_text(seed, split, index, captions_per_image, rare_form_rate)
    png = io.BytesIO()
    Image.fromarray(render(scene, image_size)).save(png, format="png")  # as tfds encodes a PIL image
    out.append((png.getvalue(), caps, scene.to_record()))
  return out


def check_captions_per_image(n: int, rare_form_rate: float | None = None) -> None:
  """InputError unless the scene with the fewest captions has `n` distinct ones, so a build asking for
  more fails before it starts rather than at that scene. The fewest: one object in the centre (two
  position phrases) whose shape and colour have the fewest surface forms."""
  if n < 1:
    raise InputError(f"captions_per_image must be >= 1, got {n}")
  fewest = min(range(len(SHAPES)), key=lambda i: len(SHAPE_WORDS[SHAPES[i]]))
  colour = min(range(len(COLOURS)), key=lambda i: len(COLOUR_WORDS[COLOURS[i]]))
  scene = Scene((SceneObject(fewest, colour, 0, 1, 1, 0.5, 0.5, _EXTENT[0][0], (0.0, 0.0, 0.0)),), (0.1, 0.1, 0.1))
  captions(scene, np.random.default_rng(0), n, rare_form_rate)


def parse(caption: str) -> Meaning:
  """Read a caption of the shapes-world grammar (also after `eda` / `hflip`) back into its meaning."""
  words = caption.lower().split()
  mentions: list[dict[str, int | None]] = []
  relations: list[tuple[int, str, int]] = []
  current: dict[str, int | None] = {}
  pending_position: tuple[int | None, int | None] | None = None  # "in the top left there is ..."
  pending_relation: tuple[int, str] | None = None
  i = 0
  while i < len(words):
    w = words[i]
    if w in _SIZE_OF or w in _COLOUR_OF:
      # One object, one colour and one size: a second, different one ("a green red square", what a
      # substituted article or intro word can give) makes the caption contradict itself.
      key, value = ("size", SIZES.index(_SIZE_OF[w])) if w in _SIZE_OF else ("colour", COLOURS.index(_COLOUR_OF[w]))
      if current.get(key, value) != value:
        raise CaptionParseError(f"{caption!r}: one object with two {key}s")
      current[key] = value
    elif w == "of" and current:  # "an orange of a red square": "of" inside an object description
      raise CaptionParseError(f"{caption!r}: 'of' inside the description of an object")
    elif w in _SHAPE_OF:
      if "colour" not in current:
        raise CaptionParseError(f"{caption!r}: the shape {w!r} has no colour")
      current["shape"] = SHAPES.index(_SHAPE_OF[w])
      current.setdefault("size", None)
      current["row"] = current["col"] = None
      if pending_position is not None:  # "in the centre there is ...", "a centre of a blue cross"
        current["row"], current["col"] = pending_position
        pending_position = None
      mentions.append(current)
      current = {}
      if pending_relation is not None:
        relations.append((pending_relation[0], pending_relation[1], len(mentions) - 1))
        pending_relation = None
    elif w in _RELATION_OF or (w in ("left", "right") and i + 1 < len(words) and words[i + 1] == "of"):
      if not mentions or current:
        raise CaptionParseError(f"{caption!r}: the relation {w!r} does not follow an object")
      pending_relation = (len(mentions) - 1, _RELATION_OF.get(w, w))
      i += 1 if w in ("left", "right") else 0
    elif w in _POSITION_WORDS:
      start, run = i, [w]
      while i + 1 < len(words) and words[i + 1] in _POSITION_WORDS and not (
          words[i + 1] in ("left", "right") and i + 2 < len(words) and words[i + 2] == "of"):
        i += 1
        run.append(words[i])
      position = _read_position(run, caption)
      if mentions and not current and pending_relation is None and not _describes_next_object(words, start, i):
        # A second position phrase of one object ("a red ring lower the top", what a substituted word can
        # give) must agree with the first: one object has one place.
        last = mentions[-1]
        last["row"], last["col"] = _same_place((last["row"], last["col"]), position, caption)
      elif pending_position is not None:
        pending_position = _same_place(pending_position, position, caption)
      else:
        pending_position = position
    i += 1
  if current or pending_relation is not None or pending_position is not None:
    raise CaptionParseError(f"{caption!r}: it ends inside an object description or a relation")
  if not mentions:
    raise CaptionParseError(f"{caption!r} names no object (a colour and a shape)")
  return Meaning(tuple(Mention(**{k: m[k] for k in ("shape", "colour", "size", "row", "col")}) for m in mentions),
                 tuple(relations))


_PREPOSITIONS = frozenset({"in", "at", "on", "near"})


def _describes_next_object(words: Sequence[str], start: int, end: int) -> bool:
  """Whether the position words[start:end + 1] are an adjective of the object whose words follow ("... and
  a bottom blue ring", what a substituted size or colour word can give) rather than a position phrase of
  the object before ("a star at the right and a ring", also after `eda` drops or inserts filler words):
  no preposition before them, looking past filler, and an object's word right after."""
  following = words[end + 1] if end + 1 < len(words) else None
  if not (following in _SIZE_OF or following in _COLOUR_OF or following in _SHAPE_OF):
    return False
  before = start - 1
  while before >= 0 and words[before] in NON_CRITICAL:
    before -= 1
  return before < 0 or words[before] not in _PREPOSITIONS


def _same_place(first: tuple[int | None, int | None], second: tuple[int | None, int | None],
                caption: str) -> tuple[int | None, int | None]:
  """Two positions given to one object, joined: a row or column only one names is kept; two different
  rows or columns make the caption contradict itself."""
  if any(a is not None and b is not None and a != b for a, b in zip(first, second, strict=True)):
    raise CaptionParseError(f"{caption!r}: one object in two places")
  return tuple(b if a is None else a for a, b in zip(first, second, strict=True))


def _read_position(run: list[str], caption: str) -> tuple[int | None, int | None]:
  rows = {_ROW_OF[w] for w in run if w in _ROW_OF}
  cols = {{"left": 0, "right": 2}[w] for w in run if w in ("left", "right")}
  if len(rows) > 1 or len(cols) > 1:  # "in the lower upper", "on the left right"
    raise CaptionParseError(f"{caption!r}: the position {' '.join(run)!r} names two rows or two columns")
  row, col = next(iter(rows), None), next(iter(cols), None)
  if any(w in CENTRE_WORDS for w in run):
    if row is None and col is None:
      row, col = 1, 1
    elif row is None:
      row = 1
    elif col is None:
      col = 1
  if len(run) > 2:
    raise CaptionParseError(f"{caption!r}: cannot read the position {' '.join(run)!r}")
  return row, col


def consistent(meaning: Meaning, scene: Scene) -> bool:
  """Whether everything the caption says holds in the scene, and it names exactly the scene's objects."""
  by_key = {o.key: o for o in scene.objects}
  keys = [(m.shape, m.colour) for m in meaning.mentions]
  if len(keys) != len(by_key) or set(keys) != set(by_key):
    return False
  objs = [by_key[k] for k in keys]
  for m, o in zip(meaning.mentions, objs, strict=True):
    if (m.size is not None and m.size != o.size) or (m.row is not None and m.row != o.row) or (
        m.col is not None and m.col != o.col):
      return False
  return all(rel in _true_relations(objs[a], objs[b]) for a, rel, b in meaning.relations)


# Words that negate or exclude. The world's captions never hold one, and `parse` reads past words the
# grammar does not know (filler, a typo), but these turn what follows into its opposite ("an image missing
# a red square"); a masked LM other than the world's own can propose them.
NEGATIONS = frozenset({"no", "not", "without", "missing", "lacking", "minus", "none", "never", "nor", "neither",
                       "except", "excluding", "absent", "nothing", "empty"})


def describes(caption: str, scene: Scene, original: str | None = None) -> bool:
  """Whether `caption` is a true description of `scene`; a caption the grammar cannot read, or that holds a
  word of NEGATIONS, is not.

  `original`: the caption `caption` was changed from. A change that leaves a relation unreadable ("the
  red square is together of the blue circle") parses to the objects alone, which may all be true; with
  the original given, the caption must still state as many relations."""
  if not NEGATIONS.isdisjoint(caption.lower().split()):
    return False
  try:
    meaning = parse(caption)
  except CaptionParseError:
    return False
  if original is not None and len(meaning.relations) != len(parse(original).relations):
    return False
  return consistent(meaning, scene)


WORD_CATEGORIES = ("colour", "shape", "size", "position", "relation", "other")


def word_category(words: Sequence[str], index: int) -> str:
  """What the word at `index` of a caption names: a colour, shape, size, position (a row/column word),
  relation ("above", "left" in "left of", ...) or "other" (articles, "picture", "there", ...)."""
  w = words[index]
  if w in _COLOUR_OF:
    return "colour"
  if w in _SHAPE_OF:
    return "shape"
  if w in _SIZE_OF:
    return "size"
  if w in _RELATION_OF or (w in ("left", "right") and index + 1 < len(words) and words[index + 1] == "of"):
    return "relation"
  if w in _POSITION_WORDS:
    return "position"
  return "other"


def ambiguity(scenes: Sequence[Scene], caption_lists: Sequence[Sequence[str]]) -> dict[str, float]:
  """How well captions identify their image among `scenes` (e.g. a 1k test split).

  For every caption: the number of scenes consistent with it (its own included). Returns the mean of
  that number, the fraction of captions that fit more than one scene, the fraction of captions that do
  not fit their own scene (must be 0), and the caption count.
  """
  index: dict[frozenset, list[int]] = collections.defaultdict(list)
  for i, scene in enumerate(scenes):
    index[frozenset(o.key for o in scene.objects)].append(i)
  counts, wrong = [], 0
  for i, caps in enumerate(caption_lists):
    for cap in caps:
      meaning = parse(cap)
      candidates = index.get(frozenset((m.shape, m.colour) for m in meaning.mentions), [])
      matches = [j for j in candidates if consistent(meaning, scenes[j])]
      wrong += i not in matches
      counts.append(len(matches))
  counts_arr = np.asarray(counts, np.float64)
  return {"mean_matches": float(counts_arr.mean()), "ambiguous_fraction": float((counts_arr > 1).mean()),
          "wrong_fraction": wrong / len(counts), "captions": float(len(counts))}


def scene_from_meaning(meaning: Meaning, rng: np.random.Generator) -> Scene:
  """A random scene that satisfies a caption's meaning; unmentioned attributes are drawn at random."""
  n = len(meaning.mentions)
  if len({(m.shape, m.colour) for m in meaning.mentions}) != n:
    raise ValueError("the caption names one (shape, colour) twice; shapes-world scenes never do")
  sizes = [m.size if m.size is not None else int(rng.integers(len(SIZES))) for m in meaning.mentions]
  allowed = [[c for c in range(9) if (m.row is None or c // 3 == m.row) and (m.col is None or c % 3 == m.col)]
             for m in meaning.mentions]
  layouts = [cells for cells in itertools.product(*allowed) if len(set(cells)) == n]

  def satisfies(cells: tuple[int, ...]) -> bool:
    rc = [(c // 3, c % 3) for c in cells]
    rel = {"left": lambda a, b: a[1] < b[1], "right": lambda a, b: a[1] > b[1],
           "above": lambda a, b: a[0] < b[0], "below": lambda a, b: a[0] > b[0]}
    return all(rel[r](rc[a], rc[b]) for a, r, b in meaning.relations)

  layouts = [cells for cells in layouts if satisfies(cells)]
  if not layouts:
    raise ValueError(f"no scene satisfies {meaning}: its positions and relations contradict each other")
  cells = layouts[int(rng.integers(len(layouts)))]
  objects = tuple(_jitter(m.shape, m.colour, s, c // 3, c % 3, rng)
                  for m, s, c in zip(meaning.mentions, sizes, cells, strict=True))
  return Scene(objects, _background(rng))


# --------------------------------------------------------------------------------------------------
# Lexicon as a substitution table, and augmentations.
# --------------------------------------------------------------------------------------------------

def _synonym_groups() -> list[tuple[str, ...]]:
  groups = [*SHAPE_WORDS.values(), *COLOUR_WORDS.values(), *SIZE_WORDS.values(), ROW_WORDS[0],
            ROW_WORDS[2], CENTRE_WORDS, ("above", "over"), ("below", "under", "beneath", "underneath"),
            PICTURE_WORDS]
  return [g for g in groups if len(g) > 1]


def substitution_table() -> dict[str, list[str]]:
  """word -> the words that may replace it without changing the caption's meaning (not itself)."""
  return {w: [s for s in group if s != w] for group in _synonym_groups() for w in group}


def held_out_forms() -> tuple[str, ...]:
  """The synonyms no caption of the held-out-forms world (`rare_form_rate` 0) holds: every form of a word
  but its canonical (first) one, e.g. crimson, box, upper, beneath. The intros' picture words all stay."""
  canonical = {group[0] for group in _synonym_groups()} | set(PICTURE_WORDS)
  return tuple(sorted(set(substitution_table()) - canonical))


def i2t(scene: Scene, rng: np.random.Generator, n: int = 1, rare_form_rate: float | None = None) -> list[str]:
  """Image-to-text augmentation: fresh captions of the scene, as a captioner would write them."""
  return captions(scene, rng, n, rare_form_rate)


def rerender(scene: Scene, rng: np.random.Generator, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
  """Text-to-image augmentation at scene level: a new rendering true to every caption of the scene."""
  return render(rerender_scene(scene, rng), image_size)


def t2i(caption: str, rng: np.random.Generator, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
  """Text-to-image augmentation from one caption: an image of a scene that caption describes."""
  return render(scene_from_meaning(parse(caption), rng), image_size)


# Whole words in any case, so raw corpus captions ("On the Left, ...") are mirrored too.
_MIRRORED = re.compile(r"\b(?:" + "|".join(MIRROR_WORDS) + r")\b", re.IGNORECASE)


def mirror_caption(caption: str) -> str:
  """Left and right words swapped, in their case, the rest of the text unchanged: the caption of the
  horizontally flipped image."""

  def swap(match: re.Match) -> str:
    word = match.group()
    other = MIRROR_WORDS[word.lower()]
    return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

  return _MIRRORED.sub(swap, caption)


def hflip(image: np.ndarray, caption_list: Sequence[str]) -> tuple[np.ndarray, list[str]]:
  """Horizontal flip of an (H, W, C) image with its captions kept true (left <-> right)."""
  return np.ascontiguousarray(image[:, ::-1]), [mirror_caption(c) for c in caption_list]


def eda(caption: str, rng: np.random.Generator, *, synonym_prob: float = 0.3, swap_prob: float = 0.1,
        delete_prob: float = 0.1, insert_prob: float = 0.1) -> str:
  """EDA-style text edits that keep the meaning (Wei & Zou 2019, restricted to this world's safe words).

  Each word with synonyms is replaced by one with `synonym_prob`; with `swap_prob` two non-critical
  words swap places; each non-critical word is deleted with `delete_prob` (one word always stays); with
  `insert_prob` a filler word is inserted between phrases. Attribute, position and relation words are never moved or
  removed, so `parse` reads the same meaning.
  """
  table = substitution_table()
  words = [(_pick(rng, table[w]) if w in table and rng.random() < synonym_prob else w)
           for w in caption.split()]
  soft = [i for i, w in enumerate(words) if w in NON_CRITICAL]
  if len(soft) >= 2 and rng.random() < swap_prob:
    a, b = rng.choice(soft, 2, replace=False)
    words[a], words[b] = words[b], words[a]
  kept = [w for w in words if not (w in NON_CRITICAL and rng.random() < delete_prob)]
  words = kept or words[:1]
  if rng.random() < insert_prob:
    # Between phrases only (start, end, before an article), never inside "left of" or "top left".
    slots = [0, len(words)] + [i for i, w in enumerate(words) if w in ("a", "an", "the") and i]
    words.insert(_pick(rng, slots), _pick(rng, INSERTABLE))
  return " ".join(words)


def image_jitter(image: np.ndarray, rng: np.random.Generator, *, brightness: float = 0.1,
                 colour: float = 0.03, noise: float = 0.01, max_shift: int = 2) -> np.ndarray:
  """Intra-modal image augmentation: brightness scale, per-channel colour offset, pixel noise, shift.

  Takes uint8 or float32 [0, 1] (H, W, 3) and returns float32 in [0, 1]. Shifts pad with edge pixels.
  Magnitudes stay far below the gaps between the world's colours and its grid cells.
  """
  x = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
  x = x * np.float32(rng.uniform(1 - brightness, 1 + brightness))
  x = x + rng.uniform(-colour, colour, 3).astype(np.float32)
  if noise:
    x = x + rng.normal(0.0, noise, x.shape).astype(np.float32)
  if max_shift:
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
    h, w = x.shape[:2]
    padded = np.pad(x, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    x = padded[max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]
  return np.clip(x, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Vocabulary and tokenizer.
# --------------------------------------------------------------------------------------------------

# ids 0..3, as the tiny CLIP preset's config. The end id must not be 2: transformers' CLIPModel reads
# eos_token_id == 2 as its legacy "pool at the largest id" rule.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[START]", "[END]")
# Part of the cache directory's name: bump it whenever ids change (v2: [START]/[END] moved from 1/2 to 2/3).
TOKENIZER_VERSION = 2
_FRAME_WORDS = ("a", "an", "the", "there", "is", "of", "and", "with", "together", "showing", "in", "at",
                "on", "near", "to", "part", "side", "corner")


def vocabulary() -> list[str]:
  """Every word the describer, `mirror_caption` and `eda` can write, in a fixed order (ids are stable)."""
  words: list[str] = []
  groups: Iterable[Iterable[str]] = (
      _FRAME_WORDS, PICTURE_WORDS, INSERTABLE, *SIZE_WORDS.values(), *COLOUR_WORDS.values(),
      *SHAPE_WORDS.values(), *ROW_WORDS.values(), *COL_WORDS.values(),
      *(w for phrases in RELATION_PHRASES.values() for w in phrases))
  for group in groups:
    words.extend(w for w in group if w not in words)
  return words


def default_tokenizer_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """Where the shapes tokenizer is cached: <data dir>/tokenizers/shapes_world_v<version>."""
  return paths.default_data_dir(data_dir) / "tokenizers" / f"shapes_world_v{TOKENIZER_VERSION}"


def build_tokenizer(directory: str | os.PathLike | None = None,
                    context_length: int = DEFAULT_CONTEXT_LENGTH) -> Path:
  """Write the word-level shapes tokenizer in the transformers layout and return its directory.

  ids: [PAD]=0, [UNK]=1, [START]=2, [END]=3, then `vocabulary()`. A directory that already holds this
  vocabulary is reused.
  """
  # deferred: the tokenizers library is needed only to write the files, once
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

  in_data_dir = directory is None
  directory = Path(directory) if directory is not None else default_tokenizer_dir()
  vocab = {w: i for i, w in enumerate((*SPECIAL_TOKENS, *vocabulary()))}
  if _holds_vocabulary(directory, vocab):
    return directory
  if in_data_dir:  # a read-only one named with where it came from, not met as a traceback below
    paths.writable_data_dir()
  pad, unk, start, end = SPECIAL_TOKENS
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
  tok.normalizer = normalizers.Lowercase()
  # Whitespace only: `Tokenizer.encode_words` relies on a word's pieces not depending on its neighbours.
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single=f"{start} $A {end}",
                                                     special_tokens=[(start, vocab[start]), (end, vocab[end])])
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
  fast = tokenizers_lib.import_transformers().PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=start, eos_token=end, pad_token=pad, unk_token=unk,
      model_max_length=context_length)
  # Written whole in a directory of its own, then moved into place under a lock: every process of a
  # multi-host run, or two commands started together, build it at once, and none may read another's
  # half-written files or set aside another's finished one.
  directory.parent.mkdir(parents=True, exist_ok=True)
  building = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  try:
    fast.save_pretrained(str(building))
    # transformers 5 names its own backend class here; the generic fast class loads in 4.x and 5.x alike.
    config_path = building / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    # transformers 5 no longer writes this file; older readers of the layout expect it.
    (building / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": start, "eos_token": end, "pad_token": pad, "unk_token": unk}, indent=2))
    (building / _TOKENIZER_MARKER).write_text(json.dumps({"version": TOKENIZER_VERSION, "vocab": vocab}, indent=1))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(building, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from other users of a shared data dir
    with WorkdirLock(directory.parent, wait=True, flag="the tokenizer's directory"):
      if not _holds_vocabulary(directory, vocab):  # another process may have finished first
        if directory.exists():
          _set_aside_old_tokenizer(directory)
        os.replace(building, directory)
  finally:
    shutil.rmtree(building, ignore_errors=True)
  return directory


_TOKENIZER_MARKER = "shapes_world.json"
_TOKENIZER_FILES = (_TOKENIZER_MARKER, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _set_aside_old_tokenizer(directory: Path) -> None:
  """Remove a tokenizer directory of another vocabulary, but nothing else: a directory holding other
  files (a --dir given by mistake) is refused, not emptied."""
  others = sorted(p.name for p in directory.iterdir() if p.name not in _TOKENIZER_FILES) \
      if directory.is_dir() else [directory.name]
  if others:
    raise InputError(f"{directory} holds other files ({', '.join(others[:5])}) and no shapes tokenizer of this "
                     "version; give the tokenizer a directory of its own (or an empty one)")
  stale = Path(tempfile.mkdtemp(prefix=f".{directory.name}.stale.", dir=directory.parent))
  try:
    os.replace(directory, stale / directory.name)
  finally:
    shutil.rmtree(stale, ignore_errors=True)


def _holds_vocabulary(directory: Path, vocab: dict[str, int]) -> bool:
  try:
    return json.loads((directory / _TOKENIZER_MARKER).read_text()).get("vocab") == vocab
  except (OSError, ValueError):
    return False


def tokenizer(directory: str | os.PathLike | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
  """The shapes tokenizer as a `mat_jax.models.tokenizers.Tokenizer` (built on first use)."""
  return tokenizers_lib.load_tokenizer(build_tokenizer(directory, context_length), context_length=context_length)


# --------------------------------------------------------------------------------------------------
# Single-object scenes (the zero-shot colour x shape classification split).
# --------------------------------------------------------------------------------------------------

def single_object_scene(shape: int, colour: int, rng: np.random.Generator) -> Scene:
  """A scene of one object of the given shape and colour (indices into SHAPES, COLOURS); its size and
  grid cell are drawn from `rng`, as in `sample_scene`."""
  if not (0 <= shape < len(SHAPES) and 0 <= colour < len(COLOURS)):
    raise ValueError(f"shape must be in [0, {len(SHAPES)}) and colour in [0, {len(COLOURS)}), got {shape}, {colour}")
  cell, size = int(rng.integers(9)), int(rng.integers(len(SIZES)))
  return Scene((_jitter(shape, colour, size, cell // 3, cell % 3, rng),), _background(rng))


# --------------------------------------------------------------------------------------------------
# Misaligned augmentation: the alignment knob of the augmentation study.
# --------------------------------------------------------------------------------------------------

_ATTRIBUTE_WORDS = {"colour": (COLOUR_WORDS, _COLOUR_OF, COLOURS), "shape": (SHAPE_WORDS, _SHAPE_OF, SHAPES),
                    "size": (SIZE_WORDS, _SIZE_OF, SIZES)}


def misalign(caption: str, rng: np.random.Generator) -> str:
  """A noisy captioner's caption: one attribute word (a colour, shape or size) replaced by a word of
  another value, so the caption no longer describes its image (a misaligned augmented pair).

  A caption without attribute words is returned unchanged (every caption of the grammar has some).
  """
  words = caption.split()
  slots = [(i, kind) for i, w in enumerate(words) for kind, (_, of, _) in _ATTRIBUTE_WORDS.items() if w in of]
  if not slots:
    return caption
  i, kind = slots[int(rng.random() * len(slots))]
  forms, of, values = _ATTRIBUTE_WORDS[kind]
  others = [v for v in values if v != of[words[i]]]
  words[i] = _pick(rng, forms[_pick(rng, others)])
  return " ".join(words)
