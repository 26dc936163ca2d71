"""The functional view of a dual encoder: a static graph definition plus a parameter pytree.

Attacks, losses and train steps never hold an `nnx.Module`. They take `(encoder, params, ...)`, where
`encoder` is a hashable `DualEncoder` (safe to close over or mark static under `jit`) and `params` is
the `nnx.State` from one `nnx.split`. The module is rebuilt with `nnx.merge` inside the traced function,
which costs nothing at run time and keeps every compiled boundary explicit.

    encoder, params = split(model)
    feats = jax.jit(encoder.image_features)(params, images)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mat_jax.errors import InputError
from mat_jax.models.clip import CLIP, CLIPConfig, l2_normalize


@dataclasses.dataclass(frozen=True)
class DualEncoder:
  graphdef: nnx.GraphDef
  config: CLIPConfig

  def merge(self, params: nnx.State) -> CLIP:
    return nnx.merge(self.graphdef, params)

  def image_features(self, params: nnx.State, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) pixels in [0, 1] -> unnormalised features (B, D)."""
    return self.merge(params).encode_image(images)

  def text_features(self, params: nnx.State, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(..., L) token ids and mask -> unnormalised features (..., D); leading axes are flattened."""
    lead = input_ids.shape[:-1]
    flat = self.merge(params).encode_text(input_ids.reshape(-1, input_ids.shape[-1]),
                                          attention_mask.reshape(-1, attention_mask.shape[-1]))
    return flat.reshape(*lead, flat.shape[-1])

  def text_features_and_cache(self, params: nnx.State, input_ids: jax.Array, attention_mask: jax.Array):
    """(B, L) texts -> features (B, D) and the text tower's per-block keys and values, from which
    `text_features_continued` encodes texts that begin like these (the tower is causal)."""
    return self.merge(params).encode_text_with_cache(input_ids, attention_mask)

  def text_features_continued(self, params: nnx.State, cache, start: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Features (B, D) of texts made of the cached texts' first `start` (B,) tokens and then `input_ids`
    (B, S); exact when `start` is at most the whole text's pooled (end-of-text) position."""
    return self.merge(params).encode_text_continuation(cache, start, input_ids)

  def image_embeddings(self, params: nnx.State, images: jax.Array) -> jax.Array:
    """L2-normalised image features."""
    return l2_normalize(self.image_features(params, images))

  def text_embeddings(self, params: nnx.State, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """L2-normalised text features."""
    return l2_normalize(self.text_features(params, input_ids, attention_mask))

  def logit_scale(self, params: nnx.State) -> jax.Array:
    """The learned log of the logit multiplier, as stored (unclamped)."""
    return params["logit_scale"][...]

  def temperature(self, params: nnx.State) -> jax.Array:
    """The multiplier of the cosine logits that losses use: exp(logit_scale) clamped to the range the
    model trains in (CLIP: at most 100; BLIP: 2 to 1000).

    The gradient passes the clamp straight through, as in CLIP's and BLIP's trainers, which clamp the
    parameter itself and use it unclamped: a temperature at its bound can still move back inside (the
    train step projects it back after each update, `clamp_logit_scale`). OpenAI's CLIP stores 4.6052,
    just above log(100), where a plain clip's zero gradient would freeze it for the whole fine-tuning.
    """
    log_scale = self.logit_scale(params)
    clamped = log_scale + jax.lax.stop_gradient(jnp.clip(log_scale, *self.config.logit_scale_range) - log_scale)
    return jnp.exp(clamped)

  def clamp_logit_scale(self, params: nnx.State) -> nnx.State:
    """`params` with `logit_scale` (when present: it may be frozen or outside a split) clipped into the
    model's range: the projection after each optimizer update."""
    if "logit_scale" not in params:
      return params
    clamped = jax.tree.map(lambda x: x, params)
    variable = params["logit_scale"]
    clamped["logit_scale"] = variable.replace(jnp.clip(variable[...], *self.config.logit_scale_range))
    return clamped


def split(model: CLIP) -> tuple[DualEncoder, nnx.State]:
  """(encoder, params) of a mat_jax CLIP or BLIP."""
  if not isinstance(model, nnx.Module) or not hasattr(model, "config"):
    already = "; an (encoder, params) pair is split already" if isinstance(model, tuple) else ""
    raise InputError(f"split takes a mat_jax CLIP or BLIP (load one with mat_jax.models.load_clip), got "
                     f"{type(model).__name__}{already}")
  graphdef, params = nnx.split(model)
  return DualEncoder(graphdef, model.config), params
