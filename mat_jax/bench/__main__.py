"""`python -m mat_jax.bench SUITE [options]`: measured speed next to its reference, in one run.

Suites: encode (CLIP image encoding vs transformers/PyTorch), attacks (PGD, BERT-Attack, SGA),
data (input pipeline throughput), train (MAT step vs PyTorch MAT steps), blip (BLIP's PGD step vs
transformers' PyTorch BLIP), compile (compile seconds, cold and from the persistent compilation cache).
The PyTorch references run on the device JAX runs on, eager and torch.compile, float32/TF32 and bf16
(`--torch`; eager float32 by default on a CPU, all four on an accelerator).
"""

import argparse
import importlib
import sys

from mat_jax import errors, runtime

SUITES = {
    "encode": "CLIP image encoding, forward and forward+backward to pixels, vs transformers (PyTorch)",
    "attacks": "10-step PGD vs PyTorch (--torch variants); batched BERT-Attack vs a per-caption loop; SGA wall time",
    "data": "images/s from the training pipeline vs images/s a MAT step consumes",
    "train": "MAT train step vs PyTorch MAT steps on transformers' CLIPModel (--torch variants)",
    "blip": "BLIP PGD attack (ITC features) vs eager PyTorch, same precision, on BlipForImageTextRetrieval",
    "compile": "compile seconds of the MAT step, PGD and SGA, cold and with a warm persistent cache",
}


def main(argv=None) -> int:
  return errors.cli_main(_main, argv)


def build_parser(suite: str | None = None) -> argparse.ArgumentParser:
  """The command line of `python -m mat_jax.bench`, with the options of `suite` (only the chosen suite is
  imported: each pulls in heavy references, torch and transformers)."""
  parser = argparse.ArgumentParser(prog="python -m mat_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
  for name, help_text in SUITES.items():
    suite_parser = sub.add_parser(name, help=help_text, description=help_text)
    if name == suite:
      importlib.import_module(f"mat_jax.bench.{name}").add_arguments(suite_parser)
  return parser


def _main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
  # The shapes world's tiny CLIP gets the GEMMs the shapes world's commands give it (runtime).
  runtime.prepare_process(small_models=getattr(args, "preset", None) == "tiny")
  return importlib.import_module(f"mat_jax.bench.{args.suite}").run(args) or 0


if __name__ == "__main__":
  sys.exit(main())
