"""Helper processes started with the spawn method: the input pipeline's Grain workers, the shapes world's builders.

Spawn, not fork: a process that has started JAX runs threads, and a forked child of a threaded process can
deadlock on a lock some other thread held at the fork. A spawned process starts a fresh interpreter, which
first imports the parent's `__main__` module (Python's rule, so that functions defined there can be
unpickled). For a command line (`python -m mat_jax.train`) that is the whole framework, and for a user's
script without an `if __name__ == "__main__":` guard it would run the script again; a helper whose work
lives in mat_jax's modules needs neither, so `main_module_hidden` keeps `__main__` from being named to the
processes started inside it. What they are given of a script's own definitions (a data source's class, a
function) Grain pickles with cloudpickle, which carries whatever `__main__` defines by value.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
  """While processes start inside: the parent's `__main__` module is not named to them (multiprocessing's
  spawn reads its spec, else its file)."""
  main = sys.modules.get("__main__")
  if main is None:
    yield
    return
  saved = {name: main.__dict__.pop(name) for name in ("__spec__", "__file__") if name in main.__dict__}
  main.__spec__ = None
  try:
    yield
  finally:
    main.__dict__.pop("__spec__", None)
    main.__dict__.update(saved)


def ignore_interrupts(*_: object) -> None:
  """A helper process's initializer: ignore Ctrl-C. A terminal sends SIGINT to the whole process group; the
  parent handles it (a training run checkpoints, then stops its helpers), and a helper raising
  KeyboardInterrupt itself would only print a traceback of its own."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def die_with_parent(parent: int) -> None:
  """End this helper process once its parent (PID `parent`) has ended, however it ended. A parent killed
  with SIGKILL stops nothing: its helpers would live on, adopted by init, blocked on their pipes to it,
  holding their memory and the parent's stdout (a `command | tee` would never end)."""
  # A daemon thread that looks twice a second. Linux's PR_SET_PDEATHSIG would act at once, but it fires when
  # the *thread* that started the process ends, and Grain starts its workers from whichever thread first
  # reads the pipeline.
  if os.getppid() != parent:  # the parent ended before this process got here
    os._exit(1)
  threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True, name="die-with-parent").start()


def _exit_when_orphaned(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(0.5)
  os._exit(1)


def helper_initializer(parent: int, *_: object) -> None:
  """The initializer of a helper process (a world builder, a pipeline worker), given its parent's PID:
  `ignore_interrupts` and `die_with_parent`. Further arguments (Grain's worker index and count) are unused."""
  ignore_interrupts()
  die_with_parent(parent)


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity where the platform tells it, else the count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1
