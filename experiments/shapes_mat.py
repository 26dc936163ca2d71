"""MAT on the shapes world: fine-tune the clean tiny CLIP (experiments/shapes_clip.py) with multimodal
adversarial examples (1-word lexicon text attack, then 2-step PGD at 2/255 guided by the adversarial text).

    python -m mat_jax.train --config experiments/shapes_mat.py
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "shapes_mat"
  c.seed = 0
  c.model = dict(source="cache:shapes_clip")  # trained first if it is not in the cache
  c.data = dict(name="shapes", image_size=48, captions_per_image=1)
  c.text_attack = dict(source="bert", bert="shapes-mlm", top_k=10)  # BERT-Attack with the world's MLM
  c.objective = dict(name="mat", eps=2 / 255, steps=2, step_size=1 / 255, text_changes=1, clean_weight=0.0)
  # ~2 CPU-minutes.
  c.train = dict(batch_size=64, steps=200, towers="all", log_every=10, checkpoint_every=50)
  c.optimizer = dict(name="adamw", learning_rate=5e-4, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
  c.schedule = dict(name="cosine", warmup_steps=20, end_factor=0.1)
  c.eval = dict(split="test", max_images=200, attacks=("pgd",), eps=2 / 255, steps=10)
  if arg == "runlocal":  # a smoke test: random tiny CLIP (no cached clean model needed), a few steps
    c.model = dict(source="tiny", tokenizer="shapes")
    c.train.update(batch_size=16, steps=10, log_every=2, checkpoint_every=5)
    c.schedule.warmup_steps = 2
    c.eval.max_images = 50
  return c
