"""Building the program of the connectivity transform.

``fn(params, extra, x)`` (a Flax module's ``apply`` or any JAX function) is traced once
to a jaxpr; call-like primitives (``jit``/``pjit``, ``closed_call``, ``remat``,
``custom_jvp_call``, ``custom_vjp_call``) are inlined, ``cond`` on a constant predicate
takes its branch, equations of constants only are folded, and every remaining value is
classified as *input-dependent* ('x'), *parameter-only* ('p') or *constant* ('c'). The
result, a :class:`Program`, also records the linear ops on the input (its *sites*),
the parameter leaves used as their weights (first-use order), and the *cuts*: the 'x'
values every input-to-output path passes through (dominators of the output).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

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
    src = _jax_compat.source_line(eqn)
    if name in CALLS:
      p = eqn.params
      inner = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
      if inner is None:
        raise unsupported(name, src, "has no inner jaxpr")
      return self._sub(inner, ins)
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
        raise unsupported(
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
