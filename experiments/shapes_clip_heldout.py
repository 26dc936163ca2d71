"""Clean contrastive pretraining of the tiny CLIP on the held-out-forms shapes world: every caption word
takes its canonical form ("red", "square", "top", "below"), so the synonyms the world's masked LM knows
("crimson", "box", "upper", "beneath") never reach the model in training (`shapes.form_picker`,
docs/text_threat.md). The starting model of the held-out-forms study, trained once into the cache as
"cache:shapes_clip_heldout" by the first command that names it (the evaluation below trains it first;
`python -m mat_jax.train --config experiments/shapes_clip_heldout.py` trains a run of its own under
./runs/ instead):

    python -m mat_jax.evaluate --model cache:shapes_clip_heldout --rare-form-rate 0 --meaning-filter
"""

from mat_jax import recipes


def get_config(arg=None):
  args = recipes.parse_arg(arg, runlocal=False)
  c = recipes.pretrain(world=recipes.HELDOUT_FORMS_WORLD, name="shapes_clip_heldout")
  return recipes.runlocal(c) if args.runlocal else c
