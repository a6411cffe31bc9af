"""Unit axes of a traced Program: which axes of which values are the same units.

Every axis of every value of a :class:`~sparsejax.connectivity.program.Program`
(parameters, batch statistics, constants, the input and every intermediate) gets a
*dimension*, a node of a union-find forest. Following the equations couples them:

- elementwise ops (with size-1 broadcasting) and batch axes of ``dot_general`` make
  their axes one dimension; the contracted axes of a ``dot_general`` (or a
  convolution's input features and its kernel's input axis) are one dimension too, read
  there (*mixed away*: the output has no such axis);
- reshapes *refine* a dimension into a row-major product of smaller ones (an attention
  projection of H * Dh features viewed as [H, Dh]) or merge several into a product;
  concatenations, splits, slices and pads refine one into a concatenation of pieces
  (offsets); a dimension refined two ways is aligned to their common refinement, and
  where none exists (a reshape that does not split at a factor boundary, a product
  concatenated), its dimensions are *mixed*;
- a grouped convolution views its input features as [groups, per group] and its output
  features as [groups, per group], the group factor one dimension across them;
- reductions, windowed reductions, cumulative ops, sorts, reversals and gathers along an
  axis mix it away (reductions are recorded as reads; the others make it *mixed*:
  no unit of it can be removed without changing which element goes where).

At the end every axis is a tree of leaf dimensions (``Tree``: a leaf, or a product or
concatenation of subtrees); a leaf dimension is a set of units that every value
carrying it indexes the same way. Axes of size 1 are never units (batch 1, broadcast
axes). Nothing here evaluates the program: the analysis reads shapes and equations only.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from sparsejax.connectivity.forest import Forest, Tree
from sparsejax.connectivity.primitives import (
  ALONG_AXIS,
  CUMULATIVE,
  ELEMENTWISE,
  REDUCTIONS,
  WINDOWS,
)
from sparsejax.connectivity.program import Program

#: Reductions whose result is unchanged by removing an exactly-zero term.
SUM_REDUCTIONS = frozenset({"reduce_sum", "reduce_or", "reduce_xor"})
#: Ops that only change the element type or copy: axes pass through (the walk from a
#: linear op's weight back to its parameter leaf follows them).
_SAME_AXES = frozenset(
  {"convert_element_type", "copy", "copy_p", "reduce_precision", "neg", "abs", "stop_gradient"}
)


@dataclasses.dataclass(frozen=True)
class Site:
  """A linear op on the input (a Program site) as axes: ``eqn`` its index, ``x`` the
  input-dependent operand, ``w`` the weight operand (None: both operands depend on the
  input), ``leaf`` the weight's parameter leaf (None when its axes cannot be followed
  back to one), ``writes`` / ``reads`` the leaf's axes that are the op's output units
  (kernel columns, an embedding's features) / that it contracts (kernel rows, an
  embedding's vocabulary), ``conv`` whether it is a convolution."""

  eqn: int
  x: int
  w: int | None
  leaf: int | None
  writes: tuple
  reads: tuple
  conv: bool
  lookup: bool


@dataclasses.dataclass(frozen=True)
class Read:
  """An input-dependent value ``value`` whose ``axis`` the equation ``eqn`` mixes away:
  ``how`` 'linear' (contracted with a weight), 'product' (contracted with another
  input-dependent value), 'sum' (a sum reduction) or 'other' (max, min, prod, argmax:
  an exactly-zero term still matters)."""

  eqn: int
  operand: int
  value: int
  axis: int
  how: str


@dataclasses.dataclass
class Dims:
  """The result of :func:`analyze`.

  axes: {value id: (Tree per axis)}; sizes: {leaf dim: size}; mixed: {leaf dim: why
  its units cannot be removed}; flags: {leaf dim: set of 'input', 'output', 'head'
  (a batch axis of a product of two input-dependent values: attention heads), 'xx'
  (contracted or free in such a product: a head's features), 'residual' (summed with
  another input-dependent value)}; sites: :class:`Site` per Program site; reads:
  :class:`Read` list; consumers: {value id: [eqn indices]}.
  """

  axes: dict
  sizes: dict
  mixed: dict
  flags: dict
  sites: list
  reads: list
  consumers: dict

  def dims_of(self, value: int) -> set[int]:
    """Leaf dims of any axis of ``value``."""
    return {d for t in self.axes.get(value, ()) for d in t.leaves()}


def _shapes(prog: Program) -> dict:
  shape = {}
  for i, s in zip(prog.param_ids, prog.param_shapes):
    shape[i] = tuple(s)
  for i, s in zip(prog.extra_ids, prog.extra_shapes):
    shape[i] = tuple(s)
  for i, s in zip(prog.x_ids, prog.x_shapes):
    shape[i] = tuple(s)
  for i, c in prog.consts.items():
    shape[i] = tuple(np.shape(c))
  for e in prog.eqns:
    for o, a in zip(e.outs, e.out_avals):
      shape[o] = tuple(a.shape)
  return shape


class _Analysis:
  def __init__(self, prog: Program):
    self.prog = prog
    self.f = Forest()
    self.shape = _shapes(prog)
    self.ax: dict[int, list[int]] = {}
    self.reads: list[Read] = []
    self.producer = {o: k for k, e in enumerate(prog.eqns) for o in e.outs}
    self.consumers = defaultdict(list)
    for k, e in enumerate(prog.eqns):
      for i in e.ins:
        self.consumers[i].append(k)

  def axes(self, v: int) -> list[int]:
    if v not in self.ax:
      self.ax[v] = [self.f.new(s) for s in self.shape[v]]
    return self.ax[v]

  def x(self, v: int) -> bool:
    return self.prog.kind.get(v) == "x"

  def mix_all(self, e, reason: str) -> list[list[int]]:
    for i in e.ins:
      for n in self.axes(i):
        self.f.mix(n, reason)
    outs = [[self.f.new(s) for s in a.shape] for a in e.out_avals]
    for o in outs:
      for n in o:
        self.f.mix(n, reason)
    return outs

  # ------------------------------------------------------------------ equations

  def run(self) -> Dims:
    prog = self.prog
    for k, e in enumerate(prog.eqns):
      outs = self.equation(k, e)
      for o, nodes in zip(e.outs, outs):
        self.ax[o] = list(nodes)
    for v in prog.x_ids:
      for n in self.axes(v):
        self.f.marks.append((n, "input"))
    for v in prog.out_ids:
      for n in self.axes(v):
        self.f.marks.append((n, "output"))
    sites = [self.site(k) for k, _ in prog.sites]
    return self.result(sites)

  def equation(self, k: int, e) -> list[list[int]]:
    name = e.prim.name
    p = e.params
    ins = [self.axes(i) for i in e.ins]
    out_shapes = [tuple(a.shape) for a in e.out_avals]
    if e.lookup:
      return [self.gather(e, ins, out_shapes[0], lookup=True)]
    if name == "dot_general":
      return [self.dot_general(k, e, ins)]
    if name == "conv_general_dilated":
      return [self.conv(k, e, ins, out_shapes[0])]
    if name in ELEMENTWISE:
      return [self.elementwise(e, ins, s) for s in out_shapes]
    if name in ("reshape",):
      return [self.reshape(ins[0], self.shape[e.ins[0]], out_shapes[0])]
    if name == "broadcast_in_dim":
      out = [self.f.new(s) for s in out_shapes[0]]
      in_shape = self.shape[e.ins[0]]
      for i, d in enumerate(p["broadcast_dimensions"]):
        if in_shape[i] == out_shapes[0][d]:
          out[d] = ins[0][i]
      return [out]
    if name == "transpose":
      return [[ins[0][j] for j in p["permutation"]]]
    if name == "tile":  # an axis repeated once is the same axis; repeated axes are copies
      out = []
      for n, r, size in zip(ins[0], p["reps"], out_shapes[0]):
        if r == 1:
          out.append(n)
        else:
          self.f.mix(n, "repeated by tile")
          out.append(self.f.new(size))
          self.f.mix(out[-1], "repeated by tile")
      return [out]
    if name == "squeeze":
      dims = {d % len(ins[0]) for d in p["dimensions"]}
      return [[n for j, n in enumerate(ins[0]) if j not in dims]]
    if name in REDUCTIONS:
      axes = set(p["axes"])
      how = "sum" if name in SUM_REDUCTIONS else "other"
      if self.x(e.ins[0]):
        for a in axes:
          self.reads.append(Read(k, 0, e.ins[0], a, how))
      return [[n for j, n in enumerate(ins[0]) if j not in axes]]
    if name in WINDOWS:
      return self.windows(e, ins, out_shapes)
    if name in CUMULATIVE:
      ax = p["axis"]
      self.f.mix(ins[0][ax], f"summed cumulatively by {name}")
      return [list(ins[0])]
    if name in ALONG_AXIS:
      return self.along_axis(e, ins, out_shapes)
    if name == "concatenate":
      return [self.concatenate(e, ins)]
    if name == "split":
      return self.split(e, ins)
    if name == "slice":
      return [self.slice(e, ins[0], out_shapes[0])]
    if name == "pad":
      return [self.pad(e, ins[0], out_shapes[0])]
    if name == "rev":
      for d in p["dimensions"]:
        self.f.mix(ins[0][d], "reversed (rev)")
      return [list(ins[0])]
    if name == "gather":
      return [self.gather(e, ins, out_shapes[0], lookup=False)]
    if name == "dynamic_slice":
      return [self.dynamic_slice(e, ins, out_shapes[0])]
    if name == "dynamic_update_slice":
      op, up = ins[0], ins[1]
      for j, (a, b) in enumerate(zip(op, up)):
        if self.shape[e.ins[0]][j] == self.shape[e.ins[1]][j]:
          self.f.unify(a, b)
        else:
          self.f.mix(a, "partly overwritten (dynamic_update_slice)")
          self.f.mix(b, "partly overwritten (dynamic_update_slice)")
      return [list(op)]
    return self.mix_all(e, f"passed through {name!r}, whose axes are not followed")

  def elementwise(self, e, ins, out_shape) -> list[int]:
    out = [None] * len(out_shape)
    summed = e.prim.name in ("add", "add_any", "sub")
    for j, size in enumerate(out_shape):
      full = [
        (a[j], self.x(i))
        for a, i in zip(ins, e.ins)
        if len(self.shape[i]) == len(out_shape) and self.shape[i][j] == size
      ]
      nodes = [n for n, _ in full]
      # a sum of two input-dependent values that were different dims until here (a
      # residual connection; not gelu's x + c x^3, a function of one value)
      if summed and size > 1 and len({self.f.find(n) for n, x in full if x}) >= 2:
        self.f.marks.append((nodes[0], "residual"))
      for n in nodes[1:]:
        self.f.unify(nodes[0], n)
      out[j] = nodes[0] if nodes else self.f.new(size)
    return out

  def reshape(self, nodes, in_shape, out_shape) -> list[int]:
    src = [n for n, s in zip(nodes, in_shape) if s != 1]
    out = [None] * len(out_shape)
    big = [j for j, s in enumerate(out_shape) if s != 1]
    for j, s in enumerate(out_shape):
      if s == 1:
        out[j] = self.f.new(1)
    # walk both shapes, grouping consecutive axes with equal products
    i = 0
    while big:
      group_in, group_out, pin, pout = [], [], 1, 1
      while not (group_in and group_out and pin == pout):
        if (pin < pout or not group_in) and i < len(src):
          group_in.append(src[i])
          pin *= self.f.size[self.f.find(src[i])]
          i += 1
        elif big:
          group_out.append(big.pop(0))
          pout *= out_shape[group_out[-1]]
        else:  # the products disagree: not a reshape (cannot happen)
          break
      c = self.f.composite(group_in, "prod")
      parts = self.f.split(c, [out_shape[j] for j in group_out], "prod")
      if parts is None:
        self.f.mix(c, "reshaped across a boundary of its refinement")
        parts = [self.f.new(out_shape[j]) for j in group_out]
        for n in parts:
          self.f.mix(n, "reshaped across a boundary of its refinement")
      for j, n in zip(group_out, parts):
        out[j] = n
    return out

  def windows(self, e, ins, out_shapes):
    p = e.params
    nodes = ins[0]
    out = []
    dims = p["window_dimensions"]
    for j, n in enumerate(nodes):
      trivial = (
        dims[j] == 1
        and p["window_strides"][j] == 1
        and tuple(p["padding"][j]) == (0, 0)
        and p["base_dilation"][j] == 1
        and p["window_dilation"][j] == 1
      )
      if trivial:
        out.append(n)
      else:
        self.f.mix(n, f"pooled by {e.prim.name}")
        m = self.f.new(out_shapes[0][j])
        self.f.mix(m, f"positions of a {e.prim.name} output")
        out.append(m)
    return [list(out) for _ in out_shapes]

  def along_axis(self, e, ins, out_shapes):
    name = e.prim.name
    rank = len(ins[0])
    axis = e.params["dimension"] if name == "sort" else rank - 1
    for a in ins:
      self.f.mix(a[axis], f"reordered by {name}")
    base = list(ins[0])
    for a in ins[1:]:
      for j in range(rank):
        if j != axis:
          self.f.unify(base[j], a[j])
    outs = []
    for s in out_shapes:
      o = list(base)
      if s[axis] != self.f.size[self.f.find(base[axis])]:
        o[axis] = self.f.new(s[axis])
        self.f.mix(o[axis], f"reordered by {name}")
      outs.append(o)
    return outs

  def concatenate(self, e, ins) -> list[int]:
    d = e.params["dimension"]
    base = list(ins[0])
    for a in ins[1:]:
      for j in range(len(base)):
        if j != d:
          self.f.unify(base[j], a[j])
    base[d] = self.f.composite([a[d] for a in ins], "cat")
    return base

  def split(self, e, ins):
    axis = e.params["axis"]
    sizes = [int(s) for s in e.params["sizes"]]
    parts = self.f.split(ins[0][axis], sizes, "cat")
    if parts is None:
      self.f.mix(ins[0][axis], "split across a boundary of its refinement")
      parts = [self.f.new(s) for s in sizes]
      for n in parts:
        self.f.mix(n, "split across a boundary of its refinement")
    outs = []
    for n in parts:
      o = list(ins[0])
      o[axis] = n
      outs.append(o)
    return outs

  def _range(self, n, size, start, stop, why) -> int:
    """The node of [start, stop) of dim ``n`` (of ``size``)."""
    if start == 0 and stop == size:
      return n
    parts = self.f.split(n, [start, stop - start, size - stop], "cat")
    if parts is None:
      self.f.mix(n, why)
      m = self.f.new(stop - start)
      self.f.mix(m, why)
      return m
    return parts[1]

  def slice(self, e, nodes, out_shape) -> list[int]:
    p = e.params
    strides = p.get("strides") or (1,) * len(nodes)
    out = []
    in_shape = self.shape[e.ins[0]]
    for j, n in enumerate(nodes):
      lo, hi, st = p["start_indices"][j], p["limit_indices"][j], strides[j]
      if st == 1:
        out.append(self._range(n, in_shape[j], lo, hi, "sliced across a refinement boundary"))
      else:
        self.f.mix(n, "sliced with a stride")
        m = self.f.new(out_shape[j])
        self.f.mix(m, "sliced with a stride")
        out.append(m)
    return out

  def pad(self, e, nodes, out_shape) -> list[int]:
    out = []
    for j, (n, (lo, hi, interior)) in enumerate(zip(nodes, e.params["padding_config"])):
      if lo == hi == interior == 0:
        out.append(n)
      elif interior == 0 and lo >= 0 and hi >= 0:
        pads = [self.f.new(lo), self.f.new(hi)]
        for m in pads:
          self.f.mix(m, "padding")
        out.append(self.f.composite([pads[0], n, pads[1]], "cat"))
      else:
        self.f.mix(n, "padded with interior or negative padding")
        m = self.f.new(out_shape[j])
        self.f.mix(m, "padded with interior or negative padding")
        out.append(m)
    return out

  def gather(self, e, ins, out_shape, lookup: bool) -> list[int]:
    dn = e.params["dimension_numbers"]
    sizes = e.params["slice_sizes"]
    operand, indices = ins[0], ins[1]
    op_shape = self.shape[e.ins[0]]
    out = [None] * len(out_shape)
    offset = list(dn.offset_dims)
    collapsed = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    kept = [j for j in range(len(operand)) if j not in collapsed]
    for j, o in zip(kept, offset):
      if sizes[j] == op_shape[j] and j not in dn.start_index_map:
        out[o] = operand[j]
      else:
        out[o] = self.f.new(out_shape[o])
        self.f.mix(operand[j], "gathered in windows")
        self.f.mix(out[o], "gathered in windows")
    for j in dn.start_index_map:
      if not lookup:
        self.f.mix(operand[j], "indexed by a gather")
    batch = [d for d in range(len(out_shape)) if d not in set(offset)]
    idx_axes = [a for a in range(len(indices)) if a != len(indices) - 1]
    for d, a in zip(batch, idx_axes):
      if self.x(e.ins[1]) and self.shape[e.ins[1]][a] == out_shape[d]:
        out[d] = indices[a]
      else:
        out[d] = self.f.new(out_shape[d])
        self.f.mix(out[d], "positions of a gather by constant indices")
    return out

  def dynamic_slice(self, e, ins, out_shape) -> list[int]:
    nodes = ins[0]
    in_shape = self.shape[e.ins[0]]
    out = []
    starts = e.ins[1:]
    for j, n in enumerate(nodes):
      size = e.params["slice_sizes"][j]
      if size == in_shape[j]:
        out.append(n)
        continue
      s = starts[j] if j < len(starts) else None
      if s is not None and s in self.prog.consts:
        lo = int(np.clip(int(np.asarray(self.prog.consts[s])), 0, in_shape[j] - size))
        out.append(self._range(n, in_shape[j], lo, lo + size, "sliced across a boundary"))
      else:
        self.f.mix(n, "sliced at a computed offset")
        m = self.f.new(out_shape[j])
        self.f.mix(m, "sliced at a computed offset")
        out.append(m)
    return out

  def dot_general(self, k, e, ins) -> list[int]:
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    lhs, rhs = ins
    xx = self.x(e.ins[0]) and self.x(e.ins[1])
    for a, b in zip(lb, rb):
      self.f.unify(lhs[a], rhs[b])
      if xx:
        self.f.marks.append((lhs[a], "head"))
    for a, b in zip(lc, rc):
      self.f.unify(lhs[a], rhs[b])
      if xx:
        self.f.marks.append((lhs[a], "xx"))
    for j, c in enumerate((lc, rc)):
      if self.x(e.ins[j]):
        how = "product" if xx else "linear"
        for a in c:
          self.reads.append(Read(k, j, e.ins[j], a, how))
    lfree = [n for j, n in enumerate(lhs) if j not in lc and j not in lb]
    rfree = [n for j, n in enumerate(rhs) if j not in rc and j not in rb]
    if xx:
      for n in lfree + rfree:
        self.f.marks.append((n, "xx"))
    return [lhs[a] for a in lb] + lfree + rfree

  def conv(self, k, e, ins, out_shape) -> list[int]:
    p = e.params
    dn = p["dimension_numbers"]
    lhs, rhs = ins
    lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    g = p["feature_group_count"]
    out = [None] * len(out_shape)
    if p["batch_group_count"] != 1 or not (self.x(e.ins[0]) and not self.x(e.ins[1])):
      return self.mix_all(e, "a convolution with batch groups or an input-dependent kernel")[0]
    lf, ri, ro = lhs[lspec[1]], rhs[rspec[1]], rhs[rspec[0]]
    cin = self.shape[e.ins[0]][lspec[1]]
    cout = self.shape[e.ins[1]][rspec[0]]
    if g == 1:
      self.f.unify(lf, ri)
    else:
      fin = self.f.split(lf, [g, cin // g], "prod")
      fout = self.f.split(ro, [g, cout // g], "prod")
      if fin is None or fout is None:
        self.f.mix(lf, "grouped by a convolution across a refinement boundary")
        self.f.mix(ro, "grouped by a convolution across a refinement boundary")
      else:
        self.f.unify(fin[0], fout[0])
        self.f.unify(fin[1], ri)
    self.reads.append(Read(k, 0, e.ins[0], lspec[1], "linear"))
    out[ospec[0]] = lhs[lspec[0]]
    out[ospec[1]] = ro
    # positions a window slides over, and the positions it produces, are no units: their
    # number is the convolution's geometry
    for d in lspec[2:]:
      self.f.mix(lhs[d], "convolved over (positions of a convolution's input)")
    for d in rspec[2:]:
      self.f.mix(rhs[d], "a convolution kernel's window")
    for d in ospec[2:]:
      out[d] = self.f.new(out_shape[d])
      self.f.mix(out[d], "positions of a convolution's output")
    return out

  # ------------------------------------------------------------------ sites

  def site(self, k: int) -> Site:
    e = self.prog.eqns[k]
    name = e.prim.name
    if e.lookup:
      dn = e.params["dimension_numbers"]
      collapsed = set(dn.collapsed_slice_dims)
      rank = len(self.shape[e.ins[0]])
      writes = tuple(j for j in range(rank) if j not in collapsed)
      reads = tuple(sorted(collapsed))
      leaf, amap = self.weight_leaf(e.ins[0])
      return Site(k, 1, 0, leaf, *self._leaf_axes(amap, writes, reads), False, True)
    xs = [self.x(i) for i in e.ins[:2]]
    if xs[0] and xs[1]:
      return Site(k, 0, None, None, (), (), name != "dot_general", False)
    w = 1 if xs[0] else 0
    rank = len(self.shape[e.ins[w]])
    if name == "dot_general":
      (lc, rc), (lb, rb) = e.params["dimension_numbers"]
      c, b = (rc, rb) if w == 1 else (lc, lb)
      reads = tuple(c)
      writes = tuple(j for j in range(rank) if j not in c and j not in b)
      conv = False
    else:
      rspec = e.params["dimension_numbers"].rhs_spec
      reads, writes, conv = (rspec[1],), (rspec[0],), True
    leaf, amap = self.weight_leaf(e.ins[w])
    return Site(k, 1 - w, w, leaf, *self._leaf_axes(amap, writes, reads), conv, False)

  @staticmethod
  def _leaf_axes(amap, writes, reads):
    if amap is None:
      return (), ()
    return (
      tuple(amap[a] for a in writes if a in amap),
      tuple(amap[a] for a in reads if a in amap),
    )

  def weight_leaf(self, v: int):
    """(param leaf, {operand axis: leaf axis}) of a weight operand, following
    casts, transposes, masks and size-1 reshapes back; (None, None) otherwise."""
    prog = self.prog
    amap = {a: a for a in range(len(self.shape[v]))}
    leaf_of = {i: n for n, i in enumerate(prog.param_ids)}
    for _ in range(64):
      if v in leaf_of:
        return leaf_of[v], amap
      k = self.producer.get(v)
      if k is None:
        return None, None
      e = prog.eqns[k]
      name = e.prim.name
      shape = self.shape[v]
      ps = [i for i in e.ins if prog.kind.get(i) == "p"]
      if len(ps) != 1:
        return None, None
      src = ps[0]
      sshape = self.shape[src]
      if name in _SAME_AXES or (name in ELEMENTWISE and sshape == shape):
        v = src
      elif name == "transpose":
        perm = e.params["permutation"]
        amap = {perm[a]: la for a, la in amap.items()}
        v = src
      elif name in ("reshape", "squeeze", "broadcast_in_dim"):
        big_out = [a for a, s in enumerate(shape) if s != 1]
        big_in = [a for a, s in enumerate(sshape) if s != 1]
        if [shape[a] for a in big_out] != [sshape[a] for a in big_in]:
          return None, None
        pos = dict(zip(big_out, big_in))
        amap = {pos[a]: la for a, la in amap.items() if a in pos}
        v = src
      else:
        return None, None
    return None, None

  # ------------------------------------------------------------------ result

  def result(self, sites) -> Dims:
    f = self.f
    trees = {v: tuple(f.tree(n) for n in nodes) for v, nodes in self.ax.items()}
    sizes, mixed, flags = {}, {}, defaultdict(set)
    for t in (t for ts in trees.values() for t in ts):
      for d in t.leaves():
        sizes[d] = f.size[d]
    for n, reason in f.mixes:
      for d in f.tree(n).leaves():
        mixed.setdefault(d, reason)
    for n, flag in f.marks:
      for d in f.tree(n).leaves():
        flags[d].add(flag)
    return Dims(trees, sizes, mixed, dict(flags), sites, self.reads, dict(self.consumers))


def analyze(prog: Program) -> Dims:
  """The unit axes of ``prog`` (module docstring)."""
  return _Analysis(prog).run()


__all__ = ["Dims", "Read", "Site", "Tree", "SUM_REDUCTIONS", "analyze"]
