"""XLA:CPU speed kernels of the reachability sweep, apart from its semantics.

XLA:CPU runs some convolutions of the sweep's binary values, and their gradients, far
slower than matrix products of the same arithmetic. Each kernel here computes exactly
what the convolution computes (terms in {0, 1}, every sum < 2^24, so float32 is exact)
and is chosen by size alone: :func:`reach_linear` is what the semantics call. The
thresholds are module constants (a benchmark overrides them while tracing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.connectivity.program import Eqn, bind

#: A convolution of the reachability sweep with at most this many output positions
#: per example (8 x 8) and a selection matrix of at most MAX_PATCHES entries runs as a
#: patches-times-kernel product (measured: 2-100x faster there on XLA:CPU; from 16 x 16
#: on, the convolution and the product cost about the same, and the selection product
#: grows as positions squared).
MAX_POSITIONS = 64
MAX_PATCHES = 1 << 24
#: The kernel gradient of :func:`conv_patches_kernel_grad` materializes at most this
#: many patch entries (float32), else it is XLA's.
MAX_KERNEL_GRAD_PATCHES = 1 << 26


def reach_linear(e: Eqn, x, w) -> jax.Array:
  """The linear op ``e`` of the reachability sweep on (indicators ``x``, pattern
  ``w``), float32, equal to the op's own result and its gradients: the op itself; for
  a convolution with few output positions :func:`conv_as_patches` (XLA:CPU runs
  small-spatial convolutions, e.g. 512 channels at 2x2 or 4x4 positions, and their
  gradients through a path 10-100x slower than that product), and for the others
  XLA's convolution with :func:`conv_patches_kernel_grad` as its kernel gradient.

  The one hook of the semantics into this module (called through the module, so a
  benchmark may wrap it)."""
  if e.prim.name != "conv_general_dilated":
    return bind(e, x, w, preferred_element_type=jnp.float32)[0]
  y = conv_as_patches(e, x, w)
  return conv_patches_kernel_grad(e, x, w) if y is None else y


def _patches_cover(p: dict) -> bool:
  """Whether a convolution with params ``p`` is a patches product: no lhs dilation,
  no feature or batch groups."""
  return (
    all(d == 1 for d in p["lhs_dilation"])
    and p["feature_group_count"] == 1
    and p["batch_group_count"] == 1
  )


@functools.lru_cache(maxsize=256)
def _selection(in_size, ksize, strides, dil, pads, max_positions):
  """One-hot [*O, *K, S] float32: output position o reads input position s at kernel
  offset k (o s + k d - pad_lo in bounds); None beyond ``max_positions`` outputs or
  MAX_PATCHES entries."""
  osize = [
    (i + lo + hi - (k - 1) * d - 1) // st + 1
    for i, k, st, d, (lo, hi) in zip(in_size, ksize, strides, dil, pads)
  ]
  positions, size = int(np.prod(osize)), int(np.prod(in_size))
  if (
    min(osize) < 1
    or positions > max_positions
    or positions * int(np.prod(ksize)) * size > MAX_PATCHES
  ):
    return None
  sel = np.zeros((*osize, *ksize, size), np.float32)
  for o in np.ndindex(*osize):
    for k in np.ndindex(*ksize):
      src = [oi * st + ki * d - lo for oi, ki, st, d, (lo, _) in zip(o, k, strides, dil, pads)]
      if all(0 <= v < i for v, i in zip(src, in_size)):
        sel[(*o, *k, int(np.ravel_multi_index(src, in_size)))] = 1.0
  return sel


def conv_as_patches(e: Eqn, x, w, max_positions: int | None = None) -> jax.Array | None:
  """The convolution ``e`` on (x, w) as one patches-times-kernel product (float32), or
  None where it does not apply (lhs dilation, groups, more than ``max_positions``
  output positions per example, default :data:`MAX_POSITIONS`, or a selection matrix
  over :data:`MAX_PATCHES` entries).

  y[o] = sum_k x_pad[o s + k d] w[k] for offsets k, strides s and rhs dilation d: the
  patches are one product of the input with a constant one-hot selection matrix
  [O, K, S] (padding selects nothing), then patches [O, K Cin] times the kernel as a
  [K Cin, Cout] matrix. Its vjp is two more products of each (the kernel gradient is
  patches^T times coreach), few ops to compile. In the reachability sweep it is exact
  as the convolution itself: terms are in {0, 1} and every sum is < 2^24.
  """
  p = e.params
  max_positions = MAX_POSITIONS if max_positions is None else max_positions
  if jnp.ndim(x) < 3 or not _patches_cover(p):
    return None
  lhs, rhs, out = p["dimension_numbers"]
  nsp = len(lhs) - 2
  x = jnp.transpose(jnp.asarray(x, jnp.float32), (lhs[0], *lhs[2:], lhs[1]))  # N, *S, C
  w = jnp.transpose(jnp.asarray(w, jnp.float32), (*rhs[2:], rhs[1], rhs[0]))  # *K, Ci, Co
  ksize, cin, cout = w.shape[:nsp], w.shape[nsp], w.shape[nsp + 1]
  sel = _selection(
    tuple(x.shape[1 : 1 + nsp]),
    tuple(ksize),
    tuple(p["window_strides"]),
    tuple(p["rhs_dilation"]),
    tuple(tuple(q) for q in p["padding"]),
    max_positions,
  )
  if sel is None:
    return None
  n, osize = x.shape[0], sel.shape[:nsp]
  sel = sel.reshape(int(np.prod(osize)), -1, sel.shape[-1])  # [O, K, S]
  # patches[n, o, k, c] = x[n, s(o, k), c]: one product with a constant one-hot matrix
  patches = jnp.einsum("oks,nsc->nokc", sel, x.reshape(n, -1, cin))
  y = jnp.dot(
    patches.reshape(-1, sel.shape[1] * cin), w.reshape(-1, cout), preferred_element_type=jnp.float32
  ).reshape(n, *osize, cout)
  canonical = {out[0]: 0, out[1]: nsp + 1, **{out[2 + i]: 1 + i for i in range(nsp)}}
  return jnp.transpose(y, [canonical[j] for j in range(nsp + 2)])


def _patches_at_offsets(e: Eqn, x, ksize, osize) -> jax.Array | None:
  """patches[n, *o, k, c] = x_pad[n, o s + k d, c]: [N, *O, K, Cin] float32 for the
  convolution ``e`` (``x`` in its lhs layout; ``ksize`` its kernel's and ``osize`` its
  output's spatial sizes), one strided slice of the padded input per kernel offset k;
  None with lhs dilation, groups or over :data:`MAX_KERNEL_GRAD_PATCHES` entries.
  (:func:`conv_as_patches` gathers with a one-hot selection matrix instead: cheaper to
  compile at few positions, but its size grows as positions squared.)"""
  p = e.params
  if not _patches_cover(p):
    return None
  lhs = p["dimension_numbers"][0]
  x = jnp.transpose(jnp.asarray(x, jnp.float32), (lhs[0], *lhs[2:], lhs[1]))  # N, *S, C
  n, cin = x.shape[0], x.shape[-1]
  if n * int(np.prod(osize)) * int(np.prod(ksize)) * cin > MAX_KERNEL_GRAD_PATCHES:
    return None
  strides, dil = p["window_strides"], p["rhs_dilation"]
  x = lax.pad(x, jnp.float32(0), [(0, 0, 0), *[(lo, hi, 0) for lo, hi in p["padding"]], (0, 0, 0)])
  cols = []
  for k in np.ndindex(*ksize):
    start = [ki * d for ki, d in zip(k, dil)]
    limit = [st + (o - 1) * s + 1 for st, o, s in zip(start, osize, strides)]
    cols.append(lax.slice(x, (0, *start, 0), (n, *limit, cin), (1, *strides, 1)))
  return jnp.stack(cols, axis=-2)


def conv_patches_kernel_grad(e: Eqn, x, w) -> jax.Array:
  """XLA's convolution ``e`` on (x, w) (float32), whose vjp computes the kernel
  gradient as one patches-transposed-times-cotangent product.

  dw[k, ci, co] = sum_{n, o} x_pad[n, o s + k d, ci] g[n, o, co]: the patches of
  :func:`_patches_at_offsets` as [N O, K Cin], transposed, times the cotangent as
  [N O, Cout]. XLA:CPU runs the kernel gradient of a convolution over many positions
  (e.g. 64 channels at 64 x 64) as a convolution 2-3x slower than that product; the
  input gradient stays XLA's. In the reachability sweep the result is the
  convolution's own: terms are in {0, 1} and every sum is < 2^24. Convolutions the
  patches do not cover (lhs dilation, groups) are XLA's with its own gradients.
  """
  conv = lambda a, b: bind(e, a, b, preferred_element_type=jnp.float32)[0]

  @jax.custom_vjp
  def f(a, b):
    return conv(a, b)

  def fwd(a, b):
    return conv(a, b), (a, b)

  def bwd(res, g):
    a, b = res
    _, rhs, out = e.params["dimension_numbers"]
    ksize = [b.shape[d] for d in rhs[2:]]
    patches = _patches_at_offsets(e, a, ksize, [g.shape[d] for d in out[2:]])
    if patches is None:
      return jax.vjp(conv, a, b)[1](g)
    da = jax.vjp(lambda t: conv(t, b), a)[1](g)[0]
    g = jnp.transpose(g, (out[0], *out[2:], out[1]))  # N, *O, Co
    cin, cout = patches.shape[-1], g.shape[-1]
    dw = jnp.dot(
      patches.reshape(-1, int(np.prod(ksize)) * cin).T,
      g.reshape(-1, cout),
      preferred_element_type=jnp.float32,
    )
    dw = dw.reshape(*ksize, cin, cout)  # axes rhs[2:], rhs[1], rhs[0] of b
    return da, jnp.transpose(dw, np.argsort((*rhs[2:], rhs[1], rhs[0]))).astype(b.dtype)

  f.defvjp(fwd, bwd)
  return f(x, w)
