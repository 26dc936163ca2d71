"""The repository's promises about itself: CI runs the README's test command verbatim."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
  text = (ROOT / "README.md").read_text()
  quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.+?)\n```", quickstart, flags=re.S)


def test_quickstart_has_exactly_two_commands():
  commands = _readme_commands()
  assert len(commands) == 2, commands
  assert all("\n" not in c for c in commands)


def test_ci_runs_the_readme_test_command_verbatim():
  test_command = _readme_commands()[1]
  ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
  assert test_command in ci_lines, f"{test_command!r} is not a line of .ci/run"
