"""The semantics of a connectivity Program: reachability, support, SynFlow's linearization.

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
- lookups (a gather of rows of a parameter table at input-dependent indices:
  ``nn.Embed``, ``jnp.take``): a linear op over a one-hot vocabulary axis whose every
  row can occur; output unit (position, d) is reached when its index is, through any
  kept row of column d; the cotangent reaches every row of a column.
- products of two input-dependent values (attention's ``q @ k.T`` and ``probs @ v``,
  a gate times an up-projection, a division): a path through one factor counts only
  where the other can be nonzero, reach(a b) = OR(reach(a) nz(b), nz(a) reach(b)),
  reach(a / b) = OR(reach(a), nz(a) reach(b)), with nz from the *support* semantics
  below (a head whose value projection is pruned makes its query and key ineffective).
- other elementwise ops (arithmetic, every activation, comparisons, casts, clamp,
  select with an input-dependent predicate): with one 'x' operand reach passes
  unchanged (bias add, scale, inference batch norm, ReLU, ...); with several, their OR
  (residual add, max).
- reductions and pooling (``reduce_sum/max/min/prod/and/or``, ``argmax/argmin``,
  ``reduce_window*`` of any kind, cumulative ops, ``sort``, ``top_k``): every position
  of the window or axis is connected (a sum of indicators, gated); padding is never
  a unit. Statistics of the input itself (layer norm, group norm, training-mode batch
  norm) therefore connect every unit they reduce over.
- structure (reshape, transpose, broadcast, squeeze, expand_dims, slice, pad, rev,
  concatenate, stack, split, tile, copy, gather / dynamic_slice / dynamic_update_slice /
  scatter with constant indices, select with a constant predicate): the same op on the
  indicators; a non-'x' operand (a learned token, padding) is unreachable (zeros).
- dynamic reads (a gather or dynamic slice of activations at positions that depend on
  the input: ``jnp.roll`` by a sequence's length, top-k routing): any position of the
  read axes can be read, so output unit u is reached when some position of its read
  axes is, or when its index is (the index changes the output, with no gradient):
  reach = OR(OR over the read axes of reach(data), reach(index)). An
  over-approximation where only some positions can occur, never a dropped weight.
  Dynamic writes (``dynamic_update_slice``/``scatter`` at input positions) are refused.

Support (nz: where a value can be nonzero for some input, float32 {0, 1}; read by the
reachability of products, only for programs that have them). The input can be nonzero
anywhere; parameters where their pattern says (pruned weights cannot); constants where
they are nonzero. Linear ops and lookups: OR of AND over the terms; mul: AND; div: the
numerator's; add, sub, max, min, select: OR; functions with f(0) = 0 (neg, abs, tanh,
sqrt, erf, casts, ...): the operand's; any other function (exp, logistic, cos,
comparisons): anywhere (f(0) may be nonzero). Conservative wherever a rule cannot say:
biases count as nonzero, so a head with a dead value projection but a value bias keeps
its query and key (its output, the bias averaged, is constant: an over-approximation,
never a dropped weight).

Linearized (SynFlow, Tanaka et al., 2020). 'x' values carry real flows; parameters
|w| (times the mask at prunable kernels); the input is all ones (for token ids: every
row of a lookup at once, the all-ones input of the one-hot vocabulary axis). Linear
ops are applied as such; an elementwise op with one 'x' operand is the identity
(activations, inference batch norm, bias: biases are zero, scales their initial 1);
several 'x' operands that are pointwise functions of one tensor (gelu = x * phi(x),
relu as select(x > 0, x, 0)) give that tensor (the activation is the identity); a sum
of different tensors is a sum (residual add); sum pooling and reductions sum; max/min
pooling and reductions average. Conventions for what has no linear counterpart:

- normalization by statistics of the input (layer norm, RMS norm, group norm,
  training-mode batch norm, softmax's ``exp(s - max s) / sum``): a tensor combined
  with statistics of itself (values reduced from it, or from a reshape of it) is read
  as the identity, as SynFlow reads inference batch norm;
- products of two input-dependent tensors (attention scores and their weighting of the
  values, gating): the product of the two flows, so R stays a polynomial in |w| with
  non-negative coefficients (scores |w dR/dw| defined, non-negative, and zero exactly
  where a weight lies on no path; attention reads as its scores, softmax being a
  normalization); ``exp`` of a flow is 1 + v (a softmax of zero scores is uniform, not
  zero, so a query that carries no flow, a learned class token's, still passes its
  values on);
- predicates of the input (a padding mask ``ids > 0``) reshaped or broadcast stay
  predicates, and select/multiply by one passes the flow unchanged;
- dynamic reads: the mean of the flow over the read axes (a permutation of positions
  keeps R);
- a subtraction or division of two different input-dependent tensors has no faithful
  linearization: ValueError naming the user's line.

Overflow is prevented by dividing by a stop-gradient max |v| only at *cuts* of the
traced graph (values that dominate the output: every input-to-output path passes
through them). For a network linear in its input this scales R and every score by one
common positive factor and leaves the ranking unchanged; with products (a polynomial
of several degrees in a cut value) it weighs the degrees differently, a fixed
reweighting that keeps every score defined and its zeros where they are. Each factor of
a product of two flows is divided the same way (there is no cut between them: an LSTM's
gates multiply flows of the carry at every step, so R's degree grows with the length).
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
  ZERO_PRESERVING,
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


def _read_anywhere(e: Eqn, data, vals, combine) -> jax.Array:
  """A gather or dynamic slice whose positions depend on the input (``e.reads``: the
  operand's axes read there) reads any position: ``combine`` (a gate, a sum or a mean)
  of ``data`` over those axes, spread back over them and read at index 0 (float32, the
  output's shape). ``vals``: the equation's operands (for the index shapes)."""
  data = jnp.asarray(data, jnp.float32)
  spread = jnp.broadcast_to(combine(data, e.reads), data.shape)
  if e.prim.name == "gather":
    return bind(e, spread, jnp.zeros(jnp.shape(vals[1]), jnp.int32))[0]
  starts = [jnp.zeros((), jnp.int32) for _ in vals[1:]]  # dynamic_slice
  return bind(e, spread, *starts)[0]


def _index_reach(e: Eqn, vals, kinds) -> jax.Array:
  """The reach of a dynamic read's input-dependent indices (OR over each index vector,
  or over the start indices) at every output position."""
  out_shape = e.out_avals[0].shape
  if e.prim.name == "gather":
    if kinds[1] != "x":
      return jnp.zeros(out_shape, jnp.float32)
    r = gate(jnp.sum(jnp.asarray(vals[1], jnp.float32), axis=-1))
    offset = set(e.params["dimension_numbers"].offset_dims)
    batch = [d for d in range(len(out_shape)) if d not in offset]
    return lax.broadcast_in_dim(r, out_shape, batch)
  starts = [jnp.asarray(v, jnp.float32) for v, k in zip(vals[1:], kinds[1:]) if k == "x"]
  return jnp.broadcast_to(gate(sum(starts, jnp.float32(0))), out_shape)


def _or_over(v, axes):
  return gate(jnp.sum(v, axis=axes, keepdims=True))


def _sum_over(v, axes):
  return jnp.sum(v, axis=axes, keepdims=True)


def _mean_over(v, axes):
  return jnp.mean(v, axis=axes, keepdims=True)


def _support_elementwise(e: Eqn, nzs: list, shape) -> list:
  """Where an elementwise op's output can be nonzero, from its operands' (``nzs``)."""
  name = e.prim.name
  nzs = [_bcast(v, shape) for v in nzs]
  if name == "mul":
    out = nzs[0] * nzs[1]
  elif name == "div":
    out = nzs[0]
  elif name in ZERO_PRESERVING:
    out = nzs[0]
  elif name in ("add", "add_any", "sub", "max", "min", "clamp", "select_n"):
    cases = nzs[1:] if name == "select_n" else nzs
    out = gate(sum(cases))
  else:  # exp, cos, logistic, comparisons, ...: f(0) may be nonzero
    out = jnp.ones(shape, jnp.float32)
  return [out] * len(e.outs)


#: Structural ops that only rearrange one tensor (their output is a view of it).
_VIEWS = frozenset({"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims"})


class Evaluator:
  """Evaluates a Program; ``sem`` is 'reach', 'linear' or 'support' (the module
  docstring). A reach run first makes a support run when the program multiplies two
  input-dependent values (:attr:`Program.products`): a path through one factor counts
  only where the other can be nonzero."""

  def __init__(self, prog: Program, sem: str, macs: bool = False):
    """``macs``: the reach pass counts multiply-accumulates (a lookup reads a table
    row and multiplies nothing: its table gets no cotangent from it)."""
    self.prog, self.sem, self.macs = prog, sem, macs

  def run(self, param_vals, extra_vals, x_vals, perturb=None, rescale: bool = False):
    """(outputs, {site: reach indicator}) of the program (traceable)."""
    prog = self.prog
    self.rescale = rescale
    self.support = None
    if self.sem == "reach" and prog.products:
      nz = Evaluator(prog, "support").values(
        *(jax.tree.map(lax.stop_gradient, v) for v in (param_vals, extra_vals, x_vals))
      )
      self.support = lambda i: nz[i] if i in nz else _nonzero(prog.consts[i])
    env = dict(zip(prog.param_ids, param_vals))
    env.update(zip(prog.extra_ids, extra_vals))
    env.update(zip(prog.x_ids, x_vals))
    # origin: (id, value) of the tensor an 'x' value is a pointwise function of;
    # stat_of: the tensor (origin id) an 'x' value is a statistic of (linear semantics).
    origin = {i: (i, env[i]) for i in prog.x_ids}
    self.stat_of, self.family = {}, {}
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

  def values(self, param_vals, extra_vals, x_vals) -> dict:
    """Support semantics: {value id: float32 {0, 1}}, 1 where the value can be nonzero
    (parameters: their pattern; the input: anywhere; constants: their nonzero
    pattern, read where needed)."""
    prog = self.prog
    env = dict(zip(prog.param_ids, param_vals))
    env.update(zip(prog.extra_ids, extra_vals))
    env.update(zip(prog.x_ids, x_vals))
    get = lambda i: env[i] if i in env else prog.consts[i]
    for e in prog.eqns:
      vals = [get(i) for i in e.ins]
      kinds = [prog.kind[i] for i in e.ins]
      if e.kind == "p":
        env.update(zip(e.outs, self.param_eqn(e, vals, kinds)))
      else:
        env.update(zip(e.outs, self.support_eqn(e, vals, kinds)))
    return env

  # ------------------------------------------------------------------ parameter-only

  def param_eqn(self, e: Eqn, vals, kinds):
    name = e.prim.name
    if self.sem == "linear":  # exact values of |params|
      return bind(e, *vals)
    pats = [v if k == "p" else _nonzero(v) for v, k in zip(vals, kinds)]
    shape = e.out_avals[0].shape
    if name in LINEAR:
      return [gate(bind(e, pats[0], pats[1], preferred_element_type=jnp.float32)[0])]
    if e.reads:  # a parameter read at positions that depend on other parameters
      return [_read_anywhere(e, pats[0], vals, _or_over)]
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

  # ------------------------------------------------------------------ support

  def support_eqn(self, e: Eqn, vals, kinds):
    """Where an 'x' equation's outputs can be nonzero (float32 {0, 1}), from where its
    operands can (``vals``: the input and parameters as support values, constants as
    themselves). Conservative: 1 wherever a rule cannot say."""
    name = e.prim.name
    shape = e.out_avals[0].shape
    nzs = [_nonzero(v) if k == "c" else v for v, k in zip(vals, kinds)]
    if e.reads:  # any position can be read: where some position can be nonzero
      return [_read_anywhere(e, nzs[0], vals, _or_over)]
    if name in LINEAR:
      return [gate(bind(e, nzs[0], nzs[1], preferred_element_type=jnp.float32)[0])]
    if name in STRUCTURAL:  # the op on the data operands' support, indices as they are
      outs = _structural(e, vals, [k != "c" for k in kinds], lambda j: _nonzero(vals[j]))
      return [gate(o) for o in outs] if name in ("scatter-add", "scatter_add") else outs
    if name == "select_n" and kinds[0] == "c":
      return bind(e, vals[0], *[_bcast(v, shape) for v in nzs[1:]])
    if name in ELEMENTWISE:
      return _support_elementwise(e, nzs, shape)
    if name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_or"):
      return [gate(jnp.sum(nzs[0], axis=_reduce_axes(e)))]
    if name in WINDOWS:
      return [gate(_window_sum(e, nzs[0]))] * len(e.outs)
    if name in ("cumsum", "cummax", "cummin"):
      return [gate(_cum(e, nzs[0]))]
    if name in ALONG_AXIS:
      return _along_axis_or(e, nzs[0])
    return [jnp.ones(a.shape, jnp.float32) for a in e.out_avals]

  # ------------------------------------------------------------------ input-dependent

  def input_eqn(self, e: Eqn, vals, kinds, origins):
    """(outputs, origin) of an 'x' equation; origin None = a new tensor."""
    name = e.prim.name
    xs = [j for j, k in enumerate(kinds) if k == "x"]
    linear = self.sem == "linear"
    if linear and xs and all(vals[j] is None for j in xs) and name in STRUCTURAL:
      return [None] * len(e.outs), origins[xs[0]]  # a predicate reshaped stays one
    if linear and any(vals[j] is None for j in xs) and name not in ELEMENTWISE:
      raise ValueError(
        f"primitive {name!r} at {e.src} uses a comparison of the input as "
        "data; SynFlow's linearization is not faithful for this model."
      )
    shape = e.out_avals[0].shape
    if e.reads:  # positions that depend on the input: any of them can be read
      if e.lookup:  # a table: a linear op over a one-hot vocabulary axis (module docstring)
        table = (
          vals[0]
          if kinds[0] == "p"
          else (jnp.abs(jnp.asarray(vals[0], jnp.float32)) if linear else _nonzero(vals[0]))
        )
        rows = _read_anywhere(e, table, vals, _sum_over if linear else _or_over)
        if self.macs:
          rows = lax.stop_gradient(rows)
        return [rows if linear else rows * _index_reach(e, vals, kinds)], None
      data = vals[0] if kinds[0] == "x" else jnp.zeros(jnp.shape(vals[0]), jnp.float32)
      if linear:  # a permutation of positions keeps R: the mean over them
        return [_read_anywhere(e, data, vals, _mean_over)], None
      rows = _read_anywhere(e, data, vals, _or_over)
      return [gate(rows + _index_reach(e, vals, kinds))], None
    if name in LINEAR:
      if len(xs) == 2:
        a, b = vals[:2]
        if linear:  # attention: the product of the two flows (module docstring)
          a, b = self._scaled(a), self._scaled(b)
          return [bind(e, a, b, preferred_element_type=jnp.float32)[0]], None
        if self.support is None:
          na, nb = jnp.ones_like(a), jnp.ones_like(b)
        else:
          na, nb = self.support(e.ins[0]), self.support(e.ins[1])
        y = (
          bind(e, a, nb, preferred_element_type=jnp.float32)[0]
          + bind(e, na, b, preferred_element_type=jnp.float32)[0]
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
      if linear and any(self.stat_of.get(e.ins[j]) is not None for j in xs):
        for o in e.outs:  # a statistic broadcast or reshaped stays one
          self.stat_of[o] = self.stat_of[e.ins[xs[0]]]
      elif linear and len(xs) == 1 and name in _VIEWS:
        for o in e.outs:  # a reshape of a tensor: its statistics normalize it too
          self.family[o] = self._family(origins[xs[0]][0])
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
      if self.support is not None and name in ("mul", "div") and len(xs) == 2:
        a, b = (_bcast(vals[j], shape) for j in xs)
        na, nb = (_bcast(self.support(e.ins[j]), shape) for j in xs)
        # a * b: each factor's path counts where the other can be nonzero; a / b: zero
        # wherever a is, so b's path counts only where a can be nonzero.
        out = gate(a * nb + na * b) if name == "mul" else gate(a + na * b)
        return [out] * len(e.outs), None
      out = gate(sum(_bcast(vals[j], shape) for j in xs))
      return [out] * len(e.outs), None
    if name in REDUCTIONS:
      v = vals[0]
      if linear:
        self.stat_of.update({o: self._family(origins[0][0]) for o in e.outs})  # candidate
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

  def _scaled(self, v):
    """A factor of a product of two flows divided by its stop-gradient max (with
    ``rescale``): products have no cut between them (recurrences, two towers), so their
    degree would grow unchecked; a fixed positive reweighting, as at cuts."""
    if not self.rescale:
      return v
    scale = lax.stop_gradient(jnp.max(jnp.abs(v)))
    return v / jnp.where(scale > 0, scale, 1.0)

  def _family(self, root: int) -> int:
    """The tensor ``root`` is a view (reshape, transpose, broadcast) of, or itself."""
    return self.family.get(root, root)

  def _linear_elementwise(self, e: Eqn, vals, xs, origins, shape):
    name = e.prim.name
    stats = [self.stat_of.get(e.ins[j]) for j in xs]
    if all(st is not None for st in stats) and len(set(stats)) == 1:
      for o in e.outs:  # var + eps, rsqrt(var), ...: still a statistic of that tensor
        self.stat_of[o] = stats[0]
      if len(xs) > 1:  # E[x^2] - E[x]^2: its value is never read as a flow
        return [_bcast(vals[xs[0]], a.shape) for a in e.out_avals], None
    main = [j for j, st in zip(xs, stats) if st is None]
    if main and len(main) < len(xs):
      # A tensor combined with statistics of itself (x - mean(x), x * rsqrt(var(x)),
      # softmax's exp(s - max s) / sum): normalization, read as the identity.
      roots = {self._family(origins[j][0]) for j in main}
      if all(st in roots for st in stats if st is not None) and len(roots) == 1:
        o = origins[main[0]]
        return [_bcast(vals[main[0]], a.shape) for a in e.out_avals], o
    if name in COMPARISONS:  # a predicate: no flow, only its origin
      return [None] * len(e.outs), origins[xs[0]]
    if len(xs) == 1:
      v = vals[xs[0]]
      if v is None:
        return [None] * len(e.outs), origins[xs[0]]
      if name == "exp":  # 1 + v: a softmax of zero scores is uniform, not zero
        return [1.0 + _bcast(v, a.shape) for a in e.out_avals], origins[xs[0]]
      return [_bcast(v, a.shape) for a in e.out_avals], origins[xs[0]]
    data = [j for j in xs if vals[j] is not None]  # predicates carry no flow
    roots = {origins[j][0] for j in xs}
    if len(roots) == 1:  # a pointwise function of one tensor: the activation is the identity
      o = origins[xs[0]]
      return [_bcast(o[1], a.shape) for a in e.out_avals], o
    if name == "select_n" and data:  # either case: their flows add up
      if len(data) == 1:
        return [_bcast(vals[data[0]], a.shape) for a in e.out_avals], origins[data[0]]
      return [sum(_bcast(vals[j], shape) for j in data)], None
    if name in ("add", "add_any"):
      if len(data) < len(xs):
        raise ValueError(
          f"primitive {name!r} at {e.src} adds a comparison of the input; "
          "SynFlow's linearization is not faithful for this model."
        )
      return [sum(_bcast(vals[j], shape) for j in xs)], None
    if name == "mul" and len(data) == len(xs) == 2:  # gating: the product of the flows
      a, b = (self._scaled(_bcast(vals[j], shape)) for j in xs)
      return [a * b], None
    if name == "mul" and len(data) == 1:  # data times a 0/1 mask of a predicate
      return [_bcast(vals[data[0]], a.shape) for a in e.out_avals], origins[data[0]]
    if not data:  # logic on predicates (and, or, not): still a predicate
      return [None] * len(e.outs), origins[xs[0]]
    raise ValueError(
      f"primitive {name!r} at {e.src} combines two different input-dependent "
      "tensors (a subtraction or division of two different tensors); SynFlow's "
      "linearization is not faithful for this model."
    )


def _cum(e: Eqn, v):
  """The cumulative sum along the axis of the cumulative op ``e``."""
  p = e.params
  return lax.cumsum(v, axis=p["axis"], reverse=p.get("reverse", False))
