"""Building blocks: the 2-D dense layer computes what nnx.Linear computes, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mat_jax.models import layers


def test_dense_matches_linear_on_any_leading_shape():
  dense = layers.dense(8, 6, ("embed", "mlp"), init_std=0.5, rngs=nnx.Rngs(0))
  linear = nnx.Linear(8, 6, rngs=nnx.Rngs(1))
  linear.kernel[...] = dense.kernel[...]
  linear.bias[...] = jax.random.normal(jax.random.key(2), (6,))
  dense.bias[...] = linear.bias[...]
  x = jax.random.normal(jax.random.key(3), (2, 3, 5, 8))
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(dense(x), linear(x), rtol=1e-6, atol=1e-6)
    assert dense(x[0, 0, 0]).shape == (6,)

    def grads(module):
      graphdef, params = nnx.split(module)
      return jax.grad(lambda p, x: jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(x))), argnums=(0, 1))(params, x)

    (gp_dense, gx_dense), (gp_linear, gx_linear) = grads(dense), grads(linear)
  np.testing.assert_allclose(gx_dense, gx_linear, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gp_dense["kernel"][...], gp_linear["kernel"][...], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gp_dense["bias"][...], gp_linear["bias"][...], rtol=1e-5, atol=1e-5)


def test_embedding_gradients_are_summed_in_float32_under_bf16_compute():
  """A token that occurs often gets its gradient as one sum of many updates. nnx.Embed gathers from a table
  cast to bf16, so that sum runs in bf16 and stalls (1,000 ones add up to 256); layers.Embed gathers from
  the float32 table and casts the rows: the same forward values, the sum in float32."""
  ids = jnp.full((1000,), 5, jnp.int32).at[::10].set(7)
  ours = layers.embed(10, 4, "vocab", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  flax = nnx.Embed(10, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  flax.embedding[...] = ours.embedding[...]
  np.testing.assert_array_equal(np.asarray(ours(ids), np.float32), np.asarray(flax(ids), np.float32))
  assert ours(ids).dtype == jnp.bfloat16

  def grad(module):
    graphdef, state = nnx.split(module)
    g = jax.grad(lambda s: nnx.merge(graphdef, s)(ids).astype(jnp.float32).sum())(state)
    return np.asarray(g["embedding"][...])

  np.testing.assert_array_equal(grad(ours)[[5, 7]], [[900.0] * 4, [100.0] * 4])
  assert grad(flax)[5, 0] < 900  # the bf16 sum that layers.Embed avoids
