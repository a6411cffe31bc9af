"""Checks of a binary's flags, before any work (pruning can take minutes): each names
the flag, its value and what is allowed (ValueError)."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np


def parse_list(value: str, cast=str, name: str = "list") -> list:
  """The comma-separated items of flag ``name`` (empty items dropped), each ``cast``."""
  items = [v.strip() for v in value.split(",") if v.strip()]
  try:
    return [cast(v) for v in items]
  except ValueError:
    raise ValueError(
      f"--{name}={value!r} is not a comma-separated list of {cast.__name__} values."
    ) from None


def check_int_flag(name: str, value, *, low: int = 1, allow_none: bool = False) -> None:
  """Raises ValueError unless ``value`` is an integer >= ``low`` (or None if allowed).
  ``0`` is a value, not "not given"."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(
      f"--{name}={value!r} must be an integer >= {low}"
      + (" (or not given)." if allow_none else ".")
    )


def check_compression_flag(name: str, value) -> float:
  """A target compression: a finite number >= 1 (1 = dense); returns it as a float."""
  try:
    c = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"--{name}={value!r} must be a number >= 1.") from None
  if not (math.isfinite(c) and c >= 1):
    raise ValueError(
      f"--{name}={value!r} must be a finite number >= 1 (1 = dense; 100 = 99% sparse)."
    )
  return c


def check_writable_dir(name: str, path: str) -> None:
  """Creates ``path`` if needed and checks a file can be written in it."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
      pass
  except OSError as err:
    raise ValueError(
      f"--{name}={path!r} is not a writable folder: {err.strerror or err}."
    ) from None


def _values(value) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value]


def check_run_args(
  *,
  out_dir: str | None = None,
  compressions: dict | None = None,
  counts: dict | None = None,
  optional_counts: dict | None = None,
  nonnegative: dict | None = None,
) -> None:
  """Checks a binary's flags before any work. Each argument maps flag names to a value
  or a list of values: ``compressions`` finite >= 1, ``counts`` integers >= 1,
  ``optional_counts`` the same or None, ``nonnegative`` integers >= 0 (seeds, steps);
  ``out_dir`` must be a folder that can be written (created if missing).

  Raises:
    ValueError: naming the first bad flag, its value and what is allowed.
  """
  for name, value in (compressions or {}).items():
    for v in _values(value):
      check_compression_flag(name, v)
  for name, value in (counts or {}).items():
    for v in _values(value):
      check_int_flag(name, v)
  for name, value in (optional_counts or {}).items():
    for v in _values(value):
      check_int_flag(name, v, allow_none=True)
  for name, value in (nonnegative or {}).items():
    for v in _values(value):
      check_int_flag(name, v, low=0)
  if out_dir is not None:
    check_writable_dir("out_dir", out_dir)
