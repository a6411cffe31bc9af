"""The primitive families of the connectivity transform.

Each family has one rule per semantics (:mod:`sparsejax.connectivity.semantics`); the
program builder (:mod:`sparsejax.connectivity.program`) rejects any other primitive on
an input- or parameter-dependent value. Equations of constants only are folded, whatever
their primitive.

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
split, tile, gather, dynamic_slice, dynamic_update_slice, scatter, scatter-add (constant
indices); lookups: gather from a parameter or constant table by input-dependent indices
(embeddings, ``jnp.take``); calls: jit/pjit, closed_call, core_call, remat/checkpoint,
custom_jvp_call, custom_vjp_call; loops: scan, while (unrolled: a trip count known when
tracing, e.g. ``lax.scan``, ``nn.scan``, ``fori_loop`` with constant bounds); cond with a
constant predicate.
"""

from __future__ import annotations

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
  "stack": None,
  "split": (0,),
  "gather": (0,),
  "dynamic_slice": (0,),
  "dynamic_update_slice": (0, 1),
  "scatter": (0, 2),
  "scatter-add": (0, 2),
  "scatter_add": (0, 2),
  "tile": (0,),
}
#: loops, unrolled when the program is built (a trip count known when tracing).
LOOPS = frozenset({"scan", "while"})
#: Zero in, zero out: f(0) = 0, so f(v) can be nonzero only where v can.
ZERO_PRESERVING = frozenset(
  {
    "neg",
    "abs",
    "sign",
    "floor",
    "ceil",
    "round",
    "tanh",
    "sin",
    "tan",
    "asin",
    "atan",
    "sinh",
    "asinh",
    "atanh",
    "sqrt",
    "cbrt",
    "square",
    "integer_pow",
    "erf",
    "erf_inv",
    "expm1",
    "log1p",
    "convert_element_type",
    "reduce_precision",
    "real",
    "imag",
    "conj",
    "copy",
    "copy_p",
    "stop_gradient",
    "population_count",
    "shift_left",
    "shift_right_logical",
    "shift_right_arithmetic",
  }
)
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
  | LOOPS
  | {"cond"}
)


def supported_primitives() -> list[str]:
  """Names of the primitives the transform accepts on input/parameter-dependent values."""
  return sorted(SUPPORTED)


def unsupported(name: str, src: str, why: str) -> ValueError:
  """The error for primitive ``name`` at the user's line ``src``: ``why`` it cannot be
  transformed, and what can."""
  return ValueError(
    f"primitive {name!r} at {src} {why}; allowed: the primitives of "
    "sparsejax.connectivity.supported_primitives() (linear ops, elementwise, "
    "reductions, pooling, structure, calls, loops with a trip count known when tracing, "
    "cond on a constant, lookups of a parameter table by input indices)."
  )
