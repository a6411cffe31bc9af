"""The two semantics of a connectivity Program: reachability and SynFlow's linearization.

Reachability (effective masks, units). 'x' values carry binary reach indicators
(float32 in {0, 1}); parameters carry their nonzero pattern (the mask at prunable
kernels, ones everywhere else: biases and normalization parameters never cut a path,
not even a zero-initialized scale); constants carry their value (their nonzero pattern
where they are a linear op's weight). ``gate`` maps every sum back to {0, 1} in the
forward pass (1[v > 0]) and its cotangent in the backward pass (1[g > 0]), so one
forward and one vjp give reach(u) and coreach(u) for every unit, exact in float32 at
any depth. By primitive family, for an 'x' result:

- linear ops with one parameter/constant operand (``dot_general``,
  ``conv_general_dilated`` with any padding, strides, lhs/rhs dilation,
  ``feature_group_count``/``batch_group_count``): the same op on (reach, pattern),
  then the gate (computed in the form XLA:CPU runs fastest,
  :func:`sparsejax.connectivity.xla_cpu.reach_linear`, equal to the op's own result).
  Two input-dependent operands (attention scores): OR of everything each output
  reads, op(a, 1) + op(1, b), gated.
- elementwise ops (arithmetic, every activation, comparisons, casts, clamp, select
  with an input-dependent predicate): with one 'x' operand reach passes unchanged
  (bias add, scale, inference batch norm, ReLU, ...); with several, their OR (residual
  add, products, max, gating).
- reductions and pooling (``reduce_sum/max/min/prod/and/or``, ``argmax/argmin``,
  ``reduce_window*`` of any kind, cumulative ops, ``sort``, ``top_k``): every position
  of the window or axis is connected (a sum of indicators, gated); padding is never
  a unit. Statistics of the input itself (layer norm, group norm, training-mode batch
  norm) therefore connect every unit they reduce over.
- structure (reshape, transpose, broadcast, squeeze, expand_dims, slice, pad, rev,
  concatenate, split, copy, gather / dynamic_slice / dynamic_update_slice / scatter
  with constant indices, select with a constant predicate): the same op on the
  indicators; a non-'x' operand (a learned token, padding) is unreachable (zeros).

Linearized (SynFlow, Tanaka et al., 2020). 'x' values carry real flows; parameters
|w| (times the mask at prunable kernels); the input is all ones. Linear ops are
applied as such; an elementwise op with one 'x' operand is the identity (activations,
normalization, bias: biases are zero); several 'x' operands that are pointwise
functions of one tensor (gelu = x * phi(x), relu as select(x > 0, x, 0)) give that
tensor (the activation is the identity); a sum of different tensors is a sum (residual
add); sum pooling and reductions sum; max/min pooling and reductions average. A
subtraction or product of two different input-dependent tensors (layer norm,
attention, gating) has no faithful linearization: ValueError. Overflow is prevented
by dividing by a stop-gradient max |v| only at *cuts* of the traced graph (values that
dominate the output: every input-to-output path passes through them), which scales R
and every score by one common positive factor and leaves the ranking unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.connectivity import xla_cpu
from sparsejax.connectivity.primitives import (
  ALONG_AXIS,
  COMPARISONS,
  CUMULATIVE,
  ELEMENTWISE,
  LINEAR,
  REDUCTIONS,
  STRUCTURAL,
  WINDOWS,
  unsupported,
)
from sparsejax.connectivity.program import Eqn, Program, bind


@jax.custom_vjp
def gate(v: jax.Array) -> jax.Array:
  """1[v > 0] (float32) whose backward pass is the indicator 1[g > 0]."""
  return (v > 0).astype(jnp.float32)


def _gate_fwd(v):
  return gate(v), None


def _gate_bwd(_, g):
  return ((g > 0).astype(g.dtype),)


gate.defvjp(_gate_fwd, _gate_bwd)


def _bcast(v, shape):
  """``v`` as float32 broadcast to ``shape``."""
  v = jnp.asarray(v, jnp.float32)
  return v if v.shape == tuple(shape) else jnp.broadcast_to(v, shape)


def _nonzero(c):
  """The nonzero pattern of a constant (float32 in {0, 1})."""
  return (jnp.asarray(c) != 0).astype(jnp.float32)


def _structural(e: Eqn, vals: list, is_data: list, fill) -> list:
  """The structural op on indicator/flow arrays; non-data-carrying operands -> zeros."""
  name = e.prim.name
  data = STRUCTURAL[name]
  args = []
  for j, v in enumerate(vals):
    if data is None or j in data:
      args.append(v if is_data[j] else fill(j))
    else:
      args.append(v)
  if name == "pad":
    args[1] = jnp.float32(0)
  return bind(e, *args)


def _window_sum(e: Eqn, v):
  """The sum over each window of the windowed reduction ``e`` (its padding adds 0)."""
  p = e.params
  return lax.reduce_window_sum_p.bind(
    v,
    window_dimensions=tuple(p["window_dimensions"]),
    window_strides=tuple(p["window_strides"]),
    padding=tuple(map(tuple, p["padding"])),
    base_dilation=tuple(p["base_dilation"]),
    window_dilation=tuple(p["window_dilation"]),
  )


def _reduce_axes(e: Eqn):
  p = e.params
  return tuple(p["axes"])


def _along_axis_or(e: Eqn, v):
  """Sort / top_k on indicators: every output reads the whole axis (their OR)."""
  name = e.prim.name
  if name == "sort":
    axis = e.params["dimension"]
  else:  # top_k: the last axis
    axis = v.ndim - 1
  s = gate(jnp.sum(v, axis=axis, keepdims=True))
  return [_bcast(s, a.shape) for a in e.out_avals]


class Evaluator:
  """Evaluates a Program; ``sem`` is 'reach' or 'linear' (the module docstring)."""

  def __init__(self, prog: Program, sem: str):
    self.prog, self.sem = prog, sem

  def run(self, param_vals, extra_vals, x_vals, perturb=None, rescale: bool = False):
    """(outputs, {site: reach indicator}) of the program (traceable)."""
    prog = self.prog
    env = dict(zip(prog.param_ids, param_vals))
    env.update(zip(prog.extra_ids, extra_vals))
    env.update(zip(prog.x_ids, x_vals))
    # origin: (id, value) of the tensor an 'x' value is a pointwise function of.
    origin = {i: (i, env[i]) for i in prog.x_ids}
    reach_at = {}
    site_of = {k: n for n, (k, _) in enumerate(prog.sites)}
    get = lambda i: env[i] if i in env else prog.consts[i]
    for k, e in enumerate(prog.eqns):
      vals = [get(i) for i in e.ins]
      kinds = [prog.kind[i] for i in e.ins]
      if e.kind == "p":
        env.update(zip(e.outs, self.param_eqn(e, vals, kinds)))
        continue
      outs, new_origin = self.input_eqn(e, vals, kinds, [origin.get(i) for i in e.ins])
      if k in site_of and self.sem == "reach":
        reach_at[site_of[k]] = outs[0]
        if perturb is not None:
          outs = [outs[0] + perturb[site_of[k]]]
      if (
        rescale and new_origin is None and e.outs[0] in prog.cuts and e.prim.name not in STRUCTURAL
      ):
        v = outs[0]
        scale = lax.stop_gradient(jnp.max(jnp.abs(v)))
        outs = [v / jnp.where(scale > 0, scale, 1.0)]
      for o, v in zip(e.outs, outs):
        origin[o] = (o, v) if new_origin is None else new_origin
      env.update(zip(e.outs, outs))
    return [env[o] for o in prog.out_ids], reach_at

  # ------------------------------------------------------------------ parameter-only

  def param_eqn(self, e: Eqn, vals, kinds):
    name = e.prim.name
    if self.sem == "linear":  # exact values of |params|
      return bind(e, *vals)
    pats = [v if k == "p" else _nonzero(v) for v, k in zip(vals, kinds)]
    shape = e.out_avals[0].shape
    if name in LINEAR:
      return [gate(bind(e, pats[0], pats[1], preferred_element_type=jnp.float32)[0])]
    if name in STRUCTURAL:
      data = STRUCTURAL[name]
      args = [p if data is None or j in data else v for j, (p, v) in enumerate(zip(pats, vals))]
      return _structural(e, args, [True] * len(args), None)
    if name == "mul":
      return [_bcast(pats[0], shape) * _bcast(pats[1], shape)]
    if name in ELEMENTWISE:
      ps = [
        _bcast(v, a_shape) for v, k, a_shape in zip(pats, kinds, [shape] * len(vals)) if k == "p"
      ]
      out = ps[0] if len(ps) == 1 else gate(sum(ps))
      return [out] * len(e.outs)
    if name in REDUCTIONS:
      return [gate(jnp.sum(pats[0], axis=_reduce_axes(e)))]
    if name in WINDOWS:
      return [gate(_window_sum(e, pats[0]))]
    if name in CUMULATIVE:
      return [gate(_cum(e, pats[0]))]
    if name in ALONG_AXIS:
      return _along_axis_or(e, pats[0])
    raise unsupported(name, e.src, "has no connectivity rule")

  # ------------------------------------------------------------------ input-dependent

  def input_eqn(self, e: Eqn, vals, kinds, origins):
    """(outputs, origin) of an 'x' equation; origin None = a new tensor."""
    name = e.prim.name
    xs = [j for j, k in enumerate(kinds) if k == "x"]
    linear = self.sem == "linear"
    if linear and any(vals[j] is None for j in xs) and name not in ELEMENTWISE:
      raise ValueError(
        f"primitive {name!r} at {e.src} uses a comparison of the input as "
        "data; SynFlow's linearization is not faithful for this model."
      )
    shape = e.out_avals[0].shape
    if name in LINEAR:
      if len(xs) == 2:
        if linear:
          raise ValueError(
            f"primitive {name!r} at {e.src} multiplies two input-dependent "
            "tensors (e.g. attention); SynFlow's linearization is not "
            "faithful for this model."
          )
        a, b = vals[:2]
        y = (
          bind(e, a, jnp.ones_like(b), preferred_element_type=jnp.float32)[0]
          + bind(e, jnp.ones_like(a), b, preferred_element_type=jnp.float32)[0]
        )
        return [gate(y)], None
      args = list(vals[:2])
      w = 1 - xs[0]
      if kinds[w] == "c":
        args[w] = jnp.abs(jnp.asarray(args[w], jnp.float32)) if linear else _nonzero(args[w])
      if linear:
        return [bind(e, *args, preferred_element_type=jnp.float32)[0]], None
      return [gate(xla_cpu.reach_linear(e, *args))], None
    if name in STRUCTURAL:
      is_data = [k == "x" for k in kinds]
      fill = lambda j: jnp.zeros(jnp.shape(vals[j]), jnp.float32)
      outs = _structural(e, vals, is_data, fill)
      if not linear and name in ("scatter-add", "scatter_add"):  # sums of indicators
        outs = [gate(o) for o in outs]
      return outs, None
    if name == "select_n" and kinds[0] == "c":
      cases = [
        vals[j] if kinds[j] == "x" else jnp.zeros(shape, jnp.float32) for j in range(1, len(vals))
      ]
      return bind(e, vals[0], *[_bcast(c, shape) for c in cases]), None
    if name in ELEMENTWISE:
      if linear:
        return self._linear_elementwise(e, vals, xs, origins, shape)
      if len(xs) == 1:
        return [_bcast(vals[xs[0]], a.shape) for a in e.out_avals], origins[xs[0]]
      out = gate(sum(_bcast(vals[j], shape) for j in xs))
      return [out] * len(e.outs), None
    if name in REDUCTIONS:
      v = vals[0]
      if linear:
        if name == "reduce_sum":
          return [jnp.sum(v, axis=_reduce_axes(e))], None
        if name in ("reduce_max", "reduce_min"):
          return [jnp.mean(v, axis=_reduce_axes(e))], None
        raise ValueError(f"primitive {name!r} at {e.src} has no faithful linearization (SynFlow).")
      return [gate(jnp.sum(v, axis=_reduce_axes(e)))], None
    if name in WINDOWS:
      v = vals[0]
      s = _window_sum(e, v)
      if not linear:
        return [gate(s)] * len(e.outs), None
      if name == "reduce_window_sum":
        return [s], None
      if name in ("reduce_window_max", "reduce_window_min"):
        return [s / float(np.prod(e.params["window_dimensions"]))], None
      raise ValueError(f"primitive {name!r} at {e.src} has no faithful linearization (SynFlow).")
    if name in CUMULATIVE:
      if linear:
        if name == "cumsum":
          return [_cum(e, vals[0])], None
        raise ValueError(f"primitive {name!r} at {e.src} has no faithful linearization (SynFlow).")
      return [gate(_cum(e, vals[0]))], None
    if name in ALONG_AXIS:
      if linear:
        raise ValueError(f"primitive {name!r} at {e.src} has no faithful linearization (SynFlow).")
      v = gate(sum(_bcast(vals[j], vals[xs[0]].shape) for j in xs))
      return _along_axis_or(e, v), None
    raise unsupported(name, e.src, "has no connectivity rule")

  def _linear_elementwise(self, e: Eqn, vals, xs, origins, shape):
    name = e.prim.name
    if name in COMPARISONS:  # a predicate: no flow, only its origin
      return [None] * len(e.outs), origins[xs[0]]
    if len(xs) == 1:
      v = vals[xs[0]]
      if v is None:
        return [None] * len(e.outs), origins[xs[0]]
      return [_bcast(v, a.shape) for a in e.out_avals], origins[xs[0]]
    roots = {origins[j][0] for j in xs}
    if len(roots) == 1:  # a pointwise function of one tensor: the activation is the identity
      o = origins[xs[0]]
      return [_bcast(o[1], a.shape) for a in e.out_avals], o
    if name in ("add", "add_any"):
      if any(vals[j] is None for j in xs):
        raise ValueError(
          f"primitive {name!r} at {e.src} adds a comparison of the input; "
          "SynFlow's linearization is not faithful for this model."
        )
      return [sum(_bcast(vals[j], shape) for j in xs)], None
    raise ValueError(
      f"primitive {name!r} at {e.src} combines two different input-dependent "
      "tensors (a subtraction such as layer norm's, or a product of "
      "activations); SynFlow's linearization is not faithful for this model."
    )


def _cum(e: Eqn, v):
  """The cumulative sum along the axis of the cumulative op ``e``."""
  p = e.params
  return lax.cumsum(v, axis=p["axis"], reverse=p.get("reverse", False))
