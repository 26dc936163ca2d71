"""Where mat_jax keeps what it builds: the cache directory and the datasets directory.

- cache: `$MAT_JAX_CACHE_DIR`, else `~/.cache/mat_jax` (cached runs, the shapes world's masked LM,
  studies, compiled programs);
- datasets: `$MAT_JAX_DATA_DIR`, else `~/.cache/mat_jax/datasets` (TFDS builds, the shapes tokenizer).

Both are read from the environment at every call, so a test or a process that sets the variable late
still gets its own directories.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "MAT_JAX_CACHE_DIR"
DATA_DIR_ENV = "MAT_JAX_DATA_DIR"


def cache_root() -> Path:
  """mat_jax's cache directory: `$MAT_JAX_CACHE_DIR`, else `~/.cache/mat_jax`."""
  return Path(os.environ.get(CACHE_DIR_ENV) or "~/.cache/mat_jax").expanduser()


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """The data directory: the argument, else `$MAT_JAX_DATA_DIR`, else `~/.cache/mat_jax/datasets`."""
  if data_dir:
    return Path(data_dir).expanduser()
  return Path(os.environ.get(DATA_DIR_ENV) or "~/.cache/mat_jax/datasets").expanduser()
