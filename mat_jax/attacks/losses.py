"""Losses that image attacks maximise, as factories over an explicit `(encoder, params)`.

Every factory returns a `LossFn`: `loss_fn(images, key) -> (B,)` per-example losses, higher = better for
the attacker. Per-example (not summed) so that attacks can keep the best iterate of each image and
APGD can adapt one step size per image; an image's loss must depend on that image only (all factories
here hold the texts / references fixed). `key` feeds losses with randomness (SGA's noisy rescaling);
deterministic losses ignore it.

The factories close over traced arrays, so they are built inside the jitted function that runs the
attack (the training step or an evaluation batch), never cached across calls.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax.attacks.spec import CO_ALPHA
from mat_jax.models.clip import feature_products, l2_normalize
from mat_jax.models.dual_encoder import DualEncoder

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
LogitsFn = Callable[[jax.Array], jax.Array]

# SGA's set of image scales (Lu et al. 2023): each step sees the image at these sizes as well.
SGA_SCALES = (0.5, 0.75, 1.25, 1.5)


def _kl(p_log: jax.Array, q_log: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis from log-probabilities (torch's KLDivLoss(q_log, p) summed)."""
  return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)


def _weights(text_embeddings: jax.Array, text_weights: jax.Array | None) -> jax.Array:
  """(B, K) caption weights: 1 for real captions, 0 for padding slots."""
  if text_weights is None:
    return jnp.ones(text_embeddings.shape[:2], jnp.float32)
  return text_weights.astype(jnp.float32)


def _per_image_texts(text_embeddings: jax.Array) -> jax.Array:
  """Accept one caption per image (B, D) or K captions per image (B, K, D); return (B, K, D)."""
  if text_embeddings.ndim == 2:
    return text_embeddings[:, None, :]
  if text_embeddings.ndim != 3:
    raise ValueError(f"text features must be (B, D) or (B, K, D), got shape {text_embeddings.shape}")
  return text_embeddings


# ----------------------------------------------------------------------------------------------------
# Embedding-space losses
# ----------------------------------------------------------------------------------------------------

def paired_cosine(encoder: DualEncoder, params, text_features: jax.Array,
                  text_weights: jax.Array | None = None) -> LossFn:
  """SGA's image loss: -sum_k cos(f_I(x'), f_T(t_k)) over the image's captions.

  text_features: (B, D) or (B, K, D) unnormalised text features of each image's caption(s);
  text_weights: optional (B, K) 0/1 mask of real captions (images with fewer than K captions).
  """
  texts = l2_normalize(_per_image_texts(text_features))
  weights = _weights(texts, text_weights)

  def loss_fn(images: jax.Array, key: jax.Array) -> jax.Array:
    del key
    img = encoder.image_embeddings(params, images)
    cos = feature_products("bd,bkd->bk", img, texts)
    return -jnp.sum(cos * weights, axis=-1)

  return loss_fn


def _log_softmax_unit(features: jax.Array) -> jax.Array:
  """log s(n(f)): Co-Attack's softmax over L2-normalised embeddings (its CLIP wrapper's
  `inference_image` / `inference_text` return normalised features, so every KL it takes for CLIP is over
  unit vectors)."""
  return jax.nn.log_softmax(l2_normalize(features), axis=-1)


def image_kl(encoder: DualEncoder, params, clean_image_features: jax.Array) -> LossFn:
  """Co-Attack's image-only loss: KL(s(n(e_I(x))) || s(n(e_I(x')))), s = softmax, n = L2 normalisation.

  This is the reference's unimodal image attack (`run_trades`), the image half of Sep-Attack there.
  """
  clean_log = _log_softmax_unit(clean_image_features)

  def loss_fn(images: jax.Array, key: jax.Array) -> jax.Array:
    del key
    return _kl(clean_log, _log_softmax_unit(encoder.image_features(params, images)))

  return loss_fn


def co_attack(encoder: DualEncoder, params, clean_image_features: jax.Array,
              adv_text_features: jax.Array, *, alpha: float = CO_ALPHA,
              text_weights: jax.Array | None = None) -> LossFn:
  """Co-Attack's image loss for dual encoders (embeddings before fusion):

      KL(s(n(e_I(x))) || s(n(e_I(x')))) + alpha * KL(s(n(e_T(t'))) || s(n(e_I(x'))))

  s = softmax over features, n = L2 normalisation, t' the adversarial caption(s). The reference writes
  the first term without n, but for CLIP its embeddings are normalised already (see `_log_softmax_unit`):
  on raw features, whose norms are ~10-20, the softmax is far sharper and outweighs the text term. With K captions per
  image the text term is averaged over the real captions. (The reference attacks each image-caption
  pair separately and keeps, per image, the adversarial image of its last pair; one image attacked
  against all of its captions is the consistent set-level version.)
  """
  clean_log = _log_softmax_unit(clean_image_features)
  texts = _per_image_texts(adv_text_features)
  text_log = _log_softmax_unit(texts)
  weights = _weights(texts, text_weights)
  weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)

  def loss_fn(images: jax.Array, key: jax.Array) -> jax.Array:
    del key
    adv_log = _log_softmax_unit(encoder.image_features(params, images))
    image_term = _kl(clean_log, adv_log)
    text_term = jnp.sum(_kl(text_log, adv_log[:, None, :]) * weights, axis=-1)
    return image_term + alpha * text_term

  return loss_fn


def feature_distance(encoder: DualEncoder, params, reference_features: jax.Array) -> LossFn:
  """FARE: ||f(x') - f_ref||^2 on unnormalised image features (f_ref from the frozen original model)."""

  def loss_fn(images: jax.Array, key: jax.Array) -> jax.Array:
    del key
    diff = encoder.image_features(params, images) - reference_features
    return jnp.sum(jnp.square(diff), axis=-1)

  return loss_fn


# ----------------------------------------------------------------------------------------------------
# Logit losses (retrieval as classification over a set of texts)
# ----------------------------------------------------------------------------------------------------

def retrieval_logits(encoder: DualEncoder, params, text_features: jax.Array,
                     logit_scale: jax.Array | float | None = None) -> LogitsFn:
  """images -> (B, M) scaled cosine logits against M fixed texts (the batch's, or a whole eval set's).

  logit_scale: the multiplier (not its log); default the model's, clamped as the contrastive loss uses it
  (`DualEncoder.temperature`).
  """
  texts = l2_normalize(text_features)
  scale = encoder.temperature(params) if logit_scale is None else jnp.asarray(logit_scale)

  def logits_fn(images: jax.Array) -> jax.Array:
    return scale * feature_products("bd,md->bm", encoder.image_embeddings(params, images), texts)

  return logits_fn


def identity_positives(batch: int) -> jax.Array:
  """Positives of the usual contrastive batch: image i goes with text i."""
  return jnp.eye(batch, dtype=bool)


def multi_positive_ce(logits: jax.Array, positives: jax.Array) -> jax.Array:
  """Cross-entropy of the positive set: logsumexp(all) - logsumexp(positives), per row.

  With one positive per row this is the ordinary cross-entropy (TeCoA's loss, APGD-CE); with an
  image's K captions as positives the image's other captions are never treated as negatives.
  """
  neg_inf = jnp.finfo(logits.dtype).min
  return (jax.nn.logsumexp(logits, axis=-1)
          - jax.nn.logsumexp(jnp.where(positives, logits, neg_inf), axis=-1))


def _positive_and_negative_max(logits: jax.Array, positives: jax.Array) -> tuple[jax.Array, jax.Array]:
  neg_inf = jnp.finfo(logits.dtype).min
  return (jnp.max(jnp.where(positives, logits, neg_inf), axis=-1),
          jnp.max(jnp.where(positives, neg_inf, logits), axis=-1))


def margin(logits: jax.Array, positives: jax.Array) -> jax.Array:
  """Best negative minus best positive logit: > 0 when the top-1 retrieved text is wrong."""
  pos, neg = _positive_and_negative_max(logits, positives)
  return neg - pos


def dlr(logits: jax.Array, positives: jax.Array) -> jax.Array:
  """Croce & Hein's difference-of-logits-ratio loss, with the best positive as the true class:
  -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), invariant to shifts and scales of the logits."""
  _check_classes(logits, 3)
  top = jax.lax.top_k(logits, 3)[0]
  return margin(logits, positives) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr(logits: jax.Array, positives: jax.Array, targets: jax.Array) -> jax.Array:
  """Targeted DLR (APGD-T): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), targets (B,) text indices."""
  _check_classes(logits, 4)
  top = jax.lax.top_k(logits, 4)[0]
  pos, _ = _positive_and_negative_max(logits, positives)
  target = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return (target - pos) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _check_classes(logits: jax.Array, need: int) -> None:
  if logits.shape[-1] < need:
    raise ValueError(f"this loss ranks at least {need} texts, got logits over {logits.shape[-1]}; "
                     "score each image against more texts (a bigger batch or the whole eval set)")


def logit_loss(logits_fn: LogitsFn, positives: jax.Array,
               loss: Callable[[jax.Array, jax.Array], jax.Array] = multi_positive_ce) -> LossFn:
  """Turn logits + a classification loss into a `LossFn` (e.g. TeCoA's PGD on the contrastive CE)."""

  def loss_fn(images: jax.Array, key: jax.Array) -> jax.Array:
    del key
    return loss(logits_fn(images), positives)

  return loss_fn


def positives(image_ids: jax.Array | None, batch: int, k: int) -> jax.Array:
  """(B, B·K) bool: image b's positives among the flattened texts (its K captions, and those of any
  image sharing its id)."""
  groups = jnp.arange(batch) if image_ids is None else image_ids
  return groups[:, None] == jnp.repeat(groups, k)[None, :]


def contrastive(encoder: DualEncoder, params, text_features: jax.Array,
                positives: jax.Array | None = None, logit_scale=None,
                text_weights: jax.Array | None = None) -> LossFn:
  """TeCoA's attack loss: cross-entropy of the image->text logits against the batch's texts.

  text_features (M, D); positives (B, M) bool, default the identity (image i with text i).
  text_weights: optional (M,) 0/1 mask of real texts; the others (padding slots) are left out of the
  loss, as positives and as negatives.
  """
  if positives is None:
    positives = identity_positives(text_features.shape[0])
  logits_fn = retrieval_logits(encoder, params, text_features, logit_scale)
  return logit_loss(*without_padding(logits_fn, positives, text_weights))


def without_padding(logits_fn: LogitsFn, positives: jax.Array,
                    text_weights: jax.Array | None) -> tuple[LogitsFn, jax.Array]:
  """Leave padding texts (text_weights 0; (M,) or (B, K) flattening to M) out of a logit loss: never a
  positive, and a logit no softmax, margin or top-k can pick. None: every text is real."""
  if text_weights is None:
    return logits_fn, positives
  real = text_weights.reshape(-1) > 0

  def real_logits(images: jax.Array) -> jax.Array:
    logits = logits_fn(images)
    return jnp.where(real[None, :], logits, jnp.finfo(logits.dtype).min)

  return real_logits, positives & real[None, :]


def mava_terms(encoder: DualEncoder, params, images: jax.Array, key: jax.Array, clean_reference: jax.Array,
               captions: jax.Array, *, neighbours: int, radius,
               caption_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """MAVA's (CMS, VSSE) per image at `images`, over `neighbours` noisy neighbours images + U(-radius,
  radius) (radius = beta * eps) drawn with `key` (`mat_jax.objectives.mava` gives the equations).

  clean_reference (B, D): the reference model's clean image features; captions (B, K, D) L2-normalised
  caption features; caption_weights (B, K): 0 for padding caption slots (default: all real).
  """
  noise = jax.random.uniform(key, (neighbours,) + images.shape, minval=-radius, maxval=radius)
  views = jnp.clip(images[None] + noise, 0.0, 1.0)
  feats = encoder.image_features(params, views.reshape((-1,) + images.shape[1:]))
  feats = feats.reshape(neighbours, images.shape[0], -1)                        # (N, B, D)
  vsse = jnp.mean(jnp.sum(jnp.square(feats - clean_reference[None]), axis=-1), axis=0)
  mean_feat = l2_normalize(jnp.mean(feats, axis=0))                             # (B, D)
  cos = feature_products("bd,bkd->bk", mean_feat, captions)
  if caption_weights is None:
    cms = 1.0 - jnp.mean(cos, axis=-1)
  else:
    w = caption_weights.astype(jnp.float32)
    cms = 1.0 - jnp.sum(cos * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)
  return cms, vsse


def mava(encoder: DualEncoder, params, clean_reference: jax.Array, captions: jax.Array, *, neighbours: int,
         radius, caption_weights: jax.Array | None = None) -> LossFn:
  """MAVA's inner loss CMS + VSSE (`mava_terms`); the loss's key draws the neighbours of each step."""

  def loss_fn(images: jax.Array, key: jax.Array) -> jax.Array:
    cms, vsse = mava_terms(encoder, params, images, key, clean_reference, captions, neighbours=neighbours,
                           radius=radius, caption_weights=caption_weights)
    return cms + vsse

  return loss_fn


# ----------------------------------------------------------------------------------------------------
# SGA's scale-invariant views
# ----------------------------------------------------------------------------------------------------

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution kernel at distances t (|t| < 2); a = -0.75 as PyTorch's bicubic."""
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of PyTorch's bicubic interpolation (align_corners=False, no
  antialiasing, border pixels replicated) -- torchvision's tensor `Resize(BICUBIC)` of the SGA code."""
  scale = in_size / out_size
  src = (np.arange(out_size) + 0.5) * scale - 0.5
  base = np.floor(src).astype(np.int64)
  frac = src - base
  m = np.zeros((out_size, in_size), np.float64)
  for tap in range(-1, 3):
    idx = np.clip(base + tap, 0, in_size - 1)
    np.add.at(m, (np.arange(out_size), idx), _cubic_weights(frac - tap))
  return m.astype(np.float32)


def resize_bicubic(images: jax.Array, height: int, width: int) -> jax.Array:
  """Bicubic resize of NHWC images as two small matmuls (linear, so gradients flow through it)."""
  rows = jnp.asarray(bicubic_matrix(images.shape[1], height))
  cols = jnp.asarray(bicubic_matrix(images.shape[2], width))
  return jnp.einsum("oh,bhwc,pw->bopc", rows, images, cols)


def scaled_views(images: jax.Array, key: jax.Array, scales: Sequence[float] = SGA_SCALES,
                 noise_std: float = 0.05) -> list[jax.Array]:
  """[x] + [resize_back(clip(resize_s(x + N(0, noise_std^2))))] for each scale s.

  As the SGA code does it: the noise is drawn at the original size, then the image is resized to
  int(s*H) x int(s*W) (bicubic), clipped to [0, 1] and resized back (bicubic). Differentiable end to
  end: the resizes are fixed linear maps (`resize_bicubic`), the clip passes gradients inside [0, 1].
  """
  _, h, w, _ = images.shape
  # One draw for all scales: a single random-number kernel (they are slow to compile on CPU).
  noise = noise_std * jax.random.normal(key, (len(scales),) + images.shape, images.dtype)
  views = [images]
  for s, n in zip(scales, noise, strict=True):
    small = resize_bicubic(images + n, int(s * h), int(s * w))
    views.append(resize_bicubic(jnp.clip(small, 0.0, 1.0), h, w))
  return views


def multi_scale(loss_fn: LossFn, scales: Sequence[float] = SGA_SCALES, noise_std: float = 0.05) -> LossFn:
  """SGA's scale-augmented loss: the sum of `loss_fn` over the image and its rescaled noisy views.

  The views are stacked and the loss is vmapped over them, so the encoder runs once on a
  (1 + len(scales)) x B batch rather than once per view.
  """

  def wrapped(images: jax.Array, key: jax.Array) -> jax.Array:
    view_key, loss_key = jax.random.split(key)
    views = jnp.stack(scaled_views(images, view_key, scales, noise_std))
    return jnp.sum(jax.vmap(lambda v: loss_fn(v, loss_key))(views), axis=0)

  return wrapped
