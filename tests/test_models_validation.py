"""Bad input to the models fails early with a message that names the problem and the fix.

The models here are abstract (`nnx.eval_shape`): the checks run before any computation, at trace time
for shapes and dtypes and on the host for value ranges, so no parameters or compilations are needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mat_jax import checks
from mat_jax.errors import InputError
from mat_jax.models import BLIP, CLIP, BertForMaskedLM, bert_config, blip_config, check_token_ids, clip_config
from mat_jax.models.clip import TextConfig, VisionConfig

CFG = clip_config(
    "tiny",
    vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32),
    text=TextConfig(vocab_size=50, context_length=8, width=16, layers=1, heads=2, mlp_dim=32,
                    eos_token_id=3, bos_token_id=2, pad_token_id=0),
    projection_dim=8)
BERT = bert_config("tiny", vocab_size=40, max_position_embeddings=12, num_hidden_layers=1)


@pytest.fixture(scope="module")
def clip():
  return nnx.eval_shape(lambda: CLIP(CFG, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def bert():
  return nnx.eval_shape(lambda: BertForMaskedLM(BERT, rngs=nnx.Rngs(0)))


def _traced(model, method: str, *shapes_and_dtypes):
  """Trace `model.method` as jit would, on abstract inputs: shape and dtype errors surface here."""
  graphdef, state = nnx.split(model)
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes_and_dtypes]
  return jax.eval_shape(lambda s, *a: getattr(nnx.merge(graphdef, s), method)(*a), state, *args)


def test_valid_inputs_trace(clip, bert):
  assert _traced(clip, "encode_image", ((4, 16, 16, 3), jnp.float32)).shape == (4, 8)
  assert _traced(clip, "encode_text", ((4, 8), jnp.int32), ((4, 8), jnp.int32)).shape == (4, 8)
  assert _traced(clip, "encode_text", ((4, 5), jnp.int32), ((4, 5), jnp.int32)).shape == (4, 8)
  assert _traced(bert, "__call__", ((2, 12), jnp.int32), ((2, 12), jnp.int32)).shape == (2, 12, 40)


def test_concrete_pixels_closed_over_by_a_jitted_function_are_checked_and_encoded():
  # A device array a jitted function closes over is concrete: its values are checked at once, not turned
  # into traced statistics that cannot be read (a ConcretizationTypeError in every model).
  rng = np.random.default_rng(0)
  for model in (CLIP(CFG, rngs=nnx.Rngs(0)), BLIP(blip_config("blip-tiny"), rngs=nnx.Rngs(0))):
    size = model.config.vision.image_size
    images = jnp.asarray(rng.random((2, size, size, 3), dtype=np.float32))
    closed_over = jax.jit(lambda model=model, images=images: model.encode_image(images))
    np.testing.assert_allclose(closed_over(), model.encode_image(images), atol=1e-5)
  too_bright = images * 2  # concrete, closed over: its values are read and refused
  with pytest.raises(InputError, match=r"\[0, 1\]"):
    jax.jit(lambda: checks.check_images(too_bright))()


@pytest.mark.parametrize("shape,dtype,message", [
    ((2, 3, 16, 16), jnp.float32, r"channels-first \(NCHW\): transpose it with x.transpose\(0, 2, 3, 1\)"),
    ((2, 32, 32, 3), jnp.float32, r"got \(2, 32, 32, 3\): resize them to the model's image_size 16"),
    ((16, 16, 3), jnp.float32, r"needs a batch axis: x\[None\]"),
    ((2, 16, 16, 3), jnp.uint8, r"x.astype\(np.float32\) / 255"),
])
def test_bad_image_shape_or_dtype_fails_at_trace_time(clip, shape, dtype, message):
  with pytest.raises(ValueError, match=message):
    _traced(clip, "encode_image", (shape, dtype))


@pytest.mark.parametrize("value,advice", [
    (1.5, "divide by 255"), (-0.2, r"\(x \+ 1\) / 2"), (-3.0, "the model applies the CLIP mean/std itself"),
    (np.nan, "1 NaN value"), (np.inf, "1 inf value")])
def test_pixels_outside_unit_range_fail_on_concrete_input(clip, value, advice):
  images = np.full((1, 16, 16, 3), 0.5, np.float32)
  images[0, 3, 4, 1] = value
  with pytest.raises(ValueError, match=advice):
    clip.encode_image(images)


def test_ids_longer_than_the_context(clip):
  with pytest.raises(ValueError, match=r"length 9 but the text model has 8 positions.*context_length=8"):
    _traced(clip, "encode_text", ((2, 9), jnp.int32), ((2, 9), jnp.int32))


@pytest.mark.parametrize("ids,mask,message", [
    (((2, 8), jnp.int32), ((2, 7), jnp.int32),
     r"attention_mask shape \(2, 7\) differs from input_ids shape \(2, 8\)"),
    (((8,), jnp.int32), ((8,), jnp.int32), r"shape \(batch, length\), got \(8,\)"),
    (((2, 8), jnp.float32), ((2, 8), jnp.int32), r"must be integers, got dtype float32"),
    (((2, 0), jnp.int32), ((2, 0), jnp.int32), r"have length 0 \(shape \(2, 0\)\): no tokens at all"),
])
def test_bad_token_shapes_fail_at_trace_time(clip, ids, mask, message):
  with pytest.raises(ValueError, match=message):
    _traced(clip, "encode_text", ids, mask)


@pytest.mark.parametrize("bad_id", [50, 1000, -1])
def test_token_ids_outside_the_vocabulary(clip, bad_id):
  ids = np.array([[2, 5, bad_id, 3, 0, 0, 0, 0]], np.int32)
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\).*tokenizer does not match the model"):
    clip.encode_text(ids, np.ones_like(ids))


def test_one_check_token_ids_for_every_model():
  # mat_jax.models exports the check CLIP, BLIP and BERT run: shape, dtype, length and mask, then the range.
  assert check_token_ids is checks.check_token_ids
  check_token_ids(np.array([[0, 49]]), np.ones((1, 2)), 8, 50)
  for ids, message in [(np.array([[1.5, 2.0]]), "must be integers"), (np.array([1, 2]), r"shape \(batch, length\)"),
                       (np.zeros((1, 0), np.int32), "length 0"), (np.zeros((0, 2), np.int32), "empty batch"),
                       (np.array([[0, 50]]), r"must lie in \[0, 50\)")]:
    with pytest.raises(InputError, match=message):
      check_token_ids(ids, np.ones(ids.shape), 8, 50)
  with pytest.raises(InputError, match="attention_mask shape"):
    check_token_ids(np.array([[0, 1]]), np.ones((1, 3)), 8, 50)


def test_bert_input_errors(bert):
  with pytest.raises(InputError, match="the text model has 12 positions"):
    _traced(bert, "__call__", ((2, 13), jnp.int32), ((2, 13), jnp.int32))
  with pytest.raises(InputError, match=r"token_type_ids shape \(2, 5\) differs"):
    _traced(bert, "__call__", ((2, 6), jnp.int32), ((2, 6), jnp.int32), ((2, 5), jnp.int32))
  ids = np.array([[2, 5, 3]], np.int32)
  with pytest.raises(InputError, match=r"token_type_ids: token ids must lie in \[0, 2\)"):
    bert(ids, np.ones_like(ids), np.full_like(ids, 2))
  with pytest.raises(InputError, match=r"input_ids: token ids must lie in \[0, 40\)"):
    bert(np.array([[2, 45, 3]], np.int32), np.ones_like(ids))
  # The checks CLIP and BLIP run: an empty batch or a text of no tokens fails before the model runs.
  with pytest.raises(InputError, match=r"input_ids is an empty batch"):
    _traced(bert, "__call__", ((0, 3), jnp.int32), ((0, 3), jnp.int32))
  with pytest.raises(InputError, match=r"input_ids have length 0"):
    bert(np.zeros((1, 0), np.int32), np.zeros((1, 0), np.int32))
  with pytest.raises(InputError, match=r"token_type_ids must be integers"):
    bert(ids, np.ones_like(ids), np.zeros(ids.shape, np.float32))


@pytest.fixture(scope="module")
def blip():
  return nnx.eval_shape(lambda: BLIP(blip_config("blip-tiny"), rngs=nnx.Rngs(0)))


def test_blip_empty_text_batch_fails_as_clip_does(blip, clip):
  message = r"input_ids is an empty batch \(shape \(0, 3\)\); pass at least one text"
  for model in (blip, clip):
    with pytest.raises(InputError, match=message):
      _traced(model, "encode_text", ((0, 3), jnp.int32), ((0, 3), jnp.int32))


def test_blip_itm_needs_one_text_per_image(blip):
  # The ITM scores image i with text i.
  with pytest.raises(InputError, match="there are 2 images and 3 texts; pass as many texts as images"):
    _traced(blip, "itm_logits", ((2, 48, 48, 3), jnp.float32), ((3, 5), jnp.int32), ((3, 5), jnp.int32))
  assert _traced(blip, "itm_logits", ((2, 48, 48, 3), jnp.float32), ((2, 5), jnp.int32),
                 ((2, 5), jnp.int32)).shape == (2, 2)


def test_unknown_preset_and_pooling():
  with pytest.raises(ValueError, match="available"):
    clip_config("vit-h-14")
  with pytest.raises(ValueError, match="unknown text pooling 'mean'"):
    nnx.eval_shape(lambda: CLIP(CFG.replace(text=TextConfig(pooling="mean")), rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------------------------------
# config.json values of the wrong type: named with the file, the key, the value and the type expected,
# instead of a TypeError from the arithmetic they reach (`width % heads` on a string).


def _clip_json(edit) -> dict:
  from mat_jax.models.weights import clip_config_to_hf
  data = clip_config_to_hf(CFG)
  edit(data)
  return data


@pytest.mark.parametrize("edit, line", [
    (lambda d: d["vision_config"].update(hidden_size="256"),
     r'vision_config.hidden_size: "256" is a string, expected an integer'),
    (lambda d: d["text_config"].update(layer_norm_eps="1e-5"),
     r'text_config.layer_norm_eps: "1e-5" is a string, expected a number'),
    (lambda d: d["vision_config"].update(num_attention_heads=True),
     r"vision_config.num_attention_heads: true is a boolean, expected an integer"),
    (lambda d: d["text_config"].update(eos_token_id=3.0),
     r"text_config.eos_token_id: 3.0 is a floating-point number, expected an integer"),
    (lambda d: d["text_config"].update(hidden_act=["gelu"]),
     r'text_config.hidden_act: \["gelu"\] is a list, expected a string'),
    (lambda d: d["vision_config"].update(num_channels="3"),
     r'vision_config.num_channels: "3" is a string, expected an integer'),
    (lambda d: d.update(projection_dim="8"), r'projection_dim: "8" is a string, expected an integer'),
    (lambda d: d.update(logit_scale_init_value="2.66"),
     r'logit_scale_init_value: "2.66" is a string, expected a number'),
    (lambda d: d.update(vision_config="ViT-B/32"),
     r'vision_config: "ViT-B/32" is a string, expected an object \{\.\.\.\}'),
], ids=["int-as-string", "float-as-string", "bool", "float-for-int", "list", "channels", "projection_dim",
        "logit_scale", "sub-config"])
def test_clip_config_value_of_the_wrong_type_is_named(edit, line):
  from mat_jax.models.weights import ConfigError, clip_config_from_hf
  with pytest.raises(ConfigError, match=rf"^/m/config.json holds values of the wrong type:\n  {line}\n"):
    clip_config_from_hf(_clip_json(edit), source="/m/config.json")


def test_clip_config_reports_every_wrong_type_and_takes_ints_for_floats():
  from mat_jax.models.weights import ConfigError, clip_config_from_hf

  def two(d):
    d["vision_config"]["hidden_size"] = "16"
    d["text_config"]["num_hidden_layers"] = "1"
  with pytest.raises(ConfigError, match=r"vision_config.hidden_size: .*\n  text_config.num_hidden_layers: "):
    clip_config_from_hf(_clip_json(two))
  # JSON writes 1e-5 as a float, but an integer is a number too; null means the default, as before.
  cfg = clip_config_from_hf(_clip_json(lambda d: d["vision_config"].update(layer_norm_eps=0, hidden_act=None)))
  assert cfg.vision.layer_norm_eps == 0 and cfg.vision.activation == VisionConfig().activation


def test_older_config_dict_is_checked_in_place_of_the_config_it_overrides():
  from mat_jax.models.weights import ConfigError, clip_config_from_hf

  def dict_only(d):
    d["vision_config_dict"] = {**d["vision_config"], "hidden_size": "16"}
  with pytest.raises(ConfigError, match=r'vision_config_dict.hidden_size: "16" is a string'):
    clip_config_from_hf(_clip_json(dict_only))

  # transformers reads *_config_dict over *_config: a bad value it overrides is never used.
  def shadowed(d):
    d["vision_config_dict"] = dict(d["vision_config"])
    d["vision_config"]["hidden_size"] = "16"
  assert clip_config_from_hf(_clip_json(shadowed)).vision.width == CFG.vision.width


def test_blip_and_bert_config_values_of_the_wrong_type_are_named():
  from mat_jax.models.blip import blip_config_from_hf, blip_config_to_hf
  from mat_jax.models.weights import ConfigError, bert_config_from_hf, bert_config_to_hf

  blip = blip_config_to_hf(blip_config("blip-tiny"))
  blip["text_config"]["hidden_size"] = "192"
  blip["text_config"]["max_position_embeddings"] = "24"
  blip["image_text_hidden_size"] = 1.5
  with pytest.raises(ConfigError, match=r"^/b/config.json holds values of the wrong type:\n"
                                        r"  image_text_hidden_size: 1.5 is a floating-point number, expected an "
                                        r'integer\n  text_config.max_position_embeddings: "24" is a string'):
    blip_config_from_hf(blip, source="/b/config.json")
  with pytest.raises(ConfigError, match=r'text_config: \[\] is a list, expected an object'):
    blip_config_from_hf({**blip_config_to_hf(blip_config("blip-tiny")), "text_config": []})
  data = bert_config_to_hf(BERT)
  data["num_attention_heads"] = "4"
  with pytest.raises(ConfigError, match=r'^/t/config.json holds values of the wrong type:\n  num_attention_heads: '
                                        r'"4" is a string, expected an integer'):
    bert_config_from_hf(data, source="/t/config.json")


def test_load_clip_and_models_inspect_name_the_config_file(tmp_path, capsys):
  import json

  from safetensors.numpy import save_file

  from mat_jax.models import load_clip
  from mat_jax.models.__main__ import main as models_cli
  from mat_jax.models.weights import ConfigError

  # The config is read before any tensor, so one placeholder tensor makes a directory to load.
  save_file({"logit_scale": np.zeros((), np.float32)}, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(_clip_json(lambda d: d["vision_config"].update(hidden_size="256"))))
  line = rf'{tmp_path}/config.json holds values of the wrong type:\n  vision_config.hidden_size: "256" is a string'
  with pytest.raises(ConfigError, match=line):
    load_clip(tmp_path)
  assert models_cli(["inspect", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {tmp_path}/config.json holds values of the wrong type") and "Traceback" not in err
