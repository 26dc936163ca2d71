"""Transformer building blocks shared by the CLIP and BERT ports.

Parameter names follow Flax conventions (kernel, bias, scale, embedding); the map to transformers'
names lives in `weights.py`. Every parameter carries logical axis names (embed, mlp, heads, vocab, ...)
so `mat_jax.mesh` can shard it; without a mesh they are replicated.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Activations by their transformers name (`hidden_act` in the configs).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def sharded(init: nnx.Initializer, *axes: str | None) -> nnx.Initializer:
  """An initializer whose parameter carries logical axis names (no eager placement)."""
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


class Dense(nnx.Linear):
  """nnx.Linear applied to the inputs flattened to (rows, features).

  Same parameters and numbers. A (B, L, W) input makes the weight gradient a dot that contracts two
  axes of a transposed cotangent, which XLA:CPU lays out with a copy and runs at ~60% of the speed of
  the 2-D form (measured on ViT-B/16 shapes); flattened, both gradients are plain matrix products.
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    rows = inputs.shape[:-1]
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return y.reshape(*rows, y.shape[-1])


def dense(
    in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
    use_bias: bool = True, init_std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> Dense:
  return Dense(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=sharded(nnx.initializers.normal(init_std), *axes),
      bias_init=sharded(nnx.initializers.zeros_init(), axes[1]),
      precision=None, rngs=rngs,
  )


def layer_norm(features: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      features, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      scale_init=sharded(nnx.initializers.ones_init(), "embed"),
      bias_init=sharded(nnx.initializers.zeros_init(), "embed"),
      rngs=rngs,
  )


class MultiHeadAttention(nnx.Module):
  """Self-attention with separate q/k/v/out projections (the CLIP and BERT layout)."""

  def __init__(self, width: int, num_heads: int, *, qkv_std: float = 0.02, out_std: float = 0.02,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = width // num_heads
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = dense(width, width, ("embed", "heads"), init_std=qkv_std, **kw)
    self.key = dense(width, width, ("embed", "heads"), init_std=qkv_std, **kw)
    self.value = dense(width, width, ("embed", "heads"), init_std=qkv_std, **kw)
    self.out = dense(width, width, ("heads", "embed"), init_std=out_std, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               queries: jax.Array | None = None) -> jax.Array:
    """x: (B, L, W) keys and values (and queries unless `queries` (B, Q, W) is given) -> (B, Q, W).

    mask: bool, True where a query may attend to a key, broadcastable to (B, heads, Q, L); None
    attends everywhere.
    """
    return self.attend(x if queries is None else queries, *self.keys_values(x), mask)

  def keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: (B, L, W) -> keys (B, heads, head_dim, L) and values (B, heads, L, head_dim): what queries attend
    to (a cache of earlier tokens keeps them), laid out as the two attention products read them, so that
    XLA:CPU copies neither again (a cache joined to new keys in another layout was copied whole per use)."""
    return self._heads(self.key(x)).transpose(0, 2, 3, 1), self._heads(self.value(x)).transpose(0, 2, 1, 3)

  @staticmethod
  def join(earlier: tuple[jax.Array, jax.Array], later: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Keys and values of earlier tokens (a cache) followed by those of later ones (`keys_values` layout)."""
    return (jnp.concatenate([earlier[0], later[0]], axis=-1), jnp.concatenate([earlier[1], later[1]], axis=-2))

  def attend(self, queries: jax.Array, keys: jax.Array, values: jax.Array,
             mask: jax.Array | None = None) -> jax.Array:
    """queries (B, Q, W) attend to keys and values in the `keys_values` layout -> (B, Q, W); mask as
    __call__'s, over the keys' L."""
    q = self._heads(self.query(queries)) * (1.0 / math.sqrt(self.head_dim))
    logits = jnp.einsum("bqhd,bhdk->bhqk", q, keys, preferred_element_type=jnp.float32)
    if mask is not None:
      # A boolean select, not an additive bias: two -max biases summed overflow to -inf.
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # Softmax in float32 whatever the compute dtype: bf16 logits lose the small attention weights.
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    context = jnp.einsum("bhqk,bhkd->bqhd", weights, values).reshape(*queries.shape[:2], -1)
    return self.out(context)

  def _heads(self, t: jax.Array) -> jax.Array:
    return t.reshape(*t.shape[:2], self.num_heads, self.head_dim)


def padding_mask(attention_mask: jax.Array) -> jax.Array:
  """(B, L) 1/0 mask -> (B, 1, 1, L) boolean attention mask that hides padded keys."""
  return (attention_mask > 0)[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
  """(1, 1, L, L) boolean attention mask that hides future positions."""
  return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
