"""Score trees: the prunable leaves of a params tree, and trees of scores shaped like it.

A score tree has an array of the weight's shape at every prunable leaf and None
elsewhere (like a mask tree). The prunable leaves are a collection of '/'-joined paths
(the traced program's linear-op weights: :class:`sparsejax.Traced`), or the bool leaves
of given ``masks``; their flat leaf indices in the params' tree order are the *slots*.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as masks_lib
from sparsejax import tracing

PyTree = Any


def _is_none(x) -> bool:
  return x is None


def prunable_paths(model, prunable, masks=None, example=None) -> frozenset | None:
  """The prunable set of a model-reading score: ``prunable`` (a collection of paths)
  if given, else the bool leaves of ``masks``, else the traced program's linear-op
  weights (``model`` a :class:`sparsejax.Traced`, or a module traced on ``example``);
  None when none of these is known."""
  if prunable is not None:
    return masks_lib.check_paths(prunable)
  if masks is not None:
    return frozenset(masks_lib.paths(masks))
  if isinstance(model, tracing.Traced):
    return frozenset(model.prunable_paths)
  if example is not None and isinstance(model, nn.Module):
    return frozenset(tracing.trace(model, example).prunable_paths)
  return None


def slots(params: PyTree, prunable, masks=None, who: str = "scores") -> tuple:
  """Flat leaf indices of the prunable leaves (``prunable`` paths; with ``masks``, their
  bool leaves, checked against ``params``)."""
  if masks is not None:
    masks_lib.validate(masks, params, prunable=prunable)
    flat = jax.tree.leaves(masks, is_leaf=_is_none)
    out = tuple(i for i, m in enumerate(flat) if m is not None)
  else:
    if prunable is None:
      raise ValueError(
        f"{who}: prunable=None; pass the prunable set, e.g. prunable="
        "sparsejax.trace(model, input_shape).prunable_paths (or masks=)."
      )
    chosen = masks_lib.selector(prunable)
    out = tuple(
      i
      for i, (p, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(params))
      if chosen(p, leaf)
    )
  if not out:
    raise ValueError(f"{who}: params has no leaf in prunable={prunable!r}.")
  return out


def kernels(params: PyTree, slots_: tuple) -> list:
  """The prunable leaves in tree order (traceable; also for gradient trees)."""
  leaves = jax.tree.leaves(params)
  return [leaves[i] for i in slots_]


def with_kernels(params: PyTree, new: Sequence, slots_: tuple) -> PyTree:
  """``params`` with its prunable leaves replaced, in tree order (traceable)."""
  leaves, treedef = jax.tree.flatten(params)
  for i, k in zip(slots_, new):
    leaves[i] = k
  return jax.tree.unflatten(treedef, leaves)


def score_tree(params: PyTree, kernel_scores: Sequence, slots_: tuple) -> PyTree:
  """Mask-shaped tree: the given arrays at the prunable leaves, None elsewhere."""
  leaves, treedef = jax.tree.flatten(params)
  out = [None] * len(leaves)
  for i, k in zip(slots_, kernel_scores):
    out[i] = jnp.reshape(k, leaves[i].shape)
  return jax.tree.unflatten(treedef, out)


def mask_arrays(masks) -> list | None:
  """The arrays of a mask tree already checked by :func:`slots` (None: no masks)."""
  if masks is None:
    return None
  return [jnp.asarray(m) for m in masks_lib.mask_leaves(masks)]


def check_finite(kernel_scores: Sequence, who: str) -> None:
  bad = sum(int(jnp.sum(~jnp.isfinite(s))) for s in kernel_scores)
  if bad:
    raise ValueError(
      f"{who} computed {bad} NaN or infinite scores; scores must be finite "
      "(check the weights, the inputs and the loss)."
    )


def check_finite_weights(params: PyTree, slots_: tuple, who: str) -> None:
  """Scores of NaN or infinite weights mean nothing (LAMP would score such a layer 0)."""
  paths = [masks_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  bad = {paths[i]: int(jnp.sum(~jnp.isfinite(w))) for i, w in zip(slots_, kernels(params, slots_))}
  bad = {p: n for p, n in bad.items() if n}
  if bad:
    raise ValueError(
      f"{who} got {sum(bad.values())} NaN or infinite weights (in "
      f"{', '.join(sorted(bad)[:5])}); weights must be finite (check the "
      "training run they come from)."
    )


def check_rounds(rounds) -> int:
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
    raise ValueError(f"rounds={rounds!r} must be a positive integer.")
  return int(rounds)


def kernel_paths(params: PyTree, slots_: tuple) -> frozenset:
  """The '/'-joined paths of the leaves at ``slots_``."""
  paths = [masks_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  return frozenset(paths[i] for i in slots_)
