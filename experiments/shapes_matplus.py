"""MAT+ on the shapes world under the shared fine-tuning budget (mat_jax/recipes.py): MAT on one-to-many
data. Each image comes with k = 3 of its captions (the human-caption I2T of the paper: the world writes 5
per scene), some re-written fresh (i2t), some images re-rendered from their scene (t2i), and EDA edits; the
contrastive losses treat all of an image's captions as positives (objective.one_to_one=true: as negatives).

    python -m mat_jax.train --config experiments/shapes_matplus.py
    python -m mat_jax.train --config experiments/shapes_matplus.py:runlocal   # a few steps, smoke test
"""

from mat_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, runlocal=False)
  c = recipes.finetune("matplus")
  return recipes.runlocal(c) if args.runlocal else c
