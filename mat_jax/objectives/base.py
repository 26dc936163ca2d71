"""The objective interface shared by every defense, so that one jitted train step serves them all.

An objective is a frozen dataclass: its fields are the static hyper-parameters (hashable, so they are
part of the compiled step's identity) and `loss` is a pure function

    loss(encoder, params, batch, key, reference) -> (scalar loss, metrics dict of scalars)

`params` is the full parameter state being trained (the train step differentiates through it with
respect to the trainable towers only); `reference` is the frozen original model's parameters for the
objectives that anchor to it (FARE, MAVA; `needs_reference`), else None. Inner attacks run on
`jax.lax.stop_gradient(params)`: adversarial examples are inputs of the outer loss, not functions of
the parameters (as in every reference implementation).

`batch` is the device batch: `images` (B, H, W, 3) in [0, 1], `input_ids`/`attention_mask` (B, L) or
(B, K, L), `image_ids` (B,), and for objectives with a text attack (`needs_text_candidates`) the
candidate arrays the input pipeline attached (see `mat_jax.training.inputs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mat_jax.models import DualEncoder

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  name: ClassVar[str] = ""
  # The frozen original parameters are passed as `reference` (FARE, MAVA).
  needs_reference: ClassVar[bool] = False
  # The batch carries text-attack candidates (MAT, MAT+, MMCoA).
  needs_text_candidates: ClassVar[bool] = False
  # The published recipe's towers; the config's train.towers decides.
  default_towers: ClassVar[str] = "all"

  def loss(self, encoder: DualEncoder, params: nnx.State, batch: dict[str, jax.Array],
           key: jax.Array, reference: nnx.State | None = None) -> tuple[jax.Array, Metrics]:
    raise NotImplementedError


def internal(default: Any = None) -> Any:
  """A field the run fills in (e.g. the tokenizer's static candidate layout), not a config key."""
  return dataclasses.field(default=default, metadata={"internal": True})


def hyperparameters(cls: type[Objective]) -> dict[str, Any]:
  """The objective's configurable fields and their defaults."""
  return {f.name: f.default for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def frozen(params: nnx.State) -> nnx.State:
  """The parameters as inner attacks see them: constants of the outer gradient."""
  return jax.lax.stop_gradient(params)


def texts_per_image(input_ids: jax.Array) -> int:
  """K for (B, K, L) ids (several captions per image), 1 for (B, L)."""
  return input_ids.shape[1] if input_ids.ndim == 3 else 1


def positives(image_ids: jax.Array | None, batch: int, k: int) -> jax.Array:
  """(B, B·K) bool: image b's positives among the flattened texts (its K captions, and those of any
  image sharing its id)."""
  groups = jnp.arange(batch) if image_ids is None else image_ids
  return groups[:, None] == jnp.repeat(groups, k)[None, :]
