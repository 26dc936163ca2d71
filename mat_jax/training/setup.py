"""From an experiment config to the data a run needs: the dataset, the training batches, the eval set.

The model and tokenizer a run starts from come from `mat_jax.runs.model_from_config`.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from mat_jax import config as config_lib
from mat_jax.data import corpora, pipeline, shapes
from mat_jax.errors import ConfigError
from mat_jax.models.tokenizers import Tokenizer


def data_builder(config: ml_collections.ConfigDict, image_size: int, *, log: Callable[[str], None] = print):
  """The TFDS builder of the configured dataset at the model's input size `image_size` (the shapes world is
  built on first use); a config whose data.image_size says another size is refused, not overruled, as it is
  recorded with the run (its config.json, its checkpoints' fingerprint)."""
  shapes_world = config.data.name == "shapes"
  mismatch = None
  if image_size != config.data.image_size:
    built = ("the shapes world is built at it on first use" if shapes_world else "the corpus is read as built at "
             f"that size: python -m mat_jax.data build ... --image-size {image_size}")
    mismatch = ConfigError(f"the model takes {image_size}px images but data.image_size is "
                           f"{config.data.image_size}; set data.image_size={image_size} ({built})")
  sizes = {}
  if shapes_world:
    if mismatch:
      raise mismatch  # before the world is built
    sizes = dict(train=config.data.build_train, val=config.data.build_val, test=config.data.build_test,
                 rare_form_rate=config_lib.rare_form_rate(config))
  builder = corpora.dataset_builder(config.data.name, image_size, config.data.data_dir or None, log=log, **sizes)
  if mismatch:
    raise mismatch  # after a corpus not built is named
  return builder


def train_iterator(config: ml_collections.ConfigDict, builder, tokenizer: Tokenizer, local_batch_size: int,
                   *, process_index: int, process_count: int, extra_transforms=()):
  """This process's training batches (host numpy dicts, or what the last of `extra_transforms` makes of
  them: global device arrays with `mesh.OnDevices`), checkpointable (`get_state`/`set_state`)."""
  source = _split_source(builder, config.data.split, "data.split")
  dataset = pipeline.training_pipeline(
      source, tokenizer, local_batch_size, process_index=process_index, process_count=process_count,
      num_workers=pipeline.resolve_worker_count(config.data.worker_count),
      batch_transforms=tuple(extra_transforms),  # before the prefetch: off the training loop's thread
      decoded_cache_bytes=config.data.decoded_cache_mb << 20, **_batch_options(config))
  return iter(dataset)


def first_batch(config: ml_collections.ConfigDict, builder, tokenizer: Tokenizer, local_batch_size: int,
                *, process_index: int, process_count: int, extra_transforms=()) -> dict:
  """The first of `train_iterator`'s batches, made in the calling thread without starting the pipeline
  (`pipeline.first_batch`): every batch's keys, shapes and dtypes."""
  source = _split_source(builder, config.data.split, "data.split")
  return pipeline.first_batch(source, tokenizer, local_batch_size, process_index=process_index,
                              process_count=process_count, batch_transforms=tuple(extra_transforms),
                              **_batch_options(config))


def _batch_options(config: ml_collections.ConfigDict) -> dict:
  """The pipeline arguments that decide what the batches hold (the rest say how the pipeline runs)."""
  return dict(captions_per_image=config.data.captions_per_image, seed=config.seed,
              augmentations=tuple(config.data.augmentations), renderings_per_scene=config.data.renderings_per_scene,
              rare_form_rate=config_lib.rare_form_rate(config))  # None but for the shapes world (config checks)


def eval_set(config: ml_collections.ConfigDict, builder, tokenizer: Tokenizer):
  return pipeline.load_eval_set(_split_source(builder, config.eval.split, "eval.split"), tokenizer,
                                max_images=config.eval.max_images or None)


def check_split(builder, split: str, key: str) -> None:
  """A config error naming the key when the dataset lacks the split (e.g. eval.split, checked before the
  run trains rather than at its first evaluation)."""
  available = sorted(builder.info.splits.keys())
  if split not in available:
    hint = ""
    if builder.info.name == "shapes_world" and split in shapes.SPLIT_IDS:
      hint = f" (the shapes world leaves out a split built with no scenes: set data.build_{split} > 0)"
    raise ConfigError(f"{key}={split!r}: {builder.info.full_name} has no such split; it has {available}{hint}")


def _split_source(builder, split: str, key: str):
  """corpora.data_source, with a config error naming the key when the dataset lacks the split."""
  check_split(builder, split, key)
  return corpora.data_source(builder, split)
