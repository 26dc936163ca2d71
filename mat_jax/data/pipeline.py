"""Grain input pipelines: training batches and evaluation sets, as host-side numpy.

Training (`training_pipeline`): the split's records are shuffled with a seed (a new order every epoch),
repeated, decoded, augmented (optional, by name) and given one or `k` sampled captions per image, all over
the global index space, then sliced per host (`process_index::process_count`: host h reads examples h,
h + P, ... of the one-host stream, so hosts differ in order and random draws), batched to a fixed size (the
remainder is dropped) and tokenised.
Each batch is a dict:

    images          float32 (B, H, W, 3) in [0, 1]
    input_ids       int32 (B, L), or (B, K, L) when captions_per_image = K > 1
    attention_mask  int32, like input_ids
    captions        unicode (B,) or (B, K): the caption text (text attacks need words)
    image_ids       int32 (B,): the record's index in its split

The iterator's position is checkpointable: `it.get_state()` / `it.set_state(state)`, or with Orbax through
Grain's handler (see `save_iterator` / `restore_iterator`). Placing batches on devices is the mesh code's job.

Evaluation (`load_eval_set`): all images and all captions of a split, the captions tokenised, and the
index maps `text_to_image` (T,) and `image_to_texts` (N, K_max) (-1 pads) that retrieval needs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from mat_jax import processes
from mat_jax.data import shapes
from mat_jax.errors import MatJaxError

# name -> default probability. i2t / t2i / t2i_caption need the scene (shapes world records).
AUGMENTATIONS: dict[str, float] = {
    "i2t": 0.5,          # each sampled caption replaced by a freshly written one (image-to-text)
    "t2i": 0.5,          # the image replaced by a new rendering of its scene (text-to-image, scene level)
    "t2i_caption": 0.5,  # the image replaced by a rendering of the sampled caption alone (needs k = 1)
    "hflip": 0.5,        # image mirrored, left/right swapped in its captions
    "eda": 0.5,          # each caption edited EDA-style (synonyms, swap/deletion/insertion of fillers)
    "image_jitter": 0.5,  # brightness, colour, noise, small shifts
    "misalign": 0.3,     # each caption given a wrong attribute (a noisy captioner): the alignment knob
}
NEEDS_SCENE = frozenset({"i2t", "t2i", "t2i_caption"})
# Text edits through the shapes world's own lexicon: on another corpus its synonyms change meanings
# (star -> pentagram, ring -> donut), so they run on shapes-world records only.
NEEDS_SHAPES_LEXICON = frozenset({"eda", "misalign"})

# Threads overlap PNG/JPEG decoding (PIL releases the GIL) with the training step: 4 was the best of
# `python -m mat_jax.bench data` on a 2-core host, and the count scales with the host's cores.
DEFAULT_NUM_THREADS = min(16, max(4, 2 * (os.cpu_count() or 1)))
DEFAULT_PREFETCH_BATCHES = 2
# Decoded records kept per process (`DecodedCache`): the shapes world's 10k 48-px training records take
# about 105 MB, a 224-px corpus about 150 kB per image, so a Flickr30k-size split is partly kept.
DEFAULT_DECODED_CACHE_BYTES = 1 << 30
AUTO_WORKERS = -1  # data.worker_count: choose from the backend and the host's cores


def auto_worker_count(backend: str, cpu_count: int | None) -> int:
  """Grain worker processes for `data.worker_count = -1`. On a CPU backend the training step itself uses
  every core, so the pipeline stays in the main process (threads); on an accelerator host the cores are
  otherwise idle, and with 8 or more of them half (at most 8) become workers."""
  cores = cpu_count or 1
  if backend == "cpu" or cores < 8:
    return 0
  return min(8, cores // 2)


def resolve_worker_count(requested: int) -> int:
  """`data.worker_count` as it runs on this host: -1 (auto) chosen by `auto_worker_count` for JAX's
  backend and this host's cores, any other count as given."""
  if requested != AUTO_WORKERS:
    return requested
  return auto_worker_count(jax.default_backend(), os.cpu_count())


def threads_per_process(num_threads: int, num_workers: int, cpu_count: int | None) -> int:
  """Reader threads in each pipeline process: `num_threads` in the main process; with worker processes,
  the host's cores shared among them (at least 2 each), not `num_threads` per worker."""
  if num_workers <= 0:
    return num_threads
  return max(2, min(num_threads, (cpu_count or 1) // num_workers))


class DecodedCache:
  """Random access to `source` that keeps each record after its first read, up to `max_bytes` of them.

  Reading a record from an array_record split means parsing it and decoding its image (about 1 ms for a
  48-px shapes-world record on one core); a training run over a small split reads every record once per
  epoch. With this cache the second and later epochs read memory. Records beyond the budget are read
  from `source` every time. Arrays kept are made read-only, so a consumer that would modify a record in
  place fails instead of changing later epochs. Safe under Grain's reader threads; a worker process
  starts with an empty cache of its own (pickling keeps the source, not the records).
  """

  def __init__(self, source, max_bytes: int = DEFAULT_DECODED_CACHE_BYTES):
    self._source = source
    self._max_bytes = int(max_bytes)
    self._records: list[Any] = [None] * len(source)
    self._bytes = 0
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> Any:
    record = self._records[index]
    if record is not None:
      return record
    record = self._source[index]
    size = _nbytes(record)
    with self._lock:
      if self._records[index] is None and self._bytes + size <= self._max_bytes:
        _freeze(record)
        self._records[index] = record
        self._bytes += size
    return record

  @property
  def cached_bytes(self) -> int:
    return self._bytes

  def __getstate__(self) -> dict[str, Any]:
    return {"source": self._source, "max_bytes": self._max_bytes}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["source"], state["max_bytes"])

  def __repr__(self) -> str:
    return f"DecodedCache({self._source!r}, max_bytes={self._max_bytes})"


# What an array holds beyond its `sys.getsizeof`: numpy allocates its shape and strides, and its data's
# bookkeeping, apart from the object. Measured under tracemalloc (numpy 2.4-2.5, Python 3.11-3.12): with
# it, the memory a shapes-world record holds is 0.99-1.00x its count; without it 1.05-1.06x, its ten
# small arrays counted 14-19% short.
ARRAY_ALLOCATION_OVERHEAD = 48


def _nbytes(value: Any) -> int:
  """The memory a decoded record holds: every object's own size (`sys.getsizeof`: an array's header and,
  when it owns them, its data), its keys and items. A shapes-world record is a 6.9 kB image and ten small
  arrays, whose headers come to a quarter of it: counting data bytes alone kept 1.3x the budget."""
  size = sys.getsizeof(value)
  if isinstance(value, np.ndarray):
    size += ARRAY_ALLOCATION_OVERHEAD
    base = value.base
    if isinstance(base, np.ndarray):  # a view keeps its base alive (a decoder's own array)
      size += _nbytes(base)
    elif base is not None:  # the decoded bytes, or a buffer getsizeof cannot see: the data shown
      size += sys.getsizeof(base) if isinstance(base, (bytes, bytearray)) else value.nbytes
    if value.dtype == object:
      size += sum(_nbytes(v) for v in value.flat)
    return size
  if isinstance(value, Mapping):  # a reader decodes the features' names afresh for every record
    return size + sum(_nbytes(k) + _nbytes(v) for k, v in value.items())
  if isinstance(value, (list, tuple)):
    return size + sum(_nbytes(v) for v in value)
  return size


def _freeze(value: Any) -> None:
  if isinstance(value, np.ndarray):
    value.setflags(write=False)
  elif isinstance(value, Mapping):
    for v in value.values():
      _freeze(v)
  elif isinstance(value, (list, tuple)):
    for v in value:
      _freeze(v)


class DataSourceError(MatJaxError, ValueError):
  """A training source that cannot feed the pipeline (empty, or records lacking a field); the message
  names the fix."""


class WorkerDiedError(MatJaxError, RuntimeError):
  """A worker process of the input pipeline ended abruptly (killed, or out of memory)."""


def worker_died(err: BaseException) -> bool:
  """Whether `err` is Grain's report that one of the pipeline's worker processes ended abruptly (its message
  is the only sign; another report is left as it is)."""
  return isinstance(err, RuntimeError) and str(err).startswith("Worker process was terminated unexpectedly")


def parse_augmentations(spec: str | Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
  """{name: probability} from "hflip,eda:0.3", a list of names, or a mapping; checks the names."""
  if not spec:
    return {}
  if isinstance(spec, str):
    spec = [s.strip() for s in spec.split(",") if s.strip()]
  items: list[tuple[str, float | None]] = []
  if isinstance(spec, Mapping):
    items = [(str(k), float(v)) for k, v in spec.items()]
  else:
    for s in spec:
      name, _, prob = str(s).partition(":")
      try:
        items.append((name, float(prob) if prob else None))
      except ValueError:
        raise ValueError(f"augmentation {s!r}: write name or name:probability, e.g. 'eda:0.3'") from None
  out = {}
  for name, prob in items:
    if name not in AUGMENTATIONS:
      raise ValueError(f"unknown augmentation {name!r}; choose from {sorted(AUGMENTATIONS)} "
                       "(optionally name:probability, e.g. 'hflip:0.5,eda')")
    prob = AUGMENTATIONS[name] if prob is None else prob
    if not 0.0 <= prob <= 1.0:
      raise ValueError(f"augmentation {name!r}: probability {prob} is not in [0, 1]")
    out[name] = prob
  return out


def as_text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class PrepareExample:
  """Record -> training example: decode, sample captions, augment; a Grain random map (picklable).

  `renderings` R > 1 (shapes world): the example holds R images of the record's scene (the stored one
  and R - 1 new renderings), each with its own captions and augmentations and all with the record's
  image id, so that in a batch every rendering is a positive of every caption of its scene (N:1 on the
  image side). Arrays then carry a leading R axis, which `FlattenRenderings` folds into the batch.
  """
  captions_per_image: int
  augmentations: Mapping[str, float]
  eda_options: Mapping[str, float] = dataclasses.field(default_factory=dict)
  renderings: int = 1
  rare_form_rate: float | None = None  # the shapes world's lexicon, for i2t's fresh captions (shapes.form_picker)

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = np.asarray(record["image"])
    if self.renderings == 1:
      return self._example(record, image, rng)
    scene = shapes.Scene.from_record(record["scene"])
    images = [image] + [shapes.rerender(scene, rng, image.shape[0]) for _ in range(self.renderings - 1)]
    # One mirror for all renderings: they share an image id, so each one's captions are positives of the
    # others, and a caption mirrored for one rendering would contradict an unmirrored one.
    flip = "hflip" in self.augmentations and rng.random() < self.augmentations["hflip"]
    examples = [self._example(record, img, rng, flip) for img in images]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

  def _example(self, record: Mapping[str, Any], image: np.ndarray, rng: np.random.Generator,
               flip: bool | None = None) -> dict[str, Any]:
    """One image and its captions; `flip` decides hflip where the caller drew it (None: drawn here)."""
    aug, k = self.augmentations, self.captions_per_image
    pool = [as_text(c) for c in record["captions"]]
    if not pool:
      raise ValueError(f"record {int(record.get('image_id', -1))} has no captions")
    # k distinct captions when the image has that many, else all of them and repeats.
    order = rng.permutation(len(pool))
    if k > len(pool):
      order = np.concatenate([order, rng.integers(0, len(pool), k - len(pool))])
    chosen = [pool[i] for i in order[:k]]
    scene = shapes.Scene.from_record(record["scene"]) if NEEDS_SCENE & aug.keys() else None
    if "i2t" in aug:
      chosen = [shapes.describe(scene, rng, self.rare_form_rate) if rng.random() < aug["i2t"] else c for c in chosen]
    if "t2i_caption" in aug and rng.random() < aug["t2i_caption"]:
      image = shapes.t2i(chosen[0], rng, image.shape[0])
    elif "t2i" in aug and rng.random() < aug["t2i"]:
      image = shapes.rerender(scene, rng, image.shape[0])
    if flip is None:
      flip = "hflip" in aug and rng.random() < aug["hflip"]
    if flip:
      image, chosen = shapes.hflip(image, chosen)
    if "eda" in aug:
      chosen = [shapes.eda(c, rng, **self.eda_options) if rng.random() < aug["eda"] else c for c in chosen]
    if "misalign" in aug:
      chosen = [shapes.misalign(c, rng) if rng.random() < aug["misalign"] else c for c in chosen]
    if "image_jitter" in aug and rng.random() < aug["image_jitter"]:
      pixels = shapes.image_jitter(image, rng)
    else:
      pixels = float_pixels(image)
    return {
        "images": pixels.astype(np.float32, copy=False),
        "captions": np.asarray(chosen[0] if k == 1 else chosen),
        "image_ids": np.int32(record["image_id"]),
    }


def flatten_renderings(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """(S, R, ...) arrays of S scenes x R renderings -> (S·R, ...): a batch of images again."""
  return {key: value.reshape((-1,) + value.shape[2:]) for key, value in batch.items()}


@dataclasses.dataclass(frozen=True)
class Tokenize:
  """Batch -> batch with `input_ids` / `attention_mask` of the captions (any leading shape)."""
  tokenizer: Any

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    captions = batch["captions"]
    tokens = self.tokenizer([str(c) for c in captions.reshape(-1)])
    shape = captions.shape + (tokens.input_ids.shape[-1],)
    return {**batch, "input_ids": tokens.input_ids.reshape(shape),
            "attention_mask": tokens.attention_mask.reshape(shape)}


def _check_source(source, augmentations: Mapping[str, float]) -> None:
  if len(source) == 0:
    raise DataSourceError("the data source is empty; build the dataset with `python -m mat_jax.data build ...`")
  first = source[0]
  # image_id decides the contrastive positives: without it every image of a batch would share one id,
  # be a positive of every caption, and the loss would be 0.
  missing = [k for k in ("image", "captions", "image_id") if k not in first]
  if missing:
    raise DataSourceError(f"records need 'image', 'captions' and 'image_id' (a distinct int per image) "
                          f"fields; this source's records lack {missing}. Rebuild the dataset with `python -m "
                          "mat_jax.data build ...`, or add the field to the records of a custom source")
  needs_scene = sorted(NEEDS_SCENE & augmentations.keys())
  if needs_scene and "scene" not in first:
    raise DataSourceError(f"augmentations {needs_scene} redraw or re-caption the scene, which only shapes-world "
                          "records store; use hflip or image_jitter for other corpora")
  needs_lexicon = sorted(NEEDS_SHAPES_LEXICON & augmentations.keys())
  if needs_lexicon and "scene" not in first:
    raise DataSourceError(f"augmentations {needs_lexicon} edit captions through the shapes world's lexicon, whose "
                          "synonyms change the meaning of other corpora's words (star -> pentagram); use hflip or "
                          "image_jitter for other corpora")


def check_layout(augmentations: Mapping[str, float], captions_per_image: int, renderings_per_scene: int) -> None:
  """Refuse augmentations a batch's layout would make false: t2i_caption draws an example's image from one
  of its captions, which the example's other captions, and the scene's other renderings (positives of every
  caption of the scene), need not be true of."""
  if "t2i_caption" in augmentations and (captions_per_image != 1 or renderings_per_scene != 1):
    raise DataSourceError(f"t2i_caption draws the image from one caption, so it needs captions_per_image=1 and "
                          f"renderings_per_scene=1 (got {captions_per_image} and {renderings_per_scene}): the "
                          "scene's other captions and renderings need not be true of that image; use t2i (a new "
                          "rendering true to all captions) with several captions or renderings per scene")


def training_pipeline(source, tokenizer, batch_size: int, *, captions_per_image: int = 1, seed: int = 0,
                      augmentations: str | Sequence[str] | Mapping[str, float] | None = None,
                      eda_options: Mapping[str, float] | None = None, num_epochs: int | None = None,
                      process_index: int | None = None, process_count: int | None = None,
                      num_threads: int = DEFAULT_NUM_THREADS,
                      prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
                      num_workers: int = 0,
                      batch_transforms: Sequence[Any] = (),
                      renderings_per_scene: int = 1,
                      decoded_cache_bytes: int = DEFAULT_DECODED_CACHE_BYTES,
                      rare_form_rate: float | None = None) -> grain.IterDataset:
  """The training input pipeline over a random-access `source` (e.g. `corpora.data_source(b, "train")`).

  `batch_size` is per host. `num_epochs=None` repeats forever. `process_index` / `process_count`
  default to `jax.process_index()` / `jax.process_count()`: each host reads a disjoint slice of the
  shuffled stream. `captions_per_image` k > 1: k distinct captions per image; an image with fewer gives
  all of its captions, then repeats of them drawn at random.
  `augmentations` names entries of AUGMENTATIONS ("hflip,eda:0.3" or {"hflip": 0.5}). `num_threads`
  threads read and transform records; `num_workers` > 0 moves the whole pipeline into that many
  processes (worth it with spare cores), each with its share of the cores as threads
  (`threads_per_process`). Each process keeps up to `decoded_cache_bytes` of decoded records
  (`DecodedCache`; 0 = none), so later epochs of a small split skip decoding. `batch_transforms`
  (callables batch dict -> batch dict, e.g. text-attack candidates) run after tokenisation inside the
  prefetching thread, off the training loop (with worker processes: in this process, after them).
  `renderings_per_scene` R > 1: each batch holds batch_size / R scenes, each rendered R times (the
  image-side N:1 positives of `PrepareExample`); batch_size stays the number of images.
  `rare_form_rate`: the shapes world's lexicon (`shapes.form_picker`), which i2t's fresh captions follow.
  Iterate with `iter(...)`; the iterator has get_state/set_state.
  """
  ds, batched = _batch_stages(source, tokenizer, batch_size, captions_per_image=captions_per_image, seed=seed,
                              augmentations=augmentations, eda_options=eda_options, num_epochs=num_epochs,
                              process_index=process_index, process_count=process_count,
                              renderings_per_scene=renderings_per_scene, decoded_cache_bytes=decoded_cache_bytes,
                              rare_form_rate=rare_form_rate)
  num_threads = threads_per_process(num_threads, num_workers, os.cpu_count())
  if num_workers > 0:
    # Worker w of W reads elements w, w + W, ... of what it is given: whole batches here, so the workers
    # together deliver the batches one process would (made of examples, each would batch its own share:
    # other batches for every worker count, and each worker's remainder lost from a finite stream).
    # Reader threads then take a batch each, so as many batches as threads are read ahead.
    it = batched(ds).to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                       prefetch_buffer_size=max(num_threads, prefetch_batches)))
  else:
    # Reader threads take a batch each too (its examples read, batched and tokenised in that thread). Taking
    # an example each, Grain's prefetch counted the finished examples at the head of its buffer of
    # prefetch_batches * batch_size examples at every example: host work growing with the batch's square,
    # 80 ms of CPU per batch of 128 (42 ms batch by batch), 230 ms per batch of 256 (95 ms), on the cores a
    # CPU backend's steps run on. The position is still told in examples, as checkpoints hold it.
    read_ahead = max(1, prefetch_batches, min(num_threads, 2 * prefetch_batches))
    it = ExamplePositions(batched(ds).to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                                        prefetch_buffer_size=read_ahead)),
                          batch_size // renderings_per_scene)
  if num_workers > 0:
    # Grain's worker processes read absl flags; outside an absl app nothing has parsed them, so take
    # their defaults (what absl.app would do with no command-line flags).
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = WorkersStartedTogether(it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch_batches),
        worker_init_fn=functools.partial(processes.helper_initializer, os.getpid())))
  # Batch transforms run in this process even with workers: they may hold a JAX model (BERT candidates),
  # which worker processes should not each load.
  for transform in batch_transforms:
    it = it.map(transform)
  # What runs in this process after the reader threads or the workers (the batch transforms) runs in a
  # background thread, off the training loop's critical path.
  return grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch_batches)


def start_reading(iterator) -> None:
  """Start an iterator of `training_pipeline` reading ahead now (its worker processes, its first batches), not
  at its first `next`, so that they start beside whatever comes before it. Its position must be set first
  (`set_state`, a checkpoint's restore). An iterator that cannot read ahead is left as it is."""
  start = getattr(iterator, "start_prefetch", None)
  if start is not None:
    start()


def first_batch(source, tokenizer, batch_size: int, *, batch_transforms: Sequence[Any] = (),
                **options: Any) -> dict[str, np.ndarray]:
  """The first batch `training_pipeline(source, tokenizer, batch_size, **options)` delivers, made in this
  thread from the same stages (no reader threads, no worker processes): the shapes and dtypes every batch
  of that pipeline has, e.g. to compile a train step before the pipeline has started. `options` are those
  of `training_pipeline` that decide what a batch holds (`_batch_stages`'), not how the pipeline runs."""
  # Without the decoded-record cache, which only skips a later decoding of the same record.
  ds, batched = _batch_stages(source, tokenizer, batch_size, decoded_cache_bytes=0, **options)
  batch = batched(ds)[0]
  for transform in batch_transforms:
    batch = transform(batch)
  return batch


def _batch_stages(source, tokenizer, batch_size: int, *, captions_per_image: int = 1, seed: int = 0,
                  augmentations: str | Sequence[str] | Mapping[str, float] | None = None,
                  eda_options: Mapping[str, float] | None = None, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  renderings_per_scene: int = 1, decoded_cache_bytes: int = DEFAULT_DECODED_CACHE_BYTES,
                  rare_form_rate: float | None = None):
  """The examples of this process (a MapDataset) and the function that batches and tokenises them, which
  the training pipeline and `first_batch` share (arguments as `training_pipeline`'s)."""
  if batch_size < 1 or captions_per_image < 1:
    raise ValueError(f"batch_size and captions_per_image must be >= 1, got {batch_size}, {captions_per_image}")
  if renderings_per_scene < 1 or batch_size % renderings_per_scene:
    raise ValueError(f"renderings_per_scene={renderings_per_scene} must be >= 1 and divide the batch size "
                     f"{batch_size} (a batch holds whole scenes)")
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  augmentations = parse_augmentations(augmentations)
  _check_source(source, augmentations)
  check_layout(augmentations, captions_per_image, renderings_per_scene)
  if renderings_per_scene > 1 and "scene" not in source[0]:
    raise DataSourceError("renderings_per_scene > 1 re-renders each scene, which only shapes-world records store")
  examples_per_batch = batch_size // renderings_per_scene
  if num_epochs is not None:
    # A finite stream is cut to whole global batches, so every host yields the same number of batches:
    # a host with one more would wait for the others in the step's collectives forever.
    batches_per_host = len(source) * num_epochs // (process_count * examples_per_batch)
    if batches_per_host == 0:
      raise ValueError(f"{num_epochs} epoch(s) of the split's {len(source)} records make no batch of "
                       f"{examples_per_batch} examples on each of {process_count} host(s); lower batch_size or "
                       "repeat (num_epochs=None)")
  # Shuffle and draw randomness over global indices, then slice: slicing first gives every host the same
  # permutation of its slice and the same draws at each position (Grain keys an example's rng on its
  # index), i.e. hosts in lockstep. Each host still reads only its own records.
  if decoded_cache_bytes > 0:
    source = DecodedCache(source, decoded_cache_bytes)
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)
  if num_epochs is not None:
    ds = ds[:batches_per_host * process_count * examples_per_batch]
  ds = ds.random_map(PrepareExample(captions_per_image, augmentations, dict(eda_options or {}),
                                    renderings_per_scene, rare_form_rate))
  ds = ds[process_index::process_count]

  def batched(dataset):  # a MapDataset or an IterDataset: both batch and map alike
    dataset = dataset.batch(examples_per_batch, drop_remainder=True)
    if renderings_per_scene > 1:
      dataset = dataset.map(flatten_renderings)
    return dataset.map(Tokenize(tokenizer))

  return ds, batched


class ExamplePositions(grain.IterDataset):
  """Batches read whole (a `MapDataset` of batches read ahead by threads), with the iterator's position told
  in examples, `{"next_index": batches * examples_per_batch}`, as the pipeline that read examples one by one
  and batched them told it: checkpoints saved by either resume in the other."""

  def __init__(self, parent: grain.IterDataset, examples_per_batch: int):
    super().__init__(parent)
    self._examples_per_batch = examples_per_batch

  def __iter__(self) -> grain.DatasetIterator:
    return _ExamplePositionsIterator(self._parent.__iter__(), self._examples_per_batch)


class _ExamplePositionsIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, examples_per_batch: int):
    super().__init__(parent)
    self._examples_per_batch = examples_per_batch

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    state = dict(self._parent.get_state())
    state["next_index"] = int(state["next_index"]) * self._examples_per_batch
    return state

  def set_state(self, state) -> None:
    index = int(state["next_index"])
    if index % self._examples_per_batch:
      raise ValueError(f"the saved position {index} is not a whole number of batches of {self._examples_per_batch} "
                       "examples: it was saved by a pipeline with another batch size")
    self._parent.set_state({**state, "next_index": index // self._examples_per_batch})


class WorkersStartedTogether(grain.IterDataset):
  """`mp_prefetch`'s worker processes, all started at the first read. Grain starts a worker when it is first
  read from, and its interleave reads worker w + 1 only once worker w has delivered, so W workers started
  one after the other: W start-ups (imports, then a first batch) before the W-th batch, about 8 s each on a
  16-core GPU host, a minute of a short run with 8 workers. The program's main module is not imported by
  them (`processes.main_module_hidden`). The batches and the iterator's state are the
  mp_prefetch's own."""

  def __iter__(self) -> grain.DatasetIterator:
    return _StartWorkersAtFirstRead(self._parent.__iter__())


class _StartWorkersAtFirstRead(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._started = False

  def __next__(self):
    if not self._started:
      # The interleave has made every worker's iterator by now (the prefetching thread above asked for the
      # state at its creation, a restore set it); this starts each one's process together. Until the first
      # batch is back, every worker has started: one whose iterator the interleave makes only now (this
      # thread's read may come before that state was asked for) starts inside its first read.
      with processes.main_module_hidden():
        self._parent.start_prefetch()
        batch = next(self._parent)
      self._started = True
      return batch
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state) -> None:
    self._parent.set_state(state)
    self._started = False  # a restore may have made new worker iterators: start them together too


# --------------------------------------------------------------------------------------------------
# Iterator checkpoints with Orbax.
# --------------------------------------------------------------------------------------------------

def save_iterator(directory: str | os.PathLike, iterator: grain.DatasetIterator) -> None:
  """Write the iterator's position with Grain's Orbax handler (one JSON file per process).

  In a training checkpoint, save it as one item beside the parameters:

      mngr = ocp.CheckpointManager(path, item_names=("params", "data"))
      mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                              data=grain.checkpoint.CheckpointSave(iterator)))
      restored = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params),
          data=grain.checkpoint.CheckpointRestore(iter(same_pipeline))))
      iterator = restored["data"]
  """
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckpt:
    ckpt.save(os.fspath(os.path.abspath(directory)), args=grain.checkpoint.CheckpointSave(iterator))


def restore_iterator(directory: str | os.PathLike, iterator: grain.DatasetIterator) -> grain.DatasetIterator:
  """Move a fresh iterator of the same pipeline to the position saved by `save_iterator`."""
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckpt:
    return ckpt.restore(os.fspath(os.path.abspath(directory)), args=grain.checkpoint.CheckpointRestore(iterator))


# --------------------------------------------------------------------------------------------------
# Evaluation sets.
# --------------------------------------------------------------------------------------------------

def image_to_texts(text_to_image: np.ndarray, n_images: int) -> np.ndarray:
  """The inverse of text_to_image: int32 (N, K_max), each image's captions in order, -1 pads."""
  text_to_image = np.asarray(text_to_image)
  counts = np.bincount(text_to_image, minlength=n_images)
  if counts.min() == 0:
    raise ValueError(f"image {int(np.argmin(counts))} has no caption; every test image needs one")
  order = np.argsort(text_to_image, kind="stable")  # texts grouped by image, in text order within each
  owner = text_to_image[order]
  first = np.cumsum(counts) - counts  # each image's first position in `order`
  slots = np.full((n_images, int(counts.max())), -1, np.int32)
  slots[owner, np.arange(len(order)) - first[owner]] = order
  return slots


def float_pixels(images: np.ndarray) -> np.ndarray:
  """float32 pixels in [0, 1], the models' input: uint8 images scaled by 1/255, float ones as they are."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) * np.float32(1 / 255)
  return images.astype(np.float32)


@dataclasses.dataclass
class EvalSet:
  """A retrieval test set: all images, all captions and the maps between them."""
  images: np.ndarray          # uint8 (N, H, W, 3), or float32 in [0, 1]; float32 views by `float_images`
  captions: np.ndarray        # unicode (T,)
  input_ids: np.ndarray       # int32 (T, L)
  attention_mask: np.ndarray  # int32 (T, L)
  text_to_image: np.ndarray   # int32 (T,): the image of each caption
  image_to_texts: np.ndarray  # int32 (N, K_max): each image's captions, -1 pads
  image_ids: np.ndarray       # int32 (N,)
  scenes: list[shapes.Scene] | None = None  # shapes world only

  @property
  def num_images(self) -> int:
    return len(self.images)

  @property
  def num_texts(self) -> int:
    return len(self.captions)

  def float_images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    """float32 pixels in [0, 1] of images[start:stop] (the model's input)."""
    return float_pixels(self.images[start:stop])

  def image_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Fixed-size float32 batches (the last one zero-padded, so one compiled shape) and their real sizes."""
    for start in range(0, self.num_images, batch_size):
      batch = self.float_images(start, start + batch_size)
      count = len(batch)
      if count < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - count,) + batch.shape[1:], np.float32)])
      yield batch, count


def load_eval_set(source, tokenizer, *, max_images: int | None = None,
                  captions_per_image: int | None = None, chunk: int = 256) -> EvalSet:
  """Read a split into an `EvalSet`, in record order; `captions_per_image` keeps the first K per image."""
  n = len(source) if max_images is None else min(max_images, len(source))
  if n == 0:
    raise ValueError("the evaluation split is empty")
  images, captions, owners, image_ids, scenes = [], [], [], [], []
  for start in range(0, n, chunk):
    indices = list(range(start, min(start + chunk, n)))
    # A tfds source reads a chunk at once; any other sequence of records (a list, ...) one by one.
    records = source.__getitems__(indices) if hasattr(source, "__getitems__") else [source[i] for i in indices]
    for offset, record in enumerate(records):
      i = start + offset
      caps = [as_text(c) for c in record["captions"]][:captions_per_image]
      if not caps:
        raise ValueError(f"record {i} of the evaluation split has no captions")
      image = np.asarray(record["image"])
      if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"record {i} of the evaluation split has a {image.dtype} image; give uint8 pixels or "
                         "floats in [0, 1]")
      images.append(image)
      captions += caps
      owners += [i] * len(caps)
      image_ids.append(int(record.get("image_id", i)))
      if "scene" in record:
        scenes.append(shapes.Scene.from_record(record["scene"]))
  text_to_image = np.asarray(owners, np.int32)
  tokens = tokenizer(captions)
  # uint8 records stay uint8 (a quarter of float32's memory); float ones keep their values.
  if all(image.dtype == np.uint8 for image in images):
    stacked = np.stack(images)
  else:
    stacked = np.stack([float_pixels(image) for image in images])
  return EvalSet(stacked, np.asarray(captions), tokens.input_ids, tokens.attention_mask,
                 text_to_image, image_to_texts(text_to_image, n), np.asarray(image_ids, np.int32),
                 scenes if len(scenes) == n else None)
