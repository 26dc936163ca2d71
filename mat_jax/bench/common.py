"""Timing, FLOP counting and the machine's measured matmul peak, shared by the benchmark suites.

Honest numbers: every figure is measured in the run that prints it; a ratio compares two
implementations on the same weights and inputs, timed the same way (median of repeated calls after
warm-up, with device work finished before the clock stops).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax import processes, tables


class Disagreement(RuntimeError):
  """Two implementations of a benchmark computed different things: their timings would compare nothing."""


def block(tree: Any) -> Any:
  """Wait for device work: JAX arrays are asynchronous, the clock must not stop early."""
  return jax.block_until_ready(tree)


def time_call(fn: Callable[[], Any], *, warmup: int = 2, min_seconds: float = 3.0, min_calls: int = 5,
              max_calls: int = 1000, sync: Callable[[Any], Any] = block) -> float:
  """Median seconds per call of `fn()`, after `warmup` calls (compilation happens there)."""
  for _ in range(warmup):
    sync(fn())
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < min_seconds):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def interleaved_medians(programs: dict[Any, tuple[Callable[[], Any], Callable[[Any], Any]]], *, rounds: int,
                        seconds: float, load: LoadWatch | None = None,
                        warmed: Callable[[Any, float], None] | None = None) -> tuple[dict[Any, float], dict[Any, int]]:
  """Median seconds per call of each `programs[key] = (fn, sync)`, timed round by round (one call of each
  per round) so that the machine's drift between fast and slow minutes hits every program alike; the first
  call of each is a warm-up (compilation), reported to `warmed(key, seconds)` as it ends. Runs at least
  `rounds` rounds and for at least `seconds`; returns the medians and the number of timed calls; `load`
  samples the load average after each round.

  Interleaving does not make a ratio independent of other jobs' load: under load PyTorch's threads slow
  far more than XLA's (2 threads 5.6x slower than 1 at load 5.7 on 2 cores, eager PyTorch PGD), so the
  suites print the load next to their results (`LoadWatch`)."""
  for key, (fn, sync) in programs.items():
    t0 = time.perf_counter()
    sync(fn())
    if warmed is not None:
      warmed(key, time.perf_counter() - t0)
  times: dict[Any, list[float]] = {key: [] for key in programs}
  start = time.perf_counter()
  while min(map(len, times.values())) < rounds or time.perf_counter() - start < seconds:
    for key, (fn, sync) in programs.items():
      t0 = time.perf_counter()
      sync(fn())
      times[key].append(time.perf_counter() - t0)
    if load is not None:
      load.sample()
  return {key: statistics.median(v) for key, v in times.items()}, {key: len(v) for key, v in times.items()}


def load_average() -> float | None:
  """The machine's 1-minute load average, or None where the system does not report one."""
  try:
    return os.getloadavg()[0]
  except (AttributeError, OSError):
    return None


class LoadWatch:
  """The 1-minute load average before a benchmark starts and its highest value while it runs, printed next
  to the results: other jobs slow PyTorch's threads far more than XLA's, so a ratio measured under load is
  not comparable with a quiet machine's. Before the run, a load above the usable cores means other jobs
  compete for them; during it the benchmark's own threads add up to `processes.usable_cores()` to the load, so
  there the warning waits for one core more."""

  def __init__(self, cores: int | None = None):
    self.cores = cores or processes.usable_cores()
    self.before = load_average()
    self.during: float | None = None

  def sample(self) -> None:
    now = load_average()
    if now is not None:
      self.during = now if self.during is None else max(self.during, now)

  def report(self) -> list[str]:
    """The load line and, when other jobs loaded the machine before or during the run, a warning."""
    self.sample()
    if self.before is None and self.during is None:
      return ["load average: not reported by this system"]
    shown = "; ".join(f"{value:.1f} {when}" for when, value in (("before the run", self.before),
                                                                 ("at most during it", self.during))
                      if value is not None)
    lines = [f"load average (1 min): {shown}; {self.cores} usable cores"]
    over = [value for value, limit in ((self.before, self.cores), (self.during, self.cores + 1))
            if value is not None and value > limit]
    if over:
      lines.append(f"warning: load average {max(over):.1f} on {self.cores} usable cores: PyTorch's threads slow more "
                   "than XLA's under load; ratios are not comparable with a quiet machine's")
    return lines

  def print(self) -> None:
    for line in self.report():
      print(line)


def compiled_flops(jitted: Callable, *args: Any, **kwargs: Any) -> float:
  """FLOPs of one call, as XLA's cost analysis counts them for the compiled program."""
  cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returns one dict per device program
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0


# Printed under the tables that give every implementation's GFLOP/s from one count.
USEFUL_WORK_NOTE = ("GFLOP/s and peak shares credit every row with the same work, the pooled features' FLOPs "
                    "(transformers' CLIP also computes its last layer for every token, 7.5% more on ViT-B/16, "
                    "which is not credited)")


def image_tower_flops(cfg: Any, batch: int, *, backward: bool = False) -> float:
  """Matmul FLOPs of the CLIP image tower's features of `batch` images, counted from its shapes: the
  forward, or with `backward` the forward plus the gradient to the pixels (weights frozen, as in an
  attack step).

  On GPUs XLA's cost analysis misses the cuBLAS and cuDNN custom calls, so the accelerator figures use this
  count; on CPU it matches XLA's (tests/test_bench.py). It counts what the compiled program computes:
  only the pooled (class) row leaves the last layer, so XLA computes that layer's queries, output
  projection and MLP for that row alone (its keys and values for every token). Backward, a product with a
  frozen weight costs its forward once more; a product of two activations (attention) twice more.
  """
  v = cfg.vision
  tokens, width = v.num_patches + 1, v.width

  def layer(rows: int) -> tuple[int, int]:  # (linear, attention) FLOPs of a layer whose output keeps `rows`
    linear = 2 * tokens * width * 2 * width + 2 * rows * width * 2 * width + 2 * 2 * rows * width * v.mlp_dim
    return linear, 2 * 2 * rows * tokens * width

  full, last = layer(tokens), layer(1)
  linear = (2 * v.num_patches * 3 * v.patch_size**2 * width           # patch embedding
            + (v.layers - 1) * full[0] + last[0]
            + 2 * width * cfg.projection_dim)                           # pooled row to the shared space
  attention = (v.layers - 1) * full[1] + last[1]
  return float(batch * ((2 * linear + 3 * attention) if backward else (linear + attention)))


@dataclasses.dataclass(frozen=True)
class Peak:
  """The best matmul rate measured on this machine, by either framework, in GFLOP/s."""
  jax_gflops: float
  torch_gflops: float | None
  size: int
  dtype: str

  @property
  def gflops(self) -> float:
    return max(self.jax_gflops, self.torch_gflops or 0.0)


def matmul_peak(size: int = 2048, dtype: str = "float32", min_seconds: float = 2.0) -> Peak:
  """Measure a square matmul in JAX (and PyTorch, if installed) and keep the faster rate (PyTorch's is a
  512x512 probe's where that runs at under a tenth of XLA's rate)."""
  flops = 2.0 * size**3
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
  mm = jax.jit(lambda x, y: x @ y)
  jax_rate = flops / time_call(lambda: mm(a, a), min_seconds=min_seconds) / 1e9
  torch_rate = None
  try:
    import torch
  except ImportError:
    pass
  else:
    t = torch.from_numpy(np.array(a, np.float32)).to(getattr(torch, dtype))  # a writable copy
    with torch.no_grad():
      # A 512x512 probe first (best of 3 calls): a PyTorch path at a tenth of XLA's rate cannot be the peak,
      # and timing it in full can take minutes (bf16 matmuls on a CPU without bf16 instructions).
      probe = t[:512, :512].contiguous()
      probe_s = min(_seconds(lambda: probe @ probe) for _ in range(3))
      torch_rate = 2.0 * 512**3 / probe_s / 1e9
      if torch_rate >= jax_rate / 10:
        torch_rate = flops / time_call(lambda: t @ t, min_seconds=min_seconds, sync=lambda x: x) / 1e9
  return Peak(jax_rate, torch_rate, size, dtype)


def _seconds(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# Dense matmul peaks in TFLOP/s per device from the vendors' data sheets (SXM parts for a bare H100/H200), by
# compute dtype: float32 on NVIDIA means TF32 tensor cores (what XLA and PyTorch's "high" precision use).
# Keys are matched against `jax.Device.device_kind`, first match wins (more specific names first).
KNOWN_PEAKS_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100 NVL", {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5}),
    ("H200 NVL", {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("TPU v6 lite", {"bfloat16": 918.0}),   # v6e (Trillium)
    ("TPU v6e", {"bfloat16": 918.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),   # v5e
    ("TPU v5e", {"bfloat16": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0}),
    ("TPU v5", {"bfloat16": 459.0}),        # v5p reports itself as "TPU v5"
    ("TPU v4", {"bfloat16": 275.0}),
)


def known_peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The data-sheet peak of a device kind for a compute dtype, or None when the table lacks it (a TPU's
  float32 matmuls run as bf16 passes, so only its bf16 peak is listed)."""
  for name, peaks in KNOWN_PEAKS_TFLOPS:
    if name.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def peak_gflops(dtype: str = "float32") -> tuple[float, str]:
  """The peak to report utilisation against, in GFLOP/s, and where it comes from: the data sheet of a
  known accelerator, else a matmul measured now on this machine (CPUs, unknown devices)."""
  kind = getattr(jax.devices()[0], "device_kind", "")
  known = known_peak_tflops(kind, dtype)
  if known is not None and jax.default_backend() != "cpu":
    return known * 1e3, f"{kind} data sheet, {dtype}"
  peak = matmul_peak(dtype=dtype)
  return peak.gflops, f"measured {peak.size}x{peak.size} {peak.dtype} matmul"


def utilisation(gflops: dict[Any, float],
                dtypes: dict[Any, str]) -> tuple[dict[Any, str], dict[str, tuple[float, str]]]:
  """Each row's achieved `gflops[key]` as a share of the peak of the dtype it computes in, `dtypes[key]`
  (a PyTorch bf16 row against the bf16 peak, a float32 row against float32's), and the peaks used: the
  `peak_gflops` of each dtype, looked up (or measured) once."""
  peaks = {dtype: peak_gflops(dtype) for dtype in dict.fromkeys(dtypes[key] for key in gflops)}
  return {key: f"{100 * rate / peaks[dtypes[key]][0]:.1f}%" for key, rate in gflops.items()}, peaks


def describe_peaks(peaks: dict[str, tuple[float, str]]) -> str:
  return "; ".join(f"{dtype} {gflops:,.0f} GFLOP/s ({source})" for dtype, (gflops, source) in peaks.items())


def device_summary() -> str:
  dev = jax.devices()[0]
  return f"{dev.platform}:{getattr(dev, 'device_kind', '')} x{jax.device_count()}"


def print_table(title: str, header: list[str], rows: list[list[Any]], left_columns: int = 1) -> None:
  """A plain aligned table on stdout, its first `left_columns` columns (labels) left-aligned."""
  print(f"\n{title}")
  print("\n".join(tables.aligned(header, [[_fmt(c) for c in row] for row in rows], left_columns=left_columns)))


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
  return str(value)
