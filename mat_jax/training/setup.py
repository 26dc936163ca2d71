"""From an experiment config to the things a run needs: model, tokenizer, data.

Model sources (`config.model.source`):
- a preset name of `mat_jax.models.PRESETS` ("tiny", "vit-b-16", ...) or `BLIP_PRESETS` ("blip-tiny",
  "blip-base", ...): random initialisation from
  `config.seed`, with `config.model.overrides` ("vision.layers=2,text.width=64") applied and, for a
  tokenizer given by `config.model.tokenizer`, the text vocabulary / context / special ids taken from it;
- a transformers-layout directory or hub id: `load_clip`, or `load_blip` for a BLIP (+ its tokenizer files);
- a mat_jax run directory (its exported model, else its newest checkpoint);
- "cache:shapes_clip": the clean tiny CLIP of the shapes world, trained once with
  experiments/shapes_clip.py into the cache ($MAT_JAX_CACHE_DIR or ~/.cache/mat_jax, under runs/).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from mat_jax import runtime
from mat_jax.config import ConfigError
from mat_jax.models import BLIP, BLIP_PRESETS, CLIP, PRESETS, BlipConfig, CLIPConfig, blip_config, clip_config
from mat_jax.models.clip import resolve_dtype
from mat_jax.models.tokenizers import Tokenizer

CACHE_PREFIX = "cache:"
EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


def cache_dir() -> Path:
  return runtime.cache_root()


def cached_run_dir(name: str, config: ml_collections.ConfigDict) -> Path:
  """Where experiments/<name>.py's run is cached: keyed by everything its result depends on (the
  config, the preset's architecture, the data version), so an edited experiment is trained afresh."""
  from mat_jax import config as config_lib
  parts: dict[str, Any] = {"config": config_lib.to_json(config)}
  if config.model.source in PRESETS or config.model.source in BLIP_PRESETS:
    parts["preset"] = repr({**PRESETS, **BLIP_PRESETS}[config.model.source])
  if config.data.name == "shapes":
    from mat_jax.data import corpora
    parts["data_version"] = str(corpora.ShapesWorld.VERSION)
  return cache_dir() / "runs" / f"{name}-{config_lib.digest(parts)}"


# ----------------------------------------------------------------------------------------------------
# Model and tokenizer.


def parse_model_overrides(text: str, base: CLIPConfig) -> CLIPConfig:
  """'vision.layers=2,text.width=64,projection_dim=64' applied to a CLIPConfig (types from the fields)."""
  if not text.strip():
    return base
  changes: dict[str, dict[str, Any]] = {"": {}, "vision": {}, "text": {}}
  for part in text.split(","):
    key, sep, value = part.partition("=")
    key = key.strip()
    section, _, field = key.rpartition(".")
    target = {"": base, "vision": base.vision, "text": base.text}.get(section)
    names = {f.name: f for f in dataclasses.fields(target)} if target is not None else {}
    if not sep or field not in names or field in ("vision", "text"):
      valid = [f"vision.{f.name}" for f in dataclasses.fields(base.vision)] + \
              [f"text.{f.name}" for f in dataclasses.fields(base.text)] + \
              [f.name for f in dataclasses.fields(base) if f.name not in ("vision", "text")]
      raise ConfigError(f"model.overrides: cannot apply {part.strip()!r}; write field=value with fields "
                        f"among: {', '.join(valid)}")
    current = getattr(target, field)
    value = value.strip()
    try:
      if isinstance(current, bool):
        parsed: Any = value.lower() in ("1", "true", "yes")
      elif isinstance(current, int):
        parsed = int(value)
      elif isinstance(current, float):
        parsed = float(value)
      else:
        parsed = value
    except ValueError:
      raise ConfigError(f"model.overrides: {key}={value!r} is not a {type(current).__name__}") from None
    changes[section][field] = parsed
  vision = dataclasses.replace(base.vision, **changes["vision"])
  text_cfg = dataclasses.replace(base.text, **changes["text"])
  return dataclasses.replace(base, vision=vision, text=text_cfg, **changes[""])


def load_tokenizer(source: str, context_length: int | None = None) -> Tokenizer:
  """"shapes" (the shapes world's word-level tokenizer) or a transformers-layout dir / hub id."""
  if source == "shapes":
    from mat_jax.data import shapes
    return shapes.tokenizer(context_length=context_length or shapes.DEFAULT_CONTEXT_LENGTH)
  from mat_jax.models.tokenizers import load_tokenizer as load
  return load(source, context_length=context_length)


def preset_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None) -> CLIPConfig:
  source = config.model.source
  if source in BLIP_PRESETS:
    cfg = blip_config(source, **supported_options(BlipConfig, execution_options(config)))
  else:
    cfg = clip_config(source, **execution_options(config))
  if tokenizer is not None:
    # The model's text side follows the tokenizer it is trained with.
    text = dict(vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
                bos_token_id=tokenizer.start_id, eos_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_id)
    if source in BLIP_PRESETS:  # BLIP's positions are a table of their own; its [SEP] is the end token
      text.update(max_position_embeddings=max(cfg.text.max_position_embeddings, tokenizer.context_length),
                  sep_token_id=tokenizer.end_id)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, **text))
  return parse_model_overrides(config.model.overrides, cfg)


def is_run_dir(path: Path) -> bool:
  from mat_jax import checkpoint
  return (path / checkpoint.CONFIG_FILE).exists() and (
      (path / checkpoint.MODEL_DIR / "config.json").exists() or (path / "checkpoints").is_dir())


def load_model(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print
               ) -> tuple[CLIP, Tokenizer | None]:
  """The model a run starts from, and its tokenizer (see the module docstring)."""
  from mat_jax import checkpoint

  source = config.model.source
  context = config.model.context_length or None
  if source.startswith(CACHE_PREFIX):
    run_dir = ensure_cached_run(source[len(CACHE_PREFIX):], log=log)
    model, tokenizer = checkpoint.restore_model(run_dir)
  elif source in PRESETS or source in BLIP_PRESETS:
    tokenizer = load_tokenizer(config.model.tokenizer, context) if config.model.tokenizer else None
    cls = BLIP if source in BLIP_PRESETS else CLIP
    return cls(preset_config(config, tokenizer), rngs=nnx.Rngs(config.seed)), tokenizer
  elif is_run_dir(Path(source).expanduser()):
    model, tokenizer = checkpoint.restore_model(Path(source).expanduser())
  else:
    from mat_jax.models import load_blip, load_clip
    from mat_jax.models.blip import is_blip
    model = (load_blip if is_blip(source) else load_clip)(source, dtype=resolve_dtype(config.model.dtype))
    tokenizer = load_tokenizer(config.model.tokenizer or source,
                               context or model.config.text.context_length)
  if context and context > model.config.text.context_length:
    raise ConfigError(f"model.context_length={context} but the text model of {source} has "
                      f"{model.config.text.context_length} positions; set model.context_length="
                      f"{model.config.text.context_length} or less (0 = the model's)")
  if tokenizer is None and config.model.tokenizer:
    tokenizer = load_tokenizer(config.model.tokenizer, context)
  return with_options(model, **execution_options(config)), tokenizer


def execution_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The CLIPConfig fields that say how a model is computed (not what it computes), from a run config."""
  return {"dtype": resolve_dtype(config.model.dtype), "scan_layers": bool(config.model.scan_layers),
          "attention": config.model.attention}


def supported_options(config_type: type, options: dict[str, Any]) -> dict[str, Any]:
  """The execution options a model's config type has (BLIP has a dtype but no scan_layers or attention
  choice); asking for a non-default option the model lacks is an error, not silently ignored."""
  fields = {f.name for f in dataclasses.fields(config_type)}
  missing = sorted(k for k, v in options.items() if k not in fields and v not in (False, "auto", None))
  if missing:
    raise ConfigError(f"{config_type.__name__} models have no {', '.join(missing)} option; leave "
                      f"{', '.join('model.' + k for k in missing)} at its default for this model")
  return {k: v for k, v in options.items() if k in fields}


def with_options(model: CLIP | BLIP, **changes: Any) -> CLIP | BLIP:
  """The same parameters under other execution options (compute dtype, scan_layers, attention)."""
  changes = supported_options(type(model.config), changes)
  if all(getattr(model.config, name) == value for name, value in changes.items()):
    return model
  from mat_jax.models import split
  _, params = split(model)
  abstract = nnx.eval_shape(lambda: type(model)(model.config.replace(**changes), rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, params)


def ensure_cached_run(name: str, *, log: Callable[[str], None] = print) -> Path:
  """The run directory of experiments/<name>.py in the cache, trained now if it is not there yet."""
  from mat_jax import checkpoint, config as config_lib

  path = EXPERIMENTS_DIR / f"{name}.py"
  if not path.exists():
    raise ConfigError(f"model.source {CACHE_PREFIX}{name}: there is no experiment {path}")
  config = config_lib.load(path)
  run_dir = cached_run_dir(name, config)
  if (run_dir / checkpoint.MODEL_DIR / "config.json").exists():
    return run_dir
  from mat_jax.training import loop
  from mat_jax.workdir import WorkdirLock
  # Two commands needing the same cached model: the second waits for the first's training, then uses it.
  with WorkdirLock(run_dir, wait=True, on_wait=log):
    if (run_dir / checkpoint.MODEL_DIR / "config.json").exists():
      return run_dir
    log(f"{CACHE_PREFIX}{name} is not in the cache yet: training it now with {path} into {run_dir}")
    loop.train(config, run_dir, log=log, lock=False)  # resumes a run that was interrupted
  return run_dir


# ----------------------------------------------------------------------------------------------------
# Data.


def data_builder(config: ml_collections.ConfigDict, image_size: int, *, log: Callable[[str], None] = print):
  """The TFDS builder of the configured dataset; the shapes world is built on first use."""
  from mat_jax.data import corpora

  data_dir = config.data.data_dir or None
  if config.data.name == "shapes":
    if image_size != config.data.image_size:
      raise ConfigError(f"the model takes {image_size}px images but data.image_size is "
                        f"{config.data.image_size}; set data.image_size={image_size}")
    return corpora.build_shapes(data_dir, train=config.data.build_train, val=config.data.build_val,
                                test=config.data.build_test, image_size=image_size, log=log)
  return corpora.corpus_builder(config.data.name, image_size, data_dir)


def train_iterator(config: ml_collections.ConfigDict, builder, tokenizer: Tokenizer, local_batch_size: int,
                   *, process_index: int, process_count: int, extra_transforms=()):
  """This process's training batches (host numpy dicts), checkpointable (`get_state`/`set_state`)."""
  from mat_jax.data import pipeline

  source = _split_source(builder, config.data.split, "data.split")
  workers = config.data.worker_count
  if workers == pipeline.AUTO_WORKERS:
    workers = pipeline.auto_worker_count(jax.default_backend(), os.cpu_count())
  dataset = pipeline.training_pipeline(
      source, tokenizer, local_batch_size, captions_per_image=config.data.captions_per_image,
      seed=config.seed, augmentations=tuple(config.data.augmentations),
      process_index=process_index, process_count=process_count, num_workers=workers,
      batch_transforms=tuple(extra_transforms),  # before the prefetch: off the training loop's thread
      renderings_per_scene=config.data.renderings_per_scene)
  return iter(dataset)


def eval_set(config: ml_collections.ConfigDict, builder, tokenizer: Tokenizer):
  from mat_jax.data import pipeline

  return pipeline.load_eval_set(_split_source(builder, config.eval.split, "eval.split"), tokenizer,
                                max_images=config.eval.max_images or None)


def _split_source(builder, split: str, key: str):
  """corpora.data_source, with a config error naming the key when the dataset lacks the split."""
  from mat_jax.data import corpora

  available = sorted(builder.info.splits.keys())
  if split not in available:
    raise ConfigError(f"{key}={split!r}: {builder.info.full_name} has no such split; it has {available}")
  return corpora.data_source(builder, split)


def model_from_checkpoint(config: ml_collections.ConfigDict, workdir: Path) -> tuple[CLIP, Tokenizer | None]:
  """A run's model from its newest checkpoint (when it was not exported yet)."""
  from mat_jax.training import loop
  return loop.restore_checkpointed_model(config, workdir)
