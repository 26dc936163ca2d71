"""BLIP on the shapes world: the tiny BLIP preset trained clean (ITC), then defended.

    python -m mat_jax.train --config experiments/shapes_blip.py            # clean ITC training
    python -m mat_jax.train --config experiments/shapes_blip.py:mat        # MAT from the clean model
    python -m mat_jax.train --config experiments/shapes_blip.py:tecoa,runlocal   # a few steps, smoke test

The argument picks the objective: clean (default), tecoa, mat or matplus. The defenses start from the
clean model (cache:shapes_blip, trained first if it is not in the cache), as the shapes CLIP
experiments do. Training uses BLIP's ITC features through the same train step as CLIP; the ITM head
is trained by none of these objectives (the references' robust fine-tuning is contrastive too), so
re-ranked evaluation (--itm-k) of a model trained here reflects a random ITM head: evaluate it by ITC.

The defenses take their objective, data and towers from the shapes CLIP methods (`recipes.METHODS`; TeCoA
is TeCoA-ITR on all towers, as in experiments/shapes_tecoa.py) under this file's own budget: 200 steps of
64 at lr 5e-4 (MAT+, with 3 captions per image, 32 at 2e-4).
"""

from mat_jax import recipes

OBJECTIVES = ("clean", "tecoa", "mat", "matplus")


def get_config(arg=None):
  args = recipes.parse_arg(arg, objective=("clean", OBJECTIVES), runlocal=False)
  clean = args.objective == "clean"
  c = recipes.shapes_base("shapes_blip" if clean else f"shapes_blip_{args.objective}")
  c.eval = dict(recipes.SHAPES_EVAL)
  c.schedule = dict(name="cosine", warmup_steps=20, end_factor=0.1)
  if clean:
    c.model = dict(source="blip-tiny", tokenizer="shapes")
    c.objective = dict(name="contrastive")
    # experiments/shapes_clip.py's batch (128), optimizer and cosine schedule, but shorter: 300 steps (not
    # 1,000), 30 warm-up steps (not 50), end factor 0.1 (not 0.05), and no periodic clean-recall evaluation.
    # All assumed for BLIP (same world, similar size), not tuned for it.
    c.train = dict(batch_size=128, steps=300, log_every=25, checkpoint_every=100, eval_every=0)
    c.optimizer = dict(name="adamw", learning_rate=1e-3, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
    c.schedule.warmup_steps = 30
    c.eval.attacks = ()
  else:
    # The CLIP defenses' objective, data and towers (recipes.METHODS).
    method = recipes.METHODS[args.objective]
    c.model = dict(source="cache:shapes_blip")
    c.objective = dict(method["objective"])
    c.data.update(method.get("data", {}))
    c.text_attack = dict(recipes.TEXT_ATTACK)  # the shapes-world MLM threat, as for the CLIP defenses
    c.train = dict(batch_size=64, steps=200, towers=method["towers"], log_every=10, checkpoint_every=50)
    c.optimizer = dict(name="adamw", learning_rate=5e-4, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
    if args.objective == "matplus":  # 3 captions per image: a smaller batch and rate
      c.train.batch_size = 32
      c.optimizer.learning_rate = 2e-4
  return recipes.runlocal(c, preset="blip-tiny") if args.runlocal else c
