"""One analysis of a model: its traced program and prunable set, built once.

``trace(model, input_shape, variables=...)`` traces ``model`` (a Flax module or a function
``apply(params, x)``) on one example to the program of :mod:`sparsejax.connectivity` and
returns a :class:`Traced`: the program, the parameters it uses as the weight of a linear
op (its *prunable set*, in input-to-output order), the parameter and input shapes. It is
cached by (model, input shape, variable shapes, apply kwargs), so a second call returns
the same object.

Every function of the library that reads a model accepts a :class:`Traced` in place of
the model (``effective_masks(traced, masks)``, ``prune(..., model=traced)``,
``flops.costs(traced, masks)``, ``compact.compact(traced, variables, masks)``,
``scores.synflow(traced, variables, ...)``): a pipeline traces once and passes the
object along, and the input shape, apply kwargs and prunable set come with it.

The prunable rule: with a model, the prunable weights are the parameters the traced
program uses as a linear op's weight operand (Dense, Conv, ``jnp.einsum``, ``x @ w``),
whatever they are called, optionally narrowed (``prunable=``); without one, a mask tree
is the prunable set (its bool leaves). :meth:`Traced.ones` is the dense mask.
"""

from __future__ import annotations

import collections
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
from sparsejax import models

Masks = Any


def _spec(tree):
  """Hashable (treedef, ((shape, dtype), ...)) of a tree of arrays or shape structs."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(
    (tuple(int(d) for d in np.shape(l)), np.dtype(getattr(l, "dtype", np.float32)).name)
    for l in leaves
  )


def unspec(spec):
  """The shape structs of a :func:`_spec`."""
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


def _name(model) -> str:
  return (
    type(model).__name__
    if isinstance(model, nn.Module)
    else getattr(model, "__name__", type(model).__name__)
  )


#: Traced.masked's results by (model, argument name, mask structure), least recent first.
_MASKED: collections.OrderedDict = collections.OrderedDict()


def _mask_structure(masks) -> tuple | None:
  """What :meth:`Traced.masked` checks of ``masks``: the tree and each leaf's shape and
  dtype (None leaves kept); None when a leaf is not an array (then it is checked)."""
  leaves, treedef = jax.tree.flatten(masks, is_leaf=lambda x: x is None)
  out = []
  for x in leaves:
    if x is None:
      out.append(None)
    elif isinstance(x, (jax.Array, np.ndarray)):
      out.append((x.shape, x.dtype))
    else:
      return None
  return treedef, tuple(out)


@dataclasses.dataclass(frozen=True, eq=False)
class Traced:
  """A model's traced program and what masks attach to (hashable by identity: one
  object per model, shapes and prunable set, from :func:`trace`).

  model: the Flax module or function; apply_kwargs: its call's keyword arguments
  (sorted items); input: the example input's shape struct [B, ...].
  program: the :class:`sparsejax.connectivity.Program`.
  prunable: flat param leaf indices that carry masks, input-to-output order.
  weights: every linear-op weight's leaf index (the prunable set before narrowing).
  paths: '/'-joined path per flat param leaf; shapes: their shapes.
  params_spec, extra_spec: hashable shape specs of the params and other collections.
  """

  model: Any
  apply_kwargs: tuple
  input: jax.ShapeDtypeStruct
  program: conn_lib.Program
  prunable: tuple
  weights: tuple
  paths: tuple
  shapes: tuple
  params_spec: Any
  extra_spec: Any

  @property
  def prunable_paths(self) -> list[str]:
    """The prunable leaves' paths in input-to-output (traced data-flow) order."""
    return [self.paths[i] for i in self.prunable]

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One example's shape (the input without its batch axis)."""
    return tuple(self.input.shape[1:])

  @property
  def params(self):
    """The params' shape structs."""
    return unspec(self.params_spec)

  @property
  def extra(self):
    """The other collections' shape structs (e.g. batch statistics)."""
    return unspec(self.extra_spec)

  @property
  def flow(self) -> tuple[int, ...]:
    """The prunable layers in input-to-output order, as indices into the params' tree
    (flattened, sorted-key) order of the prunable leaves: entry j is the tree position
    of the j-th layer the input flows through."""
    tree_order = sorted(self.prunable)
    return tuple(tree_order.index(i) for i in self.prunable)

  def narrow(self, prunable: masks_lib.Prunable) -> Traced:
    """This model with the prunable set narrowed: a predicate on the '/'-joined path
    (among the linear-op weights) or a collection of paths (exactly those, each a
    linear-op weight); None keeps this one."""
    if prunable is None:
      return self
    weights = {self.paths[i] for i in self.weights}
    if callable(prunable):
      picked = frozenset(p for p in self.paths if prunable(p))
      chosen = picked & weights
      bad = sorted(picked) if not chosen else []
    else:
      chosen = masks_lib.check_paths(prunable)
      bad = sorted(chosen - weights)
    if bad:
      raise ValueError(
        f"prunable selects {bad[:3]} (given, or the masks' leaves), which enter no "
        "linear op (Dense, Conv, dot_general, conv_general_dilated) as a weight; only such "
        "weights can be pruned."
      )
    return _traced(*self._key, frozenset(chosen))

  @property
  def _key(self) -> tuple:
    return (self.model, _spec(self.input), self.params_spec, self.extra_spec, self.apply_kwargs)

  def masked(self, masks: Masks, name: str = "masks") -> Traced:
    """This model narrowed to the prunable set of ``masks`` (its bool leaves), after
    checking the tree against the params (:func:`sparsejax.masks.validate`). The check
    reads the masks' structure only (tree, shapes, dtypes), so a structure checked once
    is not checked again (a sweep on a small model costs less than the check)."""
    signature = _mask_structure(masks)
    key = (self, name, signature)
    if signature is not None and key in _MASKED:
      _MASKED.move_to_end(key)
      return _MASKED[key]
    narrowed = self._masked(masks, name)
    if signature is not None:
      _MASKED[key] = narrowed
      if len(_MASKED) > 256:
        _MASKED.popitem(last=False)
    return narrowed

  def _masked(self, masks: Masks, name: str) -> Traced:
    params = self.params
    masks_lib.validate(masks, params, name)
    none_tree = lambda t: jax.tree.map(lambda _: None, t, is_leaf=lambda x: x is None)
    if jax.tree.structure(none_tree(masks), is_leaf=lambda x: x is None) != jax.tree.structure(
      none_tree(params), is_leaf=lambda x: x is None
    ):
      raise ValueError(
        f"{name} does not match the parameter tree's structure (containers differ); a "
        "mask has the structure of params."
      )
    chosen = frozenset(masks_lib.paths(masks))
    if not chosen:
      raise ValueError(f"{name} has no mask leaf (bool array): nothing is prunable.")
    return self.narrow(chosen)

  def at(self, example) -> Traced:
    """This model traced on another example input (e.g. a calibration batch [B, ...]
    instead of the one example [1, ...]): the same model, parameter shapes, apply
    kwargs and prunable set; cached like :func:`trace`. ``example``: an array or
    shape struct with its batch axis."""
    if not (hasattr(example, "shape") and hasattr(example, "dtype")):
      raise ValueError(
        f"example={type(example).__name__}: Traced.at takes an input array or "
        "jax.ShapeDtypeStruct with its batch axis (e.g. a calibration batch)."
      )
    x = example_input(example)
    if _spec(x) == _spec(self.input):
      return self
    traced = _traced(
      self.model, _spec(x), self.params_spec, self.extra_spec, self.apply_kwargs, None
    )
    return traced.narrow(self.prunable_paths)

  def ones(self) -> Masks:
    """The dense mask: True at every prunable leaf, None elsewhere."""
    leaves = [None] * len(self.paths)
    for i in self.prunable:
      leaves[i] = jnp.ones(self.shapes[i], bool)
    return jax.tree.unflatten(self.params_spec[0], leaves)


@functools.lru_cache(maxsize=128)
def _traced(model, x_spec, params_spec, extra_spec, apply_kwargs, chosen) -> Traced:
  if chosen is not None:
    default = _traced(model, x_spec, params_spec, extra_spec, apply_kwargs, None)
    if chosen == frozenset(default.paths[i] for i in default.weights):
      return default  # one program (and one compilation) for the default set
    order = tuple(i for i in default.weights if default.paths[i] in chosen)
    return dataclasses.replace(default, prunable=order)
  kwargs = _thawed(apply_kwargs)
  if isinstance(model, nn.Module):
    fn = lambda p, e, x: model.apply({"params": p, **e}, x, **kwargs)
  else:
    fn = lambda p, e, x: model(p, x, **kwargs)
  params, extra, x = unspec(params_spec), unspec(extra_spec), unspec(x_spec)
  prog = conn_lib.build(fn, params, extra, x)
  flat = jax.tree_util.tree_leaves_with_path(params)
  if not prog.weight_leaves:
    raise ValueError(
      f"model={_name(model)} has no prunable weight: no parameter enters a linear op "
      "(dot_general, conv_general_dilated) as its weight."
    )
  return Traced(
    model=model,
    apply_kwargs=apply_kwargs,
    input=x,
    program=prog,
    prunable=tuple(prog.weight_leaves),
    weights=tuple(prog.weight_leaves),
    paths=tuple(masks_lib.path_str(p) for p, _ in flat),
    shapes=tuple(tuple(s.shape) for _, s in flat),
    params_spec=params_spec,
    extra_spec=extra_spec,
  )


class _Frozen:
  """An array keyword argument of a model's call (a PRNG key, a mask) as part of the
  trace's cache key: equal when shape, dtype and values are."""

  def __init__(self, value):
    self.value = value
    data = jax.random.key_data(value) if _is_key(value) else value
    self._key = (str(getattr(value, "dtype", "")), np.shape(value), np.asarray(data).tobytes())

  def __eq__(self, other):
    return isinstance(other, _Frozen) and self._key == other._key

  def __hash__(self):
    return hash(self._key)


def _is_key(value) -> bool:
  return jax.dtypes.issubdtype(getattr(value, "dtype", np.float32), jax.dtypes.prng_key)


def _frozen(apply_kwargs) -> tuple:
  """The call's keyword arguments as a hashable, sorted tuple (arrays by value)."""
  items = sorted((apply_kwargs or {}).items())
  return tuple((k, _Frozen(v) if hasattr(v, "shape") else v) for k, v in items)


def _thawed(frozen: tuple) -> dict:
  """The keyword arguments of :func:`_frozen` as the call takes them."""
  return {k: v.value if isinstance(v, _Frozen) else v for k, v in frozen}


def _hashable(model, what="model"):
  try:
    hash(model)
  except TypeError as e:
    raise ValueError(
      f"{what}={_name(model)} has an unhashable field ({e}); it is compiled once per "
      "model, so its fields must be hashable (use tuples, not lists)."
    ) from None
  return model


@functools.lru_cache(maxsize=64)
def _init_shapes(model, x_spec, kwargs, shown: str):
  """Shape structs of ``model.init``'s variables (cached: tracing init costs ms)."""
  try:
    return jax.eval_shape(
      functools.partial(model.init, **_thawed(kwargs)),
      jax.random.key(0),
      jax.ShapeDtypeStruct(*x_spec[1][0]),
    )
  except (TypeError, ValueError) as err:
    raise ValueError(
      f"input_shape={shown} cannot be applied to model={_name(model)}: {err}"
    ) from None


def trace(
  model,
  input_shape=None,
  *,
  variables=None,
  params=None,
  apply_kwargs=None,
  prunable: masks_lib.Prunable = None,
) -> Traced:
  """The :class:`Traced` of ``model`` on one example (cached).

  Args:
    model: a Flax module (called as ``model.apply(variables, x, **apply_kwargs)``), a
      function ``apply(params, x, **apply_kwargs)``, an NNX module (its ``nnx.Param``
      state is the params: :func:`as_function`), or a :class:`Traced` (returned as it
      is, narrowed by ``prunable``; what is passed beside it must agree with it).
    input_shape: one example's shape without the batch axis, or an example input array.
    variables: a module's variables ({'params': ..., 'batch_stats': ...}) or their shape
      structs; default: the shapes of ``model.init``. A function's params are its
      ``variables`` (or ``params=``).
    params: a function's params (or a module's, when it has no other collection).
    apply_kwargs: keyword arguments of the model's call (e.g. {'train': False}).
    prunable: narrows the linear-op weights: a predicate on the '/'-joined parameter
      path, or a collection of such paths (exactly those).
  """
  if isinstance(model, Traced):
    _check_agrees(model, input_shape, variables, params, apply_kwargs)
    return model.narrow(prunable)
  if _is_nnx(model):
    model, params = as_function(model, params if params is not None else variables)
    variables = None
  if input_shape is None:
    raise ValueError(
      f"input_shape=None: model={_name(model)} is traced on one example; pass its shape "
      "(e.g. (28, 28, 1)) or an example input, or a sparsejax.Traced as model."
    )
  x = example_input(input_shape)
  kwargs = _frozen(apply_kwargs)
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
        f"model={_name(model)} is a function: pass its params as variables= so that masks "
        "can be matched to it."
      )
    extra = {}
  else:
    raise ValueError(f"model={model!r} must be a Flax module or a function apply(params, x).")
  _hashable(model)
  try:
    traced = _traced(model, _spec(x), _spec(params), _spec(extra), kwargs, None)
  except flax.errors.ScopeParamShapeError as err:
    raise ValueError(
      f"input_shape={input_shape!r} does not fit the model's variables: {err.args[0]} "
      "Pass the input shape the variables were made with (one example, without the batch "
      "axis)."
    ) from None
  return traced.narrow(prunable)


class _NNXApply:
  """``apply(params, x)`` of an NNX module: its graph merged with the ``nnx.Param``
  state given and the module's other state (batch statistics, ...) as it was when
  split. Equal for equal graphs and state shapes (a cache key of the trace)."""

  def __init__(self, graphdef, rest):
    self.graphdef, self.rest = graphdef, rest
    self._key = (graphdef, _spec(rest))
    self.__name__ = f"nnx:{type(graphdef).__name__}"

  def __call__(self, params, x, **kwargs):
    return _nnx().merge(self.graphdef, params, self.rest)(x, **kwargs)

  def __eq__(self, other):
    return isinstance(other, _NNXApply) and self._key == other._key

  def __hash__(self):
    return hash(self._key)


def _nnx():
  from flax import nnx  # an optional module of Flax: only NNX models need it

  return nnx


def _is_nnx(model) -> bool:
  return type(model).__module__.startswith("flax.nnx") or any(
    c.__module__.startswith("flax.nnx") and c.__name__ == "Module" for c in type(model).__mro__
  )


def as_function(model, variables=None):
  """``(model, variables)``, an NNX module passed as ``model`` turned into the function
  ``apply(params, x)`` of its graph and its ``nnx.Param`` state (masks then have that
  state's structure; the module's other state is read as it is now). Anything else is
  returned as it is."""
  if not _is_nnx(model):
    return model, variables
  nnx = _nnx()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if variables is not None and _spec(variables) != _spec(params):
    raise ValueError(
      "variables: an NNX module carries its own parameters; leave variables out (or "
      "pass nnx.state(model, nnx.Param))."
    )
  return _NNXApply(graphdef, rest), params if variables is None else variables


def _check_agrees(traced: Traced, input_shape, variables, params, apply_kwargs) -> None:
  """ValueError unless what a caller passes beside a Traced is what it was traced with."""
  if input_shape is not None and _spec(example_input(input_shape)) != _spec(traced.input):
    raise ValueError(
      f"input_shape={input_shape!r} differs from the sparsejax.Traced's input "
      f"{tuple(traced.input.shape)}; leave it out or trace the model again."
    )
  if apply_kwargs is not None and _frozen(apply_kwargs) != traced.apply_kwargs:
    raise ValueError(
      f"apply_kwargs={apply_kwargs!r} differs from the sparsejax.Traced's "
      f"{dict(traced.apply_kwargs)!r}; leave it out or trace the model again."
    )
  if params is None and variables is not None:
    params = params_of(traced, variables)
  if params is not None and _spec(params) != traced.params_spec:
    mine = dict(zip(traced.paths, traced.shapes))
    got = {
      masks_lib.path_str(p): tuple(np.shape(l))
      for p, l in jax.tree_util.tree_leaves_with_path(params)
    }
    diff = sorted(set(mine.items()) ^ set(got.items()))[:4]
    raise ValueError(
      "variables do not match the parameters the sparsejax.Traced was traced with "
      f"(differing (path, shape): {diff}); pass that model's variables."
    )


def params_of(model, variables):
  """The params in ``variables``: a module's (or a Traced of one) 'params' collection, a
  function's params as they are."""
  module = model.model if isinstance(model, Traced) else model
  if module is None or isinstance(module, nn.Module):
    if not hasattr(variables, "keys") or "params" not in variables:
      raise ValueError(
        "variables has no 'params' collection; pass the model's variables (e.g. "
        "model.init(...)), or a function apply(params, x) as model= with its params as "
        "variables=."
      )
    return variables["params"]
  return variables


__all__ = ["Traced", "trace", "as_function", "example_input", "params_of", "unspec"]
