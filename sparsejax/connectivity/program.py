"""Building the program of the connectivity transform.

``fn(params, extra, x)`` (a Flax module's ``apply`` or any JAX function) is traced once
to a jaxpr; call-like primitives (``jit``/``pjit``, ``closed_call``, ``remat``,
``custom_jvp_call``, ``custom_vjp_call``) are inlined, ``cond`` on a constant predicate
takes its branch, loops with a trip count known when tracing (``scan``: ``lax.scan``,
``nn.scan``, ``fori_loop`` with constant bounds; ``while`` whose condition reads
constants only) are unrolled, equations of constants only are folded, and every
remaining value is classified as *input-dependent* ('x'), *parameter-only* ('p') or
*constant* ('c'). The result, a :class:`Program`, also records the linear ops on the
input (its *sites*: ``dot_general``, ``conv_general_dilated``, and *lookups*, a gather
from a parameter table by input-dependent indices such as ``nn.Embed``), the parameter
leaves used as their weights (first-use order), and the *cuts*: the 'x' values every
input-to-output path passes through (dominators of the output).

An equation inside a library's own jit (``jnp.take``'s) has no source line of its own:
errors name the line and Flax module that called it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

from sparsejax import _jax_compat
from sparsejax import masks as masks_lib
from sparsejax.connectivity.primitives import (
  CALLS,
  IDENTITY,
  LINEAR,
  STRUCTURAL,
  SUPPORTED,
  unsupported,
)

#: Iterations a ``while`` loop may unroll before the build gives up (it is then not a
#: loop with a trip count known when tracing, or far too long to unroll).
MAX_WHILE_ITERATIONS = 1 << 16


@dataclasses.dataclass(eq=False)
class Eqn:
  """One equation of a Program: a primitive applied to value ids."""

  prim: Any
  params: dict
  ins: list  # value ids
  outs: list  # value ids
  kind: str  # 'x' or 'p'
  src: str  # the user's source line
  out_avals: list
  lookup: bool = False  # a gather from a table (operand 0) by 'x' indices (operand 1)
  reads: tuple = ()  # axes of operand 0 read at input-dependent positions (gathers)

  @property
  def linear(self) -> bool:
    """A linear op on the input: dot_general, conv_general_dilated, or a lookup."""
    return self.prim.name in LINEAR or self.lookup


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
  products: bool = False  # it multiplies (or divides) two input-dependent values


def bind(e: Eqn, *args, **overrides) -> list:
  """The outputs (a list) of ``e``'s primitive applied to ``args`` with its params,
  ``overrides`` replacing some (e.g. ``preferred_element_type``)."""
  subfuns, params = _jax_compat.bind_params(e.prim, dict(e.params, **overrides))
  out = e.prim.bind(*subfuns, *args, **params)
  return list(out) if e.prim.multiple_results else [out]


class _Builder:
  """Inlines a jaxpr into equations over value ids, folding constants and classifying
  each value 'x', 'p' or 'c'."""

  def __init__(self):
    self.next_id = 0
    self.eqns: list[Eqn] = []
    self.consts: dict = {}
    self.kind: dict = {}
    self.sources: dict = {}
    self.aval: dict = {}  # id -> shape struct (what loops slice and stack)
    self.where = [""]  # the source line of each enclosing call, innermost last

  def new(self, kind: str, aval, sources=frozenset()) -> int:
    i = self.next_id
    self.next_id += 1
    self.kind[i] = kind
    self.aval[i] = jax.ShapeDtypeStruct(tuple(aval.shape), aval.dtype)
    if kind == "p":
      self.sources[i] = frozenset(sources)
    return i

  def const(self, value) -> int:
    shape = np.shape(value)
    dtype = getattr(value, "dtype", None) or np.asarray(value).dtype
    i = self.new("c", jax.ShapeDtypeStruct(shape, dtype))
    self.consts[i] = value
    return i

  def apply(self, fn: Callable, ids: Sequence[int]) -> list[int]:
    """Inlines ``fn`` (a JAX function of arrays) applied to the values ``ids``."""
    closed = _traced_helper(fn, tuple((self.aval[i].shape, self.aval[i].dtype) for i in ids))
    return self._sub(closed, list(ids))

  def inline(
    self, jaxpr: _jax_compat.Jaxpr, const_ids: Sequence[int], in_ids: Sequence[int]
  ) -> list[int]:
    env = {}
    for v, i in zip(jaxpr.constvars, const_ids):
      env[v] = i
    for v, i in zip(jaxpr.invars, in_ids):
      env[v] = i

    def read(a):
      if isinstance(a, _jax_compat.Literal):
        return self.const(a.val)
      return env[a]

    for eqn in jaxpr.eqns:
      ins = [read(a) for a in eqn.invars]
      outs = self.equation(eqn, ins)
      for v, i in zip(eqn.outvars, outs):
        env[v] = i
    return [read(a) for a in jaxpr.outvars]

  def _sub(self, closed, ins):
    if isinstance(closed, _jax_compat.ClosedJaxpr):
      return self.inline(closed.jaxpr, [self.const(c) for c in closed.consts], ins)
    return self.inline(closed, [], ins)

  def equation(self, eqn, ins: list[int]) -> list[int]:
    name = eqn.primitive.name
    kinds = [self.kind[i] for i in ins]
    src = _jax_compat.source_line(eqn) or self.where[-1] or "an unknown source line"
    if name in CALLS:
      p = eqn.params
      inner = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
      if inner is None:
        raise unsupported(name, src, "has no inner jaxpr")
      return self._within(src, self._sub, inner, ins)
    if name == "scan":
      return self._within(src, self._scan, eqn, ins)
    if name == "while":
      return self._within(src, self._while, eqn, ins, src)
    if name in IDENTITY:  # each output is its operand: no equation at all
      return list(ins[: len(eqn.outvars)])
    if all(k == "c" for k in kinds):
      subfuns, bind_params = _jax_compat.bind_params(eqn.primitive, eqn.params)
      with jax.ensure_compile_time_eval():
        ans = eqn.primitive.bind(*subfuns, *[self.consts[i] for i in ins], **bind_params)
      ans = ans if eqn.primitive.multiple_results else [ans]
      return [self.const(a) for a in ans]
    if name == "cond":
      index = ins[0]
      if self.kind[index] != "c":
        raise unsupported(
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
      raise unsupported(
        name,
        src,
        "depends on the input or the parameters and has no "
        "connectivity rule (loops and unknown primitives are not supported)",
      )
    kind = "x" if "x" in kinds else "p"
    reads = _dynamic_axes(eqn, kinds)
    lookup = bool(reads) and name == "gather" and kinds[0] != "x"
    if reads is None:
      raise unsupported(
        name,
        src,
        "uses indices that depend on the input or the parameters (supported: gathers "
        "and dynamic slices that read at such indices)",
      )
    sources = frozenset()
    if kind == "p":
      sources = frozenset().union(*[self.sources[i] for i in ins if self.kind[i] == "p"])
    outs = [self.new(kind, v.aval, sources) for v in eqn.outvars]
    self.eqns.append(
      Eqn(
        eqn.primitive,
        dict(eqn.params),
        ins,
        outs,
        kind,
        src,
        [v.aval for v in eqn.outvars],
        lookup=lookup,
        reads=reads,
      )
    )
    return outs

  def _within(self, src: str, fn: Callable, *args):
    """``fn(*args)`` with ``src`` as the source line of equations that have none."""
    self.where.append(src)
    try:
      return fn(*args)
    finally:
      self.where.pop()

  def _scan(self, eqn, ins: list[int]) -> list[int]:
    """``lax.scan`` unrolled: the body inlined once per step, each step reading its
    slice of the scanned inputs; the stacked outputs concatenated in step order."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]
    steps = range(p["length"] - 1, -1, -1) if p["reverse"] else range(p["length"])
    ys_by_step = {}
    for t in steps:
      x_t = [self.apply(_step(t), [i])[0] for i in xs]
      outs = self._sub(p["jaxpr"], consts + carry + x_t)
      carry, ys_by_step[t] = outs[:nk], outs[nk:]
    ys_avals = eqn.outvars[nk:]
    if not ys_by_step:  # length 0: empty stacked outputs
      return carry + [self.const(np.zeros(v.aval.shape, v.aval.dtype)) for v in ys_avals]
    order = [ys_by_step[t] for t in range(p["length"])]
    return carry + [self.apply(_stack, [y[j] for y in order])[0] for j in range(len(ys_avals))]

  def _while(self, eqn, ins: list[int], src: str) -> list[int]:
    """``lax.while_loop`` unrolled while its condition reads constants only (a trip
    count known when tracing); a condition on the input or the parameters is refused."""
    p = eqn.params
    cc, bc = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, carry = ins[:cc], ins[cc : cc + bc], ins[cc + bc :]
    for _ in range(MAX_WHILE_ITERATIONS):
      (go,) = self._sub(p["cond_jaxpr"], cond_consts + carry)
      if self.kind[go] != "c":
        raise unsupported(
          "while",
          src,
          "is a loop whose trip count depends on the input or the parameters (a "
          "data-dependent loop has no single graph); loops whose trip count is known "
          "when tracing (lax.scan, nn.scan, fori_loop with constant bounds) are unrolled",
        )
      if not bool(np.asarray(self.consts[go])):
        return carry
      carry = self._sub(p["body_jaxpr"], body_consts + carry)
    raise ValueError(
      f"primitive 'while' at {src} ran {MAX_WHILE_ITERATIONS} iterations without ending; "
      "the connectivity transform unrolls loops, so their trip count must be known and "
      "bounded when tracing."
    )


@functools.cache
def _step(t: int) -> Callable:
  """``a -> a[t]`` (one function object per t: the traces below are cached by it)."""
  return lambda a: lax.index_in_dim(a, t, keepdims=False)


def _stack(*arrays):
  return jax.numpy.stack(arrays)


@functools.lru_cache(maxsize=512)
def _traced_helper(fn: Callable, avals: tuple):
  """The closed jaxpr of ``fn`` on arrays of ``avals`` ((shape, dtype) pairs)."""
  return jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct(s, d) for s, d in avals])


def _dynamic_axes(eqn, kinds) -> tuple | None:
  """The axes of a gather's or dynamic slice's operand read at positions that depend on
  the input or the parameters (its indices are not constant): () for constant indices,
  None for an indexed write (dynamic_update_slice, scatter) at such positions."""
  name = eqn.primitive.name
  if name not in STRUCTURAL or STRUCTURAL[name] is None:
    return ()
  data = STRUCTURAL[name]
  if all(kinds[j] == "c" for j in range(len(kinds)) if j not in data):
    return ()
  if name == "gather":
    return tuple(eqn.params["dimension_numbers"].start_index_map)
  if name == "dynamic_slice":
    return tuple(j - 1 for j in range(1, len(kinds)) if kinds[j] != "c")
  return None


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
    hint = ""
    if all(jax.numpy.issubdtype(s.dtype, jax.numpy.floating) for s in x_flat):
      shape = tuple(x_flat[0].shape)
      hint = (
        f" (a model of token ids takes an integer example: pass an integer array or "
        f"jax.ShapeDtypeStruct({shape}, jnp.int32) as input_shape)"
      )
    raise ValueError(
      f"the example input (shapes {[tuple(s.shape) for s in x_flat]}, "
      f"{x_flat[0].dtype if x_flat else 'none'}) cannot be applied to the model: {err}{hint}"
    ) from None
  b = _Builder()
  param_ids = [b.new("p", s, {i}) for i, (_, s) in enumerate(p_flat)]
  extra_ids = [b.new("p", s) for s in e_flat]
  x_ids = [b.new("x", s) for s in x_flat]
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
    if e.kind != "x" or not e.linear:
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
    products=any(
      e.kind == "x"
      and (e.prim.name in LINEAR or e.prim.name in ("mul", "div"))
      and sum(b.kind[i] == "x" for i in e.ins) >= 2
      for e in b.eqns
    ),
  )
