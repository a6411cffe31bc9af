"""Child processes of a sweep that end with it.

- :class:`Children` starts each run in its own process group (a terminal's Ctrl-C
  reaches the sweep only) and ends them all, group by group, when the sweep is
  stopped (:func:`stop_on_signals`: SIGINT, SIGTERM).
- A sweep killed outright (SIGKILL, a crash) cannot end them; instead each child
  watches its parent (:func:`exit_with_parent`, from ``$SPARSEJAX_PARENT_PID``) and
  terminates itself once the parent is gone. A terminated run resumes from its last
  checkpoint next time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time

from absl import logging

PARENT_ENV = "SPARSEJAX_PARENT_PID"


def exit_with_parent(poll_seconds: float = 1.0) -> None:
  """If started by a sweep (``$SPARSEJAX_PARENT_PID`` set), sends this process SIGTERM
  as soon as that parent is gone (checked every ``poll_seconds`` by a daemon thread)."""
  value = os.environ.get(PARENT_ENV)
  if not value:
    return
  parent = int(value)

  def watch():
    while os.getppid() == parent:
      time.sleep(poll_seconds)
    logging.error(
      "Parent process %d is gone; stopping this run (it resumes from its "
      "last checkpoint when run again).",
      parent,
    )
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Children:
  """Runs commands as child processes, each in its own process group, and ends them
  all on :meth:`stop`; no new child starts after it."""

  def __init__(self):
    self._procs: set[subprocess.Popen] = set()
    self._lock = threading.Lock()
    self.stopping = False

  def run(self, cmd: list[str], log) -> int:
    """Runs ``cmd`` (output to the open file ``log``) to its end; returns its exit code
    (negative: killed by that signal; -SIGTERM without starting once stopping)."""
    with self._lock:
      if self.stopping:
        return -signal.SIGTERM
      proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, PARENT_ENV: str(os.getpid())},
      )
      self._procs.add(proc)
    try:
      return proc.wait()
    finally:
      with self._lock:
        self._procs.discard(proc)

  def running(self) -> int:
    with self._lock:
      return len(self._procs)

  def pids(self) -> list[int]:
    with self._lock:
      return [p.pid for p in self._procs]

  def stop(self, grace_seconds: float = 10.0) -> None:
    """SIGTERM to every child's process group, SIGKILL to those still running after
    ``grace_seconds``."""
    with self._lock:
      self.stopping = True
      procs = list(self._procs)
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 0.0)):
      for p in procs:
        if p.poll() is None:
          with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
      deadline = time.time() + wait
      while wait and time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)


class Stopped(Exception):
  """The sweep got SIGINT or SIGTERM (``signum``); its children have been ended."""

  def __init__(self, signum: int):
    super().__init__(f"stopped by {signal.Signals(signum).name}")
    self.signum = signum


@contextlib.contextmanager
def stop_on_signals(children):
  """In the ``with`` block (main thread), SIGINT and SIGTERM end ``children`` (a
  :class:`Children`, or anything with ``running()`` and ``stop()``, e.g. the sweep's
  Ray tasks) and raise :class:`Stopped`; the previous handlers come back afterwards."""

  def handler(signum, frame):
    del frame
    logging.error(
      "Got %s: ending %d running run(s).", signal.Signals(signum).name, children.running()
    )
    children.stop()
    raise Stopped(signum)

  previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
