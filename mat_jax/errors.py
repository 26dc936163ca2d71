"""User-facing errors and the command-line wrapper that reports them.

`MatJaxError` is the base of every error caused by the input (a config, a model directory, data, a
workdir, devices, a damaged checkpoint) whose message already names the fix. The command-line entry
points run through `cli_main`, which turns such an error into one `error: ...` line on stderr and exit
status 2; anything else is a bug and keeps its traceback. The same wrapper reports a full disk (ENOSPC)
in one line naming the directory and its free space, and an interrupt (Ctrl-C, SIGTERM) in one line.

    def main(argv=None) -> int:
      return errors.cli_main(_main, argv)
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shells' 128 + signal number


class MatJaxError(Exception):
  """An error in what the user gave (input, files, settings); its message says what to do."""


class ConfigError(MatJaxError, ValueError):
  """A setting that does not fit: an experiment file or its argument, a `--config.key=value` override, or a
  model's config.json that the port cannot represent; the message names the key and the valid values."""


class InputError(MatJaxError, ValueError):
  """A value passed to a public function or command (pixels, eps, steps, token ids, indices) that the
  computation cannot take; checked on the host before anything is compiled."""


class WorkdirError(MatJaxError, OSError):
  """A workdir or output directory that cannot be used: not writable, a file, or locked by another run."""


class DiskFullError(MatJaxError, OSError):
  """No space left on the device that holds the workdir or output directory."""


class Interrupted(MatJaxError):
  """The run was stopped by SIGINT or SIGTERM after keeping what it had finished."""

  def __init__(self, message: str, signum: int = signal.SIGINT):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return EXIT_INTERRUPTED.get(self.signum, 130)


def shown_json(value: Any, limit: int = 80) -> str:
  """A value as a JSON file spells it (null, "256" with its quotes, {"raw": ...}), cut to `limit`
  characters: how an error message quotes a bad entry of an annotation or config file."""
  try:
    text = json.dumps(value, ensure_ascii=False)
  except (TypeError, ValueError):  # a structure built in Python may hold other objects
    text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# Directories.


def positive_int(text: str) -> int:
  """The argparse type of a count or size (--batch, --image-size): a whole number >= 1, checked before any
  work (0 could silently mean a default, a negative size fails far from the flag)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


# Seeds and counts go into jitted programs as int32 (JAX's default integer): a larger one overflows there.
INT32_MAX = 2 ** 31 - 1


def seed(text: str) -> int:
  """The argparse type of --seed: a whole number in [0, 2**31 - 1]."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
  if not 0 <= value <= INT32_MAX:
    raise argparse.ArgumentTypeError(f"use a seed in [0, {INT32_MAX}], got {value}")
  return value


def positive_float(text: str) -> float:
  """The argparse type of a duration or budget (--seconds): a finite number > 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not 0 < value < float("inf"):  # NaN fails too
    raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
  return value


def directory(text: str) -> str:
  """The argparse type of a directory flag (--workdir, --out, --data-dir, ...): any path but an empty one,
  which would otherwise mean the flag's default or the current directory without a word."""
  if not text.strip():
    raise argparse.ArgumentTypeError("expected a directory, got an empty string; leave the flag out for its default")
  return text


def check_directory_path(path: str | os.PathLike, flag: str) -> Path:
  """`path` as an absolute directory path, refused when it or a parent is a file (read-only is fine)."""
  path = Path(path).expanduser().absolute()
  for parent in [path, *path.parents]:
    if parent.exists():
      if not parent.is_dir():
        raise WorkdirError(f"{flag} {path}: {parent} is a file, not a directory; pass another {flag}")
      break
  return path


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
  """Create `path` (and its parents) if needed and prove a file can be written in it, before any work.

  `flag` names the option the path came from (`--out`, `--workdir`) so the message says what to change.
  """
  path = check_directory_path(path, flag)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
      pass
  except OSError as err:
    if err.errno == errno.ENOSPC:
      raise disk_full(path, err) from None
    reason = err.strerror or str(err)
    raise WorkdirError(f"{flag} {path} is not writable ({reason}); pass a directory you can write to") from None
  return path


def free_space(path: str | os.PathLike) -> str:
  """The free space of the file system holding `path` (or its nearest existing parent), readable."""
  path = Path(path).absolute()
  while not path.exists() and path != path.parent:
    path = path.parent
  try:
    free = shutil.disk_usage(path).free
  except OSError:
    return "unknown free space"
  for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
    if free < 1024 or unit == "TiB":
      return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
    free /= 1024
  return f"{free} free"  # unreachable: the loop returns at TiB


def disk_full(path: str | os.PathLike | None, err: BaseException | None = None) -> DiskFullError:
  """The one-line report of a full disk: which directory, how much is free, what to do."""
  where = Path(path or getattr(err, "filename", None) or os.getcwd())
  return DiskFullError(f"no space left on the device holding {where} ({free_space(where)}); free some space "
                       "(or point the output elsewhere) and rerun the same command: finished checkpoints "
                       "are kept and a training run resumes from the newest one")


def is_disk_full(err: BaseException) -> bool:
  """ENOSPC anywhere in the exception chain, or as the message of a wrapped error (Orbax/TensorStore
  report a full disk as RESOURCE_EXHAUSTED in a ValueError raised from a background thread)."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
      return True
    text = str(err)
    if "No space left on device" in text or ("RESOURCE_EXHAUSTED" in text and "space" in text.lower()):
      return True
    err = err.__cause__ or err.__context__
  return False


def _filename(err: BaseException) -> str | None:
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    name = getattr(err, "filename", None)
    if name:
      return str(name)
    err = err.__cause__ or err.__context__
  return None


# ----------------------------------------------------------------------------------------------------
# The command-line wrapper.


def _raise_interrupt(signum: int, frame: Any) -> None:
  raise Interrupted("interrupted by SIGTERM", signal.SIGTERM)


class _NoUnretrievedExceptions(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    # asyncio's words for a task's or a gathering future's: "... exception was never retrieved".
    return "exception was never retrieved" not in record.getMessage()


def quiet_unretrieved_async_errors() -> None:
  """Drop asyncio's "exception was never retrieved" tracebacks (installed once). Orbax's failed reads and
  writes leave futures holding the error that was already reported, and asyncio prints each when it is
  collected, which can be after the command's own one-line error, at exit."""
  logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _NoUnretrievedExceptions) for f in logger.filters):
    logger.addFilter(_NoUnretrievedExceptions())


def cli_main(fn: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, *,
             output_dir: Callable[[], str | os.PathLike | None] | None = None) -> int:
  """Run a command's `fn(argv) -> exit status`, reporting user errors in one line.

  - `MatJaxError` (and its subclasses): `error: <message>` on stderr, exit 2;
  - a full disk (ENOSPC, however wrapped): one line naming the directory and its free space, exit 2;
  - Ctrl-C or SIGTERM: one line (the run's own "interrupted at step N ..." when it gave one), exit
    130 / 143. SIGTERM is turned into an exception here, so `finally` blocks and the training loop's
    own handler run as on Ctrl-C.
  `output_dir`: returns the directory the command writes to, named by the disk-full line when the error
  does not carry a file name.
  """
  previous = None
  try:
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
  except ValueError:  # not the main thread: signals stay as they are
    pass
  try:
    return fn(argv)
  except Interrupted as err:
    print(f"{err}", file=sys.stderr)
    return err.exit_code
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED[signal.SIGINT]
  except MatJaxError as err:
    print(f"error: {err}", file=sys.stderr)
    return EXIT_USER_ERROR
  except Exception as err:
    if is_disk_full(err):
      quiet_unretrieved_async_errors()  # Orbax's failed writes: the same error, printed again at exit
      where = _filename(err) or (output_dir() if output_dir is not None else None)
      print(f"error: {disk_full(Path(where).parent if where and Path(where).is_file() else where, err)}",
            file=sys.stderr)
      return EXIT_USER_ERROR
    raise
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
