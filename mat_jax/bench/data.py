"""`python -m mat_jax.bench data`: images/s the training pipeline delivers vs images/s the MAT step consumes.

Consumer: the real train step of the demo, experiments/shapes_mat.py (MAT: 1-word BERT-Attack with the shapes-world MLM,
2-step PGD at 2/255, contrastive loss, AdamW), with its batch size, image size and attack settings but a
randomly initialised model of the demo's architecture (`model.source=tiny`, `model.tokenizer=shapes`, so
the cached clean model is not needed; a step costs the same whatever the weights). The run is built by
`loop.build_run`, one batch is drawn from the demo's own input iterator (`setup.train_iterator`, with the
text-attack candidates attached as the loop attaches them), placed as the loop places it, and the jitted
step (`loop.make_train_step`) is timed: median seconds per step after the compiling warm-up, device work
finished; consumer images/s = global batch / seconds per step.

Producers, with the default worker settings: that demo iterator (shapes world, text-attack candidates);
the candidate transform alone on captions it has not seen (it runs in the main process, so with worker
processes it bounds the pipeline of any run that attacks text in training);
the shapes world with augmentations (and candidates); a JPEG corpus written to a temporary directory
(smooth random colour fields; no attack candidates: a real corpus takes BERT's, which need the model).
Datasets are built through the tfds array_record builders in a temporary directory, nothing is written
into the repository (the shapes tokenizer is cached in the user's data directory, as in training). Each
side is timed alone: on a CPU-only machine the two share cores during training, so the ratio there is an upper bound.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ml_collections
import numpy as np

from mat_jax import config as config_lib
from mat_jax import errors
from mat_jax import mesh as mesh_lib
from mat_jax import runs
from mat_jax.bench import common
from mat_jax.data import corpora, pipeline, shapes
from mat_jax.training import loop, setup
from mat_jax.training import step as step_lib

if TYPE_CHECKING:
  from mat_jax.training.loop import Run

DEMO_EXPERIMENT = "shapes_mat.py"


def _augmentations(text: str) -> str:
  """The argparse type of --augmentations: names checked while parsing, not after the world is built and timed."""
  try:
    pipeline.parse_augmentations(text)
  except ValueError as err:
    raise argparse.ArgumentTypeError(str(err)) from None
  return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--batch-size", type=errors.positive_int, default=None,
                      help="global batch (default: the demo's train.batch_size)")
  parser.add_argument("--image-size", type=errors.positive_int, default=None,
                      help="shapes-world and model resolution (default: the demo's data.image_size, 48)")
  parser.add_argument("--shapes-images", type=errors.positive_int, default=4096,
                      help="training images in the shapes split")
  parser.add_argument("--jpeg-images", type=errors.positive_int, default=256,
                      help="images in the temporary JPEG corpus")
  parser.add_argument("--jpeg-size", type=errors.positive_int, default=224, help="resolution of the JPEG corpus")
  parser.add_argument("--augmentations", default="hflip,eda,i2t,t2i", type=_augmentations,
                      help="pipeline augmentations for the shapes world ('' for none)")
  parser.add_argument("--num-threads", type=errors.positive_int, default=None,
                      help="pipeline threads (default: the pipeline's; the demo's iterator always uses it)")
  parser.add_argument("--num-workers", type=int, default=-1,
                      help="pipeline worker processes (default -1: auto, as data.worker_count; 0 on a CPU backend)")
  parser.add_argument("--min-seconds", type=errors.positive_float, default=3.0, help="minimum timing window per figure")


def pipeline_images_per_second(dataset, batch_size: int, *, warmup_batches: int = 3,
                               min_seconds: float = 3.0, min_batches: int = 10, close: bool = True) -> float:
  """Images/s drawn from a pipeline (an IterDataset or its iterator), after warm-up batches (thread
  start); the iterator is closed afterwards unless `close` is False."""
  it = iter(dataset)
  try:
    for _ in range(warmup_batches):
      next(it)
    count, start = 0, time.perf_counter()
    while count < min_batches or time.perf_counter() - start < min_seconds:
      next(it)
      count += 1
    return count * batch_size / (time.perf_counter() - start)
  finally:
    if close and getattr(it, "close", None) is not None:
      it.close()


def epoch_images_per_second(iterator, batch_size: int, epoch_images: int) -> float:
  """Images/s over the rest of a first epoch of `iterator` (one batch already drawn): every record read
  and decoded from the split, the decoded-record cache filling."""
  batches = max(1, epoch_images // batch_size - 1)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def candidates_images_per_second(transform, batch_size: int, *, seed: int = 0, min_seconds: float = 3.0,
                                 min_batches: int = 10) -> float:
  """Images/s (one caption each) the text-attack candidate transform alone delivers on captions it has not
  seen (its cache misses, as in a first epoch): the part of the pipeline that stays in the main process
  with worker processes. Captions are drawn fresh from the shapes world; their drawing is not timed."""
  rng = np.random.default_rng(seed)
  seen: set[str] = set()

  def fresh_batch() -> dict[str, np.ndarray]:
    captions: list[str] = []
    while len(captions) < batch_size:
      caption = shapes.describe(shapes.sample_scene(rng), rng)
      if caption not in seen:
        seen.add(caption)
        captions.append(caption)
    return {"captions": np.asarray(captions)}

  transform(fresh_batch())  # warm-up: the MLM's first shapes compile here
  elapsed, count = 0.0, 0
  while count < min_batches or elapsed < min_seconds:
    batch = fresh_batch()
    start = time.perf_counter()
    transform(batch)
    elapsed += time.perf_counter() - start
    count += 1
  return count * batch_size / elapsed


def demo_config(data_dir: Path, args: argparse.Namespace) -> ml_collections.ConfigDict:
  """experiments/shapes_mat.py with a random tiny CLIP and the shapes tokenizer (the demo's architecture),
  its data built in `data_dir`; batch and image size from the flags when given."""

  overrides = ["model.source=tiny", "model.tokenizer=shapes", f"data.data_dir={data_dir}",
               f"data.build_train={args.shapes_images}", "data.build_val=0", "data.build_test=0",
               f"data.worker_count={args.num_workers}"]
  if args.batch_size is not None:
    overrides.append(f"train.batch_size={args.batch_size}")
  if args.image_size is not None:
    overrides += [f"data.image_size={args.image_size}", f"model.overrides=vision.image_size={args.image_size}"]
  return config_lib.load(runs.EXPERIMENTS_DIR / DEMO_EXPERIMENT, overrides)


def mat_step_images_per_second(run: Run, rows: dict, *, min_seconds: float = 3.0) -> tuple[float, float]:
  """(images/s of this process's rows, seconds/step) of the run's jitted train step on `rows` (this
  process's rows, on the host or on the devices already), placed as the loop places it; median after the
  compiling warm-up, device work finished."""

  state = step_lib.create_state(run.params, run.tx, run.is_trainable, run.config.seed, run.shardings)
  step_fn, reference = loop.make_train_step(run)
  batch = mesh_lib.global_batch(rows, run.mesh)
  current = {"state": state}

  def one_step():
    current["state"], metrics = step_fn(current["state"], batch, reference)  # the old state is donated
    return current["state"], metrics

  seconds = common.time_call(one_step, min_seconds=min_seconds)
  # This process's rows per second: what its own pipeline must deliver (each process feeds its share).
  return mesh_lib.local_batch_size(run.global_batch_size) / seconds, seconds


def _write_jpeg_corpus(root: Path, count: int, size: int) -> Path:
  """`count` JPEGs (smooth random colour fields, larger than `size`) and a Karpathy annotation file."""
  import json

  from PIL import Image

  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  entries = []
  for i in range(count):
    # Low-frequency noise upsampled: compresses and decodes like a photo, unlike white noise.
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((int(size * 1.33), size), Image.Resampling.BICUBIC)
    photo.save(root / "images" / f"{i}.jpg", quality=90)
    entries.append({"filename": f"{i}.jpg", "split": "train",
                    "sentences": [{"raw": f"A photo number {i}, of {j} things."} for j in range(5)]})
  (root / "dataset_bench.json").write_text(json.dumps({"images": entries}))
  return root / "dataset_bench.json"


def run(args: argparse.Namespace) -> int:
  import jax


  threads = pipeline.DEFAULT_NUM_THREADS if args.num_threads is None else args.num_threads
  args.num_workers = pipeline.resolve_worker_count(args.num_workers)
  settings = f"threads={threads}, workers={args.num_workers}"
  kwargs = dict(num_threads=threads, num_workers=args.num_workers, process_index=jax.process_index(),
                process_count=jax.process_count())
  def quiet(message):
    return None
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    config = demo_config(tmp / "data", args)
    mat_run = loop.build_run(config, tmp / "run", log=quiet)
    size, batch = config.data.image_size, config.train.batch_size
    local_batch = mesh_lib.local_batch_size(batch)
    obj = config.objective
    print(f"device: {common.device_summary()}; mesh {mesh_lib.describe(mat_run.mesh)}; pipeline {settings}")
    print(f"consumer: the MAT step of {DEMO_EXPERIMENT} (random tiny CLIP), batch {batch} x {size}px, "
          f"{obj.text_changes} word(s) changed from {config.text_attack.source} candidates "
          f"(top {config.text_attack.top_k}), {obj.steps}-step PGD at {obj.eps * 255:g}/255")

    t0 = time.perf_counter()
    world = setup.data_builder(config, mat_run.model.config.vision.image_size, log=quiet)
    shapes_build = args.shapes_images / (time.perf_counter() - t0)
    # The demo's input exactly as loop.train builds it (its batches copied onto the devices); its first batch
    # feeds the timed step.
    demo_input = setup.train_iterator(config, world, mat_run.tokenizer, local_batch,
                                      process_index=jax.process_index(), process_count=jax.process_count(),
                                      extra_transforms=(*mat_run.batch_transforms, mesh_lib.OnDevices(mat_run.mesh)))
    first = next(demo_input)
    augs = ",".join(config.data.augmentations) or "none"
    demo = f"shapes world {size}px, the demo's input: augment: {augs} (+ attack candidates)"
    # Each process reads its 1/process_count of the split per epoch.
    rows = [[f"{demo}, first epoch (decoding)", epoch_images_per_second(demo_input, local_batch,
                                                                        args.shapes_images // jax.process_count())],
            [f"{demo}, later epochs (decoded cache)",
             pipeline_images_per_second(demo_input, local_batch, min_seconds=args.min_seconds, close=False)]]
    if getattr(demo_input, "close", None) is not None:
      demo_input.close()
    rows.append(["text-attack candidates alone, new captions (main process, also with workers)",
                 candidates_images_per_second(loop.candidate_transform(config, mat_run.tokenizer, log=quiet),
                                              local_batch, seed=config.seed, min_seconds=args.min_seconds)])
    if args.augmentations:
      # A fresh candidate transform: its caption cache starts empty, as in a new run.
      ds = pipeline.training_pipeline(corpora.data_source(world, "train"), mat_run.tokenizer, local_batch,
                                      augmentations=args.augmentations, seed=config.seed,
                                      batch_transforms=(loop.candidate_transform(config, mat_run.tokenizer),),
                                      **kwargs)
      rows.append([f"shapes world {size}px, augment: {args.augmentations} (+ attack candidates)",
                   pipeline_images_per_second(ds, local_batch, min_seconds=args.min_seconds)])

    annotations = _write_jpeg_corpus(tmp / "jpeg", args.jpeg_images, args.jpeg_size)
    t0 = time.perf_counter()
    corpus = corpora.build_corpus("bench", [annotations], tmp / "jpeg" / "images", image_size=args.jpeg_size,
                                  data_dir=tmp / "data", log=quiet)
    jpeg_build = args.jpeg_images / (time.perf_counter() - t0)
    ds = pipeline.training_pipeline(corpora.data_source(corpus, "train"), mat_run.tokenizer, local_batch,
                                    augmentations="hflip", **kwargs)
    rows.append([f"JPEG corpus {args.jpeg_size}px, augment: hflip",
                 pipeline_images_per_second(ds, local_batch, min_seconds=args.min_seconds)])

  consumer, seconds = mat_step_images_per_second(mat_run, first, min_seconds=args.min_seconds)
  table = [[name, rate, consumer, rate / consumer] for name, rate in rows]
  common.print_table(
      f"Input pipeline vs the demo's MAT train step (images/s; MAT step: batch {batch} x {size}px, "
      f"{seconds * 1e3:,.0f} ms/step, median after compilation)",
      ["producer", "pipeline img/s", "MAT step img/s", "pipeline / MAT step"], table)
  print(f"\nbuild rates: shapes world {shapes_build:,.0f} img/s "
        f"({corpora.shapes_build_processes(args.shapes_images)} process(es)), JPEG corpus {jpeg_build:,.0f} img/s "
        "(one process)")
  slow = [name for name, rate, _, ratio in table if ratio < 1.0]
  if slow:
    print(f"WARNING: the pipeline is the bottleneck for: {'; '.join(slow)}; raise --num-threads/--num-workers")
  return 0
