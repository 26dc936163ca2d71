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
import re
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence

ENV = "MAT_JAX_ALLOCATOR"
# Set in the environment of the run started again: it never starts again itself.
STARTED = "MAT_JAX_ALLOCATOR_STARTED"
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
  that names no allocator, one that is not installed, or a path that is not a file is a SystemExit naming
  the fix."""
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
  if not os.path.isabs(value):
    raise SystemExit(f"{ENV}={value!r}: use auto (the default), system, jemalloc, tcmalloc or the absolute path of "
                     "an allocator's shared library")
  if any(c.isspace() or c == ":" for c in value):  # LD_PRELOAD separates its libraries by both
    raise SystemExit(f"{ENV}={value!r}: LD_PRELOAD cannot hold a path with spaces or colons; link the library "
                     "from a path without them")
  if not os.path.isfile(value):
    raise SystemExit(f"{ENV}={value}: no such file; give the absolute path of an allocator's shared library, "
                     f"or {ENV}=system")
  return value


def _preloads(environ: Mapping[str, str]) -> list[str]:
  """The names of the libraries LD_PRELOAD holds (it separates them by spaces or colons)."""
  return [os.path.basename(entry) for entry in environ.get("LD_PRELOAD", "").replace(":", " ").split()]


def restart_environment(argv: Sequence[str], environ: Mapping[str, str], dirs: Sequence[str]) -> dict[str, str] | None:
  """The environment to start `python -m mat_jax...` (`argv`: the interpreter's whole command line) again
  with, its allocator first in LD_PRELOAD; None when the run keeps its process: another module, the
  system's allocator chosen, the run started again already (STARTED, which also stops a loop where the
  loader drops LD_PRELOAD), or, with `auto`, an allocator the user preloaded (a library whose name holds
  `malloc`: jemalloc, tcmalloc, mimalloc, glibc's malloc debugger)."""
  module = module_run(argv)
  if module is None or module.split(".")[0] != "mat_jax" or environ.get(STARTED):
    return None
  path = choose(environ, dirs)
  preloads = _preloads(environ)
  if path is None or os.path.basename(path) in preloads:
    return None
  if environ.get(ENV, "auto").strip() in ("", "auto") and any("malloc" in name for name in preloads):
    return None
  return dict(environ, LD_PRELOAD=" ".join(filter(None, (path, environ.get("LD_PRELOAD", "")))), **{STARTED: "1"})


# Python's short options, bundled as it allows (`-Im mat_jax.train`): those without an argument, then one
# that takes the rest of the token or the next one (-m MODULE, -c COMMAND, -W ARG, -X OPTION).
_FLAGS = "[bBdEhiIOPqRsSuvVx]*"
_BUNDLED_MODULE = re.compile(f"-{_FLAGS}m(.*)")
_BUNDLED_COMMAND = re.compile(f"-{_FLAGS}c.*")
_BUNDLED_OPTION = re.compile(f"-{_FLAGS}[WX](.*)")


def module_run(argv: Sequence[str]) -> str | None:
  """The module an interpreter's command line runs with -m (`python -u -m mat_jax.train`, `-mmat_jax.train`,
  `-Im mat_jax.train`), or None: a script, -c, or nothing to run."""
  rest = iter(argv[1:])
  for token in rest:
    if token == "--" or not token.startswith("-"):
      return None
    if token.startswith("--"):
      continue  # --check-hash-based-pycs takes its value with "="; other long options none
    if module := _BUNDLED_MODULE.fullmatch(token):
      return module.group(1) or next(rest, None)
    if _BUNDLED_COMMAND.fullmatch(token):
      return None
    if (option := _BUNDLED_OPTION.fullmatch(token)) and not option.group(1):
      next(rest, None)  # the option's argument
  return None


def _loads(path: str) -> bool:
  """Whether the dynamic loader preloads `path` into a trivial program without complaint (a library built
  for a newer glibc would otherwise stop every process of the run, its helpers' too)."""
  probe = next((p for p in ("/bin/true", "/usr/bin/true") if os.path.exists(p)), None)
  if probe is None:
    return True
  result = subprocess.run([probe], env={"LD_PRELOAD": path}, capture_output=True, check=False)
  return result.returncode == 0 and not result.stderr


def restart_with_allocator() -> None:
  """Start this `python -m mat_jax...` run again with jemalloc or tcmalloc preloaded (`restart_environment`);
  called by the package's `__init__` while a module given to -m is being found (sys.argv[0] is then "-m").
  A library the loader cannot preload, or a restart that fails, leaves the run on the system's allocator,
  said on stderr."""
  if sys.platform != "linux" or sys.argv[:1] != ["-m"] or not sys.executable:
    return
  environ = restart_environment(sys.orig_argv, os.environ, library_dirs())
  if environ is None:
    return
  library = environ["LD_PRELOAD"].split()[0]
  problem = None if _loads(library) else "the dynamic loader cannot preload it"
  if problem is None:
    for stream in (sys.stdout, sys.stderr):  # None where the descriptor was closed
      try:
        if stream is not None:
          stream.flush()
      except (OSError, ValueError):
        pass
    try:
      os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError as e:
      problem = str(e)
  if sys.stderr is not None:
    print(f"mat_jax: running with the system's allocator, not {library} ({problem}); {ENV}=system hides this",
          file=sys.stderr)
