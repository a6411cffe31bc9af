"""Scores + quotas -> masks, and the search for a target effective sparsity.

Every pruner is a *ranking* of the prunable weights: a mask keeps the weights of
rank < k. Global pruners rank all weights together (highest score first); quota
pruners rank inside each layer and keep round(n_l * density_l(k / N)) per layer
(see :mod:`sparsejax.quotas`). Ties are broken by position (flattened row-major,
layers in input-to-output order), so masks are deterministic and *nested* in k.

Effective pruning (method.md section 2): with E(k) the number of active weights of
the mask at k, E is non-decreasing because the masks are nested, and the answer is

    k* = max { k : E(k) <= floor((1 - s) N) },

the smallest direct sparsity whose effective sparsity is at least s: keeping one
more weight along the ranking falls below the target. The search keeps a bracket
E(lo) <= K < E(hi) and stops at hi = lo + 1. Each connectivity sweep also bounds E
for nearby k (masks are nested), which closes most of the bracket without sweeping;
proposals interpolate log E in log k. The loop body is one jitted function, run as a
``lax.while_loop`` on accelerators and stepped from the host on CPU (XLA:CPU runs
convolutions inside while-loop bodies through a much slower path, jax-ml/jax#12868).
Rankings are built once per pruner, without a sort: each score becomes an
order-preserving uint32 key (:mod:`sparsejax.selection`); a mask at a concrete count is
a per-layer threshold found by selection, and the host-stepped search sorts only the
prefixes of the order it visits. The full order is computed (one sort) only when a
ranking enters a jitted function, e.g. the device loop.

Structured pruners (``Pruner.kind`` 'channel' or 'neuron', names 'channel/l1',
'neuron/snip/igq', ...) rank whole channels instead: their ranking is a
:class:`sparsejax.structured.ChannelRanking`, a nested family of channel removals, and
:func:`masks_from_ranking` takes its member with the fewest channels removed that
reaches the target (a bisection over the channels removed; see
:mod:`sparsejax.structured`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import compilation, errors, selection
from sparsejax import effective as effective_lib
from sparsejax import masks as masks_lib
from sparsejax import quotas as quotas_lib

PyTree = Any
PRUNING_TYPES = ("direct", "effective")
#: Pruner kinds: unstructured weights, or structured channels / neurons.
KINDS = ("weights", "channel", "neuron")


@jax.tree_util.register_pytree_node_class
class Ranking:
  """A nested family of masks: layer l keeps its ``counts(k)[l]`` best weights.

  Built by :func:`rank_scores` from the scores' order-preserving keys
  (:mod:`sparsejax.selection`); the arrays below are computed (one full sort) only
  when asked for, e.g. when the ranking enters a jitted function as a pytree:
  order: per layer, flat indices best first (int32 [n_l]).
  ranks: per layer, the inverse: rank of each flat index within its layer.
  cutoffs: global rankings only: per layer, the global ranks of its weights sorted
    ascending, so that counts(k)[l] = #{w in l : global rank < k}.
  A concrete kept count needs none of them: :func:`masks_at` takes per-layer
  thresholds by selection, and the host-stepped search reads sorted prefixes
  (:class:`sparsejax.selection.Prefix`) up to the counts it visits.

  quota: None for a global ranking, else a quota name (counts from the quota).
  shapes: the prunable kernel shapes; treedef/slots rebuild the mask tree.
  flow: layer indices in input-to-output (traced data-flow) order, which quotas such as
    uniform+ (first layer dense, last at most 80% sparse) read; () = the tree order.
  keys: uint32 [N] descending keys of the flattened layers (tree order), whose order
    within each layer is the layer's order; count_keys: global rankings only: the
    [N] keys whose global order gives the per-layer counts (``keys`` itself for a
    plain global ranking; another pruner's for ``Pruner.quota_from``); device_keys,
    count_device_keys: the same as device arrays (made when first needed).

  As a pytree, a ranking built from keys has its device keys as leaves (passing it to
  a jitted function copies no order); inside a trace, ``order``, ``ranks`` and
  ``cutoffs`` are then stable sorts of the keys in the program.
  """

  def __init__(
    self,
    order=None,
    ranks=None,
    cutoffs=None,
    quota=None,
    shapes=(),
    treedef=None,
    slots=(),
    flow=(),
    *,
    keys=None,
    count_keys=None,
    device_keys=None,
    count_device_keys=None,
  ):
    self._order, self._ranks, self._cutoffs = order, ranks, cutoffs
    self.quota, self.shapes, self.treedef = quota, tuple(shapes), treedef
    self.slots, self.flow = tuple(slots), tuple(flow)
    self.keys, self.count_keys, self._device_keys = keys, count_keys, device_keys
    self._count_device_keys = count_device_keys
    self._prefixes = self._count_prefix = None

  def _from_keys(self) -> bool:
    return self.keys is not None or self._device_keys is not None

  def tree_flatten(self):
    aux = (self._from_keys(), self.quota, self.shapes, self.treedef, self.slots, self.flow)
    if aux[0]:
      return (self.device_keys(), self.count_device_keys()), aux
    return (self.order, self.ranks, self.cutoffs), aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    from_keys, *aux = aux
    if from_keys:
      return cls(None, None, None, *aux, device_keys=children[0], count_device_keys=children[1])
    return cls(*children, *aux)

  def replace(self, **changes) -> Ranking:
    fields = dict(
      order=self._order,
      ranks=self._ranks,
      cutoffs=self._cutoffs,
      quota=self.quota,
      shapes=self.shapes,
      treedef=self.treedef,
      slots=self.slots,
      flow=self.flow,
      keys=self.keys,
      count_keys=self.count_keys,
      device_keys=self._device_keys,
      count_device_keys=self._count_device_keys,
    )
    fields.update(changes)
    return Ranking(**fields)

  @property
  def total(self) -> int:
    return int(sum(np.prod(s) for s in self.shapes))

  @property
  def offsets(self) -> np.ndarray:
    """int64 [L + 1]: where each layer starts in the flat (tree-order) weights."""
    return np.concatenate([[0], np.cumsum([int(np.prod(s)) for s in self.shapes])])

  # ------------------------------------------------------------ full arrays, lazily
  @property
  def order(self) -> tuple:
    if self._order is None and self.keys is None:  # traced: sorts in the program
      self._order, self._ranks = zip(*(_order_of_keys(d) for d in self._layer_device_keys()))
    elif self._order is None:
      orders = [selection.full_order(d) for d in self.layer_keys]
      self._order = tuple(jnp.asarray(o, jnp.int32) for o in orders)
      self._ranks = tuple(jnp.asarray(_inverse(o), jnp.int32) for o in orders)
    return self._order

  @property
  def ranks(self) -> tuple:
    if self._ranks is None:
      _ = self.order
    return self._ranks

  @property
  def cutoffs(self) -> tuple | None:
    if (
      self._cutoffs is None and self.count_keys is None and self._count_device_keys is not None
    ):  # traced: sorts in the program
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
  def selects(self) -> bool:
    """Whether concrete kept counts are served by selection (keys are held)."""
    return self.keys is not None

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
    return self.quota is None and self.keys is not None and self.count_keys is self.keys

  def host_counts(self, kept: int) -> np.ndarray:
    """counts(kept) as int32 [L] numpy, by selection (concrete ``kept``)."""
    kept = int(kept)
    if self.quota is not None or self.count_keys is None:
      return np.asarray(self.counts(kept))
    total = self.total
    kept = min(max(kept, 0), total)
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
    if self.quota is not None or self.count_keys is None:
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
    """Per layer, the positions of layer ranks [lo_l, hi_l) as a
    :class:`_OrderWindow` (indexable by layer rank like ``order[l]`` there)."""
    out = []
    for l, (a, b) in enumerate(zip(lo, hi)):
      a, b = int(a), max(int(a), int(b))
      positions = self._layer_prefix(l).order(b)[a:b] if b > a else np.zeros(0, np.int32)
      out.append(_OrderWindow(a, positions, int(np.prod(self.shapes[l]))))
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
    if self.quota is None:
      if self.selects and not isinstance(kept, jax.core.Tracer):
        return jnp.asarray(self.host_counts(int(kept)))
      kept = jnp.asarray(kept, jnp.int32)
      return jnp.stack(
        [jnp.searchsorted(c, kept, side="left").astype(jnp.int32) for c in self.cutoffs]
      )
    if isinstance(kept, jax.core.Tracer):
      return _quota_counts(self.quota, self.shapes, self.flow, kept)
    return _quota_counts_jit(self.quota, self.shapes, self.flow, np.int32(kept))

  def to_tree(self, flat_leaves: Sequence[jax.Array]) -> PyTree:
    """Mask-shaped tree from per-layer flat arrays (in layer order)."""
    leaves: list = [None] * self.treedef.num_leaves
    for slot, leaf, shape in zip(self.slots, flat_leaves, self.shapes):
      leaves[slot] = leaf.reshape(shape)
    return jax.tree.unflatten(self.treedef, leaves)


def _order_of_keys(d: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(order, ranks) of descending keys ``d`` (traceable): a stable ascending sort."""
  order = jnp.argsort(d, stable=True).astype(jnp.int32)
  ranks = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
  return order, ranks


class _OrderWindow:
  """Layer ranks [start, start + len(positions)) of one layer's order, indexable by
  layer rank as the full order is (ranks outside the window read position 0; the
  search never uses them)."""

  def __init__(self, start: int, positions: np.ndarray, size: int):
    self.start, self.positions, self.size = start, positions, size

  def __getitem__(self, idx):
    if self.positions.size == 0:
      return np.zeros(np.shape(idx), np.int32)
    return self.positions[np.clip(idx - self.start, 0, self.positions.size - 1)]


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


def check_scores(scores: Sequence[jax.Array], name: str = "scores") -> None:
  for i, s in enumerate(scores):
    if jnp.issubdtype(s.dtype, jnp.integer):
      continue
    finite = np.isfinite(np.asarray(s))  # on the host: no program per leaf shape
    if not finite.all():
      bad = int(np.count_nonzero(~finite))
      raise ValueError(f"{name}[{i}] has {bad} NaN or infinite values; scores must be finite.")


@jax.jit
def _order(flat_scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Indices sorted by descending score, ties by position; and the inverse.

  Integer scores (e.g. elimination orders of iterative pruners) are sorted exactly.
  """
  keys = (
    flat_scores
    if jnp.issubdtype(flat_scores.dtype, jnp.integer)
    else flat_scores.astype(jnp.float32)
  )
  order = jnp.argsort(-keys, stable=True).astype(jnp.int32)
  ranks = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
  return order, ranks


def _sort_desc_host(keys: np.ndarray) -> np.ndarray:
  """Indices of ``keys`` (float of any width, or int32; 1-D) by descending value, ties
  by index: one sort of packed uint64 keys (order-preserving 32-bit key << 32 | index),
  :func:`sparsejax.selection.full_order`."""
  return selection.full_order(selection.descending_keys(keys))


def _inverse(order: np.ndarray) -> np.ndarray:
  ranks = np.empty_like(order)
  ranks[order] = np.arange(order.size, dtype=order.dtype)
  return ranks


def _rank_host(leaves: list, quota: str | None):
  """(order, ranks, cutoffs) per layer, computed with numpy on the host."""
  host = [np.asarray(jax.device_get(x)).reshape(-1) for x in leaves]
  if quota is not None:
    orders = [_sort_desc_host(x) for x in host]
    return orders, [_inverse(o) for o in orders], None
  sizes = np.array([x.size for x in host])
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  order = _sort_desc_host(np.concatenate(host))
  layer_of = np.repeat(np.arange(len(host), dtype=np.uint16), sizes)[order]
  by_layer = np.argsort(layer_of, kind="stable").astype(np.int32)  # radix sort on uint16
  orders, ranks, cutoffs = [], [], []
  for l in range(len(host)):
    positions = by_layer[offsets[l] : offsets[l + 1]]  # global ranks of layer l, ascending
    orders.append((order[positions] - offsets[l]).astype(np.int32))
    ranks.append(_inverse(orders[-1]))
    cutoffs.append(positions)
  return orders, ranks, cutoffs


def _rank_device(leaves: list, quota: str | None):
  """(order, ranks, cutoffs) per layer, computed with jitted sorts on the device."""
  flat = [x.reshape(-1) for x in leaves]
  orders, ranks = zip(*(_order(x) for x in flat))
  cutoffs = None
  if quota is None:
    _, global_ranks = _order(jnp.concatenate(flat))
    splits = np.cumsum([x.size for x in flat])[:-1]
    cutoffs = [jnp.sort(r) for r in jnp.split(global_ranks, splits)]
  return orders, ranks, cutoffs


SORTS = ("auto", "select", "host", "device")


def rank_scores(
  scores: PyTree, quota: str | None = None, sort: str = "auto", flow: Sequence[int] | None = None
) -> Ranking:
  """Ranking of a mask-shaped tree of scores (higher score = kept first).

  ``quota=None`` ranks all layers together (global threshold); a quota name ranks
  inside each layer and takes per-layer counts from the quota. Ties are broken by
  position: a stable sort of -score over the flattened layers. ``sort``: 'select'
  (the default 'auto': order-preserving keys only, O(N); masks and the search select
  what they need, :mod:`sparsejax.selection`), or a full sort up front: 'host' (numpy)
  or 'device' (jitted sorts). All give the same masks.
  ``flow``: the layers in input-to-output order (indices into the tree order), e.g.
  from :func:`layer_flow`; default the tree order.
  """
  flat, treedef = jax.tree.flatten(scores, is_leaf=lambda x: x is None)
  slots = tuple(i for i, leaf in enumerate(flat) if leaf is not None)
  leaves = [flat[i] for i in slots]
  if not leaves:
    raise ValueError("scores has no prunable layer.")
  shapes = tuple(tuple(int(d) for d in flat[i].shape) for i in slots)
  if quota is not None:
    quotas_lib.get_quota(quota)
  if sort not in SORTS:
    raise ValueError(f"sort={sort!r} is not allowed; allowed: {', '.join(SORTS)}.")
  flow = tuple(int(i) for i in flow) if flow is not None else ()
  if flow and sorted(flow) != list(range(len(leaves))):
    raise ValueError(f"flow={flow!r} must be a permutation of the {len(leaves)} layers.")
  if sort in ("auto", "select"):
    device_keys, bad = selection.flat_keys(leaves)  # NaN/inf counted in the same pass
    for i, b in enumerate(bad):
      if b:
        raise ValueError(f"scores[{i}] has {b} NaN or infinite values; scores must be finite.")
    keys = np.asarray(device_keys)  # no copy on the CPU
    return Ranking(
      None,
      None,
      None,
      quota,
      shapes,
      treedef,
      slots,
      flow,
      keys=keys,
      count_keys=keys if quota is None else None,
      device_keys=device_keys,
    )
  check_scores(leaves)
  orders, ranks, cutoffs = (_rank_host if sort == "host" else _rank_device)(leaves, quota)
  to_device = lambda xs: tuple(jnp.asarray(x, jnp.int32) for x in xs)
  return Ranking(
    to_device(orders),
    to_device(ranks),
    None if cutoffs is None else to_device(cutoffs),
    quota,
    shapes,
    treedef,
    slots,
    flow,
  )


def _flat_masks_at(ranking: Ranking, kept) -> list[jax.Array]:
  counts = ranking.counts(kept)
  return [r < counts[i] for i, r in enumerate(ranking.ranks)]


def masks_at(ranking: Ranking, kept) -> PyTree:
  """The mask keeping ``kept`` weights along the ranking (``kept`` may be traced)."""
  if ranking.quota is not None and not isinstance(kept, jax.core.Tracer):
    # a concrete count meets the quota's checks (e.g. beyond uniform+'s reach: raises)
    shapes = [ranking.shapes[i] for i in ranking.flow] if ranking.flow else ranking.shapes
    quotas_lib.check_density(ranking.quota, float(kept) / ranking.total, shapes)
  if ranking.selects and not isinstance(kept, jax.core.Tracer):
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
  return ranking.to_tree(_flat_masks_at(ranking, kept))


# jitted: one program per ranking structure instead of a comparison per layer shape
_masks_at = compilation.jit(_masks_at_fn)


def kept_for_sparsity(sparsity: float, total: int) -> int:
  """round((1 - s) N): the kept count of direct sparsity s."""
  return int(round((1.0 - float(sparsity)) * total))


def max_kept_for_sparsity(sparsity: float, total: int) -> int:
  """floor((1 - s) N): the most active weights with effective sparsity >= s."""
  return int(np.floor((1.0 - float(sparsity)) * total + 1e-6))


#: How far along the ranking (in weights) the search's bounds look from a sweep.
BOUND_WINDOW = 1 << 14


def _sweep_at(sweep: Callable, ranking: Ranking, kept):
  """(E(k), active per layer, potential per layer), all flat."""
  conn = sweep(masks_at(ranking, kept))
  eff = [m.reshape(-1) for m in masks_lib.mask_leaves(conn.masks)]
  pot = [m.reshape(-1) for m in masks_lib.mask_leaves(conn.potential)]
  return sum(jnp.sum(m, dtype=jnp.int32) for m in eff), eff, pot


def _prefix_along_ranking(order: Sequence, flags: Sequence, start, step: int, width: int, xp=jnp):
  """Per layer l, prefix sums [L, width + 1] of flags[l] at the weights of layer ranks
  start[l], start[l] + step, ... (step = +1 forward, -1 backward), zero off the layer.
  ``xp``: jax.numpy (traceable) or numpy (the host driver, nothing to compile)."""
  hits = []
  for l, (o, flag) in enumerate(zip(order, flags)):
    idx = start[l] + step * xp.arange(width, dtype=xp.int32)
    valid = (idx >= 0) & (idx < o.size)
    hits.append(xp.where(valid, flag[o[xp.clip(idx, 0, o.size - 1)]], False))
  sums = xp.cumsum(xp.stack(hits), axis=1, dtype=xp.int32)
  return xp.concatenate([xp.zeros((len(hits), 1), xp.int32), sums], axis=1)


def _gathered(prefix, steps, width: int, xp=jnp):
  """sum_l prefix[l, steps[..., l]] (steps clipped to [0, width]); steps [..., L]."""
  return xp.sum(prefix[xp.arange(prefix.shape[0]), xp.clip(steps, 0, width)], axis=-1)


def _window(k, width: int, xp=jnp):
  """[k, k + 1 .. k + width, k - 1 .. k - width]: the kept counts one sweep bounds."""
  steps = xp.arange(1, width + 1, dtype=xp.int32)
  return xp.concatenate([xp.reshape(k, (1,)).astype(xp.int32), k + steps, k - steps])


def _initial_state(total: int, xp=jnp) -> tuple:
  """(lo, E(lo), lo swept, hi, E(hi) or -1, Illinois weights of lo and hi, the last two
  bracket widths, sweeps) before any sweep."""
  big = xp.int32(2 * total + 2)
  return (
    xp.int32(0),
    xp.int32(0),
    xp.bool_(False),
    xp.int32(total),
    xp.int32(-1),
    xp.float32(1.0),
    xp.float32(1.0),
    big,
    big,
    xp.int32(0),
  )


def _search_cond(state):
  lo, _, _, hi, e_hi, *_ = state
  return (hi - lo > 1) | ((e_hi < 0) & (lo < hi))


def _propose(state, target):
  """The next kept count to sweep (int32, traceable): the fixed-point step k T / E(k)
  until the target is bracketed, then Illinois regula falsi on log E against log k,
  or the midpoint after a step that did not halve the bracket."""
  lo, e_lo, _, hi, e_hi, w_lo, w_hi, width_1, _, _ = state
  target = jnp.asarray(target, jnp.int32)
  log_t = jnp.log(target.astype(jnp.float32) + 0.5)
  have_hi = e_hi >= 0
  lo_f, hi_f = jnp.float32(lo), jnp.float32(hi)
  k_fixed = jnp.where(
    e_lo > 0, lo_f * (target + 0.5) / jnp.maximum(e_lo, 1) * 1.02, 2.0 * lo_f + 1.0
  )
  f_lo = (jnp.log(jnp.maximum(e_lo, 1).astype(jnp.float32)) - log_t) * w_lo
  f_hi = (jnp.log(jnp.maximum(e_hi, 1).astype(jnp.float32)) - log_t) * w_hi
  t_log = jnp.clip(-f_lo / jnp.maximum(f_hi - f_lo, 1e-12), 0.0, 1.0)
  log_lo = jnp.log(jnp.maximum(lo_f, 1.0))
  k_log = jnp.exp(log_lo + t_log * (jnp.log(hi_f) - log_lo))
  t_lin = (target + 0.5 - e_lo) / jnp.maximum(e_hi - e_lo, 1).astype(jnp.float32)
  k_lin = lo_f + jnp.clip(t_lin, 0.0, 1.0) * (hi_f - lo_f)
  k_interp = jnp.where(e_lo > 0, k_log, k_lin)
  span = hi - lo
  use_mid = have_hi & (2 * span > width_1)
  k = jnp.where(use_mid, (lo_f + hi_f) / 2, jnp.where(have_hi, k_interp, k_fixed))
  return jnp.clip(jnp.round(k), lo_f + 1, jnp.where(have_hi, hi_f - 1, hi_f)).astype(jnp.int32)


_propose_jit = jax.jit(_propose)


def _search_update(state, k, e, eff, pot, counts, order, target, total: int, first=False, xp=jnp):
  """The state after the sweep at k: E(k) = e, ``eff``/``pot`` its flat effective and
  potential masks per layer, ``counts`` = ranking.counts at :func:`_window` (k) [2W+1, L].

  The sweep gives, for free, bounds for nearby k' along the ranking (masks are nested):
  E(k') >= e + #{added weights live at k} for k' > k, E(k') <= e - #{removed weights
  active at k} for k' < k. They are monotone in k', so the first candidate of the
  window that passes is what a bisection would find; it moves the other end of the
  bracket without sweeping.
  """
  lo, e_lo, exact_lo, hi, e_hi, w_lo, w_hi, width_1, _, n = state
  width = (counts.shape[0] - 1) // 2
  steps = xp.arange(1, width + 1, dtype=xp.int32)
  below = e <= target
  have_hi = e_hi >= 0
  counts_k, counts_up, counts_down = counts[0], counts[1 : width + 1], counts[width + 1 :]
  # k is below: lower bound E(k') >= e + live weights added between k and k'.
  live_prefix = _prefix_along_ranking(order, pot, counts_k, 1, width, xp)
  lower = e + _gathered(live_prefix, counts_up - counts_k, width, xp)  # at k + steps
  k_hi = xp.minimum(k + width, xp.where(have_hi, hi, total))
  over = (k + steps <= k_hi) & (lower > target)
  first_over = xp.argmax(over)
  found_hi = below & over[first_over]
  # k is above: upper bound E(k') <= e - active weights removed between k' and k.
  act_prefix = _prefix_along_ranking(order, eff, counts_k - 1, -1, width, xp)
  upper = e - _gathered(act_prefix, counts_k - counts_down, width, xp)  # at k - steps
  # Largest k' in [max(k - width, lo), k) with upper(k') <= T.
  fits = (k - steps >= xp.maximum(k - width, lo)) & (upper <= target)
  first_fit = xp.argmax(fits)
  new_lo = k - steps[first_fit]
  found_lo = ~below & fits[first_fit] & (new_lo > lo)
  lo2 = xp.where(below, k, xp.where(found_lo, new_lo, lo))
  e_lo2 = xp.where(below, e, xp.where(found_lo, upper[first_fit], e_lo))
  exact2 = xp.where(below, True, xp.where(found_lo, False, exact_lo))
  hi2 = xp.where(below, xp.where(found_hi, k + steps[first_over], hi), k)
  e_hi2 = xp.where(below, xp.where(found_hi, lower[first_over], e_hi), e)
  # The end that stays twice in a row has its f value halved (Illinois rule).
  big = 2 * total + 2
  i32, f32 = xp.int32, xp.float32
  return (
    i32(lo2),
    i32(e_lo2),
    xp.bool_(exact2),
    i32(hi2),
    i32(e_hi2),
    f32(xp.where(below | first, 1.0, 0.5 * w_lo)),
    f32(xp.where(below & ~xp.bool_(first), 0.5 * w_hi, 1.0)),
    i32(xp.where(have_hi, hi - lo, big)),
    i32(width_1),
    i32(n + 1),
  )


def _search_parts(sweep: Callable, ranking: Ranking, target_kept) -> _SearchParts:
  """The search for the largest k with E(k) <= target_kept, as loop parts.

  The bracket E(lo) <= T < E(hi) is the only thing exactness rests on; every step
  keeps it:
  - The first sweep is at k = T (E(T) <= T for global rankings, where E(k) <= k);
    hi = N is swept only if reached; a lower end never swept is swept at the end.
  - A sweep at k bounds E for nearby k (:func:`_search_update`), which closes most
    of the bracket without sweeping.
  - Proposals (:func:`_propose`): the fixed-point step k T / E(k) until the target is
    bracketed, then Illinois regula falsi on log E against log k, with a bisection
    step right after any step that did not halve the bracket (E jumps where one
    weight reconnects many, and interpolation cannot locate a jump).
  """
  total = ranking.total
  width = min(BOUND_WINDOW, total)
  target = jnp.asarray(target_kept, jnp.int32)

  def swept(state, k, first=False):
    e, eff, pot = _sweep_at(sweep, ranking, k)
    counts = jax.vmap(ranking.counts)(_window(k, width))
    return _search_update(state, k, e, eff, pot, counts, ranking.order, target, total, first)

  def init():
    # Sweep at k = T first: usually E(T) <= T and T is the lower end. (Not always:
    # with quotas the rounded layer counts can sum to more than k.) Otherwise the
    # lower end starts at 0, unswept, and is confirmed by a sweep at the end.
    return swept(_initial_state(total), jnp.clip(target, 0, total), first=True)

  def body(state):
    return swept(state, _propose(state, target))

  def finish(state):
    lo, e_lo, exact, *_, n = state
    # A lower end set by a bound carries an upper estimate of E: sweep it once.
    e_lo, n = jax.lax.cond(
      exact, lambda: (e_lo, n), lambda: (_sweep_at(sweep, ranking, lo)[0], n + 1)
    )
    return lo, e_lo, n

  return _SearchParts(init, _search_cond, body, finish)


class _SearchParts(NamedTuple):
  init: Callable
  cond: Callable
  body: Callable
  finish: Callable


def search_effective(
  sweep: Callable, ranking: Ranking, target_kept
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Largest k with E(k) <= target_kept as one ``lax.while_loop`` (jit-able).

  Returns (k, E(k), sweeps evaluated). See :func:`_search_parts` for the method.
  """
  parts = _search_parts(sweep, ranking, target_kept)
  return parts.finish(jax.lax.while_loop(parts.cond, parts.body, parts.init()))


LOOPS = ("auto", "device", "host")


@functools.lru_cache(maxsize=32)
def _jitted_search(traced, loop: str):
  if loop == "device":
    sweep = effective_lib.sweep_of(traced, units=False)
    return jax.jit(functools.partial(search_effective, sweep))
  # Host-driven: XLA:CPU runs convolutions inside while-loop bodies through a far
  # slower path (jax-ml/jax#12868; 10-20x measured here on ResNet-18). Each step runs
  # the model's one compiled connectivity sweep (the program effective_masks and
  # active_units run) on the jitted masks_at; the bracket is updated with numpy and
  # the proposal is one tiny jitted program, so that nothing else is compiled per
  # model. Both drivers compute identical steps.
  return functools.partial(_host_search, effective_lib.compiled_sweep(traced))


@jax.jit
def _window_counts(ranking: Ranking, k):
  return jax.vmap(ranking.counts)(_window(k, min(BOUND_WINDOW, ranking.total)))


def _host_search(sweep: Callable, ranking: Ranking, target) -> tuple[int, int, int]:
  """:func:`search_effective` stepped from the host."""
  target, total = int(target), ranking.total
  width = min(BOUND_WINDOW, total)
  if ranking.selects:
    # Counts and orders by selection: the sorted prefixes reach only as far along the
    # ranking as the visited windows [k - width, k + width] do.
    def window_counts(k):
      return ranking.window_counts(_window(np.int32(k), width, np))

    def orders(counts):  # the layer ranks _search_update reads, per layer
      lo = np.maximum(counts.min(axis=0), counts[0] - width)
      hi = np.minimum(counts.max(axis=0), counts[0] + width)
      return ranking.order_windows(lo, hi)
  else:
    order = [np.asarray(o) for o in ranking.order]
    orders = lambda counts: order
    if ranking.quota is None:  # global: counts(k) = #{cutoffs < k}, a host searchsorted
      cutoffs = [np.asarray(c) for c in ranking.cutoffs]
      window_counts = lambda k: np.stack(
        [np.searchsorted(c, _window(np.int32(k), width, np), side="left") for c in cutoffs], axis=1
      ).astype(np.int32)
    else:
      window_counts = lambda k: np.asarray(_window_counts(ranking, np.int32(k)))
  state = _initial_state(total, np)
  k = min(max(target, 0), total)
  first = True
  while True:
    counts = window_counts(k)
    windows = orders(counts)  # first: the masks then read thresholds off the prefixes
    conn = sweep(masks_at(ranking, k))
    eff = [np.asarray(m).reshape(-1) for m in masks_lib.mask_leaves(conn.masks)]
    pot = [np.asarray(m).reshape(-1) for m in masks_lib.mask_leaves(conn.potential)]
    e = sum(int(np.count_nonzero(m)) for m in eff)
    state = _search_update(
      state, np.int32(k), np.int32(e), eff, pot, counts, windows, np.int32(target), total, first, np
    )
    first = False
    if not _search_cond(state):
      break
    k = int(_propose_jit(state, target))
  lo, e_lo, exact, *_, n = (int(v) for v in state)
  if not exact:  # as finish(), without a sweep inside lax.cond
    return lo, masks_lib.count(sweep(masks_at(ranking, lo)).masks)[0], n + 1
  return lo, e_lo, n


def effective_kept(
  model, ranking: Ranking, target_kept: int, input_shape, loop: str = "auto", **trace_kw
) -> tuple[int, int, int]:
  """(k, active weights at k, sweeps evaluated) for the largest k meeting the target.

  model, input_shape, ``trace_kw`` (variables=, params=, apply_kwargs=): as
  :func:`sparsejax.effective.trace`. loop: 'device' runs the search as one
  ``lax.while_loop``; 'host' steps the same jitted body from Python (faster on
  XLA:CPU, see _jitted_search); 'auto' picks 'host' on CPU and 'device' elsewhere.
  """
  if loop not in LOOPS:
    raise ValueError(f"loop={loop!r} is not allowed; allowed: {', '.join(LOOPS)}.")
  if loop == "auto":
    loop = "host" if jax.default_backend() == "cpu" else "device"
  traced = effective_lib.trace(model, input_shape, **_with_ranking_prunable(ranking, trace_kw))
  k, e, n = _jitted_search(traced, loop)(ranking, jnp.int32(target_kept))
  return int(k), int(e), int(n)


def masks_from_ranking(
  ranking: Ranking,
  sparsity: float,
  pruning_type: str = "direct",
  *,
  model=None,
  input_shape=None,
  **trace_kw,
) -> PyTree:
  """Masks at direct sparsity ``sparsity``, or at the smallest direct sparsity whose
  effective sparsity is at least ``sparsity`` (``pruning_type='effective'``; ``model``,
  ``input_shape`` and ``trace_kw`` as :func:`sparsejax.effective.trace`). A
  :class:`sparsejax.structured.ChannelRanking` gives the member with the fewest
  channels removed whose direct (effective) sparsity is at least ``sparsity``."""
  if not isinstance(ranking, Ranking):
    structured = _structured_lib()
    if isinstance(ranking, structured.ChannelRanking):
      return structured.masks_for_target(
        ranking, sparsity, pruning_type, input_shape=input_shape, **trace_kw
      )
    raise ValueError(
      f"ranking={type(ranking).__name__} is not a Ranking (from rank_scores or ranking_for)."
    )
  sparsity = masks_lib.check_sparsity(sparsity)
  check_pruning_type(pruning_type)
  if pruning_type == "direct":
    return masks_at(ranking, kept_for_sparsity(sparsity, ranking.total))
  target = max_kept_for_sparsity(sparsity, ranking.total)
  if model is None or input_shape is None:
    raise ValueError(
      "pruning_type='effective' needs model= and input_shape= for the connectivity sweep."
    )
  k, e, _ = effective_kept(model, ranking, target, input_shape, **trace_kw)
  if e == 0 or e > target:
    smallest = _smallest_connected(model, ranking, input_shape, **trace_kw)
    raise errors.UnreachableSparsityError(
      f"sparsity={sparsity!r} (effective) cannot be reached: along this ranking every "
      f"connected mask keeps more than {target} weights; the largest reachable effective "
      f"sparsity is {1 - smallest / ranking.total:.6g} (compression "
      f"{ranking.total / smallest:.4g}x).",
      sparsity=sparsity,
      max_sparsity=1 - smallest / ranking.total,
    )
  return masks_at(ranking, k)


def _ranking_prunable(ranking: Ranking) -> frozenset:
  """The '/'-joined paths of the leaves a ranking ranks."""
  tree = jax.tree.unflatten(ranking.treedef, [0] * ranking.treedef.num_leaves)
  paths = [masks_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  return frozenset(paths[i] for i in ranking.slots)


def _with_ranking_prunable(ranking: Ranking, trace_kw: dict) -> dict:
  """``trace_kw`` with the ranking's leaves as the prunable set unless one is given."""
  if trace_kw.get("prunable") is not None:
    return trace_kw
  return dict(trace_kw, prunable=_ranking_prunable(ranking))


def _smallest_connected(model, ranking: Ranking, input_shape, **trace_kw) -> int:
  """Fewest active weights of any connected mask along the ranking."""
  trace_kw = _with_ranking_prunable(ranking, trace_kw)
  # largest k still disconnected
  k, e, _ = effective_kept(model, ranking, 0, input_shape, **trace_kw)
  if e > 0:  # even the first mask of the family is connected (e.g. uniform+)
    return e
  sweep = effective_lib.compiled_sweep(effective_lib.trace(model, input_shape, **trace_kw))
  return masks_lib.count(sweep(masks_at(ranking, k + 1)).masks)[0]


# ---------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class ScoreContext:
  """What a pruner's score function may read (:attr:`Pruner.score`).

  key: PRNG key for random scores. model, variables: a Flax module and its variables
  ({'params': ..., 'batch_stats': ...}) at initialization, or a function
  ``apply(params, x)`` and its params. sparsity: the target (iterative pruners prune
  towards it). input_shape: one example's shape or an example input (SynFlow's
  all-ones input). batches: batches for data-driven scores. trained_params: params
  after dense training (magnitude, LAMP). rounds: rounds of an iterative pruner.
  score_kwargs: extra keyword arguments for the score function. loss: the user's
  ``loss(params, batch) -> scalar`` for data-driven scores (None: the image/label
  cross-entropy of a Flax module). apply_kwargs: keyword arguments of the model's
  call (e.g. {'train': False}). prunable: the '/'-joined paths of the prunable leaves
  (the linear-op weights of the traced program, narrowed by the caller's predicate);
  a score tree has arrays exactly there (``masks.map_prunable(fn, c.params,
  prunable=c.prunable)``).
  """

  key: jax.Array
  model: Any
  variables: PyTree
  sparsity: float
  input_shape: tuple | None = None
  batches: Any = None
  trained_params: PyTree = None
  rounds: int | None = None
  score_kwargs: dict = dataclasses.field(default_factory=dict)
  loss: Callable | None = None
  apply_kwargs: dict | None = None
  prunable: frozenset | None = None

  @property
  def params(self) -> PyTree:
    return _params_of(self.model, self.variables)

  def data_kwargs(self, who: str) -> dict:
    """Keyword arguments of a data-driven score: score_kwargs, the user's loss and the
    prunable set."""
    kw = dict(self.score_kwargs, prunable=self.prunable)
    if self.loss is not None:
      kw["loss"] = self.loss
    elif not isinstance(self.model, nn.Module):
      raise ValueError(
        f"pruner {who!r} on a function model needs loss= (a function "
        "loss(params, batch) -> scalar over your batches)."
      )
    return kw


ScoreFn = Callable[[ScoreContext], PyTree]


@dataclasses.dataclass(frozen=True)
class Pruner:
  """A named pruner: a score function over one hook, and how layers share the budget.

  Attributes:
    name: registry name, e.g. 'random/igq' ('/' separates a score from its quota).
    score: ``ScoreContext -> score tree`` shaped like the masks (higher = kept
      first; int32 priorities for iterative pruners); None only for 'dense'.
    quota: None for one global ranking, or a quota name (:mod:`sparsejax.quotas`).
    quota_from: the name of another pruner whose global ranking gives the per-layer
      kept counts; weights are then ranked inside each layer by ``score`` (the
      paper's random/snip and random/synflow).
    iterative: the score function prunes towards the target in rounds, so its
      ranking depends on the target sparsity.
    default_rounds: rounds of an iterative pruner when none are given.
    needs_data: scores need training batches (``ScoreContext.batches``).
    after_training: scores are taken from weights after dense training (the masks
      are applied to the initial weights), as the paper does for magnitude and LAMP.
    kind: 'weights' (unstructured: ``score`` returns a score tree shaped like the
      masks) or a structured kind, 'channel' or 'neuron' (``score`` returns
      {space name: channel scores [size]}, :mod:`sparsejax.structured`; ``quota`` is a
      group quota, uniform, erk or igq, or None for one global channel ranking; the
      ranking is a :class:`sparsejax.structured.ChannelRanking`).
  """

  name: str
  score: ScoreFn | None
  quota: str | None = None
  quota_from: str | None = None
  iterative: bool = False
  default_rounds: int | None = None
  needs_data: bool = False
  after_training: bool = False
  kind: str = "weights"

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"name={self.name!r} must be a non-empty string.")
    if self.score is None and self.name != "dense":
      raise ValueError(
        f"pruner {self.name!r}: score must be a function ScoreContext -> "
        "scores (None is reserved for 'dense')."
      )
    if self.score is not None and not callable(self.score):
      raise ValueError(f"pruner {self.name!r}: score={self.score!r} is not callable.")
    if self.kind not in KINDS:
      raise ValueError(
        f"pruner {self.name!r}: kind={self.kind!r} is not allowed; allowed: {', '.join(KINDS)}."
      )
    if self.structured:
      if self.quota is not None and self.quota not in quotas_lib.GROUP_QUOTAS:
        raise ValueError(
          f"pruner {self.name!r}: quota={self.quota!r} is not a channel "
          f"quota; allowed: None (global), {', '.join(quotas_lib.GROUP_QUOTAS)}."
        )
      if self.quota_from is not None or self.iterative:
        raise ValueError(
          f"pruner {self.name!r}: a structured pruner takes neither quota_from nor iterative."
        )
    elif self.quota is not None and self.quota not in quotas_lib.QUOTAS:
      raise ValueError(
        f"pruner {self.name!r}: quota={self.quota!r} is not a quota; allowed: "
        f"None (global ranking), {', '.join(quotas_lib.QUOTAS)}."
      )
    if self.quota is not None and self.quota_from is not None:
      raise ValueError(f"pruner {self.name!r}: give quota or quota_from, not both.")
    if self.iterative and (not isinstance(self.default_rounds, int) or self.default_rounds < 1):
      raise ValueError(
        f"pruner {self.name!r}: an iterative pruner needs default_rounds, a "
        f"positive integer; got {self.default_rounds!r}."
      )

  @property
  def structured(self) -> bool:
    """It removes whole channels or neurons (kind 'channel' or 'neuron')."""
    return self.kind != "weights"

  @property
  def target_dependent(self) -> bool:
    """Its ranking depends on the target sparsity (compute one ranking per target)."""
    return self.iterative or (
      self.quota_from is not None and get_pruner(self.quota_from).target_dependent
    )


def _scores_lib():
  from sparsejax import scores  # scores builds on models, not on pruning

  return scores


def _random(c: ScoreContext):
  return _scores_lib().random(c.key, c.params, prunable=c.prunable)


def _magnitude(c: ScoreContext):
  return _scores_lib().magnitude(c.trained_params, prunable=c.prunable)


def _lamp(c: ScoreContext):
  return _scores_lib().lamp(c.trained_params, prunable=c.prunable)


def _snip(c: ScoreContext):
  return _scores_lib().snip(c.model, c.variables, c.batches, **c.data_kwargs("snip"))


def _iterative_snip(c: ScoreContext):
  return _scores_lib().iterative_snip(
    c.model, c.variables, c.batches, c.sparsity, rounds=c.rounds, **c.data_kwargs("snip/iterative")
  )


def _grasp(c: ScoreContext):
  return _scores_lib().grasp(c.model, c.variables, c.batches, **c.data_kwargs("grasp"))


def _synflow(c: ScoreContext):
  return _scores_lib().synflow(
    c.model,
    c.params,
    c.input_shape,
    c.sparsity,
    rounds=c.rounds,
    apply_kwargs=c.apply_kwargs,
    prunable=c.prunable,
    **c.score_kwargs,
  )


def _structured_lib():
  from sparsejax import structured  # structured builds on compact and scores

  return structured


def _channel_score(name: str) -> ScoreFn:
  """The score function of the structured pruner ``name``: {space: scores [size]}."""

  def score(c: ScoreContext):
    return _structured_lib().channel_scores(
      name,
      key=c.key,
      model=c.model,
      variables=c.variables,
      input_shape=c.input_shape,
      batches=c.batches,
      trained_params=c.trained_params,
      loss=c.loss,
      apply_kwargs=c.apply_kwargs,
    )

  score.__name__ = f"channel_score[{name}]"
  return score


def _structured_builtin() -> list[Pruner]:
  """'<kind>/<score>' (uniform channel quota) and '<kind>/<score>/<quota>'."""
  from sparsejax import structured

  out = []
  for name in structured.NAMES:
    kind, score, quota = structured.parse(name)
    out.append(
      Pruner(
        name,
        _channel_score(name),
        None if quota == "global" else quota,
        needs_data=score == "snip",
        after_training=score in structured.AFTER_TRAINING,
        kind=kind,
      )
    )
  return out


def _builtin() -> list[Pruner]:
  entries = [Pruner("dense", None)]
  entries += [Pruner(f"random/{q}", _random, q) for q in quotas_lib.QUOTAS]
  entries += [
    Pruner("random/snip", _random, quota_from="snip", needs_data=True),
    Pruner("random/synflow", _random, quota_from="synflow"),
    Pruner("magnitude/global", _magnitude, after_training=True),
  ]
  entries += [
    Pruner(f"magnitude/{q}", _magnitude, q, after_training=True) for q in quotas_lib.QUOTAS
  ]
  entries += [
    Pruner("lamp", _lamp, after_training=True),
    Pruner("snip", _snip, needs_data=True),
    Pruner("snip/iterative", _iterative_snip, iterative=True, default_rounds=300, needs_data=True),
    Pruner("synflow", _synflow, iterative=True, default_rounds=100),
    Pruner("grasp", _grasp, needs_data=True),
  ]
  return entries + _structured_builtin()


#: The pruner registry: name -> :class:`Pruner`. Extend it with :func:`register_pruner`.
PRUNERS: dict[str, Pruner] = {p.name: p for p in _builtin()}


def register_pruner(pruner: Pruner, *, overwrite: bool = False) -> Pruner:
  """Adds ``pruner`` to :data:`PRUNERS`; it then works with both pruning types,
  every quota and every experiment binary, by name.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparsejax import masks, pruning
    >>> def smallest_first(c):  # keeps the weights closest to zero: a toy score
    ...   return masks.map_prunable(lambda w: -jnp.abs(w), c.params, prunable=c.prunable)
    >>> _ = pruning.register_pruner(pruning.Pruner("toy/inverse", smallest_first, "erk"))
    >>> pruning.get_pruner("toy/inverse").quota
    'erk'
    >>> del pruning.PRUNERS["toy/inverse"]

  Raises:
    ValueError: the name is taken (unless ``overwrite``), or ``quota_from`` names an
      unknown pruner or one without a ranking.
  """
  if not isinstance(pruner, Pruner):
    raise ValueError(f"pruner={pruner!r} must be a sparsejax.pruning.Pruner.")
  if pruner.name in PRUNERS and not overwrite:
    raise ValueError(
      f"pruner name {pruner.name!r} is already registered; pass overwrite=True to replace it."
    )
  if pruner.quota_from is not None:
    source = get_pruner(pruner.quota_from)
    if source.score is None:
      raise ValueError(f"pruner {pruner.name!r}: quota_from={pruner.quota_from!r} has no ranking.")
  PRUNERS[pruner.name] = pruner
  return pruner


def get_pruner(name: str | Pruner) -> Pruner:
  """The registered :class:`Pruner` ``name`` (a Pruner is returned as it is)."""
  if isinstance(name, Pruner):
    return name
  if name not in PRUNERS:
    raise ValueError(f"pruner={name!r} is not a known pruner; allowed: {', '.join(PRUNERS)}.")
  return PRUNERS[name]


def check_pruning_type(pruning_type: str, name: str = "pruning_type") -> str:
  """``pruning_type`` if it is one of :data:`PRUNING_TYPES`, else ValueError."""
  if pruning_type not in PRUNING_TYPES:
    raise ValueError(
      f"{name}={pruning_type!r} is not allowed; allowed: {', '.join(PRUNING_TYPES)}."
    )
  return pruning_type


def _rounds(p: Pruner, rounds: int | None) -> int | None:
  if not p.iterative:
    return None
  rounds = p.default_rounds if rounds is None else rounds
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
    raise ValueError(f"rounds={rounds!r} must be a positive integer (pruner {p.name!r}).")
  return int(rounds)


def _params_of(model, variables) -> PyTree:
  """A Flax module's variables hold 'params'; a function's ``variables`` are its params."""
  if model is None or isinstance(model, nn.Module):
    if not hasattr(variables, "keys") or "params" not in variables:
      raise ValueError(
        "variables has no 'params' collection; pass the model's variables "
        "(e.g. model.init(...)), or a function apply(params, x) as model= "
        "with its params as variables=."
      )
    return variables["params"]
  return variables


def _trace_kw(model, variables, apply_kwargs, prunable=None) -> dict:
  kw = {"apply_kwargs": apply_kwargs} if apply_kwargs else {}
  if prunable is not None:
    kw["prunable"] = prunable
  if isinstance(model, nn.Module):
    kw["variables"] = variables
  else:
    kw["params"] = variables
  return kw


def prunable_set(
  model,
  variables: PyTree,
  input_shape=None,
  *,
  prunable: masks_lib.Prunable = None,
  apply_kwargs: dict | None = None,
) -> frozenset:
  """The '/'-joined paths of the leaves a pruner prunes.

  With an example input: the parameters the traced program uses as linear-op weights
  (:func:`sparsejax.effective.trace`), narrowed by ``prunable`` (a predicate on the
  path or a collection of paths). Without one: :func:`sparsejax.masks.selector`'s
  rule on the params (leaves named 'kernel' with >= 2 axes by default).
  """
  if input_shape is not None and model is not None:
    return frozenset(
      effective_lib.prunable_paths(
        model, input_shape, **_trace_kw(model, variables, apply_kwargs, prunable)
      )
    )
  chosen = frozenset(masks_lib.prunable_paths(_params_of(model, variables), prunable))
  if not chosen:
    raise ValueError(f"prunable={prunable!r} selects no parameter of the model.")
  return chosen


def _check_score_leaves(scores: PyTree, chosen: frozenset, who: str) -> None:
  flat = jax.tree_util.tree_leaves_with_path(scores, is_leaf=lambda x: x is None)
  got = frozenset(masks_lib.path_str(p) for p, s in flat if s is not None)
  if got != chosen:
    raise ValueError(
      f"pruner {who!r} scored {sorted(got - chosen)[:3]} and not "
      f"{sorted(chosen - got)[:3]}; a score tree has arrays exactly at the "
      "prunable leaves (ScoreContext.prunable)."
    )


def ranking_for(
  pruner: str | Pruner,
  *,
  key: jax.Array,
  model,
  variables: PyTree,
  sparsity: float,
  input_shape=None,
  batches=None,
  trained_params=None,
  rounds: int | None = None,
  score_kwargs: dict | None = None,
  loss: Callable | None = None,
  apply_kwargs: dict | None = None,
  prunable: masks_lib.Prunable = None,
) -> Ranking:
  """The ranking of ``pruner`` (scores computed once; iterative pruners run to
  ``sparsity`` in ``rounds`` rounds, default the pruner's, and rank the eliminated
  weights by elimination order).

  ``model``: a Flax module with its ``variables``, or a function ``apply(params, x)``
  with its params as ``variables``. ``input_shape`` (one example's shape, or an example
  input) also gives the layers' input-to-output order that quotas such as uniform+
  read (without it: the params' tree order). ``loss(params, batch) -> scalar`` over
  the user's ``batches`` replaces the image/label cross-entropy of SNIP, iterative
  SNIP and GraSP. ``prunable``: narrows the prunable leaves (:func:`prunable_set`),
  e.g. ``lambda path: not path.startswith('head/')`` to keep a classifier dense.

  A structured pruner (``p.structured``) returns a
  :class:`sparsejax.structured.ChannelRanking` instead (zoo models only; ``prunable``
  and ``score_kwargs`` are not taken), which :func:`masks_from_ranking` accepts too.
  """
  p = get_pruner(pruner)
  if p.score is None:
    raise ValueError(f"pruner={p.name!r} has no ranking: it keeps every weight.")
  score_kwargs = dict(score_kwargs or {})
  if "rounds" in score_kwargs:  # rounds given the way older code gave it
    if rounds is not None:
      raise ValueError("give rounds= or score_kwargs['rounds'], not both.")
    rounds = score_kwargs.pop("rounds")
  if p.needs_data and not batches:
    raise ValueError(
      f"pruner={p.name!r} scores weights on training data: pass batches= "
      "(from the dataset pipeline or synthetic data)."
    )
  if p.after_training and trained_params is None:
    raise ValueError(
      f"pruner={p.name!r} scores the weights after dense training: pass "
      "trained_params= (the final params of a --pruner=dense run)."
    )
  if p.structured:
    return _channel_ranking(
      p,
      key=key,
      model=model,
      variables=variables,
      sparsity=sparsity,
      input_shape=input_shape,
      batches=batches,
      trained_params=trained_params,
      score_kwargs=score_kwargs,
      loss=loss,
      apply_kwargs=apply_kwargs,
      prunable=prunable,
    )
  chosen = prunable_set(model, variables, input_shape, prunable=prunable, apply_kwargs=apply_kwargs)
  context = ScoreContext(
    key=key,
    model=model,
    variables=variables,
    sparsity=masks_lib.check_sparsity(sparsity),
    input_shape=input_shape,
    batches=batches,
    trained_params=trained_params,
    rounds=_rounds(p, rounds),
    score_kwargs=score_kwargs,
    loss=loss,
    apply_kwargs=apply_kwargs,
    prunable=chosen,
  )
  flow = None
  if input_shape is not None and model is not None:
    flow = effective_lib.flow_order(
      model, input_shape, **_trace_kw(model, variables, apply_kwargs, chosen)
    )
  if p.quota_from is not None:
    # Per-layer counts from the source pruner's global ranking, `score` within layers.
    source = get_pruner(p.quota_from)
    source_context = dataclasses.replace(context, rounds=_rounds(source, None), score_kwargs={})
    _check_context(source, source_context)
    global_ranking = rank_scores(_scored(source, source_context), flow=flow)
    within = rank_scores(_scored(p, context), quota="uniform", flow=flow)
    return Ranking(
      None,
      None,
      None,
      None,
      within.shapes,
      within.treedef,
      within.slots,
      flow or (),
      keys=within.keys,
      count_keys=global_ranking.count_keys,
      device_keys=within.device_keys(),
      count_device_keys=global_ranking.device_keys(),
    )
  _check_context(p, context)
  return rank_scores(_scored(p, context), quota=p.quota, flow=flow)


def _channel_ranking(p: Pruner, *, prunable, score_kwargs, **context_kw):
  """The :class:`sparsejax.structured.ChannelRanking` of a structured pruner."""
  structured = _structured_lib()
  model, variables = context_kw["model"], context_kw["variables"]
  if prunable is not None:
    raise ValueError(
      f"prunable={prunable!r}: structured pruner {p.name!r} prunes whole "
      "channel spaces; prunable= is for unstructured pruners."
    )
  if score_kwargs:
    raise ValueError(f"score_kwargs={score_kwargs!r}: structured pruner {p.name!r} takes none.")
  if isinstance(model, nn.Module):
    _params_of(model, variables)  # ValueError: no 'params' collection
  structured.spaces_of(model, variables, p.kind, p.name)  # ValueError: no such channels
  context = ScoreContext(
    **dict(context_kw, sparsity=masks_lib.check_sparsity(context_kw["sparsity"]))
  )
  return structured.rank(
    p.name, p.kind, "global" if p.quota is None else p.quota, p.score(context), model, variables
  )


def _scored(p: Pruner, context: ScoreContext) -> PyTree:
  scores = p.score(context)
  _check_score_leaves(scores, context.prunable, p.name)
  return scores


def _check_context(p: Pruner, context: ScoreContext) -> None:
  if p.score in (_synflow,) and context.input_shape is None:
    raise ValueError(f"pruner={p.name!r} needs input_shape= for SynFlow's all-ones input.")


def prune(
  pruner: str | Pruner,
  *,
  key: jax.Array,
  model,
  variables: PyTree,
  sparsity: float,
  pruning_type: str = "direct",
  input_shape=None,
  batches=None,
  trained_params=None,
  rounds: int | None = None,
  score_kwargs: dict | None = None,
  loss: Callable | None = None,
  apply_kwargs: dict | None = None,
  prunable: masks_lib.Prunable = None,
) -> PyTree:
  """Masks of ``pruner`` at ``sparsity``: direct sparsity, or (``pruning_type=
  'effective'``) the smallest direct sparsity whose effective sparsity is at least
  ``sparsity`` (method.md section 2).

  Args:
    pruner: a name from :data:`PRUNERS` (e.g. 'random/igq', 'snip', 'synflow', or a
      structured one, 'channel/l1', 'neuron/snip/global': :mod:`sparsejax.structured`)
      or a :class:`Pruner`.
    key: PRNG key for random scores and random within-layer orders.
    model: a Flax module (zoo or user-written), or a function ``apply(params, x)``.
    variables: the module's {'params': ..., 'batch_stats': ...} at initialization, or
      the function's params.
    input_shape: one example's shape, e.g. (28, 28, 1), or an example input (effective
      type, SynFlow, and the layers' input-to-output order).
    batches: batches for data-driven scores (SNIP, GraSP): preprocessed image/label
      dicts for the default loss, any pytrees for a user ``loss``.
    trained_params: params after dense training (magnitude, LAMP; structured l1,
      magnitude and bn_scale).
    rounds: rounds of an iterative pruner (default: the pruner's).
    loss: ``loss(params, batch) -> scalar`` for SNIP, iterative SNIP and GraSP.
    apply_kwargs: keyword arguments of the model's call (e.g. {'train': False}).
    prunable: narrows the prunable leaves, which default to every parameter the traced
      program uses as a linear-op weight (Dense/Conv/Einsum kernels): a predicate on
      the '/'-joined path or a collection of paths (:func:`prunable_set`).

  Returns:
    A mask tree: bool at the prunable leaves, None elsewhere.

  Raises:
    UnreachableSparsityError: an effective target beyond every connected mask of the
      ranking, or a direct target beyond the quota's limit.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sparsejax import masks, models, pruning
    >>> model = models.create("lenet300100")
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    >>> m = pruning.prune("random/igq", key=jax.random.key(1), model=model,
    ...                   variables=variables, sparsity=0.9, input_shape=(28, 28, 1))
    >>> round(masks.compression(m), 2)
    10.0
  """
  p = get_pruner(pruner)
  sparsity = masks_lib.check_sparsity(sparsity)
  check_pruning_type(pruning_type)
  if p.score is None:
    if sparsity != 0:
      raise ValueError(f"pruner='dense' keeps every weight; sparsity={sparsity!r} must be 0.")
    chosen = prunable_set(
      model, variables, input_shape, prunable=prunable, apply_kwargs=apply_kwargs
    )
    return masks_lib.ones(_params_of(model, variables), chosen)
  ranking = ranking_for(
    p,
    key=key,
    model=model,
    variables=variables,
    sparsity=sparsity,
    input_shape=input_shape,
    batches=batches,
    trained_params=trained_params,
    rounds=rounds,
    score_kwargs=score_kwargs,
    loss=loss,
    apply_kwargs=apply_kwargs,
    prunable=prunable,
  )
  return masks_from_ranking(
    ranking,
    sparsity,
    pruning_type,
    model=model,
    input_shape=input_shape,
    **_trace_kw(model, variables, apply_kwargs),
  )
