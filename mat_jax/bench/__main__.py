"""`python -m mat_jax.bench SUITE [options]`: measured speed next to its reference, in one run.

Suites: encode (CLIP image encoding vs transformers/PyTorch), attacks (PGD, BERT-Attack, SGA),
data (input pipeline throughput), train (MAT step vs an eager PyTorch MAT step).
"""

import argparse
import importlib
import sys

SUITES = {
    "encode": "CLIP image encoding, forward and forward+backward to pixels, vs transformers (PyTorch)",
    "attacks": "10-step PGD vs eager PyTorch; batched BERT-Attack vs a per-caption loop; SGA wall time",
    "data": "images/s from the training pipeline vs images/s a MAT step consumes",
    "train": "MAT train step vs an eager PyTorch MAT step on transformers' CLIPModel",
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mat_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
  modules = {}
  for name, help_text in SUITES.items():
    modules[name] = importlib.import_module(f"mat_jax.bench.{name}")
    modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
  args = parser.parse_args(argv)
  return modules[args.suite].run(args) or 0


if __name__ == "__main__":
  sys.exit(main())
