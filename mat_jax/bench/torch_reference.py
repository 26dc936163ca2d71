"""How the PyTorch references of the benchmarks run: on which device, in which precision, eager or compiled.

A reference is timed in one or more variants, `--torch eager,compile,eager-bf16,compile-bf16` (or `all`):

- device: CUDA when JAX runs on a GPU and this PyTorch build sees one, else the CPU, so a ratio always
  compares two frameworks on the same device;
- precision: `float32` (on CUDA with TF32 matmuls and convolutions, PyTorch's "high" precision, which is
  what XLA uses for float32 on NVIDIA GPUs by default) or `bf16` (`torch.autocast` to bfloat16: the
  parameters stay float32, matmuls and convolutions run in bfloat16, like mat_jax's bf16 compute policy);
- mode: `eager`, or `compile`: `torch.compile` of the functions that call the model (features, a loss).
  Compiling the model object would not do: `model.get_image_features` bypasses the compiled `forward`.
  Loops, `autograd.grad`, `backward()` and the optimizer stay outside the compiled functions: inside one
  they break the graph, and Dynamo compiles each resumed piece again (the backward through a compiled
  function is compiled by AOTAutograd). Each function is compiled as itself, inside the precision's
  autocast: Dynamo keeps compiled graphs per code object and, past `recompile_limit` of them, runs that
  code eagerly without a word, so a wrapper shared by all of them (the image tower, the text tower at each
  of its batch shapes...) would leave part of a "compiled" reference eager. The benchmarks make that limit
  an error instead (`fail_on_recompile_limit_hit`).

The default is `eager` on a CPU (torch.compile's C++ code generation takes minutes there) and all four
on an accelerator, where the compiled bf16 variant is the strongest reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from mat_jax import errors

MODES = ("eager", "compile")
PRECISIONS = ("float32", "bf16")
# Each precision's compute dtype as mat_jax names it (the key of a device's peak).
_DTYPE_OF_PRECISION = {"float32": "float32", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Variant:
  mode: str = "eager"
  precision: str = "float32"
  backend: str | Callable[..., Any] = "inductor"  # torch.compile's backend; tests use a cheap one

  def __post_init__(self):
    if self.mode not in MODES or self.precision not in PRECISIONS:
      raise ValueError(f"unknown PyTorch variant {self.mode}/{self.precision}; modes {MODES}, precisions "
                       f"{PRECISIONS}")

  @property
  def name(self) -> str:
    return "PyTorch " + self.mode + ("" if self.precision == "float32" else " bf16")

  @property
  def dtype(self) -> str:
    """The dtype its matmuls compute in, as mat_jax names compute dtypes (the key of a device's peak)."""
    return _DTYPE_OF_PRECISION[self.precision]

  def wrap(self, fn: Callable[..., Any], device: Any) -> Callable[..., Any]:
    """`fn`, a function that calls the model, run in this variant's precision (an autocast context on
    `device`; its backward then runs in the same dtypes) and mode (compiled at its first call per input
    shape)."""
    import torch

    run = fn
    if self.mode == "compile":
      # A timed reference that fell back to eager would be timed under the wrong name: fail instead.
      torch._dynamo.config.fail_on_recompile_limit_hit = True
      # One graph per input shape, each specialised to it (as XLA compiles): automatic dynamic shapes would
      # trade the shapes a reference sees again for slower symbolic kernels. Dynamo guards on the autocast
      # state around the call.
      run = torch.compile(fn, backend=self.backend, dynamic=False)

    def in_precision(*args, **kwargs):
      context = (torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                 else contextlib.nullcontext())
      with context:
        return run(*args, **kwargs)

    in_precision.compiled = self.mode == "compile"
    return in_precision


def for_dtype(dtype: str, mode: str = "eager") -> Variant:
  """The variant that computes in mat_jax's compute dtype `dtype` (bfloat16: bf16 autocast)."""
  precision = {dtype: precision for precision, dtype in _DTYPE_OF_PRECISION.items()}.get(str(dtype))
  if precision is None:
    raise ValueError(f"no PyTorch variant computes in {dtype!r}; choose from {sorted(_DTYPE_OF_PRECISION.values())}")
  return Variant(mode, precision)


def compute_dtypes(mat_jax_dtype: str, variants: list[Variant]) -> dict[str, str]:
  """The dtype each implementation of a benchmark computes in, by row name: "mat_jax" and each variant's."""
  return {"mat_jax": str(mat_jax_dtype), **{variant.name: variant.dtype for variant in variants}}


def parse_variants(text: str | None) -> list[Variant]:
  """`--torch`: comma-separated names among eager, compile, eager-bf16, compile-bf16, or `all`; None or ""
  gives the default of the device JAX runs on (module docstring)."""
  if not text:
    text = "eager" if jax.default_backend() == "cpu" else "all"
  names = [n.strip() for n in text.split(",") if n.strip()]
  if names == ["all"]:
    names = [f"{mode}{suffix}" for suffix in ("", "-bf16") for mode in MODES]
  variants = []
  for name in names:
    mode, _, precision = name.partition("-")
    if mode not in MODES or precision not in ("", "bf16"):
      raise errors.InputError(f"--torch {name!r}: expected eager, compile, eager-bf16, compile-bf16 or all")
    variants.append(Variant(mode, precision or "float32"))
  return variants


def device() -> Any:
  """The PyTorch device on JAX's: CUDA when JAX runs on a GPU and PyTorch sees one, else the CPU. On CUDA,
  float32 matmuls and convolutions use TF32 (see the module docstring)."""
  import torch

  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda")
  return torch.device("cpu")


def synchronizer(device: Any) -> Callable[[Any], Any]:
  """A `sync` for timing: waits for the device's queued work (CUDA is asynchronous), returns its input."""
  import torch

  if device.type == "cuda":
    def sync(value):
      torch.cuda.synchronize(device)
      return value
    return sync
  return lambda value: value


def describe(variants: list[Variant], device: Any) -> str:
  import torch

  precisions = {"float32": "float32 (TF32 matmuls)" if device.type == "cuda" else "float32",
                "bf16": "bf16 autocast"}
  return (f"PyTorch {torch.__version__} on {device.type}: "
          + ", ".join(f"{v.mode} {precisions[v.precision]}" for v in variants))


def linf_pgd(loss: Callable[[Any], Any], x0: Any, *, eps: float, step_size: float, steps: int) -> Any:
  """The references' L∞ PGD loop (SGA's ImageAttacker) on NCHW pixels in [0, 1]: a uniform start in the
  ball, `steps` sign-gradient ascent steps on `loss` (a scalar), each projected onto the ball and clipped."""
  import torch

  adv = (x0 + torch.empty_like(x0).uniform_(-eps, eps)).clamp(0, 1)
  for _ in range(steps):
    adv.requires_grad_(True)
    grad, = torch.autograd.grad(loss(adv), adv)
    adv = adv.detach() + step_size * grad.sign()
    adv = torch.min(torch.max(adv, x0 - eps), x0 + eps).clamp(0, 1)
  return adv


def gradient_agreement(grad_jax: Any, grad_torch: Any) -> str:
  """How closely a JAX pixel gradient (NHWC) matches PyTorch's (NCHW) of the same loss: the largest
  difference relative to PyTorch's largest entry, and the share of entries whose signs agree (what a
  sign-gradient attack steps on)."""
  grad_jax = np.asarray(grad_jax).transpose(0, 3, 1, 2)
  grad_torch = np.asarray(grad_torch)
  rel = float(np.abs(grad_jax - grad_torch).max() / max(np.abs(grad_torch).max(), 1e-30))
  signs = float(np.mean(np.sign(grad_jax) == np.sign(grad_torch)))
  return f"loss gradient max rel diff {rel:.2e}, sign agreement {100 * signs:.2f}%"
