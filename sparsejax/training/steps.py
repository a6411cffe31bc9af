"""The train and eval steps: pure functions of (state, batch), jitted with the model and
the dataset spec static; the optimizer is the state's ``tx``.

Per-step augmentation runs on the device with ``fold_in(key, state.step)``, so a run
resumed at step s sees the inputs an uninterrupted run would. Batch norm uses batch
statistics in training and its running averages at evaluation (standard practice; the
paper's code keeps it in training mode at evaluation, so test accuracies here may differ
slightly from the paper's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax import data, optim
from sparsejax import masks as masks_lib
from sparsejax.training.mesh import DATA_AXIS, mesh_of
from sparsejax.training.state import TrainState


def dataset_spec(spec) -> data.DatasetSpec:
  """A DatasetSpec from a DatasetSpec, a dataset name or a ModelSpec (its .dataset)."""
  if isinstance(spec, data.DatasetSpec):
    return spec
  if isinstance(spec, str):
    return data.get_spec(spec)
  if hasattr(spec, "dataset"):
    return data.get_spec(spec.dataset)
  raise ValueError(
    f"spec={spec!r} must be a data.DatasetSpec, a dataset name or a models.ModelSpec."
  )


def _loss_and_grads(state: TrainState, batch, key, *, model, spec):
  """Mean cross-entropy of the augmented batch of step ``state.step`` (batch
  statistics), its gradient with respect to the (dense) params, logits and the new
  batch statistics. With ``state.straight_through`` the forward pass uses w * m."""
  x = data.preprocess(jax.random.fold_in(key, state.step), batch["image"], spec, train=True)
  labels = batch["label"]

  def loss_fn(params):
    if state.straight_through:
      params = optim.straight_through(params, state.masks)
    logits, updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates.get("batch_stats", state.batch_stats))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, grads, logits, batch_stats


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def dense_grads(state: TrainState, batch, key, *, model, spec):
  """dL/dw at every weight, pruned ones included (RigL's growth criterion)."""
  return _loss_and_grads(state, batch, key, model=model, spec=spec)[1]


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _train_step(state: TrainState, batch, key, *, model, spec):
  loss, grads, logits, batch_stats = _loss_and_grads(state, batch, key, model=model, spec=spec)
  # The masks are in opt_state: state.tx masks the gradients and the updates.
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return new_state, {"loss": loss, "accuracy": accuracy}


def train_step(
  state: TrainState, batch, key: jax.Array, *, model, spec, config=None
) -> tuple[TrainState, dict]:
  """One SGD step on a uint8 batch; jitted with ``model`` and ``spec`` static.

  Normalizes and augments on the device with ``fold_in(key, state.step)`` (pass the
  run's key, the same at every step), computes the mean cross-entropy with batch
  statistics and applies ``state.tx`` (gradients and updates masked by the masks in
  the state): pruned weights are exactly 0 after every step.

  Args:
    state: :class:`TrainState` (replicated when data parallel).
    batch: {"image": uint8 [B, H, W, C], "label": int32 [B]} (sharded along B).
    key: the run's PRNG key.
    model: the Flax module (hashable).
    spec: a ``data.DatasetSpec``, dataset name or ``models.ModelSpec``.
    config: unused (the optimizer is ``state.tx``, built by
      :func:`create_train_state`); accepted so that older calls keep working.

  Returns:
    (new state, {"loss": float32 [], "accuracy": float32 []}) for this batch, as
    device arrays (nothing is fetched to the host).
  """
  del config
  return _train_step(state, batch, key, model=model, spec=dataset_spec(spec))


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _eval_step(state: TrainState, batch, *, model, spec):
  x = data.preprocess(None, batch["image"], spec, train=False)
  # Masked weights are 0 already, except the dense weights of straight-through training.
  params = state.params if state.masks is None else masks_lib.apply(state.params, state.masks)
  logits = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=False)
  weight = batch["mask"].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {
    "loss": jnp.sum(loss * weight),
    "correct": jnp.sum(correct * weight),
    "count": jnp.sum(weight),
  }


def eval_step(state: TrainState, batch, *, model, spec) -> dict:
  """Summed metrics of one padded eval batch (running batch-norm statistics).

  Args:
    batch: {"image": uint8 [B, H, W, C], "label": int32 [B], "mask": bool [B]} as
      :func:`sparsejax.data.eval_batches` yields; padding (mask False) counts 0.

  Returns:
    {"loss": sum of cross-entropies, "correct": number correct, "count": number of
    real examples}, float32 scalars on the device.
  """
  return _eval_step(state, batch, model=model, spec=dataset_spec(spec))


def evaluate(
  state: TrainState,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  model,
  spec,
  batch_size: int = 1000,
  mesh: Mesh | None = None,
) -> tuple[float, float]:
  """Mean cross-entropy and accuracy over a whole split (running BN statistics).

  Args:
    images: uint8 [N, H, W, C] on the host; labels: int32 [N].
    batch_size: rounded up to a multiple of the device count; the last batch is
      padded and masked.
    mesh: the data-parallel mesh; default: the mesh ``state`` lives on.

  Returns:
    (loss, accuracy) as Python floats.
  """
  mesh = mesh_of(state.params) if mesh is None else mesh
  n = len(images)
  if n == 0:
    raise ValueError("images is empty; evaluation needs at least one example.")
  size = mesh.size
  batch_size = min(-(-int(batch_size) // size) * size, -(-n // size) * size)
  dspec = dataset_spec(spec)
  totals = None
  for batch in data.eval_batches(
    images, labels, batch_size, sharding=NamedSharding(mesh, P(DATA_AXIS))
  ):
    sums = _eval_step(state, batch, model=model, spec=dspec)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return float(totals["loss"]) / count, float(totals["correct"]) / count
