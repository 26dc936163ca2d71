"""`python -m mat_jax.bench data`: images/s the training pipeline delivers vs images/s a train step consumes.

Producer side: the Grain training pipeline with its default worker settings over (a) a shapes-world
split and (b) a JPEG corpus written to a temporary directory (random photos-like noise resized to the
corpus resolution), both built through the tfds array_record builders. Consumer side: a tiny-CLIP
contrastive forward + backward + AdamW update at the demo batch, jitted, on this machine's default
device. It stands in for the MAT step (a MAT step does more work per image, so it consumes fewer
images/s): a pipeline faster than this consumer is faster than MAT too.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from mat_jax.bench import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--batch-size", type=int, default=64, help="demo batch (images per step)")
  parser.add_argument("--image-size", type=int, default=64, help="shapes-world and consumer resolution")
  parser.add_argument("--shapes-images", type=int, default=2048, help="training images in the shapes split")
  parser.add_argument("--jpeg-images", type=int, default=256, help="images in the temporary JPEG corpus")
  parser.add_argument("--jpeg-size", type=int, default=224, help="resolution of the JPEG corpus")
  parser.add_argument("--augmentations", default="hflip,eda,i2t,t2i",
                      help="pipeline augmentations for the shapes world ('' for none)")
  parser.add_argument("--num-threads", type=int, default=None, help="pipeline threads (default: the pipeline's)")
  parser.add_argument("--num-workers", type=int, default=0, help="pipeline worker processes (default 0)")
  parser.add_argument("--min-seconds", type=float, default=3.0, help="minimum timing window per figure")


def pipeline_images_per_second(dataset, batch_size: int, *, warmup_batches: int = 3,
                               min_seconds: float = 3.0, min_batches: int = 10) -> float:
  """Images/s drawn from a pipeline (an IterDataset), after warm-up batches (thread start, caches)."""
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
    close = getattr(it, "close", None)
    if close is not None:
      close()


def consumer_images_per_second(batch_size: int = 64, image_size: int = 64, *, preset: str = "tiny",
                               context_length: int | None = None, vocab_size: int | None = None,
                               min_seconds: float = 3.0) -> float:
  """Images/s consumed by a jitted tiny-CLIP contrastive step (forward, backward, AdamW) on the demo batch.

  A stand-in for the MAT step until the lead points this at it; the result is batch_size / seconds.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from mat_jax.models import CLIP, clip_config, split

  cfg = clip_config(preset)
  text = cfg.text if vocab_size is None else dataclasses.replace(cfg.text, vocab_size=vocab_size)
  if context_length is not None:
    text = dataclasses.replace(text, context_length=context_length)
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=image_size), text=text)
  encoder, params = split(CLIP(cfg, rngs=nnx.Rngs(0)))
  tx = optax.adamw(1e-4, weight_decay=1e-4)
  opt_state = tx.init(params)

  def loss_fn(p, images, ids, mask):
    img = encoder.image_embeddings(p, images)
    txt = encoder.text_embeddings(p, ids, mask)
    logits = jnp.exp(encoder.logit_scale(p)) * img @ txt.T
    labels = jnp.arange(len(images))
    ce = optax.softmax_cross_entropy_with_integer_labels
    return 0.5 * (ce(logits, labels).mean() + ce(logits.T, labels).mean())

  @jax.jit
  def step(p, o, images, ids, mask):
    loss, grads = jax.value_and_grad(loss_fn)(p, images, ids, mask)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  rng = np.random.default_rng(0)
  length = cfg.text.context_length
  images = jnp.asarray(rng.random((batch_size, image_size, image_size, 3), np.float32))
  ids = rng.integers(4, cfg.text.vocab_size, (batch_size, length)).astype(np.int32)
  ids[:, 0], ids[:, length // 2] = cfg.text.bos_token_id, cfg.text.eos_token_id
  ids[:, length // 2 + 1:] = cfg.text.pad_token_id
  mask = (np.arange(length) <= length // 2).astype(np.int32)[None].repeat(batch_size, 0)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  state = {"p": params, "o": opt_state}

  def one_step():
    state["p"], state["o"], loss = step(state["p"], state["o"], images, ids, mask)
    return loss

  return batch_size / common.time_call(one_step, min_seconds=min_seconds)


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
  from mat_jax.data import corpora, pipeline, shapes

  threads = pipeline.DEFAULT_NUM_THREADS if args.num_threads is None else args.num_threads
  settings = f"threads={threads}, workers={args.num_workers}"
  kwargs = dict(num_threads=threads, num_workers=args.num_workers, process_index=0, process_count=1)
  quiet = lambda message: None
  print(f"device: {common.device_summary()}; batch {args.batch_size}; pipeline {settings}")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    t0 = time.perf_counter()
    world = corpora.build_shapes(tmp / "data", train=args.shapes_images, val=0, test=0,
                                 image_size=args.image_size, log=quiet)
    shapes_build = args.shapes_images / (time.perf_counter() - t0)
    tok = shapes.tokenizer(tmp / "tokenizer")
    train = corpora.data_source(world, "train")
    rows = []
    for augs in ("", args.augmentations) if args.augmentations else ("",):
      ds = pipeline.training_pipeline(train, tok, args.batch_size, augmentations=augs, **kwargs)
      rate = pipeline_images_per_second(ds, args.batch_size, min_seconds=args.min_seconds)
      rows.append([f"pipeline: shapes world {args.image_size}px, augment: {augs or 'none'}", rate])

    annotations = _write_jpeg_corpus(tmp / "jpeg", args.jpeg_images, args.jpeg_size)
    t0 = time.perf_counter()
    corpus = corpora.build_corpus("bench", [annotations], tmp / "jpeg" / "images", image_size=args.jpeg_size,
                                  data_dir=tmp / "data", log=quiet)
    jpeg_build = args.jpeg_images / (time.perf_counter() - t0)
    ds = pipeline.training_pipeline(corpora.data_source(corpus, "train"), tok, args.batch_size,
                                    augmentations="hflip", **kwargs)
    rate = pipeline_images_per_second(ds, args.batch_size, min_seconds=args.min_seconds)
    rows.append([f"pipeline: JPEG corpus {args.jpeg_size}px, augment: hflip", rate])

  consumer = consumer_images_per_second(args.batch_size, args.image_size, vocab_size=tok.vocab_size,
                                        context_length=tok.context_length, min_seconds=args.min_seconds)
  table = [[name, rate, consumer, rate / consumer] for name, rate in rows]
  common.print_table(
      "Input pipeline vs consumer (images/s; consumer = tiny-CLIP contrastive train step at the demo "
      f"batch {args.batch_size}x{args.image_size}px, standing in for the MAT step)",
      ["producer", "pipeline img/s", "consumer img/s", "pipeline / consumer"], table)
  print(f"\nbuild rates (one process): shapes world {shapes_build:,.0f} img/s, "
        f"JPEG corpus {jpeg_build:,.0f} img/s")
  slow = [name for name, rate, _, ratio in table if ratio < 1.0]
  if slow:
    print(f"WARNING: the pipeline is the bottleneck for: {', '.join(slow)}; raise --num-threads/--num-workers")
  return 0
