"""Block sparsity: whole b_r x b_c blocks of each kernel kept or pruned, scored by mean or max.

A kernel of shape [..., n] is read as the matrix [m, n], m = prod(shape[:-1]) (a Dense
kernel [in, out] as it is, a convolution's [kh, kw, cin, cout] as [kh kw cin, cout]) and
tiled by b_r x b_c blocks from its first entry; edge blocks are smaller where b does not
divide m or n. A block's score is the mean or the max of |w| over its weights (over its
live weights, where a mask says which are; a block with none scores below every other).

A block mask keeps the best blocks, ranked by score, ties by position (layers in order,
blocks row-major), as far as their weights fit the budget: the longest prefix of the
ranking whose weights number at most floor((1 - s) N), so the direct sparsity is at least
s (one ranking over all layers, or the budget split per layer by a quota of
:mod:`sparsejax.quotas` with a prefix per layer). Every mask is a union of whole blocks.

- :func:`block_masks`: jit-able, for updaters (:class:`sparsejax.dynamic.BlockMagnitude`,
  :class:`sparsejax.dynamic.ACDC` with ``block=``);
- :class:`BlockRanking` and :func:`rank`: the pruners ``block/<b>x<b>/<mean|max>`` of the
  registry (:mod:`sparsejax.registry`), at a direct target or at the largest prefix whose
  *effective* sparsity reaches the target (a bisection over the prefix, one connectivity
  sweep per probe).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import effective, errors, selection, tracing
from sparsejax import masks as masks_lib
from sparsejax import quotas as quotas_lib

PyTree = Any
REDUCES = ("mean", "max")


def check_block(block) -> tuple[int, int]:
  """``block`` as (rows, cols) of positive ints (an int b means b x b), or ValueError."""
  if isinstance(block, (int, np.integer)) and not isinstance(block, bool):
    block = (int(block), int(block))
  ok = (
    isinstance(block, (tuple, list))
    and len(block) == 2
    and all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in block)
  )
  if not ok:
    raise ValueError(f"block={block!r} must be a positive int b (b x b) or a pair (rows, cols).")
  return int(block[0]), int(block[1])


def check_reduce(reduce: str) -> str:
  if reduce not in REDUCES:
    raise ValueError(f"reduce={reduce!r} is not allowed; allowed: {', '.join(REDUCES)}.")
  return reduce


def grid(shape: Sequence[int], block) -> tuple[int, int, int, int]:
  """(m, n, block rows, block cols) of a kernel of ``shape`` read as the matrix [m, n]."""
  br, bc = check_block(block)
  n = int(shape[-1])
  m = int(math.prod(shape[:-1])) if len(shape) > 1 else 1
  return m, n, -(-m // br), -(-n // bc)


def _blocked(x: jax.Array, shape, block, fill) -> jax.Array:
  """``x`` (a kernel of ``shape``) as [rows, br, cols, bc], padded with ``fill``."""
  br, bc = check_block(block)
  m, n, rows, cols = grid(shape, block)
  x = x.reshape(m, n)
  x = jnp.pad(x, ((0, rows * br - m), (0, cols * bc - n)), constant_values=fill)
  return x.reshape(rows, br, cols, bc)


def block_scores(w: jax.Array, block, reduce: str = "mean", alive: jax.Array | None = None):
  """float32 [rows, cols]: the mean or max |w| of each block over its ``alive`` weights
  (all when None); -1 for a block without a live weight (scores are >= 0 otherwise)."""
  check_reduce(reduce)
  a = jnp.abs(jnp.asarray(w, jnp.float32))
  live = jnp.ones(a.shape, bool) if alive is None else jnp.asarray(alive, bool)
  a4 = _blocked(a, w.shape, block, 0.0)
  l4 = _blocked(live, w.shape, block, False)
  count = jnp.sum(l4, axis=(1, 3))
  if reduce == "mean":
    s = jnp.sum(jnp.where(l4, a4, 0.0), axis=(1, 3)) / jnp.maximum(count, 1)
  else:
    s = jnp.max(jnp.where(l4, a4, -1.0), axis=(1, 3))
  return jnp.where(count > 0, s, -1.0)


def block_sizes(shape: Sequence[int], block) -> np.ndarray:
  """int64 [rows, cols]: weights per block (edge blocks are smaller)."""
  br, bc = check_block(block)
  m, n, rows, cols = grid(shape, block)
  r = np.minimum(br, m - br * np.arange(rows))
  c = np.minimum(bc, n - bc * np.arange(cols))
  return np.outer(r, c).astype(np.int64)


def expand(keep: jax.Array, shape: Sequence[int], block) -> jax.Array:
  """Per-block values ``keep`` [rows, cols] (a block mask, or scores) at every weight of a
  kernel of ``shape`` (same dtype)."""
  br, bc = check_block(block)
  m, n, _, _ = grid(shape, block)
  full = jnp.repeat(jnp.repeat(jnp.asarray(keep), br, axis=0), bc, axis=1)
  return full[:m, :n].reshape(tuple(shape))


def _prefix(scores: Sequence[jax.Array], sizes: Sequence[np.ndarray], budget) -> list:
  """Bool [rows, cols] per layer: the longest prefix of the blocks ranked by score (ties
  by position, layers in order) with at most ``budget`` weights; blocks scoring < 0 (no
  live weight) never kept. Jit-able (traced budget)."""
  keys = jnp.concatenate([selection.device_keys(s) for s in scores])
  flat_sizes = jnp.asarray(np.concatenate([z.reshape(-1) for z in sizes]), jnp.int32)
  live = jnp.concatenate([s.reshape(-1) >= 0 for s in scores])
  order = jnp.argsort(keys, stable=True)  # ascending keys = descending scores
  taken = jnp.cumsum(jnp.where(live[order], flat_sizes[order], 0))
  keep_sorted = live[order] & (taken <= budget)
  keep = jnp.zeros(keys.shape, bool).at[order].set(keep_sorted)
  out, start = [], 0
  for s in scores:
    out.append(keep[start : start + s.size].reshape(s.shape))
    start += s.size
  return out


def block_masks(
  params: PyTree,
  masks: PyTree,
  density,
  block,
  reduce: str = "mean",
  quota: str | None = None,
  alive: PyTree = None,
) -> PyTree:
  """Whole-block masks (like ``masks``) keeping the best blocks of |params| with at most
  floor(density N) weights (globally, or per layer with ``quota``: round(n_l d_l) each);
  blocks without a weight in ``alive`` (a mask tree; None: all live) are never kept.
  Jit-able in ``params``, ``density`` and ``alive`` (block, reduce, quota static)."""
  check_block(block)
  check_reduce(reduce)
  leaves = masks_lib.mask_leaves(masks)
  ws = masks_lib.mask_leaves(masks_lib.map_masks(lambda m, w: w, masks, params))
  lives = [None] * len(leaves) if alive is None else masks_lib.mask_leaves(alive)
  shapes = [tuple(m.shape) for m in leaves]
  scores = [block_scores(w, block, reduce, a) for w, a in zip(ws, lives)]
  sizes = [block_sizes(s, block) for s in shapes]
  total = sum(math.prod(s) for s in shapes)
  density = jnp.asarray(density, jnp.float32)
  if quota is None:
    budget = jnp.floor(density * total + 1e-6).astype(jnp.int32)
    keeps = _prefix(scores, sizes, budget)
  else:
    counts = quotas_lib.layer_kept_counts(quota, density, tuple(shapes))
    keeps = [_prefix([s], [z], counts[l])[0] for l, (s, z) in enumerate(zip(scores, sizes))]
  it = iter(expand(k, s, block) for k, s in zip(keeps, shapes))
  return masks_lib.map_masks(lambda m: next(it), masks)


# ------------------------------------------------------------------ pruner rankings


@dataclasses.dataclass(frozen=True, eq=False)
class BlockRanking:
  """The blocks of the prunable kernels in ranking order, for a block pruner.

  like: a mask tree (the prunable set); block, reduce, quota: as :func:`block_masks`;
  order: int [B] block ids (flat over layers in order, row-major) best first; sizes:
  int [B] weights per block id; layer: int [B] layer of each block id.
  """

  like: PyTree
  block: tuple
  reduce: str
  quota: str | None
  order: np.ndarray
  sizes: np.ndarray
  layer: np.ndarray

  @property
  def total(self) -> int:
    return int(self.sizes.sum())

  def masks_of_blocks(self, kept_ids: np.ndarray) -> PyTree:
    """The weight masks keeping the block ids ``kept_ids``."""
    keep = np.zeros(self.sizes.size, bool)
    keep[kept_ids] = True
    leaves = masks_lib.mask_leaves(self.like)
    out, start = [], 0
    for m in leaves:
      _, _, rows, cols = grid(m.shape, self.block)
      out.append(expand(keep[start : start + rows * cols].reshape(rows, cols), m.shape, self.block))
      start += rows * cols
    it = iter(out)
    return masks_lib.map_masks(lambda m: next(it), self.like)

  def member(self, t: int) -> PyTree:
    """Member ``t`` of the nested family: the first t blocks of the order (global), or
    with a quota the per-layer prefixes at density t / N (t = 0..N)."""
    if self.quota is None:
      return self.masks_of_blocks(self.order[:t])
    shapes = tuple(tuple(m.shape) for m in masks_lib.mask_leaves(self.like))
    counts = np.asarray(quotas_lib.layer_kept_counts(self.quota, t / self.total, shapes))
    kept = []
    for l, c in enumerate(counts):
      ids = self.order[self.layer[self.order] == l]
      taken = np.cumsum(self.sizes[ids])
      kept.append(ids[taken <= c])
    return self.masks_of_blocks(np.concatenate(kept) if kept else np.zeros(0, int))

  def family_size(self) -> int:
    return self.sizes.size if self.quota is None else self.total

  def direct(self, sparsity: float) -> PyTree:
    """The member at direct sparsity >= ``sparsity`` with the most weights."""
    budget = int(np.floor((1.0 - sparsity) * self.total + 1e-6))
    if self.quota is None:
      taken = np.cumsum(self.sizes[self.order])
      return self.member(int(np.sum(taken <= budget)))
    return self.member(budget)

  def effective(self, sparsity: float, traced: tracing.Traced) -> PyTree:
    """The member with the most blocks whose effective sparsity is >= ``sparsity``
    (bisection over the family; effective counts grow with the member).

    Raises:
      UnreachableSparsityError: every member meeting the target is disconnected.
    """
    target = int(np.floor((1.0 - sparsity) * self.total + 1e-6))
    traced = traced.masked(self.like)
    active = lambda t: masks_lib.count(effective.effective_masks(traced, self.member(t)))[0]
    lo, hi = 0, self.family_size()  # invariant: active(lo) <= target
    if active(hi) <= target:
      lo = hi
    while hi - lo > 1:
      mid = (lo + hi) // 2
      if active(mid) <= target:
        lo = mid
      else:
        hi = mid
    if active(lo) == 0:
      lo2, hi2 = 0, self.family_size()  # the smallest connected member, for the error
      while hi2 - lo2 > 1:
        mid = (lo2 + hi2) // 2
        lo2, hi2 = (mid, hi2) if active(mid) == 0 else (lo2, mid)
      smallest = active(hi2)
      raise errors.UnreachableSparsityError(
        f"sparsity={sparsity!r} (effective) cannot be reached with whole {self.block} blocks: "
        f"every connected member keeps more than {target} active weights; the largest "
        f"reachable effective sparsity is {1 - smallest / self.total:.6g}.",
        sparsity=sparsity,
        max_sparsity=1 - smallest / self.total,
      )
    return self.member(lo)


def rank(params: PyTree, like: PyTree, block, reduce: str = "mean", quota=None) -> BlockRanking:
  """The :class:`BlockRanking` of |params| at the leaves of the mask tree ``like``."""
  block = check_block(block)
  check_reduce(reduce)
  if quota is not None and quota not in quotas_lib.QUOTAS:
    raise ValueError(
      f"quota={quota!r} is not a quota; allowed: None (global), {', '.join(quotas_lib.QUOTAS)}."
    )
  ws = masks_lib.mask_leaves(masks_lib.map_masks(lambda m, w: w, like, params))
  scores = [np.asarray(block_scores(w, block, reduce)).reshape(-1) for w in ws]
  keys = np.concatenate([selection.descending_keys(s) for s in scores])
  order = np.argsort(keys, kind="stable")
  sizes = np.concatenate([block_sizes(w.shape, block).reshape(-1) for w in ws])
  layer = np.concatenate([np.full(s.size, l) for l, s in enumerate(scores)])
  return BlockRanking(like, block, reduce, quota, order, sizes, layer)


__all__ = [
  "REDUCES",
  "BlockRanking",
  "block_masks",
  "block_scores",
  "block_sizes",
  "check_block",
  "expand",
  "grid",
  "rank",
]
