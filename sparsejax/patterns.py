"""Patterns inside a layer: N:M semi-structured sparsity, and equal counts per output unit.

Both are defined on a weight's [out, in] view (:mod:`sparsejax.layouts`: a row per
output unit, a column per input, a convolution's columns its patch):

- **N:M** (the 2:4 pattern of NVIDIA's sparse tensor cores; Mishra et al., 2021,
  "Accelerating sparse deep neural networks"): each row's columns are cut into groups of
  M consecutive inputs [g M, (g + 1) M), and each group keeps at most N weights
  (selection here keeps exactly N: the N best scores of the group). ``pattern`` is the
  string ``"N:M"`` (or a pair), 1 <= N <= M; M must divide the inputs of every layer it
  applies to (a Dense kernel's in-features, a convolution's kernel-size x in-channels;
  the groups of a convolution then run along its input channels when M divides them).
  Any score can be cut to a pattern (:func:`n_m_masks`; ``pruning.prune(...,
  pattern="2:4")``); :func:`check` validates masks against one. An N:M mask can still
  lose whole units: a hidden unit every next-layer row drops is dead, and so are its
  incoming weights (the effective sparsity functions count them, as for any mask).
- **per row**: every output unit keeps the same number of weights, within one
  (:func:`keep_rows`; Wanda compares weights per output, Sun et al., 2024).

Selection uses the library's one order (:mod:`sparsejax.selection`): higher score
first, ties by position (the lower column first).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import layouts, selection, tracing
from sparsejax import masks as masks_lib

PyTree = Any


def parse(pattern, name: str = "pattern") -> tuple[int, int]:
  """(N, M) of ``pattern`` ("N:M" or a pair of ints), or ValueError naming ``name``."""
  if isinstance(pattern, str):
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    nm = (int(match.group(1)), int(match.group(2))) if match else None
  elif (
    isinstance(pattern, (tuple, list))
    and len(pattern) == 2
    and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pattern)
  ):
    nm = (int(pattern[0]), int(pattern[1]))
  else:
    nm = None
  if nm is None:
    raise ValueError(f"{name}={pattern!r} must be 'N:M' (e.g. '2:4'), N kept in every M inputs.")
  n, m = nm
  if m < 1 or n < 1:
    raise ValueError(f"{name}={pattern!r}: N and M must be positive (N kept of every M inputs).")
  if n > m:
    raise ValueError(
      f"{name}={pattern!r}: N={n} is larger than M={m}; a group of M inputs keeps at most M."
    )
  return n, m


def shown(pattern) -> str:
  """``pattern`` as an error message names it: 'N:M' (quoted) once it parses."""
  try:
    n, m = parse(pattern)
  except ValueError:
    return repr(pattern)
  return f"'{n}:{m}'"


def sparsity_of(pattern) -> float:
  """The direct sparsity of an exact N:M mask, 1 - N/M."""
  n, m = parse(pattern)
  return 1.0 - n / m


def check_widths(views: dict, pattern, name: str = "pattern") -> tuple[int, int]:
  """(N, M) after checking that M divides the inputs of every view {path: Layout}."""
  n, m = parse(pattern, name)
  bad = {p: v.inputs for p, v in views.items() if v.inputs % m}
  if bad:
    layers = ", ".join(f"{p!r} ({w})" for p, w in list(bad.items())[:4])
    raise ValueError(
      f"{name}={shown(pattern)}: M={m} does not divide the inputs per output unit of {layers}; "
      f"N:M groups are M consecutive inputs, so every pruned layer needs a multiple of {m} "
      "(narrow prunable= to the layers it fits)."
    )
  return n, m


def _row_ranks(keys: jax.Array) -> jax.Array:
  """Rank of each entry within its last axis (0 = best: the smallest descending key),
  ties by position. Short axes (groups of M) count pairwise (no sort: XLA:CPU sorts
  many short rows slowly), long ones sort."""
  m = keys.shape[-1]
  if m <= 32:
    a, b = keys[..., :, None], keys[..., None, :]  # [..., j, k]: is k ranked before j?
    before = (b < a) | ((b == a) & (jnp.arange(m)[None, :] < jnp.arange(m)[:, None]))
    return jnp.sum(before, axis=-1)
  # one sort; its inverse permutation by a scatter (a second argsort costs as much as the
  # first: 0.8 s for 1024 x 4096 on XLA:CPU)
  order = jnp.argsort(keys, axis=-1, stable=True)
  ranks = jnp.broadcast_to(jnp.arange(m, dtype=order.dtype), order.shape)
  return jnp.put_along_axis(jnp.zeros_like(order), order, ranks, axis=-1, inplace=False)


def n_best(scores: jax.Array, n: int) -> jax.Array:
  """bool, ``scores``' shape: the ``n`` best entries of its last axis (ties by
  position; traceable)."""
  keys = selection.device_keys(scores.astype(jnp.float32)).reshape(scores.shape)
  return _row_ranks(keys) < n


@functools.partial(jax.jit, static_argnums=(1, 2))
def keep_n_m(scores: jax.Array, n: int, m: int) -> jax.Array:
  """bool [out, in]: the ``n`` best of every ``m`` consecutive columns of each row of
  ``scores`` [out, in] (in divisible by m)."""
  out, width = scores.shape
  keys = selection.device_keys(scores.astype(jnp.float32)).reshape(out, width // m, m)
  return (_row_ranks(keys) < n).reshape(out, width)


def _smallest_per_row(keys: jax.Array, count: jax.Array) -> jax.Array:
  """bool [out, in]: the ``count[r]`` smallest uint32 keys of each row r, ties by position
  (the same entries as ``rank < count`` under that order), without a sort: each row's
  threshold t_r, the smallest key with at least count[r] keys <= it, bit by bit from the
  top (32 counting passes), then every key < t_r and the first count[r] - #(key < t_r)
  keys equal to t_r."""
  count = count.astype(jnp.int32)[:, None]

  def bit(i, t):  # keep the bit unset where enough keys already lie below it
    candidate = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32)) - jnp.uint32(1)
    enough = jnp.sum(keys <= candidate, axis=1, keepdims=True, dtype=jnp.int32) >= count
    return jnp.where(enough, t, t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32)))

  t = jax.lax.fori_loop(0, 32, bit, jnp.zeros((keys.shape[0], 1), jnp.uint32))
  below = keys < t
  ties = (keys == t) & (
    jnp.cumsum(keys == t, axis=1, dtype=jnp.int32)
    <= count - jnp.sum(below, axis=1, keepdims=True, dtype=jnp.int32)
  )
  return (below | ties) & (count > 0)


@functools.partial(jax.jit, static_argnums=1)
def keep_rows(scores: jax.Array, kept: int) -> jax.Array:
  """bool [out, in]: ``kept`` weights in all, the best ``kept // out`` of every row and
  one more in the first ``kept % out`` rows (each output unit keeps the same count,
  within one); ties by position."""
  out, width = scores.shape
  per_row = jnp.full(out, kept // out, jnp.int32) + (jnp.arange(out) < kept % out)
  keys = selection.device_keys(scores.astype(jnp.float32)).reshape(out, width)
  return _smallest_per_row(keys, per_row)


@jax.jit
def keep_top(scores: jax.Array, kept) -> jax.Array:
  """bool (``scores``' shape): the ``kept`` best entries, ties by flat position."""
  keys = selection.device_keys(scores.astype(jnp.float32))
  (keep,), _ = selection.top_k([keys], kept, [jnp.ones(keys.shape, bool)])
  return keep.reshape(scores.shape)


def n_m_masks(model: tracing.Traced, scores: PyTree, pattern) -> PyTree:
  """The N:M masks of a score tree (higher = kept first): in each weight's [out, in] view
  the N best of every M consecutive inputs of a row (``model``: the traced model whose
  views the score tree's leaves have)."""
  paths = masks_lib.paths(scores)
  views = layouts.of(model.narrow(paths)).require(paths, f"pattern={shown(pattern)}")
  n, m = check_widths(views, pattern)
  flat, treedef = jax.tree_util.tree_flatten_with_path(scores, is_leaf=lambda x: x is None)
  out = []
  for p, s in flat:
    if s is None:
      out.append(None)
      continue
    view = views[masks_lib.path_str(p)]
    out.append(view.from_matrix(keep_n_m(view.to_matrix(s), n, m)))
  return jax.tree.unflatten(treedef, out)


def check(model: tracing.Traced, masks: PyTree, pattern, name: str = "masks") -> None:
  """ValueError unless every mask leaf keeps at most N of every M consecutive inputs of
  each output unit (``model``: the traced model whose weights the masks prune)."""
  paths = masks_lib.paths(masks)
  views = layouts.of(model.narrow(paths)).require(paths, f"checking pattern={shown(pattern)}")
  n, m = check_widths(views, pattern)
  for p, mask in jax.tree_util.tree_leaves_with_path(masks, is_leaf=lambda x: x is None):
    if mask is None:
      continue
    path = masks_lib.path_str(p)
    view = views[path]
    groups = np.asarray(view.to_matrix(mask)).reshape(view.outputs, -1, m).sum(-1)
    over = np.argwhere(groups > n)
    if over.size:
      row, group = (int(v) for v in over[0])
      raise ValueError(
        f"{name}[{path!r}] breaks pattern={shown(pattern)}: {len(over)} groups of {m} inputs keep "
        f"more than {n} (first: output unit {row}, inputs {group * m}..{group * m + m - 1} "
        f"keep {int(groups[row, group])})."
      )


__all__ = [
  "check",
  "check_widths",
  "keep_n_m",
  "keep_rows",
  "keep_top",
  "n_best",
  "n_m_masks",
  "parse",
  "shown",
  "sparsity_of",
]
