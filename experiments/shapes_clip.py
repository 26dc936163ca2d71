"""Clean contrastive pretraining of the tiny CLIP on the shapes world (the demo's starting model).

    python -m mat_jax.train --config experiments/shapes_clip.py
    python -m mat_jax.train --config experiments/shapes_clip.py:runlocal   # a few steps, smoke test
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "shapes_clip"
  c.seed = 0
  c.model = dict(source="tiny", tokenizer="shapes")
  c.data = dict(name="shapes", image_size=48, captions_per_image=1)
  c.objective = dict(name="contrastive")
  # ~4 CPU-minutes: TR@1 59 / IR@1 56 on 500 test images (random: 0.2).
  c.train = dict(batch_size=128, steps=300, log_every=25, checkpoint_every=100, eval_every=0)
  c.optimizer = dict(name="adamw", learning_rate=1e-3, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
  c.schedule = dict(name="cosine", warmup_steps=30, end_factor=0.05)
  c.eval = dict(split="test", max_images=500, attacks=(), eps=2 / 255, steps=10)  # clean recall
  if arg == "runlocal":
    c.train.update(batch_size=16, steps=20, log_every=5, checkpoint_every=10)
    c.schedule.warmup_steps = 5
    c.eval.max_images = 50
  return c
