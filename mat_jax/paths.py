"""Where mat_jax keeps what it builds: the cache directory and the datasets directory.

- cache: `$MAT_JAX_CACHE_DIR`, else `~/.cache/mat_jax` (cached runs, the shapes world's masked LM,
  studies, compiled programs);
- datasets: `$MAT_JAX_DATA_DIR`, else `~/.cache/mat_jax/datasets` (TFDS builds, the shapes tokenizer).

Both are read from the environment at every call, so a test or a process that sets the variable late
still gets its own directories.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from mat_jax.errors import check_directory_path, check_writable_dir

CACHE_DIR_ENV = "MAT_JAX_CACHE_DIR"
DATA_DIR_ENV = "MAT_JAX_DATA_DIR"


def cache_root() -> Path:
  """mat_jax's cache directory: `$MAT_JAX_CACHE_DIR`, else `~/.cache/mat_jax`."""
  # Not checked here: without a usable cache a command still runs (runtime warns and compiles uncached).
  return Path(os.environ.get(CACHE_DIR_ENV) or "~/.cache/mat_jax").expanduser()


def _data_dir_and_origin(data_dir: str | os.PathLike | None) -> tuple[str | os.PathLike, str]:
  """The data directory as given, and where it came from: what its errors name for the user to change."""
  if data_dir:
    return data_dir, "data_dir (--data-dir, data.data_dir)"
  if os.environ.get(DATA_DIR_ENV):
    return os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
  return "~/.cache/mat_jax/datasets", f"data directory (the default; set ${DATA_DIR_ENV})"


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """The data directory: the argument, else `$MAT_JAX_DATA_DIR`, else `~/.cache/mat_jax/datasets`."""
  # A file where the directory should be is named with where the path came from, not met as a traceback
  # where the data is written.
  return check_directory_path(*_data_dir_and_origin(data_dir))


def writable_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """`default_data_dir`, created and proven writable before a build writes into it: a read-only one is a
  `WorkdirError` naming where it came from, not a traceback from the build's first write. (A read-only
  data dir that holds what a command reads serves it: call this only where something must be written.)"""
  return check_writable_dir(*_data_dir_and_origin(data_dir))


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
  """Write `text` beside `path` under a name of this write's own, then rename it over `path`: a reader, or
  a process killed mid-write, finds the old file whole or the new one, never part of one; two writers
  at once each replace it whole (the last rename wins)."""
  path = Path(path)
  partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
  try:
    partial.write_text(text)
    os.replace(partial, path)
  except BaseException:
    partial.unlink(missing_ok=True)
    raise
  return path
