"""Rankings: scores -> one nested family of masks (method.md section 2).

Every pruner is a *ranking* of the prunable weights: the mask at k keeps the weights of
rank < k. Global rankings order all weights together (highest score first); quota
rankings order inside each layer and keep round(n_l * density_l(k / N)) per layer
(:mod:`sparsejax.quotas`). Ties are broken by position (flattened row-major, layers in
the params' tree order), so masks are deterministic and *nested* in k.

One representation: the scores' order-preserving uint32 keys
(:func:`sparsejax.selection.descending_keys`, smaller = kept first). A mask at a concrete
count is a per-layer threshold found by selection; the full order is sorted only when
asked for (:attr:`Ranking.order`), or inside a jitted program where the ranking is a
pytree whose leaves are its device keys.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import compilation, selection
from sparsejax import masks as masks_lib
from sparsejax import quotas as quotas_lib

PyTree = Any


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


@jax.tree_util.register_pytree_node_class
class Ranking:
  """A nested family of masks: layer l keeps its ``counts(k)[l]`` best weights.

  Built by :func:`rank_scores`. Attributes:
    keys: uint32 [N] descending keys of the flattened layers (tree order); within a
      layer their order is the layer's order. None inside a jitted program.
    count_keys: global rankings only: the [N] keys whose global order gives the
      per-layer counts (``keys`` itself for a plain global ranking; another pruner's
      for ``Pruner.quota_from``); None for quota rankings.
    quota: None for a global ranking, else a quota name (counts from the quota).
    shapes: the prunable kernel shapes; treedef/slots rebuild the mask tree.
    flow: layer indices in input-to-output (traced data-flow) order, which quotas such
      as uniform+ read; () = the tree order.

  As a pytree its leaves are the device keys (passing it to a jitted function copies
  no order); inside a trace, :attr:`order`, :attr:`ranks` and :attr:`cutoffs` are
  stable sorts of the keys in the program.
  """

  def __init__(
    self,
    keys=None,
    *,
    shapes,
    treedef,
    slots,
    quota=None,
    flow=(),
    count_keys=None,
    device_keys=None,
    count_device_keys=None,
  ):
    self.keys, self.count_keys = keys, count_keys
    self.quota, self.shapes, self.treedef = quota, tuple(shapes), treedef
    self.slots, self.flow = tuple(slots), tuple(flow)
    self._device_keys, self._count_device_keys = device_keys, count_device_keys
    self._order = self._ranks = self._cutoffs = None
    self._prefixes = self._count_prefix = None

  def tree_flatten(self):
    aux = (self.quota, self.shapes, self.treedef, self.slots, self.flow)
    return (self.device_keys(), self.count_device_keys()), aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    quota, shapes, treedef, slots, flow = aux
    return cls(
      shapes=shapes,
      treedef=treedef,
      slots=slots,
      quota=quota,
      flow=flow,
      device_keys=children[0],
      count_device_keys=children[1],
    )

  def with_counts_from(self, other: Ranking) -> Ranking:
    """This ranking's order within layers with ``other``'s per-layer counts: a global
    ranking's (the paper's random/snip and random/synflow)."""
    if other.quota is not None or other.count_keys is None:
      raise ValueError("other must be a global ranking (quota=None).")
    return Ranking(
      self.keys,
      shapes=self.shapes,
      treedef=self.treedef,
      slots=self.slots,
      flow=self.flow,
      count_keys=other.count_keys,
      device_keys=self._device_keys,
      count_device_keys=other.count_device_keys(),
    )

  @property
  def total(self) -> int:
    """N: the prunable weights."""
    return int(sum(np.prod(s) for s in self.shapes))

  @property
  def offsets(self) -> np.ndarray:
    """int64 [L + 1]: where each layer starts in the flat (tree-order) weights."""
    return np.concatenate([[0], np.cumsum([int(np.prod(s)) for s in self.shapes])])

  @property
  def concrete(self) -> bool:
    """Whether the host keys are held (outside a jitted program)."""
    return self.keys is not None

  # ------------------------------------------------------------ full arrays, lazily
  @property
  def order(self) -> tuple:
    """Per layer, flat indices best first (int32 [n_l])."""
    if self._order is None and not self.concrete:  # traced: sorts in the program
      self._order, self._ranks = zip(*(_order_of_keys(d) for d in self._layer_device_keys()))
    elif self._order is None:
      orders = [selection.full_order(d) for d in self.layer_keys]
      self._order = tuple(jnp.asarray(o, jnp.int32) for o in orders)
      self._ranks = tuple(jnp.asarray(_inverse(o), jnp.int32) for o in orders)
    return self._order

  @property
  def ranks(self) -> tuple:
    """Per layer, the rank of each flat index within its layer (int32 [n_l])."""
    if self._ranks is None:
      _ = self.order
    return self._ranks

  @property
  def cutoffs(self) -> tuple | None:
    """Global rankings: per layer, the global ranks of its weights sorted ascending,
    so that counts(k)[l] = #{w in l : global rank < k}; None for quota rankings."""
    if self._cutoffs is None and not self.concrete and self._count_device_keys is not None:
      _, global_ranks = _order_of_keys(self._count_device_keys)
      offsets = self.offsets
      self._cutoffs = tuple(
        jnp.sort(global_ranks[offsets[l] : offsets[l + 1]]) for l in range(len(self.shapes))
      )
    elif self._cutoffs is None and self.count_keys is not None:
      offsets = self.offsets
      order = selection.full_order(self.count_keys)
      layer_of = (np.searchsorted(offsets, order, side="right") - 1).astype(np.uint16)
      by_layer = np.argsort(layer_of, kind="stable").astype(np.int32)  # radix sort
      self._cutoffs = tuple(
        jnp.asarray(by_layer[offsets[l] : offsets[l + 1]], jnp.int32)
        for l in range(len(self.shapes))
      )
    return self._cutoffs

  # ------------------------------------------------------------ selection (host)
  @property
  def layer_keys(self) -> tuple:
    """Per layer, the keys of its weights (views of ``keys``)."""
    offsets = self.offsets
    return tuple(self.keys[offsets[l] : offsets[l + 1]] for l in range(len(self.shapes)))

  def _layer_prefix(self, l: int) -> selection.Prefix:
    if self._prefixes is None:
      self._prefixes = [selection.Prefix(d) for d in self.layer_keys]
    return self._prefixes[l]

  def _global_prefix(self) -> selection.Prefix:
    if self._count_prefix is None:
      self._count_prefix = selection.Prefix(self.count_keys)
      self._count_prefix.layer_of = None
    return self._count_prefix

  def _plain_global(self) -> bool:
    return self.quota is None and self.concrete and self.count_keys is self.keys

  def host_counts(self, kept: int) -> np.ndarray:
    """counts(kept) as int32 [L] numpy, by selection (concrete ``kept``)."""
    kept = int(kept)
    if self.quota is not None:
      return np.asarray(_quota_counts_jit(self.quota, self.shapes, self.flow, np.int32(kept)))
    kept = min(max(kept, 0), self.total)
    prefix = self._global_prefix()
    if kept <= prefix.positions.size:
      return self.window_counts(np.array([kept]))[0]
    t, p = selection.threshold(self.count_keys, kept)
    offsets = self.offsets
    out = []
    for l in range(len(self.shapes)):
      d = self.count_keys[offsets[l] : offsets[l + 1]]
      ties = min(max(p - int(offsets[l]), 0), d.size)
      out.append(np.count_nonzero(d < np.uint32(t)) + np.count_nonzero(d[:ties] == np.uint32(t)))
    return np.asarray(out, np.int32)

  def window_counts(self, ks: np.ndarray) -> np.ndarray:
    """counts(k) for each k of ``ks`` (clipped to [0, N]): int32 [len(ks), L]; global
    rankings read the sorted prefix of the global order (grown to max(ks))."""
    ks = np.clip(np.asarray(ks, np.int64), 0, self.total)
    if self.quota is not None:
      return np.asarray(
        _quota_window_counts(self.quota, self.shapes, self.flow, ks.astype(np.int32))
      )
    prefix = self._global_prefix()
    positions = prefix.order(int(ks.max()))
    if prefix.layer_of is None or prefix.layer_of.size != positions.size:
      prefix.layer_of = (np.searchsorted(self.offsets, positions, side="right") - 1).astype(
        np.int32
      )
    lo, hi, num = int(ks.min()), int(ks.max()), len(self.shapes)
    base = np.bincount(prefix.layer_of[:lo], minlength=num)
    steps = np.zeros((hi - lo + 1, num), np.int32)
    steps[np.arange(1, hi - lo + 1), prefix.layer_of[lo:hi]] = 1
    cum = base[None, :] + np.cumsum(steps, axis=0)
    return cum[ks - lo].astype(np.int32)

  def thresholds(self, kept: int) -> tuple[np.ndarray, np.ndarray]:
    """Per layer (t_l, p_l) (uint32 [L], int32 [L]): layer l keeps the weights i with
    (key_i, i) < (t_l, p_l), the mask at ``kept`` (concrete)."""
    offsets = self.offsets
    num = len(self.shapes)
    if self._plain_global():  # one global threshold
      t, p = self._global_prefix().threshold(min(max(int(kept), 0), self.total))
      ps = np.clip(p - offsets[:-1], 0, np.diff(offsets))
      return np.full(num, t, np.uint32), ps.astype(np.int32)
    counts = self.host_counts(kept)
    ts, ps = np.zeros(num, np.uint32), np.zeros(num, np.int32)
    for l in range(num):
      ts[l], ps[l] = self._layer_prefix(l).threshold(int(counts[l]))
    return ts, ps

  def order_windows(self, lo: np.ndarray, hi: np.ndarray) -> list:
    """Per layer, the positions of layer ranks [lo_l, hi_l) as an :class:`OrderWindow`
    (indexable by layer rank like ``order[l]`` there)."""
    out = []
    for l, (a, b) in enumerate(zip(lo, hi)):
      a, b = int(a), max(int(a), int(b))
      positions = self._layer_prefix(l).order(b)[a:b] if b > a else np.zeros(0, np.int32)
      out.append(OrderWindow(a, positions, int(np.prod(self.shapes[l]))))
    return out

  def device_keys(self) -> jax.Array:
    if self._device_keys is None:
      self._device_keys = jnp.asarray(self.keys)
    return self._device_keys

  def count_device_keys(self) -> jax.Array | None:
    if self._count_device_keys is None and self.count_keys is not None:
      self._count_device_keys = (
        self.device_keys() if self.count_keys is self.keys else jnp.asarray(self.count_keys)
      )
    return self._count_device_keys

  def _layer_device_keys(self) -> list:
    offsets, d = self.offsets, self.device_keys()
    return [d[offsets[l] : offsets[l + 1]] for l in range(len(self.shapes))]

  # ------------------------------------------------------------ either
  def counts(self, kept) -> jax.Array:
    """Kept weights per layer [L] (int32) when ``kept`` are kept in all (traceable)."""
    if not _is_tracer(kept) and self.concrete:
      return jnp.asarray(self.host_counts(int(kept)))
    if self.quota is None:
      kept = jnp.asarray(kept, jnp.int32)
      return jnp.stack(
        [jnp.searchsorted(c, kept, side="left").astype(jnp.int32) for c in self.cutoffs]
      )
    return _quota_counts(self.quota, self.shapes, self.flow, kept)

  def to_tree(self, flat_leaves: Sequence[jax.Array]) -> PyTree:
    """Mask-shaped tree from per-layer flat arrays (in layer order)."""
    leaves: list = [None] * self.treedef.num_leaves
    for slot, leaf, shape in zip(self.slots, flat_leaves, self.shapes):
      leaves[slot] = leaf.reshape(shape)
    return jax.tree.unflatten(self.treedef, leaves)

  @property
  def paths(self) -> frozenset:
    """The '/'-joined paths of the leaves the ranking ranks (its prunable set)."""
    tree = jax.tree.unflatten(self.treedef, [0] * self.treedef.num_leaves)
    paths = [masks_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    return frozenset(paths[i] for i in self.slots)


class OrderWindow:
  """Layer ranks [start, start + len(positions)) of one layer's order, indexable by
  layer rank as the full order is (ranks outside the window read position 0; the
  search never uses them)."""

  def __init__(self, start: int, positions: np.ndarray, size: int):
    self.start, self.positions, self.size = start, positions, size

  def __getitem__(self, idx):
    if self.positions.size == 0:
      return np.zeros(np.shape(idx), np.int32)
    return self.positions[np.clip(idx - self.start, 0, self.positions.size - 1)]


def _order_of_keys(d: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(order, ranks) of descending keys ``d`` (traceable): a stable ascending sort."""
  order = jnp.argsort(d, stable=True).astype(jnp.int32)
  ranks = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
  return order, ranks


def _inverse(order: np.ndarray) -> np.ndarray:
  ranks = np.empty_like(order)
  ranks[order] = np.arange(order.size, dtype=order.dtype)
  return ranks


def _quota_counts(quota: str, shapes: tuple, flow: tuple, kept) -> jax.Array:
  """Per-layer kept counts of ``quota`` at ``kept`` weights in all (traceable)."""
  kept = jnp.asarray(kept, jnp.int32)
  total = int(sum(np.prod(s) for s in shapes))
  density = kept.astype(jnp.float32) / total
  if not flow or tuple(flow) == tuple(range(len(shapes))):
    return quotas_lib.layer_kept_counts(quota, density, shapes)
  counts = quotas_lib.layer_kept_counts(quota, density, tuple(shapes[i] for i in flow))
  return jnp.zeros(len(shapes), counts.dtype).at[np.asarray(flow)].set(counts)


# concrete counts: one program per quota and shapes, not an eager op per step
_quota_counts_jit = jax.jit(_quota_counts, static_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _quota_window_counts(quota: str, shapes: tuple, flow: tuple, ks):
  return jax.vmap(lambda k: _quota_counts(quota, shapes, flow, k))(ks)


def rank_scores(
  scores: PyTree, quota: str | None = None, flow: Sequence[int] | None = None
) -> Ranking:
  """Ranking of a mask-shaped tree of scores (higher score = kept first).

  ``quota=None`` ranks all layers together (global threshold); a quota name ranks
  inside each layer and takes per-layer counts from the quota. Ties are broken by
  position. Scores may be float (any width) or integer (e.g. the elimination order of
  an iterative pruner); NaN and infinite scores are refused. ``flow``: the layers in
  input-to-output order (indices into the tree order), e.g. from
  :func:`sparsejax.effective.flow_order`; default the tree order.
  """
  flat, treedef = jax.tree.flatten(scores, is_leaf=lambda x: x is None)
  slots = tuple(i for i, leaf in enumerate(flat) if leaf is not None)
  leaves = [flat[i] for i in slots]
  if not leaves:
    raise ValueError("scores has no prunable layer.")
  shapes = tuple(tuple(int(d) for d in flat[i].shape) for i in slots)
  if quota is not None:
    quotas_lib.get_quota(quota)
  flow = tuple(int(i) for i in flow) if flow is not None else ()
  if flow and sorted(flow) != list(range(len(leaves))):
    raise ValueError(f"flow={flow!r} must be a permutation of the {len(leaves)} layers.")
  device_keys, bad = selection.flat_keys(leaves)  # NaN/inf counted in the same pass
  for i, b in enumerate(bad):
    if b:
      raise ValueError(f"scores[{i}] has {b} NaN or infinite values; scores must be finite.")
  keys = np.asarray(device_keys)  # no copy on the CPU
  return Ranking(
    keys,
    shapes=shapes,
    treedef=treedef,
    slots=slots,
    quota=quota,
    flow=flow,
    count_keys=keys if quota is None else None,
    device_keys=device_keys,
  )


def masks_at(ranking: Ranking, kept) -> PyTree:
  """The mask keeping ``kept`` weights along the ranking (``kept`` may be traced)."""
  if ranking.quota is not None and not _is_tracer(kept):
    # a concrete count meets the quota's checks (e.g. beyond uniform+'s reach: raises)
    shapes = [ranking.shapes[i] for i in ranking.flow] if ranking.flow else ranking.shapes
    quotas_lib.check_density(ranking.quota, float(kept) / ranking.total, shapes)
  if ranking.concrete and not _is_tracer(kept):
    ts, ps = ranking.thresholds(int(kept))
    return ranking.to_tree(_threshold_masks(ranking.device_keys(), ts, ps, shapes=ranking.shapes))
  return _masks_at(ranking, jnp.asarray(kept, jnp.int32))


def _threshold_masks_fn(keys: jax.Array, ts, ps, shapes: tuple) -> list:
  """Per layer l (its weights in the flat ``keys``): (key_i, i) < (t_l, p_l)
  (Ranking.thresholds), shaped like the layer's kernel."""
  out = []
  sizes = tuple(int(np.prod(s)) for s in shapes)
  for l, start in enumerate(np.cumsum((0,) + sizes[:-1])):
    d = jax.lax.slice(keys, (int(start),), (int(start) + sizes[l],))
    index = jnp.arange(d.size, dtype=jnp.int32)
    out.append(((d < ts[l]) | ((d == ts[l]) & (index < ps[l]))).reshape(shapes[l]))
  return out


_threshold_masks = compilation.jit(_threshold_masks_fn, static_argnames="shapes")


def _masks_at_fn(ranking: Ranking, kept) -> PyTree:
  counts = ranking.counts(kept)
  return ranking.to_tree([r < counts[i] for i, r in enumerate(ranking.ranks)])


# jitted: one program per ranking structure instead of a comparison per layer shape
_masks_at = compilation.jit(_masks_at_fn)


def kept_for_sparsity(sparsity: float, total: int) -> int:
  """round((1 - s) N): the kept count of direct sparsity s."""
  return int(round((1.0 - float(sparsity)) * total))


def max_kept_for_sparsity(sparsity: float, total: int) -> int:
  """floor((1 - s) N): the most active weights with effective sparsity >= s."""
  return int(np.floor((1.0 - float(sparsity)) * total + 1e-6))


__all__ = [
  "Ranking",
  "OrderWindow",
  "rank_scores",
  "masks_at",
  "kept_for_sparsity",
  "max_kept_for_sparsity",
]
