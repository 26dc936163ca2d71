"""BERT masked language model in Flax NNX: the text attack's source of substitution candidates.

Mirrors transformers' `BertForMaskedLM` (absolute positions, post-LN encoder, MLM head whose decoder is
tied to the word embeddings plus an output bias), so bert-base-uncased's safetensors load by the name
table in `weights.py` and the logits match to float32 round-off.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mat_jax import checks
from mat_jax.errors import InputError
from mat_jax.models import layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """transformers' BertConfig fields that the masked LM uses (same names, same defaults).

  `dtype` is the compute dtype; parameters stay float32.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  dtype: str = "float32"

  def replace(self, **changes: Any) -> "BertConfig":
    return dataclasses.replace(self, **changes)


BERT_PRESETS: dict[str, BertConfig] = {
    "bert-base-uncased": BertConfig(),
    # For tests and the shapes world: the vocabulary size is set from the tokenizer.
    "tiny": BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=64),
}


def bert_config(name: str, **overrides: Any) -> BertConfig:
  """A preset by name (see BERT_PRESETS), with fields replaced."""
  if name not in BERT_PRESETS:
    raise ValueError(f"unknown BERT preset {name!r}; available: {sorted(BERT_PRESETS)}")
  return BERT_PRESETS[name].replace(**overrides)


class BertBlock(nnx.Module):
  """Post-LN transformer block: ln1(x + attn(x)); ln2(x + mlp(x))."""

  def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    width = cfg.hidden_size
    self.attn = layers.MultiHeadAttention(width, cfg.num_attention_heads, **kw)
    self.attn_ln = layers.layer_norm(width, cfg.layer_norm_eps, **kw)
    self.fc1 = layers.dense(width, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.fc2 = layers.dense(cfg.intermediate_size, width, ("mlp", "embed"), **kw)
    self.mlp_ln = layers.layer_norm(width, cfg.layer_norm_eps, **kw)
    self.act = layers.activation(cfg.hidden_act)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attn_ln(x + self.attn(x, mask))
    return self.mlp_ln(x + self.fc2(self.act(self.fc1(x))))


class BertForMaskedLM(nnx.Module):
  """BERT encoder + MLM head. `__call__` returns float32 logits over the vocabulary at every position."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    if config.hidden_size % config.num_attention_heads:
      raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                       f"{config.num_attention_heads}")
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.dtype = dtype
    width = config.hidden_size
    self.word_embeddings = layers.embed(config.vocab_size, width, "vocab", dtype=dtype, rngs=rngs)
    self.position_embeddings = layers.embed(config.max_position_embeddings, width, None, dtype=dtype, rngs=rngs)
    self.token_type_embeddings = layers.embed(config.type_vocab_size, width, None, dtype=dtype, rngs=rngs)
    self.embeddings_ln = layers.layer_norm(width, config.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([BertBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)])
    # MLM head: transform (dense, activation, LN), then the tied decoder plus its own output bias.
    self.transform = layers.dense(width, width, ("embed", "embed"), dtype=dtype, rngs=rngs)
    self.transform_act = layers.activation(config.hidden_act)
    self.transform_ln = layers.layer_norm(width, config.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.output_bias = nnx.Param(layers.sharded(nnx.initializers.zeros_init(), "vocab")(
        rngs.params(), (config.vocab_size,)))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """int (B, L) ids, 0/1 mask and optional segment ids (default 0) -> float32 logits (B, L, vocab)."""
    check_bert_inputs(input_ids, attention_mask, token_type_ids, self.config)
    length = input_ids.shape[1]
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
         + self.position_embeddings.embedding[:length].astype(self.dtype))
    x = self.embeddings_ln(x)
    mask = layers.padding_mask(attention_mask)
    for block in self.blocks:
      x = layers.shared_call(block, x, mask)
    h = self.transform_ln(self.transform_act(self.transform(x)))
    logits = self.word_embeddings.attend(h) + self.output_bias[...].astype(self.dtype)
    return logits.astype(jnp.float32)


def check_bert_inputs(input_ids: Any, attention_mask: Any, token_type_ids: Any, cfg: BertConfig) -> None:
  """CLIP's and BLIP's checks (`checks.check_token_ids`) against BERT's positions and vocabulary, and the
  segment ids against its segment table: shapes and dtypes always (static under `jit`); id ranges only on
  concrete (eager) arrays."""
  checks.check_token_ids(input_ids, attention_mask, cfg.max_position_embeddings, cfg.vocab_size)
  if token_type_ids is None:
    return
  ids_shape, types_shape = tuple(np.shape(input_ids)), tuple(np.shape(token_type_ids))
  if types_shape != ids_shape:
    raise InputError(f"token_type_ids shape {types_shape} differs from input_ids shape {ids_shape}; pass None "
                     "for single-segment text.")
  checks.check_token_ids(token_type_ids, attention_mask, cfg.max_position_embeddings, cfg.type_vocab_size,
                         name="token_type_ids")
