"""The lint rules of pyproject.toml ([tool.ruff]) hold for the whole tree: part of the suite, so CI enforces
them and a contributor sees the same findings as `ruff check .` or the pre-commit hook."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
