"""The union-find forest of dimensions behind :mod:`sparsejax.connectivity.dims`.

A dimension is a node with a size; unifying two makes them one set of units. A node may
be *refined* into a row-major product ('prod') or a concatenation with offsets ('cat')
of smaller nodes; two refinements of one node are aligned to their common refinement,
and where none exists the nodes are *mixed* (their units cannot be told apart). An axis
is read back as a :class:`Tree` of leaf dimensions.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tree:
  """An axis as leaf dimensions: 'leaf' (``dim``), or a row-major 'prod' or a 'cat'
  (offsets in order) of ``children``; ``size`` its length."""

  kind: str
  size: int
  dim: int = -1
  children: tuple = ()

  def leaves(self) -> list[int]:
    """Leaf dimensions of size > 1, in order (with repeats)."""
    if self.kind == "leaf":
      return [self.dim] if self.size > 1 else []
    return [d for c in self.children for d in c.leaves()]

  def units(self) -> list[tuple[int, np.ndarray]]:
    """[(leaf dim, unit index per position of this axis: int [size], -1 where the
    position is not in that dim)] for every leaf of size > 1; a dim in several pieces of
    a concatenation is one entry (several entries only where a product repeats it)."""
    merged: list = []
    for d, u in self._units():
      for j, (d2, u2) in enumerate(merged):
        if d2 == d and not np.any((u >= 0) & (u2 >= 0)):
          merged[j] = (d, np.where(u >= 0, u, u2))
          break
      else:
        merged.append((d, u))
    return merged

  def _units(self) -> list[tuple[int, np.ndarray]]:
    if self.kind == "leaf":
      return [(self.dim, np.arange(self.size))] if self.size > 1 else []
    out = []
    if self.kind == "prod":
      sizes = [c.size for c in self.children]
      grid = np.indices(sizes).reshape(len(sizes), -1) if sizes else np.zeros((0, 1), int)
      for c, digits in zip(self.children, grid):
        out += [(d, u[digits]) for d, u in c._units()]
      return out
    offset = 0
    for c in self.children:
      for d, u in c._units():
        full = np.full(self.size, -1)
        full[offset : offset + c.size] = u
        out.append((d, full))
      offset += c.size
    return out


class Forest:
  """Union-find over dimensions with refinements (product or concatenation)."""

  def __init__(self):
    self.size: list[int] = []
    self.parent: list[int] = []
    self.refine: list = []  # None | (kind, [node ids])
    self.mixes: list = []  # (node, reason), applied to leaves at the end
    self.marks: list = []  # (node, flag)

  def new(self, size: int) -> int:
    self.size.append(int(size))
    self.parent.append(len(self.parent))
    self.refine.append(None)
    return len(self.size) - 1

  def find(self, n: int) -> int:
    root = n
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[n] != root:
      self.parent[n], n = root, self.parent[n]
    return root

  def mix(self, n: int, reason: str) -> None:
    self.mixes.append((n, reason))

  def composite(self, nodes: list[int], kind: str) -> int:
    """A new dim refined as the product / concatenation of ``nodes``."""
    nodes = [n for n in nodes if not (kind == "prod" and self.size[self.find(n)] == 1)]
    if len(nodes) == 1:
      return nodes[0]
    sizes = [self.size[self.find(n)] for n in nodes]
    c = self.new(math.prod(sizes) if kind == "prod" else sum(sizes))
    if nodes:
      self.refine[c] = (kind, list(nodes))
    return c

  def flat(self, n: int, kind: str) -> list[int]:
    """``n`` expanded through refinements of ``kind`` (size-1 factors dropped)."""
    n = self.find(n)
    r = self.refine[n]
    if r is not None and r[0] == kind:
      return [m for c in r[1] for m in self.flat(c, kind)]
    if kind == "prod" and self.size[n] == 1:
      return []
    return [n]

  def unify(self, a: int, b: int, why: str = "") -> None:
    a, b = self.find(a), self.find(b)
    if a == b:
      return
    if self.size[a] != self.size[b]:
      self.mix(a, why or "coupled with an axis of another size")
      self.mix(b, why or "coupled with an axis of another size")
      return
    if self.size[a] == 1:
      return
    ra, rb = self.refine[a], self.refine[b]
    self.parent[b] = a
    if ra is None:
      self.refine[a] = rb
    elif rb is not None:
      if ra[0] != rb[0]:
        self.mix(a, "viewed both as a product (reshape) and as a concatenation")
        for c in rb[1]:
          self.mix(c, "viewed both as a product (reshape) and as a concatenation")
        return
      if not self.align(self.flat_list(ra[1], ra[0]), self.flat_list(rb[1], rb[0]), ra[0]):
        self.mix(a, "reshaped in two ways that split it at different boundaries")
        for c in rb[1]:
          self.mix(c, "reshaped in two ways that split it at different boundaries")

  def flat_list(self, nodes, kind):
    return [m for n in nodes for m in self.flat(n, kind)]

  def align(self, xs: list[int], ys: list[int], kind: str) -> bool:
    """Unifies two refinements of one dim (leaf lists of ``kind``), splitting leaves to
    their common refinement; False where there is none."""
    xs, ys = list(xs), list(ys)
    while xs and ys:
      x, y = self.find(xs[0]), self.find(ys[0])
      sx, sy = self.size[x], self.size[y]
      if sx == sy:
        self.unify(x, y)
        xs.pop(0)
        ys.pop(0)
        continue
      small, big, big_list = (sx, y, ys) if sx < sy else (sy, x, xs)
      if kind == "prod" and (self.size[big] % small):
        return False
      rest = self.size[big] // small if kind == "prod" else self.size[big] - small
      parts = self.split(big, [small, rest], kind)
      if parts is None:
        return False
      big_list[0:1] = parts
    return not xs and not ys

  def split(self, n: int, sizes: list[int], kind: str) -> list[int] | None:
    """Nodes for consecutive parts of ``n`` of ``sizes`` (a product or a concatenation
    of them is ``n``), refining ``n`` where needed; None where ``n`` is already refined
    in a way that does not split there."""
    n = self.find(n)
    if kind == "prod":
      keep = [s for s in sizes if s != 1]
    else:
      keep = [s for s in sizes if s != 0]
    if len(keep) <= 1:
      out, used = [], False
      for s in sizes:
        if (kind == "prod" and s == 1) or (kind == "cat" and s == 0) or used:
          out.append(self.new(s))
        else:
          out.append(n)
          used = True
      return out
    r = self.refine[n]
    if r is None:
      kids = [self.new(s) for s in keep]
      self.refine[n] = (kind, kids)
      have = list(kids)
    elif r[0] != kind:
      return None
    else:
      have = self.flat(n, kind)
    out = []
    for s in sizes:
      if (kind == "prod" and s == 1) or (kind == "cat" and s == 0):
        out.append(self.new(s))
        continue
      group, total = [], 1 if kind == "prod" else 0
      while total != s:
        if not have:
          return None
        h = self.find(have.pop(0))
        hs = self.size[h]
        nxt = total * hs if kind == "prod" else total + hs
        if (kind == "prod" and s % nxt) or nxt > s:
          need = s // total if kind == "prod" else s - total
          if kind == "prod" and hs % need:
            return None
          parts = self.split(h, [need, hs // need if kind == "prod" else hs - need], kind)
          if parts is None:
            return None
          have[0:0] = parts
          continue
        group.append(h)
        total = nxt
      out.append(self.composite(group, kind))
    return out

  def tree(self, n: int, depth: int = 0) -> Tree:
    n = self.find(n)
    r = self.refine[n]
    if r is None or depth > 64:
      return Tree("leaf", self.size[n], n)
    return Tree(r[0], self.size[n], -1, tuple(self.tree(c, depth + 1) for c in r[1]))


__all__ = ["Forest", "Tree"]
