"""An Optax transformation that keeps pruned weights at exactly zero.

``with_masks(inner, masks)`` wraps any ``optax.GradientTransformation``. With
masks m (1 = kept) it computes

    g~_t         = m * g_t                       (masked gradients)
    u_t, s_t     = inner.update(g~_t, s_{t-1}, w_t)
    update_t     = m * u_t                       (masked updates)

so the inner state of a pruned weight never sees a gradient, and whatever the
inner transformation adds on its own (momentum carried over from dense training,
Adam's bias-corrected moments, decoupled weight decay as in ``optax.adamw``) is
cut off at pruned weights. A weight that starts at 0 stays exactly 0.

The masks live in the transformation's state (:class:`WithMasksState`), so they are
checkpointed with Orbax and sharded with the rest of the optimizer state, and can
be replaced between steps (:func:`replace_masks`: IMP rounds, gradual schedules,
dynamic sparse training) without recompiling a jitted step, as long as the new
masks have the same structure, shapes and dtype.

Masks are trees shaped like the params with a bool array at prunable leaves and
``None`` elsewhere (:mod:`sparsejax.masks`); ``None`` leaves are left unmasked.

Reference: the same construction as jaxpruner's ``wrap_optax`` (Lee et al., 2023,
"JaxPruner: A concise library for sparsity research"), with the masks in the state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import masks as masks_lib

PyTree = Any


class WithMasksState(NamedTuple):  # not optax.MaskedState (optax.masked's), hence the name
  """State of :func:`with_masks`.

  masks: the mask tree (bool at prunable leaves, None elsewhere), or None for no
    masking at all (dense training through the same code).
  inner_state: the wrapped transformation's state.
  """

  masks: PyTree
  inner_state: optax.OptState


def _mask(tree: PyTree, masks: PyTree) -> PyTree:
  if masks is None:
    return tree
  return jax.tree.map(
    lambda x, m: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
    tree,
    masks,
    is_leaf=lambda v: v is None,
  )


def _check_pruned_are_zero(params: PyTree, masks: PyTree) -> None:
  """ValueError when concrete ``params`` hold nonzero weights where ``masks`` prune:
  the masked update keeps every weight where it is, so they would stay nonzero."""
  bad = {}
  for (path, w), m in zip(
    jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(masks, is_leaf=_is_none)
  ):
    if m is None or isinstance(w, jax.core.Tracer) or isinstance(m, jax.core.Tracer):
      continue
    count = int(np.count_nonzero(np.asarray(w)[~np.asarray(m)]))
    if count:
      bad[masks_lib.path_str(path)] = count
  if bad:
    first = sorted(bad)[0]
    raise ValueError(
      f"params has {sum(bad.values())} nonzero weights where masks prune (e.g. "
      f"{bad[first]} in {first!r}); with_masks keeps each weight where it starts, so "
      "zero them first: params = sparsejax.masks.apply(params, masks)."
    )


def _is_none(x) -> bool:
  return x is None


def with_masks(
  inner: optax.GradientTransformation, masks: PyTree, straight_through: bool = False
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that masked-out weights get zero gradients and zero updates.

  Args:
    inner: any Optax transformation (sgd, adam, adamw, a chain, ...).
    masks: bool mask tree shaped like the params (None at non-prunable leaves), or
      None (no masking). Stored in the state by ``init``; ``update`` reads the masks
      from the state, so :func:`replace_masks` changes them between steps.
    straight_through: the masks only hold the forward pass's mask of
      straight-through-estimator training (:func:`straight_through`); gradients and
      updates pass unmasked, so the dense weights keep training.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`WithMasksState`: ``update(updates, state, params, **extra_args)`` passes
    the extra arguments on to ``inner`` (e.g. ``value``, ``grad`` and ``value_fn`` of
    ``optax.lbfgs``'s line search), so any Optax optimizer can be wrapped.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from sparsejax import optim
    >>> params = {"kernel": jnp.array([[1.0, 0.0], [0.0, 4.0]]), "bias": jnp.zeros(2)}
    >>> masks = {"kernel": jnp.array([[True, False], [False, True]]), "bias": None}
    >>> tx = optim.with_masks(optax.adamw(0.1, weight_decay=0.1), masks)
    >>> state = tx.init(params)
    >>> grads = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["kernel"][0, 1], updates["kernel"][1, 0]
    (Array(0., dtype=float32), Array(0., dtype=float32))
  """
  if masks is not None:
    masks = jax.tree.map(jnp.asarray, masks)

  def init_fn(params):
    if masks is not None:
      masks_lib.validate(masks, params)
      if not straight_through:
        _check_pruned_are_zero(params, masks)
    return WithMasksState(masks=masks, inner_state=inner.init(params))

  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    masks_now = None if straight_through else state.masks
    updates = _mask(updates, masks_now)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    return _mask(updates, masks_now), WithMasksState(state.masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def straight_through(params: PyTree, masks: PyTree) -> PyTree:
  """w * m in the forward pass, the identity in the backward pass (the straight-through
  estimator): ``w + stop_gradient(w * m - w)``; masks None: params unchanged."""
  if masks is None:
    return params
  return jax.tree.map(
    lambda w, m: (
      w if m is None else w + jax.lax.stop_gradient(jnp.where(m, w, jnp.zeros_like(w)) - w)
    ),
    params,
    masks,
    is_leaf=lambda v: v is None,
  )


def _is_masked_state(x) -> bool:
  return isinstance(x, WithMasksState)


def get_masks(opt_state: optax.OptState) -> PyTree:
  """The masks held by the (outermost) :class:`WithMasksState` inside ``opt_state``.

  Raises:
    ValueError: ``opt_state`` holds no :class:`WithMasksState`.
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_masked_state) if _is_masked_state(s)]
  if not found:
    raise ValueError(
      "opt_state holds no WithMasksState: build the optimizer with "
      "sparsejax.optim.with_masks(inner, masks)."
    )
  return found[0].masks


def replace_masks(opt_state: optax.OptState, masks: PyTree) -> optax.OptState:
  """``opt_state`` with the masks of every :class:`WithMasksState` inside it replaced.

  The new masks must have the structure, shapes and dtype of the old ones for a
  jitted step to reuse its compiled program (a bool mask of the same shapes does).
  The inner state is kept as it is; the next update masks it through the gradients.

  Raises:
    ValueError: ``opt_state`` holds no :class:`WithMasksState`, or the new masks do not
      match the old ones (tree structure, shapes, dtype).
  """
  old = get_masks(opt_state)
  if old is not None and masks is not None:
    masks = jax.tree.map(jnp.asarray, masks)
    try:
      same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, old, masks)
    except ValueError as err:
      raise ValueError(
        f"masks do not have the tree structure of the masks in opt_state: {err}"
      ) from None
    bad = [masks_lib.path_str(p) for p, ok in jax.tree_util.tree_leaves_with_path(same) if not ok]
    if bad:
      raise ValueError(
        f"masks differ in shape or dtype from the masks in opt_state at "
        f"{bad[:5]}; replacing masks needs bool arrays of the same shapes."
      )
  return jax.tree.map(
    lambda s: s._replace(masks=masks) if _is_masked_state(s) else s,
    opt_state,
    is_leaf=_is_masked_state,
  )


def zero_state_where(opt_state: optax.OptState, params: PyTree, where: PyTree) -> optax.OptState:
  """``opt_state`` with every part shaped like ``params`` (momentum traces, Adam's first
  and second moments, ...) set to 0 where the mask tree ``where`` is True; counts,
  schedules and the masks themselves are left alone. Jit-able.

  Regrown weights of dynamic sparse training start with no optimizer history this way,
  as RigL's code resets the optimizer slots of new connections (Evci et al., 2020,
  ``reset_momentum``): otherwise a weight dropped and later regrown would resume with a
  stale (decayed) momentum or second moment.
  """
  structure = jax.tree.structure(params)
  shapes = [np.shape(x) for x in jax.tree.leaves(params)]

  def params_like(x) -> bool:
    if x is None or _is_masked_state(x):
      return False
    try:
      leaves = jax.tree.leaves(x)
      return (
        jax.tree.structure(x) == structure
        and [np.shape(l) for l in leaves] == shapes
        and bool(leaves)
      )
    except (TypeError, ValueError):
      return False

  def reset(part):
    if not params_like(part):
      return part
    return jax.tree.map(
      lambda s, w: s if w is None else jnp.where(w, jnp.zeros_like(s), s),
      part,
      where,
      is_leaf=_is_none,
    )

  return jax.tree.map(reset, opt_state, is_leaf=params_like)


__all__ = [
  "WithMasksState",
  "with_masks",
  "get_masks",
  "replace_masks",
  "straight_through",
  "zero_state_where",
]
