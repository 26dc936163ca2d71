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
  for value, message in (("mimalloc", "use auto .*system, jemalloc, tcmalloc or the absolute path"),
                         ("libmine.so", "use auto"), (str(tmp_path / "missing.so"), "missing.so: no such file"),
                         (str(tmp_path / "lib mine.so"), "cannot hold a path with spaces or colons")):
    with pytest.raises(SystemExit, match=message):
      allocator.choose({"MAT_JAX_ALLOCATOR": value}, [str(tmp_path)])


def test_the_module_a_command_line_runs_with_dash_m():
  for argv, module in ((["python3", "-m", "mat_jax.train"], "mat_jax.train"),
                       (["python3", "-mmat_jax.train"], "mat_jax.train"),
                       (["python3", "-Im", "mat_jax.bench", "compile"], "mat_jax.bench"),
                       (["python3", "-X", "importtime", "-W", "ignore", "-u", "-m", "mat_jax.study"], "mat_jax.study"),
                       (["python3", "-Xtracemalloc", "-m", "mat_jax.study"], "mat_jax.study"),
                       (["python3", "-c", "import mat_jax"], None), (["python3", "-Ic", "pass"], None),
                       (["python3", "script.py", "-m", "mat_jax.train"], None), (["python3"], None),
                       (["python3", "-m"], None)):
    assert allocator.module_run(argv) == module, argv


def test_only_a_mat_jax_module_run_starts_again_and_only_once(libraries):
  jemalloc = os.path.join(libraries[0], "libjemalloc.so.2")
  env = allocator.restart_environment([*PYTHON, "mat_jax.train", "--mesh", "8"], {"HOME": "/h"}, libraries)
  assert env == {"HOME": "/h", "LD_PRELOAD": jemalloc, allocator.STARTED: "1"}
  # The interpreter's own options before -m; a preload the user set stays, after the allocator.
  env = allocator.restart_environment(["python3", "-u", "-X", "dev", "-m", "mat_jax.bench", "compile"],
                                      {"LD_PRELOAD": "/opt/libprobe.so"}, libraries)
  assert env["LD_PRELOAD"] == f"{jemalloc} /opt/libprobe.so"
  for argv in ([*PYTHON, "other.module"], ["python3", "-c", "import mat_jax"], ["python3", "script.py", "-m"],
               [*PYTHON]):
    assert allocator.restart_environment(argv, {}, libraries) is None, argv
  # Started again already (even where the loader dropped LD_PRELOAD: no loop), the library preloaded, the
  # system's allocator chosen, or, with auto, an allocator the user preloaded.
  for environ in ({allocator.STARTED: "1"}, {"LD_PRELOAD": jemalloc}, {"MAT_JAX_ALLOCATOR": "system"},
                  {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4:/opt/x.so"}, {"LD_PRELOAD": "/opt/lib/libmimalloc.so.2"}):
    assert allocator.restart_environment([*PYTHON, "mat_jax.train"], environ, libraries) is None, environ
  # A named choice goes before the user's allocator.
  env = allocator.restart_environment([*PYTHON, "mat_jax.train"], {"MAT_JAX_ALLOCATOR": "jemalloc",
                                                                    "LD_PRELOAD": "/opt/libmimalloc.so"}, libraries)
  assert env["LD_PRELOAD"] == f"{jemalloc} /opt/libmimalloc.so"


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
  """A library the loader cannot preload (an empty file here; a library built for a newer glibc on a real
  machine), or a restart that fails, leaves the run where it is, said on stderr; a closed stdout does not
  stop the restart."""
  library = tmp_path / "libjemalloc.so.2"
  library.write_bytes(b"")
  restarts = []

  def restart(*args):
    restarts.append(args)
    raise OSError(7, "Argument list too long")

  monkeypatch.setattr(allocator.os, "execve", restart)
  monkeypatch.setattr(allocator.sys, "argv", ["-m", "--mesh", "8"])
  monkeypatch.setattr(allocator.sys, "orig_argv", ["python3", "-m", "mat_jax.train", "--mesh", "8"])
  monkeypatch.setattr(allocator.sys, "platform", "linux")
  monkeypatch.setenv("MAT_JAX_ALLOCATOR", str(library))
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.delenv(allocator.STARTED, raising=False)
  allocator.restart_with_allocator()
  assert not restarts
  assert f"running with the system's allocator, not {library} (the dynamic loader cannot preload it)" in \
      capsys.readouterr().err
  monkeypatch.setattr(allocator, "_loads", lambda path: True)
  monkeypatch.setattr(allocator.sys, "stdout", None)
  allocator.restart_with_allocator()
  assert len(restarts) == 1 and restarts[0][2]["LD_PRELOAD"] == str(library)
  assert "Argument list too long); MAT_JAX_ALLOCATOR=system hides this" in capsys.readouterr().err
