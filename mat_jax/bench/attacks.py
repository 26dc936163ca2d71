"""`python -m mat_jax.bench attacks`: compiled attacks against their references, in one run.

(a) PGD: 10 L-inf steps on a CLIP image tower (ViT-B/16; batch 8 on CPU, 256 on an accelerator)
    lowering the cosine similarity to paired captions; mat_jax (one jitted `fori_loop`) vs the same
    attack written in PyTorch on transformers' `CLIPModel` on the same device, with identical weights (a
    random `CLIPModel` saved with `save_pretrained` and loaded by `mat_jax.models.load_clip`), in the
    variants of `--torch` (eager or torch.compile of the loss, float32 or bf16 autocast;
    `mat_jax.bench.torch_reference`). Calls alternate round by round so the machine's drift hits all alike;
    reported: images/s, the ratios, achieved GFLOP/s and the fraction of the peak of the precision each
    row computes in (the data sheet's on a known accelerator, else a matmul measured in the same run), and
    the machine's load average (other jobs slow PyTorch more than XLA).
(b) BERT-Attack: the batched jitted text attack vs a per-caption loop (`mat_jax.bench.text_attack`).
(c) SGA: the full attack (image-guided text attack, multi-scale image attack, text attack again) on N
    images x 5 captions; wall time per image after compilation. A small CLIP on CPU by default,
    ViT-B/16 when an accelerator is present.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax import errors, processes
from mat_jax.attacks import image as image_attacks
from mat_jax.attacks import losses, multimodal
from mat_jax.attacks.candidates import LexiconSource, prepare_candidates
from mat_jax.bench import common
from mat_jax.bench import torch_reference
from mat_jax.bench.text_attack import add_bert_attack_arguments, run_bert_attack_benchmark
from mat_jax.data import shapes
from mat_jax.models import CLIP, clip_config, split
from mat_jax.models.clip import PRESETS
from mat_jax.models.weights import clip_config_to_hf, load_clip

PARTS = ("pgd", "bert", "sga")


def cosine_pgd(encoder, *, eps: float, step_size: float, steps: int):
  """mat_jax's side of the PGD benchmarks (CLIP's here, BLIP's in `bench blip`), both jitted: L-inf PGD on
  the cosine of the image features to the paired captions' (params, x, text, key) -> adversarial images,
  and one step's pixel gradient of that loss's sum (params, x, text) -> gradient: what the loop body
  computes, for the agreement check and the FLOP count."""

  @jax.jit
  def attack(params, x, text, key):
    return image_attacks.pgd(losses.paired_cosine(encoder, params, text), x, key, eps=eps, step_size=step_size,
                             steps=steps)

  @jax.jit
  def gradient(params, x, text):
    return jax.grad(lambda z: jnp.sum(losses.paired_cosine(encoder, params, text)(z, None)))(x)

  return attack, gradient


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="mat_jax compute dtype, in every part (the PyTorch variants name their own)")
  g = parser.add_argument_group("PGD (mat_jax vs eager PyTorch)")
  g.add_argument("--preset", default="vit-b-16", choices=sorted(PRESETS), help="CLIP architecture")
  g.add_argument("--quick", action="store_true", help="vit-b-32 at batch 2: a fast smoke run")
  g.add_argument("--batch", type=errors.positive_int, default=None,
                 help="images per attack (default: 8 on CPU, 256 on an accelerator, a size that fills one)")
  g.add_argument("--steps", type=errors.positive_int, default=10)
  g.add_argument("--torch", default=None, metavar="VARIANTS",
                 help="PyTorch variants: eager, compile, eager-bf16, compile-bf16 or all (default: eager on CPU, "
                      "all on an accelerator)")
  g.add_argument("--seconds", type=errors.positive_float, default=20.0, help="timing budget after warm-up")
  g.add_argument("--rounds", type=errors.positive_int, default=3, help="minimum timed calls per implementation")
  add_bert_attack_arguments(parser)
  g = parser.add_argument_group("SGA (wall time per image)")
  g.add_argument("--sga-images", type=errors.positive_int, default=200)
  g.add_argument("--sga-batch", type=errors.positive_int, default=32)
  g.add_argument("--sga-preset", default=None, choices=sorted(PRESETS),
                 help="CLIP architecture (default: tiny on CPU, vit-b-16 on an accelerator)")
  g.add_argument("--sga-steps", type=errors.positive_int, default=10)


def run(args: argparse.Namespace) -> int:
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = set(parts) - set(PARTS)
  if unknown or not parts:
    raise errors.InputError(f"--parts {args.parts!r}: choose one or more of {','.join(PARTS)}")
  print(f"attacks benchmark on {common.device_summary()}")
  if "pgd" in parts:
    run_pgd(args)
  if "bert" in parts:
    run_bert_attack_benchmark(args)
  if "sga" in parts:
    run_sga(args)
  return 0


# ----------------------------------------------------------------------------------------------------
# (a) PGD vs eager PyTorch
# ----------------------------------------------------------------------------------------------------

def run_pgd(args: argparse.Namespace) -> dict:
  import torch
  import transformers


  load = common.LoadWatch()
  variants = torch_reference.parse_variants(args.torch)
  device = torch_reference.device()
  torch_sync = torch_reference.synchronizer(device)
  default_batch = 8 if jax.default_backend() == "cpu" else 256
  preset, batch = ("vit-b-32", 2) if args.quick else (args.preset, args.batch or default_batch)
  steps, eps = args.steps, 2 / 255
  step_size = eps / 4
  torch.set_num_threads(processes.usable_cores())
  cfg = PRESETS[preset]
  size = cfg.vision.image_size
  print(f"\nPGD: CLIP {preset}, batch {batch}, {steps} L-inf steps (eps 2/255, step 0.5/255), cosine loss to "
        f"the paired captions; mat_jax {args.dtype} jit vs {torch_reference.describe(variants, device)}; "
        f"threads: PyTorch {torch.get_num_threads()}, JAX cores {processes.usable_cores()}")

  torch.manual_seed(0)
  hf = transformers.CLIPModel(transformers.CLIPConfig(**clip_config_to_hf(cfg))).eval().requires_grad_(False)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    encoder, params = split(load_clip(tmp, dtype=args.dtype))
  hf = hf.to(device)

  rng = np.random.default_rng(0)
  images = rng.random((batch, size, size, 3), dtype=np.float32)
  ids = rng.integers(1, cfg.text.vocab_size - 1, (batch, 16)).astype(np.int64)
  ids[:, -1] = cfg.text.eos_token_id
  text = jax.jit(encoder.text_features)(params, jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32))
  text = np.array(text)  # a writable copy: torch.from_numpy shares it

  jax_pgd, jax_step = cosine_pgd(encoder, eps=eps, step_size=step_size, steps=steps)
  x = jnp.asarray(images)
  x_torch, text_torch, normalise = torch_reference.cosine_attack_inputs(images, text, cfg.vision, device)

  def torch_loss(pixels):
    feats = hf.get_image_features(pixel_values=normalise(pixels)).pooler_output.float()
    return -(torch.nn.functional.normalize(feats, dim=-1) * text_torch).sum()

  # Agreement: mat_jax and each timed variant compute float32 eager PyTorch's loss gradient (the attacks
  # then differ only by random start); a variant's first call here is its warm-up (torch.compile).
  # (torch_loss is the sum jax_step differentiates)
  losses_of = {variant.name: variant.wrap(torch_loss, device) for variant in variants}
  reference = torch_reference.pixel_gradient(torch_loss, x_torch)
  gradients = {"mat_jax": (args.dtype, np.asarray(jax_step(params, x, text), np.float32).transpose(0, 3, 1, 2)),
               **{variant.name: (variant.dtype, torch_reference.pixel_gradient(losses_of[variant.name], x_torch))
                  for variant in variants}}
  for name, (dtype, grad) in gradients.items():
    check = torch_reference.agreement("loss gradient", grad, reference,
                                      reduced=torch_reference.reduced_precision(dtype), signs=True)
    print(f"agreement of {name} with PyTorch float32 eager: {check}")

  key = jax.random.key(0)
  programs = {"mat_jax": (lambda: jax_pgd(params, x, text, key), common.block)}
  for variant in variants:  # the loss is what torch.compile sees; the loop and autograd.grad stay eager
    programs[variant.name] = (lambda loss=losses_of[variant.name]: torch_reference.linf_pgd(
        loss, x_torch, eps=eps, step_size=step_size, steps=steps), torch_sync)
  median, calls = common.interleaved_medians(programs, rounds=args.rounds, seconds=args.seconds, load=load)
  adv = np.asarray(jax_pgd(params, x, text, key))
  assert np.abs(adv - images).max() <= eps + 1e-6

  if jax.default_backend() == "cpu":
    flops = steps * common.compiled_flops(jax_step, params, x, text)
    flop_source = "XLA cost analysis"
  else:  # XLA's count misses the cuBLAS/cuDNN calls there
    flops = steps * common.image_tower_flops(cfg, batch, backward=True)
    flop_source = "counted from the model's shapes"
  # Each row's utilisation is against the peak of the precision it computes in.
  dtypes = torch_reference.compute_dtypes(args.dtype, variants)
  gflops = {name: flops / median[name] / 1e9 for name in programs}
  shares, peaks = common.utilisation(gflops, dtypes)
  rows = [[name, batch / median[name], median[name], f"{median[name] / median['mat_jax']:.2f}x", gflops[name],
           dtypes[name], shares[name], calls[name]] for name in programs]
  common.print_table(f"PGD {steps} steps, CLIP {preset}, batch {batch} (median of interleaved calls)",
                     ["implementation", "img/s", "s/attack", "mat_jax speed-up", "GFLOP/s", "computes in",
                      "of its peak", "calls"], rows)
  print(f"FLOPs per attack: {flops / 1e9:,.4g} G ({steps} x forward+backward to the pixels, {flop_source}); "
        f"peaks: {common.describe_peaks(peaks)}. {common.USEFUL_WORK_NOTE}")
  load.print()
  return {"preset": preset, "batch": batch, "steps": steps, "dtype": args.dtype, "mat_jax_s": median["mat_jax"],
          **{f"{name}_s": median[name] for name in programs if name != "mat_jax"},
          "gflops_mat_jax": flops / median["mat_jax"] / 1e9, "peak_gflops": peaks[args.dtype][0]}


# ----------------------------------------------------------------------------------------------------
# (c) SGA wall time
# ----------------------------------------------------------------------------------------------------

def run_sga(args: argparse.Namespace) -> dict:
  import dataclasses

  from flax import nnx

  on_cpu = jax.default_backend() == "cpu"
  preset = args.sga_preset or ("tiny" if on_cpu else "vit-b-16")
  n, b, k = args.sga_images, min(args.sga_batch, args.sga_images), 5
  tokenizer = shapes.tokenizer()
  cfg = clip_config(preset, dtype=args.dtype)
  # The shapes world's vocabulary and context (random weights: the timing does not depend on them).
  cfg = cfg.replace(text=dataclasses.replace(
      cfg.text, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
      eos_token_id=tokenizer.end_id, bos_token_id=tokenizer.start_id, pad_token_id=tokenizer.pad_id))
  size = cfg.vision.image_size
  encoder, params = split(CLIP(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  scenes = [shapes.sample_scene(rng) for _ in range(n)]
  images = np.stack([shapes.render(s, size) for s in scenes]).astype(np.float32) / 255
  captions = [c for s in scenes for c in shapes.captions(s, rng, k)]
  t0 = time.perf_counter()
  candidates = prepare_candidates(captions, tokenizer, LexiconSource(shapes.substitution_table()))
  prepare_s = time.perf_counter() - t0
  print(f"\nSGA: CLIP {preset} ({size}px, random weights, {args.dtype}), {n} images x {k} captions, batches of {b}, "
        f"{args.sga_steps} steps, scales {losses.SGA_SCALES}, paraphrase candidates")

  def attack(start: int):
    idx = np.minimum(np.arange(start, start + b), n - 1)
    rows = (idx[:, None] * k + np.arange(k)).reshape(-1)
    return multimodal.set_guidance_attack(encoder, params, jnp.asarray(images[idx]),
                                          multimodal.select_candidates(candidates, rows), jax.random.key(start),
                                          eps=2 / 255, step_size=0.5 / 255, steps=args.sga_steps)

  t0 = time.perf_counter()
  common.block(attack(0))
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for start in range(0, n, b):
    common.block(attack(start))
  total_s = time.perf_counter() - t0
  batches = -(-n // b)
  rows = [["SGA (mat_jax, compiled)", total_s / n * 1e3, n / total_s, total_s, first_s]]
  common.print_table(f"SGA wall time, {n} images x {k} captions ({common.device_summary()})",
                     ["implementation", "ms/image", "images/s", f"total s ({batches} batches)",
                      "first batch s (compile)"], rows)
  print(f"candidate preparation on the host (once, cached per caption): {prepare_s:.2f} s for {len(captions)} "
        "captions")
  return {"preset": preset, "images": n, "ms_per_image": total_s / n * 1e3, "compile_s": first_s}
