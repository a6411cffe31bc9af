"""Atomic file writes (a reader sees the old file or the new one, never half of one) and
the check that a folder can be written before work that would write there starts."""

from __future__ import annotations

import os
import tempfile

#: Names of the temp files :func:`atomic_write` renames into place; one left behind
#: is an unfinished write of a process that was killed.
TMP_PREFIX = ".tmp-"


def _umask() -> int:
  """The process umask, read without changing it where Linux allows (os.umask sets it
  process-wide, which threads writing files at the same moment would see)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def atomic_write(path: str | os.PathLike, payload: bytes) -> None:
  """Writes ``payload`` to ``path`` through a temp file in the same folder and a rename.

  The folder is created if missing. The file gets the permissions a plain ``open``
  would give it (0666 less the umask), not mkstemp's 0600.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
      os.fchmod(f.fileno(), 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def check_writable_dir(path: str | os.PathLike) -> None:
  """Creates the folder ``path`` if missing and writes (then removes) a file in it.

  A permission or mode check is not enough: root passes every permission check, while a
  read-only mount, a full disk or a file where a folder is expected still refuse writes.

  Raises:
    OSError: the folder cannot be created or written (its ``filename`` the path that
      failed, its ``strerror`` why).
  """
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path, prefix=TMP_PREFIX + "write-check-"):
    pass


__all__ = ["TMP_PREFIX", "atomic_write", "check_writable_dir"]
