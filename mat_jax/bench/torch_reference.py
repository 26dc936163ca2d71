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
  function is compiled by AOTAutograd). Each function is compiled as itself, per variant (a copy with its
  own code object), inside the precision's autocast: Dynamo keeps compiled graphs per code object and,
  past `recompile_limit` of them, runs that code eagerly without a word, so a wrapper shared by all of
  them (the image tower, the text tower at each of its batch shapes, each variant...) would leave part of
  a "compiled" reference eager. The benchmarks make that limit an error instead
  (`fail_on_recompile_limit_hit`).

`bench encode`, the PGD part of `bench attacks` and `bench blip` check, before timing, that mat_jax and
each variant they time compute what float32 eager PyTorch computes (`agreement`: within float32
round-off, or within bf16/TF32 round-off for reduced precision), and stop with `common.Disagreement` otherwise:
a timing of two different computations compares nothing. The BERT-Attack part requires the same
adversarial captions (near-ties aside); `bench train`, whose step is made of those attacks, checks none.

The default is `eager` on a CPU (torch.compile's C++ code generation takes minutes there) and all four
on an accelerator, where the compiled bf16 variant is the strongest reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import types
from typing import Any, Callable

import jax
import numpy as np

from mat_jax import errors
from mat_jax.bench import common

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
      run = torch.compile(_with_own_code(fn), backend=self.backend, dynamic=False)

    def in_precision(*args, **kwargs):
      context = (torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                 else contextlib.nullcontext())
      with context:
        return run(*args, **kwargs)

    in_precision.compiled = self.mode == "compile"
    return in_precision


def _with_own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` as a new function with a code object of its own. Dynamo's graphs and its recompile limit belong
  to a code object, so two variants compiled from one function (compile and compile-bf16, their graphs
  told apart only by the autocast guard) would fill one cache between them."""
  if inspect.ismethod(fn):
    return types.MethodType(_with_own_code(fn.__func__), fn.__self__)
  if not isinstance(fn, types.FunctionType):
    return fn  # a callable object: compiled as it is
  copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
  copy.__kwdefaults__ = fn.__kwdefaults__
  return copy


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
  elif "all" in names:
    raise errors.InputError(f"--torch {text!r}: 'all' stands alone (it names all four variants)")
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise errors.InputError(f"--torch {text!r}: {', '.join(repeated)} named twice; name each variant once")
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


def cosine_attack_inputs(images: np.ndarray, text: np.ndarray, vision: Any, device: Any):
  """PyTorch's side of the PGD benchmarks on the cosine to the paired captions: images (B, H, W, 3) in
  [0, 1] as NCHW pixels on `device`, the captions' features `text` made unit, and the model's pixel
  normalisation (`vision.image_mean` / `image_std`, pixels -> the model's input)."""
  import torch

  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  unit_text = torch.nn.functional.normalize(torch.from_numpy(text), dim=-1).to(device)
  mean = torch.tensor(vision.image_mean, device=device).view(1, 3, 1, 1)
  std = torch.tensor(vision.image_std, device=device).view(1, 3, 1, 1)
  return pixels, unit_text, lambda x: (x - mean) / std


def pixel_gradient(loss: Callable[[Any], Any], x0: Any) -> np.ndarray:
  """The gradient of the scalar `loss` at the NCHW pixels `x0`, as float32 numpy (the agreement checks)."""
  import torch

  pixels = x0.clone().requires_grad_(True)
  grad, = torch.autograd.grad(loss(pixels), pixels)
  return grad.float().cpu().numpy()


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


# How far a result may be from float32 eager PyTorch's: the largest difference relative to the reference's
# largest entry, and (for a gradient, which a sign-gradient attack steps on) the share of equal signs. In
# full float32 both sides agree to ~1e-6 (2026-11-26, CPU); bf16 autocast, TF32 (float32 on CUDA) and
# XLA's default precision on an accelerator are looser (on an H100: 1.4e-2 and 99.61% for PGD's gradient).
# A variant that computes something else is off by order 1 and at chance for the signs.
FULL_PRECISION_LIMITS = (1e-4, 0.99)
REDUCED_PRECISION_LIMITS = (1e-1, 0.95)


def reduced_precision(dtype: str) -> bool:
  """Whether a result computed in `dtype` ("float32" or "bfloat16"; a variant's `dtype`, mat_jax's compute
  dtype) on JAX's device is held to the reduced-precision limits: bf16, or any accelerator, where float32
  matmuls run in TF32 (PyTorch on CUDA) or at XLA's default precision."""
  return str(dtype) != "float32" or jax.default_backend() != "cpu"


def agreement(what: str, value: Any, reference: Any, *, reduced: bool, signs: bool = False) -> str:
  """'<what> max rel diff R[, sign agreement S%]' of `value` against `reference` (same layout), or
  `common.Disagreement` when beyond the limits above."""
  value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
  if value.shape != reference.shape:
    raise common.Disagreement(f"{what}: shapes {value.shape} and {reference.shape} differ")
  rel_limit, sign_limit = REDUCED_PRECISION_LIMITS if reduced else FULL_PRECISION_LIMITS
  rel = float(np.abs(value - reference).max() / max(np.abs(reference).max(), 1e-30))
  text = f"{what} max rel diff {rel:.2e}"
  agrees = rel <= rel_limit
  if signs:
    share = float(np.mean(np.sign(value) == np.sign(reference)))
    text += f", sign agreement {100 * share:.2f}%"
    agrees = agrees and share >= sign_limit
  if not agrees:
    limits = f"max rel diff {rel_limit:g}" + (f", sign agreement {100 * sign_limit:g}%" if signs else "")
    raise common.Disagreement(f"{text}: beyond the limits for {'reduced' if reduced else 'full'} precision "
                              f"({limits}); the two implementations do not compute the same thing, so their "
                              "timings would not compare")
  return text
