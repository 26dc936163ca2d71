"""BLIP (ViT-B/16 at 384 px, transformers layout: Salesforce/blip-itm-base-flickr) fine-tuned on Flickr30k
(Karpathy train split), clean or defended. Evaluate it with ITM re-ranking, as BLIP and SGA do:

    python -m mat_jax.train --config experiments/flickr30k_blip.py:mat --mesh 8
    python -m mat_jax.evaluate --model runs/flickr30k_blip_mat --data flickr30k --itm-k 128
    python -m mat_jax.train --config experiments/flickr30k_blip.py:tecoa,runlocal

  clean    ITC fine-tuning without attacks (the baseline)
  mat      2-step PGD at 2/255 guided by a 1-word BERT-Attack text (MAT); all parameters
  matplus  MAT with the 5 human captions per image (I2T(Human)) and the multi-positive loss
  tecoa    PGD on the contrastive loss, eps 1/255, 2 steps of 1/255; image encoder only

Published settings followed (BLIP's configs/retrieval_flickr.yaml and train_retrieval.py): image size 384,
AdamW with lr 1e-5 and weight decay 0.05, a cosine from 1e-5 to min_lr 0 over 6 epochs that BLIP sets once at
the start of each epoch (so the rate is constant within an epoch and the last epoch runs at 0.067x the
first's), batch 32 per GPU on 8 GPUs (256), k_test 128 for the ITM re-ranking. BLIP's epoch is one pass over
its annotation list, one entry per (image, caption) pair: 145,000 pairs, so 6 epochs are 3,398 steps of 256;
each step here draws one caption per image (matplus all five of them, with the same steps). Values marked
"assumed" are not in a reference. BLIP's own fine-tuning adds the ITM loss with hard negatives and momentum
distillation (queue 57,600, alpha 0.4); the objectives here train the ITC features that the attacks use (the
MAT paper's objective is contrastive), so the ITM head keeps its pretrained weights (assumed: the MAT paper
does not say how BLIP's ITM head is treated).

Prepare the data and weights first (no network access is needed by mat_jax itself):
  python -m mat_jax.data build karpathy --annotations dataset_flickr30k.json --images flickr30k-images \\
      --name flickr30k --image-size 384
  a transformers-layout copy of Salesforce/blip-itm-base-flickr (its tokenizer files beside it) and of
  bert-base-uncased (dirs or hub ids).
"""

import math

from mat_jax import recipes

TRAIN_PAIRS = 29_000 * 5  # Karpathy train split: 29,000 images x 5 captions, BLIP's epoch
EPOCHS = 6                # BLIP retrieval_flickr.yaml max_epoch
BATCH = 256               # 32 per GPU x 8 GPUs (BLIP)
DEFENSES = ("clean", "mat", "matplus", "tecoa")


def get_config(arg=None):
  args = recipes.parse_arg(arg, defense=("mat", DEFENSES), runlocal=False)
  c = recipes.corpus_base(f"flickr30k_blip_{args.defense}", "flickr30k", image_size=384)
  c.model = dict(source="Salesforce/blip-itm-base-flickr", tokenizer="", context_length=35)  # BLIP max_length 35
  c.train = dict(batch_size=BATCH, steps=EPOCHS * TRAIN_PAIRS // BATCH, log_every=50, checkpoint_every=500)
  c.optimizer = dict(name="adamw", learning_rate=1e-5, weight_decay=0.05)
  c.schedule = epoch_cosine(c.train.steps)
  recipes.published_defense(c, args.defense)  # the objective, towers and captions of the MAT/TeCoA papers
  return recipes.runlocal_corpus(c) if args.runlocal else c


def epoch_cosine(steps: int) -> dict:
  """BLIP's cosine_lr_schedule, set at each epoch's start: epoch e of EPOCHS runs at
  lr * (1 + cos(pi * e / EPOCHS)) / 2 (min_lr 0), as Optax's piecewise-constant schedule of the ratios
  between consecutive epochs' rates, each from the step where BLIP's epoch begins."""
  rates = [(1 + math.cos(math.pi * e / EPOCHS)) / 2 for e in range(EPOCHS)]
  return dict(name="optax.piecewise_constant_schedule", warmup_steps=0, kwargs=dict(boundaries_and_scales={
      round(e * steps / EPOCHS): rates[e] / rates[e - 1] for e in range(1, EPOCHS)}))
