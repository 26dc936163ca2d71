"""CLIP dual encoder in Flax NNX: a ViT image tower and a causal text tower.

Mirrors transformers' `CLIPModel` so that its safetensors load by a name table (`weights.py`) and the
embeddings match to float32 round-off. Images enter in pixel space (float32 NHWC in [0, 1]); the
mean/std normalisation is the first thing the image tower does, so attack budgets ε are in pixel units.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mat_jax import checks, runtime
from mat_jax.errors import InputError
from mat_jax.models import layers

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
POOLINGS = ("eos", "argmax")
# One block's keys (B, heads, head_dim, L) and values (B, heads, L, head_dim) (`MultiHeadAttention.keys_values`);
# a text tower's cache holds one pair per block.
KeysValues = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 224
  patch_size: int = 32
  width: int = 768                 # transformers: hidden_size
  layers: int = 12                 # num_hidden_layers
  heads: int = 12                  # num_attention_heads
  mlp_dim: int = 3072              # intermediate_size
  activation: str = "quick_gelu"   # hidden_act
  layer_norm_eps: float = 1e-5
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 49408
  context_length: int = 77         # max_position_embeddings
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  bos_token_id: int = 49406
  pad_token_id: int = 1
  # Where the text is pooled: "eos" at the first eos_token_id, "argmax" at the largest token id. None
  # (the default) follows transformers' CLIPTextTransformer, see `text_pooling`. An explicit value that
  # contradicts that rule cannot be written to a config.json transformers reads, so save_clip refuses it.
  pooling: str | None = None

  def __post_init__(self) -> None:
    if self.pooling is not None and self.pooling not in POOLINGS:
      raise ValueError(f"unknown text pooling {self.pooling!r}; supported: {POOLINGS}, or None for "
                       "transformers' rule (argmax iff eos_token_id == 2)")

  @property
  def positions(self) -> int:
    """The longest token sequence the tower takes: its position table, which is CLIP's context length."""
    return self.context_length

  @property
  def text_pooling(self) -> str:
    """The pooling in effect: `pooling`, else transformers' rule.

    transformers pools at the largest id when eos_token_id == 2 (the value in the OpenAI configs before
    its PR #24773, whose BPE end token is the largest id) and at the first eos_token_id otherwise. Derived
    on read rather than stored, so `dataclasses.replace(text, eos_token_id=...)` re-derives it.
    """
    if self.pooling is not None:
      return self.pooling
    return "argmax" if self.eos_token_id == 2 else "eos"


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Mirrors transformers' CLIPConfig; `dtype` is the compute dtype (parameters stay float32)."""
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  projection_dim: int = 512
  logit_scale_init: float = 2.6592  # log(1 / 0.07)
  dtype: str = "float32"
  # Where the contrastive loss clamps logit_scale (log of the logit multiplier): CLIP trains with the
  # multiplier at most 100. A class constant, not read from or written to config.json.
  logit_scale_range: ClassVar[tuple[float, float]] = (-math.inf, math.log(100.0))
  # Run the blocks before each tower's last one as one `lax.scan` over their parameters stacked at trace
  # time (the parameter tree keeps one entry per block): XLA compiles one block instead of `layers - 1`.
  # Same numbers (the test suite checks it); see docs/performance.md for what it costs and saves.
  scan_layers: bool = False
  # How attention is computed: "auto" (einsum on CPU, cuDNN flash attention on GPU in bf16, XLA's fused
  # attention otherwise), "einsum", "xla" or "cudnn"; see mat_jax.models.layers.ATTENTION_PATHS.
  attention: str = "auto"
  # What the backward pass keeps of each block's intermediates (layers.REMAT_POLICIES): "none" keeps
  # them all; a policy recomputes the rest from the block's input, trading compute for activation
  # memory at large batches. Same values and gradients; docs/performance.md measures it. Out of the
  # repr, which keys cached runs by their preset (`runs.result_parts`): an execution option must not
  # move those keys (tests/test_config.py pins the demo's).
  remat: str = dataclasses.field(default="none", repr=False)

  def __post_init__(self) -> None:
    if self.attention not in layers.ATTENTION_PATHS:
      raise ValueError(f"unknown attention {self.attention!r}; choose from {layers.ATTENTION_PATHS}")
    layers.check_remat(self.remat)

  def replace(self, **changes: Any) -> "CLIPConfig":
    return dataclasses.replace(self, **changes)


# Compute dtypes by name; "auto" is the mixed-precision default of `resolve_dtype`.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str | None) -> str:
  """A compute dtype name; "auto" (or None) is bfloat16 on GPU and TPU, float32 on CPU.

  Only the compute dtype: parameters, optimizer state, softmax, LayerNorm statistics, losses and the
  images stay float32 whatever it is (see docs/performance.md).
  """
  name = "auto" if dtype is None else str(dtype)
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute dtype {dtype!r} is not one of {COMPUTE_DTYPES}")
  if name != "auto":
    return name
  return "float32" if runtime.program_backend() == "cpu" else "bfloat16"


def _vit(image_size, patch, width, layers, heads, proj, text_width, text_layers, text_heads):
  return CLIPConfig(
      vision=VisionConfig(image_size=image_size, patch_size=patch, width=width, layers=layers,
                          heads=heads, mlp_dim=4 * width),
      text=TextConfig(width=text_width, layers=text_layers, heads=text_heads, mlp_dim=4 * text_width),
      projection_dim=proj,
  )


# The OpenAI checkpoints, as transformers' configs describe them.
PRESETS: dict[str, CLIPConfig] = {
    "vit-b-32": _vit(224, 32, 768, 12, 12, 512, 512, 12, 8),
    "vit-b-16": _vit(224, 16, 768, 12, 12, 512, 512, 12, 8),
    "vit-l-14": _vit(224, 14, 1024, 24, 16, 768, 768, 12, 12),
    "vit-l-14-336": _vit(336, 14, 1024, 24, 16, 768, 768, 12, 12),
    # The shapes world: 48x48 renders cut into one 16-px patch per cell of the world's 3x3 grid, two
    # wide layers per tower (fewer, wider layers learn faster per CPU second than four narrow ones),
    # a lexicon-sized vocabulary, short captions. The vocabulary
    # matches `mat_jax.data.shapes` tokenizer's size; load_clip/configs override it when it differs.
    # Special ids as that tokenizer's ([PAD]=0, [START]=2, [END]=3): an end id other than 2, so the text
    # is pooled at the first end token here and in transformers alike.
    "tiny": CLIPConfig(
        vision=VisionConfig(image_size=48, patch_size=16, width=256, layers=2, heads=4, mlp_dim=1024),
        text=TextConfig(vocab_size=128, context_length=24, width=256, layers=2, heads=4,
                        mlp_dim=1024, eos_token_id=3, bos_token_id=2, pad_token_id=0),
        projection_dim=128,
    ),
}


def clip_config(name: str, **overrides: Any) -> CLIPConfig:
  """A preset by name (see PRESETS), with top-level fields replaced."""
  if name not in PRESETS:
    raise ValueError(f"unknown CLIP preset {name!r}; available: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x)).

  Initialised as CLIP is (transformers' CLIPPreTrainedModel): the layers that write into the residual
  stream are scaled down with the tower's depth, so a freshly initialised tower neither blows up nor
  ignores its input. (A flat N(0, 0.02) leaves a narrow ViT's class token blind to the patches: the
  image embeddings of different images start at cosine 0.9998 and contrastive training stalls.)
  """

  def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float, *, depth: int,
               dtype, rngs: nnx.Rngs, attention: str = "auto", remat: str = "none"):
    kw = dict(dtype=dtype, rngs=rngs)
    self.remat = layers.check_remat(remat)
    residual_std = width ** -0.5 * (2 * depth) ** -0.5
    self.ln1 = layers.layer_norm(width, eps, **kw)
    self.attn = layers.MultiHeadAttention(width, heads, qkv_std=residual_std, out_std=width ** -0.5,
                                          attention=attention, **kw)
    self.ln2 = layers.layer_norm(width, eps, **kw)
    self.fc1 = layers.dense(width, mlp_dim, ("embed", "mlp"), init_std=(2 * width) ** -0.5, **kw)
    self.fc2 = layers.dense(mlp_dim, width, ("mlp", "embed"), init_std=residual_std, **kw)
    self.act = layers.activation(act)

  def __call__(self, x: jax.Array, mask: jax.Array | None,
               rows: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """x: (B, L, W) -> (B, L, W); or, with `rows` (a map (B, L, W) -> (B, R, W) picking R token
    positions), only those rows' outputs (B, R, W): every token is still attended to (keys and values
    of all rows), but queries, the output projection and the MLP run on R rows only. The towers use
    it in their last block, whose other rows nothing reads: most of that block's FLOPs are saved,
    forward and backward (7% of ViT-B/16), with the same result."""
    return self.run(x, mask, rows)[0]

  def run(self, x: jax.Array, mask: jax.Array | None, rows: Callable[[jax.Array], jax.Array] | None = None,
          cache: KeysValues | None = None) -> tuple[jax.Array, KeysValues]:
    """As `__call__`, and also returns this block's keys and values of x (`KeysValues` of its L tokens).

    cache: this block's keys and values of P tokens that come before x's, attended
    first: `mask` then covers P + L keys. A causal tower continues a text this way without recomputing
    its shared beginning (`TextTower.encode_continuation`).
    """
    if rows is None:  # every row kept: one program for the tower's blocks (`rows` is a Python function)
      return layers.shared_call(self, x, mask, None, cache, method="_run", remat=self.remat)
    return self._run(x, mask, rows, cache)

  def _run(self, x: jax.Array, mask: jax.Array | None, rows: Callable[[jax.Array], jax.Array] | None,
           cache: KeysValues | None) -> tuple[jax.Array, KeysValues]:
    h = self.ln1(x)
    own = self.attn.keys_values(h)
    keys, values = own if cache is None else self.attn.join(cache, own)
    if rows is None:
      x = x + self.attn.attend(h, keys, values, mask)
    else:
      x = rows(x) + self.attn.attend(rows(h), keys, values, mask)
    return x + self.fc2(self.act(self.fc1(self.ln2(x)))), own


def scan_blocks(blocks: Sequence[EncoderBlock], x: jax.Array,
                body: Callable[[EncoderBlock, jax.Array, Any], tuple[jax.Array, Any]], xs: Any = None
                ) -> tuple[jax.Array, Any]:
  """Apply structurally identical blocks in order through one `lax.scan`: `body(block, x, xs_i)` returns
  the next x and a per-block output, stacked along a new leading axis like `xs` (per-block inputs).

  The blocks' parameters are stacked here, inside the traced function, so the model's parameter tree
  (checkpoints, the transformers name table, shardings) keeps one entry per block; the stack is a copy
  of those parameters per call, and the scan's gradient is unstacked back onto each block's entry.
  """
  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(nnx.state(b) for b in blocks))

  def step(carry, inputs):
    state, extra = inputs
    return body(nnx.merge(graphdef, state), carry, extra)

  return jax.lax.scan(step, x, (stacked, xs))


class VisionTower(nnx.Module):
  """ViT: patch embedding, class token, positions, pre-LN, blocks, post-LN on the class token."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, scan: bool = False, attention: str = "auto",
               remat: str = "none"):
    if cfg.layers < 1:
      raise ValueError(f"the image tower needs at least one layer, got layers={cfg.layers}")
    self.cfg = cfg
    self.dtype = dtype
    self.scan = scan
    self.attention = attention
    w, p = cfg.width, cfg.patch_size
    init = nnx.initializers.normal(0.02)
    # Stored as a conv kernel (HWIO); applied as one matmul over flattened patches (same numbers, and
    # XLA fuses the patch extraction on every backend).
    self.patch_kernel = nnx.Param(layers.sharded(init, None, None, None, "embed")(rngs.params(), (p, p, 3, w)))
    self.class_embedding = nnx.Param(
        layers.sharded(nnx.initializers.normal(w ** -0.5), "embed")(rngs.params(), (w,)))
    self.position_embedding = nnx.Param(
        layers.sharded(init, None, "embed")(rngs.params(), (cfg.num_patches + 1, w)))
    self.pre_ln = layers.layer_norm(w, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([
        EncoderBlock(w, cfg.heads, cfg.mlp_dim, cfg.activation, cfg.layer_norm_eps, depth=cfg.layers,
                     dtype=dtype, rngs=rngs, attention=attention, remat=remat)
        for _ in range(cfg.layers)])
    self.post_ln = layers.layer_norm(w, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels: float32 (B, H, W, 3) in [0, 1] -> pooled class-token features (B, width)."""
    cfg = self.cfg
    mean = jnp.asarray(cfg.image_mean, jnp.float32)
    std = jnp.asarray(cfg.image_std, jnp.float32)
    x = ((pixels - mean) / std).astype(self.dtype)
    b, p = x.shape[0], cfg.patch_size
    kernel = self.patch_kernel[...].reshape(p * p * 3, cfg.width).astype(self.dtype)
    tokens = layers.patches(x, p) @ kernel
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, cfg.width))
    x = jnp.concatenate([cls, tokens], axis=1) + self.position_embedding[...].astype(self.dtype)
    x = self.pre_ln(x)
    # Tokens added for the fused attention's lengths are hidden as keys and never read.
    x, mask = layers.with_tower_tokens(x, self.attention, self.dtype)
    if self.scan and len(self.blocks) > 2:
      x, _ = scan_blocks(self.blocks[:-1], x, lambda block, x, _: (block(x, mask), None))
    else:
      for block in self.blocks[:-1]:
        x = block(x, mask)
    x = self.blocks[-1](x, mask, rows=lambda t: t[:, :1])  # only the class token is pooled
    return self.post_ln(x[:, 0])


class TextTower(nnx.Module):
  """Causal transformer; pooled at the end-of-text token exactly as transformers does."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, scan: bool = False, attention: str = "auto",
               remat: str = "none"):
    if cfg.layers < 1:
      raise ValueError(f"the text tower needs at least one layer, got layers={cfg.layers}")
    self.cfg = cfg
    self.dtype = dtype
    self.scan = scan
    self.token_embedding = layers.embed(cfg.vocab_size, cfg.width, "vocab", dtype=dtype, rngs=rngs)
    self.position_embedding = nnx.Param(
        layers.sharded(nnx.initializers.normal(0.02), None, "embed")(
            rngs.params(), (cfg.context_length, cfg.width)))
    self.blocks = nnx.List([
        EncoderBlock(cfg.width, cfg.heads, cfg.mlp_dim, cfg.activation, cfg.layer_norm_eps,
                     depth=cfg.layers, dtype=dtype, rngs=rngs, attention=attention, remat=remat)
        for _ in range(cfg.layers)])
    self.final_ln = layers.layer_norm(cfg.width, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """input_ids, attention_mask: int (B, L) with L <= context_length -> pooled features (B, width)."""
    return self.encode_with_cache(input_ids, attention_mask)[0]

  def encode_with_cache(self, input_ids: jax.Array, attention_mask: jax.Array
                        ) -> tuple[jax.Array, tuple[KeysValues, ...]]:
    """Pooled features (B, width) and every block's keys and values (`KeysValues`) of the texts,
    from which `encode_continuation` encodes texts that begin like these."""
    length = input_ids.shape[1]
    x = self.token_embedding(input_ids) + self.position_embedding[:length].astype(self.dtype)
    mask = layers.causal_mask(length) & layers.padding_mask(attention_mask)
    return self._encode(x, mask, self.pooled_position(input_ids), None)

  def encode_continuation(self, cache: tuple[KeysValues, ...], start: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Pooled features (B, width) of texts made of the first `start` (B,) tokens of the texts `cache`
    came from (row for row, see `encode_with_cache`) followed by `input_ids` (B, S) at positions
    start, start + 1, ...

    The tower is causal, so a token's activations depend only on the tokens up to it: those before
    `start` are the cached ones, and only the S new positions are computed (attending to the cached
    keys before `start`). Exact (the same function as `__call__` on the whole text) when the pooled
    token lies in `input_ids`: start must not exceed the whole text's pooled position. Positions past
    the pooled one are never read, so `input_ids` may end with anything (padding).
    """
    rows, length = input_ids.shape
    cached = cache[0][0].shape[-1]
    positions = start[:, None] + jnp.arange(length)
    # Positions past the table only hold tokens after the pooled one, which nothing reads.
    x = self.token_embedding(input_ids) + jnp.take(self.position_embedding[...], positions, axis=0,
                                                   mode="clip").astype(self.dtype)
    earlier = (jnp.arange(cached) < start[:, None])[:, None, None, :]
    mask = jnp.concatenate([jnp.broadcast_to(earlier, (rows, 1, length, cached)),
                            jnp.broadcast_to(layers.causal_mask(length), (rows, 1, length, length))], axis=-1)
    return self._encode(x, mask, self.pooled_position(input_ids), cache)[0]

  def pooled_position(self, input_ids: jax.Array) -> jax.Array:
    """(B, L) ids -> (B,) index of the token whose final state is the text's feature."""
    if self.cfg.text_pooling == "argmax":
      return jnp.argmax(input_ids, axis=-1)
    # First occurrence: the pad id may equal the eos id (OpenAI's tokenizer pads with end-of-text).
    return jnp.argmax(input_ids == self.cfg.eos_token_id, axis=-1)

  def _encode(self, x, mask, pooled, cache):
    """Blocks over embedded tokens x (B, L, W) with a boolean mask (B, 1, L, keys) -> pooled features and the
    blocks' keys and values of x. `cache`: keys and values of earlier tokens per block (see `EncoderBlock.run`)."""
    out = []
    if self.scan and len(self.blocks) > 2:
      earlier = None if cache is None else jax.tree.map(lambda *t: jnp.stack(t), *cache[:-1])
      x, stacked = scan_blocks(self.blocks[:-1], x, lambda block, x, c: block.run(x, mask, cache=c), earlier)
      out = [jax.tree.map(lambda t, i=i: t[i], stacked) for i in range(len(self.blocks) - 1)]
    else:
      for i, block in enumerate(self.blocks[:-1]):
        x, keys_values = block.run(x, mask, cache=None if cache is None else cache[i])
        out.append(keys_values)
    # The last block computes the pooled row only, with that row's mask (the keys up to itself).
    mask = jnp.broadcast_to(mask, (x.shape[0], 1, x.shape[1], mask.shape[-1]))
    pooled_mask = jnp.take_along_axis(mask, pooled[:, None, None, None], axis=2)
    def pooled_row(t):
      return jnp.take_along_axis(t, pooled[:, None, None], axis=1)
    x, keys_values = self.blocks[-1].run(x, pooled_mask, rows=pooled_row,
                                         cache=None if cache is None else cache[-1])
    out.append(keys_values)
    return self.final_ln(x[:, 0]), tuple(out)


class CLIP(nnx.Module):
  """CLIP dual encoder. Features are projected but not normalised (as transformers returns them)."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    towers = dict(dtype=dtype, rngs=rngs, scan=config.scan_layers, attention=config.attention,
                  remat=config.remat)
    self.vision = VisionTower(config.vision, **towers)
    self.text = TextTower(config.text, **towers)
    kw = dict(use_bias=False, dtype=dtype, rngs=rngs)
    self.visual_projection = layers.dense(config.vision.width, config.projection_dim, ("embed", "proj"),
                                          init_std=config.vision.width ** -0.5, **kw)
    self.text_projection = layers.dense(config.text.width, config.projection_dim, ("embed", "proj"),
                                        init_std=config.text.width ** -0.5, **kw)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, jnp.float32))

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """float32 (B, H, W, 3) in [0, 1] -> float32 (B, projection_dim).

    Shapes and dtypes are checked when traced; the value range only on concrete (eager) input.
    """
    check_pixels(pixels, self.config.vision)
    pixels = jnp.asarray(pixels)  # a list or numpy batch, as the checks take it
    return self.visual_projection(self.vision(pixels)).astype(jnp.float32)

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """int (B, L) ids and 0/1 mask -> float32 (B, projection_dim).

    Shapes are checked when traced; the id range only on concrete (eager) input.
    """
    check_text(input_ids, attention_mask, self.config.text)
    input_ids, attention_mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
    return self.text_projection(self.text(input_ids, attention_mask)).astype(jnp.float32)

  def encode_text_with_cache(self, input_ids: jax.Array, attention_mask: jax.Array
                             ) -> tuple[jax.Array, tuple[KeysValues, ...]]:
    """`encode_text`'s features, and the text tower's keys and values for `encode_text_continuation`."""
    check_text(input_ids, attention_mask, self.config.text)
    pooled, cache = self.text.encode_with_cache(input_ids, attention_mask)
    return self.text_projection(pooled).astype(jnp.float32), cache

  def encode_text_continuation(self, cache: tuple[KeysValues, ...], start: jax.Array,
                               input_ids: jax.Array) -> jax.Array:
    """Features (B, projection_dim) of texts that share their first `start` tokens with the cached ones
    and go on with `input_ids`; see `TextTower.encode_continuation`."""
    start = jnp.asarray(start)
    rows = input_ids.shape[0]
    if input_ids.ndim != 2 or start.shape != (rows,) or cache[0][0].shape[0] != rows:
      raise ValueError(f"continuing texts needs input_ids (B, S), start (B,) and a cache of B texts, got "
                       f"input_ids {tuple(input_ids.shape)}, start {tuple(start.shape)} and a cache of "
                       f"{cache[0][0].shape[0]} texts; index the cache's rows for these texts first: "
                       "jax.tree.map(lambda t: t[rows], cache)")
    return self.text_projection(self.text.encode_continuation(cache, start, input_ids)).astype(jnp.float32)

  def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array):
    """Cosine-similarity logits (B_img, B_txt), scaled by exp(logit_scale)."""
    img = l2_normalize(self.encode_image(pixels))
    txt = l2_normalize(self.encode_text(input_ids, attention_mask))
    return jnp.exp(self.logit_scale[...]) * img @ txt.T


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def feature_products(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum(subscripts, a, b)` of float32 features (cosines, the logits of a loss) in full float32 on
  every backend. By default XLA computes a float32 product in one bfloat16 pass on a TPU and in TF32 on
  an NVIDIA GPU: logits at CLIP's temperature 100 would be off by up to 0.06 and 0.009. These products
  are small next to the encoders'. A CPU's default is float32 already: its programs are left as they are
  (and so are their entries in the persistent compilation cache)."""
  precision = None if runtime.program_backend() == "cpu" else jax.lax.Precision.HIGHEST
  return jnp.einsum(subscripts, a, b, precision=precision)


def check_pixels(pixels: Any, cfg: VisionConfig) -> None:
  """Raise a clear error for images the image tower cannot take (`mat_jax.checks.check_images`).

  Shape and dtype are checked always (they are static under `jit`); values (finite, in [0, 1]) only for
  concrete arrays: call it on the host before entering `jit`.
  """
  checks.check_images(pixels, cfg.image_size)


def check_text(input_ids: Any, attention_mask: Any, cfg: TextConfig) -> None:
  """Raise a clear error for token batches the text tower cannot take (`mat_jax.checks.check_token_ids`).

  Shapes and dtypes are checked always (static under `jit`); the id range only for concrete arrays.
  """
  checks.check_token_ids(input_ids, attention_mask, cfg.positions, cfg.vocab_size)


def check_tokens_for(input_ids: Any, attention_mask: Any, end_id: int | None, cfg: TextConfig, *,
                     name: str = "tokenizer") -> None:
  """Host-side, before a model encodes a tokenizer's batch: `check_text` with the id range, and the
  tokenizer's end token agreeing with where the tower pools. Under `jit` ids are traced and an id
  outside the table is silently clamped (a wrong but finite feature) or read as NaN, and a text
  without the model's eos id is pooled at its first token: a mismatched tokenizer gives numbers, not an
  error, unless it is caught here."""
  check_text(np.asarray(input_ids), np.asarray(attention_mask), cfg)
  pooling = cfg.text_pooling
  if end_id is None and pooling in POOLINGS:  # the towers that pool at the end token (not BLIP's "cls")
    raise InputError(f"the {name} adds no end token after a text, but the text tower pools at its end token "
                     f"({pooling} pooling): every text would be pooled at the wrong position; use the tokenizer "
                     "saved with these weights")
  if pooling == "eos" and end_id != cfg.eos_token_id:
    raise InputError(f"the {name}'s end token id is {end_id} but the text tower pools at its eos_token_id "
                     f"{cfg.eos_token_id}: every text would be pooled at the wrong position; use the tokenizer "
                     "saved with these weights")
  if pooling == "argmax" and np.any(np.asarray(input_ids) > end_id):
    raise InputError(f"the text tower pools at the largest token id (OpenAI's end-of-text, transformers' rule "
                     f"for eos_token_id == 2), but the {name}'s ids exceed its end token id {end_id}: texts would "
                     "be pooled at the wrong position; use the tokenizer saved with these weights")


