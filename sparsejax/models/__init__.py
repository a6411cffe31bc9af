"""The paper's networks and two transformers (Flax linen), and a registry by name.

Ordinary Flax modules, called as ``model.apply(variables, x, train=...)`` on NHWC
images (the GPT on int token ids [B, T]); effective masks and SynFlow transform their
traced programs (:mod:`sparsejax.connectivity`), as for any user model. Besides the
paper's networks: ``vit`` (:class:`ViT`, MNIST-sized images) and ``gpt`` (:class:`GPT`,
a byte-level decoder language model on the ``text`` dataset), sharing the blocks of
:mod:`sparsejax.models.transformer`.

Each zoo file registers its own networks (:func:`register_model`, in
:mod:`sparsejax.models.registry`); a new network is one file that defines the module
and registers its :class:`ModelSpec`, and every experiment binary lists it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import compilation
from sparsejax.models import layers  # noqa: F401  (re-exported)
from sparsejax.models.registry import MODELS, ModelSpec, get_spec, register_model

# The zoo registers its networks on import, in the paper's order (method.md section 5).
# isort: split
from sparsejax.models.lenet import LeNet5, LeNet300100

# isort: split
from sparsejax.models.vgg import VGG, VGG16, VGG19

# isort: split
from sparsejax.models.resnet import ResNet18

# Beyond the paper: transformers (issue 25).
# isort: split
from sparsejax.models import transformer  # noqa: F401  (re-exported)
from sparsejax.models.vit import ViT

# isort: split
from sparsejax.models.gpt import GPT


def create(name: str, num_classes: int | None = None) -> nn.Module:
  """Builds the network ``name`` (default classes: those of its paper dataset)."""
  spec = get_spec(name)
  num_classes = spec.num_classes if num_classes is None else num_classes
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes={num_classes!r} must be a positive integer.")
  return spec.build(num_classes=num_classes, **spec.kwargs)


def check_model(model: nn.Module) -> nn.Module:
  """ValueError unless ``model`` is a Flax module (or a function) and hashable (it is a
  static argument of the jitted scores, compiled once per model)."""
  if not (isinstance(model, nn.Module) or callable(model)):
    raise ValueError(f"model={model!r} must be a Flax module (or a function apply(params, x)).")
  try:
    hash(model)
  except TypeError as e:
    raise ValueError(
      f"model={type(model).__name__} has an unhashable field ({e}); it is "
      "compiled once per model, so its fields must be hashable (use tuples, "
      "not lists)."
    ) from None
  return model


def check_input_shape(input_shape) -> tuple[int, ...]:
  """One example's shape without the batch axis, as positive ints, or ValueError."""
  try:
    shape = tuple(input_shape)
  except TypeError:
    shape = ()
  if (
    not shape
    or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape)
    or min(shape) < 1
  ):
    raise ValueError(
      f"input_shape={input_shape!r} must be the shape of one example without "
      "the batch axis, e.g. (28, 28, 1), with positive integer sizes."
    )
  return tuple(int(d) for d in shape)


def init(model: nn.Module, key: jax.Array, input_shape, **kwargs):
  """``model.init(key, ones([1, *input_shape]), **kwargs)`` as one compiled program per
  (model, input shape, kwargs); called eagerly, Flax's init compiles every
  initializer and layer op on its own (88 small programs for VGG-19).

  ``input_shape``: one example's shape (a float32 input), or an example input's shape
  struct or array, batch axis included (its dtype, e.g. int32 token ids [1, T]: the
  init input is ones of it, :func:`example_input`)."""
  if hasattr(input_shape, "shape") and hasattr(input_shape, "dtype"):
    shape = (tuple(int(d) for d in input_shape.shape), np.dtype(input_shape.dtype).name)
  else:
    shape = ((1,) + check_input_shape(input_shape), "float32")
  check_model(model)
  return _init(model, shape, tuple(sorted(kwargs.items())), key)


def _init_fn(model, shape, kwargs, key):
  return model.init(key, jnp.ones(*shape), **dict(kwargs))


_init = compilation.jit(_init_fn, static_argnums=(0, 1, 2))


def input_shape(name: str) -> tuple:
  """Shape of one input example of the network's paper dataset, e.g. (28, 28, 1)."""
  return get_spec(name).input_shape


def example_input(name: str, batch: int = 1) -> jax.ShapeDtypeStruct:
  """The network's input for ``batch`` examples: a shape struct [batch, *input_shape] of
  its ``input_dtype`` (float32 images; int32 token ids [batch, T] for the GPT), what
  :func:`sparsejax.trace` and :func:`init` take as ``input_shape``."""
  spec = get_spec(name)
  return jax.ShapeDtypeStruct((batch, *spec.input_shape), jnp.dtype(spec.input_dtype))


__all__ = [
  "create",
  "init",
  "get_spec",
  "input_shape",
  "example_input",
  "check_model",
  "check_input_shape",
  "MODELS",
  "ModelSpec",
  "register_model",
  "layers",
  "LeNet300100",
  "LeNet5",
  "VGG",
  "VGG16",
  "VGG19",
  "ResNet18",
  "transformer",
  "ViT",
  "GPT",
]
