"""Exact effective masks by one binary connectivity sweep (method.md section 1).

A weight is *active* when it is unmasked and lies on a directed input-to-output
path of the unit-level graph (convolutions unrolled over positions, every pooling
position connected). With reach(u) = "u is reachable from the input" and
coreach(u) = "u reaches an output":

    reach(v)   = OR_{u -> v unmasked} reach(u)        (inputs are reachable)
    coreach(u) = OR_{u -> v unmasked} coreach(v)      (outputs are co-reachable)
    active(w: u -> v) = mask(w) AND reach(u) AND coreach(v)

Both ORs are one forward and one backward pass of the model's traced program under
reachability semantics (:mod:`sparsejax.connectivity`): weights = mask, every other
parameter a pattern of ones, every sum gated back to {0, 1} forward and backward.
The kernel gradient of that pass is sum_positions reach(u) * coreach(v), positive
exactly for active (or potentially active) weights. Values stay binary, so the
result is exact in float32 for any depth. A unit is active when reach AND coreach.

Models: a Flax module (zoo or user-written; ``variables`` optional, its
``apply(variables, x, **apply_kwargs)`` is traced), any function ``apply(params, x)``
with ``params=``, or a :class:`sparsejax.Traced` (:mod:`sparsejax.tracing`). Inputs: one
example's shape without the batch axis (batch 1 is added), or an example input array
(used with its shape as given). The mask tree is the prunable set.

Argument convention (as everywhere in the library): the model first, then its
``variables`` where values are read, then ``masks``; ``input_shape`` and everything
else by keyword (``input_shape`` may also be the third positional argument here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import compilation, tracing
from sparsejax import connectivity as conn_lib
from sparsejax import masks as masks_lib
from sparsejax.connectivity import Connectivity
from sparsejax.tracing import Traced, example_input, trace  # noqa: F401  (moved there)

Masks = Any


def _is_none(x) -> bool:
  return x is None


def _flat_masks(masks, traced: Traced) -> list:
  """The masks of the prunable leaves (in ``traced.prunable`` order), read along the
  params' tree (where a params tree holds None, the masks do too)."""
  flat = traced.params_spec[0].flatten_up_to(masks)
  return [flat[i] for i in traced.prunable]


def _total_inputs(traced: Traced) -> int:
  return int(sum(np.prod(s) for s in traced.program.x_shapes))


def sweep_of(traced: Traced, units: bool = True) -> Callable[[Masks], Connectivity]:
  """The pure, jit-able sweep ``masks -> Connectivity`` of a traced model."""
  raw = conn_lib.reach_sweep(traced.program, traced.prunable, units)
  total_inputs = _total_inputs(traced)

  treedef = traced.params_spec[0]

  def sweep(masks: Masks) -> Connectivity:
    pot, active, active_inputs, total = raw(_flat_masks(masks, traced))
    leaves = [None] * treedef.num_leaves
    for i, p in zip(traced.prunable, pot):
      leaves[i] = p
    potential = treedef.unflatten(leaves)
    effective = masks_lib.map_masks(lambda m, live: m & live, masks, potential)
    if not units:
      return Connectivity(effective, potential, {}, None, conn_lib._FrozenDict(), 0)
    return Connectivity(
      effective, potential, active, active_inputs, conn_lib._FrozenDict(total), total_inputs
    )

  return sweep


def connectivity_sweep(
  model, input_shape=None, units: bool = True, **kw
) -> Callable[[Masks], Connectivity]:
  """The pure, jit-able sweep ``masks -> Connectivity`` for ``model`` on one example
  of ``input_shape`` (keywords as :func:`trace`). For use inside other jitted code (no
  mask validation). ``units=False`` skips the unit counts (active_units and
  active_inputs are then empty / None), which is what searches that only need the
  masks want."""
  return sweep_of(tracing.trace(model, input_shape, **kw), units)


class SweepResult(NamedTuple):
  """What the compiled connectivity program returns: ``masks`` and ``potential`` as in
  :class:`Connectivity`; ``counts`` int32 [sites + 1]: the active units of each linear
  op (traced order) and, last, the active inputs."""

  masks: Masks
  potential: Masks
  counts: jax.Array


@functools.lru_cache(maxsize=64)
def compiled_sweep(traced: Traced) -> Callable[[Masks], SweepResult]:
  """The jitted sweep (masks and unit counts) of a traced model: the one connectivity
  program per (model, input shape, mask structure), shared by :func:`connectivity`,
  :func:`effective_masks`, :func:`active_units` and the effective-target search. Its
  unit counts leave the program as one vector: every output of a compiled program
  costs its own dispatch (a dict of 34 scalars took 0.3 ms of the ViT's 2 ms call)."""
  sweep = sweep_of(traced)

  def connectivity_sweep(masks: Masks) -> SweepResult:
    conn = sweep(masks)
    counts = [conn.active_units[k] for k in conn.total_units] + [conn.active_inputs]
    return SweepResult(conn.masks, conn.potential, jnp.stack(counts).astype(jnp.int32))

  return compilation.jit(connectivity_sweep)


def _masked(model, masks, input_shape, kw) -> Traced:
  """The model traced (or the Traced given) and narrowed to the masks' leaves."""
  if "prunable" in kw:
    raise ValueError(
      f"prunable={kw['prunable']!r} is not taken here: the mask tree is the prunable set "
      "(a weight whose mask is None is not pruned and not counted)."
    )
  return tracing.trace(model, input_shape, **kw).masked(masks)


def connectivity(model, masks: Masks, input_shape=None, **kw) -> Connectivity:
  """Effective masks and active units of ``model`` under ``masks``.

  Args:
    model: a Flax module (zoo or user-written), a function ``apply(params, x)``, or a
      :class:`sparsejax.Traced` (then ``input_shape`` and ``**kw`` are left out).
    masks: bool masks shaped like the model's params (None at non-prunable leaves). The
      mask tree is the prunable set: its leaves must be linear-op weights; a weight
      without a mask is not pruned and not counted.
    input_shape: one example's shape without the batch axis, e.g. (32, 32, 3), or an
      example input array.
    **kw: ``variables=``, ``params=``, ``apply_kwargs=`` (see :func:`sparsejax.trace`).
  """
  traced = _masked(model, masks, input_shape, kw)
  result = compiled_sweep(traced)(masks)
  counts = np.asarray(result.counts).tolist()
  total = conn_lib.unit_totals(traced.program)  # traced (input-to-output) order
  return Connectivity(
    result.masks,
    result.potential,
    dict(zip(total, counts[:-1])),
    counts[-1],
    conn_lib._FrozenDict(total),
    _total_inputs(traced),
  )


@functools.lru_cache(maxsize=64)
def _jitted_channels(traced: Traced):
  return jax.jit(conn_lib.channel_sweep(traced.program, traced.prunable))


def channel_reach(model, masks: Masks, input_shape=None, **kw) -> dict[str, tuple]:
  """{layer path: (reach, coreach)} per linear op, input-to-output order: bool numpy
  vectors over the op's output channels (last axis), reach[c] = an unmasked path from
  the input reaches channel c at some position, coreach[c] = an unmasked path leads from
  channel c at some position to an output. Arguments as :func:`connectivity`."""
  traced = _masked(model, masks, input_shape, kw)
  maps = _jitted_channels(traced)(_flat_masks(masks, traced))
  names = conn_lib.site_names(traced.program)
  return {n: (np.asarray(maps[n][0]), np.asarray(maps[n][1])) for n in names}


def effective_masks(model, masks: Masks, input_shape=None, **kw) -> Masks:
  """The active weights: unmasked and on some input-to-output path (bool, like masks).

  active(w: u -> v) = mask(w) AND reach(u) AND coreach(v) (method.md section 1).
  Arguments as :func:`connectivity`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import sparsejax
    >>> from sparsejax import effective, masks, models
    >>> model = models.create("lenet300100")
    >>> traced = sparsejax.trace(model, (28, 28, 1))
    >>> m = traced.ones()
    >>> m["dense_1"]["kernel"] = jnp.zeros_like(m["dense_1"]["kernel"])  # cut layer 2
    >>> eff = effective.effective_masks(traced, m)
    >>> int(eff["dense_0"]["kernel"].sum()), int(eff["dense_2"]["kernel"].sum())
    (0, 0)
  """
  # the one connectivity program (compiled_sweep), without fetching its unit counts
  return compiled_sweep(_masked(model, masks, input_shape, kw))(masks).masks


def effective_sparsity(model, masks: Masks, input_shape=None, **kw) -> float:
  """1 - active weights / prunable weights (1.0 for a disconnected network)."""
  return masks_lib.direct_sparsity(effective_masks(model, masks, input_shape, **kw))


def effective_compression(model, masks: Masks, input_shape=None, **kw) -> float:
  """1 / effective density; inf for a disconnected network."""
  return masks_lib.compression(effective_masks(model, masks, input_shape, **kw))


def active_units(model, masks: Masks, input_shape=None, **kw) -> dict[str, tuple[int, int]]:
  """{layer path: (active, total)} output units per linear op, input-to-output order."""
  c = connectivity(model, masks, input_shape, **kw)
  return {k: (c.active_units[k], c.total_units[k]) for k in c.active_units}


# The traced model's own views, kept here for one version (use sparsejax.trace).
def prunable_paths(model, input_shape=None, **kw) -> list[str]:
  """Paths of the prunable leaves in input-to-output order (``trace(...).prunable_paths``)."""
  return tracing.trace(model, input_shape, **kw).prunable_paths


def ones(model, input_shape=None, **kw) -> Masks:
  """The dense mask of ``model`` (``trace(...).ones()``)."""
  return tracing.trace(model, input_shape, **kw).ones()


def flow_order(model, input_shape=None, **kw) -> tuple[int, ...]:
  """The prunable layers in input-to-output order (``trace(...).flow``)."""
  return tracing.trace(model, input_shape, **kw).flow
