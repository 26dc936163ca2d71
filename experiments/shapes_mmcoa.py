"""MMCoA on the shapes world under the shared fine-tuning budget (mat_jax/recipes.py):
λ_t·CLIPLoss(x, t') + λ_i·CLIPLoss(x', t) with independent text (1-word BERT-Attack) and image (PGD) attacks.

    python -m mat_jax.train --config experiments/shapes_mmcoa.py
    python -m mat_jax.train --config experiments/shapes_mmcoa.py:runlocal   # a few steps, smoke test
"""

from mat_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, runlocal=False)
  c = recipes.finetune("mmcoa")
  return recipes.runlocal(c) if args.runlocal else c
