"""Experiment configs in the Flax-examples style: one ConfigDict file per network.

  python -m experiments.prune_train --config=experiments/configs/lenet300100.py \
      --config.pruner=random/igq --config.compression=100 --config.train_steps=3000

Each ``<arch>.py`` here has ``get_config()`` returning the paper's settings for that
network (method.md section 5; fields in :mod:`experiments.configs.base`), and every
field can be overridden on the command line. The transformers beyond the paper
(``vit.py``, ``gpt.py``) choose AdamW with warmup and cosine decay
(``--config.optimizer``, ``--config.schedule``); the paper's networks keep its SGD.
Values follow the reference code (avysogorets/effective-sparsity, ``main.py``): SGD
with momentum 0.9, a piecewise-constant learning rate divided by 10 at the listed
fractions of the run, L2 on kernels only.

Learning-rate boundaries are fractions of the run, so overriding ``train_steps``
(a short run) scales the schedule with it. ``weight_decay`` is the gradient
coefficient: the paper's Keras ``l2(c)`` adds ``c * sum(w ** 2)`` to the loss, whose
gradient is ``2c * w``: 1e-3 for the LeNets and 2e-4 for VGG and ResNet-18.

:func:`load` (and :func:`parse`, for a whole command line) is the one way a config is
built from a file and overrides, in this process or on a command line: it runs the
same ``config_flags`` parser.

Networks come from the registry (:data:`sparsejax.models.MODELS`): one registered
without a file here (a user's, through ``--import``) runs with the generic config
``generic.py:<arch>`` (:mod:`experiments.configs.generic`), which :func:`path` names.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from experiments import checks
from sparsejax import errors, models, training

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
#: The config of every registered network without a file of its own (``generic.py:<arch>``).
GENERIC = os.path.join(CONFIG_DIR, "generic.py")
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(training.TrainConfig))
# An override on a command line, as config_flags recognizes one: --config.<field>[=...]
# (or --noconfig.<field> for a bool).
_OVERRIDE = re.compile(r"^-{1,2}(?:no)?config\.([^=]+)")


def archs() -> tuple[str, ...]:
  """Every network an experiment can run: the registered ones
  (:data:`sparsejax.models.MODELS`, those of ``--import`` too)."""
  return tuple(models.MODELS)


def path(arch: str) -> str:
  """The config file of network ``arch``: ``experiments/configs/<arch>.py``, or
  ``generic.py:<arch>`` (:mod:`experiments.configs.generic`) for a registered network
  without one.

  Raises:
    ValueError: ``arch`` is not a registered network.
  """
  if arch not in models.MODELS:
    raise ValueError(f"arch={arch!r} is not a known network; allowed: {', '.join(archs())}.")
  own = os.path.join(CONFIG_DIR, f"{arch}.py")
  return own if os.path.isfile(own) else f"{GENERIC}:{arch}"


def check_arch(arch: str, flag: str) -> None:
  """FlagError unless ``arch`` is a registered network (``flag``: the flag that gave it,
  e.g. ``--config.arch`` or ``--archs``)."""
  if arch not in models.MODELS:
    raise checks.FlagError(
      f"{flag}={arch!r} is not a known network; allowed: {', '.join(archs())}."
    )


def override_args(overrides: dict | Sequence[str]) -> list[str]:
  """Command-line arguments ``--config.<field>=<value>`` for ``overrides``: a dict, or
  strings 'field=value', '--field=value' or '--config.field=value'."""
  items = (
    [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, dict) else list(overrides)
  )
  args = []
  for item in items:
    item = str(item).lstrip("-")
    if item.startswith("config."):
      item = item[len("config.") :]
    if "=" not in item:
      raise ValueError(f"override {item!r} is not of the form field=value.")
    args.append(f"--config.{item}")
  return args


def _is_file(arch_or_path: str) -> bool:
  return arch_or_path.endswith(".py") or ".py:" in arch_or_path


def load(arch_or_path: str, overrides: dict | Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of ``arch_or_path`` (a network name or a config file) with
  ``overrides`` applied, parsed exactly as ``--config=<file> --config.<field>=<value>``
  on a command line (:func:`parse`).

  Raises:
    ValueError: unknown network, missing file, unknown field or a value that does not
      parse.
  """
  file = arch_or_path if _is_file(arch_or_path) else path(arch_or_path)
  return parse(["load", f"--config={file}"] + override_args(overrides), file)


def parse(argv: Sequence[str], default: str) -> ml_collections.ConfigDict:
  """The config a command line describes: ``--config=<file>`` (else ``default``) with its
  ``--config.<field>=<value>`` overrides, parsed by ml_collections' ``config_flags`` as a
  binary's ``--config`` flag parses them (other arguments are ignored; --flagfile is
  read). Checked first, so that each mistake is one line naming it: a file that is
  missing or does not load, and a field the config does not have ("did you mean").

  Raises:
    experiments.checks.FlagError: the first mistake, the flag and what is allowed.
  """
  probe = flags.FlagValues()
  flags.DEFINE_string("config", default, "", flag_values=probe)
  argv = probe.read_flags_from_files(list(argv), force_gnu=True)
  try:
    probe(argv, known_only=True)
  except flags.Error as err:
    raise checks.FlagError(f"--config: {err}") from None
  file = probe.config
  fields = sorted(_load_alone(file).keys())
  given = [m.group(1) for m in map(_OVERRIDE.match, argv) if m]
  for name in given:
    field = name.split(".", 1)[0]
    if field not in fields:
      close = difflib.get_close_matches(field, fields, n=1)
      raise checks.FlagError(
        f"--config.{name}: there is no field {field!r} in the config {file!r}"
        + (f"; did you mean --config.{close[0]}?" if close else ".")
        + f" Fields are set as --config.<field>=<value>, with <field> one of: "
        f"{', '.join(fields)}."
      )
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file("config", default, flag_values=values, sys_argv=argv)
    values(argv, known_only=True)
  except (flags.Error, TypeError, ValueError) as err:
    raise checks.FlagError(
      f"config={file!r} with overrides {[a for a in argv if _OVERRIDE.match(a)]}: "
      f"{_last_line(err)}. Fields are set as --config.<field>=<value>, with <field> one "
      f"of: {', '.join(fields)}."
    ) from None
  return values.config


def _last_line(err: Exception) -> str:
  """An error's message as one line: config_flags wraps a config file's error in the
  traceback's text, whose last line is the error itself."""
  lines = [line.strip() for line in str(err).strip().strip("\"'").splitlines() if line.strip()]
  return lines[-1] if lines else type(err).__name__


def _load_alone(file: str) -> ml_collections.ConfigDict:
  """The config of ``file`` (``path.py`` or ``path.py:<argument>``), no overrides.

  Raises:
    experiments.checks.FlagError: no such file, or loading it raised (its error in one
      line).
  """
  filename = file.split(":", 1)[0]
  if not os.path.isfile(filename):
    raise checks.FlagError(
      f"--config={file!r}: no such config file ({os.path.abspath(filename)}); give "
      f"experiments/configs/<arch>.py or experiments/configs/generic.py:<arch> (<arch> one "
      f"of: {', '.join(archs())})."
    )
  values = flags.FlagValues()
  argv = ["load", f"--config={file}"]
  try:
    config_flags.DEFINE_config_file("config", file, flag_values=values, sys_argv=argv)
    values(argv)
    config = values.config
    config.keys()  # config_flags defers a failed load to the first access
  except Exception as err:  # a user's config file can raise anything; reported, named
    raise checks.FlagError(f"--config={file!r} does not load: {_last_line(err)}") from None
  return config


def fields_help(file: str) -> str:
  """One line for ``--help``: the fields of the config ``file`` with their values there
  (the defaults a run overrides)."""
  config = _load_alone(file)
  shown = ", ".join(f"{k}={config[k]!r}" for k in sorted(config.keys()))
  return f"Fields (defaults of {os.path.basename(file)}): {shown}."


def train_config(config: ml_collections.ConfigDict) -> training.TrainConfig:
  """The :class:`sparsejax.training.TrainConfig` of an experiment config.

  Raises:
    experiments.checks.FlagError: a training field's value is not allowed, named as
      its flag (``--config.learning_rate=inf must be a finite number > 0.``).
  """
  try:
    return training.TrainConfig(**{k: config[k] for k in TRAIN_FIELDS})
  except errors.FieldError as err:
    raise checks.FlagError(f"--config.{err.field}={err.value!r} must be {err.allowed}.") from None


def get_config(arch: str, **overrides) -> training.TrainConfig:
  """The paper's training config for network ``arch`` with ``overrides`` replaced.

  Example: ``get_config("lenet300100", train_steps=960)`` keeps the decays at
  25/96, 50/96 and 75/96 of the (now shorter) run.

  Raises:
    ValueError: unknown ``arch``, unknown field in ``overrides`` or an invalid value.
  """
  unknown = sorted(set(overrides) - set(TRAIN_FIELDS))
  if unknown:
    raise ValueError(
      f"overrides {unknown} are not TrainConfig fields; allowed: {', '.join(TRAIN_FIELDS)}."
    )
  return dataclasses.replace(train_config(load(arch)), **overrides)


#: The training config of every network registered when this module was imported (the
#: zoo's); :func:`get_config` reads the registry at the time of the call.
CONFIGS: dict[str, training.TrainConfig] = {arch: get_config(arch) for arch in archs()}

TrainConfig = training.TrainConfig
weight_decay_from_keras_l2 = training.weight_decay_from_keras_l2

__all__ = [
  "CONFIGS",
  "GENERIC",
  "archs",
  "fields_help",
  "parse",
  "TrainConfig",
  "get_config",
  "load",
  "path",
  "train_config",
  "override_args",
  "weight_decay_from_keras_l2",
]
