"""MAVA on the shapes world under the shared fine-tuning budget (mat_jax/recipes.py): vision-tower
fine-tuning with CMS + VSSE (N = 3 neighbours) inside and a·CMS + b·VSSE + c·SCA outside, 5 captions per image.

    python -m mat_jax.train --config experiments/shapes_mava.py
    python -m mat_jax.train --config experiments/shapes_mava.py:runlocal   # a few steps, smoke test
"""

from mat_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, runlocal=False)
  c = recipes.finetune("mava")
  return recipes.runlocal(c) if args.runlocal else c
