"""Intervals of recall differences over training seeds and test images.

A run's retrieval ranks give every test image its part of the recall (`hits`, `per_image`), whose mean
over the images is the recall; `interval` turns (seeds, images) values, or the paired difference of two
arms' values, into a confidence interval of their mean; `recall_interval` is one arm's recall (a table
cell). The study's claims and the demo's headline differences are read from these.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mat_jax.errors import InputError


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


def check_parts(values, level: float) -> np.ndarray:
  """(S seeds, N test images) finite values as an array, and a level in (0, 1): unchecked, a level of 95 or a
  NaN value gives an interval of [nan, nan]."""
  arr = np.asarray(values, np.float64)
  if arr.ndim != 2:
    raise InputError(f"values must be (seeds, test images), got shape {arr.shape}; for one seed pass values[None]")
  if not np.isfinite(arr).all():
    raise InputError(f"values hold {int((~np.isfinite(arr)).sum())} non-finite entries; an interval needs finite ones")
  if not 0 < level < 1:
    raise InputError(f"level={level!r} must be a fraction in (0, 1), e.g. 0.95 for a 95% interval")
  return arr


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

  values = check_parts(values, level)
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


def recall_interval(values: np.ndarray, level: float = 0.95) -> list[float]:
  """The `level` interval of one arm's recall from its (S seeds, N test images) parts (%): `interval`,
  widened to Wilson's score interval of the recall as a rate over the N test images where that is wider,
  and cut to [0, 100], where a recall lies.

  Near 0 or 100% the spread the t interval reads collapses with the hits: an attack no query survives
  gives a zero-width [0, 0], one hit in 500 images [0, 0.59] where the hit rate may be twice that. Wilson's
  interval does not collapse ([0, 0.76] and [0.04, 1.12] there) and is close to the t interval at
  mid-range recalls, where this is `interval`. N images are the independent units (IR@1's captions of one
  image are not), so the score interval counts N trials."""
  from scipy import stats

  values = check_parts(values, level)
  low, high = interval(values, level)
  n = values.shape[1]
  rate = min(max(float(values.mean()) / 100.0, 0.0), 1.0)
  z = float(stats.norm.ppf(0.5 + level / 2))
  centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
  half = z * (rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
  low, high = min(low, 100.0 * (centre - half)), max(high, 100.0 * (centre + half))
  return [max(low, 0.0), min(high, 100.0)]
