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
