"""MAVA on the shapes world: vision-tower fine-tuning with CMS + VSSE (N = 3 neighbours) as the inner
loss and a·CMS + b·VSSE + c·SCA as the outer one (a, b, c = 0.002, 0.4, 0.6), 5 captions per image.

    python -m mat_jax.train --config experiments/shapes_mava.py
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "shapes_mava"
  c.seed = 0
  c.model = dict(source="cache:shapes_clip")
  c.data = dict(name="shapes", image_size=48, captions_per_image=5)
  c.objective = dict(name="mava", eps=2 / 255, steps=10, step_size=1 / 255, neighbours=3, beta=0.5,
                     a=0.002, b=0.4, c=0.6)
  c.train = dict(batch_size=32, steps=200, towers="vision", log_every=10, checkpoint_every=50)
  c.optimizer = dict(name="adamw", learning_rate=1e-4, weight_decay=1e-4)
  c.schedule = dict(name="cosine", warmup_steps=20, end_factor=0.0)
  c.eval = dict(split="test", max_images=200, attacks=("pgd",), eps=2 / 255, steps=10)
  if arg == "runlocal":  # a smoke test: random tiny CLIP (no cached clean model needed), a few steps
    c.model = dict(source="tiny", tokenizer="shapes")
    c.train.update(batch_size=16, steps=10, log_every=2, checkpoint_every=5)
    c.objective.steps = 2
    c.schedule.warmup_steps = 2
    c.eval.max_images = 50
  return c
