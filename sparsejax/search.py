"""The largest member of a nested family of masks that meets a target (method.md section 2).

A *family* is a sequence of masks m(0) <= m(1) <= ... <= m(K) (each keeps a superset of
the one before): a weight :class:`~sparsejax.ranking.Ranking` (member k keeps k weights)
or a structured ranking (member k keeps k channel removals fewer than the last). A
*measure* maps a mask to the weights that count, E(k) = |measure(m(k))|: the kept weights
(direct) or the active ones (effective, one connectivity sweep). E is non-decreasing in k
because the masks are nested, and the answer is

    k* = max { k : E(k) <= T },

for effective pruning the smallest direct sparsity whose effective sparsity is at least
s, with T = floor((1 - s) N). The search keeps a bracket E(lo) <= T < E(hi) and stops at
hi = lo + 1; every step keeps the bracket, which is all exactness rests on:

- The first sweep is at k = T (for weight rankings E(k) <= k, so usually E(T) <= T and
  T is the lower end); hi = K is swept only if reached; a lower end never swept, or set
  by a bound, is swept at the end.
- A weight family's sweep also bounds E for nearby k (:meth:`WeightFamily.bounds`:
  masks are nested), which closes most of the bracket without sweeping.
- Proposals (:func:`propose`): the fixed-point step k T / E(k) until the target is
  bracketed, then Illinois regula falsi on log E against log k, with a bisection step
  right after any step that did not halve the bracket (E jumps where one weight
  reconnects many, and interpolation cannot locate a jump).

One loop (:func:`search`) runs the same step either as a ``lax.while_loop`` (on
accelerators: no host round trip) or stepped from the host with numpy (on CPU: XLA:CPU
runs convolutions inside while-loop bodies through a 10-20x slower path,
jax-ml/jax#12868); both visit the same members.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import effective as effective_lib
from sparsejax import masks as masks_lib
from sparsejax import ranking as ranking_lib

PyTree = Any

#: What a target sparsity counts: the kept weights, or the active ones (effective).
PRUNING_TYPES = ("direct", "effective")
#: How far along the ranking (in weights) a weight family's bounds look from a sweep.
BOUND_WINDOW = 1 << 14
#: Where the loop runs: 'device' (one lax.while_loop), 'host' (stepped from Python) or
#: 'auto' ('host' on CPU, 'device' elsewhere).
LOOPS = ("auto", "device", "host")


def check_pruning_type(pruning_type: str, name: str = "pruning_type") -> str:
  """``pruning_type`` if it is one of :data:`PRUNING_TYPES`, else ValueError."""
  if pruning_type not in PRUNING_TYPES:
    raise ValueError(
      f"{name}={pruning_type!r} is not allowed; allowed: {', '.join(PRUNING_TYPES)}."
    )
  return pruning_type


class SearchState(NamedTuple):
  """The bracket and the proposal's memory (int32 / float32 / bool scalars).

  lo, e_lo: the lower end and E(lo) (an upper estimate while ``lo_exact`` is False);
  hi, e_hi: the upper end and E(hi) (-1: not swept yet); w_lo, w_hi: Illinois weights;
  width: the bracket width before the last step; sweeps: measures evaluated.
  """

  lo: Any
  e_lo: Any
  lo_exact: Any
  hi: Any
  e_hi: Any
  w_lo: Any
  w_hi: Any
  width: Any
  sweeps: Any


class Family(Protocol):
  """A nested family of masks, members 0..size (member k inside member k + 1).

  ``window(k, xp)`` prepares what :meth:`bounds` reads (None: the family gives no
  bounds); ``bounds(window, k, eff, pot, xp)`` returns (gain, loss) [W]: E at k + j + 1
  is at least E(k) + gain[j], E at k - j - 1 at most E(k) - loss[j], from the measured
  member's flat effective and potential masks per layer.
  """

  size: int

  def masks_at(self, k) -> PyTree: ...

  def window(self, k, xp): ...

  def bounds(self, window, k, eff, pot, xp): ...


def initial_state(size: int, xp=jnp) -> SearchState:
  big = xp.int32(2 * size + 2)
  return SearchState(
    xp.int32(0),
    xp.int32(0),
    xp.bool_(False),
    xp.int32(size),
    xp.int32(-1),
    xp.float32(1.0),
    xp.float32(1.0),
    big,
    xp.int32(0),
  )


def searching(state: SearchState):
  """Whether the bracket is still open."""
  return (state.hi - state.lo > 1) | ((state.e_hi < 0) & (state.lo < state.hi))


def propose(state: SearchState, target):
  """The next member to measure (int32, traceable; module docstring)."""
  lo, e_lo, hi, e_hi = state.lo, state.e_lo, state.hi, state.e_hi
  target = jnp.asarray(target, jnp.int32)
  log_t = jnp.log(target.astype(jnp.float32) + 0.5)
  have_hi = e_hi >= 0
  lo_f, hi_f = jnp.float32(lo), jnp.float32(hi)
  k_fixed = jnp.where(
    e_lo > 0, lo_f * (target + 0.5) / jnp.maximum(e_lo, 1) * 1.02, 2.0 * lo_f + 1.0
  )
  f_lo = (jnp.log(jnp.maximum(e_lo, 1).astype(jnp.float32)) - log_t) * state.w_lo
  f_hi = (jnp.log(jnp.maximum(e_hi, 1).astype(jnp.float32)) - log_t) * state.w_hi
  t_log = jnp.clip(-f_lo / jnp.maximum(f_hi - f_lo, 1e-12), 0.0, 1.0)
  log_lo = jnp.log(jnp.maximum(lo_f, 1.0))
  k_log = jnp.exp(log_lo + t_log * (jnp.log(hi_f) - log_lo))
  t_lin = (target + 0.5 - e_lo) / jnp.maximum(e_hi - e_lo, 1).astype(jnp.float32)
  k_lin = lo_f + jnp.clip(t_lin, 0.0, 1.0) * (hi_f - lo_f)
  k_interp = jnp.where(e_lo > 0, k_log, k_lin)
  use_mid = have_hi & (2 * (hi - lo) > state.width)
  k = jnp.where(use_mid, (lo_f + hi_f) / 2, jnp.where(have_hi, k_interp, k_fixed))
  return jnp.clip(jnp.round(k), lo_f + 1, jnp.where(have_hi, hi_f - 1, hi_f)).astype(jnp.int32)


# the host loop's proposals: the same float32 program as inside the device loop
_propose_jit = jax.jit(propose)


def update(state: SearchState, k, e, bounds, target, size: int, first=False, xp=jnp):
  """The state after measuring E(k) = e; ``bounds`` (gain, loss) or None (see
  :class:`Family`). Bounds are monotone in the distance from k, so the first
  candidate that passes is what a bisection would find; it moves the other end of
  the bracket without measuring."""
  below = e <= target
  have_hi = state.e_hi >= 0
  found_hi = found_lo = xp.bool_(False)
  new_hi = e_new_hi = new_lo = e_new_lo = xp.int32(0)
  if bounds is not None:
    gain, loss = bounds
    steps = xp.arange(1, gain.shape[0] + 1, dtype=xp.int32)
    width = gain.shape[0]
    lower = e + gain  # at k + steps, when k is below
    k_hi = xp.minimum(k + width, xp.where(have_hi, state.hi, size))
    over = (k + steps <= k_hi) & (lower > target)
    first_over = xp.argmax(over)
    found_hi = below & over[first_over]
    new_hi, e_new_hi = k + steps[first_over], lower[first_over]
    upper = e - loss  # at k - steps, when k is above
    fits = (k - steps >= xp.maximum(k - width, state.lo)) & (upper <= target)
    first_fit = xp.argmax(fits)
    new_lo, e_new_lo = k - steps[first_fit], upper[first_fit]
    found_lo = ~below & fits[first_fit] & (new_lo > state.lo)
  i32, f32 = xp.int32, xp.float32
  return SearchState(
    lo=i32(xp.where(below, k, xp.where(found_lo, new_lo, state.lo))),
    e_lo=i32(xp.where(below, e, xp.where(found_lo, e_new_lo, state.e_lo))),
    lo_exact=xp.bool_(xp.where(below, True, xp.where(found_lo, False, state.lo_exact))),
    hi=i32(xp.where(below, xp.where(found_hi, new_hi, state.hi), k)),
    e_hi=i32(xp.where(below, xp.where(found_hi, e_new_hi, state.e_hi), e)),
    # The end that stays twice in a row has its f value halved (Illinois rule).
    w_lo=f32(xp.where(below | first, 1.0, 0.5 * state.w_lo)),
    w_hi=f32(xp.where(below & ~xp.bool_(first), 0.5 * state.w_hi, 1.0)),
    width=i32(xp.where(have_hi, state.hi - state.lo, 2 * size + 2)),
    sweeps=i32(state.sweeps + 1),
  )


def search(
  family: Family, measure: Callable, target, *, on_device: bool = False
) -> tuple[Any, Any, Any]:
  """(k*, E(k*), measures evaluated): the largest member k with E(k) <= ``target``
  (module docstring). ``measure(masks) -> (counted masks, potential masks or None)``.

  ``on_device``: the loop is one ``lax.while_loop`` (call it inside ``jax.jit``, with
  the family's arrays traced); else it is stepped from the host, the state in numpy.
  A target below E(0) ends at k* = 0 with E(0) > target (the caller reports it).
  """
  xp = jnp if on_device else np
  size = family.size

  def measured(state, k, first=False):
    window = family.window(k, xp)  # first: it prepares what masks_at reads
    eff, pot = measure(family.masks_at(k))
    eff_flat = [xp.asarray(m).reshape(-1) for m in masks_lib.mask_leaves(eff)]
    e = sum(xp.sum(m, dtype=xp.int32) for m in eff_flat)
    bounds = None
    if window is not None and pot is not None:
      pot_flat = [xp.asarray(m).reshape(-1) for m in masks_lib.mask_leaves(pot)]
      bounds = family.bounds(window, k, eff_flat, pot_flat, xp)
    return update(state, k, xp.int32(e), bounds, xp.int32(target), size, first, xp)

  def count_at(k):
    return sum(
      xp.sum(xp.asarray(m), dtype=xp.int32)
      for m in masks_lib.mask_leaves(measure(family.masks_at(k))[0])
    )

  start = xp.clip(xp.int32(target), 0, size)
  if on_device:
    state = measured(initial_state(size, xp), start, first=True)
    state = jax.lax.while_loop(searching, lambda s: measured(s, propose(s, target)), state)
    e_lo, sweeps = jax.lax.cond(
      state.lo_exact,
      lambda: (state.e_lo, state.sweeps),
      lambda: (count_at(state.lo), state.sweeps + 1),
    )
    return state.lo, e_lo, sweeps
  state = measured(initial_state(size, xp), int(start), first=True)
  while searching(state):
    state = measured(state, int(_propose_jit(state, target)))
  lo, e_lo, sweeps = int(state.lo), int(state.e_lo), int(state.sweeps)
  if not state.lo_exact:  # a lower end set by a bound carries an estimate of E
    return lo, int(count_at(lo)), sweeps + 1
  return lo, e_lo, sweeps


# --------------------------------------------------------------------------- weights


def _window_members(k, width: int, xp):
  """[k, k + 1 .. k + width, k - 1 .. k - width]: the members one sweep bounds."""
  steps = xp.arange(1, width + 1, dtype=xp.int32)
  return xp.concatenate([xp.reshape(k, (1,)).astype(xp.int32), k + steps, k - steps])


def _prefix_along_ranking(order: Sequence, flags: Sequence, start, step: int, width: int, xp):
  """Per layer l, prefix sums [L, width + 1] of flags[l] at the weights of layer ranks
  start[l], start[l] + step, ... (step = +1 forward, -1 backward), zero off the layer."""
  hits = []
  for l, (o, flag) in enumerate(zip(order, flags)):
    idx = start[l] + step * xp.arange(width, dtype=xp.int32)
    valid = (idx >= 0) & (idx < o.size)
    hits.append(xp.where(valid, flag[o[xp.clip(idx, 0, o.size - 1)]], False))
  sums = xp.cumsum(xp.stack(hits), axis=1, dtype=xp.int32)
  return xp.concatenate([xp.zeros((len(hits), 1), xp.int32), sums], axis=1)


def _gathered(prefix, steps, width: int, xp):
  """sum_l prefix[l, steps[..., l]] (steps clipped to [0, width]); steps [..., L]."""
  return xp.sum(prefix[xp.arange(prefix.shape[0]), xp.clip(steps, 0, width)], axis=-1)


class WeightFamily:
  """A weight :class:`~sparsejax.ranking.Ranking` as a family: member k keeps k weights.

  Its bounds: the weights the ranking adds between k and k' > k that are live at k
  (potential) can only add to E, and the active weights it removes between k' < k and
  k can only be lost, E(k') >= E(k) + added live and E(k') <= E(k) - removed active.
  On the host the orders near k come from the ranking's sorted prefixes (no full sort);
  inside a program from its sorted keys.
  """

  def __init__(self, ranking: ranking_lib.Ranking):
    self.ranking = ranking
    self.size = ranking.total
    self.width = min(BOUND_WINDOW, ranking.total)

  def masks_at(self, k):
    return ranking_lib.masks_at(self.ranking, k)

  def window(self, k, xp):
    members = _window_members(k, self.width, xp)
    if xp is jnp:
      return jax.vmap(self.ranking.counts)(members), self.ranking.order
    counts = self.ranking.window_counts(members)
    lo = np.maximum(counts.min(axis=0), counts[0] - self.width)
    hi = np.minimum(counts.max(axis=0), counts[0] + self.width)
    return counts, self.ranking.order_windows(lo, hi)

  def bounds(self, window, k, eff, pot, xp):
    counts, order = window
    width = self.width
    counts_k, counts_up, counts_down = counts[0], counts[1 : width + 1], counts[width + 1 :]
    live = _prefix_along_ranking(order, pot, counts_k, 1, width, xp)
    active = _prefix_along_ranking(order, eff, counts_k - 1, -1, width, xp)
    return (
      _gathered(live, counts_up - counts_k, width, xp),
      _gathered(active, counts_k - counts_down, width, xp),
    )


def _sweep_measure(sweep: Callable) -> Callable:
  def measure(masks):
    conn = sweep(masks)
    return conn.masks, conn.potential

  return measure


def _search_effective(sweep, on_device, ranking, target):
  return search(WeightFamily(ranking), _sweep_measure(sweep), target, on_device=on_device)


@functools.lru_cache(maxsize=32)
def _searcher(traced, on_device: bool):
  """The search of a traced model's connectivity: on the device one jitted program
  (the ranking and target its arguments); on the host the model's one compiled sweep
  (the program effective_masks and active_units run) at each step."""
  if on_device:
    sweep = effective_lib.sweep_of(traced, units=False)
    return jax.jit(functools.partial(_search_effective, sweep, True))
  return functools.partial(_search_effective, effective_lib.compiled_sweep(traced), False)


def check_loop(loop: str) -> bool:
  """Whether ``loop`` (one of :data:`LOOPS`) runs on the device here."""
  if loop not in LOOPS:
    raise ValueError(f"loop={loop!r} is not allowed; allowed: {', '.join(LOOPS)}.")
  if loop == "auto":
    return jax.default_backend() != "cpu"
  return loop == "device"


def effective_kept(
  ranking: ranking_lib.Ranking, target_kept: int, traced, loop: str = "auto"
) -> tuple[int, int, int]:
  """(k, active weights at k, sweeps evaluated) for the largest k along ``ranking``
  whose active weights (effective masks of ``traced``,
  :func:`sparsejax.effective.trace`) are at most ``target_kept``."""
  k, e, n = _searcher(traced, check_loop(loop))(ranking, np.int32(target_kept))
  return int(k), int(e), int(n)


def smallest_connected(ranking: ranking_lib.Ranking, traced, loop: str = "auto") -> int:
  """Fewest active weights of any connected mask along the ranking."""
  k, e, _ = effective_kept(ranking, 0, traced, loop)  # largest k still disconnected
  if e > 0:  # even the first mask of the family is connected (e.g. uniform+)
    return e
  sweep = effective_lib.compiled_sweep(traced)
  return masks_lib.count(sweep(ranking_lib.masks_at(ranking, k + 1)).masks)[0]


__all__ = [
  "PRUNING_TYPES",
  "check_pruning_type",
  "BOUND_WINDOW",
  "LOOPS",
  "Family",
  "SearchState",
  "WeightFamily",
  "search",
  "propose",
  "update",
  "effective_kept",
  "smallest_connected",
  "check_loop",
]
