"""JAX's persistent compilation cache for the binaries: its flags and where it lives.

The library never turns it on: it is the binary's choice (a later process loads the
compiled programs, sweeps, scores and steps, instead of compiling them again).
"""

from __future__ import annotations

import os

import jax
from absl import flags

from experiments import checks


def default_dir() -> str:
  """$XDG_CACHE_HOME/sparsejax/jax (default ~/.cache/sparsejax/jax)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sparsejax", "jax")


def define_flags() -> None:
  flags.DEFINE_string(
    "compilation_cache_dir",
    default_dir(),
    "JAX's persistent compilation cache: a later process loads the "
    "compiled programs (sweeps, scores, steps) instead of compiling them "
    "again. Empty: off.",
  )
  flags.DEFINE_bool(
    "compilation_cache", True, "Use the persistent compilation cache (--nocompilation_cache: off)."
  )


def enable(directory: str | None, enabled: bool = True) -> str | None:
  """Turns on JAX's persistent compilation cache in ``directory`` for every program
  (also the ones that compile in under a second); returns the directory, or None
  when off (``enabled`` False or an empty directory). The library never does this: it
  is the binary's choice."""
  if not enabled or not directory:
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as err:
    raise checks.FlagError(
      f"--compilation_cache_dir={directory!r} cannot be created ({err}); "
      "give a writable folder, or --nocompilation_cache."
    ) from None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return directory


def from_flags() -> str | None:
  """:func:`enable` as the flags of :func:`define_flags` say."""
  return enable(flags.FLAGS.compilation_cache_dir, flags.FLAGS.compilation_cache)
