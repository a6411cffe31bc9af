"""The train state: step, params, batch statistics, optimizer state, and the optimizer.

As ``flax.training.train_state.TrainState``: the state carries its optimizer ``tx`` as a
static (non-pytree) field, built once by :func:`create_train_state`; the jitted steps
read it (:meth:`TrainState.apply_gradients`) instead of rebuilding the recipe. The
masks are in the optimizer state (:func:`sparsejax.optim.with_masks`), so checkpoints
and sharding carry them and mask updates need no recompilation.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sparsejax import effective, optim, tracing
from sparsejax import masks as masks_lib
from sparsejax.training.config import make_masked_optimizer

PyTree = Any


@struct.dataclass
class TrainState:
  """Everything a step reads and writes (a pytree; checkpointed as a whole).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the model's 'params' collection; pruned weights are exactly 0 (except
      the dense weights of straight-through training).
    batch_stats: the model's 'batch_stats' collection ({} without batch norm).
    opt_state: state of ``tx``: a :class:`sparsejax.optim.MaskedState` holding the
      masks (bool at prunable leaves, None elsewhere; None to train densely) and the
      momentum trace and schedule count.
    tx: the optimizer (:func:`sparsejax.training.make_masked_optimizer`); static:
      not a leaf, not checkpointed, part of the jitted step's cache key.
    straight_through: the masks mask only the forward pass (STE training); static.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  straight_through: bool = struct.field(pytree_node=False, default=False)

  @property
  def masks(self) -> PyTree:
    """The masks in the optimizer state (None for dense training)."""
    return optim.get_masks(self.opt_state)

  def apply_gradients(self, *, grads: PyTree, **changes) -> TrainState:
    """One optimizer step: ``tx.update`` (gradients and updates masked by the masks in
    the state), ``step + 1``; ``changes`` replace other fields (e.g. batch_stats)."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      opt_state=opt_state,
      **changes,
    )


def _check_same_structure(params: PyTree, reference: PyTree) -> None:
  got = {masks_lib.path_str(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {
    masks_lib.path_str(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(reference)
  }
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:5]
    raise ValueError(
      f"params do not match the model's parameters (path, shape): differing entries {diff}."
    )


@functools.partial(jax.jit, static_argnames=("model",))
def _init_variables(key, x, *, model):
  return model.init(key, x, train=False)


@functools.partial(jax.jit, static_argnames=("model",))
def _init_batch_stats(params, x, *, model):
  # Batch-norm statistics start at fixed values (mean 0, var 1): one forward pass
  # creates them without compiling the random initializers of the parameters.
  _, variables = model.apply({"params": params}, x, train=False, mutable=["batch_stats"])
  return variables.get("batch_stats", {})


def prunable_paths(model, input_shape, params: PyTree, batch_stats: PyTree):
  """The model's prunable set without masks: the parameters its traced program (in
  inference mode, ``train=False``) uses as the weight of a linear op."""
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  return effective.prunable_paths(
    model, tracing.example_input(input_shape), variables=variables, apply_kwargs={"train": False}
  )


def create_train_state(
  model: flax.linen.Module,
  key: jax.Array,
  input_shape,
  config,
  masks: PyTree = None,
  params: PyTree = None,
  straight_through: bool = False,
) -> TrainState:
  """Initializes the model and builds the optimizer (once); pruned weights start at 0.

  Weight decay applies to the prunable set: the leaves of ``masks`` when given, else
  the weights the model's traced program uses in a linear op (``x @ w``, Dense, Conv,
  whatever they are called; :func:`sparsejax.effective.prunable_paths`).

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=...)``.
    key: PRNG key for ``model.init``.
    input_shape: one example's shape without the batch axis, e.g. (28, 28, 1) (a
      float32 input), or an example input's shape struct with its batch axis and dtype,
      e.g. ``jax.ShapeDtypeStruct((1, T), jnp.int32)`` for a language model's tokens.
    config: a ``TrainConfig`` (for the optimizer).
    masks: mask tree (bool at prunable leaves, None elsewhere) or None (dense).
    params: initial parameters (e.g. the ones a pruner scored); default: fresh
      ``model.init(key, ...)`` parameters. Batch-norm statistics are always fresh.
    straight_through: the masks mask only the forward pass (STE training).

  Returns:
    A :class:`TrainState` at step 0 with ``params * masks`` (``params`` as they are
    with ``straight_through``: the dense weights train, the forward pass is masked).
  """
  example = tracing.example_input(input_shape)
  x = jnp.zeros(example.shape, example.dtype)
  if params is None:
    variables = _init_variables(key, x, model=model)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
  else:
    shapes = jax.eval_shape(functools.partial(model.init, train=False), key, x)
    _check_same_structure(params, shapes["params"])
    params = jax.tree.map(jnp.asarray, params)
    batch_stats = _init_batch_stats(params, x, model=model)
  if masks is not None:
    masks = jax.tree.map(jnp.asarray, masks)
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    # the mask tree is the prunable set, and every leaf of it a linear op's weight
    tracing.trace(model, example, variables=variables, apply_kwargs={"train": False}).masked(masks)
    if not straight_through:
      params = masks_lib.apply(params, masks)
    prunable = masks
  else:
    prunable = prunable_paths(model, input_shape, params, batch_stats)
  tx = make_masked_optimizer(config, prunable, straight_through)
  # The optimizer is the recipe; the masks are its state.
  opt_state = optim.replace_masks(tx.init(params), masks)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    tx=tx,
    straight_through=bool(straight_through),
  )
