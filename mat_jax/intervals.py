"""Intervals of recall differences over training seeds and test images.

A run's retrieval ranks give every test image its part of the recall (`hits`, `per_image`), whose mean
over the images is the recall; `interval` turns (seeds, images) values, or the paired difference of two
arms' values, into a confidence interval of their mean. The study's claims and the demo's headline
differences are read from these.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def hits(entry: Mapping[str, Any], n_images: int, meaning_preserving: bool = False
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per test image: TR@1 hit (N,), IR@1 hits among its captions (N,), its caption count (N,).

  meaning_preserving: from the ranks with every label-flipped caption restored (a text attack's entry)."""
  suffix = "_mp" if meaning_preserving else ""
  tr = (np.asarray(entry["tr_rank" + suffix]) < 1).astype(np.float64)
  owners = np.asarray(entry["text_to_image"])
  ir = np.bincount(owners, weights=(np.asarray(entry["ir_rank" + suffix]) < 1).astype(np.float64),
                   minlength=n_images)
  return tr, ir, np.bincount(owners, minlength=n_images).astype(np.float64)


def per_image(per_seed: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], metric: str) -> np.ndarray:
  """(S, N): per seed and test image, the image's part of the recall (%), whose mean over the images is the
  recall. TR@1: its hit. IR@1 is a ratio (all captions' hits over all captions): an image's part is its
  linearisation R + (hits - R captions) / mean captions, with R the seed's IR@1, so images with more
  captions weigh as they do in the ratio. `per_seed`: `hits` of each seed."""
  if metric == "tr@1":
    return 100.0 * np.stack([tr for tr, _, _ in per_seed])
  parts = []
  for _, ir, count in per_seed:
    recall = ir.sum() / count.sum()
    parts.append(recall + (ir - recall * count) / count.mean())
  return 100.0 * np.stack(parts)


def interval(values: np.ndarray, level: float = 0.95) -> list[float]:
  """The `level` interval of the mean of `values` (S seeds, N test images) as an estimate of its
  expectation over training seeds and test images: Student's t on the sum of two variances, each with its
  own degrees of freedom (Satterthwaite's approximation).

  - seeds: the spread of the S per-seed means (what another training run would change), S - 1 degrees of
    freedom; with few seeds this is the wide part, as it should be;
  - images: the spread of the N per-image means over the seeds (what another test set would change), N - 1.
  Each also holds the seed-by-image noise, which is so counted twice. Satterthwaite's degrees of freedom
  come from the estimated seed part, itself known to 1-2 degrees of freedom with 2-3 seeds: when it comes
  out small they grow and the interval narrows too far (2 seeds covered 87%, 3 seeds 92-93% in
  simulations). So the interval is never narrower than Student's t over the S seed means alone. With one
  seed there is no seed part: the interval then covers the test images only (the model is fixed). Pass
  the difference of two arms' values (the same seeds' indices and images) for a paired interval."""
  from scipy import stats  # seconds to import; only the study's and the demo's last step need it

  seeds, n = values.shape
  if n < 2:
    raise ValueError(f"an interval over test images needs at least 2 images, got {n}")
  mean = float(values.mean())
  quantile = 0.5 + level / 2
  parts = [(float(values.mean(0).var(ddof=1)) / n, n - 1)]
  if seeds > 1:
    parts.append((float(values.mean(1).var(ddof=1)) / seeds, seeds - 1))
  variance = sum(v for v, _ in parts)
  if variance <= 0:
    return [mean, mean]
  df = variance ** 2 / sum(v ** 2 / dof for v, dof in parts)
  half = float(stats.t.ppf(quantile, df)) * variance ** 0.5
  if seeds > 1:
    half = max(half, float(stats.t.ppf(quantile, seeds - 1)) * parts[1][0] ** 0.5)
  return [mean - half, mean + half]
