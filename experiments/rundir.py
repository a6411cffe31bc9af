"""A run folder shared by the processes of one run: a lock, and the run's wall time.

- :func:`locked`: one process at a time works in a run folder (``fcntl.flock`` on
  ``<run dir>/.lock``, released by the kernel when the process ends however it ends);
  a second one gets :class:`RunLockedError` instead of deleting the first one's
  checkpoints. The new holder deletes the temp files of atomic writes that an
  earlier holder, killed mid-write, left in the folder.
- :class:`WallClock`: the seconds of every process that worked on the run, kept in
  ``<run dir>/wall_time.json`` and refreshed every few seconds, so that a killed
  process still counts (up to the last refresh).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time

from experiments import results
from sparsejax import files

LOCK_FILE = ".lock"
WALL_TIME_FILE = "wall_time.json"


class RunLockedError(RuntimeError):
  """Another process is working in this run folder."""

  def __init__(self, run_dir: str, holder: str):
    who = holder or "pid unknown"
    super().__init__(
      f"run folder {run_dir} is in use by another process ({who}); wait "
      "for it to finish or stop it, then run again."
    )
    self.run_dir = run_dir
    self.holder = holder


@contextlib.contextmanager
def locked(run_dir: str):
  """Holds the run folder's lock for the ``with`` block.

  Raises:
    RunLockedError: another process (or another ``with`` block of this one) holds it.
  """
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
      raise RunLockedError(run_dir, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    _remove_unfinished_writes(run_dir)
    try:
      yield
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def _remove_unfinished_writes(run_dir: str) -> None:
  """Deletes ``<run dir>/.tmp-*``: only the lock holder writes there, so with the lock
  held these are the unfinished writes of a killed holder (never a result)."""
  for name in os.listdir(run_dir):
    if name.startswith(files.TMP_PREFIX):
      with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(run_dir, name))


class WallClock:
  """This process's share of a run's wall time, added to those of earlier processes.

  Use under :func:`locked` (one writer). ``total()`` is the sum over all processes so
  far, ``this_process()`` the time since this clock started.
  """

  def __init__(self, run_dir: str, start: float | None = None, refresh: float = 5.0):
    self.path = os.path.join(run_dir, WALL_TIME_FILE)
    self.start = time.time() if start is None else start
    self.earlier = self._read()
    self._refresh = refresh
    self._stop = threading.Event()
    self._thread = None

  def _read(self) -> list[float]:
    try:
      with open(self.path) as f:
        seconds = json.load(f)["processes"]
      return [float(s) for s in seconds]
    except (OSError, ValueError, KeyError, TypeError):
      return []

  def this_process(self) -> float:
    return time.time() - self.start

  def total(self) -> float:
    return sum(self.earlier) + self.this_process()

  def processes(self) -> int:
    return len(self.earlier) + 1

  def save(self) -> None:
    results.atomic_write_json(self.path, {"processes": self.earlier + [self.this_process()]})

  def _loop(self) -> None:
    while not self._stop.wait(self._refresh):
      self.save()

  def __enter__(self) -> WallClock:
    self.save()
    self._thread = threading.Thread(target=self._loop, name="wall-clock", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.save()
