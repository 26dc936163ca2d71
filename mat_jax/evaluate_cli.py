"""The command line of `python -m mat_jax.evaluate` (the evaluation itself is `mat_jax.evaluate`).

    python -m mat_jax.evaluate --model shapes --attacks pgd,bert,co,sga --eps 1,2,4
    python -m mat_jax.evaluate --task zeroshot --model shapes

A "shapes" or "cache:NAME" model is trained into the cache first if it is not there yet
(`mat_jax.training.loop.ensure_cached_run`), after every flag is checked. Both tasks' command lines live here:
retrieval's (`build_parser`, evaluated by `mat_jax.evaluate`) and zero-shot's (`build_zeroshot_parser`,
`parse_zeroshot_args`, `run_zeroshot`; the classification itself is `mat_jax.zeroshot`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

from mat_jax import errors, rerank, runs, runtime, zeroshot
from mat_jax import evaluate as evaluate_lib
from mat_jax import mesh as mesh_lib
from mat_jax.attacks import candidates
from mat_jax.attacks import spec as attack_specs
from mat_jax.data import corpora, shapes
from mat_jax.errors import InputError
from mat_jax.evaluate import ATTACKS
from mat_jax.models import layers
from mat_jax.models.blip import BLIP_PRESETS
from mat_jax.models.clip import resolve_dtype
from mat_jax.training import inputs, loop

TASKS = ("retrieval", "zeroshot")  # --task; each has its own parser


def _check_text_source(name: str, data: str, bert: str | None) -> str:
  """The source --text-source resolves to ("auto": bert on shapes data or with --bert, else charedit), refused
  when it cannot serve this data (checked before any work)."""
  if name == "auto":
    name = "bert" if data == "shapes" or bert else "charedit"
  inputs.check_source_name(name)
  if name == "paraphrase" and data != "shapes":
    raise InputError("--text-source paraphrase is the shapes world's synonym table; for other data use "
                     "--text-source bert --bert DIR (or charedit)")
  if name == "bert" and not bert and data != "shapes":
    raise InputError("--text-source bert needs --bert: a BERT masked-LM directory or hub id "
                     "(e.g. bert-base-uncased in the transformers layout)")
  return name


def itm_k_for(model: str, requested: int | None, has_itm: bool) -> tuple[int | None, str | None]:
  """The ITM re-ranking depth of an evaluation (None: rank by ITC alone) and a note to print, if any.

  BLIP's default re-ranks (`rerank.DEFAULT_K`), unless the model's chain of runs started from a randomly
  initialised BLIP preset: no mat_jax objective trains the ITM head, so it is random still."""
  if not has_itm:
    return None, None
  itm_k = rerank.DEFAULT_K if requested is None else requested or None
  root = runs.root_source(model)
  if root not in BLIP_PRESETS:
    return itm_k, None
  if requested is None:
    return None, (f"ranking by ITC alone: {model} was trained from the randomly initialised {root!r}, and no "
                  "mat_jax objective trains BLIP's ITM head; --itm-k K re-ranks by it anyway")
  if itm_k:
    return itm_k, (f"warning: --itm-k {itm_k} re-ranks by the ITM head of {model}, trained from the randomly "
                   f"initialised {root!r}: no mat_jax objective trains that head, so its scores are random")
  return None, None


def _text_source(name: str, data: str, bert: str | None, top_k: int):
  """--text-source as a candidate source: BERT-Attack with --bert, or on shapes data with the shapes world's
  MLM ("shapes-mlm"); the paraphrase table; character edits."""
  name = _check_text_source(name, data, bert)
  if name == "bert" and not bert:
    bert = "shapes-mlm"
  return inputs.make_source(name, bert=bert or "", top_k=top_k)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mat_jax.evaluate", description=evaluate_lib.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", choices=TASKS, default="retrieval",
                 help="retrieval (this command's flags) or zeroshot: classification accuracy under attack, "
                      "with its own flags (python -m mat_jax.evaluate --task zeroshot --help)")
  p.add_argument("--model", required=True,
                 help="shapes | cache:NAME | training run dir | transformers-layout dir | hub id")
  p.add_argument("--tokenizer", help="tokenizer source if not beside the model")
  p.add_argument("--surrogate",
                 help="generate the attacks on this model instead (transfer); same forms as --model")
  p.add_argument("--surrogate-tokenizer", help="the surrogate's tokenizer source if not beside it")
  p.add_argument("--data", default="shapes", help="shapes, or the name of a corpus built with mat_jax.data")
  p.add_argument("--split", default="test")
  p.add_argument("--rare-form-rate", type=float, default=None,
                 help="shapes data: the world whose captions take each word's canonical form except with this "
                      "probability (0: the held-out-forms world, where the model under test was trained; "
                      "docs/text_threat.md); default: every form equally likely")
  p.add_argument("--data-dir", type=errors.directory,
                 help="datasets root (default $MAT_JAX_DATA_DIR or ~/.cache/mat_jax/datasets)")
  p.add_argument("--limit", type=errors.positive_int, help="evaluate the first N images only (quick runs)")
  p.add_argument("--attacks", type=evaluate_lib.comma_names(ATTACKS), default=list(evaluate_lib.DEFAULT_ATTACKS),
                 help=f"comma list of {','.join(ATTACKS)} (default {','.join(evaluate_lib.DEFAULT_ATTACKS)})")
  p.add_argument("--eps", type=evaluate_lib.eps_budgets, default=[2.0],
                 help="budgets in 1/255 units, e.g. 1,2,4 (with --norm l2: the L2 radius, 127.5 = 0.5)")
  p.add_argument("--steps", type=errors.positive_int, default=10)
  p.add_argument("--apgd-steps", type=errors.positive_int, default=100)
  p.add_argument("--alpha", type=float, default=evaluate_lib.AttackSettings.alpha, help="Co-Attack's text-term weight")
  p.add_argument("--norm", choices=attack_specs.NORMS, default="linf")
  p.add_argument("--text-source", default="auto",
                 help="auto | bert | paraphrase | charedit (auto: bert on shapes data, with the shapes-mlm)")
  p.add_argument("--bert", help="BERT masked LM for --text-source bert: shapes-mlm (the shapes world's, "
                                "the default on shapes data), a transformers-layout directory or hub id")
  p.add_argument("--meaning-filter", action="store_true",
                 help="shapes data, one changed word: keep only substitutes after which the caption still "
                      "describes its image, so the text attacks search true adversarial captions, never label "
                      "flips (docs/text_threat.md)")
  p.add_argument("--top-k", type=errors.positive_int, default=10, help="substitute candidates per word")
  p.add_argument("--max-changes", type=errors.positive_int, default=1,
                 help="words the text attack may change per caption")
  p.add_argument("--batch-size", type=errors.positive_int, default=32,
                 help="images per attack batch; tecoa, mat and mmcoa take their negatives from the batch's "
                      "captions, so their numbers hold at this size (at least 2 for them)")
  p.add_argument("--seed", type=errors.seed, default=0, help="random starts (reproducible at a fixed --batch-size)")
  add_execution_arguments(p)
  p.add_argument("--out", type=errors.directory, default="eval_results",
                 help="directory for results.json and recall_vs_eps.png")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--mesh", help=mesh_lib.CACHED_MODEL_MESH_HELP)
  p.add_argument("--itm-k", type=int, help="BLIP targets: re-rank each query's top K by ITM (BLIP's evaluation; "
                 f"the references use 128 or 256; default {rerank.DEFAULT_K} for BLIP, 0 ranks by ITC alone)")
  return p


def add_execution_arguments(p: argparse.ArgumentParser) -> None:
  """How the models are computed (not what they compute), as `model.*` of a training config: both tasks."""
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="compute dtype of the models (auto: bfloat16 on GPU/TPU, float32 on CPU)")
  p.add_argument("--scan-layers", action="store_true", help="run encoder blocks as one lax.scan (faster compiles)")
  p.add_argument("--attention", default="auto", choices=layers.ATTENTION_PATHS,
                 help="attention path (auto: einsum on CPU, cuDNN flash attention on GPU in bf16, else XLA)")
  p.add_argument("--remat", default="none", choices=layers.REMAT_POLICIES,
                 help="what an attack's backward pass keeps of each encoder block (less memory for "
                      "recomputing the rest; same numbers): none keeps everything")


def execution_options(args: argparse.Namespace) -> dict:
  """The flags of `add_execution_arguments` as `evaluate.load_victim`'s options."""
  return {"dtype": resolve_dtype(args.dtype), "scan_layers": args.scan_layers, "attention": args.attention,
          "remat": args.remat}


def build_zeroshot_parser() -> argparse.ArgumentParser:
  datasets = zeroshot.DATASETS
  p = argparse.ArgumentParser(prog="python -m mat_jax.evaluate --task zeroshot", description=zeroshot.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", choices=("zeroshot",), default="zeroshot")
  p.add_argument("--model", required=True,
                 help="shapes | cache:NAME | training run dir | transformers-layout dir | hub id")
  p.add_argument("--tokenizer", help="tokenizer source if not beside the model")
  p.add_argument("--data", default="shapes-colour-shape", help=f"{' | '.join(datasets)} | an ImageFolder directory")
  p.add_argument("--split", default="test", help="shapes-world split, or the ImageFolder's split (train/val/test)")
  p.add_argument("--data-dir", type=errors.directory,
                 help="where an ImageFolder is built (default $MAT_JAX_DATA_DIR or "
                      "~/.cache/mat_jax/datasets)")
  p.add_argument("--num-images", type=errors.positive_int, default=980,
                 help="shapes-world sets: images to render (--limit then samples them)")
  p.add_argument("--limit", type=errors.positive_int, help="evaluate N images only, taken from the classes in turn")
  p.add_argument("--attacks", type=evaluate_lib.comma_names(zeroshot.ATTACKS, "zero-shot attacks"),
                 help=f"{','.join(zeroshot.ATTACKS)} (default: all that apply)")
  p.add_argument("--eps", type=evaluate_lib.eps_budgets, default=[1.0, 2.0, 4.0],
                 help="budgets in 1/255 units, e.g. 1,2,4")
  p.add_argument("--apgd-steps", type=errors.positive_int, default=100)
  p.add_argument("--n-targets", type=errors.positive_int, default=9, help="APGD-T target classes (at most classes - 1)")
  p.add_argument("--restarts", type=errors.positive_int, default=1, help="APGD-CE restarts")
  p.add_argument("--steps", type=errors.positive_int, default=10, help="PGD steps (step 2.5 eps / steps)")
  p.add_argument("--norm", choices=attack_specs.NORMS, default="linf")
  p.add_argument("--template", action="append", dest="templates",
                 help="prompt template with {} for the class name (repeat for several; ImageFolder data only; "
                      "default: a CLIP-style photo ensemble)")
  p.add_argument("--class-names", metavar="FILE",
                 help="ImageFolder data: the classes' names for the prompts, one per line in the sorted folders' "
                      "order, or a JSON object {folder: name} (e.g. ImageNet's WordNet-id folders n01440764 ...)")
  p.add_argument("--batch-size", type=errors.positive_int, default=64)
  p.add_argument("--seed", type=errors.seed, default=0)
  add_execution_arguments(p)
  p.add_argument("--out", type=errors.directory, default=None,
                 help="directory for results.json (default: zeroshot_results/<the --data name>, one per data set)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--mesh", help=mesh_lib.CACHED_MODEL_MESH_HELP)
  return p


def parse_zeroshot_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line of `python -m mat_jax.evaluate --task zeroshot`, checked before any work (before a cached
  `--model` is trained); --out defaults to zeroshot_results/<the --data name>."""
  parser = build_zeroshot_parser()
  args = parser.parse_args(argv)
  datasets = zeroshot.DATASETS
  if args.templates and args.data in datasets:
    parser.error("--template applies to ImageFolder data; the shapes-world sets bring their own prompts")
  if args.class_names and args.data in datasets:
    parser.error("--class-names applies to ImageFolder data; the shapes-world sets name their own classes")
  if args.class_names and not Path(args.class_names).expanduser().is_file():
    parser.error(f"--class-names {args.class_names}: no such file")
  if args.attacks == []:
    parser.error(f"--attacks names no attack; name at least one of {','.join(zeroshot.ATTACKS)} "
                 "(or leave it out for all)")
  # What can be known from the flags alone is checked here, before a cached --model is trained (minutes).
  try:
    evaluate_lib.check_eps_255(args.eps, args.norm, name="--eps")
    if args.templates:
      zeroshot.prompts_from_templates(["x"], args.templates)
    zeroshot.check_data(args.data, num_images=args.num_images, split=args.split, attacks=args.attacks)
    if args.data_dir:
      errors.check_directory_path(args.data_dir, "--data-dir")
    if args.mesh:
      mesh_lib.make_mesh(args.mesh)  # checked here, also when no cached model needs its devices
  except errors.MatJaxError as err:
    parser.error(str(err))
  if args.out is None:
    args.out = str(Path("zeroshot_results") / (args.data if args.data in datasets
                                               else Path(args.data).expanduser().resolve().name))
  errors.check_writable_dir(args.out, "--out")  # before the work, not after it
  return args


def run_zeroshot(args: argparse.Namespace) -> int:
  """Zero-shot classification under attack as `parse_zeroshot_args` read it: the table, then results.json."""
  victim = evaluate_lib.load_victim(args.model, args.tokenizer, **execution_options(args))
  data = zeroshot.load_data(args.data, victim.image_size, split=args.split, num_images=args.num_images,
                            seed=args.seed, data_dir=args.data_dir, limit=args.limit, class_names=args.class_names)
  attacks = args.attacks
  if attacks is None:
    attacks = zeroshot.default_attacks(len(data.class_names))
    if "apgd-t" not in attacks:
      print(f"apgd-t left out: {data.name} has {len(data.class_names)} classes and the targeted DLR loss needs "
            f"{zeroshot.TARGETED_MIN_CLASSES}")
  settings = zeroshot.Settings(apgd_steps=args.apgd_steps, n_targets=args.n_targets, restarts=args.restarts,
                               pgd_steps=args.steps, norm=args.norm)
  results = zeroshot.evaluate_zeroshot(victim.encoder, victim.params, victim.tokenizer, data, attacks=attacks,
                                       eps_255=args.eps, templates=args.templates, settings=settings,
                                       batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                                       log=print)
  results["model"] = args.model
  results["data"] = {"name": args.data, "split": args.split}
  print(zeroshot.format_table(results, f"\n{args.model} on {data.name}: {results['num_images']} images, "
                                       f"{results['num_classes']} classes (zero-shot top-1 accuracy %, {args.norm})"))
  path = evaluate_lib.write_json(results, Path(args.out) / "results.json")
  print(f"\nwrote {path}")
  return 0


def _peek(argv: Sequence[str] | None) -> argparse.Namespace:
  """The --task and --data of a command line (their defaults where it has none), read before the task's own
  parser sees the rest."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--task", choices=TASKS, default="retrieval")
  pre.add_argument("--data", default="shapes")
  return pre.parse_known_args(argv)[0]


def main(argv: Sequence[str] | None = None) -> int:
  return errors.cli_main(_main, argv, output_dir=lambda: _out_dir)


_out_dir: str | None = None  # the --out of the running command (either task), named by a disk-full report


def _main(argv: Sequence[str] | None) -> int:
  global _out_dir
  _out_dir = None  # not a previous command's, run in the same process
  # The shapes world's data goes with its small models (runtime: their GEMMs).
  peeked = _peek(argv)
  runtime.prepare_process(small_models=peeked.data.startswith("shapes"))
  runtime.compile_ahead_enabled()  # a mistyped MAT_JAX_COMPILE_AHEAD fails now, not once the inputs are ready
  if peeked.task == "zeroshot":
    zeroshot_args = parse_zeroshot_args(argv)  # its bad input refused before a cached model is trained
    _out_dir = zeroshot_args.out
    loop.ensure_cached_source(zeroshot_args.model, mesh_spec=zeroshot_args.mesh)
    return run_zeroshot(zeroshot_args)
  parser = build_parser()
  args = parser.parse_args(argv)
  _out_dir = args.out
  if args.surrogate_tokenizer and not args.surrogate:
    parser.error("--surrogate-tokenizer needs --surrogate (the model the attacks are made on)")
  contrastive = [a for a in args.attacks if a in evaluate_lib.BATCH_CONTRASTIVE]
  if contrastive and args.batch_size < 2:
    parser.error(f"--batch-size {args.batch_size}: {','.join(contrastive)} take their negatives from the other "
                 "captions of the image's batch and do not attack an image alone; use --batch-size 2 or more")
  if args.rare_form_rate is not None and args.data != "shapes":
    parser.error("--rare-form-rate picks the shapes world's lexicon; use it with --data shapes")
  try:
    shapes.check_rare_form_rate(args.rare_form_rate)
  except ValueError as err:
    parser.error(f"--rare-form-rate: {err}")
  if args.meaning_filter and args.data != "shapes":
    parser.error("--meaning-filter checks captions against the shapes world's scenes; use it with --data shapes")
  if args.meaning_filter and args.max_changes > 1:
    parser.error(f"--meaning-filter checks each substitute alone, so it holds for one changed word; "
                 f"--max-changes {args.max_changes} could combine kept substitutes into a label flip")
  if args.itm_k is not None and args.itm_k < 0:
    parser.error(f"--itm-k {args.itm_k}: re-rank at least 1 candidate per query, or 0 to rank by ITC alone")
  if not (math.isfinite(args.alpha) and args.alpha >= 0):
    parser.error(f"--alpha {args.alpha}: Co-Attack's text-term weight must be finite and >= 0")
  try:
    evaluate_lib.check_eps_255(args.eps, args.norm, name="--eps")
    if any(a in evaluate_lib.NEEDS_TEXT_SOURCE for a in args.attacks):
      _check_text_source(args.text_source, args.data, args.bert)
    elif args.text_source != "auto":  # unused here, but a misspelt name is still one
      inputs.check_source_name(args.text_source)
  except InputError as err:
    parser.error(str(err))
  # Before the work (a cached model may be trained first): an --out that cannot be written would lose the
  # results after the whole evaluation, a --data-dir under a file fails only where the data is read.
  out = errors.check_writable_dir(args.out, "--out")
  if args.data_dir:
    errors.check_directory_path(args.data_dir, "--data-dir")
  if args.mesh:
    mesh_lib.make_mesh(args.mesh)  # checked here, also when no cached model needs its devices
  if args.data == "shapes" and args.split not in shapes.SPLIT_IDS:
    parser.error(f"--split {args.split!r}: the shapes world has {', '.join(shapes.SPLIT_IDS)}")
  if args.data != "shapes":
    corpora.check_corpus_built(args.data, args.data_dir)
  options = execution_options(args)
  for source in (args.model, args.surrogate):
    if source:
      # "shapes" / "cache:NAME": trained into the cache on first use
      loop.ensure_cached_source(source, mesh_spec=args.mesh)
  target = evaluate_lib.load_victim(args.model, args.tokenizer, **options)
  has_itm = rerank.supports_itm(target.encoder)
  if args.itm_k and not has_itm:
    parser.error(f"--itm-k needs a target with an ITM head (BLIP); {args.model} is a dual encoder")
  itm_k, note = itm_k_for(args.model, args.itm_k, has_itm)
  if note:
    print(note)
  surrogate = (evaluate_lib.load_victim(args.surrogate, args.surrogate_tokenizer, **options)
               if args.surrogate else None)
  eval_set = evaluate_lib.load_dataset(args.data, target.tokenizer, target.image_size, split=args.split,
                                       data_dir=args.data_dir, limit=args.limit,
                                       rare_form_rate=args.rare_form_rate)
  needs_text = any(a in evaluate_lib.NEEDS_TEXT_SOURCE for a in args.attacks)
  source = _text_source(args.text_source, args.data, args.bert, args.top_k) if needs_text else None
  if source is not None and args.meaning_filter:
    source = candidates.MeaningFilteredSource(source, evaluate_lib.shapes_meaning_filter(eval_set))
  settings = evaluate_lib.AttackSettings(steps=args.steps, alpha=args.alpha, apgd_steps=args.apgd_steps,
                                         max_changes=args.max_changes, norm=args.norm)
  # Meaning-aware scoring wherever captions can be checked against their scenes (the shapes world).
  judge = (evaluate_lib.shapes_judge(eval_set) if needs_text and getattr(eval_set, "scenes", None) is not None
           else None)
  results = evaluate_lib.evaluate(target, eval_set=eval_set, attacks=args.attacks, eps_255=args.eps,
                                  text_source=source, surrogate=surrogate, settings=settings,
                                  batch_size=args.batch_size, seed=args.seed, limit=args.limit,
                                  progress=not args.no_progress, itm_k=itm_k, judge=judge, log=print)
  results["data"] = {"name": args.data, "split": args.split}
  if args.rare_form_rate is not None:
    results["data"]["rare_form_rate"] = args.rare_form_rate
  print(evaluate_lib.format_table(
      results, f"\n{args.model} on {args.data}/{args.split}: {results['num_images']} images, "
               f"{results['num_texts']} captions (recall %, drop in points, ASR % of clean hits)"
               + (f"; attacks made on {args.surrogate}" if args.surrogate else "")))
  json_path = evaluate_lib.write_json(results, out / "results.json")
  print(f"\nwrote {json_path} and {evaluate_lib.plot_recall(results, out / 'recall_vs_eps.png')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
