"""The causal text tower continues cached texts: encoding only the tokens after a shared beginning gives
the features of the whole text (what the text attack relies on to score changed captions)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mat_jax.models import CLIP, clip_config, split

CONTEXT, VOCAB, START, END, PAD = 12, 40, 2, 3, 0


def _encoder(pooling: str, end: int):
  cfg = clip_config("tiny")
  small = dict(layers=2, width=32, heads=2, mlp_dim=64)
  cfg = cfg.replace(
      text=dataclasses.replace(cfg.text, vocab_size=VOCAB, context_length=CONTEXT, eos_token_id=end,
                               bos_token_id=START, pad_token_id=PAD, pooling=pooling, **small),
      vision=dataclasses.replace(cfg.vision, image_size=16, patch_size=8, **small), projection_dim=16)
  return split(CLIP(cfg, rngs=nnx.Rngs(0)))


def _text(content: np.ndarray, end: int) -> tuple[np.ndarray, np.ndarray]:
  content = content[:CONTEXT - 2]
  ids = np.full(CONTEXT, PAD, np.int32)
  ids[:len(content) + 2] = [START, *content, end]
  return ids, (np.arange(CONTEXT) < len(content) + 2).astype(np.int32)


# "argmax" pools at the largest id: the end token is the largest, as in OpenAI's vocabulary.
@pytest.mark.parametrize("pooling,end", [("eos", END), ("argmax", VOCAB - 1)])
def test_continuing_a_cached_text_equals_encoding_the_whole_text(pooling, end):
  encoder, params = _encoder(pooling, end)
  rng = np.random.default_rng(0)
  def words(n):
    return rng.integers(4, END + 30, n)  # ordinary tokens, below the end id in both cases
  base, changed, starts = [], [], []
  for i in range(16):
    content = words(rng.integers(1, CONTEXT))       # some texts fill the context, one token is the least
    base.append(_text(content, end))
    shared = rng.integers(0, len(content) + 1)      # tokens kept after the start token; all of them too
    # The changed text keeps a beginning and goes on with other tokens, shorter or longer than the base.
    changed.append(_text(np.concatenate([content[:shared], words(rng.integers(0, 8))]), end))
    starts.append(0 if i == 0 else 1 + shared)      # 0: nothing shared
  base_ids, base_mask = map(np.stack, zip(*base, strict=True))
  ids, mask = map(np.stack, zip(*changed, strict=True))
  starts = np.minimum(starts, mask.sum(-1) - 1)     # at most the pooled (last) token
  rest = CONTEXT  # enough for every continuation; positions after the end token are padding
  following = np.take_along_axis(np.pad(ids, ((0, 0), (0, rest))), starts[:, None] + np.arange(rest), axis=1)

  with jax.default_matmul_precision("highest"):
    whole = jax.jit(encoder.text_features)(params, ids, mask)
    base_features, cache = jax.jit(encoder.text_features_and_cache)(params, base_ids, base_mask)
    continued = jax.jit(encoder.text_features_continued)(params, cache, jnp.asarray(starts), following)
    # A continuation only as long as its own tokens (the attack pads to length buckets).
    short = int((mask.sum(-1) - starts).max())
    continued_short = jax.jit(encoder.text_features_continued)(params, cache, jnp.asarray(starts),
                                                               following[:, :short])
    base_whole = jax.jit(encoder.text_features)(params, base_ids, base_mask)
  np.testing.assert_array_equal(base_features, base_whole)  # the cache costs the features nothing
  assert len(cache) == 2 and cache[0][0].shape == (16, 2, 16, CONTEXT)
  np.testing.assert_allclose(continued, whole, rtol=0, atol=1e-5)
  np.testing.assert_allclose(continued_short, whole, rtol=0, atol=1e-5)
  # The comparison is not vacuous: the changed texts' features differ from their bases'.
  assert np.median(np.abs(np.asarray(whole) - np.asarray(base_whole)).max(-1)) > 1e-2


def test_continuing_with_mismatched_rows_says_how_to_fix_it():
  encoder, params = _encoder("eos", END)
  ids, mask = map(np.stack, zip(*[_text(np.array([5, 6, 7]), END)] * 3, strict=True))
  _, cache = encoder.text_features_and_cache(params, ids, mask)
  with pytest.raises(ValueError, match=r"cache of 3 texts; index the cache's rows"):
    encoder.text_features_continued(params, cache, jnp.array([1, 1]), ids[:2, 1:])
  with pytest.raises(ValueError, match=r"start \(B,\)"):
    encoder.text_features_continued(params, cache, jnp.array(1), ids[:, 1:])
