"""`python -m mat_jax.bench encode`: CLIP image encoding, mat_jax (jit) vs transformers (PyTorch eager).

One randomly initialised transformers `CLIPModel` (ViT-B/16 by default) is saved with `save_pretrained`
and loaded into mat_jax with `load_clip`, so both sides run the same weights on the same images. Two
passes are timed: the forward (features of a batch), and forward+backward to the pixels (the gradient
of the summed features with respect to the input, what every attack step computes; the weights are
frozen on both sides). Calls of the four programs are interleaved round by round, so a change in the
machine's load hits both frameworks alike; each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax.bench import common
from mat_jax.models import split
from mat_jax.models.clip import PRESETS
from mat_jax.models.weights import clip_config_to_hf, load_clip


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default="vit-b-16", choices=sorted(PRESETS), help="CLIP architecture")
  parser.add_argument("--batch", type=int, default=8, help="images per call")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="mat_jax compute dtype (PyTorch always runs float32)")
  parser.add_argument("--seconds", type=float, default=30.0,
                      help="timing budget after warm-up; at least --rounds rounds are timed")
  parser.add_argument("--rounds", type=int, default=3, help="minimum timed calls of each program")


def _usable_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
  import torch
  import transformers


  # Fairness: both frameworks get every core this process may use (XLA's CPU client takes them all).
  cores = _usable_cores()
  torch.set_num_threads(cores)
  cfg = PRESETS[args.preset]
  size = cfg.vision.image_size
  print(f"encode: CLIP {args.preset} image tower, batch {args.batch}, {size}x{size}; mat_jax {args.dtype} "
        f"on {common.device_summary()}; PyTorch {torch.__version__} float32 eager")
  print(f"threads: PyTorch {torch.get_num_threads()}, JAX usable cores {cores}")

  # ---- same weights on both sides
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  hf = transformers.CLIPModel(transformers.CLIPConfig(**clip_config_to_hf(cfg)))
  hf = hf.eval().requires_grad_(False)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    encoder, params = split(load_clip(tmp, dtype=args.dtype))

  images = np.random.default_rng(0).random((args.batch, size, size, 3), dtype=np.float32)
  x = jnp.asarray(images)
  x_torch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # PyTorch's native NCHW layout
  mean = torch.tensor(cfg.vision.image_mean).view(1, 3, 1, 1)
  std = torch.tensor(cfg.vision.image_std).view(1, 3, 1, 1)

  # ---- the four programs
  jax_forward = jax.jit(encoder.image_features)
  jax_backward = jax.jit(jax.grad(lambda p, pixels: encoder.image_features(p, pixels).sum(), argnums=1))

  def torch_forward():
    with torch.no_grad():
      return hf.get_image_features(pixel_values=(x_torch - mean) / std).pooler_output

  def torch_backward():
    pixels = x_torch.clone().requires_grad_(True)
    hf.get_image_features(pixel_values=(pixels - mean) / std).pooler_output.sum().backward()
    return pixels.grad

  flops = {"forward": common.compiled_flops(jax_forward, params, x),
           "forward+backward": common.compiled_flops(jax_backward, params, x)}
  programs = {
      ("forward", "mat_jax"): (lambda: jax_forward(params, x), common.block),
      ("forward", "pytorch"): (torch_forward, lambda t: t),
      ("forward+backward", "mat_jax"): (lambda: jax_backward(params, x), common.block),
      ("forward+backward", "pytorch"): (torch_backward, lambda t: t),
  }

  # ---- agreement (the comparison is void if the two compute different things)
  feats_j, feats_t = np.asarray(jax_forward(params, x)), torch_forward().numpy()
  grad_j = np.asarray(jax_backward(params, x)).transpose(0, 3, 1, 2)
  grad_t = torch_backward().numpy()
  def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
  print(f"agreement: features max rel diff {rel(feats_j, feats_t):.2e}, "
        f"pixel gradients max rel diff {rel(grad_j, grad_t):.2e}")

  # ---- timing: warm-up, then interleaved rounds
  for fn, sync in programs.values():
    sync(fn())
  times: dict[tuple[str, str], list[float]] = {key: [] for key in programs}
  start = time.perf_counter()
  while min(map(len, times.values())) < args.rounds or time.perf_counter() - start < args.seconds:
    for key, (fn, sync) in programs.items():
      t0 = time.perf_counter()
      sync(fn())
      times[key].append(time.perf_counter() - t0)
  median = {key: float(np.median(v)) for key, v in times.items()}

  peak = common.matmul_peak(dtype="float32")
  rows = []
  for name in ("forward", "forward+backward"):
    t_jax, t_torch = median[(name, "mat_jax")], median[(name, "pytorch")]
    gflops = flops[name] / t_jax / 1e9
    rows.append([name, args.batch / t_jax, args.batch / t_torch, f"{t_torch / t_jax:.2f}x", gflops,
                 f"{100 * gflops / peak.gflops:.0f}%", len(times[(name, "mat_jax")])])
  common.print_table(
      f"CLIP {args.preset} image encoding, batch {args.batch} (median of interleaved calls)",
      ["pass", "mat_jax img/s", "PyTorch img/s", "mat_jax/PyTorch", "mat_jax GFLOP/s", "of peak", "calls"],
      rows)
  torch_peak = f"{peak.torch_gflops:,.0f}" if peak.torch_gflops else "n/a"
  print(f"\nFLOPs per call (XLA cost analysis of the mat_jax program): "
        f"forward {flops['forward'] / 1e9:,.0f} G, forward+backward {flops['forward+backward'] / 1e9:,.0f} G")
  print(f"matmul peak measured now ({peak.size}x{peak.size} float32): JAX {peak.jax_gflops:,.0f} GFLOP/s, "
        f"PyTorch {torch_peak} GFLOP/s; 'of peak' is relative to the faster")
  return 0
