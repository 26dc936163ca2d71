"""The memory allocator of a command-line run: jemalloc or tcmalloc where the system has one.

XLA's compilers allocate and free millions of small objects, and glibc's malloc is slow at that: with
jemalloc preloaded, XLA compiles the same programs 12-18% faster on every backend (docs/performance.md,
"The memory allocator"). A library is chosen by preloading it, which only a new process can do, so
`python -m mat_jax.<command>` starts itself again, at once, with the library in LD_PRELOAD: this module runs
from the package's `__init__`, before jax is imported, and only for such a run (a program or notebook that
imports mat_jax keeps its process and its allocator). The processes a run starts (data workers, `bench`'s
measuring processes, ptxas) inherit the variable.

MAT_JAX_ALLOCATOR chooses: `auto` (the default: jemalloc, else tcmalloc, where installed; else the
system's), `system` (no preload), `jemalloc` or `tcmalloc` (an error where not installed), or the path of
an allocator's shared library. Only Linux; elsewhere the system's allocator stays. Standard library only.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Mapping, Sequence

ENV = "MAT_JAX_ALLOCATOR"
# Each allocator's shared library as the distributions name it (Debian/Ubuntu: libjemalloc2,
# libtcmalloc-minimal4 or libgoogle-perftools4), in the order `auto` prefers them.
LIBRARIES = {"jemalloc": ("libjemalloc.so.2",), "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")}
INSTALL = {"jemalloc": "apt install libjemalloc2", "tcmalloc": "apt install libtcmalloc-minimal4"}


def library_dirs() -> list[str]:
  """Where the system's shared libraries are: the multiarch directories first (/usr/lib/x86_64-linux-gnu)."""
  arch = sysconfig.get_config_var("MULTIARCH") or ""
  dirs = [f"/usr/lib/{arch}", f"/lib/{arch}"] if arch else []
  return dirs + ["/usr/lib64", "/usr/lib", "/usr/local/lib"]


def find(name: str, dirs: Sequence[str]) -> str | None:
  """The path of the named allocator's library in `dirs`, or None."""
  for library in LIBRARIES[name]:
    for directory in dirs:
      path = os.path.join(directory, library)
      if os.path.exists(path):
        return path
  return None


def choose(environ: Mapping[str, str], dirs: Sequence[str]) -> str | None:
  """The library to preload for `environ`'s MAT_JAX_ALLOCATOR, or None for the system's allocator. A value
  that names no allocator, or one that is not installed, is a SystemExit naming the fix."""
  value = environ.get(ENV, "auto").strip() or "auto"
  if value == "system":
    return None
  if value == "auto":
    return next((path for name in LIBRARIES if (path := find(name, dirs))), None)
  if value in LIBRARIES:
    path = find(value, dirs)
    if path is None:
      raise SystemExit(f"{ENV}={value}: {value} is not installed in {', '.join(dirs)} ({INSTALL[value]}); "
                       f"or set {ENV}=system to keep the system's allocator")
    return path
  if os.path.isabs(value) and os.path.isfile(value):
    return value
  raise SystemExit(f"{ENV}={value!r}: use auto (the default), system, jemalloc, tcmalloc or the absolute path of an "
                   "allocator's shared library")


def preloaded(environ: Mapping[str, str], path: str) -> bool:
  """Whether LD_PRELOAD already holds `path` or an allocator the user chose (a library named *malloc*:
  jemalloc, tcmalloc, mimalloc, ...): nothing to do."""
  entries = [os.path.basename(entry) for entry in environ.get("LD_PRELOAD", "").replace(":", " ").split()]
  return os.path.basename(path) in entries or any("malloc" in entry for entry in entries)


def restart_environment(argv: Sequence[str], environ: Mapping[str, str], dirs: Sequence[str]) -> dict[str, str] | None:
  """The environment to start `python -m mat_jax...` (`argv`: the interpreter's whole command line) again
  with, its allocator in LD_PRELOAD; None when the run keeps its process."""
  module = argv.index("-m") + 1 if "-m" in argv else len(argv)  # after the interpreter's own options
  if module >= len(argv) or argv[module].split(".")[0] != "mat_jax":
    return None
  path = choose(environ, dirs)
  if path is None or preloaded(environ, path):
    return None
  return dict(environ, LD_PRELOAD=" ".join(filter(None, (path, environ.get("LD_PRELOAD", "")))))


def restart_with_allocator() -> None:
  """Start this `python -m mat_jax...` run again with jemalloc or tcmalloc preloaded (`restart_environment`);
  called by the package's `__init__` while a module given to -m is being found (sys.argv[0] is then "-m")."""
  if sys.platform != "linux" or sys.argv[:1] != ["-m"] or not sys.executable:
    return
  environ = restart_environment(sys.orig_argv, os.environ, library_dirs())
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
      os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError as e:  # the run goes on, with the system's allocator
      print(f"mat_jax: could not start again with {environ['LD_PRELOAD'].split()[0]} preloaded ({e}); "
            f"running with the system's allocator ({ENV}=system hides this)", file=sys.stderr)

