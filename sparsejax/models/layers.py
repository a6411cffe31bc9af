"""Layers of the model zoo: ordinary Flax modules with the zoo's initializer.

What effective masks and SynFlow need (binary reachability, linearization) comes from
transforming the traced program (:mod:`sparsejax.connectivity`), so these layers carry
no modes. Kept: the paper's kernel initializer as the default of Dense/Conv (method.md
section 5), batch norm called as ``norm(x, train)`` (the training loop's convention),
and the pooling/flatten helpers the zoo shares.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

#: Initializer for every kernel (method.md section 5): variance scaling, scale 2, fan_avg, normal.
kernel_init = nn.initializers.variance_scaling(2.0, "fan_avg", "normal")


class Dense(nn.Dense):
  """`nn.Dense` (kernel (in, out)) with the zoo's initializer."""

  kernel_init: Callable = kernel_init


class Conv(nn.Conv):
  """`nn.Conv` (NHWC inputs, HWIO kernel) with the zoo's initializer."""

  kernel_init: Callable = kernel_init


class Norm(nn.BatchNorm):
  """`nn.BatchNorm` (momentum 0.99 as in Flax and Keras, eps 1e-5).

  ``train=True`` normalizes with batch statistics and updates the running averages
  ('batch_stats'); ``train=False`` uses the running averages.
  """

  momentum: float = 0.99
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return super().__call__(x, use_running_average=not train)


def pool(x: jax.Array, kind: str, window: int, stride: int | None = None,
         padding: str | Sequence = "VALID") -> jax.Array:
  """Max or average pooling (NHWC) over square windows."""
  if kind not in ("max", "avg"):
    raise ValueError(f"kind={kind!r} is not a pooling kind; allowed: 'max', 'avg'.")
  shape, strides = (window, window), (stride or window,) * 2
  return (nn.max_pool if kind == "max" else nn.avg_pool)(x, shape, strides, padding)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes: [B, H, W, C] -> [B, C]."""
  return jnp.mean(x, axis=(1, 2))


def flatten(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H*W*C] in row-major (H, W, C) order."""
  return x.reshape(x.shape[0], -1)
