"""MAT+ on the shapes world: MAT with one-to-many augmentation. Each image comes with k = 3 of its
captions (the human-caption I2T of the paper: the world writes 5 per scene), some re-written fresh
(i2t), some images re-rendered from their scene (t2i), and EDA edits; the contrastive losses treat all
of an image's captions as positives.

    python -m mat_jax.train --config experiments/shapes_matplus.py
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "shapes_matplus"
  c.seed = 0
  c.model = dict(source="cache:shapes_clip")
  c.data = dict(name="shapes", image_size=48, captions_per_image=3, augmentations=("i2t:0.3", "t2i:0.3", "eda:0.2"))
  c.text_attack = dict(source="bert", bert="shapes-mlm", top_k=10)  # BERT-Attack with the world's MLM
  c.objective = dict(name="matplus", eps=2 / 255, steps=2, step_size=1 / 255, text_changes=1, clean_weight=0.0)
  c.train = dict(batch_size=32, steps=200, towers="all", log_every=10, checkpoint_every=50)
  c.optimizer = dict(name="adamw", learning_rate=2e-4, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
  c.schedule = dict(name="cosine", warmup_steps=20, end_factor=0.1)
  c.eval = dict(split="test", max_images=200, attacks=("pgd",), eps=2 / 255, steps=10)
  if arg == "runlocal":  # a smoke test: random tiny CLIP (no cached clean model needed), a few steps
    c.model = dict(source="tiny", tokenizer="shapes")
    c.train.update(batch_size=16, steps=10, log_every=2, checkpoint_every=5)
    c.schedule.warmup_steps = 2
    c.eval.max_images = 50
  return c
