"""BLIP retrieval: parity with transformers' PyTorch BlipForImageTextRetrieval on tiny random checkpoints,
the save/load round trip, and the loaders' errors.

Odd sizes throughout (34 px images in patches of 10, whose last 4 rows and columns the patch convolution
drops; 5 heads of 8 in the image encoder, 36-wide text with 4 heads, a 20-wide ITC space, image and text
widths that differ so that the cross-attention's key/value shapes are exercised), texts of different
lengths padded. Float32 at the highest matmul precision.
"""

from __future__ import annotations

import dataclasses

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from mat_jax import runs  # noqa: E402
from mat_jax.models import BLIP, blip_config, load_blip, load_clip, save_blip, split  # noqa: E402
from mat_jax.models.weights import ConfigError, UnsafeCheckpointError, WeightsError  # noqa: E402

TOL = 1e-5
VOCAB = 99
CLS, SEP, PAD = 5, 6, 0


def _hf_blip():
  torch.manual_seed(0)
  cfg = transformers.BlipConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=36, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=14, bos_token_id=CLS, sep_token_id=SEP,
                       pad_token_id=PAD),
      # The vision config's own initializer_range is 1e-10: its weights would be all but zero, its attention
      # and MLP mapping untested. The text config's 0.02 instead.
      vision_config=dict(hidden_size=40, intermediate_size=43, num_hidden_layers=2, num_attention_heads=5,
                         image_size=34, patch_size=10, initializer_range=0.02),
      image_text_hidden_size=20, logit_scale_init_value=2.5)
  model = transformers.BlipForImageTextRetrieval(cfg).eval()
  with torch.no_grad():  # every bias, LN and embedding off its init: a zero or unit init hides mapping mistakes
    for name, p in model.named_parameters():
      if p.ndim == 1 or "embedding" in name or "LayerNorm" in name or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _texts(length: int = 14) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(1)
  ids = np.full((4, length), PAD, np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate([1, 4, 7, length - 2]):
    ids[row, : n + 2] = [CLS, *rng.integers(10, VOCAB, n), SEP]
    mask[row, : n + 2] = 1
  return ids, mask


def _images(n: int = 4, size: int = 34) -> np.ndarray:
  return np.random.default_rng(2).random((n, size, size, 3), dtype=np.float32)


def _torch_outputs(model, images, ids, mask):
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
  pixels = (torch.from_numpy(images.transpose(0, 3, 1, 2).copy()) - mean) / std
  ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  with torch.no_grad():
    image_cls = model.vision_model(pixel_values=pixels).last_hidden_state[:, 0]
    text_cls = model.text_encoder(input_ids=ids_t, attention_mask=mask_t).last_hidden_state[:, 0]
    img = torch.nn.functional.normalize(model.vision_proj(image_cls), dim=-1).numpy()
    txt = torch.nn.functional.normalize(model.text_proj(text_cls), dim=-1).numpy()
    itm = model(input_ids=ids_t, pixel_values=pixels, attention_mask=mask_t, use_itm_head=True).itm_score.numpy()
    itc = model(input_ids=ids_t, pixel_values=pixels, attention_mask=mask_t, use_itm_head=False).itm_score.numpy()
  return img, txt, itm, itc


def _our_outputs(model: BLIP, images, ids, mask):
  with jax.default_matmul_precision("highest"):
    img = jax.jit(lambda m, x: m.image_features(x))(model, images)
    txt = jax.jit(lambda m, i, k: m.text_features(i, k))(model, ids, mask)
    itm = jax.jit(lambda m, x, i, k: m.itm_logits(x, i, k))(model, images, ids, mask)
  return np.asarray(img), np.asarray(txt), np.asarray(itm)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  hf = _hf_blip()
  directory = tmp_path_factory.mktemp("blip")
  hf.save_pretrained(directory, safe_serialization=True)
  ids, mask = _texts()
  images = _images()
  ours = load_blip(directory)
  return dict(hf=hf, dir=directory, ours=ours, images=images, ids=ids, mask=mask,
              reference=_torch_outputs(hf, images, ids, mask), outputs=_our_outputs(ours, images, ids, mask))


def test_features_and_itm_match_transformers(case):
  ref_img, ref_txt, ref_itm, ref_itc = case["reference"]
  img, txt, itm = case["outputs"]
  assert img.shape == (4, 20) and txt.shape == (4, 20) and itm.shape == (4, 2)
  np.testing.assert_allclose(img, ref_img, atol=TOL, rtol=0)
  np.testing.assert_allclose(txt, ref_txt, atol=TOL, rtol=0)
  np.testing.assert_allclose(itm, ref_itm, atol=TOL, rtol=0)
  np.testing.assert_allclose(img @ txt.T, ref_itc, atol=TOL, rtol=0)
  # The padded rows must matter: without the mask the features would differ.
  with jax.default_matmul_precision("highest"):
    unmasked = np.asarray(case["ours"].text_features(case["ids"], np.ones_like(case["mask"])))
  assert np.abs(unmasked[:3] - txt[:3]).max() > 1e-3


def test_rematerialised_blocks_give_the_same_features_and_gradients(case):
  """`remat` changes what the backward pass keeps, not what it computes: features, ITM logits and the pixel
  gradient of BLIP with every block rematerialised equal the plain model's."""
  remat = runs.with_options(case["ours"], remat="nothing_saveable")
  assert remat.config.remat == "nothing_saveable" and remat.vision.remat == remat.text.remat == "nothing_saveable"
  for got, want in zip(_our_outputs(remat, case["images"], case["ids"], case["mask"]), case["outputs"], strict=True):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)

  def pixel_grad(model):
    with jax.default_matmul_precision("highest"):
      return np.asarray(jax.jit(jax.grad(lambda m, x: jnp.sum(m.image_features(x) * m.text_features(
          case["ids"], case["mask"])), argnums=1))(model, case["images"]))

  np.testing.assert_allclose(pixel_grad(remat), pixel_grad(case["ours"]), atol=1e-6, rtol=0)


def test_tokens_the_image_encoder_adds_for_fused_attention_change_nothing(monkeypatch):
  """BLIP's ViT run on extra tokens (`layers.tower_length`, as on the cuDNN path with an even length
  multiple), hidden as keys and dropped after the blocks, gives the same image features, image tokens (what
  the text attends to) and pixel gradient. On blip-tiny with its own random weights (the transformers
  fixture's attention projections are all zero, so no token could change anything there)."""
  from flax import nnx

  from mat_jax.models import BLIP, blip_config, layers

  model = BLIP(blip_config("blip-tiny"), rngs=nnx.Rngs(0))
  images = jnp.asarray(_images(2, 48))

  def outputs():
    with jax.default_matmul_precision("highest"):
      features = jax.jit(lambda m, x: m.image_features(x))(model, images)
      tokens = jax.jit(lambda m, x: m.image_tokens(x))(model, images)
      grad = jax.jit(jax.grad(lambda m, x: jnp.sum(m.image_features(x) ** 2), argnums=1))(model, images)
    return [np.asarray(x) for x in (features, tokens, grad)]

  want = outputs()
  lengths = []
  def padded(length, attention, dtype):
    lengths.append(length)
    return length + 3
  monkeypatch.setattr(layers, "tower_length", padded)
  jax.clear_caches()  # the blocks' shared programs were traced without the added tokens
  for got, expected in zip(outputs(), want, strict=True):
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
  assert lengths and set(lengths) == {1 + (48 // 16) ** 2}  # the class token and the patches
  jax.clear_caches()


def test_logit_scale_comes_from_config(case):
  assert float(case["ours"].logit_scale[...]) == pytest.approx(2.5)


def test_a_config_without_the_temperature_gets_transformers_default():
  from mat_jax.models.blip import blip_config_from_hf

  data = transformers.BlipConfig().to_dict()
  default = data.pop("logit_scale_init_value")
  assert blip_config_from_hf(data).logit_scale_init == default
  assert blip_config_from_hf({**data, "logit_scale_init_value": None}).logit_scale_init == default  # null: the default


def test_dual_encoder_view_matches_the_module(case):
  encoder, params = split(case["ours"])
  with jax.default_matmul_precision("highest"):
    img = jax.jit(encoder.image_embeddings)(params, case["images"])
    txt = jax.jit(encoder.text_embeddings)(params, case["ids"][None], case["mask"][None])[0]
    # The text attack's whole-text continuation: ids alone, padding masked by the pad id.
    cont = np.asarray(jax.jit(encoder.text_features_continued)(params, (), np.zeros(4, np.int32), case["ids"]))
  np.testing.assert_allclose(img, case["outputs"][0], atol=TOL, rtol=0)
  np.testing.assert_allclose(txt, case["outputs"][1], atol=TOL, rtol=0)
  np.testing.assert_allclose(cont / np.linalg.norm(cont, axis=-1, keepdims=True), case["outputs"][1], atol=TOL,
                             rtol=0)
  assert float(encoder.logit_scale(params)) == pytest.approx(2.5)


def test_the_continuation_masks_as_the_tokenizer_when_padding_is_the_end_token(case):
  # A tokenizer that pads with its end token (as CLIP's do): the text attack's whole-text continuation must
  # keep the end token and mask only what follows it, as the tokenizer's mask does.
  ours = case["ours"]
  text = ours.config.text
  padded_with_end = BLIP(ours.config.replace(text=dataclasses.replace(text, pad_token_id=text.sep_token_id)),
                         rngs=nnx.Rngs(0))
  nnx.update(padded_with_end, nnx.state(ours))
  encoder, params = split(padded_with_end)
  ids, mask = case["ids"].copy(), case["mask"]
  ids[ids == text.pad_token_id] = text.sep_token_id
  with jax.default_matmul_precision("highest"):
    cont = np.asarray(encoder.text_features_continued(params, (), np.zeros(4, np.int32), ids))
    whole = np.asarray(encoder.text_features(params, ids, mask))
  np.testing.assert_allclose(cont, whole, atol=TOL, rtol=0)


def test_save_blip_round_trips_through_transformers(case, tmp_path):
  model = case["ours"]
  model.logit_scale[...] = 3.25  # a trained temperature travels in config.json
  try:
    save_blip(split(model), tmp_path)
  finally:
    model.logit_scale[...] = 2.5
  reloaded = transformers.BlipForImageTextRetrieval.from_pretrained(tmp_path).eval()
  img, txt, itm, _ = _torch_outputs(reloaded, case["images"], case["ids"], case["mask"])
  ours_img, ours_txt, ours_itm = case["outputs"]
  np.testing.assert_allclose(img, ours_img, atol=TOL, rtol=0)
  np.testing.assert_allclose(txt, ours_txt, atol=TOL, rtol=0)
  np.testing.assert_allclose(itm, ours_itm, atol=TOL, rtol=0)
  again = load_blip(tmp_path)
  assert float(again.logit_scale[...]) == pytest.approx(3.25)
  assert again.config == model.config.replace(logit_scale_init=3.25)


def test_fresh_model_saves_and_loads(case, tmp_path):
  model = BLIP(case["ours"].config.replace(logit_scale_init=blip_config("blip-tiny").logit_scale_init),
               rngs=nnx.Rngs(0))
  save_blip(model, tmp_path)
  loaded = load_blip(tmp_path, context_length=model.config.text.context_length)
  assert loaded.config == model.config
  with pytest.raises(ValueError, match="context_length"):  # 0 used to mean the default
    load_blip(tmp_path, context_length=0)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                               nnx.to_flat_state(nnx.state(loaded, nnx.Param)), strict=True):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_a_saved_processors_image_settings_are_read_as_transformers_reads_them(case, tmp_path):
  import transformers

  _copy(case, tmp_path)
  (tmp_path / "preprocessor_config.json").unlink(missing_ok=True)  # BlipProcessor writes only the nested file
  settings = {**transformers.BlipImageProcessor().to_dict(), "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25] * 3}
  (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "BlipProcessor",
                                                              "image_processor": settings}))
  reference = transformers.AutoImageProcessor.from_pretrained(tmp_path)
  vision = load_blip(tmp_path).config.vision
  assert vision.image_mean == tuple(reference.image_mean) and vision.image_std == tuple(reference.image_std)
  assert vision.image_std == (0.25, 0.25, 0.25)


def _copy(case, tmp_path, *, tensors=None, config=None):
  for f in case["dir"].iterdir():
    shutil.copy(f, tmp_path / f.name)
  if tensors is not None:
    save_file(tensors(load_file(str(tmp_path / "model.safetensors"))), str(tmp_path / "model.safetensors"))
  if config is not None:
    data = json.loads((tmp_path / "config.json").read_text())
    config(data)
    (tmp_path / "config.json").write_text(json.dumps(data))
  return tmp_path


def test_bad_tensors_are_all_listed(case, tmp_path):
  def edit(t):
    del t["itm_head.weight"]
    del t["text_encoder.encoder.layer.1.crossattention.self.key.bias"]
    t["vision_proj.weight"] = np.zeros((21, 40), np.float32)
    t["extra.weight"] = np.zeros(3, np.float32)
    return t
  with pytest.raises(WeightsError) as err:
    load_blip(_copy(case, tmp_path, tensors=edit))
  assert sorted(err.value.missing) == ["itm_head.weight", "text_encoder.encoder.layer.1.crossattention.self.key.bias"]
  assert err.value.unexpected == ["extra.weight"]
  assert len(err.value.mismatched) == 1 and "vision_proj.weight: (21, 40)" in err.value.mismatched[0]
  assert "BlipForImageTextRetrieval" in str(err.value)
  assert "open_clip" not in str(err.value)  # other layouts' names are a CLIP matter


def test_blip_dir_to_load_clip_and_the_reverse(case, tmp_path_factory):
  with pytest.raises(ConfigError, match=r"BlipForImageTextRetrieval.*load_blip"):
    load_clip(case["dir"])
  clip_dir = tmp_path_factory.mktemp("clip")
  torch.manual_seed(0)
  transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                       vocab_size=VOCAB, max_position_embeddings=12),
      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                         image_size=32, patch_size=16))).save_pretrained(clip_dir, safe_serialization=True)
  with pytest.raises(ConfigError, match=r"CLIPModel.*load_clip"):
    load_blip(clip_dir)


def test_encoder_hidden_size_is_the_vision_width_as_in_transformers(case, tmp_path):
  # transformers' BlipConfig overwrites text_config.encoder_hidden_size with vision_config.hidden_size.
  directory = _copy(case, tmp_path, config=lambda c: c["text_config"].update(encoder_hidden_size=768))
  assert transformers.BlipConfig.from_pretrained(directory).text_config.encoder_hidden_size == 40
  assert load_blip(directory).config == case["ours"].config


def test_other_blip_heads_are_refused(case, tmp_path):
  directory = _copy(case, tmp_path, config=lambda c: c.update(architectures=["BlipForConditionalGeneration"]))
  with pytest.raises(ConfigError, match=r"BlipForConditionalGeneration.*BlipForImageTextRetrieval"):
    load_blip(directory)


def test_pickles_are_refused(case, tmp_path):
  (tmp_path / "config.json").write_text((case["dir"] / "config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(UnsafeCheckpointError, match="BlipForImageTextRetrieval"):
    load_blip(tmp_path)
  with pytest.raises(UnsafeCheckpointError, match="never unpickles"):
    load_blip(tmp_path / "pytorch_model.bin")


def test_offline_hub_id_names_the_fix(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="hf download Salesforce/blip-itm-base-coco"):
    load_blip("Salesforce/blip-itm-base-coco")


def test_the_patch_bias_gradient_is_summed_in_float32_under_bf16_compute():
  """The patch bias's gradient sums over every patch of the batch (9,216 rows here). Added on (B, patches, W)
  tokens, XLA:CPU summed it in bf16 (3.6% off float32's gradient); added on (B * patches, W) rows, as
  layers.Dense adds its bias, the sum runs in float32 and the error is bf16's rounding of the activations,
  as the position embedding's (0.9%)."""
  import jax.numpy as jnp

  from mat_jax.models.blip import BlipVisionConfig, VisionEncoder

  cfg = BlipVisionConfig(image_size=48, patch_size=4, width=16, layers=1, heads=2, mlp_dim=32)
  pixels = jax.random.uniform(jax.random.key(1), (64, 48, 48, 3))
  weights = jax.random.normal(jax.random.key(2), (64, cfg.num_patches + 1, cfg.width)) + 0.5

  def grads(dtype):
    graphdef, state = nnx.split(VisionEncoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(pixels).astype(jnp.float32) * weights)))(state)

  with jax.default_matmul_precision("highest"):
    exact, bf16 = grads(jnp.float32), grads(jnp.bfloat16)

  def error(name):
    a, b = np.asarray(exact[name][...]), np.asarray(bf16[name][...])
    return np.linalg.norm(a - b) / np.linalg.norm(a)

  assert error("patch_bias") < 0.02, (error("patch_bias"), error("position_embedding"))
