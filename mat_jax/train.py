"""`python -m mat_jax.train`: adversarial training of CLIP models on a device mesh.

    python -m mat_jax.train --config experiments/shapes_mat.py [--config.key=value ...]
                            [--mesh 8 | --mesh data=4,fsdp=2] [--workdir DIR]

Without --config it runs the shapes-world demo end to end (see mat_jax.training.demo). A run resumes
from the newest checkpoint in its workdir. Multi-host: start one process per host with --coordinator
HOST:PORT --num-processes N --process-id I (or the MAT_JAX_* environment variables); each host reads
its own shard of the data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mat_jax import config as config_lib
from mat_jax import checkpoint, errors, runtime
from mat_jax import mesh as mesh_lib
from mat_jax.data import corpora
from mat_jax.training import ahead, demo, loop


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog="python -m mat_jax.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", help="experiment file, optionally with an argument: FILE.py[:ARG]")
  parser.add_argument("--workdir", type=errors.directory, help="run directory (checkpoints, metrics, exported model); "
                                        "default runs/<experiment name>")
  parser.add_argument("--mesh", help="devices: '8' (data axis) or 'data=4,fsdp=2' (default: all devices "
                                     "on data, or config.mesh.shape)")
  parser.add_argument("--coordinator", help="multi-host: address HOST:PORT of process 0")
  parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
  parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar (the logged metrics go to WORKDIR/metrics.jsonl and TensorBoard only)")
  parser.add_argument("--no-eval", action="store_true", help="skip the evaluations")
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, rest = [], []
  for arg in argv:
    (overrides if arg.startswith("--config.") else rest).append(arg)
  args = parser.parse_args(rest)
  return args, overrides


def main(argv: list[str] | None = None) -> int:
  return errors.cli_main(_main, argv, output_dir=lambda: _out_dir)


# The workdir of the running command, named by a disk-full report (Orbax's report carries no file name).
_out_dir: Path | None = None


def _main(argv: list[str] | None) -> int:
  global _out_dir
  args, overrides = parse_args(argv)
  if args.config is None and overrides:
    print("error: --config.* overrides need --config FILE", file=sys.stderr)
    return errors.EXIT_USER_ERROR
  if args.config is None and args.no_eval:
    print("error: --no-eval skips a training run's evaluations (with --config FILE); the demo's last stage is "
          "its evaluation", file=sys.stderr)
    return errors.EXIT_USER_ERROR
  config = None if args.config is None else config_lib.load(args.config, overrides)
  # The demo and the shapes world's experiments train its small models only (runtime: their GEMMs).
  runtime.prepare_process(small_models=config is None or config.data.name == "shapes")
  ahead.enabled()  # a mistyped MAT_JAX_COMPILE_AHEAD fails now, not once a run is set up

  # jax.distributed must start before anything touches the devices.
  mesh_lib.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  if args.config is None:
    if args.workdir:
      errors.check_writable_dir(args.workdir, "--workdir")
    _out_dir = Path(args.workdir or demo.DEFAULT_WORKDIR)
    return demo.main(workdir=args.workdir, mesh_spec=args.mesh, progress=not args.no_progress)
  workdir = Path(args.workdir or Path("runs") / (config.name or Path(args.config.split(":")[0]).stem))
  errors.check_writable_dir(workdir, "--workdir")
  checkpoint.check_workdir(workdir)  # before a cached starting model trains (minutes)
  _out_dir = workdir
  loop.run_mesh(config, args.mesh)  # a bad --mesh fails now, not after training the starting model
  if config.data.name != "shapes":  # a corpus not built yet fails now, before models load or download
    corpora.check_corpus_built(config.data.name, config.data.data_dir or None)
  # A "cache:NAME" starting model is trained into the cache first, on the same mesh, if it is not there yet.
  loop.ensure_cached_source(config.model.source, log=print if mesh_lib.is_main_process() else lambda _: None,
                            mesh_spec=args.mesh)
  result = loop.train(config, workdir, mesh_spec=args.mesh, progress=not args.no_progress,
                      evaluate=not args.no_eval)
  if result.metrics and mesh_lib.is_main_process():
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    print(f"done: step {result.step}: {shown}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
