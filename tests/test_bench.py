"""The benchmarks' shared parts: FLOP counts, device peaks, how the PyTorch references run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mat_jax.bench import common, torch_reference
from mat_jax.models import CLIP, split
from mat_jax.models.clip import PRESETS


def test_known_peaks_by_device_kind():
  assert common.known_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert common.known_peak_tflops("NVIDIA H200", "float32") == 494.5
  assert common.known_peak_tflops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312.0
  assert common.known_peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert common.known_peak_tflops("TPU v5", "bfloat16") == 459.0
  assert common.known_peak_tflops("TPU v6 lite", "bfloat16") == 918.0
  assert common.known_peak_tflops("TPU v4", "float32") is None
  assert common.known_peak_tflops("cpu", "float32") is None


@pytest.mark.parametrize("backward", [False, True])
def test_analytic_image_tower_flops_match_xla_on_cpu(backward):
  """The accelerator benchmarks' FLOP count (XLA's misses cuBLAS calls there) is XLA's count on CPU,
  within what XLA adds for softmax, LayerNorm and activations."""
  cfg = PRESETS["tiny"]
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, layers=3))
  encoder, params = split(CLIP(cfg, rngs=nnx.Rngs(0)))
  x = jnp.zeros((2, cfg.vision.image_size, cfg.vision.image_size, 3))
  fn = (jax.jit(jax.grad(lambda p, x: encoder.image_features(p, x).sum(), argnums=1)) if backward
        else jax.jit(encoder.image_features))
  counted = common.compiled_flops(fn, params, x)
  analytic = common.image_tower_flops(cfg, 2, backward=backward)
  assert 0.97 * counted <= analytic <= counted, (analytic, counted)


def test_torch_variants_parse_and_refuse_unknown_names():
  assert [v.name for v in torch_reference.parse_variants("all")] == [
      "PyTorch eager", "PyTorch compile", "PyTorch eager bf16", "PyTorch compile bf16"]
  assert torch_reference.parse_variants("compile-bf16") == [torch_reference.Variant("compile", "bf16")]
  assert torch_reference.parse_variants(None) == [torch_reference.Variant("eager", "float32")]  # on CPU
  with pytest.raises(SystemExit, match="eager-fp16"):
    torch_reference.parse_variants("eager,eager-fp16")
  with pytest.raises(ValueError, match="unknown PyTorch variant"):
    torch_reference.Variant("jit", "float32")


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_torch_variants_run_in_their_precision(mode):
  """bf16 autocasts the matmuls (the parameters stay float32); compile goes through torch.compile (here
  with its cheapest backend: inductor's C++ code generation takes minutes on a CPU)."""
  device = torch_reference.device()
  assert device.type == "cpu"
  weight = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 8), dtype=np.float32))

  def product(x):
    return x @ weight

  x = torch.ones(2, 8)
  for precision, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
    variant = torch_reference.Variant(mode, precision, backend="eager")
    wrapped = variant.wrap(product, device)
    assert hasattr(wrapped, "_torchdynamo_orig_callable") == (mode == "compile")
    out = wrapped(x)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.float().numpy(), (x @ weight).numpy(), rtol=2e-2, atol=5e-2)
  assert weight.dtype == torch.float32


def test_batched_torch_mat_step_makes_the_per_caption_loops_captions():
  """The strongest PyTorch reference of `bench train` must attack as the references' loop does: the same
  adversarial caption for every image, from one batched computation; and its step trains. (Its
  torch.compile path is `Variant.wrap`, tested above: dynamo tracing this step takes minutes on a CPU.)"""
  import transformers

  from mat_jax.bench import train as bench_train
  from mat_jax.data import shapes
  from mat_jax.models.weights import clip_config_to_hf

  cfg = PRESETS["tiny"]
  tokenizer = shapes.tokenizer(context_length=cfg.text.context_length)
  cfg = cfg.replace(text=dataclasses.replace(
      cfg.text, vocab_size=max(cfg.text.vocab_size, tokenizer.vocab_size), bos_token_id=tokenizer.start_id,
      eos_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_id))
  torch.manual_seed(0)
  hf = transformers.CLIPModel(transformers.CLIPConfig(**clip_config_to_hf(cfg)))
  batch, meta = bench_train.mat_batch(cfg.vision.image_size, 4, tokenizer, max_targets=6, top_k=10)
  settings = dict(eps=2 / 255, step_size=1 / 255, steps=2, lr=1e-5)
  loop = bench_train.TorchMAT(hf, batch, meta, **settings)
  batched = bench_train.BatchedTorchMAT(hf, batch, meta, variant=torch_reference.Variant("eager", "bf16"),
                                        **settings)
  with torch.no_grad():
    guide = hf.get_image_features(pixel_values=loop._pixels(loop.images)).pooler_output
    ids_loop, mask_loop = loop.text_attack(guide)
    ids_batched, mask_batched = batched.text_attack(guide)
  assert (ids_loop != batched.clean_ids).any(dim=1).sum() >= 2, "too few captions changed to compare"
  np.testing.assert_array_equal(ids_batched.numpy(), ids_loop.numpy())
  np.testing.assert_array_equal(mask_batched.numpy(), mask_loop.numpy())
  before = hf.visual_projection.weight.detach().clone()
  assert np.isfinite(float(batched.step()))
  assert not torch.equal(before, hf.visual_projection.weight)


def test_the_candidate_rate_is_measured_on_captions_the_transform_has_not_seen():
  from mat_jax.bench.data import candidates_images_per_second
  batches = []

  def transform(batch):
    batches.append(batch["captions"].tolist())
    return batch

  rate = candidates_images_per_second(transform, 8, min_seconds=0.0, min_batches=3)
  assert rate > 0 and len(batches) == 4 and all(len(b) == 8 for b in batches)  # a warm-up and 3 timed
  captions = [c for b in batches for c in b]
  assert len(set(captions)) == len(captions)  # every batch misses the transform's caption cache
