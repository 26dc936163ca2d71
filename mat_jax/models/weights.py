"""Weights in the transformers layout (config.json + *.safetensors) <-> the NNX CLIP and BERT modules.

Every tensor is mapped by an explicit table: our parameter path, transformers' tensor name, and the
layout change between them (torch Linear weights are (out, in), Flax kernels (in, out); the patch
convolution is OIHW in torch, HWIO here). Loading checks the whole checkpoint against the table and
reports every missing, unexpected and mis-shaped tensor in one error. Only safetensors are read: pickle
checkpoints (.bin/.pt/.pth/.ckpt) can run code when loaded, so they are refused with the conversion
command, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so bf16 safetensors can be read
import numpy as np
from flax import nnx
from flax.nnx import traversals

from mat_jax.errors import ConfigError, InputError, MatJaxError, shown_json
from mat_jax.models import hub, layers
from mat_jax.models.bert import BertConfig, BertForMaskedLM
from mat_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, resolve_dtype
from mat_jax.models.dual_encoder import DualEncoder

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# transformers 5's Processor.save_pretrained writes this instead, the image settings under "image_processor";
# transformers reads it first when both are there.
PROCESSOR_FILE = "processor_config.json"
WEIGHT_PATTERNS = ("config.json", "model*.safetensors", SAFETENSORS_INDEX, PREPROCESSOR_FILE, PROCESSOR_FILE)
# transformers' shard names (save_pretrained with max_shard_size), listed by SAFETENSORS_INDEX.
_SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")
_SHOWN_PER_KIND = 40  # an error lists this many names per kind; the exception keeps them all


class WeightsError(MatJaxError, ValueError):
  """Checkpoint tensors that do not fit the model, all of them at once."""

  def __init__(self, source: str, architecture: str, missing: list[str], unexpected: list[str],
               mismatched: list[str], untied: list[str] = ()):
    self.missing, self.unexpected, self.mismatched, self.untied = missing, unexpected, mismatched, list(untied)
    parts = [f"the checkpoint in {source} does not fit the model built from its config.json:"]
    for title, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("tensors whose shape does not match config.json", mismatched),
                         ("tied tensors stored with values of their own", untied)):
      if names:
        shown = "\n    ".join(names[:_SHOWN_PER_KIND])
        more = f"\n    ... and {len(names) - _SHOWN_PER_KIND} more" if len(names) > _SHOWN_PER_KIND else ""
        parts.append(f"  {len(names)} {title}:\n    {shown}{more}")
    if untied:
      parts.append(f"mat_jax's {architecture} ties these tensors, as config.json says; transformers would load "
                   "the stored copies untied (a different model). Use a checkpoint whose copies equal the "
                   "tensors they are tied to (transformers' save_pretrained of a tied model writes them so).")
    if missing or unexpected or mismatched:
      # CLIP weights also circulate in other libraries' layouts, under names transformers does not use.
      other_layouts = " (not, e.g., open_clip or timm names)" if architecture == "CLIPModel" else ""
      parts.append(f"Check that config.json belongs to these weights and that they are a transformers "
                   f"{architecture} checkpoint{other_layouts}.")
    super().__init__("\n".join(parts))


class CorruptWeightsError(MatJaxError, ValueError):
  """A safetensors file that cannot be read (truncated, damaged)."""


class SaveDirectoryError(MatJaxError, FileExistsError):
  """A directory a save_* function would write into holds a checkpoint that the new one cannot replace."""


class UnsafeCheckpointError(MatJaxError, ValueError):
  """A pickle checkpoint: refused, because unpickling can run arbitrary code."""


# ------------------------------------------------------------------------------------------------
# Name tables.


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a transformers tensor becomes our parameter, and back."""
  name: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_theirs: Callable[[np.ndarray], np.ndarray]


SAME = Layout("same", lambda t: t, lambda t: t)
LINEAR = Layout("linear", lambda w: w.T, lambda k: k.T)                         # (out, in) <-> (in, out)
CONV = Layout("conv", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))  # OIHW <-> HWIO


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: tuple[str | int, ...]  # path in nnx.state(model)
  theirs: str                  # transformers' tensor name
  layout: Layout


# The table rows (our path, transformers' name, layout) of one LayerNorm or Linear; BLIP's table uses them too.
def layer_norm_rows(ours: tuple, theirs: str) -> list[tuple[tuple, str, Layout]]:
  return [((*ours, "scale"), f"{theirs}.weight", SAME), ((*ours, "bias"), f"{theirs}.bias", SAME)]


def linear_rows(ours: tuple, theirs: str, bias: bool = True) -> list[tuple[tuple, str, Layout]]:
  rows = [((*ours, "kernel"), f"{theirs}.weight", LINEAR)]
  return rows + ([((*ours, "bias"), f"{theirs}.bias", SAME)] if bias else [])


_CLIP_BLOCK = [
    *layer_norm_rows(("ln1",), "layer_norm1"),
    *linear_rows(("attn", "query"), "self_attn.q_proj"),
    *linear_rows(("attn", "key"), "self_attn.k_proj"),
    *linear_rows(("attn", "value"), "self_attn.v_proj"),
    *linear_rows(("attn", "out"), "self_attn.out_proj"),
    *layer_norm_rows(("ln2",), "layer_norm2"),
    *linear_rows(("fc1",), "mlp.fc1"),
    *linear_rows(("fc2",), "mlp.fc2"),
]

_CLIP_TOP = [
    (("logit_scale",), "logit_scale", SAME),
    (("visual_projection", "kernel"), "visual_projection.weight", LINEAR),
    (("text_projection", "kernel"), "text_projection.weight", LINEAR),
    (("vision", "patch_kernel"), "vision_model.embeddings.patch_embedding.weight", CONV),
    (("vision", "class_embedding"), "vision_model.embeddings.class_embedding", SAME),
    (("vision", "position_embedding"), "vision_model.embeddings.position_embedding.weight", SAME),
    *layer_norm_rows(("vision", "pre_ln"), "vision_model.pre_layrnorm"),  # sic: transformers' spelling
    *layer_norm_rows(("vision", "post_ln"), "vision_model.post_layernorm"),
    (("text", "token_embedding", "embedding"), "text_model.embeddings.token_embedding.weight", SAME),
    (("text", "position_embedding"), "text_model.embeddings.position_embedding.weight", SAME),
    *layer_norm_rows(("text", "final_ln"), "text_model.final_layer_norm"),
]

# Buffers, not parameters: older checkpoints saved them.
CLIP_IGNORED = frozenset({"vision_model.embeddings.position_ids", "text_model.embeddings.position_ids"})


def clip_table(cfg: CLIPConfig) -> list[Entry]:
  """Every CLIP parameter: our path, transformers' name, layout."""
  rows = list(_CLIP_TOP)
  for tower, prefix, depth in (("vision", "vision_model", cfg.vision.layers),
                               ("text", "text_model", cfg.text.layers)):
    for i in range(depth):
      rows += [((tower, "blocks", i, *ours), f"{prefix}.encoder.layers.{i}.{theirs}", layout)
               for ours, theirs, layout in _CLIP_BLOCK]
  return [Entry(*row) for row in rows]


_BERT_BLOCK = [
    *linear_rows(("attn", "query"), "attention.self.query"),
    *linear_rows(("attn", "key"), "attention.self.key"),
    *linear_rows(("attn", "value"), "attention.self.value"),
    *linear_rows(("attn", "out"), "attention.output.dense"),
    *layer_norm_rows(("attn_ln",), "attention.output.LayerNorm"),
    *linear_rows(("fc1",), "intermediate.dense"),
    *linear_rows(("fc2",), "output.dense"),
    *layer_norm_rows(("mlp_ln",), "output.LayerNorm"),
]

_BERT_TOP = [
    (("word_embeddings", "embedding"), "bert.embeddings.word_embeddings.weight", SAME),
    (("position_embeddings", "embedding"), "bert.embeddings.position_embeddings.weight", SAME),
    (("token_type_embeddings", "embedding"), "bert.embeddings.token_type_embeddings.weight", SAME),
    *layer_norm_rows(("embeddings_ln",), "bert.embeddings.LayerNorm"),
    *linear_rows(("transform",), "cls.predictions.transform.dense"),
    *layer_norm_rows(("transform_ln",), "cls.predictions.transform.LayerNorm"),
    (("output_bias",), "cls.predictions.bias", SAME),
]

# The MLM decoder's tensors are copies of the ones they are tied to (tie_word_embeddings is checked): either
# name may carry the tensor, and where both are stored they must be equal.
BERT_TIED = (("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
             ("cls.predictions.decoder.bias", "cls.predictions.bias"))
BERT_IGNORED = frozenset({
    "bert.embeddings.position_ids", "bert.embeddings.token_type_ids",  # buffers
    *(copy for copy, _ in BERT_TIED),
    # The pooler and the next-sentence head: in bert-base-uncased, unused by the MLM.
    "bert.pooler.dense.weight", "bert.pooler.dense.bias",
    "cls.seq_relationship.weight", "cls.seq_relationship.bias",
})
# The original Google checkpoints (bert-base-uncased among them) name LayerNorm parameters gamma/beta.
_BERT_RENAMES = ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias"))


def bert_table(cfg: BertConfig) -> list[Entry]:
  """Every BertForMaskedLM parameter: our path, transformers' name, layout."""
  rows = list(_BERT_TOP)
  for i in range(cfg.num_hidden_layers):
    rows += [(("blocks", i, *ours), f"bert.encoder.layer.{i}.{theirs}", layout)
             for ours, theirs, layout in _BERT_BLOCK]
  return [Entry(*row) for row in rows]


# ------------------------------------------------------------------------------------------------
# Config conversion. Missing keys take transformers' defaults, which are our dataclass defaults.

# Our ViT config fields -> transformers' vision_config keys: CLIP's and BLIP's (models/blip.py) alike.
VISION_CONFIG_KEYS = {"image_size": "image_size", "patch_size": "patch_size", "width": "hidden_size",
                      "layers": "num_hidden_layers", "heads": "num_attention_heads", "mlp_dim": "intermediate_size",
                      "activation": "hidden_act", "layer_norm_eps": "layer_norm_eps"}
_TEXT_KEYS = {"vocab_size": "vocab_size", "context_length": "max_position_embeddings", "width": "hidden_size",
              "layers": "num_hidden_layers", "heads": "num_attention_heads", "mlp_dim": "intermediate_size",
              "activation": "hidden_act", "layer_norm_eps": "layer_norm_eps", "eos_token_id": "eos_token_id",
              "bos_token_id": "bos_token_id", "pad_token_id": "pad_token_id"}
_BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")


# transformers' CLIPVisionConfig has num_channels, which we do not store (only 3, RGB, is supported).
_VISION_EXTRA_DEFAULTS = {"num_channels": 3}


def _hf_defaults(cls, keys: dict[str, str], **extra) -> dict[str, Any]:
  """transformers' defaults under transformers' names, from the table above: our dataclass defaults."""
  defaults = cls()
  return {**{theirs: getattr(defaults, ours) for ours, theirs in keys.items()}, **extra}


def _merge_config_dict(config: dict | None, config_dict: dict | None, defaults: dict[str, Any]) -> dict:
  """An older config's *_config_dict onto its *_config, as transformers' CLIPConfig does: it fills the dict
  with every default of its sub-config class and overwrites *_config with all of it, so a key missing from
  the dict takes the default even where *_config has another value (e.g. eos_token_id 2, hidden_act)."""
  if config_dict is None:
    return dict(config or {})
  return {**(config or {}), **defaults, **config_dict}


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object {...}"}


def _json_kind(value: Any) -> str:
  """What a JSON value is, in the words a config.json editor uses."""
  if isinstance(value, bool):
    return "a boolean"
  if isinstance(value, float):
    return "a floating-point number"
  for kind in (int, str, dict):
    if isinstance(value, kind):
      return _TYPE_NAMES[kind]
  return "a list" if isinstance(value, (list, tuple)) else type(value).__name__


def _has_type(value: Any, expected: type) -> bool:
  if isinstance(value, bool):  # JSON true/false: a bool is an int to Python, never a size or an eps
    return expected is bool
  if expected is float:
    return isinstance(value, (int, float))
  return isinstance(value, expected)


def wrong_types(data: dict, expected: dict[str, type], prefix: str = "") -> list[str]:
  """One line per key of `data` whose value (null aside: it means the default) is not of its expected type.
  Unchecked, a quoted "256" reaches the model as a string: an arithmetic TypeError far from config.json,
  or (through int()) a value transformers itself refuses."""
  return [f"{prefix}{key}: {shown_json(data[key], 60)} is {_json_kind(data[key])}, expected {_TYPE_NAMES[kind]}"
          for key, kind in expected.items() if data.get(key) is not None and not _has_type(data[key], kind)]


def field_types(cls, keys: dict[str, str]) -> dict[str, type]:
  """transformers' key -> the type of our field it fills (int, float, str), from the dataclass defaults."""
  defaults = cls()
  return {theirs: type(getattr(defaults, ours)) for ours, theirs in keys.items()}


def refuse_wrong_types(problems: list[str], source: str) -> None:
  if problems:
    raise ConfigError(f"{source} holds values of the wrong type:\n  " + "\n  ".join(problems) +
                      "\nCorrect these keys (numbers are written without quotes), or save the config again with "
                      "save_pretrained.")


def value_or(data: dict, key: str, default: Any) -> Any:
  """data[key], or `default` where the key is absent or null (transformers' configs write null for "the default")."""
  return data[key] if data.get(key) is not None else default


def pick(cls, data: dict, keys: dict[str, str], **extra) -> Any:
  """The config `cls` with each field `keys` names read from transformers' `data` (its default where the key is
  absent or null) and `extra` fields as given."""
  defaults = cls()
  values = {ours: value_or(data, theirs, getattr(defaults, ours)) for ours, theirs in keys.items()}
  return cls(**values, **extra)


def check_activation_and_heads(problems: list[str], where: str, act: str, width: int, heads: int) -> None:
  """Appends to `problems` what our encoders cannot build: an unknown activation, a width the heads do not divide."""
  if act not in layers.ACTIVATIONS:
    problems.append(f"{where}.hidden_act={act!r} is not supported (supported: {sorted(layers.ACTIVATIONS)})")
  if heads <= 0 or width % heads:
    problems.append(f"{where}: hidden_size {width} is not divisible by num_attention_heads {heads}")


def read_image_processor(directory: Path) -> tuple[dict | None, str]:
  """The image processor's settings in a model directory and where they were read, as transformers 5 finds
  them: processor_config.json's "image_processor" first, else preprocessor_config.json; None without
  either."""
  processor_path = directory / PROCESSOR_FILE
  if processor_path.exists():
    nested = hub.read_json_object(processor_path).get("image_processor")
    if nested is not None:
      if not isinstance(nested, dict):
        raise ConfigError(f"{processor_path}: \"image_processor\" must be an object of the image processor's "
                          f"settings, got {shown_json(nested)}; re-save it with the processor's save_pretrained.")
      return nested, f"{PROCESSOR_FILE}'s image_processor"
  path = directory / PREPROCESSOR_FILE
  return (hub.read_json_object(path), PREPROCESSOR_FILE) if path.exists() else (None, PREPROCESSOR_FILE)


def write_image_processor(directory: Path, settings: dict) -> None:
  """preprocessor_config.json, and the image settings of a processor_config.json already there, which
  transformers would otherwise read first and stale."""
  (directory / PREPROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")
  processor_path = directory / PROCESSOR_FILE
  if processor_path.exists():
    processor = hub.read_json_object(processor_path)
    if "image_processor" in processor:
      processor["image_processor"] = settings
      processor_path.write_text(json.dumps(processor, indent=2) + "\n")


def preprocessor_channels(preprocessor: dict, key: str, default: tuple[float, ...],
                          where: str = PREPROCESSOR_FILE) -> tuple[float, ...]:
  """The image processor's image_mean / image_std: three values, or one for every channel (as
  transformers' image processors accept)."""
  value = preprocessor.get(key, default)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (float(value),) * 3
  if isinstance(value, (list, tuple)) and len(value) == 3 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
    return tuple(float(v) for v in value)
  raise ConfigError(f"{where}: {key} must be one number or three (one per RGB channel), got "
                    f"{value!r}; re-save it with the image processor's save_pretrained.")


def preprocessor_normalisation(preprocessor: dict, mean: tuple[float, ...], std: tuple[float, ...],
                               where: str = PREPROCESSOR_FILE) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The (mean, std) that the model applies to pixels in [0, 1], from preprocessor_config.json: its
  image_mean / image_std (`mean`, `std` where absent), with `do_normalize`, `do_rescale` and
  `rescale_factor` folded in. A processor computes (raw * rescale_factor - mean) / std on raw values in
  [0, 255]; with raw = 255 x that is (x - mean / s) / (std / s), s = 255 * rescale_factor."""
  mean, std = preprocessor_channels(preprocessor, "image_mean", mean, where), preprocessor_channels(
      preprocessor, "image_std", std, where)
  for key in ("do_normalize", "do_rescale"):
    if not isinstance(preprocessor.get(key, True), bool):
      raise ConfigError(f"{where}: {key} must be true or false, got {preprocessor[key]!r}")
  if not preprocessor.get("do_normalize", True):
    mean, std = (0.0,) * 3, (1.0,) * 3
  factor = preprocessor.get("rescale_factor", 1 / 255) if preprocessor.get("do_rescale", True) else 1.0
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
    raise ConfigError(f"{where}: rescale_factor must be a positive number, got {factor!r}")
  scale = 255.0 * factor
  if abs(scale - 1.0) > 1e-9:  # the usual 1/255 leaves the values exactly as stored
    mean, std = tuple(m / scale for m in mean), tuple(s / scale for s in std)
  return mean, std


BICUBIC = 3  # PIL's code for bicubic resampling, as image processors store `resample`


def preprocessor_geometry_differences(preprocessor: dict, image_size: int) -> list[str]:
  """How the image processor's resize and crop differ from the pixels mat_jax gives the model: every caption
  corpus and ImageFolder set is built by resizing the shorter side to `image_size` (bicubic) and
  centre-cropping `image_size` (`data.corpora.resize_and_crop`, as OpenAI's and LAION's CLIPs are
  processed). Only the settings present are compared; [] when they agree."""
  differences = []
  if preprocessor.get("do_resize", True) is False:
    differences.append("does not resize (do_resize false)")
  elif "size" in preprocessor:
    size = preprocessor["size"]
    shortest = size if isinstance(size, int) else size.get("shortest_edge") if isinstance(size, dict) else None
    if shortest != image_size:
      differences.append(f"resizes to size {shown_json(size)}")
  if preprocessor.get("resample", BICUBIC) != BICUBIC:
    differences.append(f"resamples with PIL code {shown_json(preprocessor['resample'])} (bicubic is {BICUBIC})")
  if preprocessor.get("do_center_crop", True) is False:
    differences.append("does not crop (do_center_crop false)")
  elif "crop_size" in preprocessor:
    crop = preprocessor["crop_size"]
    square = crop if isinstance(crop, int) else (
        crop.get("height") if isinstance(crop, dict) and crop.get("height") == crop.get("width") else None)
    if square != image_size:
      differences.append(f"crops to crop_size {shown_json(crop)}")
  return differences


def _sub_config_types(data: dict, name: str, expected: dict[str, type]) -> list[str]:
  """Type problems of `data[name]` and of an older config's `data[name + "_dict"]`, each under its own name."""
  problems = wrong_types(data, {name: dict, f"{name}_dict": dict})
  if problems:
    return problems
  # With a *_dict present, *_config gives way to it and its defaults (_merge_config_dict): only the dict is read.
  read = f"{name}_dict" if data.get(f"{name}_dict") is not None else name
  return wrong_types(data.get(read) or {}, expected, f"{read}.")


def clip_config_from_hf(data: dict, preprocessor: dict | None = None, *, dtype: str = "float32",
                        source: str = "config.json", preprocessor_source: str = PREPROCESSOR_FILE) -> CLIPConfig:
  """transformers' CLIPConfig dict (config.json) [+ the image processor's settings] -> CLIPConfig.

  `source`, `preprocessor_source`: where `data` and `preprocessor` were read, for error messages."""
  problems = []
  if data.get("model_type", "clip") != "clip":
    hint = " (a BLIP checkpoint: load it with mat_jax.models.load_blip)" if data["model_type"] == "blip" else ""
    raise ConfigError(f"config.json describes a {data['model_type']!r} model (architectures "
                      f"{data.get('architectures')}){hint}; load_clip reads transformers' CLIPModel checkpoints "
                      "(model_type 'clip').")
  refuse_wrong_types([
      *wrong_types(data, {"projection_dim": int, "logit_scale_init_value": float}),
      *_sub_config_types(data, "vision_config", {**field_types(VisionConfig, VISION_CONFIG_KEYS), "num_channels": int}),
      *_sub_config_types(data, "text_config", field_types(TextConfig, _TEXT_KEYS))], source)
  # Older configs (openai/clip-vit-large-patch14 among them) also carry *_config_dict.
  vision_data = _merge_config_dict(data.get("vision_config"), data.get("vision_config_dict"),
                                   _hf_defaults(VisionConfig, VISION_CONFIG_KEYS, **_VISION_EXTRA_DEFAULTS))
  text_data = _merge_config_dict(data.get("text_config"), data.get("text_config_dict"),
                                 _hf_defaults(TextConfig, _TEXT_KEYS))
  pre = preprocessor or {}
  mean, std = preprocessor_normalisation(pre, VisionConfig.image_mean, VisionConfig.image_std, preprocessor_source)
  vision = pick(VisionConfig, vision_data, VISION_CONFIG_KEYS, image_mean=mean, image_std=std)
  # Pooling is left to TextConfig's default, which derives it from eos_token_id as transformers does.
  text = pick(TextConfig, text_data, _TEXT_KEYS)
  # Older mat_jax wrote this key to pool where transformers' rule would not; such a checkpoint's text
  # embeddings cannot be reproduced from standard keys, so it is refused rather than pooled elsewhere.
  legacy_pooling = text_data.get("mat_jax_pooling")
  if legacy_pooling is not None and legacy_pooling != text.text_pooling:
    problems.append(f"text_config.mat_jax_pooling={legacy_pooling!r} (written by an older mat_jax) contradicts "
                    f"transformers' pooling {text.text_pooling!r} for eos_token_id={text.eos_token_id}; "
                    "retrain the model with the current tokenizer (the shapes world's end id is now 3)")
  if value_or(vision_data, "num_channels", 3) != 3:
    problems.append(f"vision_config.num_channels={vision_data['num_channels']} (only RGB, 3, is supported)")
  check_activation_and_heads(problems, "vision_config", vision.activation, vision.width, vision.heads)
  check_activation_and_heads(problems, "text_config", text.activation, text.width, text.heads)
  if problems:
    raise ConfigError("unsupported CLIP config:\n  " + "\n  ".join(problems))
  defaults = CLIPConfig()
  return CLIPConfig(
      vision=vision, text=text,
      projection_dim=int(data.get("projection_dim") or defaults.projection_dim),
      logit_scale_init=float(value_or(data, "logit_scale_init_value", defaults.logit_scale_init)),
      dtype=dtype)


def _check_transformers_pooling(text: TextConfig) -> None:
  """transformers has no pooling key: it pools at the largest id iff eos_token_id == 2, else at the first
  eos. A config whose explicit `pooling` says otherwise would load there with other text embeddings."""
  derived = dataclasses.replace(text, pooling=None).text_pooling
  if text.text_pooling == derived:
    return
  if text.eos_token_id == 2:
    fix = ("use an end-of-text id other than 2 (give the tokenizer's end token another id and set "
           "eos_token_id to it): transformers reads eos_token_id == 2 as its legacy rule 'pool at the "
           "largest id'")
  else:
    fix = "leave pooling=None: transformers pools at the first eos_token_id unless eos_token_id == 2"
  raise ConfigError(f"text pooling={text.pooling!r} with eos_token_id={text.eos_token_id} cannot be written "
                    f"to a config.json: transformers' CLIPModel would pool with {derived!r} and give other "
                    f"text embeddings. Fix: {fix}.")


def clip_config_to_hf(cfg: CLIPConfig) -> dict:
  """CLIPConfig -> a config.json that transformers' CLIPModel.from_pretrained reads."""
  _check_transformers_pooling(cfg.text)
  vision = {theirs: getattr(cfg.vision, ours) for ours, theirs in VISION_CONFIG_KEYS.items()}
  text = {theirs: getattr(cfg.text, ours) for ours, theirs in _TEXT_KEYS.items()}
  return {
      "architectures": ["CLIPModel"], "model_type": "clip", "dtype": "float32",
      "projection_dim": cfg.projection_dim, "logit_scale_init_value": cfg.logit_scale_init,
      "vision_config": {"model_type": "clip_vision_model", "num_channels": 3,
                        "projection_dim": cfg.projection_dim, **vision},
      "text_config": {"model_type": "clip_text_model", "projection_dim": cfg.projection_dim, **text},
  }


def clip_preprocessor_to_hf(cfg: CLIPConfig) -> dict:
  """preprocessor_config.json for transformers' CLIPImageProcessor (resize, centre crop, normalise)."""
  size = cfg.vision.image_size
  return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
          "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(cfg.vision.image_mean), "image_std": list(cfg.vision.image_std),
          "do_convert_rgb": True}


def bert_config_from_hf(data: dict, *, dtype: str = "float32", source: str = "config.json") -> BertConfig:
  """transformers' BertConfig dict (config.json) -> BertConfig. `source`: the file, for error messages."""
  if data.get("model_type", "bert") != "bert":
    raise ConfigError(f"config.json describes a {data['model_type']!r} model; load_bert_mlm reads "
                      "transformers' BertForMaskedLM checkpoints (model_type 'bert').")
  keys = {k: k for k in _BERT_KEYS}
  refuse_wrong_types(wrong_types(data, field_types(BertConfig, keys)), source)
  cfg = pick(BertConfig, data, keys, dtype=dtype)
  problems = []
  if value_or(data, "position_embedding_type", "absolute") != "absolute":
    problems.append(f"position_embedding_type={data['position_embedding_type']!r} (only 'absolute')")
  if data.get("is_decoder") or data.get("add_cross_attention"):
    problems.append("is_decoder/add_cross_attention (only the bidirectional encoder MLM)")
  if data.get("tie_word_embeddings", True) is False:
    problems.append("tie_word_embeddings=false (the MLM decoder must be tied to the word embeddings)")
  check_activation_and_heads(problems, "config", cfg.hidden_act, cfg.hidden_size, cfg.num_attention_heads)
  if problems:
    raise ConfigError("unsupported BERT config:\n  " + "\n  ".join(problems))
  return cfg


# ------------------------------------------------------------------------------------------------
# Files.


def pickle_error(location: Path | str, architecture: str) -> UnsafeCheckpointError:
  """The refusal of the pickle checkpoint at `location`, with the command that converts it to safetensors
  through transformers' class `architecture`."""
  return UnsafeCheckpointError(
      f"{location} is a pickle checkpoint; mat_jax never unpickles weights (loading a pickle can run "
      "arbitrary code). Convert it once, in an environment you trust, with transformers:\n"
      f"  python -c \"from transformers import {architecture} as M; M.from_pretrained('DIR')"
      ".save_pretrained('DIR-safetensors', safe_serialization=True)\"\n"
      "and pass DIR-safetensors; on the hub, many repositories also offer model.safetensors.")


def checkpoint_directory(source: str | os.PathLike, architecture: str) -> Path:
  """The local directory of a transformers-layout checkpoint (a directory or a hub id), with its config.json.
  A pickle checkpoint is refused with the conversion command for transformers' class `architecture`."""
  path = Path(source).expanduser()
  if path.is_file() and path.suffix in PICKLE_SUFFIXES:
    raise pickle_error(path, architecture)
  directory = hub.resolve(source, WEIGHT_PATTERNS)
  if not path.is_dir() and not any((directory / f).exists() for f in (SAFETENSORS_FILE, SAFETENSORS_INDEX)):
    # A hub snapshot holds only the files WEIGHT_PATTERNS let through, never a pickle: ask the hub what the
    # repository has, so a pickle-only one gets the conversion advice rather than "save_pretrained".
    pickles = [name for name in hub.repo_files(str(source)) if Path(name).suffix in PICKLE_SUFFIXES]
    if pickles:
      raise pickle_error(f"{pickles[0]} of the hub repository {source}", architecture)
  if not (directory / "config.json").exists():
    raise hub.ModelSourceError(
        f"{directory} has no config.json; a transformers-layout directory holds config.json and "
        "model.safetensors; " + hub.missing_files_fix(directory, "write both with model.save_pretrained(directory, "
                                                                  "safe_serialization=True)."))
  return directory


def weight_files(directory: Path, architecture: str) -> dict[str, Path]:
  """Tensor name -> the safetensors file that holds it. `architecture`: transformers' class, for the conversion
  command of a pickle checkpoint."""
  index = directory / SAFETENSORS_INDEX
  single = directory / SAFETENSORS_FILE
  if index.exists():
    weight_map = hub.read_json_object(index).get("weight_map") or {}
    absent = sorted({f for f in weight_map.values() if not (directory / f).exists()})
    if not single.exists():
      if absent:
        raise hub.ModelSourceError(f"{index} names shards that are not in {directory}: {absent}; "
                                   "download every shard listed in the index.")
      return {name: directory / f for name, f in weight_map.items()}
    # save_pretrained over an earlier save leaves the other layout's files behind. transformers reads the
    # single file, so a stale index is ignored as there; with every shard present too, which save is
    # current cannot be told.
    if weight_map and not absent:
      raise hub.ModelSourceError(
          f"{directory} holds two checkpoints: {SAFETENSORS_FILE} and the shards listed in {SAFETENSORS_INDEX}, "
          f"one of them left by an earlier save (transformers would read {SAFETENSORS_FILE}); delete the stale "
          f"one: the index with its shards, or {SAFETENSORS_FILE}.")
  if single.exists():
    with _open_safetensors(single) as handle:
      return {name: single for name in handle.keys()}
  pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
  if pickles:
    raise pickle_error(pickles[0], architecture)
  others = sorted(p.name for p in directory.glob("*.safetensors"))
  if others and all(_SHARD_NAME.fullmatch(name) for name in others):
    # transformers' own shard names: only the index that lists which shard holds which tensor is missing.
    raise hub.ModelSourceError(
        f"{directory} holds the shards {others} but not their index {SAFETENSORS_INDEX}, which says which shard "
        f"holds which tensor; download or copy {SAFETENSORS_INDEX} together with the shards.")
  hint = f" (found {others}: not transformers' file names)" if others else ""
  raise hub.ModelSourceError(
      f"{directory} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}{hint}; "
      + hub.missing_files_fix(directory, "write the weights with model.save_pretrained(directory, "
                                         "safe_serialization=True)."))


# The safetensors dtypes whose values load as parameters (cast to float32); quantised, FP8, integer and bool
# ones would need their scales or would not be weights at all.
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def _read_tensors(files: dict[str, Path], names: Iterable[str]) -> dict[str, np.ndarray]:
  by_file: dict[Path, list[str]] = {}
  for name in names:
    by_file.setdefault(files[name], []).append(name)
  out = {}
  for path, wanted in by_file.items():
    with _open_safetensors(path) as handle:
      # Names come from the index when there is one: a name its shard lacks is a stale index, not a damaged file.
      absent = sorted(set(wanted) - set(handle.keys()))
      if absent:
        shown = ", ".join(absent[:_SHOWN_PER_KIND]) + (" ..." if len(absent) > _SHOWN_PER_KIND else "")
        raise hub.ModelSourceError(
            f"{path.parent / SAFETENSORS_INDEX} places {len(absent)} tensor(s) in {path.name}, which does not hold "
            f"them: {shown}. The index and the shards disagree (an index from another save); copy the "
            f"{SAFETENSORS_INDEX} that came with these shards, or download the checkpoint again.")
      for name in wanted:
        stored_as = handle.get_slice(name).get_dtype()
        if stored_as not in _FLOAT_DTYPES:
          raise hub.ModelSourceError(
              f"{path}: tensor {name!r} is stored as {stored_as}; mat_jax reads weights stored as "
              f"{', '.join(sorted(_FLOAT_DTYPES))} (not quantised, FP8, integer or bool ones): save the model in "
              "float32, float16 or bfloat16 (model.float() then model.save_pretrained(directory, "
              "safe_serialization=True)).")
        try:
          out[name] = handle.get_tensor(name)
        except Exception as err:  # noqa: BLE001  safetensors' errors do not name the file
          raise CorruptWeightsError(f"{path}: cannot read tensor {name!r} ({err}); the file is damaged or "
                                    "truncated: download or save it again") from None
  return out


def _open_safetensors(path: Path):
  """safe_open(path), with an error that names the file when its header cannot be read."""
  from safetensors import safe_open
  try:
    return safe_open(path, "np")
  except Exception as err:  # noqa: BLE001  SafetensorError("incomplete metadata") names nothing
    raise CorruptWeightsError(f"{path} is not a readable safetensors file ({err}); it is damaged or truncated "
                              "(an interrupted download or save): download or save it again") from None


# ------------------------------------------------------------------------------------------------
# Loading and saving.


def fill_parameters(abstract: nnx.Module, architecture: str, table: list[Entry], files: dict[str, Path],
                    ignored: frozenset[str], source: str, renames: tuple[tuple[str, str], ...] = (),
                    tied: tuple[tuple[str, str], ...] = ()) -> nnx.Module:
  """The module `abstract` (from nnx.eval_shape) with every parameter read from `files` via `table`.
  `tied`: (copy, tensor) names of tied tensors; a stored copy stands in for a tensor that is not stored,
  and must equal one that is."""
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  covered = {e.ours for e in table}
  if covered != set(flat):  # the table and the module disagree: a bug here, not in the checkpoint
    raise RuntimeError(f"name table out of date: unmapped {sorted(map(str, set(flat) - covered))}, "
                       f"stale {sorted(map(str, covered - set(flat)))}")
  # Canonical name -> the name in the file (legacy spellings renamed).
  def canonical(name: str) -> str:
    for old, new in renames:
      if name.endswith(old):
        return name[: -len(old)] + new
    return name
  in_file: dict[str, str] = {}
  for name in files:
    other = in_file.setdefault(canonical(name), name)
    if other != name:  # e.g. LayerNorm.gamma and LayerNorm.weight: which one is meant cannot be told
      raise CorruptWeightsError(f"{source} holds both {other} and {name}, two spellings of one tensor; keep one "
                                "(re-save the model with save_pretrained)")
  both_stored = [(copy, name) for copy, name in tied if copy in in_file and name in in_file]
  for copy, name in tied:
    if copy in in_file and name not in in_file:
      in_file[name] = in_file[copy]
  missing, mismatched, untied, values = [], [], [], {}
  wanted = [e for e in table if e.theirs in in_file]
  tensors = _read_tensors(files, [in_file[e.theirs] for e in wanted] + [in_file[copy] for copy, _ in both_stored])
  for copy, name in both_stored:
    stored, tensor = tensors[in_file[copy]], tensors[in_file[name]]
    if stored.shape != tensor.shape or not np.array_equal(stored, tensor):
      gap = (f"max abs difference {float(np.max(np.abs(stored.astype(np.float64) - tensor))):.3g}"
             if stored.shape == tensor.shape else f"shape {tuple(stored.shape)} against {tuple(tensor.shape)}")
      untied.append(f"{in_file[copy]} differs from {in_file[name]} ({gap})")
  for entry in table:
    if entry.theirs not in in_file:
      missing.append(entry.theirs)
      continue
    expected = tuple(flat[entry.ours].get_value().shape)
    tensor = tensors[in_file[entry.theirs]]
    if tensor.ndim != len(expected) or tuple(entry.layout.to_ours(tensor).shape) != expected:
      want = tuple(entry.layout.to_theirs(np.broadcast_to(np.float32(0), expected)).shape)
      mismatched.append(f"{entry.theirs}: {tuple(tensor.shape)} in the file, {want} from config.json")
      continue
    values[entry.ours] = np.asarray(entry.layout.to_ours(tensor), np.float32)
  used = {e.theirs for e in table}
  unexpected = sorted(in_file[n] for n in in_file if n not in used and n not in ignored)
  if missing or unexpected or mismatched or untied:
    raise WeightsError(source, architecture, missing, unexpected, mismatched, untied)
  # device_put, not jnp.asarray: in JAX 0.10 the latter compiles a small program per distinct shape.
  nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(
      {path: jax.device_put(value) for path, value in values.items()}))
  return nnx.merge(graphdef, state)


def compute_dtype(dtype: str | None) -> str:
  """None is float32 (a library call gets the checkpoint's numbers); "auto" follows the platform."""
  return "float32" if dtype is None else resolve_dtype(dtype)


def load_clip(source: str | os.PathLike, *, dtype: str | None = None) -> CLIP:
  """A CLIP from a transformers-layout directory or hub id (config.json + safetensors).

  `dtype` is the compute dtype (default float32; "auto": bfloat16 on GPU/TPU); parameters are always
  float32. Image mean/std come from the image processor's settings when they are there (processor_config.json's
  image_processor, else preprocessor_config.json, as transformers reads them; do_normalize and rescale_factor
  folded in), else CLIP's.
  """
  dtype = compute_dtype(dtype)
  directory = checkpoint_directory(source, "CLIPModel")
  files = weight_files(directory, "CLIPModel")
  preprocessor, preprocessor_source = read_image_processor(directory)
  cfg = clip_config_from_hf(hub.read_json_object(directory / "config.json"), preprocessor, dtype=dtype,
                            source=str(directory / "config.json"),
                            preprocessor_source=str(directory / preprocessor_source))
  differences = preprocessor_geometry_differences(preprocessor or {}, cfg.vision.image_size)
  if differences:
    size = cfg.vision.image_size
    warnings.warn(f"{directory / preprocessor_source}: the model's image processor {', '.join(differences)}; "
                  f"mat_jax's datasets give it images resized on the shorter side to {size} px (bicubic) and "
                  f"centre-cropped to {size}x{size}, so it is evaluated and trained on other pixels than its "
                  "processor would give it (docs/data.md)", UserWarning, stacklevel=2)
  abstract = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
  return fill_parameters(abstract, "CLIPModel", clip_table(cfg), files, CLIP_IGNORED, str(directory))


def load_bert_mlm(source: str | os.PathLike, *, dtype: str | None = None) -> BertForMaskedLM:
  """A BertForMaskedLM from a transformers-layout directory or hub id (e.g. bert-base-uncased)."""
  dtype = compute_dtype(dtype)
  directory = checkpoint_directory(source, "BertForMaskedLM")
  files = weight_files(directory, "BertForMaskedLM")
  cfg = bert_config_from_hf(hub.read_json_object(directory / "config.json"), dtype=dtype,
                            source=str(directory / "config.json"))
  abstract = nnx.eval_shape(lambda: BertForMaskedLM(cfg, rngs=nnx.Rngs(0)))
  return fill_parameters(abstract, "BertForMaskedLM", bert_table(cfg), files, BERT_IGNORED, str(directory),
                         _BERT_RENAMES, BERT_TIED)


def save_directory(directory: str | os.PathLike) -> Path:
  """The directory a save_* function writes config.json and model.safetensors into, created if need be.
  One holding a sharded checkpoint is refused: loading would then find two checkpoints (see `weight_files`)."""
  directory = Path(directory).expanduser()
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):  # the path, or a folder above it, is a file
    raise SaveDirectoryError(f"{directory} is a file or lies under one; save the model into a directory") from None
  if (directory / SAFETENSORS_INDEX).exists():
    raise SaveDirectoryError(f"{directory} holds a sharded checkpoint ({SAFETENSORS_INDEX}) that a "
                             f"{SAFETENSORS_FILE} written beside it would contradict; save into an empty directory.")
  return directory


def config_and_params(model: nnx.Module | tuple[DualEncoder, nnx.State]) -> tuple[Any, nnx.State]:
  """(config, parameters) of a model, or of an (encoder, params) pair."""
  if isinstance(model, tuple):
    encoder, params = model
    return encoder.config, params
  if not isinstance(model, nnx.Module) or not hasattr(model, "config"):
    raise InputError(f"expected a mat_jax model (or an (encoder, params) pair), got {type(model).__name__}")
  return model.config, nnx.state(model, nnx.Param)


def transformers_tensors(state: nnx.State, table: list[Entry]) -> dict[str, np.ndarray]:
  """The float32 tensors of `state` under transformers' names, in transformers' layouts, by the name table."""
  flat = dict(nnx.to_flat_state(state))
  return {e.theirs: np.array(e.layout.to_theirs(np.asarray(flat[e.ours].get_value(), np.float32)), order="C")
          for e in table}


def write_model_directory(directory: str | os.PathLike, state: nnx.State, table: list[Entry], hf_config: dict, *,
                          image_processor: dict | None = None, tokenizer: Any = None) -> Path:
  """Write model.safetensors (`state`'s tensors named by `table`) and config.json (`hf_config`) into
  `save_directory(directory)`, then the image processor's settings (`write_image_processor`) and the
  tokenizer's files (a mat_jax Tokenizer or a transformers tokenizer) where given. Returns the directory."""
  from safetensors.numpy import save_file

  directory = save_directory(directory)
  save_file(transformers_tensors(state, table), str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  if image_processor is not None:
    write_image_processor(directory, image_processor)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(directory))
  return directory


def save_clip(model: CLIP | tuple[DualEncoder, nnx.State], directory: str | os.PathLike, *,
              tokenizer: Any = None) -> Path:
  """Write config.json, model.safetensors and preprocessor_config.json (and the tokenizer's files if
  one is given: a mat_jax Tokenizer or a transformers tokenizer) in the layout that transformers'
  `CLIPModel.from_pretrained` and `load_clip` read. Returns the directory."""
  cfg, params = config_and_params(model)
  hf_config = clip_config_to_hf(cfg)  # first: a config transformers cannot express fails before any write
  return write_model_directory(directory, params, clip_table(cfg), hf_config,
                               image_processor=clip_preprocessor_to_hf(cfg), tokenizer=tokenizer)


def bert_config_to_hf(cfg: BertConfig) -> dict:
  """BertConfig -> a config.json that transformers' BertForMaskedLM.from_pretrained reads."""
  return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "dtype": "float32",
          "position_embedding_type": "absolute", "tie_word_embeddings": True,
          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
          **{key: getattr(cfg, key) for key in _BERT_KEYS}}


def save_bert_mlm(model: BertForMaskedLM, directory: str | os.PathLike, *, tokenizer: Any = None) -> Path:
  """Write config.json and model.safetensors (and the tokenizer's files if one is given) in the layout
  that transformers' `BertForMaskedLM.from_pretrained` and `load_bert_mlm` read. The MLM decoder is
  tied to the word embeddings, so only its bias (`cls.predictions.bias`) is stored. Returns the directory."""
  return write_model_directory(directory, nnx.state(model, nnx.Param), bert_table(model.config),
                               bert_config_to_hf(model.config), tokenizer=tokenizer)
