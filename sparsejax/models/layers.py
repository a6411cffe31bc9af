"""Layers of the model zoo, each able to run in one of three modes.

One network definition serves three purposes (method.md section 1):

- ``STANDARD``: the network as trained (ReLU, batch norm, max or average pooling).
- ``LINEAR``: SynFlow's linearization: no nonlinearity, no normalization, average
  pooling. Activations are divided by a stop-gradient positive constant (their
  largest absolute value, :func:`rescale`) so that R = sum(output) can neither
  overflow nor underflow. This scales R and every w * dR/dw by one common positive
  factor, leaving SynFlow's ranking unchanged, only where every input-output path
  passes through the rescaled tensor: after each layer of a chain, but after the
  residual sum (not inside the branches) of a residual block, whose branches would
  otherwise get different factors. Dense/Conv rescale their output unless built
  with ``rescale=False``.
- ``CONNECTIVITY``: the binary reachability sweep behind effective masks. With
  weights = mask and biases = 0 every Dense/Conv output, activation, pooling output
  and residual sum passes through :func:`gate`, whose forward is the indicator
  ``x > 0`` and whose backward is the indicator ``g > 0``. Values stay in {0, 1}
  between layers (sums inside a layer are at most its fan-in), so float32 is exact.
  Normalization is the identity and pooling is the average over the window (every
  position connected, max pooling included).

Each Dense/Conv layer in connectivity mode also records its output units: the
forward value is sown into ``'intermediates'`` (reachability) and the output is
wrapped in ``Module.perturb`` so that the gradient with respect to the zero
perturbation is the co-reachability of every unit.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

STANDARD = "standard"
LINEAR = "linear"
CONNECTIVITY = "connectivity"
MODES = (STANDARD, LINEAR, CONNECTIVITY)

#: Initializer for every kernel (method.md section 5): variance scaling, scale 2, fan_avg, normal.
kernel_init = nn.initializers.variance_scaling(2.0, "fan_avg", "normal")


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not a model mode; allowed: {', '.join(MODES)}.")
  return mode


@jax.custom_vjp
def gate(x: jax.Array) -> jax.Array:
  """Binary indicator 1[x > 0] whose backward pass is the indicator 1[g > 0]."""
  return (x > 0).astype(x.dtype)


def _gate_fwd(x):
  return gate(x), None


def _gate_bwd(_, g):
  return ((g > 0).astype(g.dtype),)


gate.defvjp(_gate_fwd, _gate_bwd)


def rescale(y: jax.Array, mode: str) -> jax.Array:
  """In linear mode, y / stop_gradient(max |y|) (y if all zero); else y.

  Apply only to tensors that every input-output path passes through (a cut of the
  network), so that the factor is common to all of R's terms.
  """
  if mode != LINEAR:
    return y
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(y)))
  return y / jnp.where(scale > 0, scale, 1.0)


class _ModeOutput:
  """Mixin: what a prunable layer does with its output in each mode."""

  def _finish(self, y: jax.Array) -> jax.Array:
    if self.mode == CONNECTIVITY:
      y = gate(y)
      self.sow("intermediates", "reach", y)
      y = self.perturb("coreach", y)
    elif self.rescale:
      y = rescale(y, self.mode)
    return y


class Dense(_ModeOutput, nn.Dense):
  """`nn.Dense` (kernel (in, out)) with the zoo's initializer and a mode.

  rescale: in linear mode, rescale the output (False inside residual branches).
  """

  mode: str = STANDARD
  rescale: bool = True
  kernel_init: Callable = kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self._finish(super().__call__(x))


class Conv(_ModeOutput, nn.Conv):
  """`nn.Conv` (NHWC inputs, HWIO kernel) with the zoo's initializer and a mode.

  rescale: in linear mode, rescale the output (False inside residual branches).
  """

  mode: str = STANDARD
  rescale: bool = True
  kernel_init: Callable = kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self._finish(super().__call__(x))


class Norm(nn.BatchNorm):
  """`nn.BatchNorm` (momentum 0.99 as in Flax and Keras, eps 1e-5) in standard mode,
  the identity otherwise.

  ``train=True`` normalizes with batch statistics and updates the running averages
  ('batch_stats'); ``train=False`` uses the running averages.
  """

  mode: str = STANDARD
  momentum: float = 0.99
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.mode != STANDARD:
      return x
    return super().__call__(x, use_running_average=not train)


def relu(x: jax.Array, mode: str) -> jax.Array:
  """ReLU; identity when linearized; the binary gate in connectivity mode."""
  if mode == CONNECTIVITY:
    return gate(x)
  if mode == LINEAR:
    return x
  return nn.relu(x)


def pool(x: jax.Array, kind: str, window: int, mode: str, stride: int | None = None,
         padding: str | Sequence = "VALID") -> jax.Array:
  """Max or average pooling (NHWC); average in linear and connectivity modes."""
  if kind not in ("max", "avg"):
    raise ValueError(f"kind={kind!r} is not a pooling kind; allowed: 'max', 'avg'.")
  shape, strides = (window, window), (stride or window,) * 2
  if mode == STANDARD and kind == "max":
    return nn.max_pool(x, shape, strides, padding)
  # Average pooling connects every position of the window to its output.
  y = nn.avg_pool(x, shape, strides, padding)
  return gate(y) if mode == CONNECTIVITY else y


def global_avg_pool(x: jax.Array, mode: str) -> jax.Array:
  """Mean over the spatial axes: [B, H, W, C] -> [B, C]."""
  y = jnp.mean(x, axis=(1, 2))
  return gate(y) if mode == CONNECTIVITY else y


def add(x: jax.Array, y: jax.Array, mode: str) -> jax.Array:
  """Residual sum; an OR of reachabilities in connectivity mode."""
  s = x + y
  return gate(s) if mode == CONNECTIVITY else s


def flatten(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H*W*C] in row-major (H, W, C) order."""
  return x.reshape(x.shape[0], -1)
