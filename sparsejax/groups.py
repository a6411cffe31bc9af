"""Dependency groups: the coupled units of any traced model, and the parameters they own.

``sparsejax.structure(model, input_shape, variables=...)`` follows every unit axis
through the model's traced program (:mod:`sparsejax.connectivity.dims`): residual adds
and concatenations (offsets), reshapes and transposes (attention heads; grouped-query
attention's key/value heads shared by several query heads), elementwise products (a
GLU's gate and up projections), grouped and depthwise convolutions, tied embeddings (the
residual stream width). A *group* is a set of units that every value carrying it
indexes the same way and that some linear op writes (a kernel's output axis, an
embedding's features): removing unit u of a group removes index u of every axis that
carries the group, in every parameter, batch statistic, constant and intermediate.

For each group: its ``kind`` ('channel': written by convolutions only; 'neuron':
written by a Dense, einsum or embedding; 'head': the head axis of attention (a batch
axis of a product of two input-dependent values); 'head_dim': a head's features (the
contracted or free axis of such a product)), its ``size``, and the parameter slices it
owns or that read it (:class:`Slice`: a leaf, an axis, and which unit each position of
that axis belongs to). Roles: 'writes' (kernel columns, embedding features), 'reads'
(kernel rows, a tied embedding's features read by the output layer), 'owns' (biases,
normalization scales and shifts, batch statistics).

A group is *removable* unless its axis is mixed in a way no group can follow (a reshape
across a boundary, a sort, a cumulative sum, a pooling window over it, a gather by
index, an unknown primitive), it is an axis of the model's input or output, or it
owns no parameter slice; each such group carries the reason (:attr:`Group.reason`), and
structured pruning and compaction leave it alone: never a wrong group.

Names: a group written by several layers and summed with another input-dependent value
(a residual stream) is 'stream<k>' (k = 1, 2, ... in input-to-output order); any other
group is named after the first layer that writes it (its parameter path without the last
key: 'conv_00', 'stage1_block0/conv_1'), heads and their features with '/heads' and
'/head_dim'. Order: streams first, then the other groups in input-to-output order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import connectivity as conn_lib
from sparsejax import masks as masks_lib
from sparsejax import models, tracing
from sparsejax.connectivity import dims as dims_lib

KINDS = ("channel", "neuron", "head", "head_dim")


@dataclasses.dataclass(frozen=True, eq=False)
class Slice:
  """Positions of one axis of one variable that belong to a group.

  path: the variable's '/'-joined path ('params' leaves without the collection name,
  others with it: 'batch_stats/norm_0/mean'); collection: 'params' or the collection;
  leaf: its flat index in that collection; axis: the axis; role: 'writes', 'reads' or
  'owns' (module docstring); units: int [axis size], the group's unit at each position
  of the axis, -1 where the position is another group's.
  """

  path: str
  collection: str
  leaf: int
  axis: int
  role: str
  units: np.ndarray

  def describe(self) -> str:
    n = len(self.units)
    inside = int(np.sum(self.units >= 0))
    where = "" if inside == n else f" {inside}/{n}"
    return f"{self.path}[axis {self.axis}{where}]"


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """One dependency group (module docstring). ``dim``: its leaf dimension in the
  analysis; ``writers`` / ``readers``: the layers (site names) whose kernels write /
  read it; ``reason``: why it is not removable (None when it is)."""

  name: str
  kind: str
  size: int
  dim: int
  slices: tuple
  writers: tuple
  readers: tuple
  reason: str | None = None

  @property
  def removable(self) -> bool:
    return self.reason is None

  def slices_of(self, role: str | None = None, collection: str | None = "params") -> list:
    return [
      s
      for s in self.slices
      if (role is None or s.role == role) and (collection is None or s.collection == collection)
    ]

  def unit_sums(self, values: dict, role: str | None = None) -> np.ndarray:
    """sum over this group's slices (of ``role``) of ``values`` {param path: array
    shaped like the leaf}, per unit: float64 [size] (paths not in ``values`` skipped)."""
    out = np.zeros(self.size)
    for s in self.slices_of(role):
      if s.path not in values or values[s.path] is None:
        continue
      a = np.asarray(values[s.path], np.float64)
      per = a.sum(axis=tuple(j for j in range(a.ndim) if j != s.axis))
      inside = s.units >= 0
      np.add.at(out, s.units[inside], per[inside])
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Structure:
  """The dependency groups of a traced model (module docstring): ``groups`` in order
  (removable or not), ``dims`` the analysis of its program."""

  traced: Any
  dims: Any
  groups: tuple
  extra_paths: tuple

  def __getitem__(self, name: str) -> Group:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(name)

  def removable(self, kind: str | None = None) -> list[Group]:
    """The removable groups (of ``kind``), in order."""
    return [g for g in self.groups if g.removable and (kind is None or g.kind == kind)]

  def table(self) -> str:
    """One line per group: name, kind, size, removable (or why not), and its slices by
    role."""
    rows = [("group", "kind", "size", "removable", "parameters")]
    for g in self.groups:
      parts = []
      for role in ("writes", "reads", "owns"):
        got = [s.describe() for s in g.slices if s.role == role]
        if got:
          parts.append(f"{role}: " + ", ".join(got))
      rows.append(
        (g.name, g.kind, str(g.size), "yes" if g.removable else f"no: {g.reason}", "; ".join(parts))
      )
    widths = [max(len(r[j]) for r in rows) for j in range(4)]
    lines = []
    for r in rows:
      cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2])]
      lines.append("  ".join(cells + [r[3].ljust(widths[3]), r[4]]).rstrip())
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()

  def unit_masks(self, keep: dict, template=None):
    """The mask tree (numpy bool, the prunable leaves) removing every unit outside
    ``keep`` {group name: kept unit indices} of the groups named: every position of a
    prunable weight that belongs to a removed unit (kernel columns and rows, embedding
    features) is False. ``template``: masks to start from (default dense)."""
    traced = self.traced
    if template is None:
      template = masks_lib.map_masks(lambda m: np.ones(np.shape(m), bool), traced.ones())
    flat = traced.params_spec[0].flatten_up_to(template)
    flat = [None if m is None else np.array(m, bool) for m in flat]
    for name, kept in keep.items():
      g = self[name]
      alive = np.zeros(g.size, bool)
      alive[np.asarray(kept, int)] = True
      if alive.all():
        continue
      for s in g.slices_of(collection="params"):
        m = flat[s.leaf]
        if m is None:
          continue
        inside = s.units >= 0
        off = np.zeros(len(s.units), bool)
        off[inside] = ~alive[s.units[inside]]
        index = [slice(None)] * m.ndim
        index[s.axis] = off
        m[tuple(index)] = False
    return jax.tree.unflatten(traced.params_spec[0], flat)


def _paths(spec) -> list[str]:
  return [masks_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(spec)]


def _name_of(used: dict, base: str) -> str:
  used[base] = used.get(base, 0) + 1
  return base if used[base] == 1 else f"{base}#{used[base]}"


@functools.lru_cache(maxsize=64)
def of_traced(traced) -> Structure:
  """The :class:`Structure` of a :class:`sparsejax.Traced` (cached by the object)."""
  prog = traced.program
  d = dims_lib.analyze(prog)
  site_names = conn_lib.site_names(prog)
  extra_paths = tuple(_paths(tracing.unspec(traced.extra_spec)))
  # writers per leaf dim: (site order, position in the site's output axes)
  writers: dict[int, list] = {}
  readers: dict[int, list] = {}
  conv_writer: dict[int, list] = {}
  roles: dict[tuple, str] = {}
  for n, s in enumerate(d.sites):
    if s.w is None:
      continue
    e = prog.eqns[s.eqn]
    w_axes = d.axes[e.ins[s.w]]
    rank = len(w_axes)
    if s.lookup:
      collapsed = set(e.params["dimension_numbers"].collapsed_slice_dims)
      write_axes = [j for j in range(rank) if j not in collapsed]
      read_axes = sorted(collapsed)
    elif s.conv:
      rspec = e.params["dimension_numbers"].rhs_spec
      write_axes, read_axes = [rspec[0]], [rspec[1]]
    else:
      (lc, rc), (lb, rb) = e.params["dimension_numbers"]
      c, b = (rc, rb) if s.w == 1 else (lc, lb)
      write_axes = [j for j in range(rank) if j not in c and j not in b]
      read_axes = list(c)
    pos = 0
    for a in write_axes:
      for dim in w_axes[a].leaves():
        writers.setdefault(dim, []).append((n, pos))
        conv_writer.setdefault(dim, []).append(s.conv)
        pos += 1
    for a in read_axes:
      for dim in w_axes[a].leaves():
        readers.setdefault(dim, []).append(n)
    if s.leaf is not None:
      for a in s.writes:
        roles[(s.leaf, a)] = "writes"
      for a in s.reads:
        roles.setdefault((s.leaf, a), "reads")
  # slices of every variable, by leaf dim
  slices: dict[int, list] = {}
  for coll, ids, paths in (
    ("params", prog.param_ids, prog.param_paths),
    ("extra", prog.extra_ids, extra_paths),
  ):
    for leaf, (v, path) in enumerate(zip(ids, paths)):
      for a, t in enumerate(d.axes.get(v, ())):
        for dim, units in t.units():
          role = roles.get((leaf, a), "owns") if coll == "params" else "owns"
          c = "params" if coll == "params" else path.split("/", 1)[0]
          slices.setdefault(dim, []).append(Slice(path, c, leaf, a, role, units))
  # the groups: leaf dims some linear op writes
  order = sorted(writers, key=lambda dim: min(writers[dim]))
  flags = d.flags
  groups_info = []
  for dim in order:
    size = d.sizes.get(dim, 0)
    if size <= 1:
      continue
    f = flags.get(dim, set())
    w_sites = sorted({n for n, _ in writers[dim]})
    if "head" in f:
      kind = "head"
    elif "xx" in f:
      kind = "head_dim"
    elif all(conv_writer[dim]):
      kind = "channel"
    else:
      kind = "neuron"
    w_leaves = {d.sites[n].leaf for n in w_sites}
    stream = "residual" in f and len(w_leaves) >= 2 and kind in ("channel", "neuron")
    reason = None
    if dim in d.mixed:
      reason = d.mixed[dim]
    elif "input" in f:
      reason = "an axis of the model's input (or coupled with one)"
    elif "output" in f:
      reason = "an axis of the model's output (or coupled with one)"
    elif not slices.get(dim):
      reason = "owns no parameter slice"
    groups_info.append((dim, size, kind, stream, w_sites, reason))
  used: dict = {}
  groups = []
  k = 0
  for dim, size, kind, stream, w_sites, reason in groups_info:
    if stream:
      k += 1
      groups.append((0, Group(f"stream{k}", kind, size, dim, (), (), (), reason), w_sites))
  for dim, size, kind, stream, w_sites, reason in groups_info:
    if stream:
      continue
    base = site_names[w_sites[0]]
    if kind in ("head", "head_dim"):
      base = f"{base}/{'heads' if kind == 'head' else 'head_dim'}"
    groups.append((1, Group(base, kind, size, dim, (), (), (), reason), w_sites))
  out = []
  for _, g, w_sites in sorted(groups, key=lambda t: t[0]):
    name = g.name if g.name.startswith("stream") else _name_of(used, g.name)
    out.append(
      dataclasses.replace(
        g,
        name=name,
        slices=tuple(slices.get(g.dim, ())),
        writers=tuple(site_names[n] for n in w_sites),
        readers=tuple(site_names[n] for n in sorted(set(readers.get(g.dim, ())))),
      )
    )
  return Structure(traced, d, tuple(out), extra_paths)


def default_input(model, variables=None) -> tuple | None:
  """One example's shape a registered zoo network is traced on when none is given: its
  dataset's input (the first spec registered with the model's class), or, when
  ``variables`` were made for another input, the first registered input shape they fit
  (LeNet-5 on MNIST's 28x28x1); None for other models."""
  if not isinstance(model, nn.Module):
    return None
  own = [s.input_shape for s in models.MODELS.values() if s.build is type(model)]
  if not own:
    return None
  if variables is None or not hasattr(variables, "keys") or "params" not in variables:
    return tuple(own[0])
  want = tracing._spec(variables["params"])
  for shape in dict.fromkeys(own + [s.input_shape for s in models.MODELS.values()]):
    try:
      got = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
    except (TypeError, ValueError, flax.errors.FlaxError):
      continue
    if tracing._spec(got["params"]) == want:
      return tuple(shape)
  return tuple(own[0])


def structure(
  model, input_shape=None, *, variables=None, params=None, apply_kwargs=None
) -> Structure:
  """The dependency groups of ``model`` (module docstring); arguments as
  :func:`sparsejax.trace` (a :class:`sparsejax.Traced` may be passed as ``model``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import sparsejax
    >>> from sparsejax import models
    >>> s = sparsejax.structure(models.LeNet300100(hidden=(6, 4)), (28, 28, 1))
    >>> [(g.name, g.kind, g.size) for g in s.removable()]
    [('dense_0', 'neuron', 6), ('dense_1', 'neuron', 4)]
  """
  if input_shape is None and not isinstance(model, tracing.Traced):
    input_shape = default_input(model, variables)
  traced = tracing.trace(
    model, input_shape, variables=variables, params=params, apply_kwargs=apply_kwargs
  )
  return of_traced(traced)


def traced_of(
  model,
  variables,
  input_shape=None,
  apply_kwargs=None,
  who: str = "",
  purpose: str = "to find its dependency groups",
):
  """The :class:`sparsejax.Traced` of ``model`` (a Traced is returned as it is; a zoo
  network without ``input_shape`` is traced on its dataset's input); ``who`` prefixes
  and ``purpose`` explains the error for a model that cannot be traced without
  ``input_shape``."""
  if isinstance(model, tracing.Traced):
    return model
  if input_shape is None:
    input_shape = default_input(model, variables)
  if input_shape is None:
    raise ValueError(
      f"{who}input_shape=None: model={tracing._name(model)} is traced {purpose}; pass "
      "input_shape= (one example's shape) or a sparsejax.Traced as model."
    )
  return tracing.trace(model, input_shape, variables=variables, apply_kwargs=apply_kwargs)


__all__ = [
  "KINDS",
  "Group",
  "Slice",
  "Structure",
  "default_input",
  "of_traced",
  "structure",
  "traced_of",
]
