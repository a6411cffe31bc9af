"""Checks of a binary's flags, before any work (pruning can take minutes): each raises a
:class:`FlagError` naming the flag as it is written on the command line, its value and
what is allowed; :func:`experiments.cli.run` reports it as a one-line usage error."""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np

from experiments import results

#: The largest seed: a JAX key keeps 32 bits of a seed (without x64, a larger one would
#: name the same key as a smaller one).
MAX_SEED = 2**32 - 1


class FlagError(ValueError):
  """A flag or config field whose value is not allowed: the user's mistake, found before
  any work. The message names the flag as written on the command line (``--name=value``
  or ``--config.field=value``) and what is allowed; the binaries report it as a one-line
  usage error, without a traceback (:func:`experiments.cli.run`)."""


@contextlib.contextmanager
def flag_errors(prefix: str | None = None):
  """Inside the block, a ValueError of a library check becomes a :class:`FlagError`:
  with its message as it is when the check was given the flag's name (e.g.
  ``pruning.check_pruning_type(value, "--config.pruning_type")``), else after
  ``prefix`` (the flag and value, e.g. ``"--config.pruner='rigl'"``)."""
  try:
    yield
  except FlagError:
    raise
  except ValueError as err:
    raise FlagError(f"{prefix}: {err}" if prefix else str(err)) from None


def parse_list(value: str, cast=str, name: str = "list") -> list:
  """The comma-separated items of flag ``name`` (empty items dropped), each ``cast``."""
  items = [v.strip() for v in value.split(",") if v.strip()]
  try:
    return [cast(v) for v in items]
  except ValueError:
    raise FlagError(
      f"--{name}={value!r} is not a comma-separated list of {cast.__name__} values."
    ) from None


def check_int_flag(
  name: str, value, *, low: int = 1, high: int | None = None, allow_none: bool = False
) -> None:
  """Raises FlagError unless ``value`` is an integer in [``low``, ``high``] (or None if
  allowed). ``0`` is a value, not "not given"."""
  if value is None and allow_none:
    return
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or value < low
    or (high is not None and value > high)
  ):
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise FlagError(
      f"--{name}={value!r} must be an integer {allowed}"
      + (" (or not given)." if allow_none else ".")
    )


def check_seed_flag(name: str, value) -> None:
  """A seed: an integer in [0, :data:`MAX_SEED`]."""
  check_int_flag(name, value, low=0, high=MAX_SEED)


def check_compression_flag(name: str, value) -> float:
  """A target compression: a finite number >= 1 (1 = dense); returns it as a float."""
  try:
    c = float(value)
  except (TypeError, ValueError):
    raise FlagError(f"--{name}={value!r} must be a number >= 1.") from None
  if not (math.isfinite(c) and c >= 1):
    raise FlagError(
      f"--{name}={value!r} must be a finite number >= 1 (1 = dense; 100 = 99% sparse)."
    )
  return c


def check_writable_dir(name: str, path: str) -> None:
  """Creates ``path`` if needed and checks a file can be written in it
  (:func:`sparsejax.files.check_writable_dir`)."""
  try:
    results.check_writable_dir(path)
  except OSError as err:
    raise FlagError(
      f"--{name}={path!r} is not a writable folder: {err.strerror or err}"
      + (f" ({err.filename})." if err.filename and err.filename != path else ".")
    ) from None


def check_existing_dir(name: str, path: str) -> None:
  """``path`` is a folder that exists (one to read from)."""
  if not os.path.isdir(path):
    what = "is not a folder" if os.path.exists(path) else "does not exist"
    raise FlagError(f"--{name}={path!r} {what} ({os.path.abspath(path)}).")


def _values(value) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value]


def check_run_args(
  *,
  out_dir: str | None = None,
  compressions: dict | None = None,
  counts: dict | None = None,
  optional_counts: dict | None = None,
  nonnegative: dict | None = None,
  seeds: dict | None = None,
) -> None:
  """Checks a binary's flags before any work. Each argument maps flag names to a value
  or a list of values: ``compressions`` finite >= 1, ``counts`` integers >= 1,
  ``optional_counts`` the same or None, ``nonnegative`` integers >= 0 (steps),
  ``seeds`` integers in [0, :data:`MAX_SEED`]; ``out_dir`` must be a folder that can be
  written (created if missing).

  Raises:
    FlagError: naming the first bad flag, its value and what is allowed.
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
  for name, value in (seeds or {}).items():
    for v in _values(value):
      check_seed_flag(name, v)
  if out_dir is not None:
    check_writable_dir("out_dir", out_dir)
