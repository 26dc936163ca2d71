"""Image-text retrieval metrics and the two attack-success definitions of the literature.

Scores are an (n_images, n_texts) similarity matrix; `text_to_image` (n_texts,) gives each text's
image. Text retrieval (TR, image -> text): the rank of an image is the best rank among its texts.
Image retrieval (IR, text -> image): the rank of a text is the rank of its image. R@K is the
percentage of queries with rank < K. Ties are broken by index (a stable descending sort: of two equal
scores the lower index ranks first), so results are deterministic.

Attack success, labelled as the papers use them:
- `recall_drop` (Co-Attack): clean recall minus adversarial recall, in percentage points;
- `attack_success_rate` (SGA): of the queries retrieved correctly within rank K before the attack, the
  percentage no longer retrieved correctly within rank K after it (K = 1, 5, 10, as SGA's evaluation).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax import checks, precompile
from mat_jax.errors import InputError
from mat_jax.models.dual_encoder import DualEncoder

RECALL_KS = (1, 5, 10)
RECALL_KEYS = tuple(f"{d}@{k}" for d in ("tr", "ir") for k in RECALL_KS)


def _check_scores(scores, text_to_image) -> tuple[np.ndarray, np.ndarray]:
  # Host arrays, which the jitted ranking takes as they are: a conversion into a device array would run (and
  # compile, once per shape) a program of its own.
  scores = np.asarray(scores, np.float32)
  mapping = np.asarray(text_to_image)
  if not np.issubdtype(mapping.dtype, np.integer) and mapping.size:
    # Cast to int, 1.9 would silently be image 1.
    raise InputError(f"text_to_image must hold integer image indices, got dtype {mapping.dtype}")
  if scores.ndim != 2:
    raise InputError(f"scores must be a (n_images, n_texts) matrix, got shape {scores.shape}")
  if mapping.shape != (scores.shape[1],):
    raise InputError(f"text_to_image must have one entry per text (scores column), shape "
                     f"({scores.shape[1]},); got {mapping.shape}. Pass scores as images x texts.")
  # Checked on the host: an index out of range would be clamped by JAX, and a NaN score would rank
  # first (no score is greater than NaN), reporting a broken model as a perfectly robust one.
  if mapping.size and (mapping.min() < 0 or mapping.max() >= scores.shape[0]):
    raise InputError(f"text_to_image holds image indices from {mapping.min()} to {mapping.max()}, but scores has "
                     f"{scores.shape[0]} images (rows); each entry must be in [0, {scores.shape[0]})")
  # An image without a caption could never be retrieved: it would count as a failed text-retrieval query (a
  # perfect score matrix scoring TR@1 below 100), where `evaluate` refuses the same set.
  checks.check_text_to_image(mapping, scores.shape[0], scores.shape[1])
  finite = np.isfinite(scores)
  if not finite.all():
    rows, cols = np.flatnonzero(~finite.all(axis=1)), np.flatnonzero(~finite.all(axis=0))
    raise InputError(f"scores hold NaN/inf in {len(rows)} image rows (e.g. {rows[:5].tolist()}) and {len(cols)} text "
                     f"columns (e.g. {cols[:5].tolist()}): the features are not finite. Usual causes: token ids "
                     "outside the text model's vocabulary (a tokenizer that does not belong to the model), "
                     "non-finite pixels, or NaN weights")
  return scores, mapping.astype(np.int32)


@precompile.jit
def _ranks(scores: jax.Array, text_to_image: jax.Array) -> tuple[jax.Array, jax.Array]:
  n_img, n_txt = scores.shape
  text_ids = jnp.arange(n_txt)
  image_ids = jnp.arange(n_img)
  own = text_to_image[None, :] == image_ids[:, None]  # (n_img, n_txt): text j belongs to image i

  # TR: among an image's texts the best ranked is the highest score, lowest index on ties; its rank
  # is #(higher scores) + #(equal scores at lower indices).
  best = jnp.max(jnp.where(own, scores, -jnp.inf), axis=1)
  first_best = jnp.argmax(own & (scores == best[:, None]), axis=1)
  tr = (jnp.sum(scores > best[:, None], axis=1)
        + jnp.sum((scores == best[:, None]) & (text_ids[None, :] < first_best[:, None]), axis=1))
  # Images without any text can never be retrieved: a rank past every K (n_texts would be a hit at K >
  # n_texts, which a small gallery allows).
  tr = jnp.where(jnp.any(own, axis=1), tr, jnp.iinfo(tr.dtype).max)

  # IR: the rank of the text's own image in its column.
  gt = scores[text_to_image, text_ids]
  ir = (jnp.sum(scores > gt[None, :], axis=0)
        + jnp.sum((scores == gt[None, :]) & (image_ids[:, None] < text_to_image[None, :]), axis=0))
  return tr, ir


def retrieval_ranks(scores, text_to_image) -> tuple[np.ndarray, np.ndarray]:
  """(TR rank of each image (n_images,), IR rank of each text (n_texts,)), 0 = retrieved first."""
  tr, ir = _ranks(*_check_scores(scores, text_to_image))
  return np.asarray(tr), np.asarray(ir)


def recall_from_ranks(tr_ranks, ir_ranks, ks=RECALL_KS) -> dict[str, float]:
  """Percentages under `tr@K` and `ir@K` from the TR ranks (n_images,) and IR ranks (n_texts,) of
  `retrieval_ranks`."""
  tr_ranks = checks.check_ranks(tr_ranks, name="tr_ranks")
  ir_ranks = checks.check_ranks(ir_ranks, name="ir_ranks")
  out = {f"tr@{k}": 100.0 * float(np.mean(tr_ranks < k)) for k in ks}
  out.update({f"ir@{k}": 100.0 * float(np.mean(ir_ranks < k)) for k in ks})
  return out


def retrieval_recall(scores, text_to_image, ks=RECALL_KS) -> dict[str, float]:
  """Percentages under `tr@1 tr@5 tr@10 ir@1 ir@5 ir@10` from an (n_images, n_texts) score matrix."""
  return recall_from_ranks(*retrieval_ranks(scores, text_to_image), ks=ks)


def recall_drop(clean: Mapping[str, float], adversarial: Mapping[str, float]) -> dict[str, float]:
  """Co-Attack's attack success: clean recall minus adversarial recall (percentage points), per key."""
  return {k: float(clean[k]) - float(adversarial[k]) for k in clean if k in adversarial}


def attack_success_rate(clean_ranks: tuple, adversarial_ranks: tuple, ks=RECALL_KS) -> dict[str, float]:
  """SGA's ASR at rank K: |correct before \\ correct after| / |correct before|, in percent, a query being
  correct when its rank is < K.

  Arguments are `retrieval_ranks(...)` pairs (TR ranks, IR ranks) for the clean and attacked scores.
  Returns keys `tr@K`, `ir@K` for K in `ks`; NaN when nothing was correct before the attack.
  """
  for name, ranks in (("clean_ranks", clean_ranks), ("adversarial_ranks", adversarial_ranks)):
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
      raise InputError(f"{name} must be a (TR ranks, IR ranks) pair, as metrics.retrieval_ranks returns, got "
                       f"{type(ranks).__name__}")
  out = {}
  for direction, before, after in zip(("tr", "ir"), clean_ranks, adversarial_ranks, strict=True):
    before = checks.check_ranks(before, name=f"the clean {direction.upper()} ranks")
    # Of the same queries: a length-1 array would broadcast against every query.
    after = checks.check_ranks(after, name=f"the adversarial {direction.upper()} ranks", length=before.shape[0])
    for k in ks:
      correct = before < k
      fooled = correct & (after >= k)
      out[f"{direction}@{k}"] = 100.0 * float(fooled.sum()) / float(correct.sum()) if correct.any() else float("nan")
  return out


# ----------------------------------------------------------------------------------------------------
# Embeddings and the similarity matrix, in fixed-size batches
# ----------------------------------------------------------------------------------------------------

@precompile.jit(static_argnums=0)
def image_embeddings(encoder: DualEncoder, params, images):
  """Jitted `encoder.image_embeddings` (one compilation per encoder and batch shape)."""
  return encoder.image_embeddings(params, images)


@precompile.jit(static_argnums=0)
def text_embeddings(encoder: DualEncoder, params, ids, mask):
  """Jitted `encoder.text_embeddings` (one compilation per encoder and batch shape)."""
  return encoder.text_embeddings(params, ids, mask)


def fixed_size_batches(n: int, batch_size: int) -> list[tuple[np.ndarray, int]]:
  """(indices, real count) of each batch of `batch_size` over n items, the last one filled up with
  repeats of the last item: every call of a jitted function over them has one shape (one compilation), and
  the caller keeps the first `count` rows of each result."""
  return [(np.minimum(np.arange(start, start + batch_size), n - 1), min(batch_size, n - start))
          for start in range(0, n, batch_size)]


def _batched(fn, arrays: tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
  """Apply `fn` over the leading axis in fixed-size batches (`fixed_size_batches`)."""
  out = [np.asarray(fn(*(a[idx] for a in arrays)))[:count]
         for idx, count in fixed_size_batches(arrays[0].shape[0], batch_size)]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _batch_rows(n: int, batch_size: int) -> int:
  """The rows of each fixed-size batch over n items: batch_size, or n when fewer."""
  return min(checks.check_steps(batch_size, name="batch_size"), n)


def embed_images(encoder: DualEncoder, params, images, batch_size: int = 256) -> np.ndarray:
  """L2-normalised image embeddings (N, D), computed in fixed-size jitted batches."""
  config = getattr(encoder, "config", None)  # any encoder with image_embeddings works; CLIP's has a config
  checks.check_images(images, config.vision.image_size if config is not None else None)
  images = np.asarray(images)
  batch_size = _batch_rows(len(images), batch_size)
  return _batched(lambda x: image_embeddings(encoder, params, x), (images,), batch_size)


def embed_texts(encoder: DualEncoder, params, input_ids, attention_mask, batch_size: int = 1024) -> np.ndarray:
  """L2-normalised text embeddings (N, D), computed in fixed-size jitted batches."""
  config = getattr(encoder, "config", None)
  if config is not None:
    checks.check_token_ids(input_ids, attention_mask, config.text.positions, config.text.vocab_size)
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
  batch_size = _batch_rows(len(ids), batch_size)
  return _batched(lambda i, m: text_embeddings(encoder, params, i, m), (ids, mask), batch_size)


def retrieval_lowerings(encoder: DualEncoder, params, images, input_ids, attention_mask, *, image_batch: int = 256,
                        text_batch: int = 1024) -> list[jax.stages.Lowered]:
  """The lowerings of the programs that `embed_images(encoder, params, images, image_batch)`,
  `embed_texts(encoder, params, input_ids, attention_mask, text_batch)` and the `retrieval_ranks` of their
  similarities run, for `precompile.compile_all` to compile without running them, so that those calls find
  them compiled (e.g. on another thread while a model trains). The arguments may be
  `jax.ShapeDtypeStruct`s: params as the calls will get them (host arrays: no sharding), the arrays as
  whole sets (N, H, W, 3) and (T, L)."""
  def rows(array, batch_size):
    return jax.ShapeDtypeStruct((_batch_rows(array.shape[0], batch_size),) + tuple(array.shape[1:]), array.dtype)

  return [image_embeddings.lower(encoder, params, rows(images, image_batch)),
          text_embeddings.lower(encoder, params, rows(input_ids, text_batch), rows(attention_mask, text_batch)),
          # As `_check_scores` makes them: float32 scores, int32 indices.
          _ranks.lower(jax.ShapeDtypeStruct((images.shape[0], input_ids.shape[0]), jnp.float32),
                       jax.ShapeDtypeStruct((input_ids.shape[0],), jnp.int32))]


def similarity_matrix(encoder: DualEncoder, params, images, input_ids, attention_mask,
                      batch_size: int = 256) -> np.ndarray:
  """Cosine similarities (n_images, n_texts) of all images against all texts (CLIP's ITC scores)."""
  img = embed_images(encoder, params, images, batch_size)
  txt = embed_texts(encoder, params, input_ids, attention_mask, batch_size)
  return img @ txt.T
