"""The benchmarks' shared parts: FLOP counts, device peaks, how the PyTorch references run."""

import copy
import dataclasses
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mat_jax import mesh as mesh_lib
from mat_jax.bench import common, torch_reference
from mat_jax.errors import InputError
from mat_jax.models import CLIP, split
from mat_jax.models.clip import PRESETS


def test_known_peaks_by_device_kind():
  assert common.known_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert common.known_peak_tflops("NVIDIA H200", "float32") == 494.5
  assert common.known_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0  # not the SXM part's 989
  assert common.known_peak_tflops("NVIDIA H100 NVL", "float32") == 417.5
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
  with pytest.raises(InputError, match="eager-fp16"):  # one `error:` line, exit 2
    torch_reference.parse_variants("eager,eager-fp16")
  with pytest.raises(ValueError, match="unknown PyTorch variant"):
    torch_reference.Variant("jit", "float32")
  with pytest.raises(InputError, match="'all' stands alone"):
    torch_reference.parse_variants("all,eager")
  with pytest.raises(InputError, match="eager named twice"):  # the same row timed and printed twice
    torch_reference.parse_variants("eager,compile,eager")


def test_agreement_holds_each_precision_to_its_limits():
  rng = np.random.default_rng(0)
  reference = rng.standard_normal((2, 3, 8, 8))
  near = reference * (1 + 1e-6)
  assert torch_reference.agreement("g", near, reference, reduced=False, signs=True).startswith("g max rel diff")
  bf16_like = reference + 1e-2 * np.abs(reference).max() * rng.uniform(-1, 1, reference.shape)
  torch_reference.agreement("g", bf16_like, reference, reduced=True, signs=True)
  with pytest.raises(common.Disagreement, match="beyond the limits for full precision"):
    torch_reference.agreement("g", bf16_like, reference, reduced=False)
  for wrong in (np.zeros_like(reference), -reference, rng.standard_normal(reference.shape)):
    with pytest.raises(common.Disagreement):
      torch_reference.agreement("g", wrong, reference, reduced=True, signs=True)
  with pytest.raises(common.Disagreement, match="shapes"):
    torch_reference.agreement("g", reference[0], reference, reduced=True)
  assert torch_reference.reduced_precision("bfloat16") and not torch_reference.reduced_precision("float32")  # CPU


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
    assert wrapped.compiled == (mode == "compile")
    out = wrapped(x)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.float().numpy(), (x @ weight).numpy(), rtol=2e-2, atol=5e-2)
  assert weight.dtype == torch.float32


def test_compiled_references_are_compiled_each_as_itself(monkeypatch):
  """Dynamo keeps compiled graphs, and its limit on recompilations (past which it runs the code eagerly),
  per code object: functions compiled through one shared wrapper filled one cache, and on a GPU the
  batched MAT reference's text tower recompiled the wrapper over and over. Each function must get its own
  graphs, and a reference that would fall back to eager must fail instead."""
  import torch._dynamo

  graphs = []

  def counting_backend(graph, example_inputs):
    graphs.append(graph)
    return graph.forward

  torch._dynamo.reset()
  monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
  monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", False)
  device = torch_reference.device()
  variant = torch_reference.Variant("compile", "bf16", backend=counting_backend)

  def double(x):
    return x * 2.0

  def square(x):
    return x * x

  x = torch.ones(2, 8)
  doubled = variant.wrap(double, device)
  np.testing.assert_allclose(doubled(x).float().numpy(), 2.0)
  np.testing.assert_allclose(variant.wrap(square, device)(x).float().numpy(), 1.0)
  assert len(graphs) == 2
  # One function in two variants (compile and compile-bf16 of the same loss), and a bound method.
  float32 = torch_reference.Variant("compile", "float32", backend=counting_backend)
  np.testing.assert_allclose(float32.wrap(double, device)(x).numpy(), 2.0)
  assert len(graphs) == 3
  scale = torch.nn.Linear(8, 8)
  out = float32.wrap(scale.forward, device)(x)
  assert len(graphs) == 4 and torch.allclose(out, scale(x))
  assert torch._dynamo.config.fail_on_recompile_limit_hit
  with pytest.raises(Exception, match="recompile_limit|cache_size_limit"):
    doubled(torch.ones(3, 5, 7))  # a new rank: a recompilation past the limit
  torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny_mat_batch():
  """A random tiny transformers CLIPModel and a 4-image MAT batch with its candidates, as `bench train`
  builds them."""
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
  return hf, batch, meta


def test_batched_torch_mat_step_makes_the_per_caption_loops_captions(tiny_mat_batch):
  """The strongest PyTorch reference of `bench train` must attack as the references' loop does: the same
  adversarial caption for every image, from one batched computation; and its step trains. (Its
  torch.compile path is `Variant.wrap`, tested above: dynamo tracing this step takes minutes on a CPU.)"""
  from mat_jax.bench import train as bench_train

  hf, batch, meta = tiny_mat_batch
  hf = copy.deepcopy(hf)  # the step below trains it
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


def test_utilisation_is_against_the_peak_of_each_rows_precision(monkeypatch):
  """`bench encode` and `bench attacks`: a PyTorch bf16 row is a share of the bf16 peak, a float32 row of
  float32's, whatever mat_jax's --dtype; each dtype's peak is looked up once."""
  table = {"float32": 100.0, "bfloat16": 400.0}
  asked = []

  def peak(dtype="float32"):
    asked.append(dtype)
    return table[dtype], f"table, {dtype}"

  monkeypatch.setattr(common, "peak_gflops", peak)
  variants = torch_reference.parse_variants("eager,eager-bf16,compile-bf16")
  gflops = {"mat_jax": 80.0, "PyTorch eager": 50.0, "PyTorch eager bf16": 200.0, "PyTorch compile bf16": 100.0}
  shares, peaks = common.utilisation(gflops, torch_reference.compute_dtypes("float32", variants))
  assert shares == {"mat_jax": "80.0%", "PyTorch eager": "50.0%", "PyTorch eager bf16": "50.0%",
                    "PyTorch compile bf16": "25.0%"}
  assert sorted(asked) == ["bfloat16", "float32"] and set(peaks) == set(table)
  shares, _ = common.utilisation(gflops, torch_reference.compute_dtypes("bfloat16", variants))
  assert shares["mat_jax"] == "20.0%" and shares["PyTorch eager"] == "50.0%"
  assert "bfloat16 400 GFLOP/s (table, bfloat16)" in common.describe_peaks(peaks)


def test_bench_trains_per_caption_loop_computes_in_mat_jaxs_precision(tiny_mat_batch):
  """With mat_jax in bfloat16 (the default on an accelerator) the references' per-caption loop runs in
  bf16 autocast and its row says so; in float32 it stays float32."""
  from mat_jax.bench import train as bench_train

  hf, batch, meta = tiny_mat_batch
  cpu = torch.device("cpu")
  for dtype, label, features_dtype in (("bfloat16", "PyTorch eager bf16, per-caption loop", torch.bfloat16),
                                       ("float32", "PyTorch eager, per-caption loop", torch.float32)):
    references = bench_train.torch_references(hf, batch, meta, dtype=dtype, device=cpu,
                                              variants=torch_reference.parse_variants("eager"))
    assert list(references) == [label, "PyTorch eager, batched"]
    loop = references[label][0].__self__
    with torch.no_grad():
      assert loop.image_features(loop._pixels(loop.images)).dtype == features_dtype
  with pytest.raises(ValueError, match="float16"):
    torch_reference.for_dtype("float16")


def test_bench_train_prints_mat_jaxs_compile_figures_before_the_references_warm_up(capsys):
  from mat_jax.bench import train as bench_train

  def reference_step():
    print("reference step")
    return 0.0

  seconds = bench_train.time_against_references(
      lambda: jnp.zeros(()), 12.5, {"PyTorch stub": (reference_step, lambda value: value)}, rounds=2,
      where="persistent cache off")
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("mat_jax: first call 12.5 s, then ") and "compiled in 12." in lines[0]
  assert lines[1] == "reference step" and lines[2].startswith("PyTorch stub: first step (warm-up) ")
  assert lines[3:] == ["reference step"] * 2
  assert set(seconds) == {"mat_jax (jit)", "PyTorch stub"}


def test_load_watch_warns_when_the_load_exceeds_the_usable_cores(monkeypatch):
  """Other jobs slow PyTorch's threads more than XLA's: the suites print the load and warn above the cores
  before the run, or above one core more during it (sampled after each interleaved round)."""
  loads = iter([1.2, 1.5, 5.7, 3.0])
  monkeypatch.setattr(os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
  watch = common.LoadWatch(cores=2)  # 1.2 before the run
  common.interleaved_medians({"a": (lambda: 0, lambda v: v)}, rounds=2, seconds=0.0, load=watch)  # 1.5, 5.7
  lines = watch.report()  # 3.0 at the end
  assert lines[0] == "load average (1 min): 1.2 before the run; 5.7 at most during it; 2 usable cores"
  assert lines[1] == ("warning: load average 5.7 on 2 usable cores: PyTorch's threads slow more than XLA's under "
                      "load; ratios are not comparable with a quiet machine's")
  # The benchmark's own threads load up to its cores: 2.8 during a run on 2 cores is its own work.
  loads = iter([1.9, 2.8, 2.8])
  monkeypatch.setattr(os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
  quiet = common.LoadWatch(cores=2)
  quiet.sample()
  assert quiet.report() == ["load average (1 min): 1.9 before the run; 2.8 at most during it; 2 usable cores"]
  monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 0.0, 0.0))  # above the cores before the run: other jobs
  assert common.LoadWatch(cores=2).report()[1].startswith("warning: load average 2.5 on 2 usable cores")


def _compile_args(*argv):
  import argparse

  from mat_jax.bench import compile as bench_compile

  parser = argparse.ArgumentParser()
  bench_compile.add_arguments(parser)
  return parser.parse_args(["--programs", "pgd", *argv])


def test_bench_compile_refuses_a_cache_dir_that_holds_entries(tmp_path, monkeypatch):
  """A filled --cache-dir would serve the cold run from the cache and report a warm compile as cold."""
  from mat_jax.bench import compile as bench_compile

  monkeypatch.setattr(bench_compile, "_worker", lambda *a: pytest.fail("measured with a filled cache"))
  (tmp_path / "jit_pgd-cache").write_bytes(b"entry")
  with pytest.raises(InputError, match="not empty"):
    bench_compile.run(_compile_args("--cache-dir", str(tmp_path)))
  with pytest.raises(InputError, match="not a directory"):
    bench_compile.run(_compile_args("--cache-dir", str(tmp_path / "jit_pgd-cache")))


def test_bench_command_line_errors_are_one_line_and_exit_2(capsys):
  from mat_jax.bench.__main__ import main as bench_main
  for argv, message in ((["compile", "--programs", "foo"], "--programs 'foo': choose one or more of"),
                        (["compile", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
                        (["attacks", "--parts", "nope"], "--parts 'nope': choose one or more of"),
                        (["attacks", "--parts", ""], "--parts '': choose one or more of"),
                        # Used to end in a traceback, after the parts before them had run.
                        (["attacks", "--parts", "sga", "--sga-preset", "nope"],
                         "argument --sga-preset: invalid choice"),
                        (["attacks", "--parts", "bert", "--text-model", "nope"],
                         "argument --text-model: invalid choice"),
                        # Used to be refused after the step was built and compiled (minutes on ViT-B/16).
                        (["train", "--torch", "bogus", "--no-torch"], "--torch 'bogus'"),
                        # Used to stack an empty list of captions: a ValueError traceback after the setup.
                        (["attacks", "--parts", "bert", "--text-captions", "0"],
                         "argument --text-captions: must be at least 1, got 0"),
                        (["attacks", "--seconds", "nan"], "argument --seconds: must be a finite number > 0, got nan"),
                        (["train", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
                        (["data", "--jpeg-size", "-5"], "argument --jpeg-size: must be at least 1, got -5"),
                        # Refused after the world was built and two rows timed (minutes), as a traceback.
                        (["data", "--augmentations", "bogus"], "argument --augmentations: unknown augmentation")):
    try:
      code = bench_main(argv)
    except SystemExit as exit_:  # argparse's own errors
      code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_bench_compile_measures_in_an_empty_cache_dir_and_keeps_the_childrens_environment(tmp_path, monkeypatch,
                                                                                          capsys):
  """The parent only asks which device there is, without JAX's GPU preallocation; the measuring processes
  get the environment as the user set it."""
  from mat_jax.bench import compile as bench_compile

  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "unset by the test")
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
  envs = []

  def fake_run(command, env, **kwargs):
    envs.append(env)
    result = {"pgd": 2.0 if len(envs) == 1 else 0.5, "pgd_cpu": 1.0}
    return subprocess.CompletedProcess(command, 0, stdout=bench_compile._RESULT_PREFIX + json.dumps(result), stderr="")

  monkeypatch.setattr(bench_compile.subprocess, "run", fake_run)
  cache = tmp_path / "cache"
  assert bench_compile.run(_compile_args("--cache-dir", str(cache))) == 0
  assert [env["MAT_JAX_COMPILATION_CACHE"] for env in envs] == [str(cache)] * 2
  assert all("XLA_PYTHON_CLIENT_PREALLOCATE" not in env for env in envs)
  assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert capsys.readouterr().out.splitlines()[-1] == "compile: cold 2.0 s, warm 0.5 s"


def test_bench_compile_cold_only_runs_one_process_and_shows_the_steady_call(tmp_path, monkeypatch, capsys):
  """--cold-only, for sweeping compiler options: one measuring process, its steady call printed beside the
  compile seconds (an option that compiles faster may run slower)."""
  from mat_jax.bench import compile as bench_compile

  commands = []

  def fake_run(command, env, **kwargs):
    commands.append(command)
    result = {"pgd": 2.0, "pgd_cpu": 1.0, "pgd_steady": 0.125}
    return subprocess.CompletedProcess(command, 0, stdout=bench_compile._RESULT_PREFIX + json.dumps(result), stderr="")

  monkeypatch.setattr(bench_compile.subprocess, "run", fake_run)
  assert bench_compile.run(_compile_args("--cold-only", "--cache-dir", str(tmp_path / "cache"))) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(commands) == 1
  assert out[-2].startswith("cold: pgd 2.00 s (1.00 CPU s; steady call 0.125 s)")
  assert out[-1] == "compile: cold 2.0 s"


def test_bench_compile_splits_a_first_call_into_tracing_lowering_and_xla():
  from mat_jax.bench import compile as bench_compile

  details = {}
  program = jax.jit(lambda x: jnp.tanh(x) * 1.75 + jnp.arange(5.0))  # a constant no other test compiles
  seconds = bench_compile._first_minus_steady(lambda: program(jnp.ones(5)), details, "probe")
  assert set(details) == {"probe_cpu", "probe_tracing", "probe_lowering", "probe_xla", "probe_steady", "probe_gc",
                          "probe_gc_full"}
  assert 0 < details["probe_steady"] < seconds
  assert all(details[f"probe_{phase}"] > 0 for phase in ("tracing", "lowering", "xla"))
  # The three phases happen within the first call, whose extra seconds over a steady call they explain.
  assert sum(details[f"probe_{phase}"] for phase in ("tracing", "lowering", "xla")) <= seconds + 0.05
  assert bench_compile._phases(details, "probe").startswith("; tracing ")
  assert "; Python's garbage collector within them " in bench_compile._phases(details, "probe")
  assert bench_compile._phases({"probe": 1.0, "probe_cpu": 1.0}, "probe") == ""


def test_bench_compile_passes_reads_xlas_own_events_from_a_profile_of_the_first_call():
  """--passes: the profiler's events within a first call, XLA's compile among them (XLA:CPU compiles on a
  thread pool of its own), JAX's traced functions left out."""
  from mat_jax.bench import compile as bench_compile

  details = {}
  program = jax.jit(lambda x: jnp.cos(x) * 2.25 - jnp.arange(7.0))  # a constant no other test compiles
  bench_compile._first_minus_steady(lambda: program(jnp.ones(7)), details, "probe", passes=True)
  events = details["probe_passes"]
  assert 0 < len(events) <= bench_compile.HEAVIEST_PASSES
  assert [row[4] for row in events] == sorted((row[4] for row in events), reverse=True)
  assert any("Compile" in name and thread != "python" for name, thread, *_ in events), events
  assert not any(name.startswith(("PjitFunction(", "$")) for name, *_ in events)
  details = {}
  bench_compile._first_minus_steady(lambda: program(jnp.ones(7)), details, "probe")
  assert "probe_passes" not in details


def test_bench_compile_passes_sums_a_pools_threads_into_one_row_within_the_compilation():
  """A pool's threads are one row; only the host's events that start while JAX waits for the compilation
  count: not the first call's run (XLA:CPU's kernels on the host), nor a GPU's kernels."""
  from types import SimpleNamespace as Namespace

  from mat_jax.bench import compile as bench_compile

  def event(name, seconds, start=1.0):
    return Namespace(name=name, start_ns=int(start * 1e9), duration_ns=int(seconds * 1e9))

  profile = Namespace(planes=[Namespace(name="/host:CPU", lines=[
      Namespace(name="python", events=[event("backend_compile_and_load", 5.0), event("PjitFunction(add)", 9.0),
                                       event("priority-fusion", 1.5), event("priority-fusion", 0.5, start=3.0)]),
      Namespace(name="tf_/-8821", events=[event("PTX->CUBIN", 1.25)]),
      Namespace(name="tf_/1734", events=[event("PTX->CUBIN", 1.5), event("ThreadpoolListener::Record", 7.0)]),
      Namespace(name="futex-default-SDomainT/6161", events=[event("XLA::TPU emitting for fusion.9", 3.0)]),
      Namespace(name="tf_XLAEigen/77", events=[event("while.5", 8.0, start=6.5)])]),
      Namespace(name="/device:GPU:0", lines=[Namespace(name="Stream #14", events=[event("loop_add_fusion", 9.0)])])])
  assert bench_compile._longest_events(profile) == [
      ["backend_compile_and_load", "python", 1, 1, 5.0], ["XLA::TPU emitting for fusion.9", "futex-default-SDomainT", 1,
                                                          1, 3.0],
      ["PTX->CUBIN", "unnamed pool", 2, 2, 2.75], ["priority-fusion", "python", 1, 2, 2.0]]


def test_bench_compile_passes_asks_the_measuring_process_and_prints_its_events(tmp_path, monkeypatch, capsys):
  from mat_jax.bench import compile as bench_compile

  commands = []

  def fake_run(command, env, **kwargs):
    commands.append(command)
    result = {"pgd": 2.0, "pgd_cpu": 1.0, "pgd_passes": [["priority-fusion", "python", 1, 13, 1.36]]}
    return subprocess.CompletedProcess(command, 0, stdout=bench_compile._RESULT_PREFIX + json.dumps(result), stderr="")

  monkeypatch.setattr(bench_compile.subprocess, "run", fake_run)
  assert bench_compile.run(_compile_args("--cold-only", "--passes", "--cache-dir", str(tmp_path / "cache"))) == 0
  out = capsys.readouterr().out
  assert "--passes" in commands[0]
  assert "pgd, cold: the 1 longest events XLA recorded in its first call's compilation" in out
  assert "priority-fusion" in out and "1.36" in out


def test_bench_compile_times_the_garbage_collectors_passes_within_a_first_call():
  import gc

  from mat_jax.bench import compile as bench_compile

  first = iter([True])

  def call():
    if next(first, False):
      gc.collect()  # a full pass, as tracing triggers them
    return jnp.ones(3)

  details = {}
  bench_compile._first_minus_steady(call, details, "probe")
  assert details["probe_gc_full"] >= 1 and details["probe_gc"] > 0
  assert gc.collect not in gc.callbacks and len(gc.callbacks) == len(set(map(id, gc.callbacks)))


def test_bench_train_counts_the_steps_flops_on_the_cpu_lowering_where_the_device_counts_none(tiny_mat_batch):
  """On a GPU XLA's cost analysis counts no FLOPs for the step (cuBLAS and cuDNN custom calls), so `bench
  train` counts them on the step lowered for the CPU, abstractly. On a CPU that must be the step's own
  count; an encoder asking for cuDNN attention (the GPU's bf16 path, which cannot lower for a CPU) is
  counted through the einsum path, the same FLOPs."""
  from mat_jax.bench import train as bench_train
  from mat_jax.data import shapes

  _, batch, meta = tiny_mat_batch
  cfg = PRESETS["tiny"]
  tokenizer = shapes.tokenizer(context_length=cfg.text.context_length)
  cfg = cfg.replace(text=dataclasses.replace(
      cfg.text, vocab_size=max(cfg.text.vocab_size, tokenizer.vocab_size), bos_token_id=tokenizer.start_id,
      eos_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_id))
  encoder, params = split(CLIP(cfg, rngs=nnx.Rngs(0)))
  step, state, mesh = bench_train.mat_train_step(encoder, params, meta)
  direct = sum(bench_train._flops(lowered.cost_analysis())
               for lowered in step.lower(state, mesh_lib.global_batch(batch, mesh), None))
  assert direct > 1e6
  assert bench_train.host_lowered_flops(encoder, params, meta, batch) == direct
  cudnn_cfg = cfg.replace(attention="cudnn")
  cudnn_encoder, _ = split(CLIP(cudnn_cfg, rngs=nnx.Rngs(0)))
  assert bench_train.host_lowered_flops(cudnn_encoder, params, meta, batch) == direct


def test_train_bench_reports_the_compiled_steps_memory():
  from mat_jax.bench import train as train_bench

  compiled = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0)).lower(jnp.ones((512, 256))).compile()
  summary = train_bench.memory_summary(compiled)
  # The (512, 512) product is a 1 MiB temporary; the argument 0.5 MiB, the output 2 KiB.
  assert summary.startswith("compiled step's memory: 1.0 MiB temporaries"), summary
  assert "0.5 MiB arguments, 0.0 MiB outputs" in summary, summary


def test_bench_compile_passes_the_models_options_to_the_measuring_process(tmp_path, monkeypatch, capsys):
  from mat_jax.bench import compile as bench_compile

  commands = []

  def fake_run(command, env, **kwargs):
    commands.append(command)
    return subprocess.CompletedProcess(command, 0, stdout=bench_compile._RESULT_PREFIX + json.dumps(
        {"pgd": 2.0, "pgd_cpu": 1.0}), stderr="")

  monkeypatch.setattr(bench_compile.subprocess, "run", fake_run)
  args = _compile_args("--cold-only", "--scan-layers", "--remat", "dots_saveable", "--cache-dir", str(tmp_path / "c"))
  assert bench_compile.run(args) == 0
  assert commands[0][-3:] == ["--scan-layers", "--remat", "dots_saveable"]
  assert " with scan_layers, remat dots_saveable, batch " in capsys.readouterr().out.splitlines()[0]


def test_bench_compile_counts_programs_compiled_at_once_by_their_wall_seconds():
  # The MAT step's programs compile on threads at once: a phase's seconds are its events' joined
  # time spans, not their sum.
  from mat_jax.bench import compile as compile_bench

  assert compile_bench._joined_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.75)]) == 4.0
  assert compile_bench._joined_seconds([]) == 0.0


def test_a_timed_train_step_waits_for_its_last_program():
  """`bench train` and `bench compile` time the step until its new state is ready: the optimizer's update,
  dispatched after the program that makes the metrics, would otherwise run on after the clock stopped."""
  from mat_jax.bench import train as bench_train

  @jax.jit
  def slow_update(state):  # a program that runs long after the metrics are ready
    return jax.lax.fori_loop(0, 200, lambda _, w: jnp.tanh(w @ w), state)

  def step(state, batch, reference):
    metrics = {"loss": jnp.sum(batch["x"])}
    return slow_update(state), metrics

  call = bench_train.step_call(step, jnp.eye(256) * 0.5, {"x": jnp.ones(3)})
  state, metrics = common.block(call())
  assert state.is_ready() and metrics["loss"].is_ready()
  state, _ = common.block(call())  # the next call starts from the state the last one made
  assert state.is_ready()
