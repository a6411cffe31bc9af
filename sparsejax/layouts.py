"""How each prunable weight enters its linear op: its [out, in] matrix and input rows.

A linear op of the traced program (:class:`sparsejax.connectivity.Program`'s sites: a
``dot_general`` or ``conv_general_dilated`` on the input whose other operand is a
parameter) computes, at every output position, ``y[o] = sum_i W[o, i] x[i]``. ``W`` is
the weight seen as a matrix:

- rows are the *output units*: the weight's axes that are not contracted (a Dense
  kernel [in, out]: its out axis; a convolution kernel: its output-feature axis), in
  the weight's axis order;
- columns are the *inputs*: for ``dot_general`` the contracted axes in the order the
  op pairs them with the input's; for a convolution the kernel's other axes in the
  weight's own axis order (HWIO: kernel rows, kernel columns, input channels), the
  order of the patch it multiplies.

:func:`input_rows` is the other side: the op's input as a matrix X [rows, in] with
one row per output position (every example, token, pixel) and the same column order,
so that the op's output is ``X @ W.T`` (rearranged). The calibration statistics
(:mod:`sparsejax.calibration`: H = X^T X) and N:M groups (:mod:`sparsejax.patterns`:
M consecutive columns of a row) are defined on these views.

A weight may reach its op through casts, multiplication by a constant (a fixed mask)
and reshapes or transposes of the parameter (``x @ w.T``): the view is an index map,
``index[o, i]`` = the flat (row-major) position in the parameter leaf of W[o, i].
Lookups (embedding tables) are no matrix product on the input and have no view; nor
do weights that share a batch axis with the input, feed the op through any other
parameter computation, or enter several ops in different layouts (:func:`of` says
why for each).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import tracing
from sparsejax.connectivity.program import Eqn, Program, bind

#: Parameter-only primitives a weight may pass through on its way to the op: the value
#: is the parameter's, element for element (casts, a constant factor such as a mask).
_SAME_ELEMENTS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision", "mul"})
#: ... or the parameter's elements rearranged (applied to the index map as they are).
_REARRANGE = frozenset({"reshape", "transpose", "squeeze", "expand_dims"})


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
  """One linear op that uses the weight: its equation index in the program, which
  operand is the input (0 or 1) and the shape of the weight operand."""

  eqn: int
  x_operand: int
  w_shape: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """The [out, in] view of one prunable weight (module docstring).

  path: the parameter's '/'-joined path; shape: its shape; index: int64 [out, in], the
  flat position in the parameter of W[o, i]; sites: the linear ops that use it (each
  one's input rows have the columns of ``index``).
  """

  path: str
  shape: tuple
  index: np.ndarray
  sites: tuple

  @property
  def outputs(self) -> int:
    """Output units (rows of W)."""
    return int(self.index.shape[0])

  @property
  def inputs(self) -> int:
    """Inputs per output unit (columns of W)."""
    return int(self.index.shape[1])

  def to_matrix(self, w) -> jax.Array:
    """The weight (or a mask, a score: any array of the weight's shape) as [out, in]."""
    return jnp.reshape(jnp.asarray(w), -1)[self.index]

  def from_matrix(self, m) -> jax.Array:
    """The inverse of :meth:`to_matrix`: an [out, in] matrix as an array of the
    weight's shape (and the matrix's dtype)."""
    m = jnp.asarray(m)
    flat = jnp.zeros(math.prod(self.shape), m.dtype).at[self.index.reshape(-1)].set(m.reshape(-1))
    return flat.reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class Layouts:
  """The views of a traced model's prunable weights: ``views`` {path: Layout} for those
  that have one, ``missing`` {path: why not} for the others (input-to-output order)."""

  views: dict
  missing: dict

  def require(self, paths, who: str) -> dict:
    """{path: Layout} of ``paths``; ValueError naming ``who`` and the weights without a
    view (and why) if any."""
    bad = {p: self.missing[p] for p in paths if p not in self.views}
    if bad:
      detail = "; ".join(f"{p!r} {why}" for p, why in list(bad.items())[:4])
      raise ValueError(
        f"{who} needs every pruned weight as the matrix of a Dense-like or convolution "
        f"op on the input, but {detail}. Narrow prunable= to the others (e.g. prunable="
        "lambda path: 'embed' not in path)."
      )
    return {p: self.views[p] for p in paths}


def of(traced: tracing.Traced) -> Layouts:
  """The :class:`Layouts` of ``traced``'s prunable weights (cached per program)."""
  views, missing = _analyse(traced.program)
  paths = traced.prunable_paths
  return Layouts(
    {p: views[p] for p in paths if p in views},
    {p: missing.get(p, "enters no linear op") for p in paths if p not in views},
  )


@functools.lru_cache(maxsize=64)
def _analyse(prog: Program) -> tuple[dict, dict]:
  """({path: Layout}, {path: why there is none}) of every weight of ``prog``."""
  producer = {o: k for k, e in enumerate(prog.eqns) for o in e.outs}
  param_leaf = {i: l for l, i in enumerate(prog.param_ids)}
  found: dict[int, list] = {}  # leaf -> [(Site, index)]
  missing: dict[int, str] = {}
  for k, leaf in prog.sites:
    if leaf is None:
      continue
    e = prog.eqns[k]
    if e.lookup:
      missing.setdefault(leaf, "is only looked up (an embedding table), not multiplied")
      continue
    x_operand = 0 if prog.kind[e.ins[0]] == "x" else 1
    try:
      leaf_of, idx = _index_map(prog, e.ins[1 - x_operand], producer, param_leaf)
      index = _matrix_index(e, x_operand, idx)
    except _NoView as why:
      missing[leaf] = str(why)
      continue
    found.setdefault(leaf_of, []).append((Site(k, x_operand, idx.shape), index))
  views = {}
  for leaf, entries in found.items():
    path = prog.param_paths[leaf]
    first = entries[0][1]
    if any(ix.shape != first.shape or not np.array_equal(ix, first) for _, ix in entries[1:]):
      missing[leaf] = "enters several linear ops in different layouts"
      continue
    views[path] = Layout(path, tuple(prog.param_shapes[leaf]), first, tuple(s for s, _ in entries))
  return views, {prog.param_paths[l]: why for l, why in missing.items()}


class _NoView(Exception):
  """Why a weight has no [out, in] view (the message completes 'the weight ...')."""


def _index_map(prog: Program, w_id: int, producer: dict, param_leaf: dict):
  """(leaf, int64 index array shaped like the op's weight operand): the flat position
  in the parameter leaf of every operand element."""
  chain = []
  v = w_id
  while v not in param_leaf:
    k = producer.get(v)
    if k is None:
      raise _NoView("is a constant")
    e = prog.eqns[k]
    params_in = [i for i in e.ins if prog.kind[i] == "p"]
    name = e.prim.name
    if len(params_in) != 1 or name not in _SAME_ELEMENTS | _REARRANGE:
      raise _NoView(
        f"reaches its linear op through {name!r} at {e.src} (only casts, constant "
        "factors, reshapes and transposes of one parameter are followed)"
      )
    if name in _REARRANGE:
      chain.append(e)
    v = params_in[0]
  leaf = param_leaf[v]
  shape = tuple(prog.param_shapes[leaf])
  idx = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
  with jax.ensure_compile_time_eval():
    for e in reversed(chain):
      idx = np.asarray(bind(e, jnp.asarray(idx, jnp.int32))[0]).astype(np.int64)
  return leaf, idx


def _matrix_index(e: Eqn, x_operand: int, idx: np.ndarray) -> np.ndarray:
  """``idx`` (shaped like the weight operand) as the [out, in] view of the op ``e``."""
  if e.prim.name == "dot_general":
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    if lb or rb:
      raise _NoView("shares a batch axis with the input (one matrix per batch entry)")
    contracted = tuple(rc if x_operand == 0 else lc)
    free = [d for d in range(idx.ndim) if d not in contracted]
    perm = (*free, *contracted)
    split = len(free)
  else:  # conv_general_dilated
    _check_conv(e, x_operand)
    _, rhs, _ = e.params["dimension_numbers"]
    out_axis = rhs[0]
    perm = (out_axis, *[d for d in range(idx.ndim) if d != out_axis])
    split = 1
  t = np.transpose(idx, perm)
  out = math.prod(t.shape[:split])
  matrix = t.reshape(out, -1)
  if np.unique(matrix).size != matrix.size:
    raise _NoView("is used with repeated elements (a broadcast), not as one matrix")
  return matrix


def _check_conv(e: Eqn, x_operand: int) -> None:
  p = e.params
  if x_operand != 0:
    raise _NoView("is the input (lhs) of a convolution whose kernel depends on the input")
  if any(d != 1 for d in p["lhs_dilation"]):
    raise _NoView("is the kernel of a transposed (lhs-dilated) convolution")
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    raise _NoView("is the kernel of a grouped convolution (one matrix per group)")


def input_rows(e: Eqn, site: Site, x) -> jax.Array:
  """The input ``x`` of the linear op ``e`` (at ``site``) as float32 X [rows, in]
  (traceable): one row per output position, columns as the weight's view (module
  docstring), so that the op's output at those positions is ``X @ W.T``. A
  convolution's rows are its patches (zero padding included, one row per example and
  output pixel)."""
  x = jnp.asarray(x, jnp.float32)
  if e.prim.name == "dot_general":
    (lc, rc), _ = e.params["dimension_numbers"]
    contracted = tuple(lc if site.x_operand == 0 else rc)
    free = [d for d in range(x.ndim) if d not in contracted]
    x = jnp.transpose(x, (*free, *contracted))
    return x.reshape(-1, math.prod(x.shape[len(free) :]))
  return _patches(e, x, site.w_shape)


def _patches(e: Eqn, x: jax.Array, w_shape: tuple) -> jax.Array:
  """The patches of the convolution ``e`` on ``x``: [N * positions, in] with the
  columns in the kernel's axis order (its output-feature axis left out)."""
  p = e.params
  lhs, rhs, out = p["dimension_numbers"]
  nsp = len(lhs) - 2
  x = jnp.transpose(x, (lhs[0], *lhs[2:], lhs[1]))  # N, *S, C
  n, cin = x.shape[0], x.shape[-1]
  ksize = [int(w_shape[d]) for d in rhs[2:]]
  osize = [int(e.out_avals[0].shape[d]) for d in out[2:]]
  strides, dil = p["window_strides"], p["rhs_dilation"]
  pads = [(0, 0, 0), *[(int(lo), int(hi), 0) for lo, hi in p["padding"]], (0, 0, 0)]
  x = lax.pad(x, jnp.float32(0), pads)
  cols = []
  for k in np.ndindex(*ksize):
    start = [ki * d for ki, d in zip(k, dil)]
    limit = [st + (o - 1) * s + 1 for st, o, s in zip(start, osize, strides)]
    cols.append(lax.slice(x, (0, *start, 0), (n, *limit, cin), (1, *strides, 1)))
  patches = jnp.stack(cols, axis=-2).reshape(n, *osize, *ksize, cin)
  # the patch axes (*kernel spatial, C) in the kernel's own axis order
  role = {rhs[2 + j]: j for j in range(nsp)}
  role[rhs[1]] = nsp
  order = [role[a] for a in sorted(role)]
  lead = 1 + nsp
  patches = jnp.transpose(patches, (*range(lead), *[lead + r for r in order]))
  return patches.reshape(n * math.prod(osize), -1)


__all__ = ["Layout", "Layouts", "Site", "input_rows", "of"]
