"""BLIP on the shapes world: the tiny BLIP preset trained clean (ITC), then defended.

    python -m mat_jax.train --config experiments/shapes_blip.py            # clean ITC training
    python -m mat_jax.train --config experiments/shapes_blip.py:mat        # MAT from the clean model
    python -m mat_jax.train --config experiments/shapes_blip.py:tecoa,runlocal   # a few steps, smoke test

The argument picks the objective: clean (default), tecoa, mat or matplus. The defenses start from the
clean model (cache:shapes_blip, trained first if it is not in the cache), as the shapes CLIP
experiments do. Training uses BLIP's ITC features through the same train step as CLIP; the ITM head
is trained by none of these objectives (the references' robust fine-tuning is contrastive too), so
re-ranked evaluation (--itm-k) of a model trained here reflects a random ITM head: evaluate it by ITC.
"""

import ml_collections

from mat_jax import recipes

OBJECTIVES = ("clean", "tecoa", "mat", "matplus")


def get_config(arg=None):
  parts = [p for p in (arg or "").split(",") if p]
  runlocal = "runlocal" in parts
  parts = [p for p in parts if p != "runlocal"] or ["clean"]
  objective = parts[0]
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
  c = ml_collections.ConfigDict()
  c.name = "shapes_blip" if objective == "clean" else f"shapes_blip_{objective}"
  c.seed = 0
  c.data = dict(name="shapes", image_size=48, captions_per_image=1)
  c.eval = dict(split="test", max_images=200, attacks=("pgd",), eps=2 / 255, steps=10)
  c.schedule = dict(name="cosine", warmup_steps=20, end_factor=0.1)
  if objective == "clean":
    c.model = dict(source="blip-tiny", tokenizer="shapes")
    c.objective = dict(name="contrastive")
    # As experiments/shapes_clip.py (assumed to suit BLIP too: same world, similar size).
    c.train = dict(batch_size=128, steps=300, log_every=25, checkpoint_every=100, eval_every=0)
    c.optimizer = dict(name="adamw", learning_rate=1e-3, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
    c.schedule.warmup_steps = 30
    c.eval.attacks = ()
  else:
    c.model = dict(source="cache:shapes_blip")
    c.text_attack = dict(recipes.TEXT_ATTACK)  # the shapes-world MLM threat, as for the CLIP defenses
    c.train = dict(batch_size=64, steps=200, log_every=10, checkpoint_every=50)
    c.optimizer = dict(name="adamw", learning_rate=5e-4, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
    if objective == "tecoa":
      c.objective = dict(name="tecoa", eps=2 / 255, steps=2, step_size=1 / 255)
    else:
      c.objective = dict(name=objective, eps=2 / 255, steps=2, step_size=1 / 255, text_changes=1)
      if objective == "matplus":  # as experiments/shapes_matplus.py
        c.data.update(captions_per_image=3, augmentations=("i2t:0.3", "t2i:0.3", "eda:0.2"))
        c.train.batch_size = 32
        c.optimizer.learning_rate = 2e-4
  if runlocal:  # random tiny BLIP (no cached clean model needed), a few steps
    c.model = dict(source="blip-tiny", tokenizer="shapes")
    c.train.update(batch_size=16, steps=10, log_every=2, checkpoint_every=5)
    c.schedule.warmup_steps = 2
    c.eval.max_images = 50
    if "text_attack" in c:
      c.text_attack = dict(source="paraphrase", top_k=10)  # no MLM to train for a smoke test
  return c
