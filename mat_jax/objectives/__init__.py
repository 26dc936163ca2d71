"""Training objectives, one module per defense, all behind the `Objective` interface (base.py)."""

from __future__ import annotations

from typing import Any, Mapping

from mat_jax.objectives.base import Objective, hyperparameters
from mat_jax.objectives.contrastive import Contrastive, batch_clip_loss, clip_loss, contrastive_loss
from mat_jax.objectives.fare import FARE
from mat_jax.objectives.mat import MAT, MATPlus
from mat_jax.objectives.mava import MAVA
from mat_jax.objectives.mmcoa import MMCoA
from mat_jax.objectives.tecoa import TeCoA

__all__ = ["Objective", "OBJECTIVES", "Contrastive", "TeCoA", "FARE", "MMCoA", "MAVA", "MAT", "MATPlus",
           "batch_clip_loss", "clip_loss", "contrastive_loss", "get_class", "hyperparameters", "make"]

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Contrastive, TeCoA, FARE, MMCoA, MAVA, MAT, MATPlus)
}


def get_class(name: str) -> type[Objective]:
  if name not in OBJECTIVES:
    raise ValueError(f"unknown objective {name!r}; available: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def make(settings: Mapping[str, Any]) -> Objective:
  """An objective from its config section: {"name": ..., **hyper-parameters}."""
  settings = dict(settings)
  cls = get_class(settings.pop("name"))
  return cls(**settings)
