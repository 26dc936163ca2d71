"""FARE on the shapes world under the shared fine-tuning budget (mat_jax/recipes.py): unsupervised
adversarial fine-tuning of the vision tower towards the frozen original features, ‖f(x') − f_orig(x)‖².

    python -m mat_jax.train --config experiments/shapes_fare.py
    python -m mat_jax.train --config experiments/shapes_fare.py:runlocal   # a few steps, smoke test
"""

from mat_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, runlocal=False)
  c = recipes.finetune("fare")
  return recipes.runlocal(c) if args.runlocal else c
