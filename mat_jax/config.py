"""Experiment files: loading, defaults, validation and `--config.key=value` overrides.

An experiment is a Python file with `get_config(arg=None)` returning an `ml_collections.ConfigDict`
(or a dict), as in big_vision: `python -m mat_jax.train --config experiments/shapes_mat.py:runlocal`
passes "runlocal" as `arg`. The file reads it with `mat_jax.recipes.parse_arg` (typed keys, unknown ones
refused); an argument that a file comparing `arg` by hand ignores is refused as a typo. A file sets only
what differs from `defaults()`; loading fills in the rest, then checks every key and type:

- a key that does not exist (in the file or in an override) is an error that lists the valid keys of
  that section and the closest match;
- a value of the wrong type is an error naming the key, the expected type and the value;
- the objective's hyper-parameters (`config.objective.*`) are checked against the fields of the
  objective named by `config.objective.name` (see `mat_jax.objectives`), and their values against the
  range where they can work (e.g. `neighbours >= 1`, `step_size > 0`);
- `eval.attacks` and an adversarial objective's `objective.attack` (its inner attack) must name attacks
  of the registry `mat_jax.attacks.spec.ATTACKS` (the same names for both), and `data.augmentations`
  known augmentations, so that a typo fails before training rather than at the first evaluation;
- `schedule.name` must be a built-in schedule or an Optax schedule constructor (`optax.exponential_decay`),
  whose keyword arguments `schedule.kwargs` holds: keys it does not take fail naming its parameters
  (`mat_jax.training.optim`), and the schedule must give a finite, non-negative rate at every step.

`train.towers="default"` (the default) becomes the objective's published towers
(`Objective.default_towers`: vision for tecoa, fare and mava, all for the others) at load time, so the
resolved value is what the fingerprint, the log and the run's config.json show.

Overrides are `key.path=value` strings; the value is parsed by the type of the existing field
(`true/false`, ints, floats including fractions such as `2/255`, strings, tuples as `a,b`, `(a, b)`
or `(1, 2)`: bare words are strings).
`schedule.kwargs.KEY=value` may also add a key the file's kwargs lack (read by the type of the constructor's
default for it, else as a Python literal). Overrides of `*.name` fields are applied first, so
`--config.objective.name=tecoa` switches the objective before its other keys are overridden: the file's values
of the keys both objectives have (eps, steps, step_size) are kept, those TeCoA lacks are dropped, and its
other keys take TeCoA's defaults; likewise `schedule.name` keeps the file's kwargs the new schedule takes.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import traceback
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mat_jax import checks, objectives
from mat_jax.attacks import spec as attack_specs  # the attack registry: training's and evaluation's names
from mat_jax.attacks.candidates import SOURCES
from mat_jax.data import pipeline, shapes
from mat_jax.errors import INT32_MAX, ConfigError, InputError
from mat_jax.models import layers
from mat_jax.training import optim

ANY = object()  # schema marker: any value accepted
# The model keys that say how a model is computed, not what it computes: a checkpoint resumes under any
# of their values (a cached run's key keeps them: another rounding trains other digits).
EXECUTION_OPTIONS = ("dtype", "scan_layers", "attention", "remat")
DEFAULT_TOWERS = "default"  # train.towers: the objective's published towers, resolved at load


def defaults() -> ml_collections.ConfigDict:
  """Every key an experiment may set, with its default (and so its type)."""
  c = ml_collections.ConfigDict()
  c.name = ""                      # experiment name, used for logs and the default workdir
  c.seed = 0                       # parameter init, data order and attack randomness all derive from it

  c.model = ml_collections.ConfigDict()
  c.model.source = "tiny"          # a preset (random init), a transformers dir / hub id, a mat_jax
                                   # workdir, or "cache:shapes_clip" (the demo's clean tiny CLIP)
  c.model.tokenizer = ""           # "" = beside the model; "shapes" = the shapes-world tokenizer
  c.model.overrides = ""           # preset changes for random init: "vision.layers=2,text.width=64"
  c.model.context_length = 0       # 0 = the model's
  c.model.dtype = "auto"           # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 |
                                   # bfloat16; parameters, optimizer state and losses stay float32
  c.model.scan_layers = False      # encoder blocks as one lax.scan: faster compiles, same numbers
  c.model.attention = "auto"       # auto | einsum | xla | cudnn (mat_jax.models.layers.ATTENTION_PATHS)
  c.model.remat = "none"           # what the backward pass keeps of each encoder block: none (all) |
                                   # nothing_saveable | dots_with_no_batch_dims_saveable | dots_saveable
                                   # (less activation memory, more compute; same numbers)

  c.data = ml_collections.ConfigDict()
  c.data.name = "shapes"           # TFDS dataset name built by `python -m mat_jax.data build`
  c.data.data_dir = ""             # "" = $MAT_JAX_DATA_DIR or ~/.cache/mat_jax/datasets
  c.data.split = "train"
  c.data.captions_per_image = 1    # k > 1: k captions per image (one-to-many objectives)
  c.data.augmentations = ()        # names understood by mat_jax.data.pipeline (i2t, t2i, eda, hflip, ...)
  c.data.renderings_per_scene = 1  # R > 1: R renderings of each scene in a batch, positives of its captions
  c.data.worker_count = -1         # Grain worker processes: -1 = auto (0 on a CPU backend), 0 = main process
  c.data.decoded_cache_mb = 1024   # decoded training records kept per process after their first read; 0 = none
  c.data.build_train = shapes.BUILD_TRAIN  # sizes used when the shapes world must be built
  c.data.build_val = 1000
  c.data.build_test = 1000
  c.data.build_rare_form_rate = -1.0  # the shapes world's captions: < 0 every surface form equally likely (the
                                      # default world); r in [0, 1] each word's canonical form except with
                                      # probability r (0: the held-out-forms world, docs/text_threat.md)
  c.data.image_size = shapes.BUILD_IMAGE_SIZE  # the tiny preset's input size

  c.text_attack = ml_collections.ConfigDict()
  c.text_attack.source = "bert"    # bert (BERT-Attack: MLM proposals) | paraphrase (shapes synonyms) | charedit
  c.text_attack.bert = "shapes-mlm"  # MLM of the bert source: "shapes-mlm" (the shapes world's, cached) or a
                                     # transformers-layout dir / hub id such as bert-base-uncased
  c.text_attack.top_k = 10
  c.text_attack.max_words = 0      # words of a caption considered (fixed shape); 0 = all that fit
  c.text_attack.max_pieces = 4     # pieces per word / substitute (fixed shape)
  c.text_attack.max_targets = 12   # attackable words per caption (fixed shape; the first ones kept)
  c.text_attack.exclude_words = ()  # words the training attack may not write (its evaluation threat is unchanged)

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "contrastive"  # + the fields of that objective (mat_jax.objectives)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64          # global batch (images), split over all devices
  c.train.steps = 1000
  c.train.towers = DEFAULT_TOWERS  # which towers train: all | vision | text | default (the objective's)
  c.train.train_logit_scale = True  # with towers=all only
  c.train.log_every = 20           # host reads metrics (and checks for NaN) every N steps
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  c.train.eval_every = 0           # 0 = evaluate at the end only
  c.train.export = True            # write the final model in the transformers layout (workdir/model)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"       # adamw | adam | sgd
  c.optimizer.learning_rate = 1e-3  # peak learning rate of the schedule
  c.optimizer.weight_decay = 0.0   # decoupled (adamw) or L2 added to the gradient (sgd, adam)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.momentum = 0.9       # sgd
  c.optimizer.nesterov = False     # sgd
  c.optimizer.grad_clip_norm = 0.0  # 0 = no clipping

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"       # constant | cosine | linear (decay) | optax.NAME, each after warmup_steps
  c.schedule.warmup_steps = 0
  c.schedule.end_factor = 0.0      # final learning rate / peak (cosine, linear)
  c.schedule.kwargs = ml_collections.ConfigDict()  # keyword arguments of an optax.NAME schedule

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.max_images = 200          # 0 = the whole split
  c.eval.batch_size = 100
  c.eval.attacks = ("pgd",)        # periodic evaluation: clean + these (cheap) attacks
  c.eval.eps = 2 / 255
  c.eval.steps = 10

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ""                # "" = all devices on data; "8"; "data=4,fsdp=2" (--mesh overrides)
  c.mesh.param_sharding = "replicated"  # replicated | fsdp | logical
  c.mesh.logical_rules = "embed=fsdp"   # used by param_sharding=logical
  return c


# ----------------------------------------------------------------------------------------------------
# Loading.


def load(path: str | os.PathLike, overrides: Sequence[str] = (), arg: str | None = None
         ) -> ml_collections.ConfigDict:
  """Load an experiment file (`path` or `path:arg`), fill defaults, apply overrides, validate."""
  path, arg = _split_arg(str(path), arg)
  return build(read_experiment_file(Path(path), arg), overrides, origin=str(path))


def _section_name(raw: dict, section: str) -> Any:
  """The `name` a raw config gives a section, or None; a section that is not a mapping is left for
  `_merge` to refuse with its one-line error."""
  value = raw.get(section)
  return value.get("name") if isinstance(value, dict) else None


def build(raw: Mapping[str, Any] | ml_collections.ConfigDict, overrides: Sequence[str] = (),
          origin: str = "config") -> ml_collections.ConfigDict:
  """Defaults + `raw` + overrides -> a validated, locked ConfigDict."""
  raw = _to_dict(raw)
  parsed = [_parse_override(o) for o in overrides]
  # `*.name` first: the objective's name decides which of its keys are valid.
  base = defaults().to_dict()
  file_objective = _section_name(raw, "objective")
  file_schedule = _section_name(raw, "schedule")
  for key, value in parsed:
    if key.endswith(".name"):
      _override_target(base, key)  # a typo in the key is the override's, not the file's
      _set_raw(raw, key, value)
  renamed = _section_name(raw, "objective") != file_objective
  if renamed and isinstance(raw.get("objective"), dict):
    # The file's inner attack was its objective's choice: the new objective trains against its own
    # published attack unless an override names one (applied below).
    raw["objective"] = {k: v for k, v in raw["objective"].items() if k != "attack"}
  config = _merge(base, raw, origin)
  # A file's hyper-parameters of another objective are dropped when the name is overridden (switching
  # shapes_mat.py to tecoa keeps eps/steps/step_size, drops text_changes); typos elsewhere still fail.
  config["objective"] = _objective_section(config["objective"], "override" if renamed else origin,
                                           keep_known_only=renamed)
  if _section_name(raw, "schedule") != file_schedule:
    # Likewise a schedule switched by an override keeps the file's kwargs the new one takes (none for a built-in).
    schedule = config["schedule"]
    takes = optim.schedule_parameters(schedule["name"])
    schedule["kwargs"] = {k: v for k, v in schedule["kwargs"].items() if k in takes}
  for key, value in parsed:
    if not key.endswith(".name"):
      _override(config, key, value)
  if config["train"]["towers"] == DEFAULT_TOWERS:
    config["train"]["towers"] = _objective_class(config["objective"]["name"], origin).default_towers
  _check_values(config)
  out = ml_collections.ConfigDict(config)
  out.lock()
  return out


def _split_arg(path: str, arg: str | None) -> tuple[str, str | None]:
  """"FILE.py:ARG" -> (FILE.py, ARG), split after the ".py" (an argument may hold colons itself:
  source=cache:shapes_clip)."""
  if arg is None and ":" in path and not Path(path).exists():
    at = path.find(".py:")
    path, arg = (path[:at + 3], path[at + 4:]) if at >= 0 else path.rsplit(":", 1)
  return path, arg


def read_experiment_file(path: Path, arg: str | None) -> dict:
  """What the experiment (or study) file's `get_config(arg)` returns, as a plain dict: no defaults, no
  validation. ConfigError for a missing file, one that fails to import, or an argument it ignores."""
  return _to_dict(_call_get_config(path, arg))


def _call_get_config(path: Path, arg: str | None) -> Any:
  if not path.exists():
    here = Path(__file__).resolve().parents[1] / "experiments"
    known = sorted(p.name for p in here.glob("*.py")) if here.exists() else []
    raise ConfigError(f"experiment file {path} not found; experiments in {here}: {known}")
  spec = importlib.util.spec_from_file_location(f"mat_jax_experiment_{path.stem}", path)
  if spec is None or path.is_dir():  # e.g. a run's config.json
    raise ConfigError(f"{path} is not an experiment file: --config takes a Python file with a "
                      "get_config(arg=None) function, e.g. experiments/shapes_mat.py")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{e.filename or path}:{e.lineno}: syntax error in the experiment file: {e.msg}") from None
  except Exception as e:  # noqa: BLE001  the experiment file's own code failed on import: name where
    raise ConfigError(f"{_where(e, path)}: the experiment file failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg=None) function")
  config = _run_get_config(module, path, arg)
  if (arg is not None and not _parses_its_argument(path)
      and _to_dict(config) == _to_dict(_run_get_config(module, path, None))):
    # get_config ignored the argument (a typo such as runlcal would otherwise start the full run). A file
    # reading its argument with recipes.parse_arg refuses unknown ones itself, and `:mat` naming the
    # default is no typo.
    known = _compared_strings(path)
    close = difflib.get_close_matches(arg, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listed = f" Arguments the file tests for: {', '.join(known)}." if known else ""
    raise ConfigError(f"{path}:{arg}: the argument {arg!r} changes nothing (get_config ignores it).{hint}{listed}")
  return config


def _run_get_config(module: Any, path: Path, arg: str | None) -> Any:
  if arg is not None and not _takes_one_argument(module.get_config):
    raise ConfigError(f"{path}: get_config takes no argument, but {arg!r} was given after ':'")
  call = f"get_config({'' if arg is None else repr(arg)})"
  try:
    return module.get_config(arg) if arg is not None else module.get_config()
  except ConfigError as e:  # recipes.parse_arg or a recipe refused a value: its message names the fix
    raise ConfigError(f"{_where(e, path)}: {call}: {e}") from None
  except Exception as e:  # noqa: BLE001  e.g. a ValueError for an unknown defense: the file's message
    raise ConfigError(f"{_where(e, path)}: {call} failed: {type(e).__name__}: {e}") from None


def _takes_one_argument(fn: Any) -> bool:
  try:
    inspect.signature(fn).bind("arg")
  except TypeError:
    return False
  except ValueError:  # no signature to read (a builtin): let the call decide
    pass
  return True


def _parses_its_argument(path: Path) -> bool:
  """Whether the experiment file calls `parse_arg` (mat_jax.recipes), which refuses unknown arguments."""
  try:
    tree = ast.parse(path.read_text())
  except (OSError, SyntaxError):
    return False
  return any(isinstance(node, ast.Call) and (getattr(node.func, "id", None) == "parse_arg"
                                             or getattr(node.func, "attr", None) == "parse_arg")
             for node in ast.walk(tree))


def _where(err: BaseException, path: Path) -> str:
  """file:line of the innermost frame of `err` in the experiment file (or a file it imports)."""
  frames = traceback.extract_tb(err.__traceback__)
  resolved = str(path.resolve())
  mine = [f for f in frames if str(Path(f.filename).resolve()) == resolved] or frames[-1:]
  return f"{mine[-1].filename}:{mine[-1].lineno}" if mine else str(path)


def _compared_strings(path: Path) -> list[str]:
  """String constants the experiment file compares with (`arg == "runlocal"`, `"x" in parts`): the
  arguments it understands, for a did-you-mean hint."""
  try:
    tree = ast.parse(path.read_text())
  except (OSError, SyntaxError):
    return []
  found = {node.value for compare in ast.walk(tree) if isinstance(compare, ast.Compare)
           for node in [compare.left, *compare.comparators]
           if isinstance(node, ast.Constant) and isinstance(node.value, str)}
  return sorted(found)


def _to_dict(raw: Any) -> dict:
  if isinstance(raw, ml_collections.ConfigDict):
    return raw.to_dict()
  if isinstance(raw, Mapping):
    return {k: _to_dict(v) if isinstance(v, (Mapping, ml_collections.ConfigDict)) else v
            for k, v in raw.items()}
  raise ConfigError(f"get_config must return a ConfigDict or a dict, got {type(raw).__name__}")


# ----------------------------------------------------------------------------------------------------
# Validation.


def _unknown_key(key: str, section: str, valid: Iterable[str], origin: str) -> ConfigError:
  valid = sorted(valid)
  close = difflib.get_close_matches(key, valid, n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  where = f"{section}.{key}" if section else key
  return ConfigError(f"{origin}: unknown config key {where!r}.{hint} Valid keys"
                     f"{' of ' + section if section else ''}: {', '.join(valid)}")


# Sections whose keys are another object's parameters, checked against it after merging: the objective's
# fields, and the keyword arguments of an optax.NAME schedule.
_OPEN_SECTIONS = ("objective", "schedule.kwargs")


def _merge(schema: dict, raw: dict, origin: str, section: str = "") -> dict:
  out = dict(schema)
  for key, value in raw.items():
    if section in _OPEN_SECTIONS:
      out[key] = value
      continue
    if key not in schema:
      raise _unknown_key(key, section, schema, origin)
    name = f"{section}.{key}" if section else key
    if isinstance(schema[key], dict):
      if not isinstance(value, Mapping):
        raise ConfigError(f"{origin}: {name} must be a section (ConfigDict), got {value!r}")
      out[key] = _merge(schema[key], dict(value), origin, name)
    else:
      out[key] = _coerce(name, schema[key], value, origin)
  return out


def _coerce(name: str, default: Any, value: Any, origin: str) -> Any:
  """Check `value` against the type of `default`; ints are accepted for floats, lists for tuples."""
  if default is ANY or default is None:
    return value
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif isinstance(default, tuple):
    ok = isinstance(value, (tuple, list))
    value = tuple(value) if ok else value
  else:
    ok = isinstance(value, type(default))
  if not ok:
    raise ConfigError(f"{origin}: {name} must be {type(default).__name__}, got {value!r} "
                      f"({type(value).__name__})")
  return value


def _objective_class(name: Any, origin: str) -> type:

  if name not in objectives.OBJECTIVES:
    close = difflib.get_close_matches(str(name), list(objectives.OBJECTIVES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{origin}: unknown objective.name {name!r}.{hint} Available: "
                      f"{', '.join(sorted(objectives.OBJECTIVES))}")
  return objectives.OBJECTIVES[name]


def _objective_section(section: dict, origin: str, keep_known_only: bool = False) -> dict:

  name = section.get("name", "contrastive")
  cls = _objective_class(name, origin)
  fields = objectives.hyperparameters(cls)
  out = {"name": name}
  out.update(fields)
  for key, value in section.items():
    if key == "name":
      continue
    if key not in fields:
      if keep_known_only:
        continue
      raise _unknown_key(key, f"objective ({name})", ["name", *fields], origin)
    out[key] = _coerce(f"objective.{key}", fields[key], value, origin)
  return out


# The shapes world's synonym source was called "lexicon"; the name hid that it never changes meaning.
RENAMED_LEXICON = ("text_attack.source='lexicon' was renamed: use 'paraphrase' for the shapes world's synonym "
                   "substitutions (a meaning-preserving control), or 'bert' with text_attack.bert='shapes-mlm' "
                   "for BERT-Attack's masked-LM threat (the default)")

_CHOICES = {
    ("train", "towers"): ("all", "vision", "text"),
    ("optimizer", "name"): ("adamw", "adam", "sgd"),
    ("mesh", "param_sharding"): ("replicated", "fsdp", "logical"),
    ("model", "dtype"): ("auto", "float32", "bfloat16"),
    ("model", "attention"): layers.ATTENTION_PATHS,
    ("model", "remat"): layers.REMAT_POLICIES,
    ("text_attack", "source"): SOURCES,
}


_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_FINITE = ">= 0 and finite in float32 (at most 3.4e38)"
# An L-inf budget in pixel units, as the attacks take it (`checks.check_eps`): 2/255, not 2.
_LINF_EPS = f"in [0, {checks.MAX_LINF_EPS_255}/255] (an L-inf budget in pixel units, e.g. 2/255)"
# Where a value outside cannot work (no PGD step, a mean over zero neighbours, a loss weight that
# rewards the attack): (allowed range, test). Objective fields by name, shared by the objectives having it;
# any field named *_weight is a loss weight (`_objective_range`).
_LOSS_WEIGHT = (f"{_FLOAT32_FINITE} (a loss weight)", lambda v: 0 <= v <= _FLOAT32_MAX)
_OBJECTIVE_RANGES = {
    "eps": (_LINF_EPS, lambda v: 0 <= v <= checks.MAX_LINF_EPS),
    "steps": (">= 1", lambda v: v >= 1),
    "step_size": ("> 0", lambda v: v > 0),
    "text_changes": (">= 1", lambda v: v >= 1),
    "neighbours": (">= 1", lambda v: v >= 1),
    "beta": (_FLOAT32_FINITE, lambda v: 0 <= v <= _FLOAT32_MAX),
    **{weight: _LOSS_WEIGHT for weight in ("a", "b", "c")},  # MAVA's, named as in its paper
}


def _objective_range(key: str) -> tuple[str, Any] | None:
  return _OBJECTIVE_RANGES.get(key) or (_LOSS_WEIGHT if key.endswith("_weight") else None)


_RANGES = {
    ("eval", "max_images"): (">= 0 (0 = the whole split)", lambda v: v >= 0),
    ("eval", "batch_size"): (">= 1", lambda v: v >= 1),
    ("eval", "eps"): (_LINF_EPS, lambda v: 0 <= v <= checks.MAX_LINF_EPS),
    ("eval", "steps"): (">= 1", lambda v: v >= 1),
    # Finite in float32, the dtype the update is computed in (1e39 would be inf there).
    ("optimizer", "learning_rate"): (_FLOAT32_FINITE, lambda v: 0 <= v <= _FLOAT32_MAX),
    ("optimizer", "weight_decay"): (_FLOAT32_FINITE, lambda v: 0 <= v <= _FLOAT32_MAX),
    ("optimizer", "b1"): ("in [0, 1)", lambda v: 0 <= v < 1),
    ("optimizer", "b2"): ("in [0, 1)", lambda v: 0 <= v < 1),
    # Adam divides by sqrt(v) + eps: with eps 0 a parameter whose gradients are all zero gets 0/0 = NaN.
    ("optimizer", "eps"): ("> 0", lambda v: v > 0),
    ("optimizer", "momentum"): ("in [0, 1)", lambda v: 0 <= v < 1),
    ("optimizer", "grad_clip_norm"): (">= 0 (0 = no clipping)", lambda v: v >= 0),
    ("schedule", "warmup_steps"): (">= 0", lambda v: v >= 0),
    ("schedule", "end_factor"): (">= 0 and finite", lambda v: 0 <= v < math.inf),
    ("model", "context_length"): ("0 (the model's) or >= 3 (start, one word, end)", lambda v: v == 0 or v >= 3),
    ("text_attack", "top_k"): (">= 1", lambda v: v >= 1),
    ("text_attack", "max_pieces"): (">= 1", lambda v: v >= 1),
    ("text_attack", "max_targets"): (">= 1", lambda v: v >= 1),
    ("text_attack", "max_words"): (">= 0 (0 = all that fit)", lambda v: v >= 0),
}


def _integers(tree: dict, prefix: str = "") -> Iterator[tuple[str, int]]:
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _integers(value, f"{prefix}{key}.")
    elif isinstance(value, int) and not isinstance(value, bool):
      yield f"{prefix}{key}", value


def _check_values(config: dict) -> None:
  if config["text_attack"]["source"] == "lexicon":
    raise ConfigError(RENAMED_LEXICON)
  # Counts, sizes and the seed reach jitted programs as int32: a larger one would overflow there, after
  # the data is built and the model compiled.
  for key, value in _integers(config):
    if abs(value) > INT32_MAX:
      raise ConfigError(f"{key}={value} does not fit a 32-bit integer (at most {INT32_MAX:,})")
  if config["seed"] < 0:
    raise ConfigError(f"seed={config['seed']} must be >= 0")
  for (section, key), choices in _CHOICES.items():
    if config[section][key] not in choices:
      also = f" (or {DEFAULT_TOWERS!r}: the objective's)" if key == "towers" else ""
      raise ConfigError(f"{section}.{key}={config[section][key]!r} is not one of {choices}{also}")
  objective = config["objective"]
  for key, value in objective.items():
    allowed = _objective_range(key)
    if allowed is not None and not allowed[1](value):
      raise ConfigError(f"objective.{key}={value!r} ({objective['name']}) must be {allowed[0]}")
  for (section, key), (allowed, ok) in _RANGES.items():
    if not ok(config[section][key]):
      raise ConfigError(f"{section}.{key}={config[section][key]!r} must be {allowed}")
  try:
    attack_specs.check_names(config["eval"]["attacks"], "eval.attacks")
    if "attack" in objective:
      attack_specs.check_names([objective["attack"]], f"objective.attack ({objective['name']})")
      # The objective's budget on its attack: a range error names the objective's keys, not the spec's.
      made = objectives.make(objective)
      if not (made.inner_attack().attacks_image or made.reads_adversarial_text):
        images = [n for n in attack_specs.NAMES if attack_specs.get(n).attacks_image]
        raise ConfigError(f"objective.attack={objective['attack']!r} changes captions only, and {objective['name']}'s "
                          "loss reads the adversarial images only: it would train on clean inputs. Choose an "
                          f"attack of the images: {', '.join(images)}")
  except InputError as err:  # an unknown name (listing the registry) or a budget the attack cannot take
    raise ConfigError(str(err)) from None
  # Refused here, not by the evaluation after the training it follows.
  contrastive = [a for a in config["eval"]["attacks"] if a in attack_specs.BATCH_CONTRASTIVE]
  evaluated = config["eval"]["batch_size"] if not config["eval"]["max_images"] else min(
      config["eval"]["batch_size"], config["eval"]["max_images"])
  if contrastive and evaluated < 2:
    raise ConfigError(f"eval.attacks {contrastive} ascend a contrastive loss whose negatives are the other captions "
                      f"of the image's batch; eval.batch_size={config['eval']['batch_size']} and eval.max_images="
                      f"{config['eval']['max_images']} leave one image per batch and none attacked: set both to at "
                      "least 2 (max_images 0: the whole split)")
  try:
    pipeline.check_layout(pipeline.parse_augmentations(tuple(config["data"]["augmentations"])),
                          config["data"]["captions_per_image"], config["data"]["renderings_per_scene"])
  except ValueError as err:
    raise ConfigError(f"data.augmentations: {err}") from None
  train = config["train"]
  for key in ("batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    if train[key] < 1:
      raise ConfigError(f"train.{key} must be at least 1, got {train[key]}")
  if train["eval_every"] < 0:
    raise ConfigError(f"train.eval_every={train['eval_every']}: use 0 (evaluate at the end only) or a number "
                      "of steps between evaluations")
  if config["data"]["captions_per_image"] < 1:
    raise ConfigError("data.captions_per_image must be at least 1")
  excluded = config["text_attack"]["exclude_words"]
  if not all(isinstance(w, str) and w.split() == [w] for w in excluded):
    raise ConfigError(f"text_attack.exclude_words={excluded!r} must list single words, e.g. crimson,box")
  rate = config["data"]["build_rare_form_rate"]
  if not (rate < 0 or 0 <= rate <= 1):  # NaN fails both
    raise ConfigError(f"data.build_rare_form_rate={rate}: use a probability in [0, 1], or -1 for the default "
                      "world (every surface form equally likely)")
  if rate >= 0 and config["data"]["name"] != "shapes":
    raise ConfigError(f"data.build_rare_form_rate={rate} picks the shapes world's lexicon, but data.name is "
                      f"{config['data']['name']!r}; leave it at -1 for a built corpus")
  if config["data"]["name"] == "shapes":
    _check_shapes_sizes(config)
  if config["data"]["worker_count"] < -1:
    raise ConfigError(f"data.worker_count={config['data']['worker_count']}: use -1 (auto), 0 (the main process) "
                      "or a number of Grain worker processes")
  if config["data"]["decoded_cache_mb"] < 0:
    raise ConfigError(f"data.decoded_cache_mb={config['data']['decoded_cache_mb']}: use 0 (no cache) or the "
                      "megabytes of decoded training records each pipeline process may keep")
  renderings = config["data"]["renderings_per_scene"]
  if renderings < 1 or train["batch_size"] % renderings:
    raise ConfigError(f"data.renderings_per_scene={renderings} must be at least 1 and divide train.batch_size "
                      f"({train['batch_size']}): a batch holds whole scenes")
  if train["batch_size"] // renderings < 2 and objectives.make(config["objective"]).contrasts_scenes:
    # Unchecked, the loss and its gradient are 0 at every step, and the logged accuracies 1.0 read as robustness.
    raise ConfigError(f"train.batch_size={train['batch_size']} holds one scene (data.renderings_per_scene="
                      f"{renderings}): {config['objective']['name']}'s contrastive loss has no negative in it, so "
                      f"nothing trains; use train.batch_size >= {2 * renderings} (two scenes or more)")
  if config["schedule"]["warmup_steps"] > train["steps"]:
    raise ConfigError(f"schedule.warmup_steps ({config['schedule']['warmup_steps']}) exceeds "
                      f"train.steps ({train['steps']})")
  _check_schedule(config["schedule"], config["optimizer"]["learning_rate"], train["steps"])


def _check_shapes_sizes(config: dict) -> None:
  """The shapes world's split sizes, at load: the split a run trains on must not be built empty (the build
  would take minutes, then the run would fail on a split that does not exist). eval.split is checked
  when the run is set up (`setup.check_split`): commands that never evaluate build only what they read."""
  data = config["data"]
  for split in shapes.SPLIT_IDS:
    if data[f"build_{split}"] < 0:
      raise ConfigError(f"data.build_{split}={data[f'build_{split}']} must be >= 0 (scenes in the shapes world's "
                        f"{split} split)")
  split = data["split"]
  if split in shapes.SPLIT_IDS and data[f"build_{split}"] == 0:
    raise ConfigError(f"data.split={split!r} trains on the shapes world's {split} split, but data.build_{split}=0 "
                      f"builds it empty; give it scenes (e.g. data.build_{split}=1000) or train on another split")


def _check_schedule(schedule: dict, peak: float, steps: int) -> None:
  """The schedule builds, and an optax.NAME one gives a finite, non-negative learning rate at every step
  (evaluated as the train step does, traced, so one that is not traceable fails here too)."""
  try:
    json.dumps(schedule["kwargs"])
  except (TypeError, ValueError):
    raise ConfigError(f"schedule.kwargs={schedule['kwargs']!r}: give plain values (numbers, strings, booleans, "
                      "lists, dicts of them), which config.json can hold") from None
  call = f"{schedule['name']}({', '.join(f'{k}={v!r}' for k, v in schedule['kwargs'].items())})"
  try:
    fn = optim.make_schedule(ml_collections.ConfigDict(schedule), peak, steps)
  except ValueError as err:  # an unknown name, kwargs the constructor does not take, a required one missing
    raise ConfigError(str(err)) from None
  except Exception as err:  # noqa: BLE001  a kwarg of the wrong kind, met inside the Optax constructor
    raise ConfigError(f"schedule: {call} failed: {type(err).__name__}: {err}") from None
  if schedule["name"] in optim.BUILTIN_SCHEDULES:
    return  # its values are the range-checked learning rate and end factor
  try:
    rates = np.asarray(jax.vmap(fn)(jnp.arange(steps)))
  except Exception as err:  # noqa: BLE001  a bad argument value: Optax's own message
    raise ConfigError(f"schedule: {call} failed: {type(err).__name__}: {err}") from None
  bad = np.flatnonzero(~(np.isfinite(rates) & (rates >= 0)))
  if bad.size:
    raise ConfigError(f"schedule: {call} gives the learning rate {rates[bad[0]]} at step {bad[0]}; it must be "
                      ">= 0 and finite at every step")


# ----------------------------------------------------------------------------------------------------
# Overrides.


def _parse_override(text: str) -> tuple[str, str]:
  text = text[len("--config."):] if text.startswith("--config.") else text
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise ConfigError(f"cannot parse override {text!r}; write key.path=value (e.g. schedule.name=cosine)")
  return key.strip(), value


def _set_raw(raw: dict, key: str, value: str) -> None:
  section, _, leaf = key.rpartition(".")
  node = raw
  for part in section.split(".") if section else []:
    node = node.setdefault(part, {})
  node[leaf] = _parse_value(value, "", key)


def _override_target(config: dict, key: str) -> tuple[dict, str]:
  """The section an override `key` (a.b.leaf) sets and its leaf; an unknown key is an error of the override."""
  parts = key.split(".")
  node, section = config, ""
  for part in parts[:-1]:
    if part not in node or not isinstance(node[part], dict):
      raise _unknown_key(part, section, [k for k, v in node.items() if isinstance(v, dict)], "override")
    node, section = node[part], f"{section}.{part}" if section else part
  leaf = parts[-1]
  if isinstance(node.get(leaf), dict):  # a section, not a value: name one of its keys
    where = f"{section}.{leaf}" if section else leaf
    raise ConfigError(f"override: {where!r} is a section, not a value; set one of its keys, e.g. "
                      f"--config.{where}.KEY=VALUE (its keys: {', '.join(sorted(node[leaf]))})")
  if leaf not in node:
    raise _unknown_key(leaf, section, [k for k, v in node.items() if not isinstance(v, dict)], "override")
  return node, leaf


def _override(config: dict, key: str, text: str) -> None:
  if key.startswith("schedule.kwargs.") and key.count(".") == 2:
    _override_schedule_kwarg(config["schedule"], key, text)
    return
  node, leaf = _override_target(config, key)
  node[leaf] = _coerce(key, node[leaf], _parse_value(text, node[leaf], key), "override")


def _override_schedule_kwarg(schedule: dict, key: str, text: str) -> None:
  """`schedule.kwargs.NAME=value`: a keyword argument of the optax.NAME schedule, given in the file or not (the
  constructor's signature decides which are valid, when the schedule is checked). The value is read as the
  file's value, else as the parameter's default, else as a Python literal (a bare word being a string)."""
  kwargs, leaf = schedule["kwargs"], key.rpartition(".")[2]
  if leaf in kwargs:
    kwargs[leaf] = _coerce(key, kwargs[leaf], _parse_value(text, kwargs[leaf], key), "override")
    return
  parameter = optim.schedule_parameters(schedule["name"]).get(leaf)
  default = parameter.default if parameter is not None else None
  kwargs[leaf] = _parse_value(text, default if isinstance(default, (bool, int, float, str)) else None, key)


TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")


def parse_scalar(text: str, default: Any, where: str, bool_hint: str = "") -> Any:
  """`text` read as the type of `default`: a bool (TRUE_WORDS / FALSE_WORDS), an int, a float (also a
  fraction such as 2/255), else the text itself. A text that is not such a value is a ConfigError
  beginning with `where` (e.g. "train.steps='ten'"); one place for overrides and experiment-file arguments."""
  if isinstance(default, bool):
    if text.lower() in TRUE_WORDS + FALSE_WORDS:
      return text.lower() in TRUE_WORDS
    raise ConfigError(f"{where} is not true or false{bool_hint or ' (or yes/no, 1/0)'}")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"{where} is not an integer") from None
  if isinstance(default, float):
    try:
      return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
      raise ConfigError(f"{where} is not a number (e.g. 0.01, 1e-5 or 2/255)") from None
  return text


def _parse_value(text: str, default: Any, key: str = "") -> Any:
  text = text.strip()
  if isinstance(default, (bool, int, float)):
    return parse_scalar(text, default, f"{key}={text!r}" if key else repr(text))
  if isinstance(default, tuple):
    return _parse_tuple(text, key)
  if isinstance(default, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


_BARE_WORD = re.compile(r"[\w.:/+-]+")  # pgd, hflip, eda:0.3: no quotes needed


def _parse_tuple(text: str, key: str) -> tuple:
  """`a,b`, `(a, b)`, `[a, b]` (bare words are strings) or Python literals such as `(1, 2)` / `('a',)`."""
  name = key or "key"
  bad = ConfigError(f"{name}: cannot read {text!r} as a list; write a,b or (a, b), e.g. --config.{name}=x,y "
                    f"or '--config.{name}=(x, y)' (quoted for the shell; () for none)")
  if not text.startswith(("(", "[")):
    return tuple(p.strip() for p in text.split(",") if p.strip())
  if not text.endswith(")" if text[0] == "(" else "]"):
    raise bad
  try:
    value = ast.literal_eval(text)
    # `(pgd)` / `(1)` are one element, not a string's letters or a TypeError.
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  except (ValueError, SyntaxError, TypeError):
    pass
  items = []
  for part in (p.strip() for p in text[1:-1].split(",")):
    if not part:
      continue
    try:
      items.append(ast.literal_eval(part))
    except (ValueError, SyntaxError, TypeError):
      if not _BARE_WORD.fullmatch(part):
        raise bad from None
      items.append(part)
  return tuple(items)


# ----------------------------------------------------------------------------------------------------
# Fingerprints.


def fingerprint(config: ml_collections.ConfigDict, model_config: Any = None) -> dict[str, Any]:
  """The settings a checkpoint belongs to: what fixes its shapes and optimizer-state structure (model,
  towers, optimizer, batch size) and what the run trains on and for (the dataset, its split and image
  size and the shapes world's build sizes, the objective with all its hyper-parameters, the seed, the
  data stream's augmentations, the text threat of an objective that attacks captions, the source of a
  frozen reference). A resume under another fingerprint
  would mix two runs, so the checkpointer refuses it; learning rate, schedule, logging and evaluation
  settings may change between restarts."""

  opt = config.optimizer
  parts: dict[str, Any] = {
      "train.towers": config.train.towers,
      "train.train_logit_scale": config.train.train_logit_scale,
      "train.batch_size": config.train.batch_size,
      "optimizer.name": opt.name,
      "optimizer.grad_clip": opt.grad_clip_norm > 0,
      "data.name": config.data.name,
      "data.split": config.data.split,
      "data.image_size": config.data.image_size,
      "data.captions_per_image": config.data.captions_per_image,
      "data.augmentations": list(config.data.augmentations),
      "data.renderings_per_scene": config.data.renderings_per_scene,
      "seed": config.seed,
  }
  # Which build of the shapes world (a corpus is one build per name and image size). Not data_dir: a
  # dataset moved to another directory is the same data.
  if config.data.name == "shapes":
    parts.update({f"data.build_{split}": config.data[f"build_{split}"] for split in ("train", "val", "test")})
    # Recorded only for a world other than the default: the default world's checkpoints keep their digest,
    # and one of them (which lacks the key) is refused by a run in another world.
    if rare_form_rate(config) is not None:
      parts["data.build_rare_form_rate"] = config.data.build_rare_form_rate
  # The inner attack only when it is not the objective's published one, which the objective's name
  # already implies (so a checkpoint of the published recipe has the same fingerprint with or without the key).
  # Likewise a field added to an objective after its checkpoints were first written, at its default (what
  # those checkpoints trained): they resume, and a run with another value is refused.
  defaults = objectives.hyperparameters(_objective_class(config.objective.name, "config"))
  implied = {k: defaults.get(k) for k in ("attack", *_ADDED_OBJECTIVE_FIELDS)}
  parts.update({f"objective.{k}": v for k, v in config.objective.items() if not (k in implied and v == implied[k])})
  # Optimizer-state structure (mat_jax.training.optim): adamw always holds a decay state; adam and sgd
  # only with weight decay, and sgd a momentum trace only with momentum.
  if opt.name in ("adam", "sgd"):
    parts["optimizer.weight_decay>0"] = opt.weight_decay > 0
  if opt.name == "sgd":
    parts["optimizer.momentum>0"] = opt.momentum > 0
  # What the run trains against and from: the text threat of an objective that attacks captions, the
  # frozen original model of one anchored to it (FARE, MAVA).
  objective = objectives.make(config.objective)
  if objective.needs_text_candidates:
    # exclude_words only when it excludes any: the checkpoints written before the key existed keep their digest.
    parts.update({f"text_attack.{k}": v for k, v in config.text_attack.items() if not (k == "exclude_words" and not v)})
  if objective.needs_reference:
    parts["model.source"] = config.model.source
  if model_config is not None:
    flat = _flatten(dataclasses.asdict(model_config), "model")
    # How the model is computed, not what it is: a checkpoint resumes under any of these.
    parts.update({k: v for k, v in flat.items() if k.removeprefix("model.") not in EXECUTION_OPTIONS})
    # A tokenizer cut shorter than the loaded model's texts (weights keep their own context length):
    # recorded only then, so the checkpoints whose model config already says it keep their digest.
    context = config.model.get("context_length", 0)
    if context and context != flat.get("model.text.context_length"):
      parts["model.context_length"] = context
  return json.loads(json.dumps(parts, default=str))


# Objective fields that checkpoints written before the field existed lack (TeCoA's `symmetric`, MAT's `guided`).
_ADDED_OBJECTIVE_FIELDS = ("symmetric", "guided")

# Fingerprint keys that checkpoints written before they were recorded lack: compared only where the
# checkpoint records them, so those checkpoints still resume.
ADDED_FINGERPRINT_KEYS = ("model.source", "model.source_run", "text_attack.source", "text_attack.bert",
                          "text_attack.top_k", "text_attack.max_words", "text_attack.max_pieces",
                          "text_attack.max_targets", "text_attack.mlm", "data.split", "data.image_size",
                          "data.build_train", "data.build_val", "data.build_test", "model.tokenizer_vocabulary")


def rare_form_rate(config: ml_collections.ConfigDict) -> float | None:
  """The shapes world's `rare_form_rate` (`shapes.form_picker`) a config names: None for the default world."""
  rate = config.data.get("build_rare_form_rate", -1.0)
  return None if rate < 0 else float(rate)


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}.{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, name))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def digest(parts: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


# How the input pipeline runs, left out of a cached run's key: neither changes the batches delivered (the
# decoded-record cache only skips decoding; worker processes each make whole batches of the one stream).
RUNTIME_ONLY_KEYS = ("data.worker_count", "data.decoded_cache_mb")


def result_json(config: ml_collections.ConfigDict) -> str:
  """`to_json` without RUNTIME_ONLY_KEYS: what a run's result depends on (the key of a cached run)."""
  tree = config.to_dict()
  for key in RUNTIME_ONLY_KEYS:
    section, _, name = key.partition(".")
    tree.get(section, {}).pop(name, None)
  if not tree.get("schedule", {}).get("kwargs", True):  # empty kwargs change nothing trained: no part of the key
    tree["schedule"].pop("kwargs")
  if tree.get("data", {}).get("build_rare_form_rate", 0) < 0:  # the default world, as before the key existed
    tree["data"].pop("build_rare_form_rate")
  if not tree.get("text_attack", {}).get("exclude_words", True):  # likewise an attack that may write every word
    tree["text_attack"].pop("exclude_words")
  if tree.get("model", {}).get("remat") == "none":  # likewise blocks that keep every intermediate
    tree["model"].pop("remat")
  if tree.get("objective", {}).get("guided") is True:  # likewise MAT's image attack guided as published
    tree["objective"].pop("guided")
  return json.dumps(tree, indent=2, sort_keys=True, default=list)
