"""`python -m mat_jax.models {demo,inspect}`: the model ports from the command line.

demo      build the tiny CLIP, save it in the transformers layout, load it back, print the cosine
          similarity of a few solid-colour images and token sequences, and check the reload is exact.
inspect   load a transformers-layout directory or hub id (CLIP, BLIP or BERT MLM) and print its config and
          parameter counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mat_jax import checkpoint, errors, runs, runtime
from mat_jax.models import (CLIP, PRESETS, clip_config, hub, l2_normalize, load_bert_mlm, load_blip, load_clip,
                            save_clip)
from mat_jax.models.blip import is_blip
from mat_jax.models.weights import WEIGHT_PATTERNS

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0)}


def _param_count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _token_sequences(cfg, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """`count` captions of random word ids and different lengths: start, words, end, padding."""
  text = cfg.text
  reserved = {text.bos_token_id, text.eos_token_id, text.pad_token_id}
  words = np.array([i for i in range(text.vocab_size) if i not in reserved])
  ids = np.full((count, text.context_length), text.pad_token_id, np.int32)
  mask = np.zeros_like(ids)
  for row in range(count):
    n = 2 + row % (text.context_length - 3)
    ids[row, : n + 2] = [text.bos_token_id, *rng.choice(words, n), text.eos_token_id]
    mask[row, : n + 2] = 1
  return ids, mask


def demo(args: argparse.Namespace) -> int:

  cfg = clip_config(args.preset)
  model = CLIP(cfg, rngs=nnx.Rngs(args.seed))
  size = cfg.vision.image_size
  images = np.stack([np.broadcast_to(np.float32(c), (size, size, 3)) for c in COLOURS.values()])
  ids, mask = _token_sequences(cfg, len(COLOURS), np.random.default_rng(args.seed))

  if args.dir:
    errors.check_writable_dir(args.dir, "--dir")
  with tempfile.TemporaryDirectory() as tmp:
    directory = Path(args.dir or tmp)
    save_clip(model, directory)
    files = sorted(p.name for p in directory.iterdir())
    print(f"saved the {args.preset} CLIP ({_param_count(nnx.state(model, nnx.Param)):,} parameters) to "
          f"{directory if args.dir else 'a temporary directory'}: {', '.join(files)}")
    reloaded = load_clip(directory)

  # One compiled function for both models: they share the graph, only the parameters differ.
  embed = nnx.jit(lambda m, x, i, k: (l2_normalize(m.encode_image(x)), l2_normalize(m.encode_text(i, k))))
  (img, txt), (img2, txt2) = [tuple(map(np.asarray, embed(m, images, ids, mask))) for m in (model, reloaded)]
  sims = img @ txt.T
  print("\ncosine similarity, images (rows) x token sequences (columns):")
  print(" " * 8 + "".join(f"{f'text {j}':>9}" for j in range(sims.shape[1])))
  for name, row in zip(COLOURS, sims, strict=True):
    print(f"{name:<8}" + "".join(f"{v:9.4f}" for v in row))
  # Compared on the host: eager jnp comparisons would compile one small program per parameter shape.
  params_equal = jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                           nnx.state(model, nnx.Param), nnx.state(reloaded, nnx.Param)))
  diff = max(float(np.abs(img - img2).max()), float(np.abs(txt - txt2).max()))
  same = params_equal and diff == 0.0
  print(f"\nreload: parameters {'identical' if params_equal else 'DIFFER'}, "
        f"embeddings max |diff| {diff:.3g} -> {'OK' if same else 'MISMATCH'}")
  return 0 if same else 1


def inspect(args: argparse.Namespace) -> int:
  run = Path(args.source).expanduser()
  if runs.is_run_dir(run):  # a training run keeps its exported model in model/
    exported = run / checkpoint.MODEL_DIR
    if not (exported / "config.json").exists():
      raise hub.ModelSourceError(f"{run} is a training run without its exported model ({exported}); rerun its "
                                 "train command to export it, then inspect that directory")
    print(f"{run} is a training run: its exported model is {exported}")
    args.source = str(exported)
  directory = hub.resolve(args.source, WEIGHT_PATTERNS)
  config_path = directory / "config.json"
  model_type = hub.read_json_object(config_path).get("model_type", "clip") if config_path.exists() else "clip"
  # BLIP as runs.load_model tells it (is_blip); anything else not BERT goes to load_clip, which names the fix.
  loader = load_bert_mlm if model_type == "bert" else load_blip if is_blip(directory) else load_clip
  # The source as given, not the snapshot: for a hub id the loader asks the hub what the repository holds
  # (a pickle-only one gets the conversion advice, which the snapshot alone cannot tell).
  model = loader(args.source)
  print(f"{type(model).__name__} from {directory}")
  print(json.dumps(dataclasses.asdict(model.config), indent=2))
  params = nnx.state(model, nnx.Param)
  parts = {name: _param_count(sub) for name, sub in params.items()}
  for name, count in parts.items():
    print(f"  {name:<24} {count:>14,}")
  print(f"  {'total':<24} {sum(parts.values()):>14,} parameters")
  return 0


def build_parser() -> argparse.ArgumentParser:
  """The command line of `python -m mat_jax.models`."""
  parser = argparse.ArgumentParser(prog="python -m mat_jax.models", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("demo", help="save, reload and compare the tiny CLIP")
  p.add_argument("--dir", type=errors.directory,
                 help="where to save (default: a temporary directory, removed afterwards)")
  p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="CLIP preset")
  p.add_argument("--seed", type=errors.seed, default=0)
  p.set_defaults(fn=demo)
  p = sub.add_parser("inspect", help="print the config and parameter count of a checkpoint")
  p.add_argument("source", help="transformers-layout directory or hub id")
  p.set_defaults(fn=inspect)
  return parser


def _main(argv: list[str] | None) -> int:
  args = build_parser().parse_args(argv)
  runtime.prepare_process()
  return args.fn(args)


def main(argv: list[str] | None = None) -> int:
  return errors.cli_main(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
