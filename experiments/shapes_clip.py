"""Clean contrastive pretraining of the tiny CLIP on the shapes world: the starting model of every
method (mat_jax/recipes.py: `pretrain`), trained once into the cache as "cache:shapes_clip" by the first
command that needs it (`--model shapes`, a fine-tuning experiment, the demo). Run directly, it trains a
run of its own under ./runs/ (or --workdir), not the cache's:

    python -m mat_jax.train --config experiments/shapes_clip.py
    python -m mat_jax.train --config experiments/shapes_clip.py:runlocal   # a few steps, smoke test
"""

from mat_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, runlocal=False)
  c = recipes.pretrain()
  return recipes.runlocal(c) if args.runlocal else c
