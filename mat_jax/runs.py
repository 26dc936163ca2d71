"""Model sources and run directories: the one place a model is found by name, restored or exported.

Model sources (`config.model.source`, `--model`), resolved by `load_model` (a source string) and
`model_from_config` (a run config, which adds the presets):
- a preset name of `mat_jax.models.PRESETS` ("tiny", "vit-b-16", ...) or `BLIP_PRESETS` ("blip-tiny",
  "blip-base", ...): random initialisation from `config.seed`, with `config.model.overrides`
  ("vision.layers=2,text.width=64") applied and, for a tokenizer given by `config.model.tokenizer`, the
  text vocabulary / context / special ids taken from it (configs only);
- a transformers-layout directory or hub id: `load_clip`, or `load_blip` for a BLIP (+ its tokenizer files);
- a mat_jax run directory: its exported model, else the parameters of its newest checkpoint;
- "cache:NAME": the run of experiments/NAME.py in the cache ($MAT_JAX_CACHE_DIR or ~/.cache/mat_jax,
  under runs/, keyed by the experiment's content); "shapes" is "cache:shapes_clip", the demo's clean
  tiny CLIP. Loading never trains: a cached run that is not there yet is a `MissingCachedRunError` naming
  the command that trains it (`mat_jax.training.loop.ensure_cached_run` is that step, which the command
  lines call for the sources they are given).

Tokenizer sources (`resolve_tokenizer`): "shapes" (the shapes world's word-level tokenizer) or a
transformers-layout directory / hub id.

A run directory (`mat_jax.checkpoint` documents its files) is exported by `export_model` and read back by
`restore_model`; restoring a checkpoint reads the parameters into the model's structure, on the current
devices, without touching the run (a damaged newest checkpoint is skipped, not moved).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from mat_jax import checkpoint, paths
from mat_jax import config as config_lib
from mat_jax import mesh as mesh_lib
from mat_jax import objectives
from mat_jax.data import corpora, shapes
from mat_jax.errors import ConfigError, InputError
from mat_jax.models import (
  BLIP,
  BLIP_PRESETS,
  CLIP,
  PRESETS,
  BlipConfig,
  CLIPConfig,
  blip_config,
  clip_config,
  load_blip,
  load_clip,
  save_blip,
  save_clip,
  split,
)
from mat_jax.models import layers
from mat_jax.models import weights as weights_lib
from mat_jax.models.blip import is_blip
from mat_jax.models.clip import check_tokens_for, resolve_dtype
from mat_jax.models.hub import ModelSourceError
from mat_jax.models.tokenizers import Tokenizer, load_tokenizer
from mat_jax.training import mlm, optim
from mat_jax.training import step as step_lib

# Every preset a config's model.source may name: CLIP's and BLIP's architectures by name.
ALL_PRESETS = {**PRESETS, **BLIP_PRESETS}
CACHE_PREFIX = "cache:"
SHAPES_SOURCE = "shapes"            # the command lines' name of cache:shapes_clip
SHAPES_EXPERIMENT = "shapes_clip"
EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


class MissingCachedRunError(ConfigError):
  """A "cache:NAME" model source whose run is not trained yet (loading a model never trains one)."""


# ----------------------------------------------------------------------------------------------------
# The cache of trained runs.


def cache_dir() -> Path:
  return paths.cache_root()


def cached_name(source: str) -> str | None:
  """The experiment name of a cached-run source ("shapes" or "cache:NAME"), else None."""
  if source == SHAPES_SOURCE:
    return SHAPES_EXPERIMENT
  if source.startswith(CACHE_PREFIX):
    return source[len(CACHE_PREFIX):]
  return None


def cached_experiment(name: str) -> tuple[Path, ml_collections.ConfigDict]:
  """experiments/<name>.py and its config."""
  path = EXPERIMENTS_DIR / f"{name}.py"
  if not EXPERIMENTS_DIR.is_dir():
    # A wheel holds the package only: the experiment files live beside it in the source tree.
    raise ConfigError(f"model.source {CACHE_PREFIX}{name}: the experiment files are not at {EXPERIMENTS_DIR}; "
                      "they ship with the source tree (experiments/ beside mat_jax/): install mat_jax from a "
                      "clone with `pip install -e .`")
  if not path.exists():
    raise ConfigError(f"model.source {CACHE_PREFIX}{name}: there is no experiment {path}")
  return path, config_lib.load(path)


def result_parts(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything a run's result depends on but the host's pipeline layout: the config without its
  runtime-only keys, the objective's inner attack as the registry resolves it, the preset's
  architecture, the data version, and the cached run it starts from (whose name changes whenever that
  experiment, or one it starts from, changes)."""
  parts: dict[str, Any] = {"config": config_lib.result_json(config)}
  inner = objectives.make(config.objective).inner_attack()
  if inner is not None:  # the attack registry, not the config, fixes its losses and text scoring
    parts["inner_attack"] = dataclasses.asdict(inner)
  if config.model.source in ALL_PRESETS:
    parts["preset"] = repr(ALL_PRESETS[config.model.source])
  if config.data.name == "shapes":
    parts["data_version"] = str(corpora.ShapesWorld.VERSION)
  upstream = source_run(config.model.source)
  if upstream is not None:
    parts["source_run"] = upstream
  return parts


def cached_run_dir(name: str, config: ml_collections.ConfigDict) -> Path:
  """Where experiments/<name>.py's run is cached: keyed by `result_parts`, so an edited experiment, or one
  whose starting run was edited, is trained afresh."""
  return cache_dir() / "runs" / f"{name}-{config_lib.digest(result_parts(config))}"


def source_run(source: str) -> str | None:
  """The name of the cached run directory a "cache:NAME" / "shapes" source stands for (trained or not);
  None for any other source."""
  name = cached_name(source)
  if name is None:
    return None
  _, config = cached_experiment(name)
  return cached_run_dir(name, config).name


def run_fingerprint(config: ml_collections.ConfigDict, model_config: Any, tokenizer: Any = None) -> dict[str, Any]:
  """The fingerprint of a run's checkpoints: `mat_jax.config.fingerprint`, plus what the config names but
  does not pin: for a run that starts from a cached one, that run's directory name (resumed from another
  starting model, an edited experiment, it is another run); for a run that trains against the shapes
  world's MLM, that MLM's cache directory (its settings and recipe version); the digest of the tokenizer's
  vocabulary (`Tokenizer.vocabulary_digest`), which the model's text inputs depend on whichever tokenizer
  `model.tokenizer` or the source's files name."""
  fingerprint = config_lib.fingerprint(config, model_config)
  if tokenizer is not None:
    fingerprint["model.tokenizer_vocabulary"] = tokenizer.vocabulary_digest()
  upstream = source_run(config.model.source)
  if upstream is not None:
    fingerprint["model.source_run"] = upstream
  name = mlm.resolved_name(config.text_attack)
  if name is not None and objectives.make(config.objective).needs_text_candidates:
    fingerprint["text_attack.mlm"] = name
  return fingerprint


def starting_source(source: str) -> str | None:
  """The model.source a run started from, for a source that names a run ("cache:NAME", "shapes", a run
  directory); None for any other source, or a run whose config cannot be read (restoring it says why)."""
  name = cached_name(source)
  if name is not None:
    return cached_experiment(name)[1].model.source
  path = Path(source).expanduser()
  if path.name == checkpoint.MODEL_DIR and not is_run_dir(path) and is_run_dir(path.parent):
    path = path.parent  # a run's exported model directory: the run it was exported from
  if not is_run_dir(path):
    return None
  try:
    return str(checkpoint.read_run_config(path)["model"]["source"])
  except (KeyError, TypeError):  # no config, or not a run's
    return None


def root_source(source: str) -> str:
  """The source at the start of a chain of runs (a run's starting model, its starting model, ...): a preset,
  a transformers directory or a hub id."""
  seen = set()
  while (upstream := starting_source(source)) is not None and source not in seen:
    seen.add(source)
    source = upstream
  return source


def is_trained(run_dir: Path) -> bool:
  """Whether a run directory holds its exported (final) model."""
  return (run_dir / checkpoint.MODEL_DIR / "config.json").exists()


def cached_run(name: str) -> Path:
  """The run directory of experiments/<name>.py in the cache; `MissingCachedRunError` when it is not
  trained yet (this function never trains)."""
  path, config = cached_experiment(name)
  run_dir = cached_run_dir(name, config)
  if not is_trained(run_dir):
    raise MissingCachedRunError(
        f"model.source {CACHE_PREFIX}{name}: the cached model is not trained yet ({run_dir} holds no exported "
        f"model). Train it once with `python -m mat_jax.train --config {path} --workdir {run_dir}`, or "
        f"from Python with mat_jax.training.loop.ensure_cached_run({name!r}); the command lines "
        "(train, evaluate, study, the demo) do this on their own")
  return run_dir


# ----------------------------------------------------------------------------------------------------
# Tokenizers and models.


def resolve_tokenizer(source: str, context_length: int | None = None) -> Tokenizer:
  """A tokenizer by source: "shapes" (the shapes world's word-level tokenizer) or a transformers-layout
  directory / hub id."""
  if source == SHAPES_SOURCE:
    return shapes.tokenizer(context_length=context_length or shapes.DEFAULT_CONTEXT_LENGTH)
  return load_tokenizer(source, context_length=context_length)


def is_run_dir(path: Path) -> bool:
  return (path / checkpoint.CONFIG_FILE).exists() and (
      (path / checkpoint.MODEL_DIR / "config.json").exists() or (path / checkpoint.CHECKPOINTS_DIR).is_dir())


def load_model(source: str, *, dtype: Any = None) -> tuple[CLIP | BLIP, Tokenizer | None]:
  """The model of a source that names trained weights (a cached run, a run directory, a transformers
  directory or hub id; see the module docstring), and the tokenizer stored with it, if any.

  `dtype`: the compute dtype ("auto" allowed); None is a run's own (`restore_model`) and float32 for
  model directories and hub ids."""
  options = {} if dtype is None else {"dtype": dtype}
  name = cached_name(source)
  if name is not None:
    return restore_model(cached_run(name), **options)
  path = Path(source).expanduser()
  if path.is_dir() and is_run_dir(path):
    return restore_model(path, **options)
  if path.is_dir() and _holds_run_config(path):
    # Read as a transformers directory, it would get the advice to write weights with save_pretrained.
    raise checkpoint.NotARunError(f"{path} holds a run config but no {checkpoint.CHECKPOINTS_DIR}/ and no exported "
                                  "model; train it first (python -m mat_jax.train) or pass another run")
  return (load_blip if is_blip(source) else load_clip)(source, dtype=dtype), None


def _holds_run_config(path: Path) -> bool:
  """Whether `path/config.json` is a training run's config (an experiment's sections), not a model's."""
  raw = checkpoint.read_run_config(path)
  return raw is not None and {"model", "train", "objective"} <= set(raw)


def model_from_config(config: ml_collections.ConfigDict) -> tuple[CLIP | BLIP, Tokenizer | None]:
  """The model a run starts from (`config.model.source`, see the module docstring), with the config's
  execution options, and its tokenizer (`config.model.tokenizer` when the source brings none)."""
  source = config.model.source
  context = config.model.context_length or None
  if source in ALL_PRESETS:
    tokenizer = resolve_tokenizer(config.model.tokenizer, context) if config.model.tokenizer else None
    cls = BLIP if source in BLIP_PRESETS else CLIP
    return cls(preset_config(config, tokenizer), rngs=nnx.Rngs(config.seed)), tokenizer
  if config.model.overrides.strip():
    # Loaded weights fix the architecture: an override could only be ignored.
    raise ConfigError(f"model.overrides={config.model.overrides!r} changes a preset's architecture, but "
                      f"model.source={source!r} loads trained weights whose architecture is fixed; drop the "
                      f"overrides, or start from a preset ({', '.join(sorted(ALL_PRESETS))})")
  try:
    model, tokenizer = load_model(source, dtype=resolve_dtype(config.model.dtype))
  except ModelSourceError as err:
    # A mistyped preset reads as a bare hub id: say which preset it is close to.
    near = difflib.get_close_matches(source, list(ALL_PRESETS), n=1)
    if near:
      raise ModelSourceError(f"model.source={source!r} is not a preset (did you mean {near[0]!r}? presets: "
                             f"{', '.join(sorted(ALL_PRESETS))}), and as a model: {err}") from err
    raise
  positions = model.config.text.positions
  if context and context > positions:
    raise ConfigError(f"model.context_length={context} but the text model of {source} has {positions} positions; "
                      f"set model.context_length={positions} or less (0 = the model's)")
  if config.model.tokenizer:  # named in the config: it replaces the one stored with the weights
    tokenizer = resolve_tokenizer(config.model.tokenizer, context or model.config.text.context_length)
  elif tokenizer is None and cached_name(source) is None and not is_run_dir(Path(source).expanduser()):
    # Transformers weights: the tokenizer files are beside them.
    tokenizer = resolve_tokenizer(source, context or model.config.text.context_length)
  elif tokenizer is not None and context and context != tokenizer.context_length:
    tokenizer = tokenizer.with_context_length(context)  # a run's own tokenizer, at the config's length
  if tokenizer is not None:
    # A tokenizer whose end token is not where the tower pools trains on wrongly pooled texts; evaluate
    # refuses it, so without this a whole run would train before its final evaluation said so.
    sample = tokenizer(["a photo"])
    try:
      check_tokens_for(sample.input_ids, sample.attention_mask, tokenizer.end_id, model.config.text,
                       name=f"tokenizer of {config.model.tokenizer or source}")
    except InputError as err:
      raise ConfigError(f"model.source={source!r}: {err}") from None
  return with_options(model, **execution_options(config)), tokenizer


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
    if isinstance(current, (tuple, list)):  # a comma separates overrides, so a sequence cannot be one
      raise ConfigError(f"model.overrides: {key} is a sequence ({current!r}) and cannot be overridden here; "
                        "change it in the model's config.json")
    value = value.strip()
    changes[section][field] = config_lib.parse_scalar(value, current, f"model.overrides: {key}={value!r}")
  try:
    vision = dataclasses.replace(base.vision, **changes["vision"])
    text_cfg = dataclasses.replace(base.text, **changes["text"])
    cfg = dataclasses.replace(base, vision=vision, text=text_cfg, **changes[""])
  except ValueError as err:  # a field's own check (e.g. an unknown text.pooling)
    raise ConfigError(f"model.overrides={text!r}: {err}") from None
  problems = _architecture_problems(cfg)
  if problems:
    raise ConfigError(f"model.overrides={text!r} makes a model that cannot be built: {'; '.join(problems)}")
  return cfg


def _architecture_problems(cfg: Any) -> list[str]:
  """What makes a (CLIP or BLIP) config unbuildable: sizes below 1, token ids outside the vocabulary, a
  width its heads do not divide, a patch larger than the image, an unknown activation, non-finite floats."""
  problems = []
  for prefix, part in (("", cfg), ("vision.", cfg.vision), ("text.", cfg.text)):
    vocab = getattr(part, "vocab_size", None)
    for f in dataclasses.fields(part):
      value, name = getattr(part, f.name), prefix + f.name
      if isinstance(value, bool) or f.name in ("vision", "text"):
        continue
      if isinstance(value, int) and f.name.endswith("_token_id"):
        if vocab is not None and not 0 <= value < vocab:
          problems.append(f"{name}={value} is not an id of the {vocab}-word vocabulary")
      elif f.name == "context_length" and value < 3:
        problems.append(f"{name}={value} must be at least 3 (start, one word, end)")
      elif isinstance(value, int) and value < 1:
        problems.append(f"{name}={value} must be at least 1")
      elif isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{name}={value} must be finite")
      elif f.name == "layer_norm_eps" and value <= 0:
        problems.append(f"{name}={value} must be > 0")
      elif f.name == "activation" and value not in layers.ACTIVATIONS:
        problems.append(f"{name}={value!r} is not one of {sorted(layers.ACTIVATIONS)}")
    width, heads = getattr(part, "width", None), getattr(part, "heads", None)
    if width and heads and heads >= 1 and width % heads:
      problems.append(f"{prefix}width {width} is not divisible by {prefix}heads {heads}")
  if cfg.vision.patch_size > cfg.vision.image_size >= 1:
    problems.append(f"vision.patch_size {cfg.vision.patch_size} is larger than vision.image_size "
                    f"{cfg.vision.image_size}")
  return problems


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


def execution_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The CLIPConfig fields that say how a model is computed (not what it computes), from a run config."""
  return {"dtype": resolve_dtype(config.model.dtype), "scan_layers": bool(config.model.scan_layers),
          "attention": config.model.attention, "remat": config.model.remat}


def supported_options(config_type: type, options: dict[str, Any]) -> dict[str, Any]:
  """The execution options a model's config type has (BLIP has a dtype but no scan_layers or attention
  choice); asking for a non-default option the model lacks is an error, not silently ignored."""
  fields = {f.name for f in dataclasses.fields(config_type)}
  missing = sorted(k for k, v in options.items() if k not in fields and v not in (False, "auto", "none", None))
  if missing:
    raise ConfigError(f"{config_type.__name__} models have no {', '.join(missing)} option; leave "
                      f"{', '.join('model.' + k for k in missing)} at its default for this model")
  return {k: v for k, v in options.items() if k in fields}


def with_options(model: CLIP | BLIP, **changes: Any) -> CLIP | BLIP:
  """The same parameters under other execution options (compute dtype, "auto" resolved on this platform,
  scan_layers, attention, remat)."""
  if "dtype" in changes:
    changes["dtype"] = resolve_dtype(changes["dtype"])
  changes = supported_options(type(model.config), changes)
  if all(getattr(model.config, name) == value for name, value in changes.items()):
    return model
  _, params = split(model)
  abstract = nnx.eval_shape(lambda: type(model)(model.config.replace(**changes), rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, params)


# ----------------------------------------------------------------------------------------------------
# Run directories: export and restore.


def export_model(model: Any, tokenizer: Any, workdir: str | os.PathLike) -> Path:
  """Write the model in the transformers layout (config.json + model.safetensors) and the tokenizer
  files beside it, so that `load_clip` / transformers' `CLIPModel.from_pretrained` read it (`load_blip` /
  `BlipForImageTextRetrieval` for a BLIP)."""
  directory = Path(workdir) / checkpoint.MODEL_DIR
  # Written beside, then renamed into place: `model/config.json` is what marks a run as trained
  # (`is_trained`), so a kill part-way must not leave a model without its weights or its tokenizer.
  partial, replaced = directory.with_name(directory.name + ".partial"), directory.with_name(directory.name + ".old")
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  config = model[0].config if isinstance(model, tuple) else model.config
  (save_blip if isinstance(config, BlipConfig) else save_clip)(model, partial)
  if tokenizer is not None:
    tokenizer.save_pretrained(partial)
  if directory.exists():
    shutil.rmtree(replaced, ignore_errors=True)
    os.replace(directory, replaced)
  os.replace(partial, directory)
  shutil.rmtree(replaced, ignore_errors=True)
  return directory


def restore_model(workdir: str | os.PathLike, **options: Any) -> tuple[Any, Any]:
  """(model, tokenizer) of a run: its exported model, else the parameters of its newest checkpoint.

  The model computes as the run trained (its config's `model.dtype`, `scan_layers`, `attention`, `remat`;
  "auto" resolved on this platform: bfloat16 on GPU/TPU), whichever of the two it is read from;
  `options` replace any of them (`execution_options`' names; dtype "auto" allowed). The tokenizer is
  None for runs without one (synthetic data).
  """
  workdir = Path(workdir)
  model, tokenizer = _restore_model(workdir)
  return with_options(model, **{**run_execution_options(workdir), **options}), tokenizer


def run_execution_options(workdir: str | os.PathLike) -> dict[str, Any]:
  """How a run's model computes, from its config's model section (`execution_options`); {} for a model
  directory without a run config (the loaders' float32 defaults then apply)."""
  raw = checkpoint.read_run_config(workdir)
  model = raw.get("model") if raw is not None else None
  if not isinstance(model, dict):
    return {}
  config = config_lib.defaults()
  for key in config_lib.EXECUTION_OPTIONS:
    if key in model:
      config.model[key] = model[key]
  return execution_options(config)


def _restore_model(workdir: Path) -> tuple[Any, Any]:
  exported = workdir / checkpoint.MODEL_DIR
  if (exported / "config.json").exists():
    weights = (exported / weights_lib.SAFETENSORS_FILE, exported / weights_lib.SAFETENSORS_INDEX)
    if (workdir / checkpoint.CONFIG_FILE).exists() and not any(w.exists() for w in weights):
      # A run's own export, not a model from elsewhere: its advice is the run's, not save_pretrained's.
      raise ModelSourceError(f"{exported} holds no weights ({weights_lib.SAFETENSORS_FILE}): the run's export is "
                             f"incomplete. Rerun its training command with --workdir {workdir} to export it again "
                             f"from its last checkpoint, or remove {exported} to use its newest checkpoint")
    model = (load_blip if is_blip(exported) else load_clip)(exported)
    tokenizer = None
    if (exported / "tokenizer.json").exists() or (exported / "vocab.json").exists():
      # The length the run tokenised at: model.context_length cuts captions shorter than the model's texts.
      context = _run_context_length(workdir) or model.config.text.context_length
      tokenizer = load_tokenizer(exported, context_length=context)
    return model, tokenizer
  path = workdir / checkpoint.CONFIG_FILE
  if not path.exists():
    raise checkpoint.NotARunError(f"{workdir} is not a mat_jax run directory: it has neither "
                                  f"{checkpoint.MODEL_DIR}/ (the exported model) nor {checkpoint.CONFIG_FILE}; "
                                  "pass the --workdir of a training run")
  raw = checkpoint.read_run_config(workdir, required=True)
  return restore_checkpointed_model(config_lib.build(raw, origin=str(path)), workdir)


def _run_context_length(workdir: Path) -> int:
  """The run's model.context_length (0: the model's own, or not a run's export)."""
  try:
    context = checkpoint.read_run_config(workdir)["model"].get("context_length", 0)
  except (TypeError, KeyError, AttributeError):  # no run config (a model directory), or not a run's
    return 0
  return context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else 0


def set_aside_export(workdir: str | os.PathLike) -> Path | None:
  """Move a run's export out of `model/` when the run trains on past it (resumed with more steps): until
  the run finishes and exports again, the run's model is its newest checkpoint, which evaluation then
  reads, with its note. The export is kept, as `superseded_models/N`."""
  exported = Path(workdir) / checkpoint.MODEL_DIR
  if not exported.is_dir():
    return None
  kept = Path(workdir) / checkpoint.SUPERSEDED_DIR
  kept.mkdir(exist_ok=True)
  target = kept / str(1 + max((int(p.name) for p in kept.iterdir() if p.name.isdigit()), default=0))
  os.replace(exported, target)
  return target


def restore_checkpointed_model(config: ml_collections.ConfigDict, workdir: Path) -> tuple[CLIP | BLIP, Any]:
  """The model of a run's newest intact checkpoint (on the current devices, replicated).

  The restore target is the train state's abstract structure (shapes only: no optimizer state is
  allocated); only its parameters are kept."""
  config = _with_changes(config, {"mesh": {"shape": "1", "param_sharding": "replicated"}})
  model, tokenizer = model_from_config(config)
  encoder, params = split(model)
  mesh = mesh_lib.make_mesh("1")
  tx = optim.make_optimizer(config.optimizer, optim.make_schedule(config.schedule, config.optimizer.learning_rate,
                                                                   config.train.steps))
  is_trainable = step_lib.trainable_filter(config.train.towers, config.train.train_logit_scale)
  shardings = step_lib.state_shardings(params, tx, is_trainable, mesh, "replicated", config.mesh.logical_rules)
  fingerprint = run_fingerprint(config, model.config, tokenizer)
  with checkpoint.Checkpointer(workdir, fingerprint, reader=True, added_keys=config_lib.ADDED_FINGERPRINT_KEYS) as ckpt:
    state0 = jax.eval_shape(lambda p: step_lib.init_state(p, tx, is_trainable, config.seed), params)
    # A damaged newest checkpoint is skipped (said on stderr), not moved: the run is not this reader's.
    state, step = ckpt.restore_newest_intact(checkpoint.abstract_like(state0, shardings), set_aside=False,
                                             log=lambda line: print(line, file=sys.stderr))
  if state is None:
    raise checkpoint.NotARunError(f"{workdir} holds a run config but no readable checkpoint and no exported "
                                  "model; train it first (python -m mat_jax.train) or pass another run")
  # A finished run exports its model (unless train.export is off): what is read here may be an
  # intermediate model, whose results must not pass for the run's.
  print(f"note: {workdir} has no exported model (unfinished, stopped before its export, or trained with "
        f"train.export=false): using its checkpoint at step {step} of {config.train.steps}", file=sys.stderr)
  return encoder.merge(state.params), tokenizer


def _with_changes(config: ml_collections.ConfigDict, changes: dict) -> ml_collections.ConfigDict:
  raw = config.to_dict()
  for section, values in changes.items():
    raw[section].update(values)
  return config_lib.build(raw)
