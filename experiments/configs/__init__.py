"""Experiment configs in the Flax-examples style: one ConfigDict file per network.

  python -m experiments.prune_train --config=experiments/configs/lenet300100.py \
      --config.pruner=random/igq --config.compression=100 --config.train_steps=3000

Each ``<arch>.py`` here has ``get_config()`` returning the paper's settings for that
network (method.md section 5; fields in :mod:`experiments.configs.base`), and every
field can be overridden on the command line. Values follow the reference code
(avysogorets/effective-sparsity, ``main.py``): SGD with momentum 0.9, a piecewise-
constant learning rate divided by 10 at the listed fractions of the run, L2 on
kernels only.

Learning-rate boundaries are fractions of the run, so overriding ``train_steps``
(a short run) scales the schedule with it. ``weight_decay`` is the gradient
coefficient: the paper's Keras ``l2(c)`` adds ``c * sum(w ** 2)`` to the loss, whose
gradient is ``2c * w``: 1e-3 for the LeNets and 2e-4 for VGG and ResNet-18.

:func:`load` is the one way a config is built from a file and overrides, in this
process or on a command line: it runs the same ``config_flags`` parser.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from sparsejax import training

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
ARCHS = ("lenet300100", "lenet5", "vgg16", "vgg19", "resnet18")
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(training.TrainConfig))


def path(arch: str) -> str:
  """The config file of network ``arch``."""
  if arch not in ARCHS:
    raise ValueError(f"arch={arch!r} has no config file; allowed: {', '.join(ARCHS)}.")
  return os.path.join(CONFIG_DIR, f"{arch}.py")


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


def load(arch_or_path: str, overrides: dict | Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of ``arch_or_path`` (a network name or a config file) with
  ``overrides`` applied, parsed exactly as ``--config=<file> --config.<field>=<value>``
  on a command line (unknown fields and values of the wrong type raise).

  Raises:
    ValueError: unknown network, unknown field or a value that does not parse.
  """
  file = arch_or_path if arch_or_path.endswith(".py") else path(arch_or_path)
  argv = ["load", f"--config={file}"] + override_args(overrides)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", file, flag_values=values, sys_argv=argv)
  try:
    values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError) as err:
    message = str(err).strip("\"'")
    if isinstance(err, (AttributeError, KeyError)):
      message = f"there is no field {message!r}"
    raise ValueError(
      f"config={file!r} with overrides {argv[2:]}: {message}. Fields are "
      f"set as --config.<field>=<value>, with <field> one of: "
      f"{', '.join(_fields(file))}."
    ) from None
  return values.config


def _fields(file: str) -> list[str]:
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", file, flag_values=values, sys_argv=["fields"])
  values(["fields", f"--config={file}"])
  return sorted(values.config.keys())


def train_config(config: ml_collections.ConfigDict) -> training.TrainConfig:
  """The :class:`sparsejax.training.TrainConfig` of an experiment config."""
  return training.TrainConfig(**{k: config[k] for k in TRAIN_FIELDS})


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


CONFIGS: dict[str, training.TrainConfig] = {arch: get_config(arch) for arch in ARCHS}

TrainConfig = training.TrainConfig
weight_decay_from_keras_l2 = training.weight_decay_from_keras_l2

__all__ = [
  "ARCHS",
  "CONFIGS",
  "TrainConfig",
  "get_config",
  "load",
  "path",
  "train_config",
  "override_args",
  "weight_decay_from_keras_l2",
]
