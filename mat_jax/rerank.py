"""Retrieval the way BLIP and ALBEF (and SGA, attacking them) evaluate it: ITC ranks all, ITM re-ranks the top-k.

For every image the k texts with the highest ITC similarity, and for every text the k most similar images,
are scored by the image-text matching head (text cross-attending to the image's tokens); each pair's
score is its ITM "match" logit plus its ITC similarity (BLIP's evaluation adds the two; ALBEF's uses
the ITM logit alone: `add_similarity=False`). Candidates outside the top-k rank below every re-ranked
one, so R@K is exact for K <= k, and among themselves in their ITC order (the references give them all
one score, which leaves their order, and R@K for K > k, to their indices). The references (BLIP, ALBEF,
SGA, Co-Attack) use k = 128 on Flickr30k and 256 on COCO; the default here is 128.

The pairs of both directions are scored once each (a pair in both top-k lists is not scored twice), in
fixed-size chunks, by one compiled function that gathers each pair's image tokens on the device. The
image tokens of all images are computed once and kept on the device: (N, 1 + patches, width) in the
compute dtype, 1.8 GB in float32 (0.9 GB in bfloat16) for Flickr30k's 1,000 test images at BLIP-B/384.
`evaluate` keeps the clean images' tokens for the whole evaluation and, for an image attack, one more such
array for the attacked images' (twice that).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mat_jax import checks, metrics, precompile
from mat_jax.models.blip import BlipConfig
from mat_jax.models.dual_encoder import DualEncoder

DEFAULT_K = 128


def supports_itm(encoder: DualEncoder) -> bool:
  """Whether the encoder's model has an image-text matching head (BLIP)."""
  return isinstance(encoder.config, BlipConfig)


@precompile.jit(static_argnums=0)
def _image_tokens(encoder: DualEncoder, params: nnx.State, images: jax.Array) -> jax.Array:
  return encoder.merge(params).image_tokens(images)


@precompile.jit(static_argnums=0)
def _pair_scores(encoder: DualEncoder, params: nnx.State, tokens: jax.Array, input_ids: jax.Array,
                 attention_mask: jax.Array, image_index: jax.Array, text_index: jax.Array) -> jax.Array:
  """ITM match logits (P,) of pairs (image_index[p], text_index[p]); tokens (N, T, W) of every image."""
  logits = encoder.merge(params).itm_logits_from_tokens(tokens[image_index], input_ids[text_index],
                                                        attention_mask[text_index])
  return logits[:, 1]


def batch_image_tokens(encoder: DualEncoder, params: nnx.State, images: jax.Array) -> jax.Array:
  """Post-LN image tokens of one batch already on the device (an attack's output): no host checks, no
  copy to the host."""
  return _image_tokens(encoder, params, images)


@precompile.jit(donate_argnums=0)
def put_tokens(tokens: jax.Array, images: jax.Array, batch_tokens: jax.Array) -> jax.Array:
  """`tokens` (N, T, W) with rows `images` replaced by `batch_tokens`, in place: `tokens` is donated (do
  not use it after the call)."""
  return tokens.at[images].set(batch_tokens)


def image_tokens(encoder: DualEncoder, params: nnx.State, images, batch_size: int = 64) -> jax.Array:
  """Post-LN image tokens (N, 1 + patches, width) of float32 images in [0, 1], in fixed-size batches."""
  checks.check_images(images, encoder.config.vision.image_size)  # the model's own check sees traced arrays only
  images = np.asarray(images, np.float32)
  batches = metrics.fixed_size_batches(len(images), max(1, min(batch_size, len(images))))
  # Only the last batch is filled up: one cut of the whole, not a device slice per batch.
  return jnp.concatenate([_image_tokens(encoder, params, jnp.asarray(images[idx])) for idx, _ in batches])[
      :len(images)]


def itm_scores(encoder: DualEncoder, params: nnx.State, tokens: jax.Array, input_ids, attention_mask,
               image_index, text_index, chunk: int = 128) -> np.ndarray:
  """ITM match logits (P,) of the pairs (image_index[p], text_index[p]), `chunk` pairs per call."""
  image_index, text_index = np.asarray(image_index, np.int32), np.asarray(text_index, np.int32)
  if len(image_index) == 0:
    return np.zeros(0, np.float32)
  ids, mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
  out = [_pair_scores(encoder, params, tokens, ids, mask, jnp.asarray(image_index[pairs]),
                      jnp.asarray(text_index[pairs]))
         for pairs, _ in metrics.fixed_size_batches(len(image_index), chunk)]
  return np.asarray(jnp.concatenate(out))[:len(image_index)]


def itm_rerank(encoder: DualEncoder, params: nnx.State, images, input_ids, attention_mask, similarity, *,
               k: int = DEFAULT_K, add_similarity: bool = True, chunk: int = 128,
               tokens: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Re-ranked score matrices (image -> text, text -> image), both (N images, T texts).

  images: (N, H, W, 3) float32 in [0, 1] (ignored when their `tokens` are given); input_ids,
  attention_mask: (T, L) the texts; similarity: (N, T) ITC similarities that choose the top-k.
  Row i of the first matrix ranks texts for image i (TR); column t of the second ranks images for text t
  (IR). Feed them to `reranked_ranks`.
  """
  if not supports_itm(encoder):
    raise ValueError(f"ITM re-ranking needs a model with an image-text matching head (BLIP); got a "
                     f"{type(encoder.config).__name__} model: leave itm_k unset for dual encoders such as CLIP")
  if k < 1:
    raise ValueError(f"k must be >= 1 (candidates re-ranked per query), got {k}")
  sim = np.asarray(similarity, np.float32)
  n, t = sim.shape
  n_images = len(images) if tokens is None else tokens.shape[0]
  if np.shape(input_ids)[0] != t or n_images != n:
    raise ValueError(f"similarity is {sim.shape} (images, texts) but there are {n_images} images"
                     f"{'' if tokens is None else ' (tokens)'} and {np.shape(input_ids)[0]} texts")
  k_text, k_image = min(k, t), min(k, n)
  # Stable sorts: equal similarities keep index order, as metrics' ranks break ties.
  top_text = np.argsort(-sim, axis=1, kind="stable")[:, :k_text]             # (N, k): texts per image
  top_image = np.argsort(-sim.T, axis=1, kind="stable")[:, :k_image]         # (T, k): images per text
  pairs = np.concatenate([
      np.stack([np.repeat(np.arange(n), k_text), top_text.ravel()], axis=1),
      np.stack([top_image.ravel(), np.repeat(np.arange(t), k_image)], axis=1)])
  unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
  if tokens is None:
    tokens = image_tokens(encoder, params, images)
  scores = itm_scores(encoder, params, tokens, input_ids, attention_mask, unique[:, 0], unique[:, 1], chunk)
  if add_similarity:
    scores = scores + sim[unique[:, 0], unique[:, 1]]
  scores = scores[inverse.reshape(-1)]
  # Outside the top-k: below every re-ranked score, in ITC order (finite, as the rank computation requires).
  # One score for all of them would leave their order to indices: R@5 and R@10 then followed the captions'
  # order whenever k < 10. They hold their ITC rank in whole steps below the lowest re-ranked score, not
  # the similarity shifted there: similarities closer than float32's spacing at that magnitude (5e-7 near
  # -7) would become ties.
  base = float(scores.min()) - 1.0
  i2t = (base - _descending_ranks(sim)).astype(np.float32)
  t2i = (base - _descending_ranks(sim.T).T).astype(np.float32)
  split = n * k_text
  i2t[pairs[:split, 0], pairs[:split, 1]] = scores[:split]
  t2i[pairs[split:, 0], pairs[split:, 1]] = scores[split:]
  return i2t, t2i


def _descending_ranks(x: np.ndarray) -> np.ndarray:
  """Each entry's place in its row sorted by decreasing value (0 = the largest); equal values share the
  place of the first of them, so the rank computation breaks their tie as it breaks any other."""
  order = np.argsort(-x, axis=1, kind="stable")
  ordered = np.take_along_axis(x, order, axis=1)
  starts = np.ones(ordered.shape, bool)
  starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
  place = np.maximum.accumulate(np.where(starts, np.arange(x.shape[1]), 0), axis=1)
  ranks = np.empty(x.shape, np.int64)
  np.put_along_axis(ranks, order, place, axis=1)
  return ranks


def reranked_ranks(i2t: np.ndarray, t2i: np.ndarray, text_to_image) -> tuple[np.ndarray, np.ndarray]:
  """(TR ranks from the image -> text scores, IR ranks from the text -> image scores), as
  `metrics.retrieval_ranks` returns them."""
  return metrics.retrieval_ranks(i2t, text_to_image)[0], metrics.retrieval_ranks(t2i, text_to_image)[1]
