"""Checks of host values before anything is compiled: pixels, budgets, step counts, token ids, indices.

Under `jit` values are traced: a NaN pixel, an image in [0, 255], an eps of 2 or a token id past the
embedding table would run without an error and give wrong numbers (JAX clamps out-of-range indices).
Every public entry point (the one-call attacks, `evaluate.evaluate`, the metrics' embedding helpers, the
models' `encode_*` on concrete arrays, the command lines) calls these on the host first, so the user
gets one `InputError` (a `MatJaxError` and a `ValueError`) that names the problem and the fix.

Arrays that are already traced (a call from inside the user's own `jit`) get the static checks only
(shape, dtype); their values cannot be read without leaving the compiled program.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mat_jax.errors import InputError


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def all_finite(tree: Any) -> jax.Array:
  """Whether every value of `tree`'s arrays is finite, as a traced boolean: the train step's test of its
  update and, jitted, the checkpoint's test of a state before it is saved. (A sum of squares would
  overflow to inf for large finite values.)"""
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]).all()


@jax.jit
def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  finite = jnp.isfinite(x)
  safe = jnp.where(finite, x, 0)
  return (jnp.sum(jnp.isnan(x)), jnp.sum(jnp.isinf(x)), jnp.min(safe), jnp.max(safe))


def _value_stats(x: Any) -> tuple[int, int, float, float]:
  """(NaN count, inf count, min, max); min and max only when every value is finite. On the device for
  device arrays (one small transfer), on the host for numpy."""
  if isinstance(x, jax.Array):
    # Computed now even inside a trace: a concrete array closed over by a jitted function would otherwise
    # give traced statistics, which cannot be read.
    with jax.ensure_compile_time_eval():
      nans, infs, lo, hi = jax.device_get(_stats(x))
    return int(nans), int(infs), float(lo), float(hi)
  x = np.asarray(x)
  nans, infs = int(np.isnan(x).sum()), int(np.isinf(x).sum())
  if nans or infs:  # the range is not reported then: no copy of the finite values needed
    return nans, infs, 0.0, 0.0
  return 0, 0, float(x.min()), float(x.max())


def _on_host(x: Any) -> bool:
  """Values that can be read without a transfer from a device (numpy arrays, lists, Python numbers)."""
  return not isinstance(x, jax.Array)


def host_number(x: Any) -> bool:
  """A Python or numpy scalar: free to check. Traced and device values (a vmapped eps, a traced step
  count) are not: reading them would leave the compiled program or wait for the device."""
  return isinstance(x, (numbers.Number, np.number, np.bool_))


# ----------------------------------------------------------------------------------------------------
# Pixels.


def check_images(images: Any, image_size: int | None = None, *, name: str = "images",
                 allow_uint8: bool = False, read_device: bool = True) -> None:
  """Images as the models take them: a non-empty (B, H, W, 3) batch of float pixels in [0, 1].

  `image_size`: the model's input size (H = W), or None to accept any. `allow_uint8`: also accept
  uint8 pixels in [0, 255] (evaluation sets store them so; the evaluator scales them). `read_device`
  False: the values of device arrays are not read (no transfer: the composable attacks, which run per
  batch after their entry point checked the pixels once); host arrays are still checked in full.
  """
  arr = images if isinstance(images, (np.ndarray, jax.Array)) else np.asarray(images)
  shape = tuple(arr.shape)
  size = image_size if image_size is not None else "H"
  want = f"(batch, {size}, {size}, 3) (NHWC)"
  if arr.ndim == 3 and shape[-1] in (1, 3, 4):
    raise InputError(f"{name} must have shape {want}, got {shape}: a single image needs a batch axis: x[None]")
  if arr.ndim != 4:
    raise InputError(f"{name} must have shape {want}, got {shape}")
  if shape[0] == 0:
    raise InputError(f"{name} is an empty batch (shape {shape}); pass at least one image")
  channels = shape[-1]
  if channels != 3:
    if shape[1] in (1, 3, 4) and shape[1] != channels:
      hint = "the array looks channels-first (NCHW): transpose it with x.transpose(0, 2, 3, 1)"
    elif channels == 1:
      hint = ("the images are grayscale (1 channel): convert them to RGB, e.g. np.repeat(x, 3, axis=-1) "
              "or PIL's image.convert('RGB')")
    elif channels == 4:
      hint = ("the images are RGBA (4 channels): convert them to RGB, e.g. x[..., :3] or PIL's "
              "image.convert('RGB')")
    else:
      hint = f"{channels} channels is not an image format the model reads; convert the images to RGB"
    raise InputError(f"{name} must have shape {want}, got {shape}: {hint}")
  if image_size is not None and shape[1:3] != (image_size, image_size):
    raise InputError(f"{name} must have shape {want}, got {shape}: resize them to the model's image_size "
                     f"{image_size} (shorter side, then centre crop)")
  integer = jnp.issubdtype(arr.dtype, jnp.integer) or arr.dtype == np.bool_
  if integer and not (allow_uint8 and arr.dtype == np.uint8):
    raise InputError(f"{name} must be float pixels in [0, 1], got dtype {arr.dtype}; convert uint8 images with "
                     "x.astype(np.float32) / 255")
  if not integer and not jnp.issubdtype(arr.dtype, jnp.floating):
    raise InputError(f"{name} must be float pixels in [0, 1], got dtype {arr.dtype}")
  if is_traced(arr) or integer or not (read_device or _on_host(arr)):
    return
  nans, infs, lo, hi = _value_stats(arr)
  if nans or infs:
    what = " and ".join(p for p in (f"{nans} NaN" if nans else "", f"{infs} inf" if infs else "") if p)
    raise InputError(f"{name} hold {what} value(s) (of {arr.size}); every pixel must be a finite number in "
                     "[0, 1]: check the decoding or preprocessing that produced them")
  if lo < 0.0 or hi > 1.0:
    if hi > 1.0 and lo >= 0.0 and hi <= 255.0:
      hint = "they look like 0-255 pixel values: divide by 255"
    elif lo < 0.0 and lo >= -1.0 - 1e-6 and hi <= 1.0 + 1e-6:
      hint = "they look like pixels in [-1, 1]: map them with (x + 1) / 2"
    else:
      hint = "they look normalised: pass raw pixels, the model applies the CLIP mean/std itself"
    raise InputError(f"{name} must lie in [0, 1] (pixel space), got values in [{lo:.4g}, {hi:.4g}]; {hint}")


# ----------------------------------------------------------------------------------------------------
# Budgets and step counts.


# The largest L-inf budget an attack takes, in 1/255 units and in pixel units. Published budgets are 1/255
# to 16/255; above 64/255 a pixel may move by a quarter of its range or more, and an eps of 1 (meant as
# 1/255) lets every pixel take any value: a slip of units, not a budget.
MAX_LINF_EPS_255 = 64
MAX_LINF_EPS = MAX_LINF_EPS_255 / 255


def check_eps(eps: Any, *, norm: str = "linf", name: str = "eps") -> float:
  """An attack budget in pixel units: finite, >= 0, and (L-inf) at most `MAX_LINF_EPS` (64/255). Returns
  it as a float."""
  value = _number(eps, name)
  if not math.isfinite(value):
    raise InputError(f"{name}={value} is not a finite number; give the budget in pixel units, e.g. 2/255")
  if value < 0:
    raise InputError(f"{name}={value:g} must be >= 0 (a budget in pixel units, e.g. 2/255)")
  if norm == "linf" and value > 1:
    raise InputError(f"{name}={value:g} is outside [0, 1]: eps is in pixel units [0, 1]; "
                     f"{value:g}/255 ≈ {value / 255:.4f}")
  if norm == "linf" and value > MAX_LINF_EPS:
    reach = "every pixel take any value" if value == 1 else f"every pixel move by {value * 255:.3g} of its 255 levels"
    raise InputError(f"{name}={value:g} would let {reach}; eps is in pixel units: {value:g}/255 ≈ "
                     f"{value / 255:.4f} (L-inf budgets above {MAX_LINF_EPS_255}/255 ≈ {MAX_LINF_EPS:.3f} are refused)")
  return value


def check_nonnegative(value: Any, *, name: str, hint: str = "") -> float:
  """A finite number >= 0 (a step, a scale, a weight). Returns it as a float; `hint` ends the message."""
  number = _number(value, name)
  if not math.isfinite(number) or number < 0:
    raise InputError(f"{name}={number} must be a finite number >= 0{hint}")
  return number


def check_step_size(step_size: Any, *, name: str = "step_size") -> float:
  return check_nonnegative(step_size, name=name, hint=" (pixel units, e.g. 0.5/255)")


def check_steps(steps: Any, *, name: str = "steps", minimum: int = 1) -> int:
  """An iteration count: an integer >= `minimum`."""
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
    raise InputError(f"{name} must be an integer, got {steps!r} ({type(steps).__name__})")
  if steps < minimum:
    raise InputError(f"{name}={steps} must be at least {minimum}")
  return int(steps)


def check_attack_numbers(*, norm: str, eps: Any = None, step_size: Any = None, steps: Any = None) -> None:
  """The budget of a composable attack (`mat_jax.attacks.image`, `.multimodal`), each value where it is a
  host number (`host_number`): eps in pixel units (`check_eps`), a step size >= 0, an integer step count
  >= 0. Traced and device values pass unchecked: the entry points check theirs on the host."""
  if host_number(eps):
    check_eps(eps, norm=norm)
  if host_number(step_size):
    check_step_size(step_size)
  if host_number(steps):
    check_steps(steps, minimum=0)


def names(value: Any, *, name: str) -> list[str]:
  """A list of names: one name (a string) is a list of one; a string is never split into its letters."""
  if isinstance(value, str):
    return [value]
  try:
    return list(value)
  except TypeError:
    raise InputError(f"{name} must be a name or a list of names, got {value!r} ({type(value).__name__})") from None


def _number(value: Any, name: str) -> float:
  if is_traced(value):
    raise InputError(f"{name} must be a Python number, not a traced array: it fixes the compiled program; "
                     "pass it as a static value")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise InputError(f"{name} must be a number, got {value!r} ({type(value).__name__})") from None


# ----------------------------------------------------------------------------------------------------
# Text.


def check_token_ids(input_ids: Any, attention_mask: Any, context_length: int, vocab_size: int, *,
                    name: str = "input_ids", read_device: bool = True) -> None:
  """A non-empty (B, L) batch of integer ids, L within the context, ids within the vocabulary, a 0/1 mask
  of the same shape. Values are read only for concrete arrays (with `read_device` False, only for host
  arrays: see `check_images`); a `jax.ShapeDtypeStruct` has its shape and dtype checked."""
  shaped = (np.ndarray, jax.Array, jax.ShapeDtypeStruct)
  ids = input_ids if isinstance(input_ids, shaped) else np.asarray(input_ids)
  mask = attention_mask if isinstance(attention_mask, shaped) else np.asarray(attention_mask)
  if ids.ndim != 2:
    raise InputError(f"{name} must have shape (batch, length), got {tuple(ids.shape)}; flatten extra axes "
                     "or add a batch axis")
  if ids.shape[0] == 0:
    raise InputError(f"{name} is an empty batch (shape {tuple(ids.shape)}); pass at least one text")
  if ids.shape[1] == 0:
    raise InputError(f"{name} have length 0 (shape {tuple(ids.shape)}): no tokens at all; tokenize the texts "
                     "with mat_jax.models.load_tokenizer, which frames every text with its special tokens")
  if tuple(mask.shape) != tuple(ids.shape):
    raise InputError(f"attention_mask shape {tuple(mask.shape)} differs from {name} shape {tuple(ids.shape)}; "
                     "pass the mask the tokenizer returned with these ids")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise InputError(f"{name} must be integers, got dtype {ids.dtype}; tokenize the text with "
                     "mat_jax.models.load_tokenizer")
  if ids.shape[1] > context_length:
    raise InputError(f"{name} have length {ids.shape[1]} but the text model has {context_length} positions; "
                     f"tokenize with context_length={context_length} (load_tokenizer(..., "
                     f"context_length={context_length})), which truncates and keeps the end token")
  if is_traced(ids) or isinstance(ids, jax.ShapeDtypeStruct) or not (read_device or _on_host(ids)):
    return
  host = np.asarray(ids)
  lo, hi = int(host.min()), int(host.max())
  if lo < 0 or hi >= vocab_size:
    raise InputError(f"{name}: token ids must lie in [0, {vocab_size}) (the model's table size), got range "
                     f"[{lo}, {hi}]; the tokenizer does not match the model: load the tokenizer saved with these "
                     "weights, or build the model with the tokenizer's vocab_size")


def check_text_to_image(text_to_image: Any, n_images: int, n_texts: int | None = None, *,
                        name: str = "text_to_image", every_image: bool = True) -> np.ndarray:
  """Each text's image index: integers in [0, n_images), one per text, and (every_image) each image
  described by at least one text. Returns the indices as int64."""
  mapping = np.asarray(text_to_image)
  if n_images < 1:
    raise InputError(f"there are no images ({n_images}); pass at least one image")
  if mapping.ndim != 1 or (n_texts is not None and mapping.shape[0] != n_texts):
    expected = f"({n_texts},)" if n_texts is not None else "(n_texts,)"
    raise InputError(f"{name} must have one entry per text, shape {expected}, got {tuple(mapping.shape)}")
  if mapping.size == 0:
    raise InputError(f"{name} is empty: there are no texts; pass at least one caption")
  if not np.issubdtype(mapping.dtype, np.integer):
    raise InputError(f"{name} must hold integer image indices, got dtype {mapping.dtype}")
  bad = np.flatnonzero((mapping < 0) | (mapping >= n_images))
  if bad.size:
    t = int(bad[0])
    raise InputError(f"{name}[{t}] = {int(mapping[t])} is not an image index: there are {n_images} images, "
                     f"so each entry must be in [0, {n_images}) ({bad.size} entries are outside)")
  if every_image:
    counts = np.bincount(mapping, minlength=n_images)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
      raise InputError(f"image {int(missing[0])} has no caption ({missing.size} of {n_images} images have none); "
                       f"every image needs at least one text in {name}")
  return mapping.astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Random keys.


def as_key(key: Any, *, name: str = "key") -> Any:
  """A PRNG key from what the attacks take as one: an integral seed (a Python int, a numpy integer such as
  an element of `np.arange`, a 0-d integer array), a typed key (`jax.random.key`) or a raw uint32 key
  (`jax.random.PRNGKey`). Traced keys (inside the caller's `jit`) pass through as they are. Anything else,
  a batch of keys included, is an InputError."""
  if isinstance(key, (bool, np.bool_)):
    raise InputError(f"{name} must be an int seed or a jax.random.key, got {key!r}")
  if isinstance(key, (int, np.integer)):
    try:
      return jax.random.key(int(key))
    except OverflowError:
      raise InputError(f"{name}={key} is too large for a seed: it must fit in 64 bits") from None
  if isinstance(key, (jax.Array, np.ndarray)):
    shape, dtype = tuple(key.shape), key.dtype
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      if shape == ():
        return key
      raise InputError(f"{name} must be one key, got a batch of keys of shape {shape}; pass one of them")
    if dtype == np.uint32 and len(shape) == 1:  # a raw key, jax.random.PRNGKey(seed)
      if is_traced(key):
        return key
      try:
        return jax.random.wrap_key_data(key)
      except (TypeError, ValueError):
        raise InputError(f"{name}: a raw uint32 key of shape {shape} does not fit the default PRNG; pass an int "
                         "seed or a jax.random.key") from None
    if shape == () and jnp.issubdtype(dtype, jnp.integer):  # a seed as an array (a device one is not read)
      return jax.random.key(key if isinstance(key, jax.Array) else int(key))
    raise InputError(f"{name} must be an int seed or a jax.random.key, got an array of shape {shape} and dtype "
                     f"{dtype}")
  raise InputError(f"{name} must be an int seed or a jax.random.key, got {key!r} ({type(key).__name__})")


# ----------------------------------------------------------------------------------------------------
# Retrieval ranks.


def check_ranks(ranks: Any, *, name: str, length: int | None = None) -> np.ndarray:
  """Per-query ranks as `metrics.retrieval_ranks` returns them: a 1-D integer array, of `length` entries
  when given (the same queries as another ranking). Returns it as a numpy array."""
  arr = np.asarray(ranks)
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise InputError(f"{name} must be a 1-D array of integer ranks, got shape {arr.shape} and dtype {arr.dtype}; "
                     "rank a score matrix first with metrics.retrieval_ranks(scores, text_to_image)")
  if length is not None and arr.shape[0] != length:
    raise InputError(f"{name} holds {arr.shape[0]} ranks where {length} are expected: both rankings must be of "
                     "the same queries (the clean and the attacked set, ranked by metrics.retrieval_ranks)")
  # Unchecked, no query gives NaN recalls and a negative rank counts as a hit at every K.
  if arr.size == 0:
    raise InputError(f"{name} holds no rank: a recall needs at least one query")
  if arr.min() < 0:
    raise InputError(f"{name} holds the negative rank {int(arr.min())}: ranks count the items scored above the "
                     "right one, from 0 (metrics.retrieval_ranks)")
  return arr
