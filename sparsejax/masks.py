"""Masks: pytrees shaped like ``params`` with a bool array at every prunable kernel.

The mask tree *is* the prunable set: its bool leaves are the prunable weights, its
``None`` leaves are not pruned nor counted. Which leaves those are is decided once,
where a mask is first made:

- from a traced program (``effective.ones(model, x)``, ``pruning.prune``): every
  parameter that enters a linear op (dot_general, convolution) as its weight operand,
  optionally narrowed by a predicate on the parameter path;
- from params alone (:func:`ones`, :func:`map_prunable`, :func:`random` here), with
  ``prunable=None``: the leaves named ``kernel`` with at least two axes (Flax's Dense
  kernels [in, out], Conv kernels [H, W, in, out]); or ``prunable=`` a predicate on
  the '/'-joined path or a collection of paths (:func:`selector`).

Scores, counts, training and the optimizer follow the mask tree. The connectivity of
a traced program (:mod:`sparsejax.effective`) is stricter: there every linear-op weight
must carry a mask unless ``prunable=`` leaves it out, so that a forgotten layer is an
error and never silently counts as dense. Biases and normalization parameters (one
axis) are never prunable.

Order: :func:`prunable_paths` lists kernels in the order of the flattened tree
(sorted keys). The zoo names its layers so that this order is the input-to-output
order (tests check it against the order in which the layers are called). For other
models (Flax's automatic names sort ``Dense_10`` before ``Dense_2``) the input-to-output
order comes from the traced program: ``effective.prunable_paths(model, x)`` and
``effective.flow_order``; rankings carry it (``pruning.Ranking.flow``) for uniform+.

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


def _ndim(leaf) -> int:
  return len(getattr(leaf, "shape", ()))


def is_prunable(path, leaf) -> bool:
  """The rule without a traced program: Dense/Conv kernels, named 'kernel', at least 2-D."""
  name = path_str(path[-1:]) if path else ""
  return name == "kernel" and _ndim(leaf) >= 2


Prunable = Callable[[str], bool] | Collection[str] | None


def selector(prunable: Prunable = None) -> Callable[[Any, Any], bool]:
  """``(path, leaf) -> bool`` choosing the prunable leaves.

  prunable: None (:func:`is_prunable`: leaves named 'kernel' with >= 2 axes), a
    predicate on the '/'-joined path (among leaves with >= 2 axes), or a collection of
    '/'-joined paths (e.g. ``effective.prunable_paths(model, x)``).
  """
  if prunable is None:
    return is_prunable
  if callable(prunable):
    return lambda path, leaf: _ndim(leaf) >= 2 and bool(prunable(path_str(path)))
  if (
    isinstance(prunable, Collection)
    and not isinstance(prunable, (str, bytes))
    and all(isinstance(p, str) for p in prunable)
  ):
    chosen = frozenset(prunable)
    return lambda path, leaf: path_str(path) in chosen
  raise ValueError(
    f"prunable={prunable!r} must be None (Dense/Conv kernels), a predicate on "
    "the '/'-joined parameter path, or a collection of such paths."
  )


def _prunable_leaves(params: PyTree, prunable: Prunable = None) -> list[tuple[str, Any]]:
  chosen = selector(prunable)
  flat = jax.tree_util.tree_leaves_with_path(params)
  return [(path_str(p), leaf) for p, leaf in flat if chosen(p, leaf)]


def prunable_paths(params: PyTree, prunable: Prunable = None) -> list[str]:
  """'/'-joined paths of the prunable leaves (:func:`selector`) in the params' tree
  order, which is the input-to-output order for the zoo."""
  return [p for p, _ in _prunable_leaves(params, prunable)]


def prunable_shapes(params: PyTree, prunable: Prunable = None) -> tuple[tuple[int, ...], ...]:
  """Shapes of the prunable leaves in :func:`prunable_paths` order."""
  return tuple(tuple(int(d) for d in leaf.shape) for _, leaf in _prunable_leaves(params, prunable))


def map_prunable(fn: Callable, params: PyTree, *rest: PyTree, prunable: Prunable = None) -> PyTree:
  """Tree shaped like ``params``: ``fn(leaf, *rest_leaves)`` at prunable leaves
  (:func:`selector`), None elsewhere. To follow an existing mask tree instead, use
  :func:`map_masks`.

  ``rest`` may be masks (None at non-prunable leaves) or full trees.
  """
  chosen = selector(prunable)

  def visit(path, leaf, *others):
    return fn(leaf, *others) if chosen(path, leaf) else None

  return jax.tree_util.tree_map_with_path(visit, params, *rest, is_leaf=_is_none)


def map_masks(fn: Callable, masks: Masks, *rest: PyTree) -> Masks:
  """``fn(mask_leaf, *rest_leaves)`` at every mask leaf; None stays None."""
  return jax.tree.map(
    lambda m, *o: None if m is None else fn(m, *o), masks, *rest, is_leaf=_is_none
  )


def mask_leaves(masks: Masks) -> list:
  """The bool arrays of a mask tree in :func:`prunable_paths` order."""
  return [m for m in jax.tree.leaves(masks, is_leaf=_is_none) if m is not None]


def ones(params: PyTree, prunable: Prunable = None) -> Masks:
  """The dense mask: every prunable weight (:func:`selector`) kept."""
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


def random(
  key: jax.Array, params: PyTree, sparsity: float | Sequence[float], prunable: Prunable = None
) -> Masks:
  """Uniformly random mask keeping exactly round((1 - s_l) n_l) weights in layer l.

  ``sparsity`` is one number for every layer or one per prunable layer (input-to-
  output order). Masks from one key are nested across sparsities: each layer keeps
  a prefix of one fixed random permutation. ``prunable``: see :func:`selector`.
  """
  leaves = _prunable_leaves(params, prunable)
  chosen = selector(prunable)
  if np.ndim(sparsity) == 0:
    sparsities = [check_sparsity(sparsity)] * len(leaves)
  else:
    sparsities = [check_sparsity(s, f"sparsity[{i}]") for i, s in enumerate(sparsity)]
    if len(sparsities) != len(leaves):
      raise ValueError(
        f"sparsity has {len(sparsities)} entries; the params have {len(leaves)} prunable layers."
      )
  keys = dict(zip((p for p, _ in leaves), jax.random.split(key, len(leaves))))
  by_path = dict(zip((p for p, _ in leaves), sparsities))

  def layer(path, w):
    p = path_str(path)
    n = int(np.prod(w.shape))
    kept = int(round((1.0 - by_path[p]) * n))
    rank = jnp.argsort(jax.random.permutation(keys[p], n))
    return (rank < kept).reshape(w.shape)

  return jax.tree_util.tree_map_with_path(
    lambda path, w: layer(path, w) if chosen(path, w) else None, params
  )


def validate(
  masks: Masks, params: PyTree, name: str = "masks", prunable: Prunable = None, hint: str = ""
) -> None:
  """Raises ValueError unless ``masks`` matches ``params``: the same tree, a bool array
  of the weight's shape or None at every leaf.

  ``params`` may hold arrays or shape structs. ``prunable`` (see :func:`selector`):
  the leaves that must carry a mask (e.g. those a traced program uses as linear-op
  weights), all others None. Without it the mask tree decides which leaves are
  prunable, and only leaves with at least two axes may be (a bias or a normalization
  scale never is).
  """
  want = {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
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
  chosen = None if prunable is None else set(prunable_paths(params, prunable))
  for path, w in want.items():
    m = got[path]
    if chosen is None:
      must, may = False, _ndim(w) >= 2
    else:
      must = may = path in chosen
    if m is None and not must:
      continue
    if not may:
      why = (
        "only weights with at least two axes (Dense/Conv kernels, linear-op weights) are prunable"
        if chosen is None
        else "it is not one of the prunable leaves"
      )
      raise ValueError(f"{name}[{path!r}] must be None: {why}, got {type(m).__name__}.")
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
