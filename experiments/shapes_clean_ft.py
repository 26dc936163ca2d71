"""The clean fine-tuning control under the shared fine-tuning budget (mat_jax/recipes.py): the same
starting checkpoint, steps, batch, optimizer and schedule as every defense, with the clean contrastive loss.
Any gain of a defense over this control is the defense's, not the extra training's.

    python -m mat_jax.train --config experiments/shapes_clean_ft.py
    python -m mat_jax.train --config experiments/shapes_clean_ft.py:runlocal   # a few steps, smoke test
"""

from mat_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, runlocal=False)
  c = recipes.finetune("clean_ft")
  return recipes.runlocal(c) if args.runlocal else c
