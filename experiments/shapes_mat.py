"""MAT on the shapes world under the shared fine-tuning budget (mat_jax/recipes.py): fine-tune the clean
tiny CLIP with multimodal adversarial examples (1-word text attack, then 2-step PGD at 2/255 guided by the
adversarial text).

    python -m mat_jax.train --config experiments/shapes_mat.py
    python -m mat_jax.train --config experiments/shapes_mat.py:runlocal   # a few steps, smoke test
"""

from mat_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, runlocal=False)
  c = recipes.finetune("mat")
  return recipes.runlocal(c) if args.runlocal else c
