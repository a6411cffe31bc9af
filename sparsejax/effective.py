"""Exact effective masks by one binary connectivity sweep (method.md section 1).

A weight is *active* when it is unmasked and lies on a directed input-to-output
path of the unit-level graph (convolutions unrolled over positions, every pooling
position connected). With reach(u) = "u is reachable from the input" and
coreach(u) = "u reaches an output":

    reach(v)   = OR_{u -> v unmasked} reach(u)        (inputs are reachable)
    coreach(u) = OR_{u -> v unmasked} coreach(v)      (outputs are co-reachable)
    active(w: u -> v) = mask(w) AND reach(u) AND coreach(v)

Both ORs are one forward and one backward pass of the model's traced program under
reachability semantics (:mod:`sparsejax.connectivity`): weights = mask, every other
parameter a pattern of ones, every sum gated back to {0, 1} forward and backward.
The kernel gradient of that pass is sum_positions reach(u) * coreach(v), positive
exactly for active (or potentially active) weights. Values stay binary, so the
result is exact in float32 for any depth. A unit is active when reach AND coreach.

Models: a Flax module (zoo or user-written; ``variables`` optional, its
``apply(variables, x, **apply_kwargs)`` is traced) or any function
``apply(params, x)`` with ``params=``. Inputs: one example's shape without the batch
axis (batch 1 is added), or an example input array (used with its shape as given).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import compilation, models
from sparsejax import connectivity as conn_lib
from sparsejax import masks as masks_lib
from sparsejax.connectivity import Connectivity  # pylint: disable=unused-import

Masks = Any


def _is_none(x) -> bool:
  return x is None


def _spec(tree):
  """Hashable (treedef, ((shape, dtype), ...)) of a tree of arrays or shape structs."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(
    (tuple(int(d) for d in np.shape(l)), np.dtype(getattr(l, "dtype", np.float32)).name)
    for l in leaves
  )


def _unspec(spec):
  treedef, leaves = spec
  return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])


def example_input(input_shape) -> jax.ShapeDtypeStruct:
  """One example's shape without the batch axis -> [1, *shape] float32; an array (or
  shape struct) -> its own shape and dtype."""
  if hasattr(input_shape, "shape") and hasattr(input_shape, "dtype"):
    shape = tuple(int(d) for d in input_shape.shape)
    if not shape:
      raise ValueError(
        "input_shape is an example input of shape (); it must have at least one axis."
      )
    return jax.ShapeDtypeStruct(shape, input_shape.dtype)
  shape = models.check_input_shape(input_shape)
  return jax.ShapeDtypeStruct((1,) + shape, jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Traced:
  """A model's traced program and what the masks attach to.

  prunable: flat param leaf indices that carry masks, input-to-output order.
  paths: '/'-joined path per flat param leaf; shapes: their shapes.
  """

  program: conn_lib.Program
  prunable: tuple
  paths: tuple
  shapes: tuple
  params_spec: Any
  extra: Any  # shape structs of the other collections

  @property
  def prunable_paths(self) -> list[str]:
    return [self.paths[i] for i in self.prunable]


def _apply_fn(model, apply_kwargs):
  kwargs = dict(apply_kwargs or ())
  if isinstance(model, nn.Module):
    return lambda p, e, x: model.apply({"params": p, **e}, x, **kwargs)
  return lambda p, e, x: model(p, x, **kwargs)


@functools.lru_cache(maxsize=64)
def _trace_cached(model, x_spec, params_spec, extra_spec, apply_kwargs, prunable) -> Traced:
  params, extra = _unspec(params_spec), _unspec(extra_spec)
  prog = conn_lib.build(_apply_fn(model, apply_kwargs), params, extra, _unspec(x_spec))
  flat = jax.tree_util.tree_leaves_with_path(params)
  paths = tuple(masks_lib.path_str(p) for p, _ in flat)
  order = prog.weight_leaves
  if prunable is not None:  # a frozenset of paths (see trace)
    order = tuple(i for i in order if paths[i] in prunable)
  if not order:
    raise ValueError(
      f"model={_name(model)} has no prunable weight: no parameter enters a "
      "linear op (dot_general, conv_general_dilated) as its weight."
    )
  return Traced(
    prog, tuple(order), paths, tuple(tuple(s.shape) for _, s in flat), params_spec, extra
  )


def _name(model) -> str:
  return (
    type(model).__name__
    if isinstance(model, nn.Module)
    else getattr(model, "__name__", type(model).__name__)
  )


def _hashable(model, what="model"):
  try:
    hash(model)
  except TypeError as e:
    raise ValueError(
      f"{what}={_name(model)} has an unhashable field ({e}); it is compiled "
      "once per model, so its fields must be hashable (use tuples, not "
      "lists)."
    ) from None
  return model


@functools.lru_cache(maxsize=64)
def _init_shapes(model, x_spec, kwargs, shown: str):
  """Shape structs of ``model.init``'s variables (cached: tracing init costs ms)."""
  try:
    return jax.eval_shape(
      functools.partial(model.init, **dict(kwargs)),
      jax.random.key(0),
      jax.ShapeDtypeStruct(*x_spec[1][0]),
    )
  except (TypeError, ValueError) as err:
    raise ValueError(
      f"input_shape={shown} cannot be applied to model={_name(model)}: {err}"
    ) from None


def trace(
  model,
  input_shape,
  *,
  variables=None,
  params=None,
  apply_kwargs=None,
  prunable: masks_lib.Prunable = None,
) -> Traced:
  """Traces ``model`` once per (model, input shape, variable shapes).

  Args:
    model: a Flax module (called as ``model.apply(variables, x, **apply_kwargs)``) or a
      function ``apply(params, x, **apply_kwargs)``.
    input_shape: one example's shape without the batch axis, or an example input array.
    variables: a module's variables ({'params': ..., 'batch_stats': ...}); default:
      the shapes of ``model.init``.
    params: a function's params (required for functions).
    prunable: a predicate on the '/'-joined parameter path, which narrows the
      parameters that enter a linear op as its weight (default: all of them), or a
      collection of such paths (exactly those).
  """
  x = example_input(input_shape)
  kwargs = tuple(sorted((apply_kwargs or {}).items()))
  if isinstance(model, nn.Module):
    if params is not None and variables is None:
      variables = {"params": params}
    if variables is None:
      _hashable(model)
      variables = _init_shapes(model, _spec(x), kwargs, repr(input_shape))
    if not hasattr(variables, "keys") or "params" not in variables:
      raise ValueError(
        "variables has no 'params' collection; pass the model's variables (e.g. model.init(...))."
      )
    params = variables["params"]
    extra = {k: v for k, v in variables.items() if k != "params"}
  elif callable(model):
    if params is None:
      params = variables
    if params is None:
      raise ValueError(
        f"model={_name(model)} is a function: pass params= (its parameter "
        "tree) so that masks can be matched to it."
      )
    extra = {}
  else:
    raise ValueError(f"model={model!r} must be a Flax module or a function apply(params, x).")
  _hashable(model)
  key = (model, _spec(x), _spec(params), _spec(extra), kwargs)
  default = _trace_cached(*key, None)
  if prunable is None:
    return default
  masks_lib.selector(prunable)  # checks its type
  weights = set(default.prunable_paths)
  if callable(prunable):  # narrows the linear-op weights
    picked = frozenset(p for p in default.paths if prunable(p))
    chosen = picked & weights
    bad = sorted(picked) if not chosen else []
  else:  # exactly these paths
    chosen = frozenset(prunable)
    bad = sorted(chosen - weights)
  if bad:
    raise ValueError(
      f"prunable selects {bad[:3]} (given, or the masks' leaves), which enter "
      "no linear op (Dense, Conv, dot_general, conv_general_dilated) as a "
      "weight; only such weights can be pruned."
    )
  if chosen == weights:
    return default  # one program (and one compilation) for the default set
  return _trace_cached(*key, chosen)


def _flat_masks(masks, traced: Traced) -> list:
  flat = jax.tree.leaves(masks, is_leaf=_is_none)
  return [flat[i] for i in traced.prunable]


def sweep_of(traced: Traced, units: bool = True) -> Callable[[Masks], Connectivity]:
  """The pure, jit-able sweep ``masks -> Connectivity`` of a traced model."""
  raw = conn_lib.reach_sweep(traced.program, traced.prunable, units)
  total_inputs = int(sum(np.prod(s) for s in traced.program.x_shapes))

  def sweep(masks: Masks) -> Connectivity:
    flat, treedef = jax.tree.flatten(masks, is_leaf=_is_none)
    ks = [flat[i] for i in traced.prunable]
    pot, active, active_inputs, total = raw(ks)
    leaves = [None] * len(flat)
    for i, p in zip(traced.prunable, pot):
      leaves[i] = p
    potential = jax.tree.unflatten(treedef, leaves)
    effective = masks_lib.map_masks(lambda m, live: m & live, masks, potential)
    if not units:
      return Connectivity(effective, potential, {}, None, conn_lib._FrozenDict(), 0)
    return Connectivity(
      effective, potential, active, active_inputs, conn_lib._FrozenDict(total), total_inputs
    )

  return sweep


def connectivity_sweep(
  model, input_shape, units: bool = True, **kw
) -> Callable[[Masks], Connectivity]:
  """The pure, jit-able sweep ``masks -> Connectivity`` for ``model`` on one example
  of ``input_shape`` (keywords as :func:`trace`). For use inside other jitted code (no
  mask validation). ``units=False`` skips the unit counts (active_units and
  active_inputs are then empty / None), which is what searches that only need the
  masks want."""
  return sweep_of(trace(model, input_shape, **kw), units)


@functools.lru_cache(maxsize=64)
def compiled_sweep(traced: Traced) -> Callable[[Masks], Connectivity]:
  """The jitted sweep (masks and unit counts) of a traced model: the one connectivity
  program per (model, input shape, mask structure), shared by :func:`connectivity`,
  :func:`effective_masks`, :func:`active_units` and the effective-target search."""
  return compilation.jit(sweep_of(traced))


def validate(masks: Masks, traced: Traced, name: str = "masks") -> None:
  """ValueError unless ``masks`` has the params' structure with a bool array of the
  kernel's shape at every prunable leaf and None elsewhere."""
  masks_lib.validate(
    masks,
    _unspec(traced.params_spec),
    name,
    prunable=set(traced.prunable_paths),
    hint=" (a linear-op weight; pass prunable= to leave it out)",
  )
  if jax.tree.structure(masks, is_leaf=_is_none) != jax.tree.structure(
    jax.tree.unflatten(traced.params_spec[0], [None] * len(traced.paths)), is_leaf=_is_none
  ):
    raise ValueError(
      f"{name} does not match the parameter tree's structure (containers "
      "differ); a mask has the structure of params."
    )


def connectivity(model, masks: Masks, input_shape, **kw) -> Connectivity:
  """Effective masks and active units of ``model`` under ``masks``.

  Args:
    model: a Flax module (zoo or user-written) or a function ``apply(params, x)``.
    masks: bool masks shaped like the model's params (None at non-prunable leaves).
    input_shape: one example's shape without the batch axis, e.g. (32, 32, 3), or an
      example input array.
    **kw: ``variables=``, ``params=``, ``apply_kwargs=``, ``prunable=`` (see :func:`trace`).
      Every prunable leaf must carry a mask: a linear-op weight left None is an error
      (a forgotten layer would silently count as dense); pass the ``prunable=`` the
      masks were made with to leave layers out.
  """
  traced = trace(model, input_shape, **kw)
  validate(masks, traced)
  result = compiled_sweep(traced)(masks)
  # jit returns dicts with sorted keys; total_units (static) keeps the traced order
  return result.replace(
    active_units={k: int(result.active_units[k]) for k in result.total_units},
    active_inputs=int(result.active_inputs),
  )


@functools.lru_cache(maxsize=64)
def _jitted_channels(traced: Traced):
  return jax.jit(conn_lib.channel_sweep(traced.program, traced.prunable))


def channel_reach(model, masks: Masks, input_shape, **kw) -> dict[str, tuple]:
  """{layer path: (reach, coreach)} per linear op, input-to-output order: bool numpy
  vectors over the op's output channels (last axis), reach[c] = an unmasked path from
  the input reaches channel c at some position, coreach[c] = an unmasked path leads from
  channel c at some position to an output. Keywords as :func:`connectivity`."""
  traced = trace(model, input_shape, **kw)
  validate(masks, traced)
  maps = _jitted_channels(traced)(_flat_masks(masks, traced))
  names = conn_lib.site_names(traced.program)
  return {n: (np.asarray(maps[n][0]), np.asarray(maps[n][1])) for n in names}


def effective_masks(model, masks: Masks, input_shape, **kw) -> Masks:
  """The active weights: unmasked and on some input-to-output path (bool, like masks).

  active(w: u -> v) = mask(w) AND reach(u) AND coreach(v) (method.md section 1).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sparsejax import effective, masks, models
    >>> model = models.create("lenet300100")
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))["params"]
    >>> m = masks.ones(params)
    >>> m["dense_1"]["kernel"] = jnp.zeros_like(m["dense_1"]["kernel"])  # cut layer 2
    >>> eff = effective.effective_masks(model, m, (28, 28, 1))
    >>> int(eff["dense_0"]["kernel"].sum()), int(eff["dense_2"]["kernel"].sum())
    (0, 0)
  """
  return connectivity(model, masks, input_shape, **kw).masks


def effective_sparsity(model, masks: Masks, input_shape, **kw) -> float:
  """1 - active weights / prunable weights (1.0 for a disconnected network)."""
  return masks_lib.direct_sparsity(effective_masks(model, masks, input_shape, **kw))


def effective_compression(model, masks: Masks, input_shape, **kw) -> float:
  """1 / effective density; inf for a disconnected network."""
  return masks_lib.compression(effective_masks(model, masks, input_shape, **kw))


def active_units(model, masks: Masks, input_shape, **kw) -> dict[str, tuple[int, int]]:
  """{layer path: (active, total)} output units per linear op, input-to-output order."""
  c = connectivity(model, masks, input_shape, **kw)
  return {k: (c.active_units[k], c.total_units[k]) for k in c.active_units}


def prunable_paths(model, input_shape, **kw) -> list[str]:
  """Paths of the prunable leaves in input-to-output (traced data-flow) order."""
  return trace(model, input_shape, **kw).prunable_paths


def ones(model, input_shape, **kw) -> Masks:
  """The dense mask of ``model``: True at every prunable leaf, None elsewhere."""
  t = trace(model, input_shape, **kw)
  leaves = [None] * len(t.paths)
  for i in t.prunable:
    leaves[i] = jnp.ones(t.shapes[i], bool)
  return jax.tree.unflatten(t.params_spec[0], leaves)


def flow_order(model, input_shape, **kw) -> tuple[int, ...]:
  """The prunable layers in input-to-output (traced data-flow) order, as indices into
  the params' tree (flattened, sorted-key) order of the prunable leaves: entry j is the
  tree position of the j-th layer the input flows through."""
  t = trace(model, input_shape, **kw)
  tree_order = sorted(t.prunable)
  return tuple(tree_order.index(i) for i in t.prunable)
