"""``--import=module[,module]``: a user's modules that register pruners
(:func:`sparsejax.pruning.register_pruner`), networks
(:func:`sparsejax.models.register_model`) or other extensions, imported before a binary
reads its flags, so that the names they register are valid everywhere a built-in one
is: in ``--config``, ``--pruners``, ``--arch``, ``--help`` and the sweep's children.

Each item is either

- a module name (``my_pruners`` or ``lab.pruners``), imported with ``importlib`` from
  ``sys.path`` (the working directory is on it for ``python -m``; Ray workers see the
  repository and ``$PYTHONPATH``), or
- a path to a ``.py`` file (``path/to/my_pruners.py``; any item that ends in ``.py``
  or holds a path separator), loaded as the module ``sparsejax_import_<file stem>``.

A module is imported once per process: a second ``--import`` of it (a sweep's in-process
runs, a reused Ray worker) does not register its names again.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterable, Sequence

from absl import flags

FLAG = "import"
#: The prefix of the module name of a file imported by path.
PATH_MODULE_PREFIX = "sparsejax_import_"


class ImportFailedError(ValueError):
  """An ``--import`` item that could not be found or raised while importing."""


def define_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines ``--import`` (a comma-separated list) in ``flag_values``."""
  flags.DEFINE_list(
    FLAG,
    [],
    "Comma-separated modules (names on sys.path, or paths to .py files) imported before "
    "anything else, so that the pruners, networks and other extensions they register "
    "reach this binary (and a sweep's runs).",
    flag_values=flag_values,
  )


def is_path(item: str) -> bool:
  """An item names a file (ends in .py or holds a path separator), not a module."""
  return item.endswith(".py") or os.sep in item or (os.altsep is not None and os.altsep in item)


def normalized(items: Iterable[str]) -> list[str]:
  """``items`` as another process should get them: stripped, paths absolute (a child
  or a Ray worker may start in another folder), empty ones dropped."""
  out = []
  for item in items:
    item = item.strip()
    if item:
      out.append(os.path.abspath(os.path.expanduser(item)) if is_path(item) else item)
  return out


def import_module(item: str) -> types.ModuleType:
  """Imports one ``--import`` item (a module name or a .py path) once per process.

  Raises:
    ImportFailedError: no such module or file, or the module raised while importing
      (the flag, the item and the error named).
  """
  item = item.strip()
  if is_path(item):
    return _import_path(item)
  try:
    return importlib.import_module(item)
  except Exception as err:  # any error of the user's module is reported, named
    raise ImportFailedError(
      f"--{FLAG}={item!r}: cannot import module {item!r} ({type(err).__name__}: {err}); "
      "give a module name on sys.path (e.g. one in the working directory) or a path to "
      "a .py file."
    ) from err


def _import_path(item: str) -> types.ModuleType:
  path = os.path.abspath(os.path.expanduser(item))
  if not os.path.isfile(path):
    raise ImportFailedError(f"--{FLAG}={item!r}: no such file ({path}).")
  stem = os.path.splitext(os.path.basename(path))[0]
  name = PATH_MODULE_PREFIX + "".join(c if c.isalnum() else "_" for c in stem)
  loaded = sys.modules.get(name)
  if loaded is not None:
    if os.path.abspath(getattr(loaded, "__file__", "") or "") == path:
      return loaded
    raise ImportFailedError(
      f"--{FLAG}={item!r}: another file with the stem {stem!r} was imported as {name} "
      f"({loaded.__file__}); give files different names."
    )
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except Exception as err:  # any error of the user's module is reported, named
    del sys.modules[name]
    raise ImportFailedError(
      f"--{FLAG}={item!r}: importing {path} raised {type(err).__name__}: {err}"
    ) from err
  return module


def import_modules(items: Sequence[str]) -> list[types.ModuleType]:
  """Imports every item of ``--import`` in order (see :func:`import_module`)."""
  return [import_module(item) for item in items if item.strip()]


def import_from_argv(argv: Sequence[str]) -> list[str]:
  """Imports the modules ``--import`` names on the command line ``argv`` (read as absl
  reads it: ``--import=a,b`` or ``--import a,b``, the last one given, --flagfile
  expanded), before any other flag is defined; returns the items.

  Raises:
    ImportFailedError: an item could not be imported.
  """
  values = flags.FlagValues()
  define_flag(values)
  values(list(argv), known_only=True)
  items = values[FLAG].value or []
  import_modules(items)
  return items


def from_flags() -> list[str]:
  """The items of the parsed ``--import`` flag (:func:`normalized`)."""
  return normalized(flags.FLAGS[FLAG].value or [])
