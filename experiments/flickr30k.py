"""CLIP ViT-B/16 (OpenAI weights, transformers layout) fine-tuned on Flickr30k (Karpathy train split).

The argument picks the defense, with the published settings (mat_jax/recipes.py: `clip_vitb16`, shared
with experiments/coco.py; where a paper leaves a value out, the choice is marked "assumed" there):

    python -m mat_jax.train --config experiments/flickr30k.py:mat --mesh 8
    python -m mat_jax.train --config experiments/flickr30k.py:fare,runlocal

  mat      2-step PGD at 2/255 guided by a 1-word BERT-Attack text (MAT, WACV 2026); all parameters
  matplus  MAT with the 5 human captions per image (I2T(Human)) and the multi-positive loss
  tecoa    PGD on the contrastive loss, eps 1/255, 2 steps of 1/255, SGD; vision tower
  fare     ||f(x') - f_orig(x)||^2, eps 2/255, 10 steps of 1/255, AdamW lr 1e-5, wd 1e-4; vision tower
  mmcoa    0.5 CLIPLoss(x, t') + 0.5 CLIPLoss(x', t), PGD eps 1/255, 10 steps of 1/255, Adam lr 1e-6,
           wd 0.2; all parameters
  mava     CMS + VSSE inner, 0.002 CMS + 0.4 VSSE + 0.6 SCA outer, N=3, 5 captions, lr 1e-4, wd 1e-4;
           vision tower; neighbours in U(-βε, βε) with β = 0.5 assumed (the paper gives no β)
  clean    contrastive fine-tuning without attacks (the baseline)

Prepare the data and weights first (no network access is needed by mat_jax itself):
  python -m mat_jax.data build karpathy --annotations dataset_flickr30k.json --images flickr30k-images \
      --name flickr30k --image-size 224
  a transformers-layout copy of openai/clip-vit-base-patch16 and of bert-base-uncased (dirs or hub ids).
"""

from mat_jax import recipes

TRAIN_IMAGES = 29_000   # Karpathy train split


def get_config(arg=None):
  args = recipes.parse_arg(arg, defense=("mat", tuple(recipes.DEFENSES)), runlocal=False)
  c = recipes.clip_vitb16("flickr30k", TRAIN_IMAGES, args.defense)
  return recipes.runlocal_corpus(c) if args.runlocal else c
