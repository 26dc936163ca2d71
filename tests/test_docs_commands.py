"""Every `python -m mat_jax...` command the documentation shows is one its command line accepts.

The commands of README.md, docs/**/*.md, the experiment files' docstrings and the notebooks' markdown are
parsed by their module's own parser; train's `--config` is loaded with its `--config.key=value`
overrides and the study's `--config` as a study, so a renamed flag, key or file variant fails here.
Nothing is trained, evaluated or built.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest

from mat_jax import config as config_lib
from mat_jax import evaluate_cli, study, train
from mat_jax.bench import __main__ as bench_cli
from mat_jax.data import __main__ as data_cli
from mat_jax.models import __main__ as models_cli

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"python -m (mat_jax[\w.]*)(.*)")
# A mention in backticks that is a command: it starts with one (after environment settings or `time`), where
# a quoted error message that names one in passing does not.
MENTION = re.compile(r"^(?:[A-Z_]+=\S*\s+)*(?:time\s+)?(?:\S*/)?python3? -m mat_jax")

# Placeholders the docs write for a value of the reader's: each stands for something the parser accepts.
PLACEHOLDERS = {"SOURCE": "./model", "DIR": "./dir", "RUN": "./run", "D": "./data", "K": "8", "N": "4",
                "BLIP": "./blip", "P": "tiny", "B": "8", "R": "0"}
# Lines that show a command's shape rather than one to run (an elided tail, a suite's name to choose).
ELIDED = ("...", "SUITE")
# Documented commands that name a file of the reader's: the parse would stop at its absence, not at a flag.
READERS_FILES = {"my_study.py"}


def _doc_texts() -> list[tuple[str, str]]:
  """(where, text) of every place the docs write commands: markdown pages, experiment-file docstrings and
  the notebooks' markdown cells."""
  texts = [(str(path.relative_to(ROOT)), path.read_text())
           for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]]
  texts += [(str(path.relative_to(ROOT)), ast.get_docstring(ast.parse(path.read_text())) or "")
            for path in sorted((ROOT / "experiments").glob("*.py"))]
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    for index, cell in enumerate(json.loads(path.read_text())["cells"]):
      if cell["cell_type"] == "markdown":
        texts.append((f"{path.relative_to(ROOT)} cell {index}", "".join(cell["source"])))
  return texts


def _commands() -> list[tuple[str, str, bool]]:
  """(where, command, complete) for each command: complete in a code block (with its `\\` continuations),
  where it is one to run; a mention in backticks may name a command or a flag without its values."""
  found = []
  for where, text in _doc_texts():
    lines = text.splitlines()
    in_block = where.endswith(".py")  # an experiment file's docstring lists its commands bare
    i = 0
    while i < len(lines):
      line = lines[i]
      if line.strip().startswith("```"):
        in_block = not in_block
      elif in_block and "`" not in line and (match := COMMAND.search(line)):
        command, start = match.group(0), i
        while command.rstrip().endswith("\\") and i + 1 < len(lines):
          i += 1
          command = command.rstrip()[:-1] + " " + lines[i].strip()
        # `A &  B &  wait`: each command of a shell line
        found += [(f"{where}:{start + 1}", part, True) for part in re.split(r"&&|&|;", command)
                  if COMMAND.search(part)]
      else:
        found += [(f"{where}:{i + 1}", mention, False) for mention in re.findall(r"`([^`]+)`", line)
                  if MENTION.match(mention)]
      i += 1
  return found


def _argv(command: str) -> list[str] | None:
  """The command's module and arguments, placeholders filled; None for a line that only shows a shape."""
  command = command.split("  #")[0].split(" # ")[0].strip()
  if any(mark in command for mark in ELIDED) or any(name in command for name in READERS_FILES):
    return None
  module, rest = COMMAND.search(command).groups()
  rest = re.sub(r"\[([^\]]*)\]", r"\1", rest)  # optional parts, written [--flag X]
  return [module] + [PLACEHOLDERS.get(word, word) for word in shlex.split(rest)]


def _check(argv: list[str]) -> None:
  """Parse as the command's module does before any work: argparse's exit on an unknown flag or value, a
  ConfigError on an unknown key or variant, a StudyError on a bad study."""
  module, args = argv[0], argv[1:]
  if module == "mat_jax.train":
    parsed, overrides = train.parse_args(args)
    if parsed.config:
      config_lib.load(parsed.config, overrides)
  elif module == "mat_jax.evaluate":
    if evaluate_cli._peek(args).task == "zeroshot":
      evaluate_cli.build_zeroshot_parser().parse_args(args)
    else:
      evaluate_cli.build_parser().parse_args(args)
  elif module == "mat_jax.study":
    parsed = study.build_parser().parse_args(args)
    study.load(parsed.config, quick=parsed.quick)
    study._parse_shard(parsed.shard)
  elif module == "mat_jax.data":
    data_cli.build_parser().parse_args(args)
  elif module == "mat_jax.models":
    models_cli.build_parser().parse_args(args)
  elif module == "mat_jax.bench":
    bench_cli.build_parser(next((a for a in args if not a.startswith("-")), None)).parse_args(args)
  else:
    raise AssertionError(f"no command line {module}")


def _documented() -> list[tuple[str, list[str], bool]]:
  unique: dict[tuple[str, ...], tuple[str, bool]] = {}
  for where, command, complete in _commands():
    argv = _argv(command)
    if argv is not None and (tuple(argv) not in unique or complete):
      unique[tuple(argv)] = (where, complete)
  return [(where, list(argv), complete) for argv, (where, complete) in unique.items()]


DOCUMENTED = _documented()


def test_the_docs_show_commands_of_every_command_line():
  modules = {argv[0] for _, argv, _ in DOCUMENTED}
  assert modules >= {"mat_jax.train", "mat_jax.evaluate", "mat_jax.study", "mat_jax.data", "mat_jax.models",
                     "mat_jax.bench"}, modules
  assert len(DOCUMENTED) > 60  # the extraction finds the docs' commands, not a handful of them


# What a mention in prose may leave out: the arguments a run needs, or the value of the flag it names.
PARTIAL = ("the following arguments are required", "expected one argument")


@pytest.mark.parametrize("where,argv,complete", DOCUMENTED, ids=[where for where, _, _ in DOCUMENTED])
def test_documented_command_parses(where, argv, complete, capsys):
  try:
    _check(argv)
  except SystemExit as exit_:
    error = capsys.readouterr().err.strip().splitlines()[-1:]
    if complete or not any(part in line for part in PARTIAL for line in error):
      pytest.fail(f"{where}: `python -m {' '.join(argv)}` is refused by its parser (exit {exit_.code}): {error}")


def test_a_renamed_flag_or_key_in_a_documented_command_fails_the_check():
  with pytest.raises(SystemExit):
    _check(["mat_jax.evaluate", "--model", "shapes", "--epsilon", "2"])
  with pytest.raises(config_lib.ConfigError):
    _check(["mat_jax.train", "--config", "experiments/shapes_mat.py", "--config.train.stepz=5"])
  with pytest.raises(study.StudyError):
    _check(["mat_jax.study", "--config", "experiments/study_shapes.py:nosuchvariant"])
