"""BLIP image–text retrieval in Flax NNX: a ViT image encoder, a BERT text encoder with cross-attention to
the image tokens, the ITC projections and the ITM head.

Mirrors transformers' `BlipForImageTextRetrieval`, so that its safetensors load by the name table below and
the features and ITM logits match to float32 round-off. Images enter in pixel space (float32 NHWC in
[0, 1]) and are normalised inside, as CLIP's are, so attack budgets ε are in pixel units.

The module offers the same encoder methods as `CLIP` (`encode_image`, `encode_text`, the cache pair the
text attack calls, `logit_scale`), so `DualEncoder` and everything built on it (attacks, metrics, train
steps) run BLIP unchanged; the ITM head is the extra a retrieval re-ranker uses (`itm_logits`).

Differences from CLIP that matter downstream:
- the text encoder is bidirectional and pools at [CLS] (position 0): a caption cannot be continued from a
  cached prefix, so `encode_text_continuation` encodes the given tokens whole and the text attack scores
  every candidate text whole (see `attacks.text._pools_last_token`);
- BLIP learns its ITC temperature (`temp`, 0.07 at the start) but transformers' retrieval class keeps
  none; here it is the parameter `logit_scale` (log 1/temp, as CLIP's), read from and written to
  config.json's `logit_scale_init_value`, so a fine-tuned temperature survives save and load.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mat_jax import checks
from mat_jax.errors import InputError
from mat_jax.models import hub, layers, weights
from mat_jax.models.clip import CLIP_MEAN, CLIP_STD, check_pixels, l2_normalize

# ------------------------------------------------------------------------------------------------
# Configs: our names where they match CLIP's (so code that reads `config.vision.image_size` or
# `config.text.context_length` serves both), transformers' defaults.


@dataclasses.dataclass(frozen=True)
class BlipVisionConfig:
  image_size: int = 384
  patch_size: int = 16
  width: int = 768                # transformers: hidden_size
  layers: int = 12                # num_hidden_layers
  heads: int = 12                 # num_attention_heads
  mlp_dim: int = 3072             # intermediate_size
  activation: str = "gelu"        # hidden_act
  layer_norm_eps: float = 1e-5
  image_mean: tuple[float, float, float] = CLIP_MEAN  # BlipImageProcessor's defaults are OpenAI CLIP's
  image_std: tuple[float, float, float] = CLIP_STD

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class BlipTextConfig:
  vocab_size: int = 30524
  max_position_embeddings: int = 512
  width: int = 768                # hidden_size
  layers: int = 12                # num_hidden_layers
  heads: int = 8                  # num_attention_heads (transformers' default; the checkpoints use 12)
  mlp_dim: int = 3072             # intermediate_size
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  bos_token_id: int = 30522
  eos_token_id: int = 2
  pad_token_id: int = 0
  sep_token_id: int = 102
  # Tokens per caption when tokenizing for this model: BLIP's retrieval code pads/truncates to 35. Not a
  # transformers field (the tokenizer's choice, like CLIP's 77), so not written to config.json.
  context_length: int = 35

  def __post_init__(self) -> None:
    if not 1 <= self.context_length <= self.max_position_embeddings:
      raise ValueError(f"context_length {self.context_length} must lie in [1, max_position_embeddings "
                       f"{self.max_position_embeddings}]")

  @property
  def positions(self) -> int:
    """The longest token sequence the tower takes: its position table (`context_length` is only the length
    captions are tokenized to)."""
    return self.max_position_embeddings

  @property
  def text_pooling(self) -> str:
    """Where the text is pooled: "cls", the first token (BERT's [CLS]), whatever the end token."""
    return "cls"


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  """Mirrors transformers' BlipConfig (retrieval fields); `dtype` is the compute dtype (parameters float32)."""
  vision: BlipVisionConfig = BlipVisionConfig()
  text: BlipTextConfig = BlipTextConfig()
  embed_dim: int = 256            # image_text_hidden_size: the ITC feature size
  logit_scale_init: float = math.log(1 / 0.07)  # BLIP's temp 0.07; config.json's logit_scale_init_value
  dtype: str = "float32"
  # What the backward pass keeps of each block's intermediates, as CLIPConfig.remat (out of the repr,
  # which keys cached runs by their preset).
  remat: str = dataclasses.field(default="none", repr=False)
  # BLIP clamps its temperature to [0.001, 0.5] after every step: a logit multiplier from 2 to 1000.
  logit_scale_range: ClassVar[tuple[float, float]] = (math.log(2.0), math.log(1000.0))

  def __post_init__(self) -> None:
    layers.check_remat(self.remat)

  def replace(self, **changes: Any) -> "BlipConfig":
    return dataclasses.replace(self, **changes)


BLIP_PRESETS: dict[str, BlipConfig] = {
    # Salesforce/blip-itm-{base,large}-{coco,flickr}: ViT-B/16 or ViT-L/16 at 384 px, BERT-base text.
    "blip-base": BlipConfig(text=BlipTextConfig(heads=12)),
    "blip-large": BlipConfig(vision=BlipVisionConfig(width=1024, layers=24, heads=16, mlp_dim=4096),
                             text=BlipTextConfig(heads=12)),
    # The shapes world (as CLIP's "tiny" preset: 48 px renders, one 16-px patch per grid cell, the world's
    # tokenizer: [PAD]=0, [START]=2, [END]=3, 128 ids, 24 tokens). Both text layers cross-attend for ITM.
    "blip-tiny": BlipConfig(
        vision=BlipVisionConfig(image_size=48, patch_size=16, width=192, layers=2, heads=4, mlp_dim=768),
        text=BlipTextConfig(vocab_size=128, max_position_embeddings=24, context_length=24, width=192, layers=2,
                            heads=4, mlp_dim=768, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                            sep_token_id=3),
        embed_dim=128),
}


def blip_config(name: str, **overrides: Any) -> BlipConfig:
  """A preset by name (see BLIP_PRESETS), with top-level fields replaced."""
  if name not in BLIP_PRESETS:
    raise ValueError(f"unknown BLIP preset {name!r}; available: {sorted(BLIP_PRESETS)}")
  return BLIP_PRESETS[name].replace(**overrides)


# ------------------------------------------------------------------------------------------------
# Modules.


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, dtype, mask: jax.Array | None = None) -> jax.Array:
  """q (B, Q, H, D) attend to the positions of k and v (B, L, H, D) that `mask` shows (every one when None)
  -> context (B, Q, H * D), through `layers.attend_heads` (a fused kernel where the backend has one)."""
  return layers.attend_heads(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask, dtype=dtype)


class FusedAttention(nnx.Module):
  """The ViT's self-attention: one (width -> 3 * width) qkv projection, then `projection`."""

  def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width {width} is not divisible by heads {heads}")
    self.heads, self.dtype = heads, dtype
    self.qkv = layers.dense(width, 3 * width, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.projection = layers.dense(width, width, ("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    b, n, w = x.shape
    # transformers splits the fused output as (3, heads, head_dim): q, k, v are consecutive width blocks.
    q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads), 3, axis=2)
    return self.projection(_attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.dtype, mask))


class VisionBlock(nnx.Module):
  """Pre-LN ViT block: x + attn(ln1(x)); x + mlp(ln2(x))."""

  def __init__(self, cfg: BlipVisionConfig, *, dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.ln1 = layers.layer_norm(cfg.width, cfg.layer_norm_eps, **kw)
    self.attn = FusedAttention(cfg.width, cfg.heads, **kw)
    self.ln2 = layers.layer_norm(cfg.width, cfg.layer_norm_eps, **kw)
    self.fc1 = layers.dense(cfg.width, cfg.mlp_dim, ("embed", "mlp"), **kw)
    self.fc2 = layers.dense(cfg.mlp_dim, cfg.width, ("mlp", "embed"), **kw)
    self.act = layers.activation(cfg.activation)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask)
    return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class VisionEncoder(nnx.Module):
  """ViT: patch convolution (with bias), class token, positions, blocks, post-LN on every token."""

  def __init__(self, cfg: BlipVisionConfig, *, dtype, rngs: nnx.Rngs, remat: str = "none"):
    if cfg.layers < 1:
      raise ValueError(f"the image encoder needs at least one layer, got layers={cfg.layers}")
    self.cfg, self.dtype, self.remat = cfg, dtype, layers.check_remat(remat)
    w, p = cfg.width, cfg.patch_size
    init = nnx.initializers.normal(0.02)
    self.patch_kernel = nnx.Param(layers.sharded(init, None, None, None, "embed")(rngs.params(), (p, p, 3, w)))
    self.patch_bias = nnx.Param(layers.sharded(nnx.initializers.zeros_init(), "embed")(rngs.params(), (w,)))
    # Stored in transformers' shapes, (1, 1, W) and (1, N + 1, W), so the name table maps them unchanged.
    self.class_embedding = nnx.Param(layers.sharded(init, None, None, "embed")(rngs.params(), (1, 1, w)))
    self.position_embedding = nnx.Param(
        layers.sharded(init, None, None, "embed")(rngs.params(), (1, cfg.num_patches + 1, w)))
    self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.layers)])
    self.post_ln = layers.layer_norm(w, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """float32 (B, H, W, 3) in [0, 1] -> post-LN token states (B, 1 + patches, width), [CLS] first."""
    cfg = self.cfg
    x = ((pixels - jnp.asarray(cfg.image_mean, jnp.float32)) / jnp.asarray(cfg.image_std, jnp.float32))
    x = x.astype(self.dtype)
    b, p = x.shape[0], cfg.patch_size
    kernel = self.patch_kernel[...].reshape(p * p * 3, cfg.width).astype(self.dtype)
    # On (B * patches, W) rows, as layers.Dense does: the bias's gradient is then a sum over one axis, which
    # XLA:CPU accumulates in float32; over (B, patches) of a bf16 tensor it sums in bf16 (3% off at 9k rows).
    rows = layers.patches(x, p).reshape(-1, p * p * 3)
    tokens = (rows @ kernel + self.patch_bias[...].astype(self.dtype)).reshape(b, -1, cfg.width)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, cfg.width))
    x = jnp.concatenate([cls, tokens], axis=1) + self.position_embedding[...].astype(self.dtype)
    # Tokens added for the fused attention's lengths: hidden as keys, dropped after the blocks. BLIP's
    # attention is always on the auto path.
    length = x.shape[1]
    x, mask = layers.with_tower_tokens(x, "auto", self.dtype)
    for block in self.blocks:
      x = layers.shared_call(block, x, mask, remat=self.remat)
    return self.post_ln(x[:, :length])


class CrossAttention(nnx.Module):
  """Text queries attend to image tokens; keys and values project from the image width."""

  def __init__(self, width: int, kv_width: int, heads: int, *, dtype, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width {width} is not divisible by heads {heads}")
    self.heads, self.dtype = heads, dtype
    kw = dict(dtype=dtype, rngs=rngs)
    self.query = layers.dense(width, width, ("embed", "heads"), **kw)
    self.key = layers.dense(kv_width, width, ("embed", "heads"), **kw)
    self.value = layers.dense(kv_width, width, ("embed", "heads"), **kw)
    self.out = layers.dense(width, width, ("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, image: jax.Array) -> jax.Array:
    def heads(t):
      return t.reshape(*t.shape[:2], self.heads, -1)
    # Every image token is attended to (transformers' retrieval passes an all-ones image mask).
    return self.out(_attend(heads(self.query(x)), heads(self.key(image)), heads(self.value(image)), self.dtype))


class TextBlock(nnx.Module):
  """Post-LN BERT layer: self-attention, [cross-attention to the image], MLP; each ln(x + sublayer(x))."""

  def __init__(self, cfg: BlipTextConfig, image_width: int, *, dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    w = cfg.width
    self.attn = layers.MultiHeadAttention(w, cfg.heads, **kw)
    self.attn_ln = layers.layer_norm(w, cfg.layer_norm_eps, **kw)
    self.cross = CrossAttention(w, image_width, cfg.heads, **kw)
    self.cross_ln = layers.layer_norm(w, cfg.layer_norm_eps, **kw)
    self.fc1 = layers.dense(w, cfg.mlp_dim, ("embed", "mlp"), **kw)
    self.fc2 = layers.dense(cfg.mlp_dim, w, ("mlp", "embed"), **kw)
    self.mlp_ln = layers.layer_norm(w, cfg.layer_norm_eps, **kw)
    self.act = layers.activation(cfg.activation)

  def __call__(self, x: jax.Array, mask: jax.Array, image: jax.Array | None) -> jax.Array:
    x = self.attn_ln(x + self.attn(x, mask))
    if image is not None:
      x = self.cross_ln(x + self.cross(x, image))
    return self.mlp_ln(x + self.fc2(self.act(self.fc1(x))))


class TextEncoder(nnx.Module):
  """BERT without token types: word + position embeddings, LN, blocks. Unimodal (ITC) without `image`,
  image-grounded (ITM) with it."""

  def __init__(self, cfg: BlipTextConfig, image_width: int, *, dtype, rngs: nnx.Rngs, remat: str = "none"):
    if cfg.layers < 1:
      raise ValueError(f"the text encoder needs at least one layer, got layers={cfg.layers}")
    self.cfg, self.dtype, self.remat = cfg, dtype, layers.check_remat(remat)
    self.word_embeddings = layers.embed(cfg.vocab_size, cfg.width, "vocab", dtype=dtype, rngs=rngs)
    self.position_embeddings = layers.embed(cfg.max_position_embeddings, cfg.width, None, dtype=dtype, rngs=rngs)
    self.embeddings_ln = layers.layer_norm(cfg.width, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([TextBlock(cfg, image_width, dtype=dtype, rngs=rngs) for _ in range(cfg.layers)])

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, image: jax.Array | None = None) -> jax.Array:
    """int (B, L) ids and 0/1 mask [, image tokens (B, N, W_img)] -> the [CLS] state (B, width)."""
    length = input_ids.shape[1]
    x = self.word_embeddings(input_ids) + self.position_embeddings.embedding[:length].astype(self.dtype)
    x = self.embeddings_ln(x)
    mask = layers.padding_mask(attention_mask)
    for block in self.blocks:
      x = layers.shared_call(block, x, mask, image, remat=self.remat)
    return x[:, 0]


class BLIP(nnx.Module):
  """BLIP for retrieval. `encode_*` return projected, unnormalised features (the `DualEncoder` contract);
  `image_features` / `text_features` are their L2-normalised forms (BLIP's ITC features)."""

  def __init__(self, config: BlipConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.vision = VisionEncoder(config.vision, dtype=dtype, rngs=rngs, remat=config.remat)
    self.text = TextEncoder(config.text, config.vision.width, dtype=dtype, rngs=rngs, remat=config.remat)
    kw = dict(dtype=dtype, rngs=rngs)
    self.vision_proj = layers.dense(config.vision.width, config.embed_dim, ("embed", "proj"), **kw)
    self.text_proj = layers.dense(config.text.width, config.embed_dim, ("embed", "proj"), **kw)
    self.itm_head = layers.dense(config.text.width, 2, ("embed", None), **kw)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, jnp.float32))

  # The DualEncoder contract (as CLIP's).
  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """float32 (B, H, W, 3) in [0, 1] -> float32 (B, embed_dim): vision_proj of the [CLS] token."""
    check_pixels(pixels, self.config.vision)
    pixels = jnp.asarray(pixels)  # a list or numpy batch, as the checks take it
    return self.vision_proj(self.vision(pixels)[:, 0]).astype(jnp.float32)

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """int (B, L) ids and 0/1 mask -> float32 (B, embed_dim): text_proj of the unimodal [CLS] state."""
    check_blip_text(input_ids, attention_mask, self.config.text)
    input_ids, attention_mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
    return self.text_proj(self.text(input_ids, attention_mask)).astype(jnp.float32)

  def encode_text_with_cache(self, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, tuple]:
    """`encode_text`'s features and an empty cache: a bidirectional encoder's states depend on every token,
    so nothing of a text can be reused for another (see `encode_text_continuation`)."""
    return self.encode_text(input_ids, attention_mask), ()

  def encode_text_continuation(self, cache: tuple, start: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Features of the texts `input_ids` (B, S), encoded whole: `start` must be 0 (the text attack passes 0
    for towers that do not pool at the last token). The mask is the tokenizer's: every token up to the
    text's end token (sep_token_id), which for a tokenizer padding with another token is every token but
    the padding (a caption holds no padding before its end)."""
    del cache, start
    text = self.config.text
    if text.pad_token_id != text.sep_token_id:
      mask = input_ids != text.pad_token_id
    else:  # padded with the end token itself: the mask ends at the first one
      ends = (input_ids == text.sep_token_id).astype(jnp.int32)
      mask = jnp.cumsum(ends, axis=1) - ends == 0
    return self.encode_text(input_ids, mask.astype(jnp.int32))

  # BLIP's own outputs.
  def image_features(self, pixels: jax.Array) -> jax.Array:
    """L2-normalised ITC image features (B, embed_dim)."""
    return l2_normalize(self.encode_image(pixels))

  def text_features(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """L2-normalised ITC text features (B, embed_dim)."""
    return l2_normalize(self.encode_text(input_ids, attention_mask))

  def image_tokens(self, pixels: jax.Array) -> jax.Array:
    """Post-LN image token states (B, 1 + patches, width), the ITM's cross-attention memory."""
    check_pixels(pixels, self.config.vision)
    pixels = jnp.asarray(pixels)  # a list or numpy batch, as the checks take it
    return self.vision(pixels)

  def itm_logits_from_tokens(self, image_tokens: jax.Array, input_ids: jax.Array,
                             attention_mask: jax.Array) -> jax.Array:
    """ITM logits (B, 2) [no match, match] of texts against precomputed `image_tokens`, row for row."""
    check_blip_text(input_ids, attention_mask, self.config.text)
    if image_tokens.shape[0] != input_ids.shape[0]:
      raise InputError(f"the ITM pairs image i with text i, but there are {image_tokens.shape[0]} images and "
                       f"{input_ids.shape[0]} texts; pass as many texts as images (repeat the images or texts to "
                       "score every pair)")
    cls = self.text(input_ids, attention_mask, image_tokens.astype(self.text.dtype))
    return self.itm_head(cls).astype(jnp.float32)

  def itm_logits(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """ITM logits (B, 2) of image i with text i: transformers' `itm_score` with use_itm_head=True."""
    return self.itm_logits_from_tokens(self.image_tokens(pixels), input_ids, attention_mask)

  def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """ITC logits (B_img, B_txt), scaled by exp(logit_scale)."""
    return jnp.exp(self.logit_scale[...]) * self.image_features(pixels) @ self.text_features(
        input_ids, attention_mask).T


def check_blip_text(input_ids: Any, attention_mask: Any, cfg: BlipTextConfig) -> None:
  """CLIP's checks (`checks.check_token_ids`) against BLIP's positions: shapes and dtypes always (static under
  `jit`), the id range only on concrete (eager) arrays."""
  checks.check_token_ids(input_ids, attention_mask, cfg.positions, cfg.vocab_size)


# ------------------------------------------------------------------------------------------------
# Name table: our parameter path, transformers' tensor name, layout (weights.Layout).

_L, _N, SAME, CONV = weights.linear_rows, weights.layer_norm_rows, weights.SAME, weights.CONV

_VISION_BLOCK = [
    *_N(("ln1",), "layer_norm1"),
    *_L(("attn", "qkv"), "self_attn.qkv"),
    *_L(("attn", "projection"), "self_attn.projection"),
    *_N(("ln2",), "layer_norm2"),
    *_L(("fc1",), "mlp.fc1"),
    *_L(("fc2",), "mlp.fc2"),
]

_TEXT_BLOCK = [
    *_L(("attn", "query"), "attention.self.query"),
    *_L(("attn", "key"), "attention.self.key"),
    *_L(("attn", "value"), "attention.self.value"),
    *_L(("attn", "out"), "attention.output.dense"),
    *_N(("attn_ln",), "attention.output.LayerNorm"),
    *_L(("cross", "query"), "crossattention.self.query"),
    *_L(("cross", "key"), "crossattention.self.key"),
    *_L(("cross", "value"), "crossattention.self.value"),
    *_L(("cross", "out"), "crossattention.output.dense"),
    *_N(("cross_ln",), "crossattention.output.LayerNorm"),
    *_L(("fc1",), "intermediate.dense"),
    *_L(("fc2",), "output.dense"),
    *_N(("mlp_ln",), "output.LayerNorm"),
]

_TOP = [
    (("vision", "patch_kernel"), "vision_model.embeddings.patch_embedding.weight", CONV),
    (("vision", "patch_bias"), "vision_model.embeddings.patch_embedding.bias", SAME),
    (("vision", "class_embedding"), "vision_model.embeddings.class_embedding", SAME),
    (("vision", "position_embedding"), "vision_model.embeddings.position_embedding", SAME),
    *_N(("vision", "post_ln"), "vision_model.post_layernorm"),
    (("text", "word_embeddings", "embedding"), "text_encoder.embeddings.word_embeddings.weight", SAME),
    (("text", "position_embeddings", "embedding"), "text_encoder.embeddings.position_embeddings.weight", SAME),
    *_N(("text", "embeddings_ln"), "text_encoder.embeddings.LayerNorm"),
    *_L(("vision_proj",), "vision_proj"),
    *_L(("text_proj",), "text_proj"),
    *_L(("itm_head",), "itm_head"),
]

# Buffers, not parameters (older checkpoints saved them); `logit_scale` travels in config.json.
BLIP_IGNORED = frozenset({"text_encoder.embeddings.position_ids"})
BLIP_ARCHITECTURE = "BlipForImageTextRetrieval"


def blip_table(cfg: BlipConfig) -> list[weights.Entry]:
  """Every BLIP parameter but `logit_scale`: our path, transformers' name, layout."""
  rows = list(_TOP)
  for i in range(cfg.vision.layers):
    rows += [(("vision", "blocks", i, *o), f"vision_model.encoder.layers.{i}.{t}", lay) for o, t, lay in _VISION_BLOCK]
  for i in range(cfg.text.layers):
    rows += [(("text", "blocks", i, *o), f"text_encoder.encoder.layer.{i}.{t}", lay) for o, t, lay in _TEXT_BLOCK]
  return [weights.Entry(*row) for row in rows]


# ------------------------------------------------------------------------------------------------
# Config conversion. Missing keys take transformers' defaults, which are our dataclass defaults.

_TEXT_KEYS = {"vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings",
              "width": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
              "mlp_dim": "intermediate_size", "activation": "hidden_act", "layer_norm_eps": "layer_norm_eps",
              "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
              "sep_token_id": "sep_token_id"}


def _architectures(data: dict) -> str:
  return f"{data.get('architectures') or '(no architectures)'}, model_type {data.get('model_type')!r}"


def blip_config_from_hf(data: dict, preprocessor: dict | None = None, *, dtype: str = "float32",
                        context_length: int | None = None, source: str = "config.json",
                        preprocessor_source: str = weights.PREPROCESSOR_FILE) -> BlipConfig:
  """transformers' BlipConfig dict (config.json) [+ the image processor's settings] -> BlipConfig.

  `source`, `preprocessor_source`: where `data` and `preprocessor` were read, for error messages."""
  if data.get("model_type") != "blip":
    hint = " (a CLIP checkpoint: load it with mat_jax.models.load_clip)" if data.get("model_type") == "clip" else ""
    raise weights.ConfigError(f"config.json describes {_architectures(data)}{hint}; load_blip reads transformers' "
                              f"{BLIP_ARCHITECTURE} checkpoints (model_type 'blip').")
  archs = data.get("architectures") or [BLIP_ARCHITECTURE]
  if BLIP_ARCHITECTURE not in archs:
    raise weights.ConfigError(f"config.json describes {_architectures(data)}; load_blip reads the retrieval model "
                              f"{BLIP_ARCHITECTURE} (ITC projections and ITM head), e.g. "
                              "Salesforce/blip-itm-base-coco.")
  pre = preprocessor or {}
  problems = []
  weights.refuse_wrong_types(weights.wrong_types(data, {"vision_config": dict, "text_config": dict}), source)
  vision_data, text_data = data.get("vision_config") or {}, data.get("text_config") or {}
  for name, value in (("image_size", vision_data.get("image_size")), ("patch_size", vision_data.get("patch_size"))):
    if isinstance(value, (list, tuple)):
      problems.append(f"vision_config.{name}={value} (only square sizes)")
  if problems:
    raise weights.ConfigError("unsupported BLIP config:\n  " + "\n  ".join(problems))
  weights.refuse_wrong_types([
      *weights.wrong_types(data, {"image_text_hidden_size": int, "logit_scale_init_value": float}),
      *weights.wrong_types(vision_data, weights.field_types(BlipVisionConfig, weights.VISION_CONFIG_KEYS),
                           "vision_config."),
      *weights.wrong_types(text_data, weights.field_types(BlipTextConfig, _TEXT_KEYS), "text_config.")], source)
  mean, std = weights.preprocessor_normalisation(pre, CLIP_MEAN, CLIP_STD, preprocessor_source)
  vision = weights.pick(BlipVisionConfig, vision_data, weights.VISION_CONFIG_KEYS, image_mean=mean, image_std=std)
  positions = int(text_data.get("max_position_embeddings") or BlipTextConfig.max_position_embeddings)
  length = context_length if context_length is not None else min(BlipTextConfig.context_length, positions)
  if length > positions:
    problems.append(f"context_length {length} > text_config.max_position_embeddings {positions}")
    length = positions
  text = weights.pick(BlipTextConfig, text_data, _TEXT_KEYS, context_length=length)
  # text_config.encoder_hidden_size is not read: transformers' BlipConfig overwrites it with the vision
  # hidden size, and a cross-attention that does not fit is caught by the tensor shapes.
  weights.check_activation_and_heads(problems, "vision_config", vision.activation, vision.width, vision.heads)
  weights.check_activation_and_heads(problems, "text_config", text.activation, text.width, text.heads)
  if problems:
    raise weights.ConfigError("unsupported BLIP config:\n  " + "\n  ".join(problems))
  return BlipConfig(vision=vision, text=text, embed_dim=int(data.get("image_text_hidden_size") or 256),
                    logit_scale_init=float(weights.value_or(data, "logit_scale_init_value", HF_LOGIT_SCALE_DEFAULT)),
                    dtype=dtype)


# transformers' BlipConfig default, which a config.json without logit_scale_init_value gets there
# (log(1 / 0.07) rounded to four decimals).
HF_LOGIT_SCALE_DEFAULT = 2.6592


def blip_config_to_hf(cfg: BlipConfig, logit_scale: float | None = None) -> dict:
  """BlipConfig -> a config.json that transformers' BlipForImageTextRetrieval.from_pretrained reads.
  `logit_scale`: the learnt value, stored as logit_scale_init_value (default the config's)."""
  vision = {theirs: getattr(cfg.vision, ours) for ours, theirs in weights.VISION_CONFIG_KEYS.items()}
  text = {theirs: getattr(cfg.text, ours) for ours, theirs in _TEXT_KEYS.items()}
  return {
      "architectures": [BLIP_ARCHITECTURE], "model_type": "blip", "dtype": "float32",
      "image_text_hidden_size": cfg.embed_dim,
      "logit_scale_init_value": float(cfg.logit_scale_init if logit_scale is None else logit_scale),
      "vision_config": {"model_type": "blip_vision_model", **vision},
      "text_config": {"model_type": "blip_text_model", "encoder_hidden_size": cfg.vision.width, **text},
  }


def blip_preprocessor_to_hf(cfg: BlipConfig) -> dict:
  """preprocessor_config.json for transformers' BlipImageProcessor (square bicubic resize, normalise)."""
  size = cfg.vision.image_size
  return {"image_processor_type": "BlipImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
          "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(cfg.vision.image_mean), "image_std": list(cfg.vision.image_std),
          "do_convert_rgb": True}


# ------------------------------------------------------------------------------------------------
# Loading and saving.


def load_blip(source: str | os.PathLike, *, dtype: str | None = None, context_length: int | None = None) -> BLIP:
  """A BLIP from a transformers-layout directory or hub id (e.g. Salesforce/blip-itm-base-coco).

  `dtype` is the compute dtype (default float32); parameters are always float32. Image mean/std come from
  the image processor's settings when they are there (as `load_clip` reads them), else BLIP's (OpenAI
  CLIP's). `context_length`: tokens per caption (default 35, BLIP's retrieval setting, at most
  max_position_embeddings).
  """
  dtype = weights.compute_dtype(dtype)
  directory = weights.checkpoint_directory(source, BLIP_ARCHITECTURE)
  files = weights.weight_files(directory, BLIP_ARCHITECTURE)
  preprocessor, preprocessor_source = weights.read_image_processor(directory)
  cfg = blip_config_from_hf(hub.read_json_object(directory / "config.json"), preprocessor, dtype=dtype,
                            context_length=context_length, source=str(directory / "config.json"),
                            preprocessor_source=str(directory / preprocessor_source))
  abstract = nnx.eval_shape(lambda: BLIP(cfg, rngs=nnx.Rngs(0)))
  # logit_scale is no tensor of transformers' retrieval class: fill the others, then set it from config.json.
  graphdef, state = nnx.split(abstract)
  scale_free = _without_logit_scale(graphdef, state)
  loaded = weights.fill_parameters(scale_free, BLIP_ARCHITECTURE, blip_table(cfg), files, BLIP_IGNORED, str(directory))
  loaded.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32))
  return loaded


def _without_logit_scale(graphdef: nnx.GraphDef, state: nnx.State) -> BLIP:
  """The abstract model with `logit_scale` removed, so `weights.fill_parameters`' table covers every parameter."""
  model = nnx.merge(graphdef, state)
  del model.logit_scale
  return model


def save_blip(model: BLIP | tuple[Any, nnx.State], directory: str | os.PathLike, *, tokenizer: Any = None) -> Path:
  """Write config.json, model.safetensors and preprocessor_config.json (and the tokenizer's files if one is
  given) in the layout that transformers' `BlipForImageTextRetrieval.from_pretrained` and `load_blip` read."""
  cfg, state = weights.config_and_params(model)
  scale = np.float32(np.asarray(state["logit_scale"].get_value()))
  # An untrained scale is the config's value rounded to float32: write the config's, so the config round-trips.
  scale = cfg.logit_scale_init if scale == np.float32(cfg.logit_scale_init) else float(scale)
  # logit_scale is no tensor of transformers' retrieval class (blip_table leaves it out): config.json carries it.
  return weights.write_model_directory(directory, state, blip_table(cfg), blip_config_to_hf(cfg, scale),
                                       image_processor=blip_preprocessor_to_hf(cfg), tokenizer=tokenizer)


def is_blip(source: str | os.PathLike) -> bool:
  """Whether a transformers-layout directory or hub id holds a BLIP (config.json's model_type 'blip')."""
  directory = hub.resolve(source, ("config.json",))
  path = directory / "config.json"
  return path.exists() and hub.read_json_object(path).get("model_type") == "blip"
