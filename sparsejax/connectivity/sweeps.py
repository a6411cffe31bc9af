"""The sweeps built on the connectivity semantics: jit-able functions of the kernel masks
(or |kernels|) of one traced Program, and their results.

- :func:`reach_sweep`: effective masks' potential, active units per linear op, active
  inputs (one forward and one backward reachability pass);
- :func:`channel_sweep`: reach / coreach per channel of each linear op;
- :func:`position_counts`: live multiply-accumulates per weight (FLOPs);
- :func:`linear_scores`: SynFlow's scores on the linearized program.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.connectivity.program import Program
from sparsejax.connectivity.semantics import Evaluator

Masks = Any


@flax.struct.dataclass
class Connectivity:
  """Result of one sweep.

  masks: effective masks (bool, shaped like the input masks).
  potential: weights that are or would be active if unmasked: some position joins a
    reachable source unit to a co-reachable destination unit (bool, like masks).
  active_units: {layer path: number of active output units} per linear op (Dense,
    Conv, ...) in traced (input-to-output) order; a unit is one neuron, or one channel
    at one position.
  total_units: {layer path: number of output units}.
  active_inputs / total_inputs: input units (e.g. pixels x channels) on some path.
  """

  masks: Masks
  potential: Masks
  active_units: dict
  active_inputs: Any
  total_units: dict = flax.struct.field(pytree_node=False)
  total_inputs: int = flax.struct.field(pytree_node=False)


class _FrozenDict(dict):
  """A hashable dict for static pytree metadata."""

  def __hash__(self):
    return hash(tuple(self.items()))


def site_names(prog: Program) -> list[str]:
  """A layer name per linear op on the input: the weight's path without its last key."""
  names, seen = [], {}
  for k, leaf in prog.sites:
    if leaf is None:
      base = f"{prog.eqns[k].prim.name}@{k}"
    else:
      path = prog.param_paths[leaf]
      base = path.rsplit("/", 1)[0] if "/" in path else path
    seen[base] = seen.get(base, 0) + 1
    names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
  return names


def unit_totals(prog: Program) -> dict[str, int]:
  """{layer name: output units} per linear op on the input, in traced order."""
  shapes = [prog.eqns[k].out_avals[0].shape for k, _ in prog.sites]
  return {n: int(np.prod(s)) for n, s in zip(site_names(prog), shapes)}


def reach_sweep(prog: Program, prunable: Sequence[int], units: bool = True):
  """The pure, jit-able sweep ``(kernel masks, extra values) -> results``.

  ``prunable``: flat param leaf indices that carry masks (others carry ones). The
  sweep takes the masks of those leaves (bool, in ``prunable`` order) and returns
  (potential per prunable leaf, active units per site, active inputs) -- the last two
  only with ``units``.
  """
  ev = Evaluator(prog, "reach")
  prunable = tuple(prunable)
  names = site_names(prog)

  def sweep(masks: Sequence[jax.Array]):
    params_with, kernels, extra, xs = _reach_inputs(prog, prunable, masks)
    if not units:

      def f(ks):
        outs, _ = ev.run(params_with(ks), extra, xs)
        return outs

      outs, vjp = jax.vjp(f, kernels)
      (g,) = vjp([jnp.ones_like(o) for o in outs])
      return [gk > 0 for gk in g], {}, None, {}

    g, reach, g_pert, g_x = _site_pass(ev, prog, params_with, kernels, extra, xs)
    active = {n: jnp.sum((r > 0) & (gp > 0)) for n, r, gp in zip(names, reach, g_pert)}
    active_inputs = sum(jnp.sum(gx > 0) for gx in g_x)
    return [gk > 0 for gk in g], active, active_inputs, unit_totals(prog)

  return sweep


def _reach_inputs(prog: Program, prunable: tuple, masks: Sequence[jax.Array]):
  """(params_with, kernels, extra, xs) of a reachability pass: the masks as float32
  patterns at the ``prunable`` leaves, ones at every other parameter, extra value and
  input; ``params_with(ks)`` puts ``ks`` at the prunable leaves (differentiable)."""
  pats = [jnp.ones(s, jnp.float32) for s in prog.param_shapes]

  def params_with(ks):
    ps = list(pats)
    for i, k in zip(prunable, ks):
      ps[i] = k
    return ps

  kernels = [m.astype(jnp.float32) for m in masks]
  extra = [jnp.ones(s, jnp.float32) for s in prog.extra_shapes]
  xs = [jnp.ones(s, jnp.float32) for s in prog.x_shapes]
  return params_with, kernels, extra, xs


def _site_pass(ev: Evaluator, prog: Program, params_with, kernels, extra, xs):
  """One forward and one backward reachability pass with a zero perturbation at every
  site: (cotangents of ``kernels`` (``params_with(kernels)`` = all params), reach per
  site, coreach per site (the perturbation's cotangent), input cotangents)."""
  shapes = [a.shape for a in (prog.eqns[k].out_avals[0] for k, _ in prog.sites)]
  perturb = [jnp.zeros(s, jnp.float32) for s in shapes]

  def f(ks, pert, xs):
    outs, reach_at = ev.run(params_with(ks), extra, xs, perturb=pert)
    return outs, [reach_at[n] for n in range(len(prog.sites))]

  outs, vjp, reach = jax.vjp(f, kernels, perturb, xs, has_aux=True)
  g, g_pert, g_x = vjp([jnp.ones_like(o) for o in outs])
  return g, reach, g_pert, g_x


def channel_sweep(prog: Program, prunable: Sequence[int]):
  """The pure, jit-able ``kernel masks -> {site name: (reach, coreach)}``: bool vectors
  over each linear op's last output axis (channels, features), reach[c] = some unit of
  channel c (at some position) is reachable from the input, coreach[c] = some unit of
  channel c reaches an output (method.md section 1)."""
  ev = Evaluator(prog, "reach")
  prunable = tuple(prunable)
  names = site_names(prog)

  def sweep(masks: Sequence[jax.Array]):
    _, reach, coreach, _ = _site_pass(ev, prog, *_reach_inputs(prog, prunable, masks))
    lead = lambda v: tuple(range(v.ndim - 1))
    return {
      n: (jnp.any(r > 0, axis=lead(r)), jnp.any(c > 0, axis=lead(c)))
      for n, r, c in zip(names, reach, coreach)
    }

  return sweep


def position_counts(prog: Program, prunable: Sequence[int]):
  """The pure, jit-able ``kernel masks -> [counts per prunable leaf]``: for each weight,
  the number of output positions at which it joins a reachable source unit to a
  co-reachable destination unit (sum_positions reach(u) coreach(v), float32, exact
  below 2**24), times its mask: the multiply-accumulates it does on a live path (a
  lookup's row reads count none)."""
  ev = Evaluator(prog, "reach", macs=True)
  prunable = tuple(prunable)

  def counts(masks: Sequence[jax.Array]):
    params_with, kernels, extra, xs = _reach_inputs(prog, prunable, masks)
    g, _, _, _ = _site_pass(ev, prog, params_with, kernels, extra, xs)
    return [gk * k for gk, k in zip(g, kernels)]

  return counts


def linear_scores(prog: Program, prunable: Sequence[int]):
  """SynFlow's one-round scores ``(|kernels|, alive, |params|) -> [|dR/dw * w|]``.

  R = sum of the outputs of the linearized program (:mod:`sparsejax.connectivity.semantics`) on an
  all-ones input, with w = |kernel| * alive at the ``prunable`` leaves and |p| at the
  other parameters; rescaled only at cuts, so the scores are the true ones times one
  common positive factor (traceable).
  """
  ev = Evaluator(prog, "linear")
  prunable = tuple(prunable)

  def scores(abs_kernels, alive, abs_params, extra):
    weights = [jnp.where(a, w, 0.0).astype(jnp.float32) for w, a in zip(abs_kernels, alive)]
    xs = [jnp.ones(s, jnp.float32) for s in prog.x_shapes]

    def f(ws):
      ps = list(abs_params)
      for i, w in zip(prunable, ws):
        ps[i] = w
      outs, _ = ev.run(ps, extra, xs, rescale=True)
      return sum(jnp.sum(o) for o in outs)

    g = jax.grad(f)(weights)
    return [jnp.abs(gi * w) for gi, w in zip(g, weights)]

  return scores
