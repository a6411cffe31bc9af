"""The train and eval steps: pure functions of (state, batch), jitted with the model and
the dataset spec static; the optimizer is the state's ``tx``.

Two kinds of data, told apart by the (static) spec: images ({"image": uint8 [B, H, W,
C], "label": int32 [B]}; cross-entropy of the logits [B, classes]) and byte-level text
({"tokens": uint8 [B, T + 1]}; next-token cross-entropy of the logits [B, T, 256] of
``tokens[:, :-1]`` against ``tokens[:, 1:]``, averaged over the B T positions, no
augmentation). A language model's held-out loss L (nats per byte) is also reported as
bits per byte L / ln 2 and perplexity exp(L) (:func:`language_model_metrics`).

Per-step augmentation runs on the device with ``fold_in(key, state.step)``, so a run
resumed at step s sees the inputs an uninterrupted run would. Batch norm uses batch
statistics in training and its running averages at evaluation (standard practice; the
paper's code keeps it in training mode at evaluation, so test accuracies here may differ
slightly from the paper's).
"""

from __future__ import annotations

import functools
import math

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


def dataset_spec(spec) -> data.DatasetSpec | data.TextSpec:
  """A DatasetSpec (or TextSpec) from a spec, a dataset name or a ModelSpec (its .dataset)."""
  if isinstance(spec, (data.DatasetSpec, data.TextSpec)):
    return spec
  if isinstance(spec, str):
    return data.get_spec(spec)
  if hasattr(spec, "dataset"):
    return data.get_spec(spec.dataset)
  raise ValueError(
    f"spec={spec!r} must be a data.DatasetSpec, a dataset name or a models.ModelSpec."
  )


def is_text(spec) -> bool:
  """Whether ``spec`` (a spec, dataset name or ModelSpec) is a byte-level text dataset."""
  return isinstance(dataset_spec(spec), data.TextSpec)


def language_model_metrics(loss: float) -> dict:
  """A language model's held-out mean next-byte loss L (nats) in two more units:
  {"bits_per_byte": L / ln 2, "perplexity": exp(L)} (per byte: the tokens are bytes)."""
  return {"bits_per_byte": loss / math.log(2.0), "perplexity": math.exp(min(loss, 700.0))}


def _inputs_targets(batch, key, step, spec, train: bool):
  """The model's input and the targets of a batch: normalized images (augmented with
  ``fold_in(key, step)`` in training) and labels [B]; or, for text, the int32 inputs
  ``tokens[:, :-1]`` and next tokens ``tokens[:, 1:]`` [B, T] (no augmentation)."""
  if isinstance(spec, data.TextSpec):
    tokens = batch["tokens"].astype(jnp.int32)
    return tokens[:, :-1], tokens[:, 1:]
  key = jax.random.fold_in(key, step) if train else None
  return data.preprocess(key, batch["image"], spec, train=train), batch["label"]


def _loss_and_grads(state: TrainState, batch, key, *, model, spec):
  """Mean cross-entropy of the augmented batch of step ``state.step`` (batch
  statistics; text: over every position of every window), its gradient with respect to
  the (dense) params, logits, the new batch statistics and the targets. With
  ``state.straight_through`` the forward pass uses w * m."""
  x, labels = _inputs_targets(batch, key, state.step, spec, train=True)

  def loss_fn(params):
    if state.straight_through:
      params = optim.straight_through(params, state.masks)
    logits, updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates.get("batch_stats", state.batch_stats))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, grads, logits, batch_stats, labels


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def forward_backward(state: TrainState, batch, key, *, model, spec):
  """The forward and backward pass of train step ``state.step`` (:func:`_loss_and_grads`):
  (loss, dL/dw at every weight, pruned ones included, logits, batch statistics,
  targets). Its gradient is RigL's growth criterion, and :func:`apply_step` finishes
  the step with it."""
  return _loss_and_grads(state, batch, key, model=model, spec=spec)


def _apply(state: TrainState, outputs) -> tuple[TrainState, dict]:
  """The optimizer half of a train step, from the outputs of its forward and backward
  pass (the masks are in ``state.opt_state``: ``state.tx`` masks the gradients and
  the updates)."""
  loss, grads, logits, batch_stats, labels = outputs
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return new_state, {"loss": loss, "accuracy": accuracy}


@jax.jit
def apply_step(state: TrainState, outputs) -> tuple[TrainState, dict]:
  """Train step ``state.step`` finished with the ``outputs`` of :func:`forward_backward`
  (jitted): a mask update between the two halves has changed the masks in
  ``state.opt_state``, and the step's gradient is applied under the new masks."""
  return _apply(state, outputs)


def jit_step(fn, static_argnames: tuple[str, ...]) -> dict:
  """{False: ``fn`` jitted, True: ``fn`` jitted with its first argument, the train
  state, donated}: the donated program writes the new state into the old state's
  buffers (XLA updates parameters and optimizer state in place, no copy), and the
  state passed in is deleted. A buffer something else still reads (a NumPy view of it
  on a CPU) is not donated: that step copies as the plain one does."""
  return {
    donate: jax.jit(fn, static_argnames=static_argnames, donate_argnums=(0,) if donate else ())
    for donate in (False, True)
  }


def donating(donate) -> bool:
  """``donate`` checked: a bool (a truthy string would delete a state silently)."""
  if not isinstance(donate, (bool, np.bool_)):
    raise ValueError(f"donate={donate!r} must be True or False.")
  return bool(donate)


def _train_step_fn(state: TrainState, batch, key, *, model, spec):
  return _apply(state, _loss_and_grads(state, batch, key, model=model, spec=spec))


_train_step = jit_step(_train_step_fn, ("model", "spec"))


def train_step(
  state: TrainState, batch, key: jax.Array, *, model, spec, config=None, donate: bool = False
) -> tuple[TrainState, dict]:
  """One SGD step on a uint8 batch; jitted with ``model`` and ``spec`` static.

  Normalizes and augments on the device with ``fold_in(key, state.step)`` (pass the
  run's key, the same at every step), computes the mean cross-entropy with batch
  statistics and applies ``state.tx`` (gradients and updates masked by the masks in
  the state): pruned weights are exactly 0 after every step.

  Args:
    state: :class:`TrainState` (replicated when data parallel).
    batch: {"image": uint8 [B, H, W, C], "label": int32 [B]} (sharded along B), or
      {"tokens": uint8 [B, T + 1]} for a text dataset (next-token loss, module docstring).
    key: the run's PRNG key.
    model: the Flax module (hashable).
    spec: a ``data.DatasetSpec``, dataset name or ``models.ModelSpec``.
    config: unused (the optimizer is ``state.tx``, built by
      :func:`create_train_state`); accepted so that older calls keep working.
    donate: reuse ``state``'s buffers for the new state (:func:`jit_step`; LeNet-300-100
      steps about 10% faster on a CPU, docs/benchmarks.md) and delete
      ``state``: for a loop that keeps only the new state (``state, m =
      train_step(state, ..., donate=True)``) and a first state it owns (a copy of
      arrays the caller keeps, such as its masks).

  Returns:
    (new state, {"loss": float32 [], "accuracy": float32 []}) for this batch (text:
    next-token accuracy over the B T positions), as device arrays (nothing is fetched
    to the host).
  """
  del config
  return _train_step[donating(donate)](state, batch, key, model=model, spec=dataset_spec(spec))


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _eval_step(state: TrainState, batch, *, model, spec):
  x, labels = _inputs_targets(batch, None, None, spec, train=False)
  # Masked weights are 0 already, except the dense weights of straight-through training.
  params = state.params if state.masks is None else masks_lib.apply(state.params, state.masks)
  logits = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=False)
  weight = batch["mask"].astype(jnp.float32)  # [B], or [B, T] for text
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {
    "loss": jnp.sum(loss * weight),
    "correct": jnp.sum(correct * weight),
    "count": jnp.sum(weight),
  }


def eval_step(state: TrainState, batch, *, model, spec) -> dict:
  """Summed metrics of one padded eval batch (running batch-norm statistics).

  Args:
    batch: {"image": uint8 [B, H, W, C], "label": int32 [B], "mask": bool [B]} as
      :func:`sparsejax.data.eval_batches` yields, or {"tokens": uint8 [B, T + 1],
      "mask": bool [B, T]} as :func:`sparsejax.data.text_eval_batches` yields; padding
      (mask False) counts 0.

  Returns:
    {"loss": sum of cross-entropies, "correct": number correct, "count": number of
    real examples (text: predicted bytes)}, float32 scalars on the device.
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


def evaluate_text(
  state: TrainState,
  corpus: np.ndarray,
  *,
  model,
  spec,
  context: int,
  batch_size: int = 64,
  mesh: Mesh | None = None,
) -> tuple[float, float]:
  """Mean next-byte cross-entropy (nats per byte) and next-byte accuracy over a whole
  text split: every byte after the first is predicted once, from the up to ``context``
  bytes before it in its window (:func:`sparsejax.data.text_eval_batches`).

  Args:
    corpus: uint8 [N] on the host.
    context: T, the model's input length.
    batch_size: windows per batch, rounded up to a multiple of the device count.
    mesh: the data-parallel mesh; default: the mesh ``state`` lives on.

  Returns:
    (loss, accuracy) as Python floats (:func:`language_model_metrics` gives bits per
    byte and perplexity).
  """
  mesh = mesh_of(state.params) if mesh is None else mesh
  tspec = dataset_spec(spec)
  if not isinstance(tspec, data.TextSpec):
    raise ValueError(f"spec={spec!r} is not a text dataset; evaluate images with evaluate.")
  windows = data.num_eval_windows(len(corpus), context)
  size = mesh.size
  batch_size = min(-(-int(batch_size) // size) * size, -(-windows // size) * size)
  totals = None
  for batch in data.text_eval_batches(
    corpus, context, batch_size, sharding=NamedSharding(mesh, P(DATA_AXIS))
  ):
    sums = _eval_step(state, batch, model=model, spec=tspec)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return float(totals["loss"]) / count, float(totals["correct"]) / count
