"""MMCoA on the shapes world: λ_t·CLIPLoss(x, t') + λ_i·CLIPLoss(x', t), independent text (lexicon
BERT-Attack, 1 word) and image (PGD on the contrastive loss) attacks; all parameters train (Adam).

    python -m mat_jax.train --config experiments/shapes_mmcoa.py
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "shapes_mmcoa"
  c.seed = 0
  c.model = dict(source="cache:shapes_clip")
  c.data = dict(name="shapes", image_size=48, captions_per_image=1)
  c.text_attack = dict(source="bert", bert="shapes-mlm", top_k=10)  # BERT-Attack with the world's MLM
  c.objective = dict(name="mmcoa", eps=2 / 255, steps=2, step_size=1 / 255, text_changes=1,
                     text_weight=0.5, image_weight=0.5)
  c.train = dict(batch_size=32, steps=200, towers="all", log_every=10, checkpoint_every=50)
  # Published: Adam lr 1e-6, wd 0.2 for ViT-B/32 from OpenAI weights; scaled up for the tiny model.
  c.optimizer = dict(name="adam", learning_rate=2e-4, weight_decay=0.0)
  c.schedule = dict(name="cosine", warmup_steps=20, end_factor=0.1)
  c.eval = dict(split="test", max_images=200, attacks=("pgd",), eps=2 / 255, steps=10)
  if arg == "runlocal":  # a smoke test: random tiny CLIP (no cached clean model needed), a few steps
    c.model = dict(source="tiny", tokenizer="shapes")
    c.train.update(batch_size=16, steps=10, log_every=2, checkpoint_every=5)
    c.schedule.warmup_steps = 2
    c.eval.max_images = 50
  return c
