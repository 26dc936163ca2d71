"""The shapes-world study: every method under one budget (mat_jax/recipes.py), several seeds, every attack.

    python -m mat_jax.study                      # this file: claims 1-3, six arms (see docs/study.md)
    python -m mat_jax.study --config experiments/study_shapes.py:full   # + MMCoA, MAVA, claims 4-5: 12 arms
    python -m mat_jax.study --config experiments/study_shapes.py:paraphrase  # + claim 6: MAT vs paraphrases
    python -m mat_jax.study --config experiments/study_shapes.py:full,paraphrase  # all 13 arms: docs/results
    python -m mat_jax.study --config experiments/study_shapes.py:mmcoa   # MMCoA (as MMCoA.py) and the control
    python -m mat_jax.study --config experiments/study_shapes.py:heldout,eval_images=500  # claim 7: held-out forms
    python -m mat_jax.study --config experiments/study_shapes.py:exposure,eval_images=500  # claim 7: MAT's exposure
    python -m mat_jax.study --config experiments/study_shapes.py:compute,seeds=5,arms=tecoa+fare+mat+tecoa_2x+fare_4x
        # claims 1 and 7 against TeCoA and FARE with MAT's compute (2x, 4x the steps; also with exposure)
    python -m mat_jax.study --config experiments/study_shapes.py:budgets=4,seeds=5,arms=tecoa+fare+mat
        # the trained runs evaluated again with the image attacks at 4/255: every claim at that budget too
    python -m mat_jax.study --config experiments/study_shapes.py:train_eps=4,seeds=5,arms=tecoa+fare+mat
        # every arm trained and attacked at 4/255: the claims under the threat model the arms train for
    python -m mat_jax.study --config experiments/study_shapes.py:train_eps=4,guidance,seeds=5,arms=mat+mat_unguided
        # + MAT with its image attack guided by the clean captions (objective.guided=False)
    python -m mat_jax.study --quick              # get_config("quick"): tiny sizes, 1 seed, minutes
    python -m mat_jax.study --config experiments/study_shapes.py:full,eval_images=500  # cheaper: half the test images
    python -m mat_jax.study --config experiments/study_shapes.py:full,seeds=5,arms=mat+tecoa --out results/mine
        # some arms of a variant (+-separated), more seeds: they join the runs of its study dir

More seeds or another test subset reuse the trained runs of the same study dir (mat_jax/study.py). A
study of its own (mmcoa, heldout, exposure) writes its report to docs/results/<NAME>/.

An arm is a method of `recipes.METHODS` with an optional `variant` (changes of its method-defining
objective/data keys) and the attacks it is evaluated under. The main arms are evaluated under every
attack but Sep-Attack and the paraphrase control (the control arm takes all seven); the MAT+ ablation arms
under clean and the multimodal attacks their claims are about.
"""

import ml_collections

from mat_jax import recipes, study
from mat_jax.data import shapes
from mat_jax.errors import ConfigError

ALL_ATTACKS = ("clean", "pgd", "bert", "sep", "co", "sga", "paraphrase")
# The defenses under the unimodal and multimodal attacks; Sep-Attack and the paraphrase control are
# measured on the clean fine-tuned control, where they answer "does the threat hurt at all".
METHOD_ATTACKS = ("clean", "pgd", "bert", "co", "sga")
ABLATION_ATTACKS = ("clean", "co", "sga")
# The meaning-filtered text attacks (true adversarial captions only), with PGD and the unfiltered threat.
HELDOUT_ATTACKS = ("clean", "pgd", "bert", "bert_filtered", "co_filtered", "sga_filtered")
# Random meaning-preserving edits of every training caption (shapes.eda: about a third of the words with
# synonyms replaced), the held-out world's non-adversarial way to meet the held-out forms.
HELDOUT_EDA = ("eda:1.0",)


def _arm(method, attacks=METHOD_ATTACKS, steps_factor=1, **variant):
  arm = dict(method=method, variant=variant, attacks=tuple(attacks))
  if steps_factor != 1:
    arm["steps_factor"] = steps_factor
  return arm


# How many of its steps a baseline takes for one MAT step (the text attack, then the image attack it
# guides), measured on a 2-core CPU (jax 0.10.2, 2026-11-27): MAT's 150 steps train in 103-114 s,
# TeCoA's in 54-57 s (the five-seed exposure study), FARE's (the vision tower only, no text) in about 30 s
# (fare_4x: 600 in 110-144 s). Rounded up, so the baseline gets at least MAT's compute.
COMPUTE_FACTORS = {"tecoa": 2, "fare": 4}


def get_config(arg=None):
  args = recipes.parse_arg(arg, quick=False, full=False, paraphrase=False, mmcoa=False, heldout=False,
                           exposure=False, compute=False, guidance=False, seeds=3, eval_images=0, arms="",
                           budgets="", train_eps=0.0)
  variants = ("full", "paraphrase", "mmcoa", "heldout", "exposure", "quick")
  for own in ("mmcoa", "heldout", "exposure"):
    if args[own] and sum(bool(args[k]) for k in variants) > 1:
      raise ConfigError(f"the study-file argument {own} is a study of its own; give it without "
                        f"{', '.join(k for k in variants if k != own)}")
  c = ml_collections.ConfigDict()
  c.name = "shapes_study"
  c.seeds = args.seeds        # seed s: data order, fine-tuning randomness and attack randomness
  c.eps_255 = 2.0
  c.eval_images = args.eval_images  # of the test split's 1,000 (0 = all)
  c.eval_batch = 100
  c.budget = {}               # shrinks of the shared budget ({"train": {...}, "schedule": {...}}), quick only
  c.data = {}                 # overrides of data.* (world size), quick mode only
  c.model_source = ""         # "" = the shared clean checkpoint (cache:shapes_clip)
  c.model_overrides = ""      # with a model_source preset: its changes ("vision.layers=1,...")
  c.text_source = ""          # "" = the shared text threat (recipes.TEXT_ATTACK) in training and "bert"
  c.arms = {
      "clean_ft": _arm("clean_ft", ALL_ATTACKS),
      "tecoa": _arm("tecoa"),
      "fare": _arm("fare"),
      "mat": _arm("mat"),
      "matplus": _arm("matplus"),
      # Claim 3: the same augmented pairs modelled 1:1 (an image's other captions are negatives).
      "matplus_1to1": _arm("matplus", ABLATION_ATTACKS, objective={"one_to_one": True}),
  }
  if args.full:
    # The other two multimodal/one-to-many baselines of the shared budget.
    c.arms["mmcoa"] = _arm("mmcoa")
    c.arms["mava"] = _arm("mava")
    # Claim 4: text augmentation only (2 captions, I2T, EDA) vs image augmentation only (2 renderings
    # of each scene in a batch: image-side N:1, T2I, jitter); the same number of positives per scene.
    c.arms["matplus_text"] = _arm(
        "matplus", ABLATION_ATTACKS, data={"captions_per_image": 2, "augmentations": ("i2t:0.3", "eda:0.2")})
    c.arms["matplus_image"] = _arm(
        "matplus", ABLATION_ATTACKS, data={"captions_per_image": 1, "renderings_per_scene": 2,
                                           "augmentations": ("t2i:0.3", "image_jitter:0.3")})
    # Claim 5: alignment (a noisy captioner writes a wrong attribute in 30% of captions) and
    # diversity (5 captions per image and twice the I2T rate instead of 3 and 0.3). The same study name:
    # its other arms are the default study's runs, reused from the same study dir.
    c.arms["matplus_misaligned"] = _arm(
        "matplus", ABLATION_ATTACKS, data={"augmentations": ("i2t:0.3", "t2i:0.3", "eda:0.2", "misalign:0.3")})
    c.arms["matplus_diverse"] = _arm(
        "matplus", ABLATION_ATTACKS, data={"captions_per_image": 5, "augmentations": ("i2t:0.6", "t2i:0.3", "eda:0.2")})

  if args.paraphrase:
    # Claim 6 (beyond the papers): MAT trained against the meaning-preserving paraphrase source instead of
    # the MLM's label flips, evaluated under the MLM threat like every arm.
    c.arms["mat_paraphrase"] = _arm("mat", text_attack={"source": "paraphrase"})
  if args.guidance:
    # What MAT's guidance buys: MAT whose image attack is guided by the clean captions instead of the
    # adversarial ones (objective.guided=False), its text attack and its outer loss on the adversarial pairs
    # unchanged; against MAT it separates the guidance from training on the adversarial captions.
    c.arms["mat_unguided"] = _arm("mat", objective={"guided": False})
  if args.mmcoa:
    # MMCoA as MMCoA.py trains it (Co-Attack's KL text scoring, the summed CLIPLoss) beside the clean
    # fine-tuned control, in a study directory of its own: the committed `full` run's MMCoA arm is an
    # earlier variant (docs/results/shapes_study.md).
    c.name = "shapes_study_mmcoa"
    c.arms = {"clean_ft": _arm("clean_ft"), "mmcoa": _arm("mmcoa")}
  if args.heldout:
    # Claim 7: the held-out-forms world (recipes.HELDOUT_FORMS_WORLD). Every stored caption, in training and
    # in the test split, uses each word's canonical form; the masked LM, trained on the default world, also
    # proposes the other forms, which the meaning filter keeps: a meaning-preserving attack with words that
    # the clean pretraining, the control and TeCoA never see (MAT only where its training attack writes
    # them, mat_paraphrase by construction, the EDA arms and MAT+ through their EDA). The starting model is
    # pretrained on this world (experiments/shapes_clip_heldout.py).
    c.name = "shapes_study_heldout"
    c.data = dict(recipes.HELDOUT_FORMS_WORLD)
    c.model_source = "cache:shapes_clip_heldout"
    c.arms = {"clean_ft": _arm("clean_ft", HELDOUT_ATTACKS), "tecoa": _arm("tecoa", HELDOUT_ATTACKS),
              "mat": _arm("mat", HELDOUT_ATTACKS),
              "mat_paraphrase": _arm("mat", HELDOUT_ATTACKS, text_attack={"source": "paraphrase"}),
              # The same words at random instead of by an adversary: every training caption edited
              # EDA-style (its synonyms drawn from the lexicon the paraphrase source searches), with no
              # adversary (the control) and with TeCoA's image adversary. mat_paraphrase against tecoa_eda
              # asks whether choosing the substitutes adversarially matters, or only meeting them.
              "clean_ft_eda": _arm("clean_ft", HELDOUT_ATTACKS, data={"augmentations": HELDOUT_EDA}),
              "tecoa_eda": _arm("tecoa", HELDOUT_ATTACKS, data={"augmentations": HELDOUT_EDA}),
              # MAT's text adversary on top of the same exposure: the multimodal training's own share.
              "mat_eda": _arm("mat", HELDOUT_ATTACKS, data={"augmentations": HELDOUT_EDA}),
              # MAT+ as published: besides the text adversary it shares with MAT, its EDA (a fifth of its
              # captions, about 38 of the 192 per step against the EDA arms' 64) is its only source of
              # held-out forms (i2t writes canonical ones); without it, what its other differences from MAT
              # (3 captions, i2t/t2i, the 1:N objective) do.
              "matplus": _arm("matplus", HELDOUT_ATTACKS),
              "matplus_no_eda": _arm("matplus", HELDOUT_ATTACKS, data={"augmentations": tuple(
                  a for a in recipes.METHODS["matplus"]["data"]["augmentations"] if not a.startswith("eda"))})}
  if args.exposure:
    # Claim 7's exposure control, in the held-out-forms world beside TeCoA and MAT: MAT whose training
    # attack may not write a held-out form (it keeps every other MLM proposal, the label flips included),
    # so it never shows the model a word only the evaluation's attacker uses. MAT's lead over TeCoA under
    # the meaning-filtered attacks either survives without that exposure or goes with it.
    c.name = "shapes_study_exposure"
    c.data = dict(recipes.HELDOUT_FORMS_WORLD)
    c.model_source = "cache:shapes_clip_heldout"
    c.arms = {"tecoa": _arm("tecoa", HELDOUT_ATTACKS), "mat": _arm("mat", HELDOUT_ATTACKS),
              "mat_no_heldout": _arm("mat", HELDOUT_ATTACKS, text_attack={"exclude_words": shapes.held_out_forms()})}
  if args.compute:
    # The compute-matched controls of the claims that MAT beats the unimodal baselines (1 and 7): the
    # shared budget is equal steps, and MAT's step costs COMPUTE_FACTORS[method] of theirs; given that many
    # times the steps (and images), a baseline spends MAT's compute. A lead that survives is not bought.
    if args.mmcoa or args.quick:
      raise ConfigError("the study-file argument compute adds TeCoA (and FARE) with MAT's compute beside the "
                        "arms of claims 1 and 7; give it with the default study, full, paraphrase, heldout or "
                        "exposure")
    # FARE, claim 1's other unimodal baseline, is an arm of the default world only.
    baselines = ("tecoa",) if args.heldout or args.exposure else ("tecoa", "fare")
    for method in baselines:
      factor = COMPUTE_FACTORS[method]
      c.arms[f"{method}_{factor}x"] = _arm(method, c.arms[method]["attacks"], steps_factor=factor)
  if args.quick:  # tests and CI: a small world, a random tiny CLIP, a few steps, 1 seed
    c.name = "shapes_study_quick"
    c.seeds = 1
    c.eval_images = 12
    c.eval_batch = 12
    c.model_source = "tiny"
    # One block of width 32 per tower: the quick study checks the machinery, and compiling it is its cost.
    c.model_overrides = ("vision.layers=1,vision.width=32,vision.heads=2,vision.mlp_dim=64,"
                         "text.layers=1,text.width=32,text.heads=2,text.mlp_dim=64,projection_dim=32")
    c.text_source = "paraphrase"  # no MLM to train; "bert" then runs the paraphrase source too
    c.budget = dict(train=dict(steps=2, batch_size=16, log_every=1, checkpoint_every=2),
                    schedule=dict(warmup_steps=1))
    c.data = dict(build_train=32, build_val=8, build_test=12)
    # The control and one defense under one attack of each kind (none, text, multimodal, meaning-filtered):
    # a claim to compute, and every step of a study (train, evaluate, resume, report) run once.
    c.arms = {"clean_ft": _arm("clean_ft", ("clean", "bert", "co", "bert_filtered")),
              "mat": _arm("mat", ("clean", "bert", "co"))}
  if args.train_eps:
    # The whole study at another budget: every arm that trains against an image attack trains at
    # train_eps/255 (recipes.finetune's eps_255: the PGD step size scaled with it), and every arm is attacked
    # at the same budget, the threat model it was trained for. A study dir of its own (its runs differ).
    if args.quick:
      raise ConfigError("the study-file argument train_eps trains the study's arms at another budget; give it "
                        "without quick")
    if args.train_eps == recipes.EPS_255:
      raise ConfigError(f"train_eps={args.train_eps:g} is the shared budget's ε, the default study's; leave it out")
    c.name = f"{c.name}_train{args.train_eps:g}"
    c.eps_255 = float(args.train_eps)
    for arm in c.arms.values():
      if recipes.has_image_attack(arm["method"]):
        arm["train_eps_255"] = float(args.train_eps)
  if args.budgets:
    # Other attack budgets, evaluation only: every arm's attacks with an image budget again at each (co@4:
    # Co-Attack at 4/255), its trained runs reused; the study tests every claim at each budget too.
    try:
      extra = [float(b) for b in args.budgets.split("+") if b]
    except ValueError:
      raise ConfigError(f"budgets={args.budgets}: +-separated numbers in 1/255 units, e.g. budgets=1+4") from None
    for arm in c.arms.values():
      arm["attacks"] = tuple(arm["attacks"]) + tuple(
          study.at_budget(a, b) for b in extra for a in arm["attacks"] if study.has_image_budget(a))
  if args.arms:
    # Some of the variant's arms, as it defines them and under its name (its study dir): e.g. more seeds
    # for the arms of a few claims, joining the runs the whole study trained. The report goes to --out.
    chosen = [name for name in args.arms.split("+") if name]
    unknown = [name for name in chosen if name not in c.arms]
    if unknown:
      raise ConfigError(f"arms={args.arms}: no arm {', '.join(unknown)} in this variant; its arms are "
                        f"{'+'.join(c.arms)}")
    c.arms = {name: c.arms[name] for name in chosen}
  return c
