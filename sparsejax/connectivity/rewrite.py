"""Programs evaluated, tapped and sliced: what compaction does to a traced Program.

- :func:`evaluate`: the program's values on concrete parameters and input (every
  equation re-applied with its primitive: the same function as the traced model);
- :func:`tapped`: the program with a ``copy`` after each of some values, made its
  sites, so the reachability pass of :mod:`sparsejax.connectivity.semantics` reports
  reach and coreach at those values (its perturbation's cotangent);
- :class:`Sliced`: the program with some positions of some axes removed from every
  value (parameters, constants, intermediates), the shape-carrying parameters of each
  equation (reshape sizes, broadcast shapes, slice bounds, split sizes, gather slice
  sizes, a grouped convolution's group count) rewritten to the smaller shapes. It is an
  ordinary JAX function of the sliced parameters, run one example at a time (the
  program was traced at batch 1) and vectorized over the batch with ``jax.vmap``.

Only axes the dimension analysis (:mod:`sparsejax.connectivity.dims`) can follow are
ever sliced; an equation the rewrite does not know with a sliced axis is a bug, and
:func:`Sliced` raises ValueError naming it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.connectivity.program import Eqn, Program, bind

#: Primitives whose parameters never mention a sliced axis's size.
_SHAPE_FREE = frozenset(
  {
    "dot_general",
    "transpose",
    "tile",
    "squeeze",
    "concatenate",
    "pad",
    "rev",
    "dynamic_update_slice",
    "select_n",
    "clamp",
    "reduce_window_sum",
    "reduce_window_max",
    "reduce_window_min",
    "reduce_window",
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "cumlogsumexp",
    "sort",
    "top_k",
    "argmax",
    "argmin",
  }
)


def evaluate(prog: Program, params, extra, xs, ids=None, eqns=None, consts=None) -> dict:
  """{value id: value} of ``prog`` on flat ``params``, ``extra`` and ``xs`` (every value,
  or those in ``ids``); ``eqns`` / ``consts``: (equation, param overrides) pairs and
  constants replacing the program's (a :class:`Sliced` program)."""
  env = dict(zip(prog.param_ids, params))
  env.update(zip(prog.extra_ids, extra))
  env.update(zip(prog.x_ids, xs))
  consts = prog.consts if consts is None else consts
  get = lambda i: env[i] if i in env else consts[i]
  for e, over in eqns if eqns is not None else ((e, {}) for e in prog.eqns):
    outs = bind(e, *[get(i) for i in e.ins], **over)
    env.update(zip(e.outs, outs))
  if ids is None:
    return env
  return {i: get(i) for i in ids}


def tapped(prog: Program, ids) -> tuple[Program, list[int]]:
  """(program, taps): ``prog`` with a ``copy`` equation after every value of ``ids``
  ('x' values) that its consumers and outputs read instead, the copies its only sites
  (``taps[n]``: the value of site n)."""
  ids = [i for i in dict.fromkeys(ids) if prog.kind.get(i) == "x"]
  want = set(ids)
  next_id = 1 + max([*prog.kind, *prog.consts, -1])
  new_of, eqns, sites, taps = {}, [], [], []
  kind = dict(prog.kind)

  def tap(v, aval):
    nonlocal next_id
    c = next_id
    next_id += 1
    kind[c] = "x"
    eqns.append(Eqn(lax.copy_p, {}, [v], [c], "x", "tap", [aval]))
    sites.append((len(eqns) - 1, None))
    taps.append(v)
    new_of[v] = c

  for i in prog.x_ids:
    if i in want:
      tap(i, jax.ShapeDtypeStruct(prog.x_shapes[prog.x_ids.index(i)], jnp.float32))
  for e in prog.eqns:
    e2 = dataclasses.replace(e, ins=[new_of.get(i, i) for i in e.ins])
    eqns.append(e2)
    for o, aval in zip(e.outs, e.out_avals):
      if o in want:
        tap(o, aval)
  out = dataclasses.replace(
    prog,
    eqns=eqns,
    kind=kind,
    sites=sites,
    out_ids=[new_of.get(o, o) for o in prog.out_ids],
  )
  return out, taps


def slice_value(a, keep):
  """``a`` with only the positions ``keep`` (per axis: int indices, or None for all),
  sliced on the host (a jax array again where ``a`` was one)."""
  if a is None:
    return None
  out = np.asarray(a)
  for axis, idx in enumerate(keep):
    if idx is not None:
      out = np.take(out, np.asarray(idx, np.int64), axis=axis)
  return jnp.asarray(out) if isinstance(a, jax.Array) else out


class Sliced:
  """``prog`` with positions removed: ``keep`` {value id: per-axis kept indices (None:
  the whole axis)} for every value with a sliced axis; ``shape`` {value id: shape}
  of every value. Call :meth:`run` on the sliced parameters."""

  def __init__(self, prog: Program, keep: dict, shape: dict):
    self.prog = prog
    self.keep = keep
    self.new_shape = {
      v: tuple(s if k is None else len(k) for s, k in zip(shape[v], keep[v])) if v in keep else s
      for v, s in shape.items()
    }
    self.shape = shape
    self.consts = {i: (slice_value(c, keep[i]) if i in keep else c) for i, c in prog.consts.items()}
    self.eqns = [(e, self._params(e)) for e in prog.eqns]

  def _params(self, e: Eqn) -> dict:
    changed = any(v in self.keep for v in [*e.ins, *e.outs])
    if not changed:
      return {}
    name = e.prim.name
    out_shape = self.new_shape[e.outs[0]]
    p = e.params
    if name == "reshape":
      return {"new_sizes": tuple(out_shape), "dimensions": None}
    if name == "broadcast_in_dim":
      return {"shape": tuple(out_shape)}
    if name == "split":
      return {"sizes": tuple(self.new_shape[o][p["axis"]] for o in e.outs)}
    if name == "slice":
      src = e.ins[0]
      keep = self.keep.get(src, [None] * len(out_shape))
      start, limit = list(p["start_indices"]), list(p["limit_indices"])
      for a, idx in enumerate(keep):
        if idx is not None:
          start[a] = int(np.sum(np.asarray(idx) < start[a]))
          limit[a] = start[a] + out_shape[a]
      return {"start_indices": tuple(start), "limit_indices": tuple(limit)}
    if name in ("gather", "dynamic_slice"):  # a sliced axis: its kept units, whole
      src = e.ins[0]
      keep = self.keep.get(src, [None] * len(self.shape[src]))
      sizes = list(p["slice_sizes"])
      for a, idx in enumerate(keep):
        if idx is not None:
          sizes[a] = len(idx)
      return {"slice_sizes": tuple(sizes)}
    if name == "conv_general_dilated":
      g = p["feature_group_count"]
      if g == 1:
        return {}
      dn = p["dimension_numbers"]
      cin = self.new_shape[e.ins[0]][dn.lhs_spec[1]]
      per = self.new_shape[e.ins[1]][dn.rhs_spec[1]]
      return {"feature_group_count": cin // per}
    if name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and"):
      return {}
    if name in ("reduce_or", "reduce_xor", "argmax", "argmin") or name in _SHAPE_FREE:
      return {}
    if "shape" in p or "new_sizes" in p or "sizes" in p:
      raise ValueError(f"primitive {name!r} at {e.src}: its shape parameters cannot be sliced.")
    return {}

  def run(self, params, extra, xs) -> list:
    """The program's outputs on sliced flat ``params``, ``extra`` and inputs ``xs``."""
    env = evaluate(
      self.prog, params, extra, xs, ids=self.prog.out_ids, eqns=self.eqns, consts=self.consts
    )
    return [env[o] for o in self.prog.out_ids]


__all__ = ["Sliced", "evaluate", "slice_value", "tapped"]
