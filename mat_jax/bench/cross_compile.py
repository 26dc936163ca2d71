"""Compiling for an accelerator on a host without one: XLA's deviceless compilation.

JAX's CUDA plugin can create a compile-only GPU from a description of the device (its compute capability,
SM count, memories, the cuDNN and CUDA versions), and XLA:GPU then runs its whole pipeline for it on the
host's CPU: HLO optimisation, fusion, code generation, PTX and `ptxas`. What it cannot do without the
device is autotune (time candidate kernels on it), so it takes XLA's default choices instead. That is what
`python -m mat_jax.bench compile --target h100` measures: the compile seconds of the programs as they are
built for that GPU (bfloat16, cuDNN attention, the accelerator's chunk sizes; `runtime.building_for`),
on any machine, without autotuning. Against a real GPU (docs/performance.md): the tiny MAT step with
Triton's GEMMs off compiled deviceless in 16.0-16.6 s on a 2-core CPU, and in 19.8 s on an H200 with
cuBLAS's autotuning; with Triton's GEMMs on, autotuning their tiles is most of a real GPU's time and is
missing here. It needs JAX's CUDA plugin and the CUDA libraries JAX checks while tracing (cuDNN, for the
fused attention), not a GPU or its driver: `pip install -e '.[gpu-compile]'`.

libtpu does the same for a TPU from the name of a slice (`--target tpu-v5e`: one chip of a v5e host's
2x2), with XLA:TPU's own compiler: `pip install -e '.[tpu-compile]'`. No TPU's figures are at hand to
compare with.

`loop_traffic` reads a GPU or TPU program XLA has compiled (its optimized HLO) and counts, for one iteration
of its heaviest loop (an attack's step; loops inside it as often as they run), the kernels it launches and
the bytes each reads and writes, by kind, or by what they compute (the JAX operation and result each
kernel's metadata names): where a step's memory traffic goes, and what a change of the program adds or
removes, without the device (`bench compile --target h100 --kernels`).

`compile_modules` compiles the StableHLO modules a command wrote with `JAX_DUMP_IR_TO=DIR` (every program
it lowered, as it built them for its own backend) for a target: which of a whole command's programs cost
XLA the most, without the device (`bench compile --target h200 --modules DIR`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from pathlib import Path

import numpy as np
from jax._src import compiler  # private: compile options for a module JAX did not lower itself
from jax._src.interpreters import mlir
from jax._src.lib import xla_client
from jax._src.lib.mlir import ir
from jax.experimental import topologies

from mat_jax import errors


@dataclasses.dataclass(frozen=True)
class GPUTarget:
  """What XLA:GPU needs to know of a device to compile for it, from the vendor's data sheets."""
  description: str            # the device name XLA records
  compute_capability: tuple[int, int]
  sm_count: int
  fp32_units_per_sm: int
  shared_memory_per_sm: int   # bytes
  shared_memory_per_block_optin: int
  l2_cache_bytes: int
  memory_bytes: int
  memory_bandwidth: float     # bytes/s
  clock_ghz: float


@dataclasses.dataclass(frozen=True)
class TPUTarget:
  """A TPU by libtpu's name of one host's slice (programs compile for its first chip) and the accelerator
  type libtpu would read from a TPU VM's metadata."""
  description: str
  topology: str
  accelerator_type: str
  memory_bandwidth: float     # bytes/s of one chip's HBM


# NVIDIA's and Google's data sheets (SXM parts). cuDNN and CUDA versions: those of JAX's CUDA 12 wheels.
GPU_TARGETS: dict[str, GPUTarget] = {
    "h100": GPUTarget("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 233_472, 232_448, 50 * 2**20, 80 * 2**30,
                      3.35e12, 1.98),
    "h200": GPUTarget("NVIDIA H200", (9, 0), 132, 128, 233_472, 232_448, 50 * 2**20, 141 * 10**9, 4.8e12, 1.98),
    "a100": GPUTarget("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 167_936, 166_912, 40 * 2**20, 80 * 2**30,
                      2.039e12, 1.41),
}
TPU_TARGETS: dict[str, TPUTarget] = {
    "tpu-v4": TPUTarget("TPU v4", "v4:2x2x1", "v4-8", 1.2e12),
    "tpu-v5e": TPUTarget("TPU v5 lite", "v5e:2x2", "v5litepod-4", 8.19e11),
    "tpu-v5p": TPUTarget("TPU v5", "v5p:2x2x1", "v5p-8", 2.765e12),
    "tpu-v6e": TPUTarget("TPU v6 lite", "v6e:2x2", "v6e-4", 1.64e12),
}
TARGETS: dict[str, GPUTarget | TPUTarget] = {**GPU_TARGETS, **TPU_TARGETS}
_CUDNN_VERSION = (9, 8)
_CUDA_VERSION = (12, 8)
INSTALL_HINT = {
    "gpu": "pip install -e '.[gpu-compile]' (JAX's CUDA plugin and the CUDA libraries; no GPU or driver needed)",
    "tpu": "pip install -e '.[tpu-compile]' (libtpu; no TPU needed)",
}


def backend(name: str) -> str:
  """The backend a target's programs are built for (`runtime.building_for`): "gpu" or "tpu"."""
  return "tpu" if name in TPU_TARGETS else "gpu"


def prepare_environment(name: str, environ) -> None:
  """What a process compiling for `name` needs before JAX starts a backend, set in `environ` unless set:
  no accelerator backend of its own (compile-only devices need none, and a CUDA plugin without a GPU fails
  to start, then reports the cross-compiling topology as not implemented), and for a TPU the host names
  and accelerator type libtpu would otherwise look up in a TPU VM's metadata, logging an error when it
  finds none, and leave to load libtpu in more than one process (the command checks it is there, then
  measures in a process of its own; there is no chip to share)."""
  environ.setdefault("JAX_PLATFORMS", "cpu")
  if name in TPU_TARGETS:
    environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    environ.setdefault("TPU_ACCELERATOR_TYPE", TPU_TARGETS[name].accelerator_type)
    environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def dump_flags(directory: str | Path) -> str:
  """The XLA_FLAGS that make XLA write each program's optimized module as text into `directory`, where
  `final_module` finds it."""
  return f"--xla_dump_to={directory} --xla_dump_hlo_as_text"


def final_module(directory: str | Path, hlo_text: str) -> str:
  """The optimized module XLA wrote into `directory` (`dump_flags`) for the program whose module
  `hlo_text` is (`compiled.as_text()`), found by its name; `hlo_text` itself when XLA wrote none. On a
  TPU, `as_text()` gives the module before XLA:TPU's last passes, which turn slices that fill the core's
  on-chip memory into asynchronous ones: the dump is the program the chip runs."""
  name = re.match(r"HloModule ([\w.\-]+)", hlo_text)
  files = sorted(Path(directory).glob(f"module_*.{name.group(1)}.*after_optimizations.txt")) if name else []
  return files[-1].read_text() if files else hlo_text


def target_config(target: GPUTarget) -> str:
  """The device's description as XLA's GpuTargetConfig text proto, which the CUDA plugin reads."""
  major, minor = target.compute_capability
  return "\n".join([
      "gpu_device_info {",
      "  threads_per_block_limit: 1024",
      "  threads_per_warp: 32",
      "  shared_memory_per_block: 49152",
      f"  shared_memory_per_core: {target.shared_memory_per_sm}",
      "  threads_per_core_limit: 2048",
      f"  core_count: {target.sm_count}",
      f"  fpus_per_core: {target.fp32_units_per_sm}",
      "  block_dim_limit_x: 2147483647",
      "  block_dim_limit_y: 65535",
      "  block_dim_limit_z: 65535",
      f"  memory_bandwidth: {int(target.memory_bandwidth)}",
      f"  l2_cache_size: {target.l2_cache_bytes}",
      f"  clock_rate_ghz: {target.clock_ghz}",
      f"  device_memory_size: {target.memory_bytes}",
      f"  shared_memory_per_block_optin: {target.shared_memory_per_block_optin}",
      f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
      "  registers_per_core_limit: 65536",
      "  registers_per_block_limit: 65536",
      "}",
      'platform_name: "CUDA"',
      f"dnn_version_info {{ major: {_CUDNN_VERSION[0]} minor: {_CUDNN_VERSION[1]} }}",
      f"runtime_version {{ major: {_CUDA_VERSION[0]} minor: {_CUDA_VERSION[1]} }}",
      f'device_description_str: "{target.description}"',
  ]) + "\n"


def compile_only_devices(name: str) -> list:
  """One compile-only device of the named target (a key of TARGETS); programs lowered with shardings on it
  compile for that device. An InputError names the install when JAX's CUDA plugin (or cuDNN) or libtpu
  is missing."""
  if name not in TARGETS:
    raise errors.InputError(f"--target {name!r}: choose one of {', '.join(sorted(TARGETS))}")
  target = TARGETS[name]
  try:
    if isinstance(target, TPUTarget):
      topology = topologies.get_topology_desc(target.topology, "tpu")
    else:
      topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(target),
                                              topology="1x1x1")
  except Exception as e:  # a plugin missing or failing to load reports itself in many ways
    raise errors.InputError(f"--target {name}: cannot create a compile-only {target.description} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); compiling "
                            f"for it without one needs {INSTALL_HINT[backend(name)]}") from None
  return list(topology.devices)[:1]


# The file names of JAX_DUMP_IR_TO's modules: jax_ir<n>_<program>_compile.mlir.
_DUMPED_MODULE = re.compile(r"jax_ir\d+_(.+)_compile\.mlir")


def compile_modules(directory: str | Path, name: str) -> list[tuple[str, float | str]]:
  """(program, XLA seconds) of every distinct module of `directory` (JAX_DUMP_IR_TO's files, in the order they
  were written) compiled for the named target: a module lowered twice (a program compiled ahead, then
  called) is compiled once, as the persistent cache would. A module XLA:GPU cannot compile without the
  device gets its error's first line instead of seconds (Triton's GEMM kernels need autotuning for some
  shapes: MAT_JAX_TRITON_GEMM=0, as the shapes world's commands run on a GPU, leaves them to cuBLAS). An
  InputError when there is no module to compile."""
  files = sorted(Path(directory).glob("jax_ir*_compile.mlir"))
  if not files:
    raise errors.InputError(f"--modules {directory}: no jax_ir*_compile.mlir files; write them with "
                            f"JAX_DUMP_IR_TO={directory} python -m mat_jax.train (or any command)")
  (device,) = compile_only_devices(name)
  client = device.client
  options = compiler.get_compile_options(1, 1, device_assignment=np.array([[device.id]]), backend=client)
  seen: set[str] = set()
  timings = []
  for path in files:
    text = path.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest in seen:
      continue
    seen.add(digest)
    match = _DUMPED_MODULE.fullmatch(path.name)
    with mlir.make_ir_context():
      module = ir.Module.parse(text)
      start = time.perf_counter()
      try:
        client.compile(module, executable_devices=xla_client.DeviceList((device,)), compile_options=options)
        outcome: float | str = time.perf_counter() - start
      except Exception as e:  # XLA's runtime errors; the other modules still compile
        outcome = str(e).splitlines()[0][:200]
      timings.append((match.group(1) if match else path.stem, outcome))
  return timings


# ----------------------------------------------------------------------------------------------------
# The kernels of a compiled GPU or TPU program.

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
# An array of a shape text: dtype, dims and (optional) layout, whose S(n) names a memory space other than the
# device's main memory: XLA:TPU's S(1) is the core's vector memory (VMEM), S(2) its scalar memory (SMEM).
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z\-]*)\((.*)$")
# The instructions of an optimized module that launch no kernel: bookkeeping, and the control flow whose
# computations are followed instead (the ends of asynchronous work, `*-done`, neither: counted at their
# starts). Every other instruction runs one: a fusion, a library call, and what XLA left unfused (XLA:TPU
# leaves reshapes that re-tile, converts, slices...).
_NO_KERNEL = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
              "opt-barrier", "partition-id", "replica-id", "domain", "while", "conditional", "call")
# XLA:TPU's custom calls that move nothing: a buffer's allocation, buffers joined by a bitcast.
_NO_KERNEL_TARGETS = ("AllocateBuffer", "ConcatBitcast")


def _in_device_memory(layout: str) -> bool:
  """Whether an array of this layout text lives in the device's main memory (HBM), whose bytes a kernel's
  reads and writes move: not in an on-chip memory space (S(n), n > 0; a TPU's VMEM and SMEM)."""
  space = re.search(r"S\((\d+)\)", layout)
  return space is None or space.group(1) == "0"


def _array_bytes(shape: str, *, on_chip_too: bool = False) -> int:
  """Bytes of the arrays a shape text names (a tuple's too) in the device's main memory; all of them with
  `on_chip_too`."""
  return _bytes(_ARRAY.findall(shape), on_chip_too=on_chip_too)


def _bytes(arrays: list[tuple[str, str, str]], *, on_chip_too: bool = False) -> int:
  return sum(_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
             for dtype, dims, layout in arrays if on_chip_too or _in_device_memory(layout))


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape's text: "(a, (b, c), d)" -> ["a", "(b, c)", "d"]; a shape that
  is no tuple is its own one element."""
  shape = shape.strip()
  if not shape.startswith("("):
    return [shape]
  elements, depth, start = [], 0, 1
  for i, character in enumerate(shape[1:-1], start=1):
    depth += (character in "([{") - (character in ")]}")
    if character == "," and depth == 0:
      elements.append(shape[start:i].strip())
      start = i + 1
  return [*elements, shape[start:-1].strip()]


def _result_arrays(shape: str, op: str) -> list[tuple[str, str, str]]:
  """The (dtype, dims, layout) of the arrays a kernel's result holds: a library call's (cuBLAS's, cuDNN's)
  result tuple ends with its workspace, an s8/u8 array of scratch space (4 MiB for each cuBLAS call), not
  data."""
  arrays = _ARRAY.findall(shape)
  if op == "custom-call" and shape.startswith("(") and arrays and arrays[-1][0] in ("s8", "u8"):
    return arrays[:-1]
  return arrays


def _kernel_kind(name: str, op: str, line: str) -> str:
  """What a kernel-launching instruction of an optimized XLA:GPU or XLA:TPU module computes, by the names XLA
  gives."""
  if op == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', line)
    target = target.group(1) if target else "?"
    if "cudnn$fmha" in target:
      return "attention (cuDNN)"
    return "matmuls (cuBLAS)" if "cublas" in target else f"custom call {target}"
  if op in ("copy", "copy-start", "reshape", "transpose"):  # a layout's change (XLA:TPU's re-tiling) is a copy
    return "copies"
  if op == "slice":
    return "slicing"
  if op == "async-start":  # XLA:TPU's asynchronous slices into on-chip memory, named after what they do
    return {"slice-start": "slicing", "dynamic-slice-start": "dynamic slicing"}.get(name.split(".")[0], "copies")
  if op.startswith("dynamic") or name.startswith(("loop_dynamic_slice", "loop_dynamic_update_slice")):
    return "dynamic slicing"
  backend_kind = re.search(r'"kind":"(__[\w]+)"', line)
  if backend_kind and "gemm" in backend_kind.group(1):
    return "matmuls (Triton)"
  if backend_kind and backend_kind.group(1).startswith("__triton"):
    return "normalisations and softmax (Triton)"
  for prefix, kind in (("loop_pad_fusion", "padding"), ("loop_slice_fusion", "slicing")):
    if name.startswith(prefix):
      return kind
  if "kind=kOutput" in line:  # XLA:TPU's fusions around a matmul or convolution, its producers and consumers
    return "matmuls (TPU fusions)"
  return "reductions" if "kind=kInput" in line else "elementwise"


def _kernel_source(shape: str, op: str, line: str) -> str:
  """What a kernel computes in the program's terms: the JAX operation its metadata names (op_name's last
  part: the root of a fusion), "backward" where that lies in a transposed (VJP) computation, and its
  result's arrays (two at most), e.g. "backward add_any bf16[256,198,3072]"."""
  op_name = re.search(r'op_name="([^"]*)"', line)
  path = op_name.group(1) if op_name else ""
  if op == "async-start":  # ((operands), destination, context): what it makes is the destination
    shape = _tuple_elements(shape)[1]
  arrays = [f"{dtype}[{dims}]" for dtype, dims, _ in _result_arrays(shape, op)]
  result = ", ".join(arrays[:2]) + (", ..." if len(arrays) > 2 else "")
  operation = path.rsplit("/", 1)[-1] or "(no operation named)"
  return f"{'backward ' if 'transpose(' in path else ''}{operation} {result}"


@dataclasses.dataclass(frozen=True)
class KernelGroup:
  kind: str
  kernels: int
  bytes: int  # read and written, each operand and result counted once per launch
  source: str = ""  # with by_source: the operation and result shape its kernels share (_kernel_source)


def merged(groups: list[list[KernelGroup]]) -> list[KernelGroup]:
  """Several programs' kernel groups (`loop_traffic`'s) as one program's: summed by kind and source, most
  bytes first."""
  totals: dict[tuple[str, str], list[int]] = {}
  for group in (g for program in groups for g in program):
    total = totals.setdefault((group.kind, group.source), [0, 0])
    total[0] += group.kernels
    total[1] += group.bytes
  return sorted((KernelGroup(kind, kernels, moved, source) for (kind, source), (kernels, moved) in totals.items()),
                key=lambda g: -g.bytes)


def heaviest_loop(loops: list[list[KernelGroup]], wholes: list[list[KernelGroup]]) -> int:
  """Which of several programs' heaviest loops (`loop_traffic`'s, with each whole program's beside them) is
  the heaviest: the one that moves the most bytes, among the programs that have a loop (a program without
  one, whose `loop_traffic` is the whole program's, competes only when none has)."""
  looping = [i for i, (loop, whole) in enumerate(zip(loops, wholes, strict=True)) if loop != whole]
  return max(looping or range(len(loops)), key=lambda i: sum(g.bytes for g in loops[i]))


def loop_traffic(hlo_text: str, whole_program: bool = False, by_source: bool = False) -> list[KernelGroup]:
  """The kernels one iteration of the heaviest loop of an optimized XLA:GPU or XLA:TPU module launches (the
  program's outermost loop that moves the most bytes, e.g. an attack's step; the whole program when it has
  none, or with `whole_program`), grouped by kind, most bytes first. Loops inside it count as often as they
  run where that is known (a scanned tower's blocks; `trip_count`), a conditional as its heaviest branch.
  Each kernel's operands and result in the device's main memory count once, a lower bound of the memory it
  moves (a fusion may read an operand more than once; a matmul's operands come in through its caches; a
  slice moves its slice, an update in place of a result its update). XLA:TPU keeps many arrays in the core's
  on-chip memory (VMEM, S(1) in their layouts): a kernel's reads and writes there move no main-memory bytes,
  and the asynchronous copies and slices that fill and empty it move what they read from or write to main
  memory once. A kernel's kind follows XLA's naming: matmuls, cuDNN's attention, Triton's normalisation
  fusions, XLA's padding, slicing, dynamic slicing (a scan's stacked layers), reduction and elementwise
  fusions; on a TPU, the fusions around each matmul (which take in much of the elementwise work),
  asynchronous copies and slices. With `by_source`, each kind's kernels are grouped further by
  what they compute (`_kernel_source`: the same JAX operation, direction and result shape), which tells
  e.g. a GELU's backward pass from a bias's addition among the elementwise kernels."""
  # Each computation's instructions, {name: (shape, op, operands, the whole line)}, and its root's name.
  computations: dict[str, dict[str, tuple[str, str, str, str]]] = {}
  roots: dict[str, str] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      computations[current] = {}
      entry = current if line.startswith("ENTRY") else entry
    elif line.startswith("}"):
      current = None
    elif current and (match := _INSTRUCTION.match(line)):
      name, shape, op, rest = match.groups()
      computations[current][name] = (shape, op, rest.split("), ")[0], line)
      if line.lstrip().startswith("ROOT"):
        roots[current] = name

  def instructions(name: str | None) -> dict[str, tuple[str, str, str, str]]:
    return computations.get(name, {})

  def called(line: str, attribute: str = "calls") -> str | None:
    """The computation an instruction names by `attribute` (calls=, body=, to_apply=...), if any."""
    match = re.search(rf"\b{attribute}=%?([\w.\-]+)", line)
    return match.group(1) if match else None

  def kernels(name: str) -> dict[tuple[str, str], list[int]]:
    """{(kind, source or ""): [kernels, bytes]} of one run of computation `name`, the computations it runs
    included."""
    defined = instructions(name)
    groups: dict[tuple[str, str], list[int]] = {}
    def add(more: dict[tuple[str, str], list[int]], times: int = 1) -> None:
      for key, (n, moved) in more.items():
        group = groups.setdefault(key, [0, 0])
        group[0] += n * times
        group[1] += moved * times
    for instruction, (shape, op, operands, line) in defined.items():
      if op == "while":
        add(kernels(called(line, "body")), trip_count(line))
      elif op == "conditional":
        branches = _operand_names((re.search(r"branch_computations=\{([^}]*)\}", line) or
                                   re.search(r"(true_computation=.*)", line)).group(1))
        branch_kernels = [kernels(b) for b in branches if b in computations]
        add(max(branch_kernels, key=total_bytes, default={}))
      elif op == "call":
        add(kernels(called(line, "to_apply")))
      elif op == "async-start" and not copies_a_slice(called(line)):  # work on another stream: its kernels
        add(kernels(called(line)))
      elif op not in _NO_KERNEL and not op.endswith("-done") and not any(
          f'custom_call_target="{target}"' in line for target in _NO_KERNEL_TARGETS):
        result = _bytes(_result_arrays(shape, op))
        inputs = [_array_bytes(defined[o][0]) for o in _operand_names(operands) if o in defined]
        in_memory = [size > 0 for size in inputs]  # which operands lie (not empty) in main memory
        if op == "fusion" and called(line) in computations:
          moved = fusion_bytes(called(line), inputs, shape)
        elif op == "dynamic-update-slice":  # in place: the update (and the indices) read, the update written
          update = _array_bytes(defined[_operand_names(operands)[1]][0], on_chip_too=True)
          moved = sum(inputs[1:]) + (update if result else 0)
        elif op in ("slice", "dynamic-slice"):  # a slice read out of a larger array, and written
          moved = (_array_bytes(shape, on_chip_too=True) if in_memory[:1] == [True] else 0) + result
        elif op == "copy-start":  # its result is (destination, source, context): the copy moves its operand
          moved = sum(inputs) + _array_bytes(_tuple_elements(shape)[0])
        elif op == "async-start":  # ((operands), destination, context): a slice of its operand, copied
          destination = _tuple_elements(shape)[1]
          moved = (_array_bytes(destination, on_chip_too=True) if any(in_memory) else 0) + \
              _array_bytes(destination)
        else:
          moved = result + sum(inputs)
        source = _kernel_source(shape, op, line) if by_source else ""
        add({(_kernel_kind(instruction, op, line), source): [1, moved]})
    return groups

  def outputs(fused: str) -> list[str]:
    """The instructions whose values a fused computation returns: its root, or the elements of its root
    tuple."""
    root = roots.get(fused)
    defined = instructions(fused)
    return _operand_names(defined[root][2]) if root in defined and defined[root][1] == "tuple" else [root]

  def copies_a_slice(computation: str | None) -> bool:
    """Whether an asynchronous computation slices its operand (XLA:TPU's asynchronous slices into on-chip
    memory) rather than running other work on another stream."""
    root = roots.get(computation)
    return instructions(computation).get(root, ("", ""))[1] in ("slice", "dynamic-slice")

  def parameter_names(defined) -> dict[int, str]:
    return {int(re.match(r"(\d+)", rest).group(1)): name for name, (_, op, rest, _) in defined.items()
            if op == "parameter"}

  def bytes_read(fused: str, index: int) -> int | None:
    """What fused computation `fused` reads of its operand `index` when it only slices it or updates it in
    place (nested fusions followed): the slices' bytes; None when it reads it whole."""
    defined = instructions(fused)
    name = parameter_names(defined).get(index)
    if name is None:
      return None
    total = 0
    for other, (shape, op, operands, line) in defined.items():
      names = _operand_names(operands)
      if other == name or name not in names:
        continue
      # Sizes as the fused computation's own shapes give them: XLA:TPU marks them with on-chip memory
      # spaces that say nothing of where the operand lies (the fusion's operand says that).
      if op in ("slice", "dynamic-slice") and names[0] == name and names.count(name) == 1:
        total += _array_bytes(shape, on_chip_too=True)  # the slice read
        continue
      if op == "dynamic-update-slice" and names[0] == name and names.count(name) == 1 and other in outputs(fused):
        continue  # updated in place, the fusion's result: nothing of it read
      nested = called(line) if op == "fusion" else None
      inner = [bytes_read(nested, k) for k, n in enumerate(names) if n == name] if nested else [None]
      if None in inner:
        return None
      total += sum(inner)
    return total

  def bytes_written(fused: str, output: str | None) -> int | None:
    """What `output` of fused computation `fused` writes when it updates an operand in place (nested fusions
    followed): the update's bytes; None when it writes its whole result."""
    defined = instructions(fused)
    shape, op, operands, line = defined.get(output, ("", "", "", ""))
    names = _operand_names(operands)
    if op == "dynamic-update-slice" and names and names[0] in parameter_names(defined).values():
      return _array_bytes(defined.get(names[1], ("",))[0], on_chip_too=True)
    nested = called(line) if op == "fusion" else None
    return bytes_written(nested, roots.get(nested)) if nested in computations else None

  def fusion_bytes(fused: str, inputs: list[int], shape: str) -> int:
    """What a fusion reads and writes in the device's main memory, from its fused computation: an operand
    it only slices (a scan's stacked layers) by its slices, and an operand its result updates in place (a
    stacked residual) by the update, neither whole; an operand or result in on-chip memory not at all.
    `inputs` are its operands' bytes in main memory, `shape` its result's shape text."""
    defined, root = computations[fused], roots.get(fused)
    reads = [0 if not inputs[k] else inputs[k] if (part := bytes_read(fused, k)) is None else part
             for k in range(len(inputs))]
    # Each result's bytes, from the fusion's own shape (its memory spaces), or its update where in place.
    results = _tuple_elements(shape) if root is not None and defined[root][1] == "tuple" else [shape]
    written = 0
    for result, output in zip(results, outputs(fused), strict=True):
      if _array_bytes(result):  # a result in on-chip memory writes no main memory
        update = bytes_written(fused, output)
        written += _array_bytes(result) if update is None else update
    return written + sum(reads)

  def trip_count(line: str) -> int:
    """How often a while loop runs: XLA:GPU's known trip count, else, as JAX lowers a scan or a fori_loop
    (a counter from 0 by 1), the constant its condition's root compares its counter below (XLA:TPU records
    no trip count); 1 when neither is there (a loop that runs until its data says so)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
      return int(known.group(1))
    condition_name = called(line, "condition")
    defined = instructions(condition_name)
    _, op, operands, condition = defined.get(roots.get(condition_name), ("", "", "", ""))
    bound = _operand_names(operands)[-1:] if op == "compare" and "direction=LT" in condition else []
    value = re.search(r"s32\[\]\S* constant\((\d+)\)", defined[bound[0]][3]) if bound and bound[0] in defined else None
    return int(value.group(1)) if value else 1

  def total_bytes(groups: dict[tuple[str, str], list[int]]) -> int:
    return sum(b for _, b in groups.values())

  loops = [] if whole_program else [kernels(called(line, "body")) for _, op, _, line in instructions(entry).values()
                                    if op == "while"]
  chosen = max(loops, key=total_bytes) if loops else kernels(entry)
  return sorted((KernelGroup(kind, n, b, source) for (kind, source), (n, b) in chosen.items()),
                key=lambda g: -g.bytes)


def _operand_names(operands: str) -> list[str]:
  """The instructions an operand list names, in order."""
  return re.findall(r"%([\w.\-]+)", operands)
