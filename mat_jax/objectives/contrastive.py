"""Symmetric InfoNCE with the learned temperature, one or several positives per image.

The loss is computed over the GLOBAL batch: under `jit` with the batch sharded over the mesh, the
(B, T) similarity matrix is the global one and XLA gathers the embeddings by itself.

Several positives (MAT+: k captions per image; also repeated or augmented images sharing an id).
Images and texts carry group ids; an image and a text are a positive pair iff their groups match.
For every positive pair (i, j) with similarity logits s = τ·cos (τ = exp(logit_scale), clamped to the
model's range, `DualEncoder.temperature`):

    image->text  l_ij = -log( e^{s_ij} / (e^{s_ij} + Σ_{j' ∉ group(i)} e^{s_ij'}) )
    text->image  m_ij = -log( e^{s_ij} / (e^{s_ij} + Σ_{i' ∉ group(j)} e^{s_i'j}) )
    loss = ½ (mean over positive pairs of l) + ½ (mean over positive pairs of m)

so each positive competes only with the negatives: an image's other captions (and a caption's other
images of the same group) are never negatives, and never in the denominator. With one caption per
image and distinct ids this is exactly CLIP's loss (mean cross-entropy over rows and over columns).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mat_jax.models import DualEncoder, feature_products
from mat_jax.objectives.base import Metrics, Objective

def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array,
                     image_groups: jax.Array, text_groups: jax.Array) -> tuple[jax.Array, Metrics]:
  """Multi-positive symmetric InfoNCE (module docstring). Embeddings are L2-normalised (B, D), (T, D);
  `scale` multiplies the cosines (the model's clamped temperature, `DualEncoder.temperature`)."""
  logits = scale * feature_products("bd,td->bt", image_emb, text_emb)  # (B, T)
  positive = image_groups[:, None] == text_groups[None, :]
  neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
  negatives = jnp.where(positive, neg_inf, logits)
  neg_lse_rows = jax.nn.logsumexp(negatives, axis=1, keepdims=True)     # image i vs its negatives
  neg_lse_cols = jax.nn.logsumexp(negatives, axis=0, keepdims=True)     # text j vs its negatives
  i2t = jnp.logaddexp(logits, neg_lse_rows) - logits
  t2i = jnp.logaddexp(logits, neg_lse_cols) - logits
  count = jnp.sum(positive)
  i2t_loss = jnp.sum(jnp.where(positive, i2t, 0.0)) / count
  t2i_loss = jnp.sum(jnp.where(positive, t2i, 0.0)) / count
  best_text = jnp.argmax(logits, axis=1)
  best_image = jnp.argmax(logits, axis=0)
  metrics = {
      "i2t_loss": i2t_loss,
      "t2i_loss": t2i_loss,
      # In-batch retrieval: is the top-scored text of each image one of its captions (and vice versa)?
      "i2t_acc": jnp.mean(jnp.take_along_axis(positive, best_text[:, None], axis=1)),
      "t2i_acc": jnp.mean(jnp.take_along_axis(positive, best_image[None, :], axis=0)),
  }
  return 0.5 * (i2t_loss + t2i_loss), metrics


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array,
              image_ids: jax.Array | None = None, one_to_one: bool = False) -> tuple[jax.Array, Metrics]:
  """Images (B, D) against texts (B, D) or (B, K, D) (K captions of image b at row b).

  Without `image_ids` every image is its own group; with them, images sharing an id (and all their
  captions) are positives of each other (1:N modelling). `one_to_one`: the same pairs modelled 1:1 (the
  MAT paper's Fig. 4(b) arm): each (image, caption k) is a pair of its own, the image repeated K times,
  so an image's other captions (and other images of its scene) are negatives.
  """
  batch = image_emb.shape[0]
  if one_to_one and text_emb.ndim == 3:
    k = text_emb.shape[1]
    image_emb = jnp.repeat(image_emb, k, axis=0)
    text_emb = text_emb.reshape(-1, text_emb.shape[-1])
    groups = jnp.arange(batch * k)
    return contrastive_loss(image_emb, text_emb, scale, groups, groups)
  if one_to_one:
    groups = jnp.arange(batch)
    return contrastive_loss(image_emb, text_emb, scale, groups, groups)
  groups = jnp.arange(batch) if image_ids is None else image_ids
  if text_emb.ndim == 3:
    text_groups = jnp.repeat(groups, text_emb.shape[1])
    text_emb = text_emb.reshape(-1, text_emb.shape[-1])
  else:
    text_groups = groups
  return contrastive_loss(image_emb, text_emb, scale, groups, text_groups)


def batch_clip_loss(encoder: DualEncoder, params: nnx.State, images: jax.Array, input_ids: jax.Array,
                    attention_mask: jax.Array, image_ids: jax.Array | None = None, one_to_one: bool = False
                    ) -> tuple[jax.Array, Metrics]:
  """`clip_loss` from raw inputs: encodes both modalities with `params`."""
  image_emb = encoder.image_embeddings(params, images)
  text_emb = encoder.text_embeddings(params, input_ids, attention_mask)
  return clip_loss(image_emb, text_emb, encoder.temperature(params), image_ids, one_to_one)


@dataclasses.dataclass(frozen=True)
class Contrastive(Objective):
  """Clean contrastive training / fine-tuning (CLIP's objective; several captions -> multi-positive)."""
  name = "contrastive"
  needs_negatives = True

  def loss(self, encoder, params, batch, key, reference=None):
    del key, reference
    loss, metrics = batch_clip_loss(encoder, params, batch["images"], batch["input_ids"],
                                    batch["attention_mask"], batch.get("image_ids"))
    metrics["temperature"] = encoder.temperature(params)
    return loss, metrics
