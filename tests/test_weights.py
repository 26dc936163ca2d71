"""Loading and saving in the transformers layout without PyTorch: round trips and every bad-input error."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mat_jax.models import CLIP, bert_config, clip_config, load_bert_mlm, load_clip, save_clip
from mat_jax.models.clip import CLIPConfig, TextConfig, VisionConfig
from mat_jax.models.hub import ModelSourceError
from mat_jax.models.weights import (ConfigError, SaveDirectoryError, UnsafeCheckpointError, WeightsError, bert_table,
                                    clip_table)

# Small enough to build in milliseconds; the shapes world's special ids (pad 0, start 2, end 3).
CFG = clip_config(
    "tiny",
    vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32),
    text=TextConfig(vocab_size=50, context_length=8, width=16, layers=1, heads=2, mlp_dim=32,
                    eos_token_id=3, bos_token_id=2, pad_token_id=0),
    projection_dim=8)


@pytest.fixture(scope="module")
def model():
  return CLIP(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny_clip")
  save_clip(model, directory)
  return directory


def _copy(src, dst, config_edit=None, tensors_edit=None):
  config = json.loads((src / "config.json").read_text())
  if config_edit:
    config_edit(config)
  (dst / "config.json").write_text(json.dumps(config))
  tensors = load_file(src / "model.safetensors")
  if tensors_edit:
    tensors_edit(tensors)
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


def _params_equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def test_save_load_round_trip_is_exact(model, saved):
  assert {p.name for p in saved.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
  loaded = load_clip(saved)
  assert loaded.config == CFG
  assert loaded.config.text.text_pooling == "eos"
  # Only transformers' own keys: pooling follows from eos_token_id there and here alike.
  text_config = json.loads((saved / "config.json").read_text())["text_config"]
  assert not [key for key in text_config if "pool" in key or "mat_jax" in key]
  assert _params_equal(nnx.state(model, nnx.Param), nnx.state(loaded, nnx.Param))


def test_loaded_parameters_keep_their_sharding_annotations(saved):
  state = nnx.state(load_clip(saved), nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  kernel = flat[("vision", "blocks", 0, "fc1", "kernel")]
  assert kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert all(v.get_value().dtype == jnp.float32 for v in flat.values())


def test_save_clip_accepts_an_encoder_and_params_pair(model, saved, tmp_path):
  from mat_jax.models import split

  save_clip(split(model), tmp_path)
  assert load_file(tmp_path / "model.safetensors").keys() == load_file(saved / "model.safetensors").keys()


def test_compute_dtype_override(saved):
  bf16 = load_clip(saved, dtype="bfloat16")
  assert bf16.config.dtype == "bfloat16"
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  with pytest.raises(ValueError, match="compute dtype 'int8' is not one of"):
    load_clip(saved, dtype="int8")


def test_name_table_covers_every_tensor_once():
  table = clip_table(CFG)
  assert len({e.theirs for e in table}) == len(table) == len({e.ours for e in table})


def test_all_tensor_problems_are_reported_in_one_error(saved, tmp_path):
  def edit(t):
    del t["text_model.final_layer_norm.bias"]
    del t["visual_projection.weight"]
    t["text_model.extra.weight"] = np.zeros(3, np.float32)
    t["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((32, 8), np.float32)
  _copy(saved, tmp_path, tensors_edit=edit)
  with pytest.raises(WeightsError) as err:
    load_clip(tmp_path)
  assert err.value.missing == ["visual_projection.weight", "text_model.final_layer_norm.bias"]
  assert err.value.unexpected == ["text_model.extra.weight"]
  assert len(err.value.mismatched) == 1
  message = str(err.value)
  for name in ("visual_projection.weight", "text_model.final_layer_norm.bias", "text_model.extra.weight",
               "vision_model.encoder.layers.0.mlp.fc1.weight: (32, 8) in the file, (32, 16) from config.json",
               "CLIPModel checkpoint (not, e.g., open_clip or timm names)"):
    assert name in message


def test_config_that_does_not_match_the_tensors(saved, tmp_path):
  _copy(saved, tmp_path, config_edit=lambda c: c["vision_config"].update(hidden_size=32))
  with pytest.raises(WeightsError, match="shape does not match config.json") as err:
    load_clip(tmp_path)
  assert len(err.value.mismatched) > 10 and not err.value.missing


def test_known_buffers_are_ignored(saved, tmp_path):
  _copy(saved, tmp_path, tensors_edit=lambda t: t.update({
      "text_model.embeddings.position_ids": np.arange(8)[None],
      "vision_model.embeddings.position_ids": np.arange(5)[None]}))
  load_clip(tmp_path)


@pytest.mark.parametrize("dtype, stored_as", [(np.int8, "I8"), (np.bool_, "BOOL"), (np.int32, "I32")])
def test_weights_that_are_not_floating_point_are_refused(saved, tmp_path, dtype, stored_as):
  name = "text_model.encoder.layers.0.mlp.fc1.weight"
  _copy(saved, tmp_path, tensors_edit=lambda t: t.update({name: np.ones(t[name].shape, dtype)}))
  with pytest.raises(ModelSourceError, match=rf"tensor '{re.escape(name)}' is stored as {stored_as}; .*float32"):
    load_clip(tmp_path)


def test_float64_and_float16_weights_load_as_float32(model, saved, tmp_path):
  _copy(saved, tmp_path, tensors_edit=lambda t: t.update(
      {name: value.astype(np.float64 if i % 2 else np.float16) for i, (name, value) in enumerate(t.items())}))
  loaded = load_clip(tmp_path)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(loaded, nnx.Param)))


def test_null_config_values_mean_the_default(saved, tmp_path):
  def edit(c):
    c["logit_scale_init_value"] = None
    c["vision_config"]["num_channels"] = None
  _copy(saved, tmp_path, config_edit=edit)
  assert load_clip(tmp_path).config.logit_scale_init == CLIPConfig().logit_scale_init


def test_directory_without_config_json(saved, tmp_path):
  (tmp_path / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
  with pytest.raises(ModelSourceError, match="no config.json"):
    load_clip(tmp_path)


def test_directory_without_safetensors(saved, tmp_path):
  (tmp_path / "config.json").write_text((saved / "config.json").read_text())
  with pytest.raises(ModelSourceError, match="save_pretrained"):
    load_clip(tmp_path)


def test_missing_shard_named(saved, tmp_path):
  (tmp_path / "config.json").write_text((saved / "config.json").read_text())
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"logit_scale": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(ModelSourceError, match="model-00001-of-00002.safetensors"):
    load_clip(tmp_path)


def _shards(saved, directory, count=2):
  """The saved tensors split over transformers' shard names; returns {name: shard file}."""
  (directory / "config.json").write_text((saved / "config.json").read_text())
  tensors = load_file(saved / "model.safetensors")
  names = sorted(tensors)
  weight_map = {}
  for i in range(count):
    shard = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
    part = names[i::count]
    save_file({n: tensors[n] for n in part}, directory / shard, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(part, shard))
  return weight_map


def test_shards_without_their_index(saved, tmp_path):
  _shards(saved, tmp_path)
  with pytest.raises(ModelSourceError, match=r"not their index model.safetensors.index.json.*copy"):
    load_clip(tmp_path)


def test_index_that_places_a_tensor_in_the_wrong_shard(saved, tmp_path):
  weight_map = _shards(saved, tmp_path)
  name = next(n for n, f in weight_map.items() if f.startswith("model-00001"))
  weight_map[name] = "model-00002-of-00002.safetensors"  # a stale index: every file intact
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  with pytest.raises(ModelSourceError, match=rf"in model-00002-of-00002.safetensors, which does not hold them: "
                                             rf"{re.escape(name)}\. The index and the shards disagree"):
    load_clip(tmp_path)
  weight_map[name] = "model-00001-of-00002.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  assert load_clip(tmp_path).config == CFG


def test_an_index_left_beside_model_safetensors(model, saved, tmp_path):
  """save_pretrained over an earlier save of the other layout leaves its files: transformers then reads
  model.safetensors. A stale index (its shards gone) is ignored as there; with its shards present too,
  which save is current cannot be told, so loading is refused instead of reading either."""
  weight_map = _shards(saved, tmp_path)
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  for shard in set(weight_map.values()):
    (tmp_path / shard).unlink()
  _copy(saved, tmp_path)  # the newer single-file save
  assert _params_equal(nnx.state(model, nnx.Param), nnx.state(load_clip(tmp_path), nnx.Param))
  _shards(saved, tmp_path)  # the shards back: two complete checkpoints
  with pytest.raises(ModelSourceError, match=r"two checkpoints.*delete the stale one"):
    load_clip(tmp_path)


def test_one_number_for_every_channel_in_the_preprocessor_config(saved, tmp_path):
  _copy(saved, tmp_path)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5, "image_std": [0.5, 0.25, 1]}))
  vision = load_clip(tmp_path).config.vision
  assert vision.image_mean == (0.5, 0.5, 0.5) and vision.image_std == (0.5, 0.25, 1.0)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
  with pytest.raises(ConfigError, match=r"image_mean must be one number or three"):
    load_clip(tmp_path)


def test_the_image_settings_of_a_saved_processor_are_read_first_as_transformers_reads_them(model, saved, tmp_path):
  """transformers 5's CLIPProcessor.save_pretrained writes processor_config.json (the image settings under
  "image_processor") and no preprocessor_config.json; with both there, transformers reads the nested ones."""
  import transformers

  _copy(saved, tmp_path)
  size = model.config.vision.image_size
  transformers.CLIPImageProcessor(image_mean=[0.1] * 3, image_std=[0.2] * 3, size={"shortest_edge": size},
                                  crop_size={"height": size, "width": size}).save_pretrained(tmp_path)
  nested = {**json.loads((tmp_path / "preprocessor_config.json").read_text()), "image_mean": [0.5, 0.4, 0.3]}
  (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "CLIPProcessor",
                                                              "image_processor": nested}))
  reference = transformers.AutoImageProcessor.from_pretrained(tmp_path)
  vision = load_clip(tmp_path).config.vision
  assert vision.image_mean == tuple(reference.image_mean) == (0.5, 0.4, 0.3)
  assert vision.image_std == tuple(reference.image_std) == (0.2, 0.2, 0.2)
  (tmp_path / "preprocessor_config.json").unlink()  # as the processor's own save leaves the directory
  assert load_clip(tmp_path).config.vision.image_mean == (0.5, 0.4, 0.3)
  nested["image_std"] = [0.5, 0.5]
  (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": nested}))
  with pytest.raises(ConfigError, match=r"processor_config.json's image_processor: image_std must be one number"):
    load_clip(tmp_path)
  # Saving over it updates the nested settings too, which transformers would otherwise read, stale.
  save_clip(model, tmp_path)
  reference = transformers.AutoImageProcessor.from_pretrained(tmp_path)
  assert tuple(reference.image_mean) == model.config.vision.image_mean == load_clip(tmp_path).config.vision.image_mean


def test_a_processor_that_resizes_or_crops_otherwise_loads_with_a_warning_naming_it(model, saved, tmp_path):
  """Every dataset gives a CLIP images resized on the shorter side to its image size (bicubic) and
  centre-cropped to it: a processor that says otherwise would give the model other pixels."""
  import warnings

  import transformers

  _copy(saved, tmp_path)
  size = model.config.vision.image_size
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the processor save_clip writes is the datasets' own
    load_clip(tmp_path)
  transformers.CLIPImageProcessor(size={"shortest_edge": size + 4}, crop_size={"height": size, "width": size},
                                  resample=2).save_pretrained(tmp_path)
  with pytest.warns(UserWarning, match=rf'resizes to size {{"shortest_edge": {size + 4}}}, resamples with PIL '
                                       r"code 2 \(bicubic is 3\);.*other pixels"):
    load_clip(tmp_path)
  # Older processors' files give both as one number: `size` the shorter side's, which agrees here.
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": size, "crop_size": size - 2}))
  with pytest.warns(UserWarning, match=rf"processor crops to crop_size {size - 2};") as caught:
    load_clip(tmp_path)
  assert "resizes to size" not in str(caught[0].message)
  transformers.CLIPImageProcessor(do_center_crop=False, size={"height": size, "width": size}).save_pretrained(tmp_path)
  with pytest.warns(UserWarning, match=r'resizes to size \{"height".*does not crop \(do_center_crop false\)'):
    load_clip(tmp_path)


@pytest.mark.parametrize("options", [{"do_normalize": False}, {"rescale_factor": 1 / 127.5},
                                     {"do_rescale": False, "image_mean": [120, 110, 100], "image_std": 60},
                                     {"rescale_factor": 1 / 255}])
def test_the_preprocessor_options_normalise_as_transformers_processor(saved, tmp_path, options):
  """The model's mean/std, applied to pixels in [0, 1], give the processor's pixel_values."""
  import transformers

  _copy(saved, tmp_path)
  processor_config = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3], **options}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor_config))
  vision = load_clip(tmp_path).config.vision
  raw = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
  processor = transformers.CLIPImageProcessor(do_resize=False, do_center_crop=False, **processor_config)
  expected = np.asarray(processor(raw, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
  ours = (raw / 255.0 - np.asarray(vision.image_mean)) / np.asarray(vision.image_std)
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
  if options == {"rescale_factor": 1 / 255}:  # the usual factor keeps the stored values exactly
    assert vision.image_mean == (0.4, 0.5, 0.6) and vision.image_std == (0.2, 0.25, 0.3)


def test_a_pickle_only_hub_repository_gets_the_conversion_advice(saved, tmp_path, monkeypatch, capsys):
  """A hub snapshot holds only the files load_clip asks for, never a pickle: the repository's file list
  tells a pickle-only repository from one that holds no weights at all."""
  import huggingface_hub

  from mat_jax.models import hub

  snapshot = tmp_path / "hub" / "models--someone--clip" / "snapshots" / "0123abc"  # the hub cache's layout
  snapshot.mkdir(parents=True)
  (snapshot / "config.json").write_text((saved / "config.json").read_text())
  monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns: str(snapshot))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(hub, "_hub_reachable", lambda endpoint: True)
  monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id: ["config.json", "pytorch_model.bin"])
  with pytest.raises(UnsafeCheckpointError, match=r"(?s)pytorch_model.bin of the hub repository someone/clip is a "
                                                  r"pickle checkpoint.*safetensors"):
    load_clip("someone/clip")
  # `python -m mat_jax.models inspect` gives the same advice (it loads the hub id, not its snapshot).
  from mat_jax.models.__main__ import main as models_cli
  assert models_cli(["inspect", "someone/clip"]) == 2
  assert "pytorch_model.bin of the hub repository someone/clip is a pickle checkpoint" in capsys.readouterr().err
  monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id: ["config.json"])
  # A cache that holds part of the repository: the fix is fetching the rest, not save_pretrained into it.
  with pytest.raises(ModelSourceError, match=r"(?s)has neither model.safetensors.*the hub cache's copy of "
                                             r"someone/clip, which holds only the files fetched so far.*"
                                             r"hf download someone/clip"):
    load_clip("someone/clip")
  # Without the network the hub is not asked (huggingface_hub would retry for ~25 s).
  monkeypatch.setattr(hub, "_hub_reachable", lambda endpoint: False)
  monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id: pytest.fail("asked an unreachable hub"))
  with pytest.raises(ModelSourceError, match="has neither model.safetensors"):
    load_clip("someone/clip")
  with pytest.raises(ModelSourceError, match=r"hub ids are loaded at their main revision; for revision 'v1' run\n"
                                             r"  hf download someone/clip --revision v1 --local-dir ./clip-v1"):
    load_clip("someone/clip@v1")


def test_config_json_that_is_not_an_object(saved, tmp_path):
  _copy(saved, tmp_path)
  (tmp_path / "config.json").write_text("[]")
  with pytest.raises(ConfigError, match=r"config.json is valid JSON but not an object"):
    load_clip(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoints_are_refused_unread(saved, tmp_path, name):
  (tmp_path / "config.json").write_text((saved / "config.json").read_text())
  # Not even a valid pickle: an attempt to unpickle would fail differently.
  (tmp_path / name).write_bytes(b"\x80\x04 not a pickle")
  with pytest.raises(UnsafeCheckpointError, match="safe_serialization=True"):
    load_clip(tmp_path)
  with pytest.raises(UnsafeCheckpointError, match="never unpickles"):
    load_bert_mlm(tmp_path / name)


def test_the_pickle_conversion_command_names_each_loaders_class(saved, tmp_path):
  """Each loader's refusal names the pickle file and converts it through the loader's own transformers class
  (load_bert_mlm's once said CLIPModel; load_blip's named only the directory)."""
  from mat_jax.models import load_blip

  (tmp_path / "config.json").write_text((saved / "config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle")
  for load, architecture in ((load_clip, "CLIPModel"), (load_bert_mlm, "BertForMaskedLM"),
                             (load_blip, "BlipForImageTextRetrieval")):
    with pytest.raises(UnsafeCheckpointError) as err:
      load(tmp_path)
    assert f"{tmp_path / 'pytorch_model.bin'} is a pickle checkpoint" in str(err.value)
    assert f"from transformers import {architecture} as M;" in str(err.value)
    assert "CLIPModel" not in str(err.value) or architecture == "CLIPModel"


def test_unsupported_activation(saved, tmp_path):
  _copy(saved, tmp_path, config_edit=lambda c: c["text_config"].update(hidden_act="swish"))
  with pytest.raises(ConfigError, match="hidden_act='swish' is not supported"):
    load_clip(tmp_path)


def test_other_unsupported_config_values_are_listed_together(saved, tmp_path):
  def edit(c):
    c["vision_config"].update(num_channels=1)
    c["text_config"]["num_attention_heads"] = 3
  _copy(saved, tmp_path, config_edit=edit)
  with pytest.raises(ConfigError) as err:
    load_clip(tmp_path)
  for part in ("num_channels=1", "not divisible by num_attention_heads 3"):
    assert part in str(err.value)


def test_wrong_model_type(saved, tmp_path):
  _copy(saved, tmp_path, config_edit=lambda c: c.update(model_type="siglip"))
  with pytest.raises(ConfigError, match="'siglip' model"):
    load_clip(tmp_path)


def test_invalid_json(saved, tmp_path):
  _copy(saved, tmp_path)
  (tmp_path / "config.json").write_text("{oops")
  with pytest.raises(ConfigError, match="not valid JSON"):
    load_clip(tmp_path)


def test_unknown_path_and_hub_id_offline(tmp_path, monkeypatch):
  with pytest.raises(ModelSourceError, match="no directory"):
    load_clip(tmp_path / "nowhere" / "deeper")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ModelSourceError, match="hf download some-org/some-model"):
    load_clip("some-org/some-model")
  # A bare legacy id (config.py's default BERT, bert-base-uncased) is a hub id too, not only a path.
  with pytest.raises(ModelSourceError, match="no local directory bert-base-uncased, and cannot obtain"):
    load_bert_mlm("bert-base-uncased")


def test_a_mistyped_local_path_that_reads_as_a_hub_id_names_the_directory_it_meant(saved, tmp_path, monkeypatch):
  (tmp_path / "local" / "noweights").mkdir(parents=True)
  _copy(saved, tmp_path / "local" / "noweights")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ModelSourceError, match=r"no local directory local/nowieghts \(did you mean local/noweights\?\)"):
    load_clip("local/nowieghts")


def test_legacy_eos_config_pools_at_the_largest_id(saved, tmp_path):
  def edit(c):
    c["text_config"]["eos_token_id"] = 2
  _copy(saved, tmp_path, config_edit=edit)
  assert load_clip(tmp_path).config.text.text_pooling == "argmax"


def test_older_config_dicts_fill_missing_keys_with_defaults_as_transformers_does():
  """transformers builds a full sub-config from *_config_dict (missing keys at its defaults) and overwrites
  *_config with all of it; the parity tests check the same against transformers itself."""
  from mat_jax.models.weights import clip_config_from_hf

  sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
  data = {"model_type": "clip", "projection_dim": 8,
          "text_config": {**sizes, "vocab_size": 50, "eos_token_id": 2, "bos_token_id": 0, "hidden_act": "gelu",
                          "layer_norm_eps": 1e-7},
          "text_config_dict": {**sizes, "vocab_size": 50, "layer_norm_eps": 1e-6},
          "vision_config": {**sizes, "image_size": 16, "patch_size": 8, "hidden_act": "gelu", "num_channels": 1},
          "vision_config_dict": {**sizes, "image_size": 16, "patch_size": 8}}
  cfg = clip_config_from_hf(data)  # num_channels 1 gives way to the default 3: no ConfigError
  defaults = TextConfig()
  assert (cfg.text.eos_token_id, cfg.text.bos_token_id, cfg.text.activation, cfg.vision.activation) == \
      (defaults.eos_token_id, defaults.bos_token_id, "quick_gelu", "quick_gelu")
  assert cfg.text.text_pooling == "eos"
  assert (cfg.text.layer_norm_eps, cfg.text.vocab_size, cfg.vision.image_size) == (1e-6, 50, 16)  # the dict's own
  # Without a *_config_dict, *_config is read as it is.
  plain = clip_config_from_hf({**data, "text_config_dict": None, "vision_config": data["vision_config_dict"],
                               "vision_config_dict": None})
  assert (plain.text.eos_token_id, plain.text.activation, plain.text.text_pooling) == (2, "gelu", "argmax")


def test_checkpoint_of_an_older_mat_jax_with_its_own_pooling_key(saved, tmp_path):
  def edit(legacy_pooling, eos):
    def apply(c):
      c["text_config"].update(mat_jax_pooling=legacy_pooling, eos_token_id=eos)
    return apply
  _copy(saved, tmp_path, config_edit=edit("eos", 3))  # agrees with transformers' rule: nothing to refuse
  assert load_clip(tmp_path).config.text.text_pooling == "eos"
  _copy(saved, tmp_path, config_edit=edit("eos", 2))  # eos 2 pooled at the first eos: not reproducible
  with pytest.raises(ConfigError, match="mat_jax_pooling='eos' .* older mat_jax.*retrain"):
    load_clip(tmp_path)


def test_pooling_is_derived_from_the_eos_id_as_transformers_does():
  text = TextConfig(eos_token_id=3)
  assert (text.pooling, text.text_pooling) == (None, "eos")
  # Derived on read: replacing the eos id re-derives it (no stale value copied by dataclasses.replace).
  assert dataclasses.replace(text, eos_token_id=2).text_pooling == "argmax"
  assert TextConfig(eos_token_id=2, pooling="eos").text_pooling == "eos"
  with pytest.raises(ValueError, match="unknown text pooling 'last'"):
    TextConfig(pooling="last")


@pytest.mark.parametrize("eos, pooling, fix", [(2, "eos", "id other than 2"), (3, "argmax", "leave pooling=None")])
def test_save_clip_refuses_a_pooling_transformers_cannot_reproduce(eos, pooling, fix, tmp_path):
  cfg = CFG.replace(text=dataclasses.replace(CFG.text, eos_token_id=eos, pooling=pooling))
  model = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))  # abstract: the check precedes any tensor
  with pytest.raises(ConfigError, match=f"pooling='{pooling}' with eos_token_id={eos}.*{fix}"):
    save_clip(model, tmp_path / "out")
  assert not (tmp_path / "out").exists()  # refused before writing anything


def test_bert_config_errors(tmp_path):
  base = {"model_type": "bert", "vocab_size": 40, "hidden_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "intermediate_size": 128}
  for extra, message in (({"position_embedding_type": "relative_key"}, "position_embedding_type"),
                         ({"tie_word_embeddings": False}, "tie_word_embeddings"),
                         ({"hidden_act": "mish"}, "hidden_act='mish'"),
                         ({"model_type": "roberta"}, "'roberta' model")):
    (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
    save_file({"x": np.zeros(1, np.float32)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=message):
      load_bert_mlm(tmp_path)


def test_bert_missing_tensors_listed(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 40, "hidden_size": 64,
                                                    "num_hidden_layers": 1, "num_attention_heads": 4,
                                                    "intermediate_size": 128}))
  save_file({"bert.embeddings.word_embeddings.weight": np.zeros((40, 64), np.float32)},
            tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(WeightsError) as err:
    load_bert_mlm(tmp_path)
  table = bert_table(bert_config("tiny", vocab_size=40, num_hidden_layers=1))
  assert err.value.missing == [e.theirs for e in table][1:]  # all but the word embeddings, in table order
  assert "cls.predictions.bias" in str(err.value)


def test_save_clip_refuses_a_directory_with_a_sharded_index(model, tmp_path):
  (tmp_path / "model.safetensors.index.json").write_text("{}")
  # A MatJaxError: the command lines report it in one line (exit 2); still a FileExistsError for callers.
  with pytest.raises(SaveDirectoryError, match="empty directory"):
    save_clip(model, tmp_path)


def test_save_clip_writes_the_tokenizer_beside_the_weights(model, tmp_path):
  from mat_jax.models import load_tokenizer

  vocab_dir = tmp_path / "vocab"
  vocab_dir.mkdir()
  (vocab_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "cat"]))
  tokenizer = load_tokenizer(vocab_dir, context_length=5)
  save_clip(model, tmp_path / "model", tokenizer=tokenizer)
  reloaded = load_tokenizer(tmp_path / "model")
  assert reloaded.context_length == CFG.text.context_length  # from the saved config.json
  assert reloaded(["red cat"]).input_ids.tolist() == [[2, 5, 6, 3, 0, 0, 0, 0]]
