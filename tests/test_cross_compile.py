"""Programs built for another backend (`runtime.building_for`) and compiled for an NVIDIA GPU or a TPU on a
host without one (`bench.cross_compile`, `bench compile --target`).

The choices that follow the backend are checked on the CPU. The compilation itself needs JAX's CUDA plugin
or libtpu (`pip install -e '.[gpu-compile,tpu-compile]'`; .ci/run installs them in a venv of their own and
runs this file there); without them, those tests are skipped and the error that names the install is
checked instead.
"""

import importlib.util
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mat_jax import runtime
from mat_jax.attacks import image as image_attacks
from mat_jax.attacks import text as text_attacks
from mat_jax.bench import cross_compile
from mat_jax.errors import InputError
from mat_jax.models import CLIP, layers, split
from mat_jax.models.clip import PRESETS, feature_products, resolve_dtype
from mat_jax.training import step as step_lib

CUDA_PLUGIN = (importlib.util.find_spec("jax_plugins") is not None
               and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)
needs_plugin = pytest.mark.skipif(not CUDA_PLUGIN, reason="JAX's CUDA plugin is not installed (the gpu-compile extra)")
LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed (the tpu-compile extra)")


def _choices() -> dict:
  product = jax.make_jaxpr(lambda a, b: feature_products("ij,kj->ik", a, b))(jnp.ones((2, 3)), jnp.ones((2, 3)))
  return {"backend": runtime.program_backend(), "dtype": resolve_dtype("auto"),
          "attention": layers.attention_path("auto", jnp.bfloat16), "chunk": text_attacks.default_chunk_size(24),
          "skip_with_conditional": step_lib._skip_with_conditional(),
          "highest_precision_products": "HIGHEST" in str(product)}


def test_programs_built_for_a_gpu_make_a_gpus_choices_on_the_cpu():
  on_cpu = {"backend": "cpu", "dtype": "float32", "attention": "einsum", "chunk": 1024 // 24,
            "skip_with_conditional": True, "highest_precision_products": False}
  assert _choices() == on_cpu
  with runtime.building_for("gpu"):
    assert _choices() == {"backend": "gpu", "dtype": "bfloat16", "attention": "cudnn", "chunk": 32768 // 24 // 8 * 8,
                          "skip_with_conditional": False, "highest_precision_products": True}
    # Only the building thread: a step compiled ahead on another thread keeps this process's backend.
    seen = []
    thread = threading.Thread(target=lambda: seen.append(runtime.program_backend()))
    thread.start()
    thread.join()
    assert seen == ["cpu"]
  with runtime.building_for("tpu"):  # no cuDNN there: XLA's attention
    assert _choices() == {"backend": "tpu", "dtype": "bfloat16", "attention": "xla", "chunk": 32768 // 24 // 8 * 8,
                          "skip_with_conditional": False, "highest_precision_products": True}
  assert _choices() == on_cpu


def test_building_for_an_unknown_backend_is_refused():
  with pytest.raises(ValueError, match="choose cpu, gpu or tpu"):
    with runtime.building_for("cuda"):
      pass
  assert runtime.program_backend() == "cpu"


def test_each_target_describes_its_gpu_to_xla():
  config = cross_compile.target_config(cross_compile.TARGETS["h100"])
  assert "core_count: 132" in config and "cuda_compute_capability { major: 9 minor: 0 }" in config
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in config
  assert "cuda_compute_capability { major: 8 minor: 0 }" in cross_compile.target_config(cross_compile.TARGETS["a100"])
  with pytest.raises(InputError, match="choose one of a100, h100, h200, tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e"):
    cross_compile.compile_only_devices("v100")
  assert [cross_compile.backend(name) for name in ("a100", "tpu-v5e")] == ["gpu", "tpu"]


def test_a_compiling_process_starts_no_accelerator_and_tells_libtpu_where_it_is():
  environ = {"JAX_PLATFORMS": "cpu,cuda"}
  cross_compile.prepare_environment("h100", environ)
  assert environ == {"JAX_PLATFORMS": "cpu,cuda"}  # the user's choice stays
  environ = {}
  cross_compile.prepare_environment("tpu-v5e", environ)
  assert environ == {"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost",
                     "TPU_ACCELERATOR_TYPE": "v5litepod-4", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@pytest.mark.skipif(LIBTPU, reason="libtpu is installed: the error for its absence cannot happen")
def test_a_tpu_target_without_libtpu_names_the_install():
  with pytest.raises(InputError, match=r"pip install -e '\.\[tpu-compile\]'"):
    cross_compile.compile_only_devices("tpu-v5e")


@pytest.mark.skipif(CUDA_PLUGIN, reason="the CUDA plugin is installed: the error for its absence cannot happen")
def test_a_target_without_the_cuda_plugin_names_the_install(capsys):
  from mat_jax.bench.__main__ import main as bench_main

  with pytest.raises(InputError, match=r"pip install -e '\.\[gpu-compile\]'"):
    cross_compile.compile_only_devices("h100")
  assert bench_main(["compile", "--target", "h100", "--preset", "tiny"]) == 2
  err = capsys.readouterr().err
  assert "--target h100: cannot create a compile-only NVIDIA H100" in err and "Traceback" not in err


def test_a_target_compiles_only_the_one_call_programs(capsys):
  from mat_jax.bench.__main__ import main as bench_main

  assert bench_main(["compile", "--target", "h100", "--programs", "sga"]) == 2
  assert "with --target, SGA (several programs with host work between them)" in capsys.readouterr().err


def _pgd_compiled_for(target: str) -> str:
  """The tiny CLIP's PGD built for `target`'s backend and compiled for it here: the optimised module."""
  (device,) = cross_compile.compile_only_devices(target)
  mesh = jax.sharding.Mesh(np.asarray([device]), ("data",))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with runtime.building_for(cross_compile.backend(target)):
    cfg = PRESETS["tiny"].replace(dtype=resolve_dtype("auto"))
    encoder, params = split(nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0))))
    size, length = cfg.vision.image_size, cfg.text.context_length
    attack = jax.jit(lambda p, x, ids, mask, key: image_attacks.pgd_attack(
        encoder, p, x, ids, mask, key, eps=2 / 255, step_size=0.5 / 255, steps=3))
    lowered = attack.lower(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), params),
        jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32, sharding=whole),
        jax.ShapeDtypeStruct((2, length), jnp.int32, sharding=whole),
        jax.ShapeDtypeStruct((2, length), jnp.int32, sharding=whole),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=whole))
  return lowered.compile().as_text()


@needs_plugin
def test_pgd_compiles_for_an_h100_as_the_gpu_runs_it():
  """cuDNN's fused attention, bfloat16 matmuls."""
  compiled = _pgd_compiled_for("h100")
  assert "__cudnn$fmha" in compiled and "bf16[" in compiled


@needs_libtpu
def test_pgd_compiles_for_a_tpu_as_the_tpu_runs_it():
  """XLA's attention (no cuDNN on a TPU), bfloat16 matmuls."""
  compiled = _pgd_compiled_for("tpu-v5e")
  assert "cudnn" not in compiled and "bf16[" in compiled


@needs_plugin
def test_an_even_cudnn_length_multiple_takes_the_padding_out_of_the_attack_step(monkeypatch):
  """The tiny CLIP's image tower runs 10 tokens: padded to 64 around every cuDNN attention by default, not
  with MAT_JAX_CUDNN_LENGTH_MULTIPLE=2, where only the last block's one query (the pooled row) is padded,
  to 2."""
  kinds = {}
  for multiple in ("64", "2"):
    monkeypatch.setenv("MAT_JAX_CUDNN_LENGTH_MULTIPLE", multiple)
    jax.clear_caches()  # the encoder's jitted functions keep their traces
    kinds[multiple] = {g.kind: g for g in cross_compile.loop_traffic(_pgd_compiled_for("h100"))}
  jax.clear_caches()
  def copied(kinds):
    return sum(kinds[kind].bytes for kind in ("padding", "slicing") if kind in kinds)
  assert {"attention (cuDNN)", "padding", "slicing"} <= set(kinds["64"])
  assert copied(kinds["2"]) * 50 < copied(kinds["64"])
  assert kinds["2"]["attention (cuDNN)"].kernels == kinds["64"]["attention (cuDNN)"].kernels
  assert kinds["2"]["attention (cuDNN)"].bytes < kinds["64"]["attention (cuDNN)"].bytes


# An optimized XLA:GPU module, cut down: a loop whose body launches a padding, a cuDNN attention, a Triton
# matmul, an elementwise fusion and a copy, runs an inner loop three times (a scanned block: a slice read
# out of a stacked array, a fusion that reads one slice of it, an update written into it in place) and a
# conditional, and reads loop-carried values; a copy outside the loops, and a lighter loop beside the first.
_OPTIMIZED_MODULE = """HloModule jit_attack, is_scheduled=true

%fused (param_0: bf16[4,10]) -> bf16[4,16] {
  %param_0 = bf16[4,10]{1,0} parameter(0)
  %constant = bf16[] constant(0)
  ROOT %pad = bf16[4,16]{1,0} pad(%param_0, %constant), padding=0_0x0_6
}

%fused_update (param_0: f32[3,8,8], param_1: f32[1,8,8], param_2: s32[]) -> f32[3,8,8] {
  %param_0 = f32[3,8,8]{2,1,0} parameter(0)
  %param_1 = f32[1,8,8]{2,1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  ROOT %dus = f32[3,8,8]{2,1,0} dynamic-update-slice(%param_0, %param_1, %param_2, %param_2, %param_2)
}

%fused_sliced_add (param_0: f32[3,8,8], param_1: s32[]) -> f32[1,8,8] {
  %param_0 = f32[3,8,8]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %ds = f32[1,8,8]{2,1,0} dynamic-slice(%param_0, %param_1, %param_1, %param_1), dynamic_slice_sizes={1,8,8}
  ROOT %add = f32[1,8,8]{2,1,0} add(%ds, %ds)
}

%inner (arg: (s32[], f32[3,8,8], f32[8,8])) -> (s32[], f32[3,8,8], f32[8,8]) {
  %arg = (s32[], f32[3,8,8]{2,1,0}, f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %stack = f32[3,8,8]{2,1,0} get-tuple-element(%arg), index=1
  %m = f32[8,8]{1,0} get-tuple-element(%arg), index=2
  %dynamic_slice = f32[1,8,8]{2,1,0} dynamic-slice(%stack, %i, %i, %i), dynamic_slice_sizes={1,8,8}
  %loop_add_fusion = f32[1,8,8]{2,1,0} fusion(%stack, %i), kind=kLoop, calls=%fused_sliced_add
  %loop_dynamic_update_slice_fusion = f32[3,8,8]{2,1,0} fusion(%stack, %loop_add_fusion, %i), kind=kLoop, \
calls=%fused_update
  ROOT %out = (s32[], f32[3,8,8]{2,1,0}, f32[8,8]{1,0}) tuple(%i, %loop_dynamic_update_slice_fusion, %m)
}

%light (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8]{1,0} parameter(0)
  ROOT %copy = f32[8,8]{1,0} copy(%x)
}

%heavy (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8]{1,0} parameter(0)
  %copy = f32[8,8]{1,0} copy(%x)
  ROOT %copy2 = f32[8,8]{1,0} copy(%copy)
}

%body (arg: (s32[], bf16[4,10], f32[8,8], f32[3,8,8])) -> (s32[], bf16[4,10], f32[8,8], f32[3,8,8]) {
  %arg = (s32[], bf16[4,10]{1,0}, f32[8,8]{1,0}, f32[3,8,8]{2,1,0}) parameter(0)
  %x = bf16[4,10]{1,0} get-tuple-element(%arg), index=1
  %w = f32[8,8]{1,0} get-tuple-element(%arg), index=2
  %stack = f32[3,8,8]{2,1,0} get-tuple-element(%arg), index=3
  %loop_pad_fusion = bf16[4,16]{1,0} fusion(%x), kind=kLoop, calls=%fused
  %attn = (bf16[4,16]{1,0}, u8[0]{0}) custom-call(%loop_pad_fusion, %loop_pad_fusion), \
custom_call_target="__cudnn$fmhaSoftmax"
  %gemm_fusion_dot = f32[8,8]{1,0} fusion(%w, %w), kind=kCustom, calls=%fused, \
backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %loop_add_fusion = f32[8,8]{1,0} fusion(%gemm_fusion_dot, %w), kind=kLoop, calls=%fused
  %copy = f32[8,8]{1,0} copy(%loop_add_fusion)
  %i = s32[] get-tuple-element(%arg), index=0
  %scan = (s32[], f32[3,8,8]{2,1,0}, f32[8,8]{1,0}) tuple(%i, %stack, %copy)
  %while = (s32[], f32[3,8,8]{2,1,0}, f32[8,8]{1,0}) while(%scan), condition=%cond, body=%inner, \
backend_config={"known_trip_count":{"n":"3"}}
  %p = pred[] constant(true)
  %branch = f32[8,8]{1,0} conditional(%p, %w, %w), true_computation=%light, false_computation=%heavy
  ROOT %out = (s32[], bf16[4,10]{1,0}, f32[8,8]{1,0}, f32[3,8,8]{2,1,0}) tuple(%i, %x, %branch, %stack)
}

%beside (arg: (s32[], bf16[4,10], f32[8,8], f32[3,8,8])) -> (s32[], bf16[4,10], f32[8,8], f32[3,8,8]) {
  %arg = (s32[], bf16[4,10]{1,0}, f32[8,8]{1,0}, f32[3,8,8]{2,1,0}) parameter(0)
  %x = bf16[4,10]{1,0} get-tuple-element(%arg), index=1
  %loop_pad_fusion = bf16[4,16]{1,0} fusion(%x), kind=kLoop, calls=%fused
  ROOT %out = (s32[], bf16[4,10]{1,0}, f32[8,8]{1,0}, f32[3,8,8]{2,1,0}) tuple(%arg)
}

%cond (arg: (s32[], bf16[4,10], f32[8,8], f32[3,8,8])) -> pred[] {
  %arg = (s32[], bf16[4,10]{1,0}, f32[8,8]{1,0}, f32[3,8,8]{2,1,0}) parameter(0)
  ROOT %t = pred[] constant(true)
}

ENTRY %main (p: (s32[], bf16[4,10], f32[8,8], f32[3,8,8])) -> (s32[], bf16[4,10], f32[8,8], f32[3,8,8]) {
  %p = (s32[], bf16[4,10]{1,0}, f32[8,8]{1,0}, f32[3,8,8]{2,1,0}) parameter(0)
  %entry_copy = (s32[], bf16[4,10]{1,0}, f32[8,8]{1,0}, f32[3,8,8]{2,1,0}) copy(%p)
  %first = (s32[], bf16[4,10]{1,0}, f32[8,8]{1,0}, f32[3,8,8]{2,1,0}) while(%p), condition=%cond, body=%beside
  ROOT %while = (s32[], bf16[4,10]{1,0}, f32[8,8]{1,0}, f32[3,8,8]{2,1,0}) while(%entry_copy), condition=%cond, \
body=%body
}
"""


def test_tpu_fusions_around_a_matmul_and_asynchronous_copies_are_named():
  """XLA:TPU copies and slices operands into the core's on-chip memory (S(1) in a layout) asynchronously:
  those moves read main memory only, and a kernel reading or writing on-chip memory moves no main-memory
  bytes for it. A buffer's allocation moves nothing and is left out."""
  module = """HloModule jit_step, is_scheduled=true

%sliced (p: bf16[4,128]) -> bf16[1,128] {
  %p = bf16[4,128]{1,0} parameter(0)
  ROOT %s = bf16[1,128]{1,0} slice(%p), slice={[0:1], [0:128]}
}

ENTRY %main (a: bf16[8,128], b: bf16[128,128], c: bf16[4,128]) -> (bf16[8,128], bf16[1,128]) {
  %a = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  %b = bf16[128,128]{1,0:T(8,128)(2,1)} parameter(1)
  %c = bf16[4,128]{1,0:T(8,128)(2,1)} parameter(2)
  %copy-start = (bf16[128,128]{1,0:T(8,128)(2,1)S(1)}, bf16[128,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) \
copy-start(%b)
  %copy-done = bf16[128,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %slice-start = ((bf16[4,128]{1,0:T(8,128)(2,1)}), bf16[1,128]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) \
async-start(%c), calls=%sliced
  %slice-done = bf16[1,128]{1,0:T(8,128)(2,1)S(1)} async-done(%slice-start)
  %buffer = bf16[64,128]{1,0:T(8,128)(2,1)} custom-call(), custom_call_target="AllocateBuffer"
  %fusion = bf16[8,128]{1,0:T(8,128)(2,1)} fusion(%a, %copy-done), kind=kOutput, calls=%fused
  ROOT %out = (bf16[8,128]{1,0:T(8,128)(2,1)}, bf16[1,128]{1,0:T(8,128)(2,1)S(1)}) tuple(%fusion, %slice-done)
}
"""
  groups = {g.kind: (g.kernels, g.bytes) for g in cross_compile.loop_traffic(module)}
  assert groups == {"copies": (1, 128 * 128 * 2),      # read into on-chip memory: main memory read once
                    "slicing": (1, 1 * 128 * 2),       # only its slice read
                    "matmuls (TPU fusions)": (1, 2 * 8 * 128 * 2)}  # its on-chip operand moves nothing


def test_a_nested_fusion_that_slices_an_operand_reads_only_its_slice():
  """XLA:TPU nests fusions: a stacked operand handed to an inner fusion that slices it counts by the slice."""
  module = """HloModule jit_block

%slice (p0: bf16[3,128,128], p1: s32[]) -> bf16[1,128,128] {
  %p0 = bf16[3,128,128]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %ds = bf16[1,128,128]{2,1,0} dynamic-slice(%p0, %p1, %p1, %p1), dynamic_slice_sizes={1,128,128}
}

%block (param_0: bf16[3,128,128], param_1: s32[], param_2: bf16[8,128]) -> bf16[8,128] {
  %param_0 = bf16[3,128,128]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %param_2 = bf16[8,128]{1,0} parameter(2)
  %fusion.1 = bf16[1,128,128]{2,1,0} fusion(%param_0, %param_1), kind=kLoop, calls=%slice
  %bitcast = bf16[128,128]{1,0} bitcast(%fusion.1)
  ROOT %dot = bf16[8,128]{1,0} dot(%param_2, %bitcast), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (stack: bf16[3,128,128], i: s32[], a: bf16[8,128]) -> bf16[8,128] {
  %stack = bf16[3,128,128]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %a = bf16[8,128]{1,0} parameter(2)
  ROOT %fusion = bf16[8,128]{1,0} fusion(%stack, %i, %a), kind=kOutput, calls=%block
}
"""
  (group,) = cross_compile.loop_traffic(module)
  assert (group.kind, group.kernels, group.bytes) == ("matmuls (TPU fusions)", 1, 8 * 128 * 2 + 128 * 128 * 2 + 4
                                                      + 8 * 128 * 2)


def test_a_loop_without_a_recorded_trip_count_runs_as_its_condition_says():
  """XLA:TPU records no trip count: a scan's loop runs while its counter is below a constant; a loop whose
  bound is data runs once as far as the count goes."""
  module = """HloModule jit_scan

%body (arg: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %arg = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[8,8]{1,0} get-tuple-element(%arg), index=1
  %copy = f32[8,8]{1,0} copy(%x)
  ROOT %out = (s32[], f32[8,8]{1,0}) tuple(%i, %copy)
}

%below_five (arg: (s32[], f32[8,8])) -> pred[] {
  %five = s32[]{:T(128)} constant(5)
  %arg = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %five), direction=LT
}

%below_data (arg: (s32[], f32[8,8])) -> pred[] {
  %arg = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  ROOT %lt = pred[] compare(%i, %i), direction=LT
}

%outer (arg: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %arg = (s32[], f32[8,8]{1,0}) parameter(0)
  %scan = (s32[], f32[8,8]{1,0}) while(%arg), condition=%below_five, body=%body
  ROOT %until = (s32[], f32[8,8]{1,0}) while(%scan), condition=%below_data, body=%body
}

ENTRY %main (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  ROOT %steps = (s32[], f32[8,8]{1,0}) while(%p), condition=%below_data, body=%outer
}
"""
  assert [(g.kind, g.kernels, g.bytes) for g in cross_compile.loop_traffic(module)] == [("copies", 6, 6 * 2 * 256)]


def test_loop_traffic_counts_one_iterations_kernels_by_kind():
  groups = {g.kind: (g.kernels, g.bytes) for g in cross_compile.loop_traffic(_OPTIMIZED_MODULE)}
  pad, square = 4 * 16 * 2, 8 * 8 * 4
  assert groups == {
      "padding": (1, 4 * 10 * 2 + pad),
      "attention (cuDNN)": (1, pad + 2 * pad),  # its result, then its two operands
      "matmuls (Triton)": (1, 3 * square),
      # the body's, then three times one that reads a slice of the stack only (and the index)
      "elementwise": (4, 3 * square + 3 * (square + 4 + square)),
      # the body's copy, then the heavier branch's two: the lighter branch and the entry's copy not counted
      "copies": (3, 3 * 2 * square),
      # three times: the slice read and written, and the update (and the index) read and written in place
      "dynamic slicing": (6, 3 * (2 * square + 2 * square + 4)),
  }  # the lighter loop beside it not counted
  assert [g.kind for g in cross_compile.loop_traffic(_OPTIMIZED_MODULE)][0] == "dynamic slicing"
  # The whole program: the entry's copy once, the lighter loop's padding and the heavier loop, once each.
  program = {g.kind: (g.kernels, g.bytes) for g in cross_compile.loop_traffic(_OPTIMIZED_MODULE, whole_program=True)}
  entry_copy = 2 * (4 + 4 * 10 * 2 + square + 3 * square)
  assert program == dict(groups, padding=(2, 2 * (4 * 10 * 2 + pad)), copies=(4, 3 * 2 * square + entry_copy))


def test_the_heaviest_loop_of_several_programs_is_one_that_loops():
  # The MAT step's programs: an attack's loop, a heavier attack's loop, and the gradient's program, which has
  # none (its "loop" is the whole program) and moves the most bytes of all.
  group = cross_compile.KernelGroup
  loops = [[group("elementwise", 3, 10)], [group("elementwise", 2, 30)], [group("reductions", 90, 500)]]
  wholes = [[group("elementwise", 30, 100)], [group("elementwise", 20, 300)], [group("reductions", 90, 500)]]
  assert cross_compile.heaviest_loop(loops, wholes) == 1
  assert cross_compile.heaviest_loop(loops[2:], wholes[2:]) == 0  # no program loops: the heaviest program


def test_kernels_group_by_what_they_compute():
  """The JAX operation a kernel's metadata names (backward inside a transposed computation) and its result
  tell kernels of one kind apart; the groups of each kind add up to the kind's."""
  module = """HloModule jit_step

%added (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  ROOT %add = f32[8,8]{1,0} add(%p0, %p1)
}

ENTRY %main (a: f32[8,8], b: f32[8,8]) -> f32[8,8] {
  %a = f32[8,8]{1,0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %bias = f32[8,8]{1,0} fusion(%a, %b), kind=kLoop, calls=%added, metadata={op_name="jit(step)/jvp(block)/add"}
  %again = f32[8,8]{1,0} fusion(%bias, %b), kind=kLoop, calls=%added, metadata={op_name="jit(step)/jvp(block)/add"}
  %grad = f32[8,8]{1,0} fusion(%again, %a), kind=kLoop, calls=%added, \
metadata={op_name="jit(step)/transpose(jvp(block))/add_any" scheduling_name="grad"}
  ROOT %copy = f32[8,8]{1,0} copy(%grad)
}
"""
  square = 8 * 8 * 4
  groups = [(g.source, g.kind, g.kernels, g.bytes) for g in cross_compile.loop_traffic(module, by_source=True)]
  assert groups == [("add f32[8,8]", "elementwise", 2, 2 * 3 * square),
                    ("backward add_any f32[8,8]", "elementwise", 1, 3 * square),
                    ("(no operation named) f32[8,8]", "copies", 1, 2 * square)]
  by_kind = {g.kind: (g.kernels, g.bytes) for g in cross_compile.loop_traffic(_OPTIMIZED_MODULE)}
  summed: dict[str, list[int]] = {}
  for g in cross_compile.loop_traffic(_OPTIMIZED_MODULE, by_source=True):
    total = summed.setdefault(g.kind, [0, 0])
    total[0] += g.kernels
    total[1] += g.bytes
  assert {kind: tuple(total) for kind, total in summed.items()} == by_kind


def test_unfused_work_static_slices_and_updates_that_are_not_results():
  """Every instruction but bookkeeping launches a kernel (XLA:TPU leaves reshapes that re-tile unfused); a
  fusion reads only the static slice it takes of an operand; an update in place reads nothing of its operand
  only when it is the fusion's result; a TPU's buffers joined by a bitcast move nothing; a GPU's asynchronous
  work on another stream counts as the kernels it runs."""
  module = """HloModule jit_step

%half (p0: bf16[8,256]) -> bf16[8,128] {
  %p0 = bf16[8,256]{1,0} parameter(0)
  ROOT %s = bf16[8,128]{1,0} slice(%p0), slice={[0:8], [0:128]}
}

%updated_then_summed (p0: f32[64,64], p1: f32[1,64], p2: s32[]) -> f32[64] {
  %p0 = f32[64,64]{1,0} parameter(0)
  %p1 = f32[1,64]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %dus = f32[64,64]{1,0} dynamic-update-slice(%p0, %p1, %p2, %p2)
  %zero = f32[] constant(0)
  ROOT %sum = f32[64]{0} reduce(%dus, %zero), dimensions={0}, to_apply=%half
}

%negated (q: bf16[8,128]) -> bf16[8,128] {
  %q = bf16[8,128]{1,0} parameter(0)
  ROOT %n = bf16[8,128]{1,0} negate(%q)
}

%on_another_stream (r: bf16[8,128]) -> bf16[8,128] {
  %r = bf16[8,128]{1,0} parameter(0)
  ROOT %f = bf16[8,128]{1,0} fusion(%r), kind=kLoop, calls=%negated
}

ENTRY %main (a: bf16[8,256], b: f32[64,64], c: f32[1,64], i: s32[]) -> (bf16[2,4,128], f32[64], bf16[8,128]) {
  %a = bf16[8,256]{1,0} parameter(0)
  %b = f32[64,64]{1,0} parameter(1)
  %c = f32[1,64]{1,0} parameter(2)
  %i = s32[] parameter(3)
  %sliced = bf16[8,128]{1,0} fusion(%a), kind=kLoop, calls=%half
  %retiled = bf16[2,4,128]{2,1,0} reshape(%sliced)
  %summed = f32[64]{0} fusion(%b, %c, %i), kind=kInput, calls=%updated_then_summed
  %joined = bf16[8,128]{1,0} custom-call(%sliced), custom_call_target="ConcatBitcast"
  %start = ((bf16[8,128]{1,0}), bf16[8,128]{1,0}, s32[]) async-start(%joined), calls=%on_another_stream
  %done = bf16[8,128]{1,0} async-done(%start)
  ROOT %out = (bf16[2,4,128]{2,1,0}, f32[64]{0}, bf16[8,128]{1,0}) tuple(%retiled, %summed, %done)
}
"""
  half, square = 8 * 128 * 2, 64 * 64 * 4
  groups = {g.kind: (g.kernels, g.bytes) for g in cross_compile.loop_traffic(module)}
  assert groups == {"elementwise": (2, 2 * half + 2 * half),          # the slice's half read and written; the
                    "copies": (1, 2 * half),                          # negation on another stream
                    "reductions": (1, square + 64 * 4 + 4 + 64 * 4)}  # the updated operand read whole


def test_a_library_calls_workspace_is_not_counted():
  """cuBLAS's result tuple ends with 4 MiB of scratch space: the call moves its operands and its product."""
  module = """HloModule jit_step

ENTRY %main (a: bf16[8,8], b: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  %gemm = (bf16[8,8]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", \
metadata={op_name="jit(step)/dot_general"}
  ROOT %product = bf16[8,8]{1,0} get-tuple-element(%gemm), index=0
}
"""
  groups = [(g.source, g.kind, g.kernels, g.bytes) for g in cross_compile.loop_traffic(module, by_source=True)]
  assert groups == [("dot_general bf16[8,8]", "matmuls (cuBLAS)", 1, 3 * 8 * 8 * 2)]


def test_the_final_module_is_read_from_xlas_dump_by_the_programs_name(tmp_path):
  """On a TPU `as_text()` is not the module the chip runs: `bench compile --kernels` reads the one XLA
  wrote (`dump_flags`), found by the program's name, and keeps `as_text()` when XLA wrote none."""
  as_text = "HloModule jit_pgd_attack, is_scheduled=true\n"
  assert cross_compile.final_module(tmp_path, as_text) == as_text
  (tmp_path / "module_0003.jit_pgd_attack.cl_1.after_optimizations.txt").write_text("the final module")
  (tmp_path / "module_0003.jit_pgd_attack.cl_1.after_optimizations-buffer-assignment.txt").write_text("no")
  (tmp_path / "module_0004.jit_pgd_attack_other.cl_1.after_optimizations.txt").write_text("another program")
  assert cross_compile.final_module(tmp_path, as_text) == "the final module"
  assert f"--xla_dump_to={tmp_path}" in cross_compile.dump_flags(tmp_path)


def test_kernels_need_a_target_and_no_modules(capsys, tmp_path):
  from mat_jax.bench.__main__ import main as bench_main

  for flags in ([], ["--target", "h100", "--modules", str(tmp_path)]):
    assert bench_main(["compile", "--kernels", *flags]) == 2
    assert "--kernels reads the programs XLA compiled for an accelerator" in capsys.readouterr().err


@needs_libtpu
def test_kernels_of_pgd_compiled_for_a_tpu(monkeypatch):
  """XLA:TPU fuses the work around each matmul into one fusion, and keeps arrays in the core's on-chip
  memory, whose reads and writes move no main-memory bytes."""
  compiled = _pgd_compiled_for("tpu-v5e")
  groups = {g.kind: g for g in cross_compile.loop_traffic(compiled)}
  assert "matmuls (TPU fusions)" in groups and "attention (cuDNN)" not in groups
  assert groups["matmuls (TPU fusions)"].kernels > 0
  main_memory = sum(g.bytes for g in groups.values())
  monkeypatch.setattr(cross_compile, "_in_device_memory", lambda layout: True)
  assert main_memory < sum(g.bytes for g in cross_compile.loop_traffic(compiled))


@needs_plugin
def test_bench_compile_prints_the_kernels_of_an_attack_step():
  out = subprocess.run([sys.executable, "-m", "mat_jax.bench", "compile", "--target", "h200", "--preset", "tiny",
                        "--batch", "2", "--programs", "pgd", "--kernels"], capture_output=True, text=True,
                       check=True).stdout
  assert "pgd: the kernels of one iteration of its heaviest loop" in out and "attention (cuDNN)" in out
  assert "heaviest groups of that iteration's kernels that compute the same thing" in out
  assert "backward dot_general bf16[" in out  # the matmuls of the gradient, by their name in JAX
  assert "s8[" not in out  # cuBLAS's workspace is scratch, not a result
  assert any(line.startswith("pgd: ") and " kernels per iteration, " in line for line in out.splitlines())
  assert any(line.startswith("pgd: ") and " kernels in the whole program, " in line for line in out.splitlines())
  assert out.splitlines()[-1].startswith("compile: cold ")


@pytest.mark.parametrize("target, device, compiler, phase", [
    pytest.param("h200", "NVIDIA H200", "XLA:GPU", "PTX->CUBIN", marks=needs_plugin),
    pytest.param("tpu-v5e", "TPU v5 lite", "XLA:TPU", "XLA::TPU run backend", marks=needs_libtpu)])
def test_bench_compile_target_reports_xlas_seconds_and_passes(target, device, compiler, phase):
  out = subprocess.run([sys.executable, "-m", "mat_jax.bench", "compile", "--target", target, "--preset", "tiny",
                        "--batch", "2", "--programs", "pgd", "--passes"], capture_output=True, text=True,
                       check=True).stdout
  lines = out.splitlines()
  assert f"for {device} (deviceless {compiler}" in lines[0]
  assert lines[1].startswith("cold: pgd ") and f"{compiler} compile" in lines[1]
  # --passes: the compiler's own phases, from the profile of the compilation.
  assert "pgd, cold: the " in out and any(line.startswith(phase + " ") for line in lines), out
  assert lines[-1].startswith("compile: cold ") and float(lines[-1].split()[2]) > 0


def test_modules_need_a_target_and_a_directory_of_dumped_programs(tmp_path, capsys):
  from mat_jax.bench.__main__ import main as bench_main

  assert bench_main(["compile", "--modules", str(tmp_path)]) == 2
  assert "--modules compiles a command's programs for an accelerator: name it with --target" in capsys.readouterr().err
  with pytest.raises(InputError, match=f"JAX_DUMP_IR_TO={tmp_path}"):
    cross_compile.compile_modules(tmp_path, "h100")


@needs_plugin
def test_a_commands_dumped_programs_compile_for_a_gpu_once_each(tmp_path):
  text = jax.jit(lambda x: jnp.tanh(x @ x.T).sum()).lower(jnp.ones((64, 32))).as_text()
  for n in range(2):  # the same program lowered twice (compiled ahead, then called) compiles once
    (tmp_path / f"jax_ir000{n}_jit_product_compile.mlir").write_text(text)
  (tmp_path / "jax_ir0002_jit_other_compile.mlir").write_text(
      jax.jit(lambda x: x * 2).lower(jnp.ones(3)).as_text())
  timings = cross_compile.compile_modules(tmp_path, "h100")
  assert [name for name, _ in timings] == ["jit_product", "jit_other"]
  assert all(seconds > 0 for _, seconds in timings)
