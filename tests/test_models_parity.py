"""Parity with transformers' PyTorch CLIPModel and BertForMaskedLM on tiny random checkpoints.

Each case builds a transformers model in the test, saves it with safetensors, loads it with mat_jax and
compares outputs in float32 at the highest matmul precision. Inputs are batched so that each case
compiles each tower once.
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from flax import nnx  # noqa: E402

from mat_jax.models import load_bert_mlm, load_clip, save_clip, split  # noqa: E402
from mat_jax.models.weights import CorruptWeightsError, WeightsError  # noqa: E402

TOL = 1e-5
VOCAB = 99

# Two CLIP cases: legacy eos_token_id 2 (pool at the largest id) with quick_gelu at 48 px / patch 8, and
# a real eos id (pool at its first occurrence, padding with that same id as OpenAI's tokenizer does) with
# gelu at 40 px / patch 16 (not a multiple: the patch convolution drops the last 8 rows and columns).
CLIP_CASES = {
    "legacy_eos_quick_gelu_48px": dict(act="quick_gelu", image=48, patch=8, bos=0, eos=2, pad=1),
    "real_eos_gelu_40px": dict(act="gelu", image=40, patch=16, bos=3, eos=4, pad=4),
}


def _hf_clip(act: str, image: int, patch: int, bos: int, eos: int, pad: int):
  torch.manual_seed(0)
  common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                hidden_act=act)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, max_position_embeddings=12, bos_token_id=bos, eos_token_id=eos,
                       pad_token_id=pad, **common),
      vision_config=dict(image_size=image, patch_size=patch, **common),
      projection_dim=24, logit_scale_init_value=2.0)
  return _perturbed(transformers.CLIPModel(cfg).eval())


def _perturbed(model):
  with torch.no_grad():  # every bias and LN parameter and the class embedding off their init (zeros and ones,
    # under which a bias mapped to the wrong place, or not at all, would go unseen; transformers spells the
    # vision tower's first LN "pre_layrnorm")
    for name, p in model.named_parameters():
      if p.ndim == 1 or "class_embedding" in name:
        p.add_(0.1 * torch.randn_like(p))
      # Token states whose channels share an offset large next to their spread, as trained checkpoints'
      # residual streams have: a LayerNorm variance taken as E[x²] - E[x]² loses digits to cancellation
      # (measured: image features off by 2-8e-5, text features by 1e-4). The text tower's states spread
      # less, so a smaller offset keeps the problem well conditioned for the exact formula.
      if "position_embedding" in name:
        p.add_(3.0 if "vision" in name else 0.5)
  return model


def _texts(bos: int, eos: int, pad: int, length: int = 12) -> tuple[np.ndarray, np.ndarray]:
  """Captions of different lengths (one fills the context), padded. Word ids avoid the specials; with a
  real eos id the largest id is a word, so pooling at the wrong place changes the result."""
  rng = np.random.default_rng(1)
  lengths = [1, 4, 7, length - 2]
  high = VOCAB - 1 if eos == VOCAB - 1 else VOCAB
  ids = np.full((len(lengths), length), pad, np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    ids[row, : n + 2] = [bos, *rng.integers(5, high, n), eos]
    mask[row, : n + 2] = 1
  return ids, mask


def _legacy_texts() -> tuple[np.ndarray, np.ndarray]:
  """As with CLIP's BPE under a legacy config (eos_token_id 2): the end token is the largest id."""
  return _texts(bos=0, eos=VOCAB - 1, pad=1)


def _images(size: int) -> np.ndarray:
  return np.random.default_rng(2).random((3, size, size, 3), dtype=np.float32)


def _torch_features(model, images: np.ndarray, ids: np.ndarray, mask: np.ndarray):
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
  pixels = (torch.from_numpy(images.transpose(0, 3, 1, 2).copy()) - mean) / std
  with torch.no_grad():
    img = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    txt = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                  attention_mask=torch.from_numpy(mask).long()).pooler_output.numpy()
  return img, txt


def _our_features(model, images, ids, mask):
  encoder, params = split(model)
  with jax.default_matmul_precision("highest"):
    img = jax.jit(encoder.image_features)(params, images)
    txt = jax.jit(encoder.text_features)(params, ids, mask)
  return np.asarray(img), np.asarray(txt)


_BUILT: dict[str, dict] = {}


def _clip_case(name: str, tmp_path_factory) -> dict:
  """Built once per module run: the transformers model, its directory, our load and both outputs."""
  if name not in _BUILT:
    spec = CLIP_CASES[name]
    hf = _hf_clip(**spec)
    directory = tmp_path_factory.mktemp(name)
    hf.save_pretrained(directory, safe_serialization=True)
    ids, mask = _legacy_texts() if spec["eos"] == 2 else _texts(spec["bos"], spec["eos"], spec["pad"])
    images = _images(spec["image"])
    ours = load_clip(directory)
    _BUILT[name] = dict(spec=spec, hf=hf, dir=directory, ours=ours, images=images, ids=ids, mask=mask,
                        reference=_torch_features(hf, images, ids, mask),
                        features=_our_features(ours, images, ids, mask))
  return _BUILT[name]


@pytest.fixture(scope="module", params=list(CLIP_CASES))
def clip_case(request, tmp_path_factory):
  return _clip_case(request.param, tmp_path_factory)


def test_clip_image_and_text_features_match_transformers(clip_case):
  (ref_img, ref_txt), (img, txt) = clip_case["reference"], clip_case["features"]
  assert img.shape == (3, 24) and txt.shape == (4, 24)
  np.testing.assert_allclose(img, ref_img, atol=TOL, rtol=0)
  np.testing.assert_allclose(txt, ref_txt, atol=TOL, rtol=0)
  assert float(clip_case["ours"].logit_scale[...]) == pytest.approx(2.0)


def test_clip_pooling_follows_the_config(clip_case):
  text = clip_case["ours"].config.text
  assert text.text_pooling == ("argmax" if clip_case["spec"]["eos"] == 2 else "eos")
  # The inputs are built so that the other rule pools elsewhere, i.e. the parity above can fail.
  ids, _mask = clip_case["ids"], clip_case["mask"]
  first_eos = np.argmax(ids == text.eos_token_id, axis=-1)
  assert (first_eos != np.argmax(ids, axis=-1)).any()


def test_save_clip_round_trips_through_transformers(clip_case, tmp_path):
  save_clip(clip_case["ours"], tmp_path)
  reloaded = transformers.CLIPModel.from_pretrained(tmp_path).eval()
  img, txt = _torch_features(reloaded, clip_case["images"], clip_case["ids"], clip_case["mask"])
  ours_img, ours_txt = clip_case["features"]
  np.testing.assert_allclose(img, ours_img, atol=TOL, rtol=0)
  np.testing.assert_allclose(txt, ours_txt, atol=TOL, rtol=0)
  saved_text_config = json.loads((tmp_path / "config.json").read_text())["text_config"]
  assert saved_text_config["eos_token_id"] == clip_case["spec"]["eos"]


def test_older_config_dicts_load_as_in_transformers(tmp_path):
  """openai/clip-vit-large-patch14 style: *_config_dict beside *_config. transformers fills the dict with
  every CLIPTextConfig / CLIPVisionConfig default and overwrites *_config with all of it, so the keys the
  dict lacks (text eos_token_id 2, both towers' gelu) give way to the defaults (49407, quick_gelu)."""
  sizes = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
  vocab = 49416  # above the default eos id 49407: words with larger ids make the two pooling rules differ
  text_dict = dict(vocab_size=vocab, max_position_embeddings=12, **sizes)
  vision_dict = dict(image_size=32, patch_size=16, **sizes)
  config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 24,
            "logit_scale_init_value": 2.0,
            "text_config": {**text_dict, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu"},
            "text_config_dict": text_dict,
            "vision_config": {**vision_dict, "hidden_act": "gelu"}, "vision_config_dict": vision_dict}
  (tmp_path / "config.json").write_text(json.dumps(config))
  torch.manual_seed(0)
  hf_config = transformers.CLIPConfig.from_pretrained(tmp_path)
  _perturbed(transformers.CLIPModel(hf_config).eval()).save_pretrained(tmp_path, safe_serialization=True)
  (tmp_path / "config.json").write_text(json.dumps(config))  # save_pretrained wrote the merged config
  hf = transformers.CLIPModel.from_pretrained(tmp_path).eval()
  hf_text, hf_vision = hf.config.text_config, hf.config.vision_config
  assert (hf_text.eos_token_id, hf_text.bos_token_id, hf_text.hidden_act, hf_vision.hidden_act) == \
      (49407, 49406, "quick_gelu", "quick_gelu")

  ours = load_clip(tmp_path)
  text, vision = ours.config.text, ours.config.vision
  assert (text.eos_token_id, text.bos_token_id, text.activation, vision.activation) == \
      (hf_text.eos_token_id, hf_text.bos_token_id, hf_text.hidden_act, hf_vision.hidden_act)
  assert text.text_pooling == "eos"  # transformers' rule: the first eos unless eos_token_id == 2

  rng = np.random.default_rng(3)
  ids = np.full((4, 12), hf_text.pad_token_id, np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate([1, 3, 6, 10]):
    ids[row, : n + 2] = [49406, *rng.integers(49408, vocab, 1), *rng.integers(5, 49406, n - 1), 49407]
    mask[row, : n + 2] = 1
  assert (np.argmax(ids == 49407, -1) != np.argmax(ids, -1)).all()  # pooling elsewhere would show
  images = _images(32)
  (ref_img, ref_txt), (img, txt) = _torch_features(hf, images, ids, mask), _our_features(ours, images, ids, mask)
  np.testing.assert_allclose(img, ref_img, atol=TOL, rtol=0)
  np.testing.assert_allclose(txt, ref_txt, atol=TOL, rtol=0)


def test_config_dict_defaults_are_transformers_defaults():
  """The defaults that fill an older config's *_config_dict (our dataclass defaults under transformers'
  names) are those of the installed transformers' CLIPTextConfig / CLIPVisionConfig."""
  from mat_jax.models.clip import TextConfig, VisionConfig
  from mat_jax.models.weights import _TEXT_KEYS, _VISION_EXTRA_DEFAULTS, VISION_CONFIG_KEYS, _hf_defaults

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs_text = transformers.CLIPTextConfig().to_dict()
    theirs_vision = transformers.CLIPVisionConfig().to_dict()
  text = _hf_defaults(TextConfig, _TEXT_KEYS)
  vision = _hf_defaults(VisionConfig, VISION_CONFIG_KEYS, **_VISION_EXTRA_DEFAULTS)
  assert text == {key: theirs_text[key] for key in text}
  assert vision == {key: theirs_vision[key] for key in vision}


def _numpy_init_clip(cfg, seed: int = 0):
  """Our CLIP with every parameter drawn by numpy (LayerNorm scales near 1): no compiled random kernel
  per parameter shape (seconds on a busy CPU), and non-trivial LayerNorm parameters."""
  from mat_jax.models import CLIP

  graphdef, state = nnx.split(nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    centre = 1.0 if str(getattr(path[-1], "key", path[-1])) == "scale" else 0.0
    return jax.numpy.asarray(centre + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def test_shapes_world_clip_saved_by_mat_jax_pools_the_same_in_transformers(tmp_path_factory):
  """A tiny CLIP on the shapes tokenizer (end id 3), saved with its tokenizer: transformers' CLIPModel and
  tokenizer read the directory back and give our text embeddings. No config key of ours is involved."""
  from mat_jax.data import shapes
  from mat_jax.models import clip_config, load_tokenizer
  from mat_jax.models.clip import TextConfig, VisionConfig

  tok = load_tokenizer(shapes.build_tokenizer(tmp_path_factory.mktemp("shapes_tok")),
                        context_length=shapes.DEFAULT_CONTEXT_LENGTH)
  cfg = clip_config(
      "tiny", vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32),
      text=TextConfig(vocab_size=tok.vocab_size, context_length=tok.context_length, width=32, layers=2,
                      heads=4, mlp_dim=37, eos_token_id=tok.end_id, bos_token_id=tok.start_id,
                      pad_token_id=tok.pad_id),
      projection_dim=24)
  model = _numpy_init_clip(cfg)
  directory = save_clip(model, tmp_path_factory.mktemp("shapes_clip"), tokenizer=tok)

  rng = np.random.default_rng(0)
  texts = [c for _ in range(2) for c in shapes.captions(shapes.sample_scene(rng), rng, 3)]
  batch = tok(texts)
  hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
  hf_batch = hf_tok(texts, padding="max_length", truncation=True, max_length=tok.context_length,
                    return_tensors="np")
  np.testing.assert_array_equal(hf_batch["input_ids"], batch.input_ids)
  # Words have larger ids than the end token: pooling at the largest id would read a word instead.
  assert (np.argmax(batch.input_ids, -1) != np.argmax(batch.input_ids == tok.end_id, -1)).all()

  hf = transformers.CLIPModel.from_pretrained(directory).eval()
  assert hf.config.text_config.eos_token_id == tok.end_id == 3
  with torch.no_grad():
    reference = hf.get_text_features(input_ids=torch.from_numpy(batch.input_ids).long(),
                                     attention_mask=torch.from_numpy(batch.attention_mask).long())
  encoder, params = split(model)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(jax.jit(encoder.text_features)(params, batch.input_ids, batch.attention_mask))
  np.testing.assert_allclose(ours, reference.pooler_output.numpy(), atol=TOL, rtol=0)


def test_sharded_safetensors_index_loads(tmp_path_factory, tmp_path):
  clip_case = _clip_case("real_eos_gelu_40px", tmp_path_factory)
  clip_case["hf"].save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  sharded = load_clip(tmp_path)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), split(sharded)[1], split(clip_case["ours"])[1])
  assert all(jax.tree.leaves(same))


# ---------------------------------------------------------------------------------------------------
# BERT masked LM


@pytest.fixture(scope="module")
def bert_case(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=16, type_vocab_size=2)
  hf = transformers.BertForMaskedLM(cfg).eval()
  with torch.no_grad():  # every bias and LN parameter off their init (zeros and ones hide mapping mistakes)
    for p in hf.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp("bert")
  hf.save_pretrained(directory, safe_serialization=True)
  # [CLS]=2 words [SEP]=3 (segment 0) words [SEP] (segment 1), then padding 0.
  ids = np.zeros((3, 10), np.int32)
  types = np.zeros_like(ids)
  rows = [[2, 7, 8, 3], [2, 9, 10, 11, 3, 12, 13, 3], [2, 14, 15, 16, 17, 3, 18, 19, 20, 3]]
  for r, row in enumerate(rows):
    ids[r, : len(row)] = row
    first_sep = row.index(3)
    types[r, first_sep + 1: len(row)] = 1
  mask = (np.arange(10)[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
  with torch.no_grad():
    reference = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                   token_type_ids=torch.from_numpy(types).long()).logits.numpy()
  return dict(hf=hf, dir=directory, ids=ids, mask=mask, types=types, reference=reference)


def test_bert_mlm_logits_match_transformers(bert_case):
  ours = load_bert_mlm(bert_case["dir"])
  graphdef, state = nnx.split(ours)
  logits_fn = jax.jit(lambda s, i, m, t: nnx.merge(graphdef, s)(i, m, t))
  ids, mask, types = bert_case["ids"], bert_case["mask"], bert_case["types"]
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(logits_fn(state, ids, mask, types))
    no_types = np.asarray(logits_fn(state, ids, mask, np.zeros_like(types)))
  assert logits.shape == (3, 10, VOCAB) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, bert_case["reference"], atol=TOL, rtol=0)
  # token_type_ids matter (so the comparison above can fail), and None means segment 0 everywhere.
  assert np.abs(no_types - logits).max() > 1e-3
  default_types = np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, ids, mask))
  np.testing.assert_allclose(default_types, no_types, atol=1e-6, rtol=0)


def test_bert_reads_legacy_names_and_ignores_unused_heads(bert_case, tmp_path):
  """bert-base-uncased style: LayerNorm gamma/beta, a pooler, the NSP head and an explicit decoder."""
  tensors = load_file(bert_case["dir"] / "model.safetensors")
  renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in tensors.items()}
  renamed["bert.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
  renamed["bert.pooler.dense.bias"] = np.zeros((32,), np.float32)
  renamed["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)
  renamed["cls.seq_relationship.bias"] = np.zeros((2,), np.float32)
  renamed["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
  save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
  (tmp_path / "config.json").write_text((bert_case["dir"] / "config.json").read_text())
  legacy, plain = load_bert_mlm(tmp_path), load_bert_mlm(bert_case["dir"])
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.state(legacy), nnx.state(plain))
  assert all(jax.tree.leaves(same))
  # Both spellings of one tensor: one of them would be read and the other silently ignored.
  both = {**renamed, "bert.embeddings.LayerNorm.weight": tensors["bert.embeddings.LayerNorm.weight"]}
  save_file(both, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(CorruptWeightsError, match=r"holds both bert.embeddings.LayerNorm.(gamma|weight) and "
                                                 r"bert.embeddings.LayerNorm.(weight|gamma), two spellings"):
    load_bert_mlm(tmp_path)


def test_bert_decoder_copies_stand_in_for_or_must_equal_their_tied_tensors(bert_case, tmp_path):
  """transformers loads a decoder copy that differs from its tied tensor untied: a different MLM, refused."""
  tensors = load_file(bert_case["dir"] / "model.safetensors")
  (tmp_path / "config.json").write_text((bert_case["dir"] / "config.json").read_text())
  plain = nnx.state(load_bert_mlm(bert_case["dir"]))

  def load_with(**changes):
    stored = {k: v for k, v in {**tensors, **changes}.items() if v is not None}
    save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return load_bert_mlm(tmp_path)

  # Only the decoder's name carries the bias (as in some converted checkpoints): read as the bias.
  bias = tensors["cls.predictions.bias"]
  moved = load_with(**{"cls.predictions.bias": None, "cls.predictions.decoder.bias": bias})
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.state(moved), plain)))
  embeddings = tensors["bert.embeddings.word_embeddings.weight"]
  with pytest.raises(WeightsError, match=r"1 tied tensors stored with values of their own:\n    "
                                         r"cls.predictions.decoder.weight differs from "
                                         r"bert.embeddings.word_embeddings.weight \(max abs difference 0.05\)"):
    load_with(**{"cls.predictions.decoder.weight": embeddings + np.float32(0.05)})
  with pytest.raises(WeightsError, match=r"cls.predictions.decoder.bias differs from cls.predictions.bias"):
    load_with(**{"cls.predictions.decoder.bias": bias + np.float32(1.0)})


def test_transformers_default_configs_convert_to_our_defaults():
  from mat_jax.models import BertConfig, CLIPConfig
  from mat_jax.models.weights import bert_config_from_hf, clip_config_from_hf

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    clip_defaults = transformers.CLIPConfig().to_dict()
  ours = clip_config_from_hf(clip_defaults)
  # transformers' current defaults name a real eos id (49407), so text is pooled at its first occurrence.
  assert ours == CLIPConfig()
  assert bert_config_from_hf(transformers.BertConfig().to_dict()) == BertConfig()


def test_exact_gelu_is_pytorchs_and_lowers_through_erf():
  """transformers' "gelu" is PyTorch's x/2 (1 + erf(x/sqrt 2)). jax.nn.gelu's exact form computes it through
  erfc, which XLA:GPU's fusion pass takes seconds over in every program (docs/performance.md): the port
  lowers through erf."""
  from mat_jax.models import layers

  x = np.linspace(-12.0, 12.0, 20001, dtype=np.float32)
  reference = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  ours = np.asarray(jax.jit(layers.ACTIVATIONS["gelu"])(x))
  np.testing.assert_allclose(ours, reference, atol=1e-6, rtol=1e-6)
  lowered = jax.jit(layers.ACTIVATIONS["gelu"]).lower(x).as_text()
  assert "erf" in lowered and "erfc" not in lowered
