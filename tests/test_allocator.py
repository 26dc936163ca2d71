"""The allocator a `python -m mat_jax...` run starts again with (mat_jax/allocator.py)."""

import os
import re
import subprocess
import sys

import pytest

from mat_jax import allocator

PYTHON = ["/usr/bin/python3", "-m"]


@pytest.fixture
def libraries(tmp_path):
  """A library directory holding stand-ins for both allocators' libraries."""
  for name in ("libjemalloc.so.2", "libtcmalloc_minimal.so.4"):
    (tmp_path / name).write_bytes(b"")
  return [str(tmp_path)]


def test_auto_prefers_jemalloc_then_tcmalloc_then_the_systems(tmp_path, libraries):
  assert allocator.choose({}, libraries) == os.path.join(libraries[0], "libjemalloc.so.2")
  os.remove(os.path.join(libraries[0], "libjemalloc.so.2"))
  assert allocator.choose({"MAT_JAX_ALLOCATOR": "auto"}, libraries) == os.path.join(libraries[0],
                                                                                    "libtcmalloc_minimal.so.4")
  assert allocator.choose({}, [str(tmp_path / "empty")]) is None
  assert allocator.choose({"MAT_JAX_ALLOCATOR": "system"}, libraries) is None


def test_a_named_allocator_must_be_installed_and_a_path_must_exist(tmp_path, libraries):
  assert allocator.choose({"MAT_JAX_ALLOCATOR": "tcmalloc"}, libraries).endswith("libtcmalloc_minimal.so.4")
  with pytest.raises(SystemExit, match="jemalloc is not installed .*libjemalloc2.*MAT_JAX_ALLOCATOR=system"):
    allocator.choose({"MAT_JAX_ALLOCATOR": "jemalloc"}, [str(tmp_path / "empty")])
  library = tmp_path / "libmine.so"
  library.write_bytes(b"")
  assert allocator.choose({"MAT_JAX_ALLOCATOR": str(library)}, []) == str(library)
  for value in ("mimalloc", str(tmp_path / "missing.so"), "libmine.so"):
    with pytest.raises(SystemExit, match="use auto .*system, jemalloc, tcmalloc or the absolute path"):
      allocator.choose({"MAT_JAX_ALLOCATOR": value}, [str(tmp_path)])


def test_only_a_mat_jax_module_run_starts_again_and_only_once(libraries):
  jemalloc = os.path.join(libraries[0], "libjemalloc.so.2")
  env = allocator.restart_environment([*PYTHON, "mat_jax.train", "--mesh", "8"], {"HOME": "/h"}, libraries)
  assert env == {"HOME": "/h", "LD_PRELOAD": jemalloc}
  # The interpreter's own options before -m; a preload the user set stays, after the allocator.
  env = allocator.restart_environment(["python3", "-u", "-X", "dev", "-m", "mat_jax.bench", "compile"],
                                  {"LD_PRELOAD": "/opt/libprobe.so"}, libraries)
  assert env["LD_PRELOAD"] == f"{jemalloc} /opt/libprobe.so"
  for argv in ([*PYTHON, "other.module"], ["python3", "-c", "import mat_jax"], ["python3", "script.py", "-m"],
               [*PYTHON]):
    assert allocator.restart_environment(argv, {}, libraries) is None, argv
  # Started again already, or with another allocator the user preloaded, or with the system's chosen.
  for environ in ({"LD_PRELOAD": jemalloc}, {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4:/opt/x.so"},
                  {"LD_PRELOAD": "/opt/lib/libmimalloc.so.2"}, {"MAT_JAX_ALLOCATOR": "system"}):
    assert allocator.restart_environment([*PYTHON, "mat_jax.train"], environ, libraries) is None, environ


def test_a_command_line_run_starts_again_with_the_chosen_library_preloaded(tmp_path):
  """End to end: `python -m mat_jax.train` with MAT_JAX_ALLOCATOR naming a library (a harmless one: the C
  library, already loaded) runs its experiment file in a process whose LD_PRELOAD names it; with `system`
  no library is preloaded. The experiment file reports the environment and ends the run."""
  with open("/proc/self/maps") as maps:
    libc = next(path for path in (line.split()[-1] for line in maps) if re.match(r"libc[.-]", os.path.basename(path)))
  report = tmp_path / "preload.txt"
  experiment = tmp_path / "probe.py"
  experiment.write_text(f"import os, sys\nopen({str(report)!r}, 'w').write(os.environ.get('LD_PRELOAD', ''))\n"
                        "sys.exit(0)\n")
  for setting, expected in ((libc, libc), ("system", "")):
    env = dict(os.environ, MAT_JAX_ALLOCATOR=setting)
    env.pop("LD_PRELOAD", None)
    subprocess.run([sys.executable, "-m", "mat_jax.train", "--config", str(experiment), "--workdir",
                    str(tmp_path / "run")], env=env, check=True, capture_output=True, timeout=120)
    assert report.read_text() == expected, setting


def test_a_run_that_cannot_start_again_goes_on_with_the_systems_allocator(tmp_path, monkeypatch, capsys):
  library = tmp_path / "libjemalloc.so.2"
  library.write_bytes(b"")

  def refuse(*args):
    raise OSError(7, "Argument list too long")

  monkeypatch.setattr(allocator.os, "execve", refuse)
  monkeypatch.setattr(allocator.sys, "argv", ["-m", "--mesh", "8"])
  monkeypatch.setattr(allocator.sys, "orig_argv", ["python3", "-m", "mat_jax.train", "--mesh", "8"])
  monkeypatch.setattr(allocator.sys, "platform", "linux")
  monkeypatch.setenv("MAT_JAX_ALLOCATOR", str(library))
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  allocator.restart_with_allocator()
  assert f"could not start again with {library} preloaded (" in capsys.readouterr().err
