"""FARE on the shapes world: unsupervised adversarial fine-tuning of the vision tower towards the frozen
original features (‖f(x') − f_orig(x)‖², 10-step PGD at 2/255, step 1/255, AdamW).

    python -m mat_jax.train --config experiments/shapes_fare.py
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "shapes_fare"
  c.seed = 0
  c.model = dict(source="cache:shapes_clip")
  c.data = dict(name="shapes", image_size=48, captions_per_image=1)
  c.objective = dict(name="fare", eps=2 / 255, steps=10, step_size=1 / 255)
  c.train = dict(batch_size=32, steps=200, towers="vision", log_every=10, checkpoint_every=50)
  # The reference's lr 1e-5 is for ViT-B/16 from OpenAI weights; the tiny model takes a larger one.
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
