"""CLIP ViT-B/16 fine-tuned on COCO (Karpathy train split, 113k images): the settings of
experiments/flickr30k.py (mat_jax/recipes.py: `clip_vitb16`) with the same argument: mat, matplus, tecoa,
fare, mmcoa, mava or clean; runlocal.

    python -m mat_jax.data build karpathy --annotations dataset_coco.json --images coco --name coco \
        --image-size 224
    python -m mat_jax.train --config experiments/coco.py:mat --mesh 8
"""

from mat_jax import recipes

TRAIN_IMAGES = 113_287  # Karpathy train split


def get_config(arg=None):
  args = recipes.parse_arg(arg, defense=("mat", tuple(recipes.DEFENSES)), runlocal=False)
  c = recipes.clip_vitb16("coco", TRAIN_IMAGES, args.defense)
  return recipes.runlocal_corpus(c) if args.runlocal else c
