"""TeCoA-ITR on the shapes world under the shared fine-tuning budget (mat_jax/recipes.py): PGD on the
contrastive cross-entropy, adversarial images against clean text, all towers (the MAT paper's TeCoA-ITR;
--config.train.towers=vision for the original TeCoA).

    python -m mat_jax.train --config experiments/shapes_tecoa.py
    python -m mat_jax.train --config experiments/shapes_tecoa.py:runlocal   # a few steps, smoke test
"""

from mat_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, runlocal=False)
  c = recipes.finetune("tecoa")
  return recipes.runlocal(c) if args.runlocal else c
