"""Layerwise sparsity quotas: how sparse each prunable layer is for a global target.

A quota is a pure function ``fn(sparsity, shapes) -> float32[L]`` of per-layer
sparsities, where ``shapes`` lists the prunable kernel shapes in input-to-output
order (Dense kernels ``(in, out)``, conv kernels HWIO) and ``sparsity`` is a scalar
that may be traced (``jax.jit``). With n_l = prod(shape_l), N = sum_l n_l and
density d = 1 - s, every quota keeps sum_l n_l * (1 - s_l) = d * N weights (up to
float32 and the per-layer rounding of :func:`layer_kept_counts`).

Argument convention: the quota functions (:func:`uniform`, :func:`uniform_plus`,
:func:`erk`, :func:`igq`, and any ``fn(sparsity, shapes)`` a user passes) take the target
*sparsity*, as a user states it, like every public function of the library; the
allocation functions that rankings call (:func:`layer_kept_counts`,
:func:`layer_densities`, :func:`group_kept_counts`, :func:`check_density`) take the kept
fraction ``density`` = 1 - s, by name, because it stays exact where the sparsity does
not: float32 holds 7 digits, so 1 - 0.99999 keeps only two of them.

The free parameter of ERK, IGQ and Uniform+ is found by a bisection with a fixed
number of steps over the *bit patterns* of non-negative float32 numbers (these are
ordered like the numbers they encode, so the search covers [0, inf] at full float32
precision). The comparison of the kept total with the target is done in fixed point
with integer sums, so it does not depend on summation order. Because the bisection
has a fixed number of steps and its predicate can only become true as the target
grows, its result is monotone in the target whatever the rounding; hence every
layer's kept count is non-decreasing in the density, and masks built from a fixed
ranking are nested in the density (which the effective-sparsity search relies on).

References:
  T. Gale, E. Elsen, S. Hooker. The State of Sparsity in Deep Neural Networks. 2019.
  U. Evci, T. Gale, J. Menick, P. S. Castro, E. Elsen. Rigging the Lottery: Making All
    Tickets Winners. ICML 2020.
  A. Vysogorets, J. Kempe. Connectivity Matters: Neural Network Pruning Through the
    Lens of Effective Sparsity. JMLR 24(99), 2023.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import errors
from sparsejax import masks as masks_lib

Shapes = tuple[tuple[int, ...], ...]
QuotaFn = Callable[[Any, Shapes], jax.Array]

__all__ = [
  "QUOTAS",
  "UNIFORM_PLUS_LAST_MIN_DENSITY",
  "GROUP_QUOTAS",
  "erk",
  "get_quota",
  "group_kept_counts",
  "igq",
  "layer_densities",
  "layer_kept_counts",
  "normalize_shapes",
  "uniform",
  "uniform_plus",
  "uniform_plus_max_sparsity",
]

#: Uniform+ keeps at least this fraction of the last layer (at most 80% sparse).
UNIFORM_PLUS_LAST_MIN_DENSITY = 0.2

_INF_BITS = 0x7F800000  # bit pattern of float32 +inf
_ONE_BITS = 0x3F800000  # bit pattern of float32 1.0
# 31 halvings shrink any bracket of the non-negative int32 range to one step.
_BISECT_STEPS = 31
_FRAC_BITS = 16  # fixed-point resolution of the kept-total comparison: 2**-16 weights
_MAX_LAYERS = 8192  # keeps the fixed-point comparison inside int32
_MAX_TOTAL = 2**30  # kept counts and their sums are int32


# --------------------------------------------------------------------------- validation


def normalize_shapes(shapes: Any) -> Shapes:
  """Validates kernel shapes and returns them as a tuple of tuples of Python ints.

  Raises ValueError (naming ``shapes``) for an empty list, an empty shape, a
  non-integer or non-positive dimension, or more than 2**30 weights in total.
  """
  if isinstance(shapes, (str, bytes)):
    raise ValueError(f"`shapes` must be a sequence of kernel shapes, got {shapes!r}")
  try:
    items = tuple(shapes)
  except TypeError:
    raise ValueError(f"`shapes` must be a sequence of kernel shapes, got {shapes!r}") from None
  if not items:
    raise ValueError(f"`shapes` must list at least one prunable kernel shape, got {shapes!r}")
  if len(items) > _MAX_LAYERS:
    raise ValueError(f"`shapes` may list at most {_MAX_LAYERS} kernels, got {len(items)}")
  out = []
  for i, shape in enumerate(items):
    try:
      if isinstance(shape, (str, bytes)):
        raise TypeError
      dims = tuple(operator.index(dim) for dim in shape)
    except TypeError:
      raise ValueError(f"`shapes`[{i}] must be a tuple of positive ints, got {shape!r}") from None
    if not dims or any(dim <= 0 for dim in dims):
      raise ValueError(f"`shapes`[{i}] must be a non-empty tuple of positive ints, got {shape!r}")
    out.append(dims)
  total = sum(math.prod(dims) for dims in out)
  if total > _MAX_TOTAL:
    raise ValueError(f"`shapes` hold {total} weights; at most 2**30 are supported")
  return tuple(out)


def _concrete_scalar(value: Any, name: str) -> float | None:
  """The value as a float, or None when it is traced (then it is not validated)."""
  try:
    arr = np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  if arr.shape != () or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
    raise ValueError(f"`{name}` must be a real scalar, got {value!r}")
  if np.iscomplexobj(arr):
    raise ValueError(f"`{name}` must be a real scalar, got {value!r}")
  return float(arr)


def _check_sparsity(sparsity: Any) -> float | None:
  s = _concrete_scalar(sparsity, "sparsity")
  return None if s is None else masks_lib.check_sparsity(s)


def _check_density(density: Any) -> float | None:
  d = _concrete_scalar(density, "density")
  if d is not None and not 0.0 <= d <= 1.0:
    raise ValueError(f"`density` must lie in [0, 1], got {d!r}")
  return d


def uniform_plus_max_sparsity(shapes: Any) -> float:
  """Largest sparsity Uniform+ reaches: first layer dense, last layer 20% dense."""
  shapes = normalize_shapes(shapes)
  _require_conv(shapes)
  n = [math.prod(s) for s in shapes]
  if len(n) == 1:
    return 0.0
  kept = n[0] + UNIFORM_PLUS_LAST_MIN_DENSITY * n[-1]
  return 1.0 - kept / sum(n)


def _require_conv(shapes: Shapes) -> None:
  if not any(len(s) == 4 for s in shapes):
    raise ValueError(
      "uniform_plus needs a convolutional network (at least one 4-D HWIO kernel "
      f"in `shapes`), got `shapes`={shapes!r}"
    )


def _check_uniform_plus_reachable(density: float | None, shapes: Shapes) -> None:
  if density is None:
    return
  s_max = uniform_plus_max_sparsity(shapes)
  # A float32-sized slack: a target exactly at the limit must stay reachable.
  if 1.0 - density > s_max + 1e-7:
    raise errors.UnreachableSparsityError(
      f"uniform_plus cannot reach sparsity {1.0 - density!r} on these shapes: the "
      f"largest reachable sparsity is {s_max!r} (first layer dense, last layer at "
      "least 20% dense)",
      sparsity=1.0 - density,
      max_sparsity=s_max,
    )


# --------------------------------------------------------------------------- kernels


class _Layers(NamedTuple):
  """Per-layer constants, padded to a bucket of 32, 64, 128, ... layers.

  Padding lets one compiled kernel serve every network with as many layers up to
  the bucket size; padded layers have n = 0 and so keep nothing.
  """

  n: np.ndarray  # float32[P], n_l = prod(shape_l), 0 in padding
  n_int: np.ndarray  # int32[P]
  ratio: np.ndarray  # float32[P], sum(shape_l) / prod(shape_l), 1 in padding
  n_total: np.ndarray  # float32 scalar, N
  last: np.ndarray  # int32 scalar, L - 1


@functools.lru_cache(maxsize=256)
def _layer_constants(shapes: Shapes) -> _Layers:
  return _constants(
    tuple(math.prod(s) for s in shapes), tuple(sum(s) / math.prod(s) for s in shapes)
  )


@functools.lru_cache(maxsize=256)
def _constants(sizes: tuple[int, ...], ratios: tuple[float, ...]) -> _Layers:
  """_Layers of layers with n_l = sizes[l] units and ERK ratios ``ratios``."""
  num = len(sizes)
  padded = max(32, 1 << (num - 1).bit_length())
  n = np.zeros(padded, np.int64)
  n[:num] = sizes
  ratio = np.ones(padded, np.float64)
  ratio[:num] = ratios
  return _Layers(
    n.astype(np.float32),
    n.astype(np.int32),
    ratio.astype(np.float32),
    np.float32(n.sum()),
    np.int32(num - 1),
  )


def _bits_to_f32(bits: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(bits.astype(jnp.int32), jnp.float32)


def _bisect_bits(pred: Callable[[jax.Array], jax.Array], hi_bits: int) -> jax.Array:
  """Smallest x >= 0 (in float32 bit order, up to ``hi_bits``) with ``pred(x)``.

  ``pred(bitcast(hi_bits))`` is assumed true. A fixed number of steps and a
  predicate that only turns true as the target grows make the result monotone in
  the target, however ``pred`` rounds.
  """

  def step(_, bracket):
    lo, hi = bracket
    active = hi - lo > 1
    mid = jnp.maximum(lo + (hi - lo) // 2, 0)
    ok = pred(_bits_to_f32(mid))
    lo = jnp.where(active & ~ok, mid, lo)
    hi = jnp.where(active & ok, mid, hi)
    return lo, hi

  bracket = (jnp.int32(-1), jnp.int32(hi_bits))
  _, hi = jax.lax.fori_loop(0, _BISECT_STEPS, step, bracket)
  return _bits_to_f32(hi)


def _target(d: jax.Array, n_total: jax.Array):
  """The target kept total d * N split into an integer part and 2**-16 fractions."""
  t = d * n_total
  t_int = jnp.floor(t)
  t_frac = jnp.floor((t - t_int) * (2.0**_FRAC_BITS))
  return t_int.astype(jnp.int32), t_frac.astype(jnp.int32)


def _excess(layers: _Layers, densities: jax.Array, target) -> jax.Array:
  """An int32 with the sign of sum_l n_l densities_l - target, exact up to 2**-16.

  Integer parts and fixed-point fractions are summed as integers, so the result does
  not depend on summation order (nor on vmap or the backend's reduction tree).
  """
  t_int, t_frac = target
  kept = jnp.where(layers.n > 0, layers.n * densities, 0.0)  # padding: 0 * inf
  whole = jnp.floor(kept)
  frac = jnp.floor((kept - whole) * (2.0**_FRAC_BITS)).astype(jnp.int32)
  diff_int = jnp.sum(whole.astype(jnp.int32)) - t_int
  bound = kept.shape[0] + 2  # |fraction sums| < bound, so clipping keeps the sign
  diff_int = jnp.clip(diff_int, -bound, bound)
  return diff_int * (2**_FRAC_BITS) + (jnp.sum(frac) - t_frac)


def _uniform_densities(d, layers: _Layers):
  return jnp.broadcast_to(d, layers.n.shape)


def _erk_densities(d, layers: _Layers):
  target = _target(d, layers.n_total)

  def densities(eps):
    return jnp.minimum(1.0, eps * layers.ratio)

  eps = _bisect_bits(lambda e: _excess(layers, densities(e), target) >= 0, _INF_BITS)
  return densities(eps)


def _igq_densities(d, layers: _Layers):
  target = _target(d, layers.n_total)

  def densities(force):
    return 1.0 / (1.0 + force * layers.n)

  force = _bisect_bits(lambda f: _excess(layers, densities(f), target) <= 0, _INF_BITS)
  return densities(force)


def _uniform_plus_densities(d, layers: _Layers):
  target = _target(d, layers.n_total)
  index = jnp.arange(layers.n.shape[0])
  last_min = jnp.float32(UNIFORM_PLUS_LAST_MIN_DENSITY)

  def densities(middle):
    middle = jnp.minimum(middle, 1.0)
    dens = jnp.where(index == layers.last, jnp.maximum(middle, last_min), middle)
    # First layer dense (with one layer, first == last: dense).
    return jnp.where(index == 0, jnp.float32(1.0), dens)

  middle = _bisect_bits(lambda m: _excess(layers, densities(m), target) >= 0, _ONE_BITS)
  return densities(middle)


_DENSITY_RULES = {
  "uniform": _uniform_densities,
  "uniform_plus": _uniform_plus_densities,
  "erk": _erk_densities,
  "igq": _igq_densities,
}


def _round_counts(densities, n, n_int):
  kept = jnp.round(n * densities)
  kept = jnp.where(jnp.isnan(kept), 0.0, jnp.clip(kept, 0.0, n))
  return jnp.minimum(kept.astype(jnp.int32), n_int)


@functools.partial(jax.jit, static_argnames="rule")
def _kernel(rule: str, value, from_sparsity, layers: _Layers):
  """(densities f32[P], sparsities f32[P], kept counts i32[P]) of one quota.

  ``value`` is the global sparsity when ``from_sparsity`` else the global density.
  One kernel per quota and layer bucket serves all three public views, so a new
  network costs few compilations; under an outer jit unused outputs are dropped.
  Traced values outside [0, 1] are clamped; a traced NaN gives NaN (and 0 counts).
  """
  v = jnp.asarray(value, jnp.float32)
  v_clipped = jnp.clip(v, 0.0, 1.0)
  d = jnp.where(from_sparsity, 1.0 - v_clipped, v_clipped)
  densities = _DENSITY_RULES[rule](d, layers)
  sparsities = 1.0 - densities
  if rule == "uniform":  # s_l = s exactly, not 1 - (1 - s)
    sparsities = jnp.where(from_sparsity, v_clipped, sparsities)
  counts = _round_counts(densities, layers.n, layers.n_int)
  nan = jnp.isnan(v)
  return (
    jnp.where(nan, jnp.nan, densities),
    jnp.where(nan, jnp.nan, sparsities),
    jnp.where(nan, 0, counts),
  )


_round_counts_jit = jax.jit(_round_counts)


# --------------------------------------------------------------------------- quotas


def _run_quota(rule: str, sparsity: Any, shapes: Any) -> jax.Array:
  shapes = normalize_shapes(shapes)
  s = _check_sparsity(sparsity)
  if rule == "uniform_plus":
    _require_conv(shapes)
    _check_uniform_plus_reachable(None if s is None else 1.0 - s, shapes)
  _, sparsities, _ = _kernel(rule, sparsity, True, _layer_constants(shapes))
  return sparsities[: len(shapes)]


def uniform(sparsity: Any, shapes: Any) -> jax.Array:
  """Uniform quota: s_l = s for every layer (Gale et al., 2019).

  Args:
    sparsity: scalar in [0, 1), may be traced.
    shapes: prunable kernel shapes, input to output.
  Returns:
    float32[L] per-layer sparsities.
  """
  return _run_quota("uniform", sparsity, shapes)


def uniform_plus(sparsity: Any, shapes: Any) -> jax.Array:
  """Uniform+ quota (Gale et al., 2019), for convolutional networks only.

  The first layer is dense, the others share one density d_m, except that the last
  layer keeps at least 20% of its weights (it is at most 80% sparse):

    density_1 = 1,  density_l = d_m (1 < l < L),  density_L = max(d_m, 0.2),
    with d_m solved from n_1 + sum_{1<l<L} n_l d_m + n_L max(d_m, 0.2) = (1 - s) N.

  So the last layer shares the middle sparsity until that passes 80%, then stays at
  80% while the middle layers take the rest (the reading of Lee et al. 2021's
  reference code for Gale et al.'s rule; with two layers the last takes it all).
  The largest reachable sparsity is 1 - (n_1 + 0.2 n_L) / N
  (:func:`uniform_plus_max_sparsity`); a concrete sparsity above it raises, a traced
  one is clamped to it. Raises ValueError when no kernel in ``shapes`` is 4-D.

  Returns:
    float32[L] per-layer sparsities.
  """
  return _run_quota("uniform_plus", sparsity, shapes)


def erk(sparsity: Any, shapes: Any) -> jax.Array:
  """Erdos-Renyi-Kernel quota (Evci et al., 2020).

    density_l = min(1, eps * sum(shape_l) / prod(shape_l)),

  all kernel dimensions (spatial ones included), with eps solved so that
  sum_l n_l density_l = (1 - s) N. This equals "make the layers whose density would
  exceed 1 dense and re-solve the others".

  Returns:
    float32[L] per-layer sparsities.
  """
  return _run_quota("erk", sparsity, shapes)


def igq(sparsity: Any, shapes: Any) -> jax.Array:
  """Ideal Gas Quotas (Vysogorets & Kempe, 2023).

  Layer l is a cylinder of length n_l and cross-section 1/n_l compressed by a common
  force F >= 0:

    density_l = 1 / (1 + F n_l),  F solved from sum_l n_l density_l = (1 - s) N.

  Always valid (0 <= density_l <= 1); smaller layers are pruned less.

  Returns:
    float32[L] per-layer sparsities.
  """
  return _run_quota("igq", sparsity, shapes)


QUOTAS: dict[str, QuotaFn] = {
  "uniform": uniform,
  "uniform_plus": uniform_plus,
  "erk": erk,
  "igq": igq,
}

_RULE_OF = {fn: name for name, fn in QUOTAS.items()}


def _resolve(quota: Any, argname: str) -> QuotaFn:
  if callable(quota):
    return quota
  if isinstance(quota, str) and quota in QUOTAS:
    return QUOTAS[quota]
  raise ValueError(
    f"`{argname}` must be one of {sorted(QUOTAS)} or a quota function, got {quota!r}"
  )


def get_quota(name: str | QuotaFn) -> QuotaFn:
  """The quota function called ``name`` in :data:`QUOTAS` (a callable passes through).

  Raises ValueError naming ``name``, its value and the allowed names.
  """
  return _resolve(name, "name")


def _rule_for(fn: QuotaFn, shapes: Shapes, density: float | None):
  """Name of a built-in quota (None for others), after its own reachability check."""
  rule = _RULE_OF.get(fn)
  if rule == "uniform_plus":
    _require_conv(shapes)
    _check_uniform_plus_reachable(density, shapes)
  return rule


def check_density(quota: str | QuotaFn, density: float, shapes: Any) -> None:
  """The checks :func:`layer_kept_counts` makes on a concrete ``density`` (ValueError;
  UnreachableSparsityError beyond the quota's reach), computing nothing."""
  _rule_for(_resolve(quota, "quota"), normalize_shapes(shapes), _check_density(density))


def layer_densities(quota: str | QuotaFn, density: Any, shapes: Any) -> jax.Array:
  """Per-layer densities float32[L] of ``quota`` at global ``density`` in [0, 1].

  Same allocation as ``1 - quota(1 - density, shapes)``, without the round trip
  through sparsity (more precise for small densities). Jit-able with traced density.
  """
  fn = _resolve(quota, "quota")
  shapes = normalize_shapes(shapes)
  rule = _rule_for(fn, shapes, _check_density(density))
  if rule is not None:
    densities, _, _ = _kernel(rule, density, False, _layer_constants(shapes))
    return densities[: len(shapes)]
  d = jnp.asarray(density, jnp.float32)
  return 1.0 - jnp.asarray(fn(1.0 - d, shapes), jnp.float32)


#: The quotas :func:`group_kept_counts` allocates units with.
GROUP_QUOTAS = ("uniform", "erk", "igq")


def group_kept_counts(quota: str, density: float, sizes: Any, ratios: Any = None) -> np.ndarray:
  """Units each group keeps, int32[L]: a quota's rule on groups of units (e.g. the
  channels of each channel space, :mod:`sparsejax.structured`), the budget counted
  in units.

  With n_l = sizes[l] and C = sum_l n_l, the densities solve sum_l n_l d_l = density C
  by the rules of :func:`uniform` (d_l = density), :func:`igq` (d_l = 1 / (1 + F n_l))
  and :func:`erk` (d_l = min(1, eps r_l) with r_l = ratios[l], e.g. the ERK ratio
  sum(shape) / prod(shape) of the group's kernel); kept_l = round(n_l d_l), clipped to
  [1, n_l] (every group keeps a unit). Non-decreasing in ``density`` per group.
  """
  if quota not in GROUP_QUOTAS:
    raise ValueError(f"quota={quota!r} is not a group quota; allowed: {', '.join(GROUP_QUOTAS)}.")
  sizes = tuple(operator.index(n) for n in sizes)
  if not sizes or min(sizes) < 1:
    raise ValueError(f"sizes={sizes!r} must list positive group sizes.")
  ratios = (1.0,) * len(sizes) if ratios is None else tuple(float(r) for r in ratios)
  if len(ratios) != len(sizes) or not all(r > 0 and math.isfinite(r) for r in ratios):
    raise ValueError(f"ratios={ratios!r} must be {len(sizes)} positive finite numbers.")
  d = _check_density(density)
  if d is None:
    raise ValueError(f"density={density!r} must be a concrete number in [0, 1].")
  _, _, counts = _kernel(quota, d, False, _constants(sizes, ratios))
  return np.clip(np.asarray(counts[: len(sizes)]), 1, np.asarray(sizes))


def layer_kept_counts(quota: str | QuotaFn, density: Any, shapes: Any) -> jax.Array:
  """Number of weights each layer keeps: int32[L], round(n_l * density_l) in [0, n_l].

  Args:
    quota: a name in :data:`QUOTAS` or a quota function ``fn(sparsity, shapes)``.
    density: global density 1 - s in [0, 1]; may be traced (``jax.jit``), then it is
      clamped to [0, 1] (and for Uniform+ to its reachable range).
    shapes: prunable kernel shapes, input to output.

  For the built-in quotas every count is non-decreasing in ``density`` (so masks
  from a fixed ranking are nested) and the total is within one weight per layer of
  round(density * N).
  """
  fn = _resolve(quota, "quota")
  shapes = normalize_shapes(shapes)
  rule = _rule_for(fn, shapes, _check_density(density))
  if rule is not None:
    _, _, counts = _kernel(rule, density, False, _layer_constants(shapes))
    return counts[: len(shapes)]
  d = jnp.asarray(density, jnp.float32)
  dens = 1.0 - jnp.asarray(fn(1.0 - d, shapes), jnp.float32)
  n = np.array([math.prod(s) for s in shapes], np.int64)
  return _round_counts_jit(dens, n.astype(np.float32), n.astype(np.int32))
