"""The connectivity transform of a JAX program (method.md section 1).

``apply(params, extra, x)`` (a Flax module's ``apply`` or any JAX function) is traced
once to a jaxpr, call-like primitives (``jit``/``pjit``, ``closed_call``, ``remat``,
``custom_jvp_call``, ``custom_vjp_call``) are inlined, equations of constants only are
folded, and every remaining value is classified as *input-dependent* ('x'),
*parameter-only* ('p') or *constant* ('c'). The program is then evaluated under one of
two semantics.

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
  then the gate. Two input-dependent operands (attention scores): OR of everything
  each output reads, op(a, 1) + op(1, b), gated.
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

Anything else that depends on the input or the parameters (``while``, ``scan``,
``cond`` on a non-constant predicate, gathers with input-dependent indices, unknown
primitives) raises ValueError naming the primitive and the user's source line.

Supported primitives on input- or parameter-dependent values (``supported_primitives()``):
linear: dot_general, conv_general_dilated; elementwise: add, add_any, sub, mul, div, rem,
pow, max, min, atan2, nextafter, neg, sign, floor, ceil, round, is_finite, exp, exp2, log,
log1p, expm1, tanh, logistic, sin, cos, tan, asin, acos, atan, sinh, cosh, asinh, acosh,
atanh, sqrt, rsqrt, cbrt, abs, integer_pow, square, erf, erfc, erf_inv, lgamma, digamma,
igamma, igammac, polygamma, bessel_i0e, bessel_i1e, convert_element_type,
reduce_precision, real, imag, conj, not, and, or, xor, eq, ne, lt, le, gt, ge, select_n,
clamp, shift ops, population_count, copy, stop_gradient; identities: device_put,
sharding_constraint, optimization_barrier, mesh_cast, reshard, pvary;
reductions: reduce_sum/max/min/prod/and/or/xor, argmax, argmin, reduce_window_sum/max/min,
reduce_window, cumsum, cumprod, cummax, cummin, cumlogsumexp, sort, top_k; structure:
reshape, transpose, broadcast_in_dim, squeeze, expand_dims, slice, rev, pad, concatenate,
split, gather, dynamic_slice, dynamic_update_slice, scatter, scatter-add; calls: jit/pjit,
closed_call, core_call, remat/checkpoint, custom_jvp_call, custom_vjp_call; cond with a
constant predicate. Equations of constants only are folded, whatever their primitive.

Prunable leaves: by default every parameter that enters a linear op as its weight
operand (through any parameter-only computation: casts, reshapes, masking), in the
order of first use in the traced program (input-to-output order).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jcore
from jax._src import source_info_util
from jax._src.lax.windowed_reductions import reduce_window_sum_p

Masks = Any

# --------------------------------------------------------------------------- primitives

LINEAR = frozenset({"dot_general", "conv_general_dilated"})
CALLS = frozenset(
  {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "remat",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "custom_lin",
  }
)
ELEMENTWISE = frozenset(
  {
    "add",
    "add_any",
    "sub",
    "mul",
    "div",
    "rem",
    "pow",
    "max",
    "min",
    "atan2",
    "nextafter",
    "neg",
    "sign",
    "floor",
    "ceil",
    "round",
    "is_finite",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "tanh",
    "logistic",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "sqrt",
    "rsqrt",
    "cbrt",
    "abs",
    "integer_pow",
    "square",
    "erf",
    "erfc",
    "erf_inv",
    "lgamma",
    "digamma",
    "igamma",
    "igammac",
    "convert_element_type",
    "reduce_precision",
    "real",
    "imag",
    "conj",
    "not",
    "and",
    "or",
    "xor",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "select_n",
    "clamp",
    "shift_left",
    "shift_right_logical",
    "shift_right_arithmetic",
    "population_count",
    "copy",
    "copy_p",
    "stop_gradient",
    "polygamma",
    "bessel_i0e",
    "bessel_i1e",
  }
)
#: identities on each operand (placement, sharding, barriers).
IDENTITY = frozenset(
  {"device_put", "sharding_constraint", "optimization_barrier", "mesh_cast", "reshard", "pvary"}
)
COMPARISONS = frozenset({"eq", "ne", "lt", "le", "gt", "ge", "is_finite"})
REDUCTIONS = frozenset(
  {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
    "reduce_xor",
    "argmax",
    "argmin",
  }
)
WINDOWS = frozenset(
  {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
)
CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
ALONG_AXIS = frozenset({"sort", "top_k"})
#: structural primitives: which operands are data (the others are indices / sizes).
STRUCTURAL = {
  "reshape": (0,),
  "transpose": (0,),
  "broadcast_in_dim": (0,),
  "squeeze": (0,),
  "expand_dims": (0,),
  "slice": (0,),
  "rev": (0,),
  "pad": (0,),
  "concatenate": None,
  "split": (0,),
  "gather": (0,),
  "dynamic_slice": (0,),
  "dynamic_update_slice": (0, 1),
  "scatter": (0, 2),
  "scatter-add": (0, 2),
  "scatter_add": (0, 2),
}
SUPPORTED = (
  LINEAR
  | CALLS
  | ELEMENTWISE
  | REDUCTIONS
  | WINDOWS
  | CUMULATIVE
  | ALONG_AXIS
  | IDENTITY
  | frozenset(STRUCTURAL)
  | {"cond"}
)


def supported_primitives() -> list[str]:
  """Names of the primitives the transform accepts on input/parameter-dependent values."""
  return sorted(SUPPORTED)


# --------------------------------------------------------------------------- gate


@jax.custom_vjp
def gate(v: jax.Array) -> jax.Array:
  """1[v > 0] (float32) whose backward pass is the indicator 1[g > 0]."""
  return (v > 0).astype(jnp.float32)


def _gate_fwd(v):
  return gate(v), None


def _gate_bwd(_, g):
  return ((g > 0).astype(g.dtype),)


gate.defvjp(_gate_fwd, _gate_bwd)


# --------------------------------------------------------------------------- program


@dataclasses.dataclass(eq=False)
class Eqn:
  prim: Any
  params: dict
  ins: list  # value ids
  outs: list  # value ids
  kind: str  # 'x' or 'p'
  src: str  # the user's source line
  out_avals: list


@dataclasses.dataclass(eq=False)
class Program:
  """A traced, inlined and classified program ``fn(params, extra, x)``."""

  eqns: list
  consts: dict  # id -> concrete value
  kind: dict  # id -> 'x' | 'p' | 'c'
  sources: dict  # id -> frozenset of param leaf indices ('p' values)
  param_ids: list  # per flat param leaf
  extra_ids: list  # per flat extra leaf
  x_ids: list  # per flat input leaf
  out_ids: list  # 'x' outputs
  param_paths: list  # '/'-joined path per flat param leaf
  param_shapes: list
  x_shapes: list
  extra_shapes: list
  weight_leaves: tuple  # param leaves used as linear weights, first-use order
  sites: list  # (eqn index, weight leaf or None) per linear op on 'x'
  cuts: frozenset  # 'x' ids that dominate the output


def _src(eqn) -> str:
  try:
    return source_info_util.summarize(eqn.source_info)
  except Exception:  # pylint: disable=broad-except
    return "unknown source"


def _unsupported(name: str, src: str, why: str) -> ValueError:
  return ValueError(
    f"primitive {name!r} at {src} {why}; allowed: the primitives of "
    "sparsejax.connectivity.supported_primitives() (linear ops, elementwise, "
    "reductions, pooling, structure, calls, cond on a constant)."
  )


class _Builder:
  def __init__(self):
    self.next_id = 0
    self.eqns: list[Eqn] = []
    self.consts: dict = {}
    self.kind: dict = {}
    self.sources: dict = {}

  def new(self, kind: str, sources=frozenset()) -> int:
    i = self.next_id
    self.next_id += 1
    self.kind[i] = kind
    if kind == "p":
      self.sources[i] = frozenset(sources)
    return i

  def const(self, value) -> int:
    i = self.new("c")
    self.consts[i] = value
    return i

  def inline(
    self, jaxpr: jcore.Jaxpr, const_ids: Sequence[int], in_ids: Sequence[int]
  ) -> list[int]:
    env = {}
    for v, i in zip(jaxpr.constvars, const_ids):
      env[v] = i
    for v, i in zip(jaxpr.invars, in_ids):
      env[v] = i

    def read(a):
      if isinstance(a, jcore.Literal):
        return self.const(a.val)
      return env[a]

    for eqn in jaxpr.eqns:
      ins = [read(a) for a in eqn.invars]
      outs = self.equation(eqn, ins)
      for v, i in zip(eqn.outvars, outs):
        env[v] = i
    return [read(a) for a in jaxpr.outvars]

  def _sub(self, closed, ins):
    if isinstance(closed, jcore.ClosedJaxpr):
      return self.inline(closed.jaxpr, [self.const(c) for c in closed.consts], ins)
    return self.inline(closed, [], ins)

  def equation(self, eqn, ins: list[int]) -> list[int]:
    name = eqn.primitive.name
    kinds = [self.kind[i] for i in ins]
    src = _src(eqn)
    if name in CALLS:
      p = eqn.params
      inner = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
      if inner is None:
        raise _unsupported(name, src, "has no inner jaxpr")
      return self._sub(inner, ins)
    if name in IDENTITY:  # each output is its operand: no equation at all
      return list(ins[: len(eqn.outvars)])
    if all(k == "c" for k in kinds):
      subfuns, bind_params = _bind_params(eqn.primitive, eqn.params)
      with jax.ensure_compile_time_eval():
        ans = eqn.primitive.bind(*subfuns, *[self.consts[i] for i in ins], **bind_params)
      ans = ans if eqn.primitive.multiple_results else [ans]
      return [self.const(a) for a in ans]
    if name == "cond":
      index = ins[0]
      if self.kind[index] != "c":
        raise _unsupported(
          name,
          src,
          "branches on a value that depends on the input or "
          "the parameters (only constant predicates can be resolved)",
        )
        # (a data-dependent branch has no single graph)
      branches = eqn.params["branches"]
      b = int(np.clip(np.asarray(self.consts[index]), 0, len(branches) - 1))
      return self._sub(branches[b], ins[1:])
    if name not in SUPPORTED:
      raise _unsupported(
        name,
        src,
        "depends on the input or the parameters and has no "
        "connectivity rule (loops and unknown primitives are not supported)",
      )
    kind = "x" if "x" in kinds else "p"
    if name in (
      "gather",
      "dynamic_slice",
      "dynamic_update_slice",
      "scatter",
      "scatter-add",
      "scatter_add",
    ):
      data = STRUCTURAL[name]
      if any(kinds[j] != "c" for j in range(len(ins)) if j not in data):
        raise _unsupported(
          name,
          src,
          "uses indices that depend on the input or the "
          "parameters (only constant indices are supported)",
        )
    sources = frozenset()
    if kind == "p":
      sources = frozenset().union(*[self.sources[i] for i in ins if self.kind[i] == "p"])
    outs = [self.new(kind, sources) for _ in eqn.outvars]
    self.eqns.append(
      Eqn(eqn.primitive, dict(eqn.params), ins, outs, kind, src, [v.aval for v in eqn.outvars])
    )
    return outs


def _dominators(b: _Builder, x_ids, out_ids) -> frozenset:
  """'x' ids on every input-to-output path (dominators of a virtual sink)."""
  src = -1
  dom = {i: frozenset((src, i)) for i in x_ids}
  for e in b.eqns:
    if e.kind != "x":
      continue
    preds = [dom[i] for i in e.ins if b.kind[i] == "x" and i in dom]
    if not preds:
      continue
    common = frozenset.intersection(*preds)
    for o in e.outs:
      dom[o] = common | {o}
  outs = [dom[o] for o in out_ids if o in dom]
  return frozenset.intersection(*outs) - {src} if outs else frozenset()


def build(fn: Callable, param_shapes, extra_shapes, x_shapes) -> Program:
  """Traces ``fn(params, extra, x)`` at the given shape trees and classifies it.

  ``params`` leaves are parameters (the masks apply to them), ``extra`` leaves are
  other state (batch statistics: parameters that are never pruned), ``x`` leaves are
  the input.
  """
  p_flat, p_tree = jax.tree_util.tree_flatten_with_path(param_shapes)
  e_flat, e_tree = jax.tree_util.tree_flatten(extra_shapes)
  x_flat, x_tree = jax.tree_util.tree_flatten(x_shapes)
  sds = lambda s: jax.ShapeDtypeStruct(tuple(s.shape), s.dtype)

  def flat_fn(ps, es, xs):
    return fn(
      jax.tree.unflatten(p_tree, ps), jax.tree.unflatten(e_tree, es), jax.tree.unflatten(x_tree, xs)
    )

  try:
    closed = jax.make_jaxpr(flat_fn)(
      [sds(s) for _, s in p_flat], [sds(s) for s in e_flat], [sds(s) for s in x_flat]
    )
  except (TypeError, ValueError) as err:
    raise ValueError(
      f"the example input (shapes {[tuple(s.shape) for s in x_flat]}) "
      f"cannot be applied to the model: {err}"
    ) from None
  b = _Builder()
  param_ids = [b.new("p", {i}) for i in range(len(p_flat))]
  extra_ids = [b.new("p") for _ in e_flat]
  x_ids = [b.new("x") for _ in x_flat]
  with jax.ensure_compile_time_eval():
    outs = b._sub(closed, param_ids + extra_ids + x_ids)
  out_x = [o for o in outs if b.kind[o] == "x"]
  if not out_x:
    raise ValueError(
      "the model's output does not depend on its input x (it is constant "
      "in x); the connectivity of a constant function is undefined."
    )
  weight_leaves, sites = [], []
  for k, e in enumerate(b.eqns):
    if e.kind != "x" or e.prim.name not in LINEAR:
      continue
    xs = [b.kind[i] == "x" for i in e.ins[:2]]
    leaf = None
    if sum(xs) == 1:
      w = e.ins[1] if xs[0] else e.ins[0]
      ws = sorted(b.sources.get(w, ()))
      for l in ws:
        if l not in weight_leaves:
          weight_leaves.append(l)
      leaf = ws[0] if ws else None
    sites.append((k, leaf))
  from sparsejax import masks as masks_lib  # pylint: disable=g-import-not-at-top

  return Program(
    eqns=b.eqns,
    consts=b.consts,
    kind=b.kind,
    sources=b.sources,
    param_ids=param_ids,
    extra_ids=extra_ids,
    x_ids=x_ids,
    out_ids=out_x,
    param_paths=[masks_lib.path_str(p) for p, _ in p_flat],
    param_shapes=[tuple(s.shape) for _, s in p_flat],
    x_shapes=[tuple(s.shape) for s in x_flat],
    extra_shapes=[tuple(s.shape) for s in e_flat],
    weight_leaves=tuple(weight_leaves),
    sites=sites,
    cuts=_dominators(b, x_ids, out_x),
  )


# --------------------------------------------------------------------------- evaluation


def _bcast(v, shape):
  v = jnp.asarray(v, jnp.float32)
  return v if v.shape == tuple(shape) else jnp.broadcast_to(v, shape)


def _nonzero(c):
  return (jnp.asarray(c) != 0).astype(jnp.float32)


def _bind_params(prim, params: dict):
  got = prim.get_bind_params(params)
  return got if isinstance(got, tuple) else ((), got)  # (subfuns, params) before jax 0.7


def _bind(e: Eqn, *args, **overrides):
  subfuns, params = _bind_params(e.prim, dict(e.params, **overrides))
  out = e.prim.bind(*subfuns, *args, **params)
  return list(out) if e.prim.multiple_results else [out]


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
  return _bind(e, *args)


def _window_sum(e: Eqn, v):
  p = e.params
  return reduce_window_sum_p.bind(
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
  name = e.prim.name
  if name == "sort":
    axis = e.params["dimension"]
  else:  # top_k: the last axis
    axis = v.ndim - 1
  s = gate(jnp.sum(v, axis=axis, keepdims=True))
  return [_bcast(s, a.shape) for a in e.out_avals]


#: A convolution of the reachability sweep with at most this many output positions
#: per example (8 x 8) and a selection matrix of at most MAX_PATCHES entries runs as a
#: patches-times-kernel product (measured: 2-100x faster there on XLA:CPU; from 16 x 16
#: on, the convolution and the product cost about the same, and the selection product
#: grows as positions squared).
MAX_POSITIONS = 64
MAX_PATCHES = 1 << 24
#: The kernel gradient of :func:`conv_patches_kernel_grad` materializes at most this
#: many patch entries (float32), else it is XLA's.
MAX_KERNEL_GRAD_PATCHES = 1 << 26


def _reach_linear(e: Eqn, args) -> jax.Array:
  """A linear op of the reachability sweep on (indicators, pattern), float32: the op
  itself; for a convolution with few output positions :func:`conv_as_patches`
  (XLA:CPU runs small-spatial convolutions, e.g. 512 channels at 2x2 or 4x4 positions,
  and their gradients through a path 10-100x slower than that product), and for the
  others XLA's convolution with :func:`conv_patches_kernel_grad` as its kernel
  gradient."""
  if e.prim.name != "conv_general_dilated":
    return _bind(e, *args, preferred_element_type=jnp.float32)[0]
  y = conv_as_patches(e, *args)
  return conv_patches_kernel_grad(e, *args) if y is None else y


def _patches_cover(p: dict) -> bool:
  """Whether a convolution with params ``p`` is a patches product: no lhs dilation,
  no feature or batch groups."""
  return (
    all(d == 1 for d in p["lhs_dilation"])
    and p["feature_group_count"] == 1
    and p["batch_group_count"] == 1
  )


@functools.lru_cache(maxsize=256)
def _selection(in_size, ksize, strides, dil, pads, max_positions):
  """One-hot [*O, *K, S] float32: output position o reads input position s at kernel
  offset k (o s + k d - pad_lo in bounds); None beyond ``max_positions`` outputs or
  MAX_PATCHES entries."""
  osize = [
    (i + lo + hi - (k - 1) * d - 1) // st + 1
    for i, k, st, d, (lo, hi) in zip(in_size, ksize, strides, dil, pads)
  ]
  positions, size = int(np.prod(osize)), int(np.prod(in_size))
  if (
    min(osize) < 1
    or positions > max_positions
    or positions * int(np.prod(ksize)) * size > MAX_PATCHES
  ):
    return None
  sel = np.zeros((*osize, *ksize, size), np.float32)
  for o in np.ndindex(*osize):
    for k in np.ndindex(*ksize):
      src = [oi * st + ki * d - lo for oi, ki, st, d, (lo, _) in zip(o, k, strides, dil, pads)]
      if all(0 <= v < i for v, i in zip(src, in_size)):
        sel[(*o, *k, int(np.ravel_multi_index(src, in_size)))] = 1.0
  return sel


def conv_as_patches(e: Eqn, x, w, max_positions: int | None = None) -> jax.Array | None:
  """The convolution ``e`` on (x, w) as one patches-times-kernel product (float32), or
  None where it does not apply (lhs dilation, groups, more than ``max_positions``
  output positions per example, default :data:`MAX_POSITIONS`, or a selection matrix
  over :data:`MAX_PATCHES` entries).

  y[o] = sum_k x_pad[o s + k d] w[k] for offsets k, strides s and rhs dilation d: the
  patches are one product of the input with a constant one-hot selection matrix
  [O, K, S] (padding selects nothing), then patches [O, K Cin] times the kernel as a
  [K Cin, Cout] matrix. Its vjp is two more products of each (the kernel gradient is
  patches^T times coreach), few ops to compile. In the reachability sweep it is exact
  as the convolution itself: terms are in {0, 1} and every sum is < 2^24.
  """
  p = e.params
  max_positions = MAX_POSITIONS if max_positions is None else max_positions
  if jnp.ndim(x) < 3 or not _patches_cover(p):
    return None
  lhs, rhs, out = p["dimension_numbers"]
  nsp = len(lhs) - 2
  x = jnp.transpose(jnp.asarray(x, jnp.float32), (lhs[0], *lhs[2:], lhs[1]))  # N, *S, C
  w = jnp.transpose(jnp.asarray(w, jnp.float32), (*rhs[2:], rhs[1], rhs[0]))  # *K, Ci, Co
  ksize, cin, cout = w.shape[:nsp], w.shape[nsp], w.shape[nsp + 1]
  sel = _selection(
    tuple(x.shape[1 : 1 + nsp]),
    tuple(ksize),
    tuple(p["window_strides"]),
    tuple(p["rhs_dilation"]),
    tuple(tuple(q) for q in p["padding"]),
    max_positions,
  )
  if sel is None:
    return None
  n, osize = x.shape[0], sel.shape[:nsp]
  sel = sel.reshape(int(np.prod(osize)), -1, sel.shape[-1])  # [O, K, S]
  # patches[n, o, k, c] = x[n, s(o, k), c]: one product with a constant one-hot matrix
  patches = jnp.einsum("oks,nsc->nokc", sel, x.reshape(n, -1, cin))
  y = jnp.dot(
    patches.reshape(-1, sel.shape[1] * cin), w.reshape(-1, cout), preferred_element_type=jnp.float32
  ).reshape(n, *osize, cout)
  canonical = {out[0]: 0, out[1]: nsp + 1, **{out[2 + i]: 1 + i for i in range(nsp)}}
  return jnp.transpose(y, [canonical[j] for j in range(nsp + 2)])


def _patches_at_offsets(e: Eqn, x, ksize, osize) -> jax.Array | None:
  """patches[n, *o, k, c] = x_pad[n, o s + k d, c]: [N, *O, K, Cin] float32 for the
  convolution ``e`` (``x`` in its lhs layout; ``ksize`` its kernel's and ``osize`` its
  output's spatial sizes), one strided slice of the padded input per kernel offset k;
  None with lhs dilation, groups or over :data:`MAX_KERNEL_GRAD_PATCHES` entries.
  (:func:`conv_as_patches` gathers with a one-hot selection matrix instead: cheaper to
  compile at few positions, but its size grows as positions squared.)"""
  p = e.params
  if not _patches_cover(p):
    return None
  lhs = p["dimension_numbers"][0]
  x = jnp.transpose(jnp.asarray(x, jnp.float32), (lhs[0], *lhs[2:], lhs[1]))  # N, *S, C
  n, cin = x.shape[0], x.shape[-1]
  if n * int(np.prod(osize)) * int(np.prod(ksize)) * cin > MAX_KERNEL_GRAD_PATCHES:
    return None
  strides, dil = p["window_strides"], p["rhs_dilation"]
  x = lax.pad(x, jnp.float32(0), [(0, 0, 0), *[(lo, hi, 0) for lo, hi in p["padding"]], (0, 0, 0)])
  cols = []
  for k in np.ndindex(*ksize):
    start = [ki * d for ki, d in zip(k, dil)]
    limit = [st + (o - 1) * s + 1 for st, o, s in zip(start, osize, strides)]
    cols.append(lax.slice(x, (0, *start, 0), (n, *limit, cin), (1, *strides, 1)))
  return jnp.stack(cols, axis=-2)


def conv_patches_kernel_grad(e: Eqn, x, w) -> jax.Array:
  """XLA's convolution ``e`` on (x, w) (float32), whose vjp computes the kernel
  gradient as one patches-transposed-times-cotangent product.

  dw[k, ci, co] = sum_{n, o} x_pad[n, o s + k d, ci] g[n, o, co]: the patches of
  :func:`_patches_at_offsets` as [N O, K Cin], transposed, times the cotangent as
  [N O, Cout]. XLA:CPU runs the kernel gradient of a convolution over many positions
  (e.g. 64 channels at 64 x 64) as a convolution 2-3x slower than that product; the
  input gradient stays XLA's. In the reachability sweep the result is the
  convolution's own: terms are in {0, 1} and every sum is < 2^24. Convolutions the
  patches do not cover (lhs dilation, groups) are XLA's with its own gradients.
  """
  conv = lambda a, b: _bind(e, a, b, preferred_element_type=jnp.float32)[0]

  @jax.custom_vjp
  def f(a, b):
    return conv(a, b)

  def fwd(a, b):
    return conv(a, b), (a, b)

  def bwd(res, g):
    a, b = res
    _, rhs, out = e.params["dimension_numbers"]
    ksize = [b.shape[d] for d in rhs[2:]]
    patches = _patches_at_offsets(e, a, ksize, [g.shape[d] for d in out[2:]])
    if patches is None:
      return jax.vjp(conv, a, b)[1](g)
    da = jax.vjp(lambda t: conv(t, b), a)[1](g)[0]
    g = jnp.transpose(g, (out[0], *out[2:], out[1]))  # N, *O, Co
    cin, cout = patches.shape[-1], g.shape[-1]
    dw = jnp.dot(
      patches.reshape(-1, int(np.prod(ksize)) * cin).T,
      g.reshape(-1, cout),
      preferred_element_type=jnp.float32,
    )
    dw = dw.reshape(*ksize, cin, cout)  # axes rhs[2:], rhs[1], rhs[0] of b
    return da, jnp.transpose(dw, np.argsort((*rhs[2:], rhs[1], rhs[0]))).astype(b.dtype)

  f.defvjp(fwd, bwd)
  return f(x, w)


class _Eval:
  """Evaluates a Program; ``sem`` is 'reach' or 'linear'."""

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
      return _bind(e, *vals)
    pats = [v if k == "p" else _nonzero(v) for v, k in zip(vals, kinds)]
    shape = e.out_avals[0].shape
    if name in LINEAR:
      return [gate(_bind(e, pats[0], pats[1], preferred_element_type=jnp.float32)[0])]
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
    raise _unsupported(name, e.src, "has no connectivity rule")

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
          _bind(e, a, jnp.ones_like(b), preferred_element_type=jnp.float32)[0]
          + _bind(e, jnp.ones_like(a), b, preferred_element_type=jnp.float32)[0]
        )
        return [gate(y)], None
      args = list(vals[:2])
      w = 1 - xs[0]
      if kinds[w] == "c":
        args[w] = jnp.abs(jnp.asarray(args[w], jnp.float32)) if linear else _nonzero(args[w])
      if linear:
        return [_bind(e, *args, preferred_element_type=jnp.float32)[0]], None
      return [gate(_reach_linear(e, args))], None
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
      return _bind(e, vals[0], *[_bcast(c, shape) for c in cases]), None
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
    raise _unsupported(name, e.src, "has no connectivity rule")

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
  p = e.params
  return lax.cumsum(v, axis=p["axis"], reverse=p.get("reverse", False))


# --------------------------------------------------------------------------- results


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


def reach_sweep(prog: Program, prunable: Sequence[int], units: bool = True):
  """The pure, jit-able sweep ``(kernel masks, extra values) -> results``.

  ``prunable``: flat param leaf indices that carry masks (others carry ones). The
  sweep takes the masks of those leaves (bool, in ``prunable`` order) and returns
  (potential per prunable leaf, active units per site, active inputs) -- the last two
  only with ``units``.
  """
  ev = _Eval(prog, "reach")
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
    shapes = [a.shape for a in (prog.eqns[k].out_avals[0] for k, _ in prog.sites)]
    total = {n: int(np.prod(s)) for n, s in zip(names, shapes)}
    active_inputs = sum(jnp.sum(gx > 0) for gx in g_x)
    return [gk > 0 for gk in g], active, active_inputs, total

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


def _site_pass(ev: _Eval, prog: Program, params_with, kernels, extra, xs):
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
  ev = _Eval(prog, "reach")
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
  below 2**24), times its mask: the multiply-accumulates it does on a live path."""
  ev = _Eval(prog, "reach")
  prunable = tuple(prunable)

  def counts(masks: Sequence[jax.Array]):
    params_with, kernels, extra, xs = _reach_inputs(prog, prunable, masks)
    g, _, _, _ = _site_pass(ev, prog, params_with, kernels, extra, xs)
    return [gk * k for gk, k in zip(g, kernels)]

  return counts


def linear_scores(prog: Program, prunable: Sequence[int]):
  """SynFlow's one-round scores ``(|kernels|, alive, |params|) -> [|dR/dw * w|]``.

  R = sum of the outputs of the linearized program (see the module docstring) on an
  all-ones input, with w = |kernel| * alive at the ``prunable`` leaves and |p| at the
  other parameters; rescaled only at cuts, so the scores are the true ones times one
  common positive factor (traceable).
  """
  ev = _Eval(prog, "linear")
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
