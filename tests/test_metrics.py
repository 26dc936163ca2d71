"""Retrieval metrics against an independent brute-force implementation, and the success rates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mat_jax import metrics
from mat_jax.errors import InputError
from mat_jax.models import l2_normalize


def brute_force_recall(scores: np.ndarray, text_to_image: np.ndarray) -> dict[str, float]:
  """The definition, spelled out: sort every row/column (stable, descending) and look up positions."""
  n_img, n_txt = scores.shape
  tr = []
  for i in range(n_img):
    order = list(np.argsort(-scores[i], kind="stable"))
    own = [j for j in range(n_txt) if text_to_image[j] == i]
    tr.append(min(order.index(j) for j in own) if own else n_txt)
  ir = []
  for j in range(n_txt):
    order = list(np.argsort(-scores[:, j], kind="stable"))
    ir.append(order.index(text_to_image[j]))
  out = {}
  for k in (1, 5, 10):
    out[f"tr@{k}"] = 100.0 * sum(r < k for r in tr) / n_img
    out[f"ir@{k}"] = 100.0 * sum(r < k for r in ir) / n_txt
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force_with_several_captions_and_ties(seed):
  rng = np.random.default_rng(seed)
  n_img = 23
  # 1 to 6 captions per image, shuffled, as in COCO; integer scores force many exact ties.
  counts = rng.integers(1, 7, n_img)
  text_to_image = rng.permutation(np.repeat(np.arange(n_img), counts)).astype(np.int32)
  scores = rng.integers(0, 6, (n_img, len(text_to_image))).astype(np.float32)
  # Make the task non-trivial but not hopeless: boost the true pairs a little.
  scores[text_to_image, np.arange(len(text_to_image))] += rng.integers(0, 3, len(text_to_image))
  got = metrics.retrieval_recall(scores, text_to_image)
  want = brute_force_recall(scores, text_to_image)
  assert set(got) == set(metrics.RECALL_KEYS)
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-9), k
  assert 0.0 < got["tr@1"] < 100.0 and 0.0 < got["ir@1"] < 100.0


def test_ties_are_broken_by_index():
  scores = np.zeros((2, 4), np.float32)  # everything tied
  text_to_image = np.array([1, 0, 0, 1], np.int32)
  tr, ir = metrics.retrieval_ranks(scores, text_to_image)
  # Image 0's first text is index 1 (rank 1); image 1's first text is index 0 (rank 0).
  assert tr.tolist() == [1, 0]
  # Each text's image ranks by index: image 0 first, image 1 second.
  assert ir.tolist() == [1, 0, 0, 1]


def test_image_without_texts_is_refused():
  # Counted, it would be a text-retrieval query that fails at every K (TR@1 66.7 on these perfect scores);
  # `evaluate` refuses the same set, and the ranks refuse it too.
  scores = np.eye(3, dtype=np.float32)[:, :2]
  with pytest.raises(ValueError, match="image 2 has no caption"):
    metrics.retrieval_ranks(scores, np.array([0, 1], np.int32))


def test_bad_shapes_are_explained():
  with pytest.raises(ValueError, match="one entry per text"):
    metrics.retrieval_recall(np.zeros((3, 4)), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="matrix"):
    metrics.retrieval_recall(np.zeros(4), np.zeros(4, np.int32))


def test_out_of_range_images_and_non_finite_scores_are_refused():
  text_to_image = np.array([0, 0, 1, 1, 2, 2], np.int32)
  scores = (text_to_image[None, :] == np.arange(3)[:, None]).astype(np.float32)
  with pytest.raises(ValueError, match=r"from 0 to 7, but scores has 3 images"):
    metrics.retrieval_recall(scores, np.array([0, 0, 1, 1, 2, 7], np.int32))
  with pytest.raises(ValueError, match="in \\[0, 3\\)"):
    metrics.retrieval_recall(scores, np.array([-1, 0, 1, 1, 2, 2], np.int32))
  # Floats would be truncated: 1.9 read as image 1.
  with pytest.raises(ValueError, match="integer image indices, got dtype float64"):
    metrics.retrieval_recall(scores, np.array([0, 0.7, 1, 1.9, 2, 2]))
  # A NaN column (a text whose features are NaN) would otherwise rank first everywhere.
  broken = scores.copy()
  broken[:, 4] = np.nan
  with pytest.raises(ValueError, match=r"NaN/inf in 3 image rows .* and 1 text columns \(e\.g\. \[4\]\)"):
    metrics.retrieval_recall(broken, text_to_image)
  assert metrics.retrieval_recall(scores, text_to_image)["tr@1"] == 100.0


def test_success_rates():
  text_to_image = np.array([0, 1, 2, 3], np.int32)
  clean = np.eye(4, dtype=np.float32) + 0.01 * np.arange(4)[None, :]
  clean[3, 3] = 0.0  # image 3 / text 3 already wrong before the attack
  adv = clean.copy()
  adv[0, 0] = -1.0   # pair 0 broken in both directions
  clean_ranks = metrics.retrieval_ranks(clean, text_to_image)
  adv_ranks = metrics.retrieval_ranks(adv, text_to_image)
  asr = metrics.attack_success_rate(clean_ranks, adv_ranks)
  # 3 queries correct before in each direction, one of them broken -> 33.3 %.
  assert {k: asr[k] for k in ("tr@1", "ir@1")} == pytest.approx({"tr@1": 100 / 3, "ir@1": 100 / 3})
  # Within rank 5 pair 0 is still found in both directions (one score of 4 dropped): nothing fooled.
  assert asr["tr@5"] == asr["ir@5"] == asr["tr@10"] == asr["ir@10"] == 0.0
  # A query pushed to rank exactly K is no longer correct within K: image 1's caption falls to rank 1, just
  # below text 3's 0.03, a TR@1 success (1 of 3); its IR column is untouched.
  nudged = clean.copy()
  nudged[1, 1] = 0.025
  nudged_ranks = metrics.retrieval_ranks(nudged, text_to_image)
  assert nudged_ranks[0][1] == 1
  nudged_asr = metrics.attack_success_rate(clean_ranks, nudged_ranks)
  assert nudged_asr["tr@1"] == pytest.approx(100 / 3) and nudged_asr["ir@1"] == nudged_asr["tr@5"] == 0.0
  clean_r = metrics.recall_from_ranks(*clean_ranks)
  adv_r = metrics.recall_from_ranks(*adv_ranks)
  drop = metrics.recall_drop(clean_r, adv_r)
  assert drop["tr@1"] == pytest.approx(25.0) and drop["ir@1"] == pytest.approx(25.0)
  assert drop["tr@10"] == pytest.approx(0.0)


@dataclasses.dataclass(frozen=True)
class LinearEncoder:
  """A stand-in dual encoder (linear maps) with the DualEncoder embedding interface: the batching
  logic is what is under test, not CLIP."""

  def image_embeddings(self, params, images):
    return l2_normalize(images.reshape(images.shape[0], -1) @ params["image"])

  def text_embeddings(self, params, ids, mask):
    return l2_normalize((params["token"][ids] * mask[..., None]).sum(-2))


def test_similarity_matrix_batches_match_one_call():
  rng = np.random.default_rng(0)
  params = {"image": rng.normal(size=(4 * 4 * 3, 8)).astype(np.float32),
            "token": rng.normal(size=(40, 8)).astype(np.float32)}
  encoder = LinearEncoder()
  images = rng.uniform(size=(7, 4, 4, 3)).astype(np.float32)
  ids = rng.integers(3, 40, (9, 6)).astype(np.int32)
  mask = (rng.uniform(size=(9, 6)) < 0.8).astype(np.int32)
  got = metrics.similarity_matrix(encoder, params, images, ids, mask, batch_size=4)
  img = np.asarray(encoder.image_embeddings(params, images))
  txt = np.asarray(encoder.text_embeddings(params, ids, mask))
  assert got.shape == (7, 9)
  np.testing.assert_allclose(got, img @ txt.T, atol=1e-5)
  for bad in (0, -1):  # -1 gave an empty (0,) array, 0 a bare range() error
    with pytest.raises(InputError, match=f"batch_size={bad} must be at least 1"):
      metrics.embed_images(encoder, params, images, batch_size=bad)
    with pytest.raises(InputError, match=f"batch_size={bad} must be at least 1"):
      metrics.embed_texts(encoder, params, ids, mask, batch_size=bad)


def test_fixed_size_batches_cover_every_item_once_in_one_shape():
  batches = metrics.fixed_size_batches(5, 2)
  assert [idx.tolist() for idx, _ in batches] == [[0, 1], [2, 3], [4, 4]]  # the last filled with the last item
  assert [count for _, count in batches] == [2, 2, 1]
  assert [(idx.tolist(), count) for idx, count in metrics.fixed_size_batches(4, 4)] == [([0, 1, 2, 3], 4)]
