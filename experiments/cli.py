"""How an experiment binary starts: ``--import`` first, its ``--config`` checked, then
absl's flags and ``main``.

  if __name__ == "__main__":
    cli.run(main, define_flags, config_default=configs.path("lenet300100"))

Order matters because ml_collections' ``config_flags`` loads the config file (and
applies ``--config.<field>`` overrides) when the flag is defined or parsed, and the
help texts list the registered pruners and networks: a user's ``--import`` module must
have registered its names before either happens. A mistake on the command line before
``main`` runs (a module that does not import, a config file that does not exist, a
field the config does not have) is reported as absl reports a bad flag: one line,
``FATAL Flags parsing error: ...``, exit status 1, no traceback. So is every value that
``main``'s checks reject before any work (:class:`experiments.checks.FlagError`, or
absl's ``app.UsageError``); any other error is a bug and keeps its traceback.

This module imports no JAX unless the binary has a ``--config`` flag (the plots run
without it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

from experiments import checks, plugins


def usage_error(message: str):
  """Writes ``message`` as absl's flag parser writes a bad flag
  (``app.parse_flags_with_usage``) and exits with its status, 1."""
  sys.stderr.write(f"FATAL Flags parsing error: {' '.join(message.split())}\n")
  sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)


def run(main: Callable, define_flags: Callable[[], None], config_default: str | None = None):
  """Runs a binary's ``main`` with absl (``app.run``): imports ``--import``'s modules,
  checks the ``--config`` command line (binaries with a config flag: its default file
  ``config_default``, :func:`experiments.configs.parse`), defines the flags
  (``define_flags``) and parses them; a :class:`experiments.checks.FlagError` or
  ``app.UsageError`` that ``main`` raises is reported by :func:`usage_error`.
  """

  def parse(argv: list[str]) -> list[str]:
    try:
      plugins.import_from_argv(argv)
      if config_default is not None:
        from experiments import configs  # JAX: only binaries with a --config flag

        configs.parse(argv, config_default)
    except (ValueError, flags.Error) as err:
      usage_error(str(err))
    define_flags()
    return app.parse_flags_with_usage(argv)

  def checked_main(argv: list[str]):
    try:
      return main(argv)
    except (checks.FlagError, app.UsageError) as err:
      usage_error(str(err))

  app.run(checked_main, flags_parser=parse)
