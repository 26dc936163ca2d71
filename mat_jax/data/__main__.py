"""`python -m mat_jax.data COMMAND`: build datasets and the shapes tokenizer, inspect the shapes world.

  build shapes    [--train N --val N --test N --image-size S --captions-per-image K --seed S]
  build karpathy  --annotations F [--annotations F ...] --images DIR --name flickr30k
                  [--format auto|karpathy|albef --image-size 224 --max-words 30 --no-cleaning --skip-bad]
  tokenizer       [--dir D]               the shapes-world tokenizer (transformers layout)
  mlm             [--dir D --steps N]     the shapes-world BERT masked LM (the text attack's "shapes-mlm"):
                                          trained into $MAT_JAX_CACHE_DIR/mlm once; prints its masked-word
                                          accuracy and the share of its proposals that change meaning
  ambiguity       [--split test]          how well captions identify their image in a built split

Every command but mlm (which writes under $MAT_JAX_CACHE_DIR) takes --data-dir (default
$MAT_JAX_DATA_DIR or ~/.cache/mat_jax/datasets). A dataset that is already built is reused; --overwrite
rebuilds it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mat_jax import errors, paths, runtime
from mat_jax.data import corpora, pipeline, shapes
from mat_jax.training import mlm


def _add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--data-dir", type=errors.directory, default=None,
                      help="datasets root (default: $MAT_JAX_DATA_DIR or ~/.cache/mat_jax/datasets)")
  parser.add_argument("--overwrite", action="store_true", help="rebuild even if already built")


def _add_shapes_options(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--train", type=int, default=None,
                      help="training images (default: the demo's, 10000)")
  parser.add_argument("--val", type=int, default=1_000, help="validation images (default 1000)")
  parser.add_argument("--test", type=int, default=1_000, help="test images (default 1000)")
  parser.add_argument("--image-size", type=errors.positive_int, default=None,
                      help="image side in pixels (default: the tiny preset's, 48)")
  parser.add_argument("--captions-per-image", type=int, default=5, help="distinct captions per image")
  parser.add_argument("--seed", type=errors.seed, default=0, help="world seed (same seed, same scenes)")
  parser.add_argument("--rare-form-rate", type=float, default=None,
                      help="captions take each word's canonical form except with this probability (0: the "
                           "held-out-forms world, docs/text_threat.md); default: every form equally likely")


def build_parser() -> argparse.ArgumentParser:
  """The command line of `python -m mat_jax.data`."""
  parser = argparse.ArgumentParser(prog="python -m mat_jax.data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  build = commands.add_parser("build", help="build a dataset (tfds array_record)")
  kinds = build.add_subparsers(dest="kind", required=True, metavar="DATASET")

  shapes_parser = kinds.add_parser("shapes", help="the procedural shapes world")
  _add_shapes_options(shapes_parser)
  _add_common(shapes_parser)

  corpus = kinds.add_parser("karpathy", help="a local corpus: annotation JSON (Karpathy or ALBEF/SGA) + images")
  corpus.add_argument("--annotations", action="append", required=True, metavar="F",
                      help="annotation file; ALBEF/SGA files as SPLIT=F unless the name holds the split "
                           "(repeat for several files)")
  corpus.add_argument("--images", required=True, metavar="DIR", help="image folder the annotations refer to")
  corpus.add_argument("--name", required=True, help="dataset name, e.g. flickr30k, coco, rsicd")
  corpus.add_argument("--format", default="auto", choices=("auto", "karpathy", "albef"))
  corpus.add_argument("--image-size", type=errors.positive_int, default=224, help="stored resolution (default 224)")
  corpus.add_argument("--max-words", type=int, default=30, help="caption word limit (0: none; default 30)")
  corpus.add_argument("--no-cleaning", action="store_true",
                      help="keep captions as written (default: the references' pre_caption cleaning)")
  corpus.add_argument("--restval", default="train", choices=corpora.KARPATHY_SPLITS,
                      help="split that Karpathy's 'restval' images join (default train; restval: a split of their own)")
  corpus.add_argument("--skip-bad", action="store_true",
                      help="skip missing/corrupt images and entries without captions, and report them")
  _add_common(corpus)

  tok = commands.add_parser("tokenizer", help="write the shapes-world tokenizer")
  tok.add_argument("--dir", type=errors.directory, default=None,
                   help="output directory (default: DATA_DIR/tokenizers/shapes_world_v<version>)")
  tok.add_argument("--data-dir", type=errors.directory, default=None)

  mlm_cmd = commands.add_parser("mlm", help="train (or reuse) the shapes-world BERT masked LM and report it")
  mlm_cmd.add_argument("--dir", type=errors.directory, default=None,
                       help="output directory (default: the cache, as text_attack.bert="
                            "'shapes-mlm' finds it)")
  mlm_cmd.add_argument("--steps", type=errors.positive_int, default=None,
                       help="training steps (default: the cached model's)")
  mlm_cmd.add_argument("--overwrite", action="store_true", help="retrain even if already built")

  amb = commands.add_parser("ambiguity", help="caption ambiguity of a built shapes-world split")
  amb.add_argument("--split", default="test", choices=corpora.SPLITS)
  _add_shapes_options(amb)
  amb.add_argument("--data-dir", type=errors.directory, default=None)
  return parser


def _shapes_config(args) -> dict:
  """The build options given; the rest keep `corpora.shapes_config`'s defaults (the demo's world)."""
  given = dict(train=args.train, val=args.val, test=args.test, image_size=args.image_size,
               captions_per_image=args.captions_per_image, seed=args.seed, rare_form_rate=args.rare_form_rate)
  return {k: v for k, v in given.items() if v is not None}


def _mlm(args) -> int:
  import dataclasses

  settings = mlm.MLMSettings()
  if args.steps is not None:
    settings = dataclasses.replace(settings, steps=args.steps)
  directory = mlm.build(settings, args.dir, overwrite=args.overwrite)
  info = mlm.load_info(directory)
  # What the directory holds: a built MLM is reused (not retrained) unless --overwrite.
  acc, train, built = info["masked_accuracy"], info["train"], info["settings"]
  print(f"{mlm.MLM_NAME} at {directory}")
  if built["steps"] != settings.steps:
    print(f"  (already built with {built['steps']} steps, reused: pass --overwrite to train {settings.steps})")
  print(f"  trained {built['steps']} steps x {built['batch_size']} on {train['train_captions']} train captions "
        f"in {train['seconds']:.1f} s wall, {train.get('cpu_seconds', float('nan')):.1f} s CPU "
        f"(final loss {train['final_loss']:.3f})")
  print(f"  masked-word accuracy over {int(acc['words'])} test words: exact {100 * acc['word']:.1f}%, "
        f"right category {100 * acc['category']:.1f}%")
  print(f"  top-{built['top_k']} proposals (BertMLMSource, stop words filtered) on {built['eval_images']} test "
        "images whose caption no longer describes the image:")
  report = {c: {k: (float("nan") if v is None else v) for k, v in r.items()}
            for c, r in info["meaning_change"].items()}
  print(mlm.format_meaning_report(report))
  return 0


def main(argv: list[str] | None = None) -> int:
  return errors.cli_main(_main, argv, output_dir=lambda: _out_dir)


# The directory the running command writes, named by a disk-full report (tfds and array_record name no file).
_out_dir: Path | None = None


def _main(argv: list[str] | None) -> int:
  global _out_dir
  args = build_parser().parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  runtime.prepare_process()

  # Before any work: a build that cannot be written fails at once, not at its end.
  if getattr(args, "dir", None):
    _out_dir = errors.check_writable_dir(args.dir, "--dir")
  elif args.command == "mlm":
    _out_dir = paths.cache_root()
  elif args.data_dir:
    _out_dir = errors.check_writable_dir(args.data_dir, "--data-dir")
  else:  # $MAT_JAX_DATA_DIR, else the default, named as such
    _out_dir = paths.writable_data_dir()
  if args.command == "tokenizer":
    path = shapes.build_tokenizer(args.dir or shapes.default_tokenizer_dir(args.data_dir))
    print(f"shapes tokenizer at {path} (vocab size {len(shapes.SPECIAL_TOKENS) + len(shapes.vocabulary())}, "
          f"context length {shapes.DEFAULT_CONTEXT_LENGTH})")
    return 0
  if args.command == "mlm":
    return _mlm(args)
  if args.command == "ambiguity":
    builder = corpora.build_shapes(args.data_dir, **_shapes_config(args))
    source = corpora.data_source(builder, args.split)
    records = source.__getitems__(list(range(len(source))))
    scenes = [shapes.Scene.from_record(r["scene"]) for r in records]
    caps = [[pipeline.as_text(c) for c in r["captions"]] for r in records]
    stats = shapes.ambiguity(scenes, caps)
    print(f"{args.split}: {len(scenes)} images, {int(stats['captions'])} captions; images consistent with a "
          f"caption: mean {stats['mean_matches']:.3f}; captions fitting more than one image: "
          f"{100 * stats['ambiguous_fraction']:.1f}%; captions wrong for their image: "
          f"{100 * stats['wrong_fraction']:.1f}%")
    return 0
  if args.kind == "shapes":
    builder = corpora.build_shapes(args.data_dir, overwrite=args.overwrite, **_shapes_config(args))
  else:
    cleaning = corpora.NO_CLEANING if args.no_cleaning else corpora.CaptionCleaning(max_words=args.max_words)
    builder = corpora.build_corpus(args.name, args.annotations, args.images, image_size=args.image_size,
                                   fmt=args.format, restval=args.restval, cleaning=cleaning,
                                   skip_bad=args.skip_bad, data_dir=args.data_dir, overwrite=args.overwrite)
  splits = ", ".join(f"{name} {info.num_examples}" for name, info in builder.info.splits.items())
  print(f"{builder.info.full_name} at {builder.data_path}: {splits}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
