"""LeNet-300-100 and LeNet-5 (method.md section 5)."""

from __future__ import annotations

import flax.linen as nn
import jax

from sparsejax.models import layers as L
from sparsejax.models.registry import ModelSpec, register_model


class LeNet300100(nn.Module):
  """MLP 784-300-100-classes; batch norm after every Dense (the last too), ReLU.

  Input [B, 28, 28, 1] (any shape; flattened row-major). Output logits [B, classes].
  ``hidden``: the hidden widths (a compacted network has fewer, :mod:`sparsejax.compact`).
  """

  num_classes: int = 10
  hidden: tuple = (300, 100)

  def resized(self, params) -> LeNet300100:
    """This network with the widths of ``params`` (a compacted network's)."""
    return self.clone(
      hidden=tuple(params[f"dense_{i}"]["kernel"].shape[-1] for i in range(len(self.hidden)))
    )

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = L.flatten(x)
    widths = (*self.hidden, self.num_classes)
    for i, width in enumerate(widths):
      x = L.Dense(width, name=f"dense_{i}")(x)
      x = L.Norm(name=f"norm_{i}")(x, train)
      if i < len(widths) - 1:
        x = nn.relu(x)
    return x


class LeNet5(nn.Module):
  """Conv5x5(6) BN ReLU AvgPool2, Conv5x5(16) BN ReLU AvgPool2, Dense 120, 84, classes.

  Convolutions are 'VALID'. Every Dense is followed by batch norm (ReLU except the
  last). Input [B, 32, 32, 3] for the paper's 61,770 prunable weights. ``channels`` and
  ``hidden``: the conv and hidden Dense widths (fewer in a compacted network).
  """

  num_classes: int = 10
  channels: tuple = (6, 16)
  hidden: tuple = (120, 84)

  def resized(self, params) -> LeNet5:
    """This network with the widths of ``params`` (a compacted network's)."""
    n = len(self.channels)
    return self.clone(
      channels=tuple(params[f"conv_{i}"]["kernel"].shape[-1] for i in range(n)),
      hidden=tuple(params[f"dense_{n + j}"]["kernel"].shape[-1] for j in range(len(self.hidden))),
    )

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, features in enumerate(self.channels):
      x = L.Conv(features, (5, 5), padding="VALID", name=f"conv_{i}")(x)
      x = L.Norm(name=f"norm_{i}")(x, train)
      x = nn.relu(x)
      x = L.pool(x, "avg", 2)
    x = L.flatten(x)
    widths = (*self.hidden, self.num_classes)
    for j, width in enumerate(widths):
      i = j + 2
      x = L.Dense(width, name=f"dense_{i}")(x)
      x = L.Norm(name=f"norm_{i}")(x, train)
      if j < len(widths) - 1:
        x = nn.relu(x)
    return x


register_model("lenet300100", ModelSpec(LeNet300100, {}, "mnist", (28, 28, 1), 10))
register_model("lenet5", ModelSpec(LeNet5, {}, "cifar10", (32, 32, 3), 10))
