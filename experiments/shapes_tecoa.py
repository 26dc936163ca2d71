"""TeCoA on the shapes world: PGD on the contrastive cross-entropy, adversarial images vs clean text.
Vision tower as in the reference (TeCoA-ITR of the MAT paper: --config.train.towers=all).

    python -m mat_jax.train --config experiments/shapes_tecoa.py
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "shapes_tecoa"
  c.seed = 0
  c.model = dict(source="cache:shapes_clip")
  c.data = dict(name="shapes", image_size=48, captions_per_image=1)
  c.objective = dict(name="tecoa", eps=2 / 255, steps=2, step_size=1 / 255)
  c.train = dict(batch_size=32, steps=200, towers="vision", log_every=10, checkpoint_every=50)
  c.optimizer = dict(name="sgd", learning_rate=1e-2, momentum=0.9, weight_decay=0.0)
  c.schedule = dict(name="cosine", warmup_steps=20, end_factor=0.0)
  c.eval = dict(split="test", max_images=200, attacks=("pgd",), eps=2 / 255, steps=10)
  if arg == "runlocal":  # a smoke test: random tiny CLIP (no cached clean model needed), a few steps
    c.model = dict(source="tiny", tokenizer="shapes")
    c.train.update(batch_size=16, steps=10, log_every=2, checkpoint_every=5)
    c.schedule.warmup_steps = 2
    c.eval.max_images = 50
  return c
