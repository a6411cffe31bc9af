"""Masks: pytrees shaped like ``params`` with a bool array at every prunable weight.

The mask tree *is* the prunable set: its bool leaves are the prunable weights, its
``None`` leaves are not pruned nor counted. Which leaves those are is decided once,
where a mask is first made, by one rule: the parameters a model's traced program uses
as a linear op's weight (:mod:`sparsejax.tracing`: ``sparsejax.trace(model, x).ones()``,
``pruning.prune``), optionally narrowed. The helpers here have no model: they take
the prunable set as a collection of '/'-joined paths (``prunable=``, e.g.
``traced.prunable_paths``) or follow an existing mask tree (:func:`map_masks`,
:func:`paths`). Scores, counts, effective sparsity, training and the optimizer follow
the mask tree.

Order: :func:`mask_leaves` and :func:`paths` list the leaves in the order of the
flattened tree (sorted keys). The zoo names its layers so that this order is the
input-to-output order (tests check it against the order in which the layers are
called). For other models (Flax's automatic names sort ``Dense_10`` before
``Dense_2``) the input-to-output order comes from the traced program
(``Traced.prunable_paths``, ``Traced.flow``); rankings carry it for uniform+.

Direct sparsity s = masked-out weights / prunable weights; density = 1 - s;
compression = 1 / density (method.md section 1).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import files

PyTree = Any
Masks = PyTree


def _is_none(x) -> bool:
  return x is None


def path_str(path) -> str:
  """'/'-joined parameter path, e.g. 'stage1_block0/conv_1/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


Prunable = Callable[[str], bool] | Collection[str] | None


def check_paths(prunable, name: str = "prunable") -> frozenset:
  """``prunable`` as a frozenset of '/'-joined paths, or ValueError naming ``name``."""
  if (
    isinstance(prunable, Collection)
    and not isinstance(prunable, (str, bytes))
    and all(isinstance(p, str) for p in prunable)
  ):
    return frozenset(prunable)
  if prunable is None or callable(prunable):
    raise ValueError(
      f"{name}={prunable!r}: without a model the prunable set is a collection of "
      "'/'-joined parameter paths; take it from the traced program, "
      "sparsejax.trace(model, input_shape).prunable_paths (a predicate narrows it there: "
      "sparsejax.trace(..., prunable=predicate)), or follow a mask tree (map_masks)."
    )
  raise ValueError(f"{name}={prunable!r} must be a collection of '/'-joined parameter paths.")


def selector(prunable: Prunable) -> Callable[[Any, Any], bool]:
  """``(path, leaf) -> bool``: the leaf's '/'-joined path is in ``prunable`` (a
  collection of paths; a predicate is refused here, see :func:`check_paths`)."""
  chosen = check_paths(prunable)
  return lambda path, leaf: path_str(path) in chosen


def paths(masks: Masks) -> list[str]:
  """'/'-joined paths of a mask tree's bool leaves (its prunable set), tree order."""
  return [
    path_str(p)
    for p, m in jax.tree_util.tree_leaves_with_path(masks, is_leaf=_is_none)
    if m is not None
  ]


def map_prunable(fn: Callable, params: PyTree, *rest: PyTree, prunable: Prunable) -> PyTree:
  """Tree shaped like ``params``: ``fn(leaf, *rest_leaves)`` at the leaves whose path is
  in ``prunable`` (a collection of '/'-joined paths), None elsewhere. To follow an
  existing mask tree instead, use :func:`map_masks`.

  ``rest`` may be masks (None at non-prunable leaves) or full trees.
  """
  chosen = selector(prunable)
  missing = check_paths(prunable) - set(_tree_paths(params))
  if missing:
    raise ValueError(f"prunable names {sorted(missing)[:3]}, which are not leaves of params.")

  def visit(path, leaf, *others):
    return fn(leaf, *others) if chosen(path, leaf) else None

  return jax.tree_util.tree_map_with_path(visit, params, *rest, is_leaf=_is_none)


def _tree_paths(tree: PyTree) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def map_masks(fn: Callable, masks: Masks, *rest: PyTree) -> Masks:
  """``fn(mask_leaf, *rest_leaves)`` at every mask leaf; None stays None."""
  return jax.tree.map(
    lambda m, *o: None if m is None else fn(m, *o), masks, *rest, is_leaf=_is_none
  )


def mask_leaves(masks: Masks) -> list:
  """The bool arrays of a mask tree in :func:`paths` order."""
  return [m for m in jax.tree.leaves(masks, is_leaf=_is_none) if m is not None]


def ones(params: PyTree, prunable: Prunable) -> Masks:
  """The dense mask: True at the leaves whose path is in ``prunable`` (a collection
  of '/'-joined paths, e.g. ``sparsejax.trace(model, x).prunable_paths``; the traced
  model's own :meth:`~sparsejax.tracing.Traced.ones` is the same)."""
  return map_prunable(lambda w: jnp.ones(w.shape, bool), params, prunable=prunable)


def check_sparsity(sparsity, name: str = "sparsity") -> float:
  """``sparsity`` as a float in [0, 1), or ValueError naming ``name`` (NaN, inf,
  non-numbers and values outside the range are rejected). A traced value (inside
  jit) is returned as it is: it cannot be checked."""
  if isinstance(sparsity, jax.core.Tracer):
    return sparsity
  try:
    s = float(sparsity)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={sparsity!r} must be a number in [0, 1).") from None
  if not 0.0 <= s < 1.0:  # NaN fails too
    raise ValueError(f"{name}={sparsity!r} is outside the allowed range [0, 1).")
  return s


def random(key: jax.Array, like: Masks, sparsity: float | Sequence[float]) -> Masks:
  """Uniformly random mask at the leaves of the mask tree ``like`` (e.g. the dense
  mask ``traced.ones()``), keeping exactly round((1 - s_l) n_l) weights in layer l.

  ``sparsity`` is one number for every layer or one per layer (:func:`paths` order).
  Masks from one key are nested across sparsities: each layer keeps a prefix of one
  fixed random permutation.
  """
  names = paths(like)
  if not names:
    raise ValueError("like has no mask leaf (bool array); pass a mask tree, e.g. traced.ones().")
  if np.ndim(sparsity) == 0:
    sparsities = [check_sparsity(sparsity)] * len(names)
  else:
    sparsities = [check_sparsity(s, f"sparsity[{i}]") for i, s in enumerate(sparsity)]
    if len(sparsities) != len(names):
      raise ValueError(
        f"sparsity has {len(sparsities)} entries; like has {len(names)} mask leaves."
      )
  keys = iter(jax.random.split(key, len(names)))
  kept_fraction = iter(1.0 - s for s in sparsities)

  def layer(m):
    n = int(np.prod(m.shape))
    kept = int(round(next(kept_fraction) * n))
    rank = jnp.argsort(jax.random.permutation(next(keys), n))
    return (rank < kept).reshape(m.shape)

  return map_masks(layer, like)


def validate(
  masks: Masks, params: PyTree, name: str = "masks", prunable: Prunable = None, hint: str = ""
) -> None:
  """Raises ValueError unless ``masks`` matches ``params``: the same tree, a bool array
  of the weight's shape or None at every leaf.

  ``params`` may hold arrays or shape structs. ``prunable``: a collection of paths
  that must carry a mask, all others None (e.g. a traced model's prunable set);
  without it the mask tree decides which leaves are prunable.
  """
  want = {
    path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_none)
  }
  try:
    flat = jax.tree_util.tree_leaves_with_path(masks, is_leaf=_is_none)
  except Exception:  # pylint: disable=broad-except
    flat = []
  got = {path_str(p): m for p, m in flat}
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(
      f"{name} does not match the parameter tree: missing {missing[:5]}, "
      f"unexpected {extra[:5]}; a mask has the structure of params."
    )
  chosen = None if prunable is None else check_paths(prunable)
  for path, w in want.items():
    m = got[path]
    if m is None and (chosen is None or path not in chosen):
      continue
    if w is None:  # a params tree may hold None leaves (e.g. Equinox's partition)
      raise ValueError(f"{name}[{path!r}] must be None: the parameter there is None.")
    if chosen is not None and path not in chosen:
      raise ValueError(
        f"{name}[{path!r}] must be None: it is not one of the prunable leaves, got "
        f"{type(m).__name__}."
      )
    if m is None or not hasattr(m, "dtype"):
      raise ValueError(
        f"{name}[{path!r}]={m!r}: expected a bool array of shape {tuple(w.shape)}{hint}."
      )
    if m.dtype != np.bool_:
      raise ValueError(f"{name}[{path!r}] has dtype {m.dtype}; masks must be bool.")
    if tuple(m.shape) != tuple(w.shape):
      raise ValueError(
        f"{name}[{path!r}] has shape {tuple(m.shape)}; the weight has shape {tuple(w.shape)}."
      )


def apply(params: PyTree, masks: Masks) -> PyTree:
  """``params`` with every prunable kernel multiplied by its mask (others unchanged).

  Raises:
    ValueError: ``masks`` does not match ``params`` (:func:`validate`: tree, bool
      dtype, exact kernel shapes; a broadcastable mask is refused, not broadcast).
  """
  validate(masks, params)
  return jax.tree.map(
    lambda m, w: w if m is None else jnp.where(m, w, jnp.zeros_like(w)),
    masks,
    params,
    is_leaf=_is_none,
  )


def _checked_leaves(masks: Masks, params: PyTree | None) -> list:
  """The mask leaves, each checked to be a bool array; with ``params``, the whole tree
  is checked against them (:func:`validate`)."""
  if params is not None:
    validate(masks, params)
  flat = [
    (path_str(p), m)
    for p, m in jax.tree_util.tree_leaves_with_path(masks, is_leaf=_is_none)
    if m is not None
  ]
  for path, m in flat:
    dtype = getattr(m, "dtype", None)
    if dtype != np.bool_:
      raise ValueError(f"masks[{path!r}] has dtype {dtype}; masks must be bool arrays.")
  return [m for _, m in flat]


def count(masks: Masks, params: PyTree | None = None) -> tuple[int, int]:
  """(kept, total) prunable weights. The leaves must be bool arrays; pass ``params`` to
  also check the tree and the kernel shapes (:func:`validate`).

  Raises:
    ValueError: a non-bool leaf, or masks that do not match ``params``.
  """
  leaves = _checked_leaves(masks, params)
  # on the host: a jnp.sum would compile one program per leaf shape
  kept = sum(int(np.count_nonzero(np.asarray(m))) for m in leaves)
  return kept, sum(int(np.prod(m.shape)) for m in leaves)


def density(masks: Masks, params: PyTree | None = None) -> float:
  """Kept / prunable weights (checks as :func:`count`)."""
  kept, total = count(masks, params)
  return kept / total


def direct_sparsity(masks: Masks, params: PyTree | None = None) -> float:
  """Masked-out prunable weights / all prunable weights (checks as :func:`count`)."""
  return 1.0 - density(masks, params)


def compression(masks: Masks, params: PyTree | None = None) -> float:
  """1 / density; inf for a mask that keeps nothing (checks as :func:`count`)."""
  return compression_of(density(masks, params))


def compression_of(density_value: float) -> float:
  return float("inf") if density_value <= 0 else 1.0 / density_value


def layer_sparsities(masks: Masks, params: PyTree | None = None) -> dict[str, float]:
  """{path: sparsity} per prunable layer, in input-to-output order (checks as
  :func:`count`)."""
  _checked_leaves(masks, params)
  flat = jax.tree_util.tree_leaves_with_path(masks, is_leaf=_is_none)
  return {path_str(p): 1.0 - float(np.mean(np.asarray(m))) for p, m in flat if m is not None}


def save(path: str | os.PathLike, masks: Masks) -> None:
  """Writes the masks as .npz keyed by '/'-joined paths, atomically (temp + rename)."""
  flat = jax.tree_util.tree_leaves_with_path(masks, is_leaf=_is_none)
  arrays = {path_str(p): np.asarray(m) for p, m in flat if m is not None}
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  files.atomic_write(path, buf.getvalue())


def load(path: str | os.PathLike, params: PyTree) -> Masks:
  """Reads masks saved by :func:`save` into the tree structure of ``params``."""
  with np.load(os.fspath(path)) as data:
    arrays: Mapping[str, np.ndarray] = {k: data[k] for k in data.files}
  masks = jax.tree_util.tree_map_with_path(
    lambda p, w: jnp.asarray(arrays[path_str(p)]) if path_str(p) in arrays else None, params
  )
  unknown = sorted(
    set(arrays) - {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  )
  if unknown:
    raise ValueError(
      f"path={os.fspath(path)!r} holds masks for {unknown[:5]}, which are not "
      f"prunable kernels of the given params (not parameters of them)."
    )
  validate(masks, params, name=f"masks loaded from {os.fspath(path)!r}")
  return masks
