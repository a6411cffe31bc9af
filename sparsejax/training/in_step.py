"""Mask updates inside the jitted train step: no host round trip at update steps.

:func:`update_train_step` is :func:`sparsejax.training.train_step` with the mask update
of a :class:`sparsejax.dynamic.Updater` scheduled in the same program: ``lax.cond`` on
``updater.update_due(state.step)`` runs the update, puts the new masks into the
optimizer state, zeroes dropped weights and (optionally) the optimizer state of grown
ones, and the step's optimizer update follows under the new masks. An updater that reads
gradients (RigL) grows by the step's own dense gradient, computed before the update, and
the step applies that gradient to the weights it kept (a grown weight stays 0 through
the update's step, as RigL's code grows after the step with zeros,
:func:`sparsejax.dynamic.without_grown`): one forward and backward pass per step, none
inside the ``lax.cond`` (where XLA:CPU runs a convolution's gradient many times slower).
This is what :class:`sparsejax.training.MaskUpdates` does between steps from Python, in
the same order with the same keys, so both paths give the same masks; the in-step path
fits a multi-host or TPU loop (every process runs the same program, nothing waits for
the host) and :func:`sparsejax.training.train` uses it with ``update_in_jit=True``.
Effective tracking and effective targets need the host (a connectivity search between
steps) and stay on the between-steps path.
"""

from __future__ import annotations

import jax

from sparsejax import dynamic, optim
from sparsejax.training.state import TrainState
from sparsejax.training.steps import _apply, _loss_and_grads, donating, jit_step


def hold_grown(outputs, old, new):
  """The outputs of a step's forward and backward pass (:func:`forward_backward`) with
  the gradient set to 0 at the weights grown from masks ``old`` to ``new``
  (:func:`sparsejax.dynamic.without_grown`): what the update's step applies."""
  loss, grads, *rest = outputs
  return (loss, dynamic.without_grown(grads, old, new), *rest)


def update_key(step_key: jax.Array, step) -> jax.Array:
  """The PRNG key of the mask update before step ``step`` (a Python int or traced):
  ``fold_in(fold_in(step_key, step), 1)``, the key the between-steps path uses."""
  return jax.random.fold_in(jax.random.fold_in(step_key, step), 1)


def update_train_step(
  state: TrainState,
  batch,
  key: jax.Array,
  *,
  model,
  spec,
  updater,
  sweep=None,
  reset_optimizer_state: bool = True,
  donate: bool = False,
):
  """The mask update due at ``state.step`` (if any), then one train step; jitted.

  Args:
    state, batch, key, model, spec, donate: as :func:`sparsejax.training.train_step`
      (``spec`` a ``data.DatasetSpec``).
    updater: a :class:`sparsejax.dynamic.Updater` with ``update_due`` (hashable: static).
    sweep: a connectivity sweep for updaters that regrow into active weights.
    reset_optimizer_state: grown weights start with zero optimizer state.

  Returns:
    (new state, {"loss", "accuracy", "mask_update": {"updated", "kept", "dropped",
    "grown"}}) as device arrays.
  """
  return _update_train_step[donating(donate)](
    state,
    batch,
    key,
    model=model,
    spec=spec,
    updater=updater,
    sweep=sweep,
    reset_optimizer_state=reset_optimizer_state,
  )


def _update_train_step_fn(
  state: TrainState, batch, key, *, model, spec, updater, sweep, reset_optimizer_state
):
  # One forward and backward pass per step, as between steps (MaskUpdates.update): an
  # updater that reads gradients gets this step's, at the params before the update,
  # and the optimizer applies the same gradient to the weights kept (grown ones stay
  # 0). Other updaters move the masks first and the pass sees the new params.
  step = state.step
  outputs = (
    _loss_and_grads(state, batch, key, model=model, spec=spec) if updater.needs_grads else None
  )
  params, opt_state, stats = dynamic.update_in_step(
    updater,
    state.params,
    state.opt_state,
    step,
    update_key(key, step),
    grads=None if outputs is None else outputs[1],
    sweep=sweep,
    reset_optimizer_state=reset_optimizer_state,
  )
  if outputs is None:
    state = state.replace(params=params, opt_state=opt_state)
    outputs = _loss_and_grads(state, batch, key, model=model, spec=spec)
  else:
    outputs = hold_grown(outputs, optim.get_masks(state.opt_state), optim.get_masks(opt_state))
    state = state.replace(params=params, opt_state=opt_state)
  state, metrics = _apply(state, outputs)
  return state, {**metrics, "mask_update": stats}


_update_train_step = jit_step(
  _update_train_step_fn, ("model", "spec", "updater", "sweep", "reset_optimizer_state")
)


__all__ = ["hold_grown", "update_key", "update_train_step"]
