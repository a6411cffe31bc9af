"""Rankings by selection: order-preserving integer keys, thresholds and sorted prefixes.

A ranking orders weights by descending score, ties by flat position. Each score maps
to a uint32 *descending key* d (smaller d = ranked first) with

    d(x) < d(y)  <=>  x > y,        d(x) = d(y)  <=>  x == y  (-0.0 == 0.0),

so the ranking is the ascending order of the pairs (d_i, i). Floats (float32, and
bfloat16/float16 after an exact widening to float32) use the sign-flip trick on their
bits; integers (int32) flip the sign bit. NaN is rejected before (``check_scores``).

What a ranking needs is rarely the whole order:
- the mask keeping the best c weights is {i : (d_i, i) < (t, p)} with (t, p) the c-th
  pair, a *threshold* found by selection (:func:`threshold`, O(n));
- the effective search reads ranks near the kept counts it visits only, which a
  sorted prefix (the best m positions in order, :class:`Prefix`) grown on demand
  serves: a selection plus a sort of m packed (d << 32 | i) keys;
- inside a jitted program (iterative pruners' rounds, dynamic mask updates) the best
  k of the alive entries are found by a radix select on the same keys
  (:func:`top_k`: two histogram passes, no sort; k may be traced).

This is the library's one top-k: scores, rankings, dynamic updates and structured
pruning all order by these keys, ties by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import compilation

_SIGN = np.uint32(0x80000000)


def descending_keys(x) -> np.ndarray:
  """Keys of the flat scores ``x`` (float or integer): smaller = ranked first, exact.

  uint32 [n] for 32-bit and narrower scores (float32, bfloat16, float16 widened exactly
  to float32; integers as int32), uint64 [n] for float64 scores (their full precision:
  e.g. channel scores summed on the host). -0.0 and 0.0 get one key. With b the signed
  bits: d = b ^ 0x7F..F for b >= 0, d = b for b < 0 (the bit complement of the usual
  ascending key). Rankings use 32-bit keys (:func:`flat_keys` rounds float64 to float32
  as the device does).
  """
  x = np.asarray(x).reshape(-1)
  if x.dtype == np.float64:
    bits = (x + 0.0).view(np.int64)  # -0.0 -> 0.0
    return np.where(bits >= 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits).view(np.uint64)
  if jnp.issubdtype(x.dtype, jnp.floating):  # ml_dtypes' bfloat16 has numpy kind 'V'
    bits = (x.astype(np.float32) + np.float32(0.0)).view(np.int32)  # -0.0 -> 0.0
    d = np.invert(bits)
    np.right_shift(d, 31, out=d)
    np.bitwise_and(d, 0x7FFFFFFF, out=d)
    np.bitwise_xor(d, bits, out=d)
    return d.view(np.uint32)
  if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == np.bool_:
    return np.invert(x.astype(np.int32).view(np.uint32) ^ _SIGN)
  raise ValueError(f"scores of dtype {x.dtype} cannot be ranked; allowed: float or integer scores.")


def _float32_bits(x: jax.Array) -> jax.Array:
  """int32 bits of float32 or bfloat16 ``x`` widened to float32, by integer operations
  only (XLA:CPU flushes subnormals to zero in float operations, numpy does not)."""
  if x.dtype == jnp.bfloat16:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.int32) << 16
  return jax.lax.bitcast_convert_type(x, jnp.int32)


def device_keys(x: jax.Array) -> jax.Array:
  """:func:`descending_keys` of float32, bfloat16 or integer ``x`` (any shape, flat
  uint32 [n] out) by integer operations only: traceable, bit-identical to the host's."""
  x = x.reshape(-1)
  if jnp.issubdtype(x.dtype, jnp.floating):
    bits = _float32_bits(x)
    bits = jnp.where(bits == jnp.int32(-(2**31)), 0, bits)  # -0.0 -> 0.0
    d = bits ^ ((~bits >> 31) & 0x7FFFFFFF)
  else:
    d = ~(x.astype(jnp.int32) ^ jnp.int32(-(2**31)))
  return jax.lax.bitcast_convert_type(d, jnp.uint32)


def _nonfinite(x: jax.Array) -> jax.Array:
  """int32: NaN or infinite entries of float ``x`` (0 for integers), bit operations."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.int32(0)
  exponent = jnp.int32(0x7F800000)
  return jnp.sum((_float32_bits(x.reshape(-1)) & exponent) == exponent, dtype=jnp.int32)


def _device_keys_fn(leaves: tuple) -> tuple[jax.Array, jax.Array]:
  """(uint32 [N] descending keys of the flattened, concatenated leaves; int32 [L]
  non-finite values per leaf): :func:`descending_keys` as one fused program."""
  keys = [device_keys(x) for x in leaves]
  return jnp.concatenate(keys), jnp.stack([_nonfinite(x) for x in leaves])


def _on_device(dtype) -> bool:
  return dtype in (jnp.float32, jnp.bfloat16) or (
    jnp.issubdtype(dtype, jnp.integer) and np.dtype(dtype).itemsize <= 4
  )


def flat_keys(leaves) -> tuple[jax.Array | np.ndarray, np.ndarray]:
  """(uint32 [N] keys of all leaves, flattened in order; int32 [L] non-finite values
  per leaf): one jitted program per tree structure for float32, bfloat16 and integer
  scores (bit operations only), numpy otherwise (float16, float64)."""
  if all(_on_device(x.dtype) for x in leaves):
    keys, bad = _device_keys(tuple(jnp.asarray(x) for x in leaves))
    return keys, np.asarray(bad)
  host = [np.asarray(jax.device_get(x)).reshape(-1) for x in leaves]
  host = [x.astype(np.float32) if x.dtype == np.float64 else x for x in host]
  bad = [
    0
    if not jnp.issubdtype(x.dtype, jnp.floating)
    else int(np.count_nonzero(~np.isfinite(x.astype(np.float32))))
    for x in host
  ]
  return (np.concatenate([descending_keys(x) for x in host]), np.asarray(bad, np.int32))


def sort_positions(d: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """``positions`` (int, distinct) sorted by (d[position], position): one sort of
  packed uint64 keys (key << 32 | position); numpy's vectorized sort of these is
  several times faster than XLA:CPU's stable argsort."""
  positions = np.asarray(positions)
  packed = d[positions].astype(np.uint64) << np.uint64(32)
  packed |= positions.astype(np.uint64)
  packed.sort()
  return (packed & np.uint64(0xFFFFFFFF)).astype(np.int32)


def full_order(d: np.ndarray) -> np.ndarray:
  """All positions of ``d`` in ranking order (int32 [n]; uint32 or uint64 keys)."""
  if d.dtype == np.uint64:
    return np.argsort(d, kind="stable").astype(np.int32)
  if not np.little_endian:
    return sort_positions(d, np.arange(d.size))
  # The words written in place (high: the key, low: the position): no 64-bit temporaries.
  packed = np.empty(d.size, np.uint64)
  words = packed.view(np.uint32)
  words[1::2] = d
  words[0::2] = np.arange(d.size, dtype=np.uint32)
  packed.sort()
  return words[0::2].astype(np.int32)


def threshold(d: np.ndarray, c: int) -> tuple[int, int]:
  """(t, p): the best ``c`` positions of ``d`` are {i : d_i < t or (d_i == t, i < p)}.

  c = 0 gives (0, 0); c = n gives a threshold past every pair. O(n): one selection
  (np.partition) and two comparisons.
  """
  n = d.size
  if not 0 <= c <= n:
    raise ValueError(f"c={c!r} must lie in [0, {n}].")
  if c == 0:
    return 0, 0
  if c == n:
    return 0xFFFFFFFF, n
  t = np.partition(d, c - 1)[c - 1]
  need = c - int(np.count_nonzero(d < t))  # >= 1 ties at t are taken, by position
  ties = np.flatnonzero(d == t)
  return int(t), int(ties[need - 1]) + 1


def _top(d: np.ndarray, c: int) -> np.ndarray:
  """The best ``c`` positions of ``d`` in ranking order (int32 [c]): a selection and a
  sort of c keys (a full sort when c is most of d)."""
  n = d.size
  if c >= n // 2:
    return full_order(d)[:c]
  if c == 0:
    return np.zeros(0, np.int32)
  t = np.partition(d, c - 1)[c - 1]
  below = np.flatnonzero(d < t)
  ties = np.flatnonzero(d == t)[: c - below.size]
  return sort_positions(d, np.concatenate([below, ties]))


class Prefix:
  """The best m positions of a key array in ranking order, grown on demand.

  ``order(m)`` returns at least the first m positions of the ranking; each growth at
  least doubles the prefix (a selection over the whole array and a sort of the
  prefix), so a search visiting counts up to m pays O(n log(m)) selections at most.
  """

  MIN = 1 << 12

  def __init__(self, d: np.ndarray):
    self.d = d
    self.positions = np.zeros(0, np.int32)

  def order(self, m: int) -> np.ndarray:
    m = min(int(m), self.d.size)
    if m > self.positions.size:
      grown = max(2 * m, 2 * self.positions.size, self.MIN)  # room for the next steps
      self.positions = _top(self.d, min(grown, self.d.size))
    return self.positions

  def threshold(self, c: int) -> tuple[int, int]:
    """As :func:`threshold`, read off the prefix when it holds c positions."""
    if c <= 0:
      return 0, 0
    if c >= self.d.size:
      return 0xFFFFFFFF, self.d.size
    if c > self.positions.size:
      return threshold(self.d, c)
    last = int(self.positions[c - 1])
    return int(self.d[last]), last + 1


_device_keys = compilation.jit(_device_keys_fn)


# --------------------------------------------------------------------------- in a program

_RADIX = 1 << 16  # each pass histograms 16 bits of the uint32 keys


class TopK(NamedTuple):
  """What :func:`top_k` found (int32 / uint32 scalars).

  tau: the key of the k-th best alive entry; less: alive entries with a smaller key;
  ties: alive entries whose key equals tau (the cut takes the first k - less of them
  by position).
  """

  tau: jax.Array
  less: jax.Array
  ties: jax.Array


def _first_reaching(cum: jax.Array, k: jax.Array) -> jax.Array:
  """The first index i with cum[i] >= k (cum non-decreasing; k <= cum[-1])."""
  return jnp.sum(cum < k, dtype=jnp.int32)


def _tie_cut(keys: Sequence[jax.Array], alive, tau, wanted) -> jax.Array:
  """Global flat position p such that the alive keys == tau at positions < p are the
  first ``wanted`` of them (arrays in order). Per-array tie counts locate the array of
  the wanted-th tie; a cumsum runs over that array only."""
  is_tie = [(d == tau) & a for d, a in zip(keys, alive)]
  counts = jnp.stack([jnp.sum(t, dtype=jnp.int32) for t in is_tie])
  before = jnp.cumsum(counts) - counts
  which = jnp.minimum(jnp.sum(before + counts < wanted), len(keys) - 1)
  offsets = np.concatenate([[0], np.cumsum([d.size for d in keys])[:-1]]).astype(np.int32)

  def branch(i):
    def cut():
      inclusive = jnp.cumsum(is_tie[i].astype(jnp.int32)) + before[i]
      return offsets[i] + jnp.sum(inclusive < wanted, dtype=jnp.int32) + 1

    return cut

  cut = jax.lax.switch(which, [branch(i) for i in range(len(keys))])
  return jnp.where(wanted > 0, cut, 0)


def top_k(keys: Sequence[jax.Array], k, alive: Sequence[jax.Array]) -> tuple[list, TopK]:
  """The best ``k`` alive entries of flat uint32 descending ``keys`` over all arrays
  together, ties by position (arrays in order, then flat index): bool masks shaped
  like ``keys``, and the threshold found.

  A radix select: a histogram of the high 16 bits of the alive keys locates the bucket
  of the k-th key, a histogram of the low 16 bits inside that bucket the key tau; the
  entries with key < tau are kept, and of those equal to tau the first k - less by
  position. Two O(N) passes, no sort; jit-able with a traced ``k`` (clipped to
  [0, alive entries]).
  """
  keys = [d.reshape(-1) for d in keys]
  alive = [a.reshape(-1) for a in alive]
  count = sum(jnp.sum(a, dtype=jnp.int32) for a in alive)
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, count)
  want = jnp.maximum(k, 1)
  high = [(d >> 16).astype(jnp.int32) for d in keys]
  hist = sum(
    jnp.bincount(jnp.where(a, h, _RADIX), length=_RADIX + 1)[:_RADIX] for h, a in zip(high, alive)
  ).astype(jnp.int32)
  cum = jnp.cumsum(hist)
  bucket = _first_reaching(cum, want)
  below = jnp.where(bucket > 0, cum[jnp.maximum(bucket - 1, 0)], 0)
  low = [(d & 0xFFFF).astype(jnp.int32) for d in keys]
  hist_lo = sum(
    jnp.bincount(jnp.where(a & (h == bucket), l, _RADIX), length=_RADIX + 1)[:_RADIX]
    for h, l, a in zip(high, low, alive)
  ).astype(jnp.int32)
  cum_lo = below + jnp.cumsum(hist_lo)
  offset = _first_reaching(cum_lo, want)
  tau = (bucket.astype(jnp.uint32) << 16) | offset.astype(jnp.uint32)
  less = cum_lo[offset] - hist_lo[offset]
  ties = hist_lo[offset]
  wanted = k - less
  total = sum(d.size for d in keys)
  cut = jax.lax.cond(
    ties <= wanted, lambda: jnp.int32(total), lambda: _tie_cut(keys, alive, tau, wanted)
  )
  keep, start = [], 0
  for d, a in zip(keys, alive):
    pos = jnp.arange(d.size, dtype=jnp.int32) + start
    keep.append(a & ((d < tau) | ((d == tau) & (pos < cut))) & (k > 0))
    start += d.size
  return keep, TopK(tau=tau, less=less, ties=ties)


@jax.jit
def select_top(scores: Sequence[jax.Array], k, alive: Sequence[jax.Array]) -> list:
  """Bool masks of the ``k`` largest |scores| among the ``alive`` entries, over all
  arrays together, ties by position (lower first; arrays in order): :func:`top_k` on
  the keys of |score|. Jitted (``k`` traced: one compilation per set of shapes); masks
  shaped like ``scores``."""
  keys = [device_keys(jnp.abs(s).astype(jnp.float32)) for s in scores]
  keep, _ = top_k(keys, k, alive)
  return [m.reshape(s.shape) for m, s in zip(keep, scores)]
