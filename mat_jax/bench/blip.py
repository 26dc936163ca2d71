"""`python -m mat_jax.bench blip`: the BLIP image attack step against transformers' PyTorch BLIP, in one run.

PGD (10 L-inf steps at 2/255 by default) on BLIP's ITC image features, lowering the cosine similarity to
the paired captions' ITC features, the loss SGA's image attack uses. mat_jax (one jitted `fori_loop`)
vs the same attack written eagerly in PyTorch on transformers' `BlipForImageTextRetrieval`, with
identical weights (a random model saved with `save_pretrained` and loaded by `load_blip`). Calls
alternate round by round so the machine's drift hits both alike; reported: images/s, seconds per attack,
the ratio, the agreement of the two loss gradients, and the machine's load average (other jobs slow
PyTorch more than XLA).
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax import errors, processes
from mat_jax.bench import common, torch_reference
from mat_jax.bench.attacks import cosine_pgd
from mat_jax.models import split
from mat_jax.models.blip import BLIP_PRESETS, blip_config_to_hf, load_blip


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default="blip-base", choices=sorted(BLIP_PRESETS), help="BLIP architecture")
  parser.add_argument("--quick", action="store_true", help="blip-tiny at batch 2: a fast smoke run")
  parser.add_argument("--batch", type=errors.positive_int, default=8)
  parser.add_argument("--steps", type=errors.positive_int, default=10)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype of both: mat_jax's, and PyTorch eager in the same precision (bfloat16: "
                           "bf16 autocast)")
  parser.add_argument("--seconds", type=errors.positive_float, default=20.0, help="timing budget after warm-up")
  parser.add_argument("--rounds", type=errors.positive_int, default=3, help="minimum timed calls per implementation")


def run(args: argparse.Namespace) -> int:
  import torch
  import transformers


  load = common.LoadWatch()
  # Fairness: both frameworks get every core this process may use (XLA's CPU client takes them all).
  torch.set_num_threads(processes.usable_cores())
  preset, batch = ("blip-tiny", 2) if args.quick else (args.preset, args.batch)
  steps, eps = args.steps, 2 / 255
  step_size = eps / 4
  cfg = BLIP_PRESETS[preset]
  size = cfg.vision.image_size
  # PyTorch on the device JAX runs on (CUDA beside a GPU), so the ratio compares two frameworks, not two devices.
  device = torch_reference.device()
  torch_sync = torch_reference.synchronizer(device)
  print(f"BLIP attack benchmark on {common.device_summary()}")
  variant = torch_reference.for_dtype(args.dtype)  # the same precision on both sides: a framework comparison
  print(f"\nPGD: BLIP {preset}, batch {batch}, {steps} L-inf steps (eps 2/255, step 0.5/255), cosine loss of the "
        f"ITC image features to the paired captions'; mat_jax {args.dtype} jit vs "
        f"{torch_reference.describe([variant], device)} ({torch.get_num_threads()} threads)")
  torch.manual_seed(0)
  hf_cfg = transformers.BlipConfig.from_dict(blip_config_to_hf(cfg))
  # transformers initialises BLIP's vision weights with a 1e-10 spread, which leaves its attention and MLP all
  # but zero and the gradients' agreement untested; the text tower's 0.02 instead, as mat_jax's own init.
  hf_cfg.vision_config.initializer_range = hf_cfg.text_config.initializer_range
  hf = transformers.BlipForImageTextRetrieval(hf_cfg).eval().requires_grad_(False)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    encoder, params = split(load_blip(tmp, dtype=args.dtype, context_length=cfg.text.context_length))
  hf = hf.to(device)

  rng = np.random.default_rng(0)
  images = rng.random((batch, size, size, 3), dtype=np.float32)
  ids = rng.integers(5, cfg.text.vocab_size - 1, (batch, 16)).astype(np.int64)
  ids[:, 0] = cfg.text.bos_token_id
  mask = np.ones_like(ids)
  text = np.array(jax.jit(encoder.text_features)(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))

  jax_pgd, jax_grad = cosine_pgd(encoder, eps=eps, step_size=step_size, steps=steps)
  x = jnp.asarray(images)
  x_torch, text_torch, normalise = torch_reference.cosine_attack_inputs(images, text, cfg.vision, device)

  def float32_loss(pixels):
    cls = hf.vision_model(pixel_values=normalise(pixels)).last_hidden_state[:, 0]
    return -(torch.nn.functional.normalize(hf.vision_proj(cls).float(), dim=-1) * text_torch).sum()

  torch_loss = variant.wrap(float32_loss, device)

  # Agreement: both differentiate the same loss (jax_grad's sum is of the negated cosine, as torch_loss),
  # in the same precision, each held to float32 eager PyTorch's gradient.
  reference = torch_reference.pixel_gradient(float32_loss, x_torch)
  reduced = torch_reference.reduced_precision(args.dtype)
  for name, grad in (("mat_jax", np.asarray(jax_grad(params, x, text), np.float32).transpose(0, 3, 1, 2)),
                     (variant.name, torch_reference.pixel_gradient(torch_loss, x_torch))):
    print(f"agreement of {name} with PyTorch float32 eager: "
          f"{torch_reference.agreement('loss gradient', grad, reference, reduced=reduced, signs=True)}")

  key = jax.random.key(0)
  programs = {"mat_jax": (lambda: jax_pgd(params, x, text, key), common.block), "pytorch": (
      lambda: torch_reference.linf_pgd(torch_loss, x_torch, eps=eps, step_size=step_size, steps=steps), torch_sync)}
  median, calls = common.interleaved_medians(programs, rounds=args.rounds, seconds=args.seconds, load=load)
  rows = [[name, batch / median[name], median[name], median["pytorch"] / median[name], calls[name]]
          for name in programs]
  common.print_table(f"PGD {steps} steps, BLIP {preset}, batch {batch} (median of interleaved calls)",
                     ["implementation", "img/s", "s/attack", "speed-up vs PyTorch", "calls"], rows)
  print(f"ratio (PyTorch time / mat_jax time): {median['pytorch'] / median['mat_jax']:.2f}x")
  load.print()
  return 0
