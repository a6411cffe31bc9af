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
  serves: a selection plus a sort of m packed (d << 32 | i) keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import compilation

_SIGN = np.uint32(0x80000000)


def descending_keys(x) -> np.ndarray:
  """uint32 [n] keys of the flat scores ``x`` (float or integer): smaller = ranked first.

  Float scores of any width (float32, bfloat16, float16, float64 rounded to float32 as
  the device sort does) keep their order exactly; -0.0 and 0.0 get one key. With b the
  int32 bits: d = b ^ 0x7FFFFFFF for b >= 0, d = b for b < 0 (the bit complement of the
  usual ascending key).
  """
  x = np.asarray(x).reshape(-1)
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


def _device_keys_fn(leaves: tuple) -> tuple[jax.Array, jax.Array]:
  """(uint32 [N] descending keys of the flattened, concatenated leaves; int32 [L]
  non-finite values per leaf): :func:`descending_keys` as one fused program."""
  keys, bad = [], []
  for x in leaves:
    x = x.reshape(-1)
    if jnp.issubdtype(x.dtype, jnp.floating):
      bits = _float32_bits(x)
      bits = jnp.where(bits == jnp.int32(-(2**31)), 0, bits)  # -0.0 -> 0.0
      d = bits ^ ((~bits >> 31) & 0x7FFFFFFF)
      exponent = jnp.int32(0x7F800000)
      bad.append(jnp.sum((bits & exponent) == exponent, dtype=jnp.int32))
    else:
      d = ~(x.astype(jnp.int32) ^ jnp.int32(-(2**31)))
      bad.append(jnp.int32(0))
    keys.append(jax.lax.bitcast_convert_type(d, jnp.uint32))
  return jnp.concatenate(keys), jnp.stack(bad)


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
  """All positions of ``d`` in ranking order (int32 [n])."""
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


def top(d: np.ndarray, c: int) -> np.ndarray:
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


def mask_of(d: np.ndarray, t: int, p: int, offset: int = 0) -> np.ndarray:
  """bool [n]: (d_i, offset + i) < (t, p), the kept set of threshold (t, p)."""
  t = np.uint32(t)
  below = d < t
  p = min(max(p - offset, 0), d.size)
  below[:p] |= d[:p] == t
  return below


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
      self.positions = top(self.d, min(grown, self.d.size))
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
