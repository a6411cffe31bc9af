"""Layers of the model zoo: ordinary Flax modules with the zoo's initializer.

What effective masks and SynFlow need (binary reachability, linearization) comes from
transforming the traced program (:mod:`sparsejax.connectivity`), so these layers carry
no modes. Kept: the paper's kernel initializer as the default of Dense/Conv (method.md
section 5), batch norm called as ``norm(x, train)`` (the training loop's convention),
and the pooling/flatten helpers the zoo shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

#: Initializer for every kernel (method.md section 5): variance scaling, scale 2, fan_avg, normal.
kernel_init = nn.initializers.variance_scaling(2.0, "fan_avg", "normal")


class Dense(nn.Dense):
  """`nn.Dense` (kernel (in, out)) with the zoo's initializer."""

  kernel_init: Callable = kernel_init


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  **kwargs,
) -> jax.Array:
  """`lax.conv_general_dilated`, zero-padding the input beforehand when the padding of a
  spatial axis is at least that axis's size (then convolving 'VALID'): the same function.

  XLA:CPU (JAX 0.10.2) takes a slow path for such convolutions: 3x3 'SAME' on VGG's
  2x2x512 inputs ran at 2.5 GFLOP/s, this function at 47 (19x faster), 'SAME' on 4x4x512
  and 8x8x512 at 112-115 (batch 32, quiet machine; ``python -m
  benchmarks.compaction_layers --padding_check``, docs/benchmarks.md). The backward pass
  keeps the slow path (its input gradient is again such a convolution).
  """
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  spatial_lhs = dn.lhs_spec[2:]
  sizes = [lhs.shape[a] for a in spatial_lhs]
  pads = padding
  if isinstance(padding, str):
    window = [rhs.shape[a] for a in dn.rhs_spec[2:]]
    dil = rhs_dilation or (1,) * len(window)
    pads = lax.padtype_to_pads(
      sizes, [(k - 1) * d + 1 for k, d in zip(window, dil)], window_strides, padding
    )
  plain = lhs_dilation is None or all(d == 1 for d in lhs_dilation)
  if (
    plain
    and all(lo >= 0 and hi >= 0 for lo, hi in pads)
    and any(lo + hi >= n for (lo, hi), n in zip(pads, sizes))
  ):
    config = [(0, 0, 0)] * lhs.ndim
    for a, (lo, hi) in zip(spatial_lhs, pads):
      config[a] = (lo, hi, 0)
    # The barrier keeps XLA from folding the pad back into the convolution's padding.
    lhs = lax.optimization_barrier(lax.pad(lhs, jnp.zeros((), lhs.dtype), config))
    pads = [(0, 0)] * len(sizes)
  return lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    pads,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    **kwargs,
  )


class Conv(nn.Conv):
  """`nn.Conv` (NHWC inputs, HWIO kernel) with the zoo's initializer, convolving through
  :func:`conv_general_dilated` (pads beforehand where the padding covers the input)."""

  kernel_init: Callable = kernel_init
  conv_general_dilated: Callable = conv_general_dilated


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


def pool(
  x: jax.Array, kind: str, window: int, stride: int | None = None, padding: str | Sequence = "VALID"
) -> jax.Array:
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
