"""Networks by name: each zoo file registers its own specs, and a user registers theirs.

  from sparsejax import models

  models.register_model("mlp", models.ModelSpec(MLP, {}, "mnist", (28, 28, 1), 10))
  model = models.create("mlp")

A registered name is what every experiment binary accepts (``--arch``, ``--archs``,
``--config.arch``; ``--import=module`` brings a user's registration to them), and a
network with no ``experiments/configs/<name>.py`` gets a generic experiment config
built from its spec. Registration order is the order of :data:`MODELS` (listings,
defaults that mean "every network").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A named network: how to build it and what it is trained on.

  Attributes:
    build: the Flax module class (or any callable) called as
      ``build(num_classes=..., **kwargs)``.
    kwargs: further constructor arguments (e.g. VGG's layer list).
    dataset: the name of its dataset (:data:`sparsejax.data.DATASETS` for the
      experiments).
    input_shape: one example's shape, NHWC without the batch axis, e.g. (28, 28, 1).
    num_classes: the dataset's classes (the default of :func:`sparsejax.models.create`;
      a language model's vocabulary).
    input_dtype: the input's dtype name: 'float32' for images, an integer dtype
      ('int32') for token ids (:func:`sparsejax.models.example_input`).
  """

  build: Callable
  kwargs: dict
  dataset: str
  input_shape: tuple
  num_classes: int
  input_dtype: str = "float32"


#: Every registered network, in registration order.
MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, spec: ModelSpec) -> ModelSpec:
  """Adds ``spec`` under ``name``; returns it.

  Raises:
    ValueError: ``name`` is not a non-empty string or is already registered, or a field
      of ``spec`` is invalid (named with its value).
  """
  if not isinstance(name, str) or not name or name != name.strip() or "/" in name:
    raise ValueError(
      f"name={name!r} must be a non-empty string without spaces around it or '/' "
      "(it names run folders)."
    )
  if name in MODELS:
    raise ValueError(f"name={name!r} is already registered; allowed: a new name.")
  if not isinstance(spec, ModelSpec):
    raise ValueError(f"spec={spec!r} must be a sparsejax.models.ModelSpec.")
  if not callable(spec.build):
    raise ValueError(f"spec.build={spec.build!r} is not callable (a Flax module class).")
  if not isinstance(spec.kwargs, dict):
    raise ValueError(f"spec.kwargs={spec.kwargs!r} must be a dict of constructor arguments.")
  if not isinstance(spec.dataset, str) or not spec.dataset:
    raise ValueError(f"spec.dataset={spec.dataset!r} must be a dataset name, e.g. 'mnist'.")
  shape = spec.input_shape
  if (
    not isinstance(shape, tuple)
    or not shape
    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
  ):
    raise ValueError(
      f"spec.input_shape={shape!r} must be one example's shape without the batch axis, "
      "a tuple of positive ints, e.g. (28, 28, 1)."
    )
  n = spec.num_classes
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"spec.num_classes={n!r} must be a positive integer.")
  try:
    dtype = np.dtype(spec.input_dtype)
  except TypeError:
    dtype = None
  if dtype is None or dtype.kind not in "fiu" or not isinstance(spec.input_dtype, str):
    raise ValueError(
      f"spec.input_dtype={spec.input_dtype!r} must be the name of a float or integer "
      "dtype, e.g. 'float32' (images) or 'int32' (token ids)."
    )
  MODELS[name] = spec
  return spec


def get_spec(name: str) -> ModelSpec:
  """The spec registered as ``name``.

  Raises:
    ValueError: no network has that name (the registered ones are listed).
  """
  if name not in MODELS:
    raise ValueError(f"name={name!r} is not a known network; allowed: {', '.join(MODELS)}.")
  return MODELS[name]
