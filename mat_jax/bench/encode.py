"""`python -m mat_jax.bench encode`: CLIP image encoding, mat_jax (jit) vs transformers (PyTorch).

One randomly initialised transformers `CLIPModel` (ViT-B/16 by default) is saved with `save_pretrained`
and loaded into mat_jax with `load_clip`, so both sides run the same weights on the same images, on the
same device. Two passes are timed: the forward (features of a batch), and forward+backward to the pixels
(the gradient of the summed features with respect to the input, what every attack step computes; the
weights are frozen on both sides). PyTorch runs in the variants of `--torch` (eager or torch.compile,
float32 or bf16 autocast; `mat_jax.bench.torch_reference`). Calls of all programs are interleaved round
by round, so the machine's drift hits every implementation alike; each figure is the median over rounds.
Interleaving does not even out other jobs' load, which slows PyTorch more than XLA: the load average is
printed with the results. Each row's utilisation is against the peak of the precision it computes in:
the device's data sheet on a known accelerator, else a matmul measured in the run.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax import errors, processes
from mat_jax.bench import common
from mat_jax.bench import torch_reference
from mat_jax.models import split
from mat_jax.models.clip import PRESETS
from mat_jax.models.weights import clip_config_to_hf, load_clip


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default="vit-b-16", choices=sorted(PRESETS), help="CLIP architecture")
  parser.add_argument("--batch", type=errors.positive_int, default=None,
                      help="images per call (default: 8 on CPU, 256 on an accelerator, a size that fills one)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="mat_jax compute dtype")
  parser.add_argument("--torch", default=None, metavar="VARIANTS",
                      help="PyTorch variants: eager, compile, eager-bf16, compile-bf16 or all (default: eager on "
                           "CPU, all on an accelerator)")
  parser.add_argument("--seconds", type=errors.positive_float, default=30.0,
                      help="timing budget after warm-up; at least --rounds rounds are timed")
  parser.add_argument("--rounds", type=errors.positive_int, default=3, help="minimum timed calls of each program")


def run(args: argparse.Namespace) -> int:
  import torch
  import transformers


  load = common.LoadWatch()
  variants = torch_reference.parse_variants(args.torch)
  device = torch_reference.device()
  torch_sync = torch_reference.synchronizer(device)
  batch = args.batch or (8 if jax.default_backend() == "cpu" else 256)
  # Fairness: both frameworks get every core this process may use (XLA's CPU client takes them all).
  cores = processes.usable_cores()
  torch.set_num_threads(cores)
  cfg = PRESETS[args.preset]
  size = cfg.vision.image_size
  print(f"encode: CLIP {args.preset} image tower, batch {batch}, {size}x{size}; mat_jax {args.dtype} "
        f"on {common.device_summary()}; {torch_reference.describe(variants, device)}")
  print(f"threads: PyTorch {torch.get_num_threads()}, JAX usable cores {cores}")

  # ---- same weights on both sides
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  hf = transformers.CLIPModel(transformers.CLIPConfig(**clip_config_to_hf(cfg)))
  hf = hf.eval().requires_grad_(False)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    encoder, params = split(load_clip(tmp, dtype=args.dtype))
  hf = hf.to(device)

  images = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
  x = jnp.asarray(images)
  x_torch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)  # PyTorch's NCHW layout
  mean = torch.tensor(cfg.vision.image_mean, device=device).view(1, 3, 1, 1)
  std = torch.tensor(cfg.vision.image_std, device=device).view(1, 3, 1, 1)

  # ---- the programs
  jax_forward = jax.jit(encoder.image_features)
  jax_backward = jax.jit(jax.grad(lambda p, pixels: encoder.image_features(p, pixels).sum(), argnums=1))

  def torch_features(pixels):
    return hf.get_image_features(pixel_values=(pixels - mean) / std).pooler_output

  def torch_forward(features):
    with torch.no_grad():
      return features(x_torch)

  def torch_backward(features):
    pixels = x_torch.clone().requires_grad_(True)
    features(pixels).float().sum().backward()
    return pixels.grad

  if jax.default_backend() == "cpu":
    flops = {"forward": common.compiled_flops(jax_forward, params, x),
             "forward+backward": common.compiled_flops(jax_backward, params, x)}
    flop_source = "XLA cost analysis of the mat_jax program"
  else:  # XLA's count misses the cuBLAS/cuDNN calls there
    flops = {"forward": common.image_tower_flops(cfg, batch),
             "forward+backward": common.image_tower_flops(cfg, batch, backward=True)}
    flop_source = "counted from the model's shapes"
  programs = {
      ("forward", "mat_jax"): (lambda: jax_forward(params, x), common.block),
      ("forward+backward", "mat_jax"): (lambda: jax_backward(params, x), common.block),
  }
  wrapped = {variant.name: variant.wrap(torch_features, device) for variant in variants}
  for variant in variants:
    features = wrapped[variant.name]
    programs[("forward", variant.name)] = (lambda f=features: torch_forward(f), torch_sync)
    programs[("forward+backward", variant.name)] = (lambda f=features: torch_backward(f), torch_sync)

  # ---- agreement (the comparison is void if two compute different things): mat_jax and each timed
  # variant against PyTorch float32 eager; a variant's first call here is its warm-up (torch.compile)
  feats_t = torch_forward(torch_features).float().cpu().numpy()
  grad_t = torch_backward(torch_features).float().cpu().numpy()
  results = {"mat_jax": (args.dtype, np.asarray(jax_forward(params, x), np.float32),
                         np.asarray(jax_backward(params, x), np.float32).transpose(0, 3, 1, 2))}
  for variant in variants:
    features = wrapped[variant.name]
    results[variant.name] = (variant.dtype, torch_forward(features).float().cpu().numpy(),
                             torch_backward(features).float().cpu().numpy())
  for name, (dtype, feats, grad) in results.items():
    reduced = torch_reference.reduced_precision(dtype)
    print(f"agreement of {name} with PyTorch float32 eager: "
          f"{torch_reference.agreement('features', feats, feats_t, reduced=reduced)}, "
          f"{torch_reference.agreement('pixel gradients', grad, grad_t, reduced=reduced, signs=True)}")

  # ---- timing: warm-up (torch.compile and XLA compile there), then interleaved rounds
  median, calls = common.interleaved_medians(programs, rounds=args.rounds, seconds=args.seconds, load=load)

  # Each row's utilisation is against the peak of the precision it computes in.
  dtypes = torch_reference.compute_dtypes(args.dtype, variants)
  gflops = {(name, impl): flops[name] / seconds / 1e9 for (name, impl), seconds in median.items()}
  shares, peaks = common.utilisation(gflops, {key: dtypes[key[1]] for key in gflops})
  rows = []
  for name in ("forward", "forward+backward"):
    t_jax = median[(name, "mat_jax")]
    for impl in ["mat_jax", *(v.name for v in variants)]:
      key = (name, impl)
      rows.append([name, impl, batch / median[key], f"{median[key] / t_jax:.2f}x", gflops[key], dtypes[impl],
                   shares[key], calls[key]])
  common.print_table(
      f"CLIP {args.preset} image encoding, batch {batch} (median of interleaved calls)",
      ["pass", "implementation", "img/s", "mat_jax speed-up", "GFLOP/s", "computes in", "of its peak", "calls"],
      rows)
  print(f"\nFLOPs per call ({flop_source}): forward {flops['forward'] / 1e9:.4g} G, forward+backward "
        f"{flops['forward+backward'] / 1e9:.4g} G; peaks: {common.describe_peaks(peaks)}. {common.USEFUL_WORK_NOTE}")
  load.print()
  return 0
