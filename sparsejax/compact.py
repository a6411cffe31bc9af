"""Compaction: dead and pruned units removed, a smaller program computing the same function.

Any model :func:`sparsejax.trace` traces. Its dependency groups
(:func:`sparsejax.structure`) say which positions of which axes of every value are one
unit; compaction decides per unit of every removable group, from the exact unit-level
reachability of the masked model (method.md section 1) evaluated at every value that
carries the group (``coreach``: some path leads from the unit there to an output;
``reach``: some path from the input reaches it), and at every *read* of the group (an
equation that mixes its axis away: a contraction with a kernel, a product with another
input-dependent value, a reduction):

- not coreachable anywhere: the unit influences no output; it is dropped.
- at some read, coreachable and reachable: live; it is kept.
- at a read where it is coreachable but not reachable, it is a constant there (biases,
  normalization shifts and statistics, in inference mode). Exactly 0 at a summing read
  (a contraction or a sum: zero padding then makes no difference): nothing to keep
  for that read. Nonzero at a contraction with a kernel whose output has a bias of its
  own and sees it as a position-independent shift (Dense layers; convolutions only
  when the shift is the same at every output position, e.g. 'VALID' ones): *folded*
  into that bias. Otherwise (a nonzero constant read by a max, a normalization's
  statistics, a product, a 'SAME' convolution): kept. Exactness beats size.

A unit is dropped or folded only when every read allows it. A group never shrinks
below one unit (a kept dead unit changes nothing); groups that are not removable
(:attr:`sparsejax.groups.Group.reason`) are kept whole. The input and the outputs are
never compacted.

The compacted model is the traced program with the removed units sliced out of every
parameter, batch statistic, constant and intermediate (:mod:`sparsejax.connectivity.rewrite`):
``Compacted.apply(params, x)`` is an ordinary JAX function (it jits, differentiates and
serializes with ``jax.export``), run one example at a time as traced and vectorized
over the batch. Where a model's widths are fields (the zoo networks, ``resized``), the
rebuilt Flax module comes too (``Compacted.module``).

Equality. The compacted model computes the masked model's function as traced (the zoo:
inference mode, ``train=False``), up to float rounding (summation order of smaller
kernels, folded biases); ``verify=True`` checks max |output difference| <= 1e-5 x max
|output|.

Training equivalence. A masked training run of the compacted network (same data, same
optimizer, the sliced masks) follows the original's run when every removed unit has no
effect on the loss at any step: dropped non-co-reachable units never do (their
gradients are 0; per-weight optimizers such as SGD with momentum and decoupled weight
decay never couple them to the rest; a global-norm clip would not see them either,
their gradients being 0); a constant that is exactly 0 stays 0 in training mode, since
z = 0 gives bn(z) = beta and relu'(0) = 0 stops every gradient into it (true at
initialization: biases and batch-norm shifts start at 0). A *folded* nonzero constant
is not training-equivalent (in training mode batch norm maps it to relu(beta), and beta
learns); use ``fold=False`` to keep such units when the compacted network is to be
trained. Batch statistics in training mode mix the positions of one channel, which the
inference-mode reachability does not: a dropped channel that feeds (unmasked) units of
a channel that is co-reachable at other positions only would shift that channel's batch
mean. With full-size kernels this needs border effects of padding and is not seen on
the zoo (the tests train compacted LeNet-300-100 and VGG and compare the loss curves);
Dense networks (one position) are exact. The removed parameters are sliced away, never
re-initialized: train the returned variables, not ``model.init`` of the compacted
model (the sliced batch-norm statistics of kept channels are the original ones).

Widths. XLA:CPU (and GPUs) run convolutions and matrix products fastest at widths that
are multiples of 8 or 16; ``multiple=8`` keeps some dropped units of each compacted
group (lowest index first) up to the next multiple (the function is unchanged: a
dropped unit influences no output, or is exactly 0 where read).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import connectivity as conn_lib
from sparsejax import groups, tracing
from sparsejax import masks as masks_lib
from sparsejax.connectivity import rewrite
from sparsejax.connectivity.semantics import Evaluator
from sparsejax.errors import CompactionMismatchError

#: Relative tolerance of ``verify``: max |output difference| <= RTOL * max |output|.
RTOL = 1e-5
#: Summing reads: an exactly-zero term of them changes nothing.
_SUMMING = ("linear", "product", "sum")
#: Ops from a parameter leaf to a bias added to a linear op's output.
_BIAS_PATH = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "squeeze"})


@dataclasses.dataclass(frozen=True)
class Plan:
  """What compaction keeps per removable group: kept, folded and dropped unit indices
  (sorted int arrays) and the sizes, by group name; ``shifts``: the folded constants,
  {bias parameter path: shift (shaped like the bias)} added to it; ``blocked``: {group
  name: why it is not removable} of the groups kept whole; ``padded``: {group name:
  dropped units kept back to round the width up to ``multiple``}."""

  kept: dict
  folded: dict
  dropped: dict
  sizes: dict
  shifts: dict
  blocked: dict = dataclasses.field(default_factory=dict)
  padded: dict = dataclasses.field(default_factory=dict)

  def live_fraction(self) -> float:
    """Kept units / units over the removable groups."""
    total = sum(self.sizes.values())
    return sum(len(v) for v in self.kept.values()) / total if total else 1.0

  def widths(self) -> dict:
    """{group name: (size, kept)}."""
    return {n: (self.sizes[n], len(self.kept[n])) for n in self.sizes}


# ------------------------------------------------------------------------ inputs


def _model_input(model, variables, input_shape, apply_kwargs) -> tracing.Traced:
  """The model traced (a Traced as it is; a zoo network on its dataset's input)."""
  if isinstance(model, tracing.Traced):
    if input_shape is not None and tracing._spec(
      tracing.example_input(input_shape)
    ) != tracing._spec(model.input):
      raise ValueError(
        f"input_shape={input_shape!r} differs from the sparsejax.Traced's input "
        f"{tuple(model.input.shape)}; leave it out or trace the model again."
      )
    return model
  return groups.traced_of(model, variables, input_shape, apply_kwargs, purpose="to be compacted")


def _check_variables(traced, variables):
  module = traced.model
  if isinstance(module, nn.Module) and (
    not hasattr(variables, "keys") or "params" not in variables
  ):
    raise ValueError(
      "variables has no 'params' collection; pass the model's variables (e.g. model.init(...))."
    )


def _split(traced, variables):
  """(params, extra) of ``variables`` (a module's collections, or a function's params)."""
  if isinstance(traced.model, nn.Module):
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}
  return variables, {}


def _flat_params(traced, params) -> list:
  return list(traced.params_spec[0].flatten_up_to(params))


def _flat_extra(traced, extra) -> list:
  return jax.tree.leaves(extra) if traced.extra_spec[1] else []


# ------------------------------------------------------------------------ analysis


def _axis_units(tree) -> dict:
  """{leaf dim: unit index per position} of an axis tree (first occurrence)."""
  out = {}
  for d, u in tree.units():
    out.setdefault(d, u)
  return out


def _per_unit(values: np.ndarray, axis: int, units: np.ndarray, size: int, how: str):
  """Per unit of a group along ``axis`` (``units``: unit per position, -1 elsewhere):
  'any' or 'all' of ``values`` (bool) over the unit's positions and every other axis."""
  other = tuple(a for a in range(values.ndim) if a != axis)
  red = values.any(axis=other) if how == "any" else values.all(axis=other)
  inside = units >= 0
  out = np.zeros(size, bool) if how == "any" else np.ones(size, bool)
  if how == "any":
    np.logical_or.at(out, units[inside], red[inside])
  else:
    np.logical_and.at(out, units[inside], red[inside])
  return out


@functools.lru_cache(maxsize=32)
def _reach_program(traced, taps: tuple):
  """The jitted reach pass of ``traced``'s program tapped at ``taps``: masks ->
  (reach, coreach) per tap (float32 {0, 1}, the value's shape)."""
  prog, order = rewrite.tapped(traced.program, taps)
  ev = Evaluator(prog, "reach")
  prunable = tuple(traced.prunable)

  def run(masks):
    pats = [jnp.ones(s, jnp.float32) for s in prog.param_shapes]
    kernels = [m.astype(jnp.float32) for m in masks]
    extra = [jnp.ones(s, jnp.float32) for s in prog.extra_shapes]
    xs = [jnp.ones(s, jnp.float32) for s in prog.x_shapes]
    shapes = [prog.eqns[k].out_avals[0].shape for k, _ in prog.sites]
    perturb = [jnp.zeros(s, jnp.float32) for s in shapes]

    def f(ks, pert):
      ps = list(pats)
      for i, k in zip(prunable, ks):
        ps[i] = k
      outs, reach_at = ev.run(ps, extra, xs, perturb=pert)
      return outs, [reach_at[n] for n in range(len(prog.sites))]

    outs, vjp, reach = jax.vjp(f, kernels, perturb, has_aux=True)
    _, co = vjp([jnp.ones_like(o) for o in outs])
    return reach, co

  return jax.jit(run), order


@functools.lru_cache(maxsize=32)
def _values_program(traced, ids: tuple):
  """The jitted concrete evaluation of ``traced``'s program returning ``ids``."""
  prog = traced.program
  return jax.jit(lambda p, e, x: rewrite.evaluate(prog, p, e, x, ids=ids))


def _bias_of(prog, dims, k: int):
  """(param leaf, bias add value) when the linear op ``k``'s output is read only by an
  add of a bias (a parameter reshaped or broadcast to it), else None."""
  e = prog.eqns[k]
  o = e.outs[0]
  users = dims.consumers.get(o, [])
  if len(users) != 1 or o in prog.out_ids:
    return None
  add = prog.eqns[users[0]]
  if add.prim.name not in ("add", "add_any") or len(add.ins) != 2:
    return None
  b = add.ins[1] if add.ins[0] == o else add.ins[0]
  if prog.kind.get(b) != "p" or len(prog.sources.get(b, ())) != 1:
    return None
  producer = {out: j for j, q in enumerate(prog.eqns) for out in q.outs}
  leaf_of = {i: n for n, i in enumerate(prog.param_ids)}
  v = b
  while v not in leaf_of:
    j = producer.get(v)
    if j is None or prog.eqns[j].prim.name not in _BIAS_PATH:
      return None
    v = prog.eqns[j].ins[0]
  return leaf_of[v], b


def plan(
  model,
  variables,
  masks,
  input_shape=None,
  *,
  fold: bool = True,
  multiple: int | None = None,
  apply_kwargs=None,
) -> Plan:
  """Which units compaction keeps, folds and drops (the module docstring)."""
  traced = _model_input(model, variables, input_shape, apply_kwargs)
  _check_variables(traced, variables)
  tracing.params_of(traced, variables)
  traced = traced.masked(masks)
  return _plan(traced, variables, masks, fold, multiple)


def _plan(traced, variables, masks, fold, multiple) -> Plan:
  structure = groups.of_traced(traced)
  prog, dims = traced.program, structure.dims
  removable = structure.removable()
  by_dim = {g.dim: g for g in removable}
  params, extra = _split(traced, variables)
  masked = masks_lib.apply(params, masks)
  # values carrying a removable group, and the reads of the groups
  carriers = {
    v: [d for d in dims.dims_of(v) if d in by_dim] for v in dims.axes if prog.kind.get(v) == "x"
  }
  carriers = {v: ds for v, ds in carriers.items() if ds}
  out_dims = {}
  reads = []
  for r in dims.reads:
    e = prog.eqns[r.eqn]
    key = r.eqn
    if key not in out_dims:
      out_dims[key] = set().union(*[dims.dims_of(o) for o in e.outs])
    mixed = [d for d in dims.axes[r.value][r.axis].leaves() if d in by_dim]
    mixed = [d for d in mixed if d not in out_dims[key]]
    if mixed:
      reads.append((r, mixed))
  taps = tuple(sorted(carriers))
  flat_masks = [traced.params_spec[0].flatten_up_to(masks)[i] for i in traced.prunable]
  if taps:
    run, order = _reach_program(traced, taps)
    reach, co = run(flat_masks)
    reach = {v: np.asarray(a) > 0 for v, a in zip(order, reach)}
    co = {v: np.asarray(a) > 0 for v, a in zip(order, co)}
  else:
    reach, co = {}, {}
  # values at the input 0 (what a constant unit is), at every read
  read_ids = tuple(sorted({r.value for r, _ in reads}))
  ex = traced.input
  x0 = [jnp.zeros(ex.shape, ex.dtype)]
  p_flat = _flat_params(traced, masked)
  e_flat = _flat_extra(traced, extra)
  values = {}
  if read_ids:
    values = {
      k: np.asarray(v) for k, v in _values_program(traced, read_ids)(p_flat, e_flat, x0).items()
    }
  keep = {d: np.zeros(g.size, bool) for d, g in by_dim.items()}
  fold_at = []  # (read, dim, candidate units bool)
  for r, ds in reads:
    units = _axis_units(dims.axes[r.value][r.axis])
    for d in ds:
      size = by_dim[d].size
      cr = _per_unit(co[r.value], r.axis, units[d], size, "any")
      rc = _per_unit(reach[r.value], r.axis, units[d], size, "any")
      zero = _per_unit(values[r.value] == 0, r.axis, units[d], size, "all")
      live = cr & rc
      const = cr & ~rc & ~(zero & (r.how in _SUMMING))
      keep[d] |= live
      if const.any():
        if fold and r.how == "linear":
          fold_at.append((r, d, const))
        else:
          keep[d] |= const
  # folds: every constant unit of a read goes into the bias of the op's output at once
  shifts = {}
  folded = {d: np.zeros(g.size, bool) for d, g in by_dim.items()}
  for _ in range(len(fold_at) + 1):
    cand = {}
    for r, d, const in fold_at:
      cand.setdefault(r.eqn, []).append((r, d, const & ~keep[d]))
    shifts, folded, changed = {}, {d: np.zeros(g.size, bool) for d, g in by_dim.items()}, False
    for k, entries in cand.items():
      if not any(c.any() for _, _, c in entries):
        continue
      shift = _shift(traced, dims, k, entries, values, p_flat)
      if shift is None:
        for _, d, c in entries:
          keep[d] |= c
        changed = True
        continue
      path, delta = shift
      shifts[path] = shifts.get(path, 0) + delta
      for _, d, c in entries:
        folded[d] |= c
    if not changed:
      break
  out = Plan({}, {}, {}, {}, {})
  for d, g in by_dim.items():
    k, f = keep[d], folded[d] & ~keep[d]
    if not k.any():  # never empty: keep a dropped unit (it changes nothing)...
      if f.all():  # ...or, with none dropped, fold nothing
        k, f = f, np.zeros_like(f)
        shifts = _unfold(traced, dims, fold_at, d, values, p_flat, keep, shifts)
      else:
        k = k.copy()
        k[np.flatnonzero(~f)[0]] = True
    padded = np.zeros_like(k)
    if multiple and k.sum() < g.size:
      want = min(math.ceil(k.sum() / multiple) * multiple, g.size - int(f.sum()))
      spare = np.flatnonzero(~k & ~f)[: max(0, want - int(k.sum()))]
      padded[spare] = True
      k = k | padded
    out.kept[g.name] = np.flatnonzero(k)
    out.folded[g.name] = np.flatnonzero(f)
    out.dropped[g.name] = np.flatnonzero(~k & ~f)
    out.sizes[g.name] = g.size
    if padded.any():
      out.padded[g.name] = np.flatnonzero(padded)
  out.shifts.update({p: np.asarray(v) for p, v in shifts.items()})
  out.blocked.update({g.name: g.reason for g in structure.groups if not g.removable})
  return out


def _shift(traced, dims, k, entries, values, p_flat):
  """(bias path, shift) folding the constant units of ``entries`` read by the linear op
  ``k`` into its bias, or None where it has none or the shift depends on the position."""
  prog = traced.program
  found = _bias_of(prog, dims, k)
  if found is None:
    return None
  leaf, b = found
  e = prog.eqns[k]
  r0 = entries[0][0]
  v = values[r0.value]
  only = np.zeros(v.shape, bool)
  for r, d, c in entries:
    units = _axis_units(dims.axes[r.value][r.axis])[d]
    sel = np.zeros(len(units), bool)
    inside = units >= 0
    sel[inside] = c[units[inside]]
    shape = [1] * v.ndim
    shape[r.axis] = len(units)
    only |= sel.reshape(shape)
  x = np.where(only, v, 0).astype(v.dtype)
  args = []
  for j, i in enumerate(e.ins):
    if j == r0.operand:
      args.append(jnp.asarray(x))
    elif i in prog.consts:
      args.append(prog.consts[i])
    else:
      args.append(_value_of(traced, i, p_flat))
  delta = np.asarray(conn_lib.program.bind(e, *args)[0], np.float64)
  bshape = _shape_of(prog, b)
  uniform = tuple(a for a, s in enumerate(bshape) if s == 1)
  ref = delta
  for a in uniform:
    ref = np.take(ref, [0], axis=a)
  scale = float(np.max(np.abs(delta))) if delta.size else 0.0
  if not np.all(np.abs(delta - ref) <= 1e-6 * scale + 1e-30):
    return None
  path = prog.param_paths[leaf]
  return path, ref.reshape(prog.param_shapes[leaf]).astype(np.float32)


def _shape_of(prog, v) -> tuple:
  if v in prog.param_ids:
    return tuple(prog.param_shapes[prog.param_ids.index(v)])
  for e in prog.eqns:
    if v in e.outs:
      return tuple(e.out_avals[e.outs.index(v)].shape)
  return tuple(np.shape(prog.consts[v]))


@functools.lru_cache(maxsize=32)
def _param_value_program(traced, i: int):
  prog = traced.program
  return jax.jit(lambda p: rewrite.evaluate(prog, p, [], [], ids=(i,))[i])


def _value_of(traced, i, p_flat):
  """A parameter-only value of the program (a weight after casts, reshapes)."""
  prog = traced.program
  if i in prog.param_ids:
    return p_flat[prog.param_ids.index(i)]
  return _param_value_program(traced, i)(p_flat)


def _unfold(traced, dims, fold_at, d, values, p_flat, keep, shifts):
  """The shifts without the folds of dim ``d`` (its units are kept after all)."""
  out = {}
  cand = {}
  for r, dd, const in fold_at:
    c = const & ~keep[dd] if dd != d else np.zeros_like(const)
    cand.setdefault(r.eqn, []).append((r, dd, c))
  for k, entries in cand.items():
    if not any(c.any() for _, _, c in entries):
      continue
    shift = _shift(traced, dims, k, entries, values, p_flat)
    if shift is not None:
      out[shift[0]] = out.get(shift[0], 0) + shift[1]
  return out


# ------------------------------------------------------------------------ compact


@dataclasses.dataclass(frozen=True, eq=False)
class Compacted:
  """A compacted model (the module docstring).

  params: the compacted parameters (the original tree, smaller leaves, masked weights
  zero, folded shifts in the biases); extra: the other collections, sliced (batch
  statistics); masks: the original masks sliced (a kept unmasked weight stays
  unmasked, active or not); plan: what was removed (:class:`Plan`); module: the rebuilt
  Flax module where the model's widths are fields (the zoo's ``resized``), else None;
  traced: the original model's :class:`sparsejax.Traced`.

  ``apply(params, x)`` computes the masked model's outputs on a batch ``x`` (any batch
  size); a Compacted is itself a function ``(params, x) -> outputs`` (trace it,
  prune it, measure it like any model). Unpacking gives ``(module or self, variables,
  masks)``, the zoo's former return value.
  """

  params: Any
  extra: Any
  masks: Any
  plan: Plan
  module: Any
  traced: Any
  _sliced: Any
  _outputs: Any

  @property
  def variables(self):
    """The compacted variables ({'params': ..., **extra} for a Flax module, else the
    params)."""
    if isinstance(self.traced.model, nn.Module):
      return {"params": self.params, **self.extra}
    return self.params

  def apply(self, params, x, extra=None):
    """Outputs of the compacted program on ``x`` [B, ...] (``extra``: the sliced other
    collections, default this one's); jitted (and traceable inside a user's jit, grad
    or ``jax.export``)."""
    extra = self.extra if extra is None else extra
    return _apply_jit(self)(params, x, extra)

  def __call__(self, params, x):
    return self.apply(params, x)

  def __iter__(self):
    yield self.module if self.module is not None else self
    yield self.variables
    yield self.masks

  def __getitem__(self, i):
    return tuple(self)[i]


@functools.lru_cache(maxsize=64)
def _apply_jit(c: Compacted):
  """The jitted ``(params, x, extra) -> outputs`` of a compacted program."""
  run = c._sliced.run
  traced = c.traced
  batched = [c._sliced.new_shape[o][:1] == (1,) for o in traced.program.out_ids]

  def apply(params, x, extra):
    p = _flat_params_tree(traced, params)
    e = jax.tree.leaves(extra) if traced.extra_spec[1] else []
    outs = jax.vmap(lambda xi: run(p, e, [xi[None]]))(jnp.asarray(x))
    outs = [o[:, 0] if b else o for o, b in zip(outs, batched)]
    return jax.tree.unflatten(c._outputs, outs)

  return jax.jit(apply)


def _flat_params_tree(traced, params) -> list:
  return list(traced.params_spec[0].flatten_up_to(params))


def _sliced_leaves(flat, ids, keep):
  return [
    None if a is None else (rewrite.slice_value(a, keep[i]) if i in keep else a)
    for a, i in zip(flat, ids)
  ]


def compact(
  model,
  variables,
  masks,
  input_shape=None,
  *,
  fold: bool = True,
  verify: bool = False,
  key: jax.Array | None = None,
  multiple: int | None = None,
  apply_kwargs=None,
) -> Compacted:
  """The masked model with its dead and pruned units removed.

  Args:
    model: any model :func:`sparsejax.trace` traces (a Flax module, a function
      ``apply(params, x)``, an NNX module) or its :class:`sparsejax.Traced`.
    variables: its variables ({'params': ..., 'batch_stats': ...}), or a function's
      params.
    masks: bool masks shaped like params (None elsewhere); masked weights are zeroed.
      A mask tree that does not match the params: ValueError naming the leaf.
    input_shape: one example's shape without the batch axis, or an example input
      (default for a zoo network: its dataset's input, e.g. (32, 32, 3) for VGG).
    fold: fold nonzero constant units into the readers' biases where exact (inference
      equality; not training-equivalent, see the module docstring).
    verify: check that the outputs agree (a batch of 8 inputs from ``key``: standard
      normal, or token ids) and raise :class:`CompactionMismatchError` otherwise.
    multiple: round every compacted width up to a multiple of this (dropped units
      kept back; the function is unchanged).
    apply_kwargs: keyword arguments of the model's call (e.g. {'train': False}).

  Returns:
    A :class:`Compacted` (``apply``, ``params``, ``masks``, ``plan``, ``module``);
    unpacked, ``(module or the Compacted, variables, masks)``.
  """
  traced = _model_input(model, variables, input_shape, apply_kwargs)
  _check_variables(traced, variables)
  tracing.params_of(traced, variables)
  if multiple is not None and (not isinstance(multiple, int) or multiple < 1):
    raise ValueError(f"multiple={multiple!r} must be a positive int (e.g. 8 or 16) or None.")
  masked_traced = traced.masked(masks)
  _check_tree(traced, variables)
  p = _plan(masked_traced, variables, masks, fold, multiple)
  result = _apply_plan(masked_traced, variables, masks, p)
  if verify:
    check_equal(traced, variables, masks, result, result.variables, None, key=key)
  return result


def _check_tree(traced, variables):
  params, extra = _split(traced, variables)
  if tracing._spec(params) != traced.params_spec:
    raise ValueError(
      "variables do not match the parameters the model was traced with; pass that "
      "model's variables."
    )


def _apply_plan(traced, variables, masks, p: Plan) -> Compacted:
  structure = groups.of_traced(traced)
  prog, dims = traced.program, structure.dims
  params, extra = _split(traced, variables)
  masked = masks_lib.apply(params, masks)
  p_flat = _flat_params(traced, masked)
  e_flat = _flat_extra(traced, extra)
  m_flat = list(traced.params_spec[0].flatten_up_to(masks))
  for path, delta in p.shifts.items():  # folded constants -> the readers' biases
    i = prog.param_paths.index(path)
    p_flat[i] = jnp.asarray(p_flat[i]) + jnp.asarray(delta, jnp.asarray(p_flat[i]).dtype)
  alive = {}
  for g in structure.removable():
    kept = np.zeros(g.size, bool)
    kept[p.kept[g.name]] = True
    if not kept.all():
      alive[g.dim] = kept
  shape = {}
  for v, trees in dims.axes.items():
    shape[v] = tuple(t.size for t in trees)
  keep = {}
  for v, trees in dims.axes.items():
    per_axis, any_cut = [], False
    for t in trees:
      pairs = [(d, u) for d, u in t.units() if d in alive]
      if not pairs:
        per_axis.append(None)
        continue
      ok = np.ones(t.size, bool)
      for d, u in pairs:
        inside = u >= 0
        ok[inside] &= alive[d][u[inside]]
      per_axis.append(np.flatnonzero(ok))
      any_cut = True
    if any_cut:
      keep[v] = per_axis
  sliced = rewrite.Sliced(prog, keep, shape)
  new_p = _sliced_leaves(p_flat, prog.param_ids, keep)
  new_e = _sliced_leaves(e_flat, prog.extra_ids, keep)
  new_m = _sliced_leaves(m_flat, prog.param_ids, keep)
  treedef = traced.params_spec[0]
  new_params = jax.tree.unflatten(treedef, new_p)
  new_masks = jax.tree.unflatten(treedef, new_m)
  new_extra = (
    jax.tree.unflatten(traced.extra_spec[0], new_e) if traced.extra_spec[1] else dict(extra)
  )
  outputs = _output_tree(traced, len(prog.out_ids))
  module = _rebuilt(traced, new_params, new_extra)
  return Compacted(new_params, new_extra, new_masks, p, module, traced, sliced, outputs)


def _output_tree(traced, n: int):
  """The treedef of the model's output (its leaves: the program's outputs)."""
  x = traced.input
  params = traced.params
  kwargs = tracing._thawed(traced.apply_kwargs)
  if isinstance(traced.model, nn.Module):
    out = jax.eval_shape(
      lambda p, e, x: traced.model.apply({"params": p, **e}, x, **kwargs),
      params,
      traced.extra,
      x,
    )
  else:
    out = jax.eval_shape(lambda p, x: traced.model(p, x, **kwargs), params, x)
  leaves, treedef = jax.tree.flatten(out)
  if len(leaves) != n:
    raise ValueError(
      f"model={tracing._name(traced.model)} returns {len(leaves)} arrays of which "
      f"{len(leaves) - n} do not depend on its input; compaction needs every output to "
      "depend on the input."
    )
  return treedef


def _rebuilt(traced, params, extra):
  """The Flax module with the widths of ``params`` (a model's ``resized``), checked to
  have exactly their shapes; None for other models."""
  model = traced.model
  if not isinstance(model, nn.Module) or not hasattr(model, "resized"):
    return None
  try:
    new = model.resized(params)
    x = traced.input
    got = jax.eval_shape(
      functools.partial(new.init, **tracing._thawed(traced.apply_kwargs)), jax.random.key(0), x
    )
  except (TypeError, ValueError):
    return None
  want = {"params": params, **extra}
  if tracing._spec(got) != tracing._spec(want):
    return None
  return new


# ------------------------------------------------------------------------ checks


def _run(model, variables, x, apply_kwargs):
  if isinstance(model, Compacted):
    params, extra = _split(model.traced, variables)
    return model.apply(params, x, extra)
  if isinstance(model, tracing.Traced):
    apply_kwargs = dict(tracing._thawed(model.apply_kwargs), **(apply_kwargs or {}))
    model = model.model
  kw = apply_kwargs or {}
  # jitted: one compilation instead of one per operation run eagerly
  fn = model.apply if isinstance(model, nn.Module) else model
  return jax.jit(functools.partial(fn, **kw))(variables, x)


def _example_batch(model, input_shape, key, batch: int):
  """Standard normal inputs (token ids for an integer input) of ``batch`` examples, from
  ``key`` (default: NumPy's generator with seed 0, nothing to compile)."""
  traced = model if isinstance(model, tracing.Traced) else None
  if traced is not None:
    ex = traced.input
  else:
    ex = tracing.example_input(input_shape)
  shape = (batch,) + tuple(ex.shape[1:])
  integer = jnp.issubdtype(ex.dtype, jnp.integer)
  vocab = (_vocabulary(traced) if traced is not None else 2) if integer else 0
  if key is None:
    rng = np.random.default_rng(0)
    if integer:
      return jnp.asarray(rng.integers(0, vocab, shape), ex.dtype)
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)
  if integer:
    return jax.random.randint(key, shape, 0, vocab, ex.dtype)
  return jax.random.normal(key, shape, jnp.float32)


def _vocabulary(traced) -> int:
  """The smallest table a lookup of the model reads (token ids below it are valid)."""
  prog = traced.program
  shape_of = dict(zip(prog.param_ids, prog.param_shapes))
  for e in prog.eqns:
    for o, a in zip(e.outs, e.out_avals):
      shape_of[o] = tuple(a.shape)
  tables = []
  for k, _ in prog.sites:
    e = prog.eqns[k]
    if e.lookup:
      t = e.ins[0]
      shape = tuple(np.shape(prog.consts[t])) if t in prog.consts else shape_of.get(t)
      if shape:
        dn = e.params["dimension_numbers"]
        tables.append(min(shape[a] for a in dn.start_index_map))
  return min(tables) if tables else 2


def logits_gap(
  model,
  variables,
  masks,
  new_model,
  new_variables,
  input_shape=None,
  *,
  key: jax.Array | None = None,
  batch: int = 8,
  x=None,
  apply_kwargs=None,
) -> tuple[float, float]:
  """(max |output difference|, max |output|) between the masked original and its
  compaction (a :class:`Compacted`, or a rebuilt module and its variables), on ``x`` or
  a batch from ``key`` (standard normal inputs, or token ids)."""
  if x is None:
    if input_shape is None and not isinstance(model, tracing.Traced):
      input_shape = groups.default_input(model, variables)
    x = _example_batch(model, input_shape, key, batch)
  params, extra = (
    _split(model, variables)
    if isinstance(model, tracing.Traced)
    else (
      (variables["params"], {k: v for k, v in variables.items() if k != "params"})
      if isinstance(model, nn.Module)
      else (variables, {})
    )
  )
  masked_params = masks_lib.apply(params, masks)
  module = model.model if isinstance(model, tracing.Traced) else model
  masked = {**extra, "params": masked_params} if isinstance(module, nn.Module) else masked_params
  ref = jax.tree.leaves(_run(model, masked, x, apply_kwargs))
  out = jax.tree.leaves(_run(new_model, new_variables, x, apply_kwargs))
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ref, out))
  scale = max(float(jnp.max(jnp.abs(a))) for a in ref)
  return diff, scale


def check_equal(
  model,
  variables,
  masks,
  new_model,
  new_variables,
  input_shape=None,
  *,
  key: jax.Array | None = None,
  x=None,
  apply_kwargs=None,
) -> float:
  """Raises :class:`CompactionMismatchError` unless max |output difference| <= RTOL x
  max |output|; returns the relative difference."""
  diff, scale = logits_gap(
    model,
    variables,
    masks,
    new_model,
    new_variables,
    input_shape,
    key=key,
    x=x,
    apply_kwargs=apply_kwargs,
  )
  rel = diff / scale if scale > 0 else diff
  if not rel <= RTOL:
    name = type(new_model).__name__
    raise CompactionMismatchError(
      f"the compacted {name} differs from the masked original: max "
      f"|output difference| {diff:.3g} at output scale {scale:.3g} (allowed: {RTOL:g} x "
      "scale).",
      max_diff=diff,
      scale=scale,
    )
  return rel


# ------------------------------------------------------------------------ compatibility


def channel_spaces(model, input_shape=None, variables=None) -> tuple[list, None]:
  """(the removable dependency groups of ``model``, None): what the zoo's hand-written
  channel spaces were (names, sizes), from :func:`sparsejax.structure`. Kept for one
  version; use ``sparsejax.structure(model, input_shape).removable()``."""
  if input_shape is None and not isinstance(model, tracing.Traced):
    input_shape = groups.default_input(model, variables)
  return groups.structure(model, input_shape, variables=variables).removable(), None


def default_input(model) -> tuple[int, ...]:
  """One example's shape a zoo network is traced on when no input is given (its
  dataset's); ValueError for other models."""
  shape = groups.default_input(model)
  if shape is None:
    raise ValueError(
      f"model={tracing._name(model)} is no registered zoo network; pass input_shape=."
    )
  return shape


__all__ = [
  "compact",
  "plan",
  "Plan",
  "Compacted",
  "channel_spaces",
  "check_equal",
  "default_input",
  "logits_gap",
  "CompactionMismatchError",
  "RTOL",
]
