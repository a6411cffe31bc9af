"""Masks that move during training: gradual magnitude pruning, SET, RigL, STE.

Each updater is a small frozen dataclass (hashable: a static argument of its jitted
update) with one pure function

    masks' = updater.update(params, grads, masks, step, key)

called at the steps where ``updater.is_update_step(step)``; the training loop puts
``masks'`` into the optimizer state with :func:`sparsejax.optim.replace_masks` (no
recompilation) and zeroes the dropped weights (:func:`apply_update`). Grown weights
start at 0, as in RigL.

- :class:`GradualMagnitude` (Zhu & Gupta, 2017, "To prune, or not to prune"): at
  update steps t in [t0, t1] the sparsity follows the cubic schedule

      s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3,

  and the mask keeps the round((1 - s_t) N) largest |w| among the kept weights
  (globally, or per layer with a quota of :mod:`sparsejax.quotas`); pruned weights
  never come back. ``target='effective'`` aims each step at s_t as *effective*
  sparsity with the exact search of :mod:`sparsejax.pruning` along |w|
  (:meth:`GradualMagnitude.update_effective`).
- :class:`SET` (Mocanu et al., 2018) and :class:`RigL` (Evci et al., 2020): in each
  layer drop the n = floor(f_t k_l) kept weights of smallest |w| and grow n weights
  among the others (dropped ones included): at random (SET) or by largest |dL/dw|
  (RigL). Every layer keeps exactly k_l weights. The drop fraction is constant or
  decays as f_t = f_0 / 2 (1 + cos(pi t / t_end)); there are no updates after t_end.
  With a connectivity ``sweep`` (``regrow='active'``) weights are grown first among
  those that would be active (:attr:`sparsejax.effective.Connectivity.potential` of
  the mask after the drop), so none is dead on arrival while such weights remain.
  ``target='effective'`` (with ``sparsity``) holds the budget in *effective* terms:
  after the drop and the (active) regrowth, the mask is cut back along a ranking
  (grown weights first, then the kept ones by |w|) with the exact search of
  :mod:`sparsejax.pruning` to the smallest direct sparsity whose effective sparsity is
  at least ``sparsity`` (:meth:`update_effective`); the kept count then moves while
  the active count stays at the target.
- :class:`STE` (straight-through estimator, e.g. Zhou et al., 2021): dense weights
  keep training; the forward pass uses w * m with m the top round((1 - s) N) of |w|
  recomputed every ``every`` steps, and the gradient passes straight through to w
  (:func:`sparsejax.optim.straight_through`).

- :class:`ACDC` (Peste et al., 2021, "AC/DC: Alternating Compressed/DeCompressed
  Training"): dense until ``start``, then compressed phases (the top round((1 - s) N)
  of |w| kept, the rest 0 and masked) and decompressed phases (every weight trains,
  the pruned ones from 0) of ``every`` steps each, compressed first; compressed from
  ``end`` on. Single weights or whole blocks (``block=``).
- :class:`BlockMagnitude`: GMP's cubic schedule on whole b x b blocks scored by the mean
  or max |w| (:mod:`sparsejax.blocks`).

Ties are broken by position (flattened layers, input-to-output order), so an update
is a deterministic function of its arguments.

Inside a jitted step (no host round trip): :func:`masks_in_step` is a ``lax.cond`` on
``updater.update_due(step)`` (the jit-able schedule every built-in defines) of
``updater.update`` and the masks as they are, the same masks bit for bit as the
between-steps path; :func:`update_in_step` also replaces the masks in a
:func:`sparsejax.with_masks` optimizer state, zeroes dropped weights and resets the
optimizer state of grown ones (:func:`sparsejax.optim.zero_state_where`; RigL's code
resets the optimizer slots of new connections, so ``reset_optimizer_state=True`` is the
default here and in :class:`sparsejax.training.MaskUpdates`).

Every method is an :class:`Updater` (a protocol: ``is_update_step``, ``update``,
``needs_grads``, ``straight_through``, ``needs_sweep``, ``target`` and the
effective-target hook ``update_effective``; :class:`BaseUpdater` gives the defaults)
and is registered by name in :data:`METHODS` (:func:`register_method`,
:func:`get_method`) with how to build it from plain keyword settings
(:data:`SETTINGS`) and how its starting masks are made (:func:`starting_masks`). The
training loop (:class:`sparsejax.training.MaskUpdates`) and the experiment binaries
read only that protocol and registry, so a new method is one registration. In your own
training loop::

    if updater.is_update_step(step):
      masks = updater.update(params, grads, masks, step, key)   # grads: dense, or None
      params = dynamic.apply_update(params, masks)             # dropped weights to 0
      opt_state = optim.replace_masks(opt_state, masks)        # no recompilation
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from sparsejax import blocks, effective, optim, pruning, selection, tracing
from sparsejax import masks as masks_lib
from sparsejax import quotas as quotas_lib

PyTree = Any
DECAYS = ("constant", "cosine")
TARGETS = ("direct", "effective")
REGROW = ("any", "active")


# ---------------------------------------------------------------- schedules


def gmp_sparsity(step, *, initial: float, final: float, start: int, end: int):
  """The cubic schedule s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3, clipped to
  [t0, t1] (s_i before t0, s_f after t1). Jit-able in ``step``."""
  t = jnp.asarray(step, jnp.float32)
  frac = jnp.where(t >= end, 1.0, jnp.clip((t - start) / max(end - start, 1), 0.0, 1.0))
  return final + (initial - final) * (1.0 - frac) ** 3


def drop_fraction(step, *, initial: float, end: int, decay: str):
  """f_t: ``initial`` (constant) or initial / 2 (1 + cos(pi t / end)) (cosine)."""
  if decay == "constant":
    return jnp.float32(initial)
  t = jnp.minimum(jnp.asarray(step, jnp.float32), float(end))
  return initial / 2.0 * (1.0 + jnp.cos(jnp.pi * t / max(end, 1)))


# ---------------------------------------------------------------- helpers


def _flat(tree: PyTree) -> list[jax.Array]:
  return [x.reshape(-1) for x in masks_lib.mask_leaves(tree)]


def _like(masks: PyTree, flat: list[jax.Array]) -> PyTree:
  it = iter(flat)
  return masks_lib.map_masks(lambda m: next(it).reshape(m.shape), masks)


def _prunable(params: PyTree, masks: PyTree) -> list[jax.Array]:
  """The params at the masks' leaves, flat, in layer order."""
  return _flat(masks_lib.map_masks(lambda m, w: w, masks, params))


def _top(score: jax.Array, count, alive: jax.Array) -> jax.Array:
  """Bool: the ``count`` highest non-negative scores among ``alive`` (ties by position,
  lower first), by a radix select (no sort)."""
  return selection.select_top([score], count, [alive])[0]


def _bottom(score: jax.Array, count, alive: jax.Array) -> jax.Array:
  """Bool: the ``count`` lowest non-negative scores among ``alive`` (ties by position,
  lower first): the complement of the top (n - count) in reversed position order."""
  n = jnp.sum(alive, dtype=jnp.int32)
  keep_rev = _top(score[::-1], n - count, alive[::-1])[::-1]
  return alive & ~keep_rev


def _check_range(name: str, value, low: float, high: float, high_open: bool = True):
  ok = low <= value < high if high_open else low <= value <= high
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
    bracket = ")" if high_open else "]"
    raise ValueError(f"{name}={value!r} must be in [{low}, {high}{bracket}.")


def _check_steps(start: int, end: int, every: int) -> None:
  for name, value in (("start", start), ("end", end)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{name}={value!r} must be a non-negative integer step.")
  if end < start:
    raise ValueError(f"end={end!r} must be at least start={start!r}.")
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ValueError(f"every={every!r} must be a positive integer (steps between updates).")


def apply_update(params: PyTree, masks: PyTree) -> PyTree:
  """Params with the weights outside ``masks`` set to 0 (dropped ones; grown ones are
  already 0, having been pruned)."""
  return masks_lib.apply(params, masks)


# ---------------------------------------------------------------- the protocol


@runtime_checkable
class Updater(Protocol):
  """What the training loop needs of a method whose masks move during training.

  Attributes:
    needs_grads: ``update`` reads the dense gradient dL/dw at every weight, pruned
      ones included (RigL); otherwise it gets ``grads=None``.
    straight_through: the masks mask only the forward pass and the dense weights keep
      training (STE); otherwise dropped weights are set to 0 and stay masked.
    needs_sweep: ``update`` takes a connectivity sweep
      (:func:`sparsejax.effective.connectivity_sweep`) as ``sweep=``.
    target: 'direct' (``update``) or 'effective' (``update_effective``, the hook that
      aims at an effective sparsity and needs the model).
  """

  needs_grads: bool
  straight_through: bool
  needs_sweep: bool
  target: str

  def is_update_step(self, step: int) -> bool:
    """Whether the masks move before the optimizer step ``step`` (a Python int)."""
    ...

  def update_due(self, step) -> jax.Array:
    """``is_update_step`` as a bool array of a traced int32 ``step`` (the schedule of the
    in-jit path, :func:`masks_in_step`)."""
    ...

  def update(self, params, grads, masks, step, key, sweep=None) -> PyTree:
    """The new masks (same structure, shapes and dtype as ``masks``): a pure, jit-able
    function of params, dense grads (or None), masks, int32 step and a PRNG key."""
    ...

  def update_effective(
    self, params, grads, masks, step, key, *, model, input_shape, sweep=None
  ) -> PyTree:
    """The new masks aimed at an *effective* sparsity (``target == 'effective'``)."""
    ...


class BaseUpdater:
  """Defaults of the :class:`Updater` protocol: no gradients, masked weights, no sweep,
  a direct target (no effective hook). Subclass it (as a frozen dataclass: hashable,
  so that ``update`` can be jitted with ``self`` static) and define
  ``is_update_step`` and ``update``."""

  needs_grads: ClassVar[bool] = False
  straight_through: ClassVar[bool] = False
  target: str = "direct"

  @property
  def needs_sweep(self) -> bool:
    return False

  def is_update_step(self, step: int) -> bool:
    raise NotImplementedError(f"{type(self).__name__} does not define is_update_step.")

  def update_due(self, step) -> jax.Array:
    raise ValueError(
      f"{type(self).__name__} has no in-jit schedule: define update_due(step) (a jit-able "
      "is_update_step) to update its masks inside a jitted step; between steps, "
      "is_update_step is enough."
    )

  def update(self, params, grads, masks, step, key, sweep=None) -> PyTree:
    raise NotImplementedError(f"{type(self).__name__} does not define update.")

  def update_effective(self, params, grads, masks, step, key, *, model, input_shape, sweep=None):
    raise ValueError(
      f"{type(self).__name__} has no effective target; target={self.target!r} is not "
      "available; allowed: direct."
    )


def check_updater(updater) -> Updater:
  """``updater`` if it implements :class:`Updater`, else ValueError naming what it lacks."""
  missing = [
    name
    for name in (
      "is_update_step",
      "update",
      "update_effective",
      "needs_grads",
      "straight_through",
      "needs_sweep",
      "target",
    )
    if not hasattr(updater, name)
  ]
  if missing:
    raise ValueError(
      f"updater={updater!r} is not a sparsejax.dynamic.Updater: it lacks "
      f"{', '.join(missing)} (subclass dynamic.BaseUpdater for the defaults)."
    )
  if updater.target not in TARGETS:
    raise ValueError(
      f"updater.target={updater.target!r} is not allowed; allowed: {', '.join(TARGETS)}."
    )
  return updater


# ---------------------------------------------------------------- updaters


@dataclasses.dataclass(frozen=True)
class GradualMagnitude(BaseUpdater):
  """Gradual magnitude pruning with the cubic schedule (see the module docstring).

  final_sparsity: s_f, reached at step ``end``. initial_sparsity: s_i at ``start``.
  every: steps between updates. quota: None (one global magnitude ranking) or a
  quota name. target: 'direct', or 'effective' (each step reaches s_t in effective
  sparsity; use :meth:`update_effective`).
  """

  final_sparsity: float
  start: int
  end: int
  every: int = 100
  initial_sparsity: float = 0.0
  quota: str | None = None
  target: str = "direct"

  def __post_init__(self):
    _check_range("final_sparsity", self.final_sparsity, 0.0, 1.0)
    _check_range(
      "initial_sparsity", self.initial_sparsity, 0.0, self.final_sparsity, high_open=False
    )
    _check_steps(self.start, self.end, self.every)
    if self.quota is not None and self.quota not in quotas_lib.QUOTAS:
      raise ValueError(
        f"quota={self.quota!r} is not a quota; allowed: None (global), "
        f"{', '.join(quotas_lib.QUOTAS)}."
      )
    if self.target not in TARGETS:
      raise ValueError(f"target={self.target!r} is not allowed; allowed: {', '.join(TARGETS)}.")

  def is_update_step(self, step: int) -> bool:
    return self.start <= step <= self.end and (step - self.start) % self.every == 0

  def update_due(self, step) -> jax.Array:
    t = jnp.asarray(step, jnp.int32)
    return (self.start <= t) & (t <= self.end) & ((t - self.start) % self.every == 0)

  def sparsity(self, step):
    return gmp_sparsity(
      step, initial=self.initial_sparsity, final=self.final_sparsity, start=self.start, end=self.end
    )

  def scores(self, params: PyTree, masks: PyTree) -> PyTree:
    """|w| at kept weights, -1 at pruned ones (they rank last and never return)."""
    return masks_lib.map_masks(
      lambda m, w: jnp.where(m, jnp.abs(w).astype(jnp.float32), -1.0), masks, params
    )

  @functools.partial(jax.jit, static_argnames=("self", "sweep"))
  def update(self, params, grads, masks, step, key, sweep=None):
    """Masks at s_t: the round((1 - s_t) N) largest |w| among the kept (jitted)."""
    del grads, key, sweep
    return _top_masks(params, masks, 1.0 - self.sparsity(step), self.quota, alive=masks)

  def update_effective(self, params, grads, masks, step, key, *, model, input_shape, sweep=None):
    """Masks at the smallest direct sparsity whose effective sparsity is at least s_t,
    along |w| among the kept weights (the exact search of :mod:`sparsejax.pruning`)."""
    del grads, key, sweep
    return _effective_cut(
      self.scores(params, masks), float(self.sparsity(step)), self.quota, model, input_shape
    )


def _effective_cut(scores: PyTree, sparsity: float, quota, model, input_shape) -> PyTree:
  """The mask along ``scores`` (higher kept first; negative: pruned, never kept) at the
  smallest direct sparsity whose effective sparsity is at least ``sparsity``; the
  weights with non-negative scores as they are when they already meet it."""

  ranking = pruning.rank_scores(scores, quota=quota)
  if quota is None:
    available = sum(int(jnp.sum(x >= 0)) for x in masks_lib.mask_leaves(scores))
    current = pruning.masks_at(ranking, available)
    active = masks_lib.count(effective.effective_masks(model, current, input_shape))[0]
    if active <= pruning.max_kept_for_sparsity(sparsity, ranking.total):
      return current  # cutting is not needed; going on would revive pruned weights
  return pruning.masks_from_ranking(
    ranking, sparsity, "effective", model=model, input_shape=input_shape
  )


@dataclasses.dataclass(frozen=True)
class _DropGrow(BaseUpdater):
  """Shared by SET and RigL: drop the smallest |w|, grow as ``_grow_score`` says.

  target: 'direct' (the kept count of every layer stays as it is) or 'effective' (the
  active count stays at ``sparsity``, see the module docstring; implies regrowth
  into would-be-active weights).
  """

  end: int
  every: int = 100
  start: int = 0
  drop_fraction: float = 0.3
  decay: str = "cosine"
  regrow: str = "any"
  target: str = "direct"
  sparsity: float | None = None

  def __post_init__(self):
    _check_steps(self.start, self.end, self.every)
    _check_range("drop_fraction", self.drop_fraction, 0.0, 1.0, high_open=False)
    if self.decay not in DECAYS:
      raise ValueError(f"decay={self.decay!r} is not allowed; allowed: {', '.join(DECAYS)}.")
    if self.regrow not in REGROW:
      raise ValueError(f"regrow={self.regrow!r} is not allowed; allowed: {', '.join(REGROW)}.")
    if self.target not in TARGETS:
      raise ValueError(f"target={self.target!r} is not allowed; allowed: {', '.join(TARGETS)}.")
    if self.target == "effective":
      if self.sparsity is None:
        raise ValueError(
          "target='effective' needs sparsity= (the effective sparsity the "
          "active weights are held at)."
        )
      _check_range("sparsity", self.sparsity, 0.0, 1.0)
      if self.regrow != "active":
        raise ValueError(
          "target='effective' grows only weights that would be active: set regrow='active'."
        )

  @property
  def needs_sweep(self) -> bool:
    return self.regrow == "active"

  def update_effective(self, params, grads, masks, step, key, *, model, input_shape, sweep=None):
    """Drop and (active) regrowth, then the cut back to ``sparsity`` in effective terms
    along grown weights first, then kept ones by |w| (pruned ones never)."""
    grown_mask = self.update(params, grads, masks, jnp.int32(step), key, sweep=sweep)
    scores = masks_lib.map_masks(
      lambda n, o, w: jnp.where(n & ~o, jnp.inf, jnp.where(n, jnp.abs(w), -1.0)).astype(
        jnp.float32
      ),
      grown_mask,
      masks,
      params,
    )
    # inf is not a valid score: grown weights rank just above every kept one.
    top = (
      max(float(jnp.max(jnp.where(jnp.isfinite(x), x, 0.0))) for x in masks_lib.mask_leaves(scores))
      + 1.0
    )
    scores = masks_lib.map_masks(lambda x: jnp.where(jnp.isinf(x), top, x), scores)
    return _effective_cut(scores, self.sparsity, None, model, input_shape)

  def is_update_step(self, step: int) -> bool:
    return (self.start < step < self.end) and (step - self.start) % self.every == 0

  def update_due(self, step) -> jax.Array:
    t = jnp.asarray(step, jnp.int32)
    return (self.start < t) & (t < self.end) & ((t - self.start) % self.every == 0)

  def fraction(self, step):
    return drop_fraction(step, initial=self.drop_fraction, end=self.end, decay=self.decay)

  def _grow_score(self, grads, keys, i, shape):
    """Per-layer growth priority [n_l] (higher grows first)."""
    raise NotImplementedError

  @functools.partial(jax.jit, static_argnames=("self", "sweep"))
  def update(self, params, grads, masks, step, key, sweep: Callable | None = None):
    """Per layer: drop n = floor(f_t k_l) smallest |w| among the kept, grow n by the
    grow score among the rest (the dropped included); with ``sweep`` (a connectivity
    sweep, ``regrow='active'``) weights that would be active are grown first."""
    w = _prunable(params, masks)
    m = _flat(masks)
    g = None if grads is None else _prunable(grads, masks)
    f = self.fraction(step)
    keys = jax.random.split(key, len(m))
    dropped = []
    for wl, ml in zip(w, m):
      k = jnp.sum(ml, dtype=jnp.int32)
      n = jnp.floor(f * k.astype(jnp.float32)).astype(jnp.int32)
      # The n smallest |w| among the kept (ties: lower position first).
      dropped.append((ml & ~_bottom(jnp.abs(wl).astype(jnp.float32), n, ml), n))
    potential = None
    if sweep is not None and self.regrow == "active":
      potential = _flat(sweep(_like(masks, [d for d, _ in dropped])).potential)
    out = []
    for i, (kept, n) in enumerate(dropped):
      score = self._grow_score(g, keys, i, m[i].shape)
      candidates = ~kept
      if potential is not None:  # would-be-active weights first, then the others
        first = candidates & potential[i]
        n_first = jnp.minimum(n, jnp.sum(first, dtype=jnp.int32))
        grow = _top(score, n_first, first)
        grow = grow | _top(score, n - n_first, candidates & ~first)
      else:
        grow = _top(score, n, candidates)
      out.append(kept | grow)
    return _like(masks, out)


@dataclasses.dataclass(frozen=True)
class SET(_DropGrow):
  """Sparse Evolutionary Training: magnitude drop, random regrowth (constant drop
  fraction by default, as in Mocanu et al.)."""

  decay: str = "constant"

  def _grow_score(self, grads, keys, i, shape):
    return jax.random.uniform(keys[i], shape)


@dataclasses.dataclass(frozen=True)
class RigL(_DropGrow):
  """Rigging the Lottery: magnitude drop, regrowth by largest |dL/dw| of the dense
  gradient, cosine-decayed drop fraction (Evci et al.)."""

  needs_grads: ClassVar[bool] = True

  def _grow_score(self, grads, keys, i, shape):
    if grads is None:
      raise ValueError("RigL grows by gradient magnitude: pass grads= (dense gradients).")
    return jnp.abs(grads[i]).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class STE(BaseUpdater):
  """Straight-through magnitude pruning: the mask is the top round((1 - s) N) of |w|
  of the dense weights (globally or per layer with ``quota``), recomputed every
  ``every`` steps; training keeps the dense weights and uses w * m forward."""

  sparsity: float
  every: int = 1
  end: int | None = None
  quota: str | None = None
  straight_through: ClassVar[bool] = True

  def __post_init__(self):
    _check_range("sparsity", self.sparsity, 0.0, 1.0)
    _check_steps(0, self.end if self.end is not None else 0, self.every)
    if self.quota is not None and self.quota not in quotas_lib.QUOTAS:
      raise ValueError(
        f"quota={self.quota!r} is not a quota; allowed: None (global), "
        f"{', '.join(quotas_lib.QUOTAS)}."
      )

  def is_update_step(self, step: int) -> bool:
    return step % self.every == 0 and (self.end is None or step <= self.end)

  def update_due(self, step) -> jax.Array:
    t = jnp.asarray(step, jnp.int32)
    due = t % self.every == 0
    return due if self.end is None else due & (t <= self.end)

  @functools.partial(jax.jit, static_argnames=("self", "sweep"))
  def update(self, params, grads, masks, step, key, sweep=None):
    del grads, step, key, sweep
    gmp = GradualMagnitude(self.sparsity, 0, 0, 1, self.sparsity, self.quota)
    ones = masks_lib.map_masks(jnp.ones_like, masks)
    return gmp.update(params, None, ones, 0, None)


def _check_quota(quota) -> None:
  if quota is not None and quota not in quotas_lib.QUOTAS:
    raise ValueError(
      f"quota={quota!r} is not a quota; allowed: None (global), {', '.join(quotas_lib.QUOTAS)}."
    )


def _check_block(block, reduce) -> None:
  if block is not None:
    blocks.check_block(block)
  blocks.check_reduce(reduce)


def _top_masks(params, masks, density, quota, block=None, reduce="mean", alive=None) -> PyTree:
  """The magnitude masks at ``density`` (round(d N) weights globally, or a quota's counts
  per layer) among the ``alive`` weights (a mask tree; None: all): single weights, or
  whole ``block`` blocks (:func:`sparsejax.blocks.block_masks`). Ties by position."""
  if block is not None:
    return blocks.block_masks(params, masks, density, block, reduce, quota, alive)
  base = masks_lib.map_masks(jnp.ones_like, masks) if alive is None else alive
  w = [jnp.abs(x).astype(jnp.float32) for x in _prunable(params, base)]
  m = _flat(base)
  shapes = tuple(tuple(x.shape) for x in masks_lib.mask_leaves(base))
  if quota is None:
    kept = jnp.round(density * sum(math.prod(sh) for sh in shapes)).astype(jnp.int32)
    return _like(base, selection.select_top(w, kept, m))
  counts = quotas_lib.layer_kept_counts(quota, density, shapes)
  return _like(base, [_top(x, counts[l], ml) for l, (x, ml) in enumerate(zip(w, m))])


@dataclasses.dataclass(frozen=True)
class ACDC(BaseUpdater):
  """AC/DC, alternating compressed / decompressed training (Peste et al., 2021).

  Dense warm-up until ``start``; then phases of ``every`` steps alternate, compressed
  first: a compressed phase starts by keeping the top round((1 - s) N) of |w| (globally,
  per layer with ``quota``, or whole ``block`` blocks scored by ``reduce``,
  :mod:`sparsejax.blocks`), the others are set to 0 and stay masked through the phase;
  a decompressed phase unmasks every weight (the pruned ones restart from 0). From
  ``end`` on the network stays compressed (a compression at ``end`` when the phase
  before it was decompressed) to the end of training: the final sparse fine-tuning.
  Starts from dense masks; the masks mask the weights (not straight-through).
  """

  sparsity: float
  start: int
  end: int
  every: int
  quota: str | None = None
  block: tuple | None = None
  reduce: str = "mean"

  def __post_init__(self):
    _check_range("sparsity", self.sparsity, 0.0, 1.0)
    _check_steps(self.start, self.end, self.every)
    _check_quota(self.quota)
    _check_block(self.block, self.reduce)

  def compressed(self, step):
    """Whether step ``step`` lies in a compressed phase: a bool array (jit-able)."""
    t = jnp.asarray(step, jnp.int32)
    phase = jnp.maximum(t - self.start, 0) // self.every
    return (t >= self.end) | ((t >= self.start) & (phase % 2 == 0))

  def _compressed(self, t: int) -> bool:
    return t >= self.end or (t >= self.start and (t - self.start) // self.every % 2 == 0)

  def is_update_step(self, step: int) -> bool:
    """At every phase change: dense -> compressed at ``start``, then at each boundary."""
    return self._compressed(step) != (step > 0 and self._compressed(step - 1))

  def update_due(self, step) -> jax.Array:
    t = jnp.asarray(step, jnp.int32)
    return self.compressed(t) != ((t > 0) & self.compressed(t - 1))

  @functools.partial(jax.jit, static_argnames=("self", "sweep"))
  def update(self, params, grads, masks, step, key, sweep=None):
    """The phase's masks: the magnitude top at the sparsity (compressed), all ones
    (decompressed)."""
    del grads, key, sweep
    top = _top_masks(params, masks, 1.0 - self.sparsity, self.quota, self.block, self.reduce)
    on = self.compressed(step)
    return masks_lib.map_masks(lambda t: t | ~on, top)


@dataclasses.dataclass(frozen=True)
class BlockMagnitude(BaseUpdater):
  """Gradual magnitude pruning of whole ``block`` blocks (:mod:`sparsejax.blocks`): the
  cubic schedule of :class:`GradualMagnitude`, each update keeping the best blocks by
  ``reduce`` (mean or max |w| over their kept weights) among the kept ones, at most
  floor((1 - s_t) N) weights (globally or per layer with ``quota``); pruned blocks never
  return and every mask is a union of whole blocks."""

  final_sparsity: float
  start: int
  end: int
  every: int = 100
  block: tuple = (4, 4)
  reduce: str = "mean"
  initial_sparsity: float = 0.0
  quota: str | None = None

  def __post_init__(self):
    _check_range("final_sparsity", self.final_sparsity, 0.0, 1.0)
    _check_range(
      "initial_sparsity", self.initial_sparsity, 0.0, self.final_sparsity, high_open=False
    )
    _check_steps(self.start, self.end, self.every)
    _check_quota(self.quota)
    _check_block(self.block, self.reduce)

  def is_update_step(self, step: int) -> bool:
    return self.start <= step <= self.end and (step - self.start) % self.every == 0

  def update_due(self, step) -> jax.Array:
    t = jnp.asarray(step, jnp.int32)
    return (self.start <= t) & (t <= self.end) & ((t - self.start) % self.every == 0)

  def sparsity(self, step):
    return gmp_sparsity(
      step, initial=self.initial_sparsity, final=self.final_sparsity, start=self.start, end=self.end
    )

  @functools.partial(jax.jit, static_argnames=("self", "sweep"))
  def update(self, params, grads, masks, step, key, sweep=None):
    del grads, key, sweep
    density = 1.0 - self.sparsity(step)
    return blocks.block_masks(params, masks, density, self.block, self.reduce, self.quota, masks)


# ---------------------------------------------------------------- inside a jitted step


def _check_in_jit(updater) -> None:
  if getattr(updater, "target", "direct") == "effective":
    raise ValueError(
      f"{type(updater).__name__}(target='effective') aims at an effective sparsity with "
      "a host-side search; update its masks between steps (MaskUpdates), not in jit."
    )


def _count(fn, *trees) -> jax.Array:
  return sum(
    jnp.sum(fn(*xs), dtype=jnp.int32) for xs in zip(*(masks_lib.mask_leaves(t) for t in trees))
  )


def _no_stats() -> dict:
  zero = jnp.int32(0)
  return {"updated": jnp.bool_(False), "kept": zero, "dropped": zero, "grown": zero}


def _moved_masks(updater, params, grads, old, step, key, sweep):
  """The update branch: (new masks with ``old``'s dtypes, stats)."""
  g = grads(params) if callable(grads) else grads
  new = updater.update(params, g if updater.needs_grads else None, old, step, key, sweep=sweep)
  new = masks_lib.map_masks(lambda n, o: jnp.asarray(n, o.dtype), new, old)
  stats = {
    "updated": jnp.bool_(True),
    "kept": _count(lambda n: n, new),
    "dropped": _count(lambda o, n: o & ~n, old, new),
    "grown": _count(lambda o, n: n & ~o, old, new),
  }
  return new, stats


def masks_in_step(updater, params, grads, masks, step, key, *, sweep=None):
  """The masks after step ``step``'s update, inside a jitted step: ``lax.cond`` on
  ``updater.update_due(step)`` of ``updater.update`` and the masks as they are; no host
  round trip, one program for every step.

  ``grads``: the dense gradient tree, or a function ``params -> grads`` evaluated only
  in the update branch, or None for methods that read none. (On XLA:CPU a convolution's
  gradient inside a ``lax.cond`` branch runs many times slower than outside one, so
  :func:`sparsejax.training.update_train_step` passes the step's own gradient.)
  Returns (new masks, stats): stats = {"updated": bool, "kept", "dropped", "grown":
  int32} (zeros when nothing moved).
  """
  _check_in_jit(updater)
  step = jnp.asarray(step, jnp.int32)
  return jax.lax.cond(
    updater.update_due(step),
    lambda: _moved_masks(updater, params, grads, masks, step, key, sweep),
    lambda: (masks, _no_stats()),
  )


def update_in_step(
  updater,
  params,
  opt_state,
  step,
  key,
  *,
  grads=None,
  sweep=None,
  reset_optimizer_state: bool = True,
):
  """Step ``step``'s mask update inside a jitted step, on a :func:`sparsejax.with_masks`
  optimizer state: ``(params, opt_state, stats)`` with the new masks in ``opt_state``,
  dropped weights set to 0 (not for straight-through methods) and, with
  ``reset_optimizer_state`` (the default, as RigL's code does), the optimizer state of
  newly grown weights set to 0 (:func:`sparsejax.optim.zero_state_where`). All of it
  is one ``lax.cond`` branch: on steps without an update, params and optimizer state
  pass through untouched. Arguments as :func:`masks_in_step`; the same masks as the
  between-steps path (``updater.update`` from Python at ``is_update_step``), bit for
  bit.
  """
  _check_in_jit(updater)
  step = jnp.asarray(step, jnp.int32)
  old = optim.get_masks(opt_state)

  def moved():
    new, stats = _moved_masks(updater, params, grads, old, step, key, sweep)
    return (*apply_masks(updater, params, opt_state, old, new, reset_optimizer_state), stats)

  return jax.lax.cond(updater.update_due(step), moved, lambda: (params, opt_state, _no_stats()))


def apply_masks(updater, params, opt_state, old, new, reset_optimizer_state: bool = True):
  """``(params, opt_state)`` after the masks moved from ``old`` to ``new``: the masks in
  ``opt_state`` replaced, dropped weights set to 0 and grown weights' optimizer state
  reset (neither for straight-through methods, whose dense weights keep training)."""
  opt_state = optim.replace_masks(opt_state, new)
  if updater.straight_through:
    return params, opt_state
  params = apply_update(params, new)
  if reset_optimizer_state:
    grown = masks_lib.map_masks(lambda n, o: n & ~o, new, old)
    opt_state = optim.zero_state_where(opt_state, params, grown)
  return params, opt_state


def without_grown(grads: PyTree, old, new) -> PyTree:
  """``grads`` (a full gradient tree) set to 0 at the weights grown by the mask update
  from ``old`` to ``new``. A grown weight starts at 0 with zero optimizer state; with
  this gradient the update's own step leaves it there, as RigL's code grows after the
  step with zeros: the gradient that chose a weight is not also applied to it."""
  return jax.tree.map(
    lambda n, o, g: g if n is None else jnp.where(n & ~o, jnp.zeros_like(g), g),
    new,
    old,
    grads,
    is_leaf=lambda x: x is None,
  )


# ---------------------------------------------------------------- the registry

#: The plain keyword settings a method's builder may read (each :class:`Method` says
#: which): the target ``sparsity``, the update window ``start``/``end`` and period
#: ``every`` (steps), a layerwise ``quota`` (None: global), the update ``target``
#: ('direct' or 'effective'), SET/RigL's ``drop_fraction`` and GMP's
#: ``initial_sparsity``.
SETTINGS = (
  "sparsity",
  "start",
  "end",
  "every",
  "quota",
  "target",
  "drop_fraction",
  "initial_sparsity",
)
#: How a method's starting masks are made: all ones ('dense') or random at the
#: target sparsity with a quota ('random', see :func:`starting_masks`).
INITIAL_MASKS = ("dense", "random")


@dataclasses.dataclass(frozen=True)
class Method:
  """A named dynamic method: how to build its :class:`Updater` and its starting masks.

  Attributes:
    name: registry name (what ``--config.pruner=`` takes in ``experiments.prune_train``).
    build: ``build(**settings) -> Updater`` over the settings named in ``settings``.
    settings: the names in :data:`SETTINGS` that ``build`` reads; :meth:`make` passes
      only these (a caller may hold them all).
    initial: 'dense' (start from all ones) or 'random' (random masks at the target
      sparsity with the quota, default ERK, aimed at the update target).
    targets: the update targets ``build`` accepts ('direct', 'effective').
    description: one line for listings.
  """

  name: str
  build: Callable[..., Updater]
  settings: tuple[str, ...]
  initial: str = "dense"
  targets: tuple[str, ...] = TARGETS
  description: str = ""

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"name={self.name!r} must be a non-empty string.")
    if not callable(self.build):
      raise ValueError(f"method {self.name!r}: build={self.build!r} must be callable.")
    unknown = [k for k in self.settings if k not in SETTINGS]
    if unknown:
      raise ValueError(
        f"method {self.name!r}: settings {unknown} are not known; allowed: {', '.join(SETTINGS)}."
      )
    if self.initial not in INITIAL_MASKS:
      raise ValueError(
        f"method {self.name!r}: initial={self.initial!r} is not allowed; allowed: "
        f"{', '.join(INITIAL_MASKS)}."
      )
    bad = [t for t in self.targets if t not in TARGETS]
    if bad or not self.targets:
      raise ValueError(
        f"method {self.name!r}: targets={self.targets!r} must be a non-empty subset of {TARGETS}."
      )

  def make(self, **settings) -> Updater:
    """The updater for ``settings`` (names in :data:`SETTINGS`; those this method does
    not read are ignored; ``target`` defaults to 'direct').

    Raises:
      ValueError: an unknown setting, a target this method does not support, or a bad
        value (from the updater's own checks).
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
      raise ValueError(f"settings {unknown} are not known; allowed: {', '.join(SETTINGS)}.")
    target = settings.get("target") or "direct"
    if target not in self.targets:
      raise ValueError(
        f"target={target!r} is not available for {self.name}; allowed: {', '.join(self.targets)}."
      )
    settings = {**settings, "target": target}
    return check_updater(self.build(**{k: settings[k] for k in self.settings if k in settings}))


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
  """Adds ``method`` to :data:`METHODS`; ``experiments.prune_train`` (and its sweep)
  then runs it by name.

  Example:
    >>> from sparsejax import dynamic
    >>> _ = dynamic.register_method(dynamic.Method(
    ...     "rigl/fast", lambda end, **kw: dynamic.RigL(end=end, every=10), ("end",),
    ...     initial="random", targets=("direct",)))
    >>> dynamic.get_method("rigl/fast").make(end=100, sparsity=0.9, quota="erk")
    RigL(end=100, every=10, start=0, ...)
    >>> del dynamic.METHODS["rigl/fast"]

  Raises:
    ValueError: ``method`` is no :class:`Method`, or its name is taken (unless
      ``overwrite``).
  """
  if not isinstance(method, Method):
    raise ValueError(f"method={method!r} must be a sparsejax.dynamic.Method.")
  if method.name in METHODS and not overwrite:
    raise ValueError(
      f"method name {method.name!r} is already registered; pass overwrite=True to replace it."
    )
  METHODS[method.name] = method
  return method


def get_method(name: str | Method) -> Method:
  """The registered :class:`Method` ``name`` (a Method is returned as it is)."""
  if isinstance(name, Method):
    return name
  if name not in METHODS:
    raise ValueError(
      f"method={name!r} is not a known dynamic method; allowed: {', '.join(METHODS)}."
    )
  return METHODS[name]


def starting_masks(
  method: str | Method,
  *,
  key: jax.Array,
  model,
  variables: Mapping[str, PyTree],
  sparsity: float,
  input_shape,
  quota: str | None = None,
  target: str = "direct",
) -> PyTree:
  """The masks a method starts training from: all ones ('dense': GMP; STE's first
  update prunes) or random at ``sparsity`` with ``quota`` (default ERK), aimed at
  ``target`` sparsity ('random': SET and RigL)."""
  method = get_method(method)
  if method.initial == "dense":
    return tracing.trace(model, input_shape, variables=variables).ones()

  return pruning.prune(
    f"random/{quota or 'erk'}",
    key=key,
    model=model,
    variables=variables,
    sparsity=sparsity,
    pruning_type=target,
    input_shape=input_shape,
  )


def _build_gmp(
  *, sparsity, start, end, every=100, initial_sparsity=0.0, quota=None, target="direct"
):
  return GradualMagnitude(
    sparsity,
    start=start,
    end=end,
    every=every,
    initial_sparsity=initial_sparsity,
    quota=quota,
    target=target,
  )


def _drop_grow(cls):
  def build(*, end, every=100, drop_fraction=0.3, target="direct", sparsity=None):
    # Updates run from step 0 to `end` (the drop fraction decays over [0, end]); an
    # effective target holds the active weights at `sparsity`, regrowing only weights
    # that would be active.
    effective = target == "effective"
    return cls(
      end=end,
      every=every,
      drop_fraction=drop_fraction,
      regrow="active" if effective else "any",
      target=target,
      sparsity=sparsity if effective else None,
    )

  return build


def _build_ste(*, sparsity, every=1, quota=None):
  return STE(sparsity, every=every, quota=quota)


def _build_acdc(*, sparsity, start, end, every=100, quota=None):
  return ACDC(sparsity, start=start, end=end, every=every, quota=quota)


def _build_block_gmp(*, sparsity, start, end, every=100, initial_sparsity=0.0, quota=None):
  return BlockMagnitude(
    sparsity,
    start=start,
    end=end,
    every=every,
    block=(4, 4),
    reduce="mean",
    initial_sparsity=initial_sparsity,
    quota=quota,
  )


register_method(
  Method(
    "gmp",
    _build_gmp,
    ("sparsity", "start", "end", "every", "initial_sparsity", "quota", "target"),
    initial="dense",
    description="gradual magnitude pruning: cubic schedule from start to end",
  )
)
register_method(
  Method(
    "set",
    _drop_grow(SET),
    ("sparsity", "end", "every", "drop_fraction", "target"),
    initial="random",
    description="SET: magnitude drop, random regrowth",
  )
)
register_method(
  Method(
    "rigl",
    _drop_grow(RigL),
    ("sparsity", "end", "every", "drop_fraction", "target"),
    initial="random",
    description="RigL: magnitude drop, regrowth by dense-gradient magnitude",
  )
)
register_method(
  Method(
    "ste",
    _build_ste,
    ("sparsity", "every", "quota"),
    initial="dense",
    # The mask is recomputed from the dense weights: no search along a ranking.
    targets=("direct",),
    description="straight-through magnitude pruning, mask recomputed every `every` steps",
  )
)
register_method(
  Method(
    "acdc",
    _build_acdc,
    ("sparsity", "start", "end", "every", "quota"),
    initial="dense",
    targets=("direct",),
    description="AC/DC: dense until start, then compressed/decompressed phases of `every` "
    "steps, compressed from end on",
  )
)
register_method(
  Method(
    "gmp/block4x4",
    _build_block_gmp,
    ("sparsity", "start", "end", "every", "initial_sparsity", "quota"),
    initial="dense",
    targets=("direct",),
    description="gradual magnitude pruning of whole 4x4 blocks (mean |w|)",
  )
)


__all__ = [
  "Updater",
  "BaseUpdater",
  "check_updater",
  "GradualMagnitude",
  "SET",
  "RigL",
  "STE",
  "ACDC",
  "BlockMagnitude",
  "masks_in_step",
  "update_in_step",
  "apply_masks",
  "Method",
  "METHODS",
  "SETTINGS",
  "INITIAL_MASKS",
  "register_method",
  "get_method",
  "starting_masks",
  "gmp_sparsity",
  "drop_fraction",
  "apply_update",
  "DECAYS",
  "TARGETS",
  "REGROW",
]
