"""An exclusive lock on a run's workdir, held for the whole run.

Two runs writing one workdir interleave their metric lines, mix their checkpoints and overwrite each
other's exported model. `WorkdirLock` takes `fcntl.flock` on `<workdir>/.lock` (non-blocking by
default) and writes the holder's PID and host into it, so a second run is refused in one line naming
them. The kernel drops a flock when its process dies, however it dies (SIGKILL, a preempted host): the
file a dead run leaves behind holds no lock, and the next run takes it over without any stale-PID guess.

On file systems where flock is not shared between hosts (some NFS setups), two hosts can both take it:
give each concurrent run its own --workdir there.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable

from mat_jax.errors import WorkdirError, check_writable_dir

LOCK_FILE = ".lock"


class WorkdirLockedError(WorkdirError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` holds the workdir for this process, or raises WorkdirLockedError.

  wait: block until the holder finishes instead of refusing (`on_wait` is told once who is waited for).
  """

  def __init__(self, workdir: str | os.PathLike, *, wait: bool = False, flag: str = "--workdir",
               on_wait: Callable[[str], None] | None = None):
    self.workdir = Path(workdir).expanduser().absolute()
    self.path = self.workdir / LOCK_FILE
    self.wait, self.flag, self.on_wait = wait, flag, on_wait
    self._fd: int | None = None

  def holder(self) -> str:
    """The recorded holder ("PID 123 on host h since ..."), or a phrase saying it is unknown."""
    return self.recorded_holder() or "an unknown process"

  def recorded_holder(self) -> str:
    """The holder the lock file records, "" where it records none: a run holds the workdir now (or was
    killed while holding it) exactly when one is recorded, as a finished run clears its record."""
    try:
      return self.path.read_text().strip()
    except OSError:
      return ""

  def acquire(self) -> "WorkdirLock":
    check_writable_dir(self.workdir, self.flag)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = self.holder()
        if not self.wait:
          raise WorkdirLockedError(
              f"{self.flag} {self.workdir} is in use by another run ({holder}); wait for it to finish, "
              f"stop it, or pass another {self.flag}") from None
        if self.on_wait is not None:
          self.on_wait(f"waiting for the process holding {self.workdir} ({holder})")
        fcntl.flock(fd, fcntl.LOCK_EX)
      # Ours now (any previous holder is dead or done): record who holds it, for the next run's message.
      os.ftruncate(fd, 0)
      stamp = time.strftime("%Y-%m-%d %H:%M:%S")
      os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()} since {stamp}\n".encode(), 0)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # a finished run leaves no holder behind
    except OSError:
      pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
