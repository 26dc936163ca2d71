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


def _gpu_script(tmp_path, *items, seconds="0"):
  import os
  import subprocess
  import sys

  # A copy in a folder of its own: a checkout that downloaded the GPU image's wheels (.whl/) would have the
  # script install them.
  script = tmp_path / "checkout" / ".ci" / "gpu"
  script.parent.mkdir(parents=True)
  script.write_text((ROOT / ".ci" / "gpu").read_text())
  env = dict(os.environ, OUT=str(tmp_path), GPU_SECONDS=seconds, PYTHON=sys.executable)
  return subprocess.run(["bash", str(script), *items], env=env, capture_output=True, text=True,
                        timeout=120, check=False)


def test_gpu_script_refuses_unknown_items(tmp_path):
  result = _gpu_script(tmp_path, "accel", "bogus")
  assert result.returncode == 2
  assert "unknown item bogus" in result.stderr


def test_gpu_script_skips_what_no_longer_fits_and_says_so(tmp_path):
  result = _gpu_script(tmp_path, "train", "demo", seconds="30")
  assert result.returncode == 0, result.stderr
  summary = (tmp_path / "summary.txt").read_text()
  assert "jax" in summary
  assert "train: skipped" in summary and "demo: skipped" in summary
  assert not (tmp_path / "train.log").exists()


def test_compile_levers_refuses_unknown_levers_and_xla_knows_each_levers_options():
  """XLA stops a process at an option it does not know, so a typo in a lever would cost a lent GPU's minutes
  for nothing: each lever's XLA_FLAGS must start a backend here (XLA's options are the same on every
  platform)."""
  import os
  import subprocess
  import sys
  script = ROOT / ".ci" / "compile-levers"
  result = subprocess.run(["bash", str(script), "default", "bogus"], capture_output=True, text=True, timeout=60,
                          check=False)
  assert result.returncode == 2 and "unknown lever bogus" in result.stderr
  flags = set(re.findall(r"XLA_FLAGS=([^\s\"]+)", script.read_text()))
  assert len(flags) >= 2, flags
  for flag in flags:
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    started = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(2).sum())"], env=env,
                             capture_output=True, text=True, timeout=120, check=False)
    assert started.returncode == 0 and "2.0" in started.stdout, (flag, started.stderr[-2000:])


def test_the_harness_gives_its_cpu_compile_options_to_cpu_sessions_only():
  """XLA stops a process at an option it does not know: `JAX_PLATFORMS=cuda pytest tests/test_accel.py` on a
  GPU image (jaxlib 0.11) died at collection on the CPU-only options the harness added."""
  import os
  import subprocess
  import sys
  show = "import os, conftest; print(os.environ['XLA_FLAGS'])"
  for platforms, cpu_options in (("cpu", True), ("cuda", False)):
    env = dict(os.environ, JAX_PLATFORMS=platforms, XLA_FLAGS="")
    flags = subprocess.run([sys.executable, "-c", show], cwd=ROOT / "tests", env=env, capture_output=True,
                           text=True, check=True).stdout
    assert ("--xla_backend_optimization_level=0" in flags) == cpu_options, (platforms, flags)
    assert "--xla_force_host_platform_device_count=8" in flags
