"""Masked training with Optax: schedules, train/eval steps, data parallelism, resume.

The training recipe of method.md section 5: SGD with momentum, a piecewise-constant
learning rate, L2 on Dense/Conv kernels only, cross-entropy, per-step augmentation
on the device. A sparse network is trained by keeping its pruned weights at
exactly zero with :func:`sparsejax.optim.with_masks`: gradients are masked before the
optimizer (its state stays 0 at pruned weights) and so are the updates after it, so
neither weight decay nor momentum (even momentum carried over from dense training)
can revive a pruned weight. The masks live in the optimizer state.

Hyperparameters come in a :class:`TrainConfig` (the paper's per-network values are
the experiment configs under ``experiments/configs/``).

Batch norm uses batch statistics in training and its running averages at
evaluation (standard practice; :func:`eval_step`, :func:`evaluate`). The paper's
code keeps batch norm in training mode even at evaluation, i.e. normalizes each
test batch by its own statistics (method.md section 5); test accuracies here use
running statistics instead and may differ slightly from the paper's for that reason.

Data parallelism: a 1-D :class:`jax.sharding.Mesh` over the devices (axis
``'data'``); every batch is sharded along its first axis and the train state is
replicated; ``jax.jit`` partitions the step (gradients and batch-norm statistics
are reduced over the whole global batch, so the result equals one device's up to
float summation order). One device runs the same code. Multi-host: after
``jax.distributed.initialize`` in every process (experiments.distributed), the
mesh spans all processes' devices, every process runs the same :func:`train` call
and gathers only its block of rows of each global batch
(:func:`sparsejax.data.process_rows`); the state stays replicated on every device.

Reproducibility: batch ``s`` comes from :func:`sparsejax.data.batch_indices`
(a function of ``(seed, s)``) and the augmentation key of step ``s`` is
``fold_in(key, s)``, so a run resumed from a checkpoint at step ``s`` sees the
same inputs as an uninterrupted run and ends with the same parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax import data, optim
from sparsejax import masks as masks_lib

PyTree = Any
DATA_AXIS = "data"


# ----------------------------------------------------------------- config


def weight_decay_from_keras_l2(l2: float) -> float:
  """Gradient coefficient equivalent to a Keras ``l2(l2)`` kernel regularizer: 2 * l2."""
  return 2.0 * l2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How one network is trained (hashable: usable as a static jit argument).

  Attributes:
    dataset: dataset name in :data:`sparsejax.data.DATASETS`.
    batch_size: examples per step (global, over all devices).
    train_steps: optimizer steps of a full run.
    learning_rate: initial learning rate.
    momentum: SGD (heavy-ball) momentum; 0 for plain SGD.
    weight_decay: L2 coefficient on the gradient of Dense/Conv kernels (see the
      module docstring for the mapping from the paper's Keras L2).
    decay_boundaries: increasing fractions in (0, 1] of ``train_steps`` at which
      the learning rate is multiplied by ``decay_factor``.
    decay_factor: multiplier at each boundary.
    snip_batch_size: examples in the batch that SNIP-like pruners score on.
  """

  dataset: str
  batch_size: int
  train_steps: int
  learning_rate: float
  momentum: float
  weight_decay: float
  decay_boundaries: tuple[float, ...]
  decay_factor: float = 0.1
  snip_batch_size: int = 100

  def __post_init__(self):
    for name in ("batch_size", "train_steps", "snip_batch_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    for name in ("learning_rate", "decay_factor"):
      value = getattr(self, name)
      if not value > 0:
        raise ValueError(f"{name}={value!r} must be positive.")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"momentum={self.momentum!r} must be in [0, 1).")
    if not self.weight_decay >= 0.0:
      raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0.")
    bounds = tuple(float(b) for b in self.decay_boundaries)
    if any(not 0.0 < b <= 1.0 for b in bounds) or list(bounds) != sorted(bounds):
      raise ValueError(
        f"decay_boundaries={self.decay_boundaries!r} must be increasing "
        "fractions of the run in (0, 1]."
      )
    object.__setattr__(self, "decay_boundaries", bounds)  # Lists -> tuple: hashable.

  def boundary_steps(self) -> tuple[int, ...]:
    """The decay boundaries in steps: round(fraction * train_steps)."""
    return tuple(int(round(b * self.train_steps)) for b in self.decay_boundaries)


# ----------------------------------------------------------------- optimizer


def make_schedule(config) -> optax.Schedule:
  """Piecewise-constant learning rate: ``learning_rate * decay_factor ** k`` after
  k boundaries.

  Boundary i is at step ``round(config.decay_boundaries[i] * config.train_steps)``;
  the new rate applies from that step on (the update made at step b, counting
  from 0, uses the decayed rate; Keras' ``PiecewiseConstantDecay`` switches one
  step later). Boundaries that round to the same step compound.
  """
  scales: dict[int, float] = {}
  for fraction in config.decay_boundaries:
    boundary = int(round(fraction * config.train_steps))
    scales[boundary] = scales.get(boundary, 1.0) * config.decay_factor
  return optax.piecewise_constant_schedule(config.learning_rate, scales)


def kernel_mask(params: PyTree) -> PyTree:
  """Bool tree shaped like ``params``: True at Dense/Conv kernels (what L2 applies to)."""

  def is_kernel(path, leaf):  # replaced by the prunable set in the training package
    return masks_lib.path_str(path[-1:]) == "kernel" and jnp.ndim(leaf) >= 2

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD with momentum, the paper's schedule and L2 on kernels only.

  ``chain(add_decayed_weights(weight_decay, mask=kernels), sgd(schedule, momentum))``:
  the update is ``-lr_t * m_t`` with ``m_t = momentum * m_{t-1} + g_t + wd * w`` at
  kernels (``g_t`` elsewhere). Decay enters the momentum like a loss term does, so
  ``wd`` is the gradient of an L2 penalty ``wd / 2 * sum(w ** 2)``. The paper's
  Keras ``l2(c)`` regularizer adds ``c * sum(w ** 2)`` to the loss, hence
  ``wd = 2c`` (``experiments.configs`` stores 2 x 5e-4 for the LeNets and 2 x 1e-4
  for VGG/ResNet). Biases and batch-norm scales/offsets are not decayed.

  Args:
    config: a ``TrainConfig`` (learning_rate, momentum, weight_decay,
      decay_boundaries, decay_factor, train_steps).
  """
  momentum = config.momentum if config.momentum else None
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay, mask=kernel_mask),
    optax.sgd(make_schedule(config), momentum=momentum),
  )


def make_masked_optimizer(
  config, masks: PyTree = None, straight_through: bool = False
) -> optax.GradientTransformation:
  """:func:`make_optimizer` wrapped in :func:`sparsejax.optim.with_masks` (masks None:
  dense). The train step reads the masks from the optimizer state. With
  ``straight_through`` the masks only mask the forward pass (STE training)."""
  return optim.with_masks(make_optimizer(config), masks, straight_through=straight_through)


# ---------------------------------------------------------------- train state


@struct.dataclass
class TrainState:
  """Everything a step reads and writes (a pytree; checkpointed as a whole).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the model's 'params' collection; pruned kernel entries are exactly 0.
    batch_stats: the model's 'batch_stats' collection ({} without batch norm).
    opt_state: state of :func:`make_masked_optimizer`: a
      :class:`sparsejax.optim.WithMasksState` holding the masks (bool at kernels, None
      elsewhere; None to train densely) and the momentum trace and schedule count.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState

  @property
  def masks(self) -> PyTree:
    """The masks in the optimizer state (None for dense training)."""
    return optim.get_masks(self.opt_state)


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


def create_train_state(
  model: flax.linen.Module,
  key: jax.Array,
  input_shape: Sequence[int],
  config,
  masks: PyTree = None,
  params: PyTree = None,
  straight_through: bool = False,
) -> TrainState:
  """Initializes the model and the optimizer; pruned weights start at exactly 0.

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=...)``.
    key: PRNG key for ``model.init``.
    input_shape: one example's shape without the batch axis, e.g. (28, 28, 1).
    config: a ``TrainConfig`` (for the optimizer).
    masks: mask tree (bool at prunable kernels, None elsewhere) or None (dense).
    params: initial parameters (e.g. the ones a pruner scored); default: fresh
      ``model.init(key, ...)`` parameters. Batch-norm statistics are always fresh.

  Returns:
    A :class:`TrainState` at step 0 with ``params * masks`` (``params`` as they are
    with ``straight_through``: the dense weights train, the forward pass is masked).
  """
  x = jnp.zeros((1,) + tuple(int(d) for d in input_shape), jnp.float32)
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
    masks_lib.validate(masks, params)
    if not straight_through:
      params = masks_lib.apply(params, masks)
  tx = make_masked_optimizer(config, masks, straight_through)
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params)
  )


# ----------------------------------------------------------------- steps


def _dataset_spec(spec) -> data.DatasetSpec:
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


def _loss_and_grads(state: TrainState, batch, key, *, model, spec, straight_through):
  """Mean cross-entropy of the augmented batch of step ``state.step`` (batch
  statistics), its gradient with respect to the (dense) params, logits and the new
  batch statistics. With ``straight_through`` the forward pass uses w * m."""
  x = data.preprocess(jax.random.fold_in(key, state.step), batch["image"], spec, train=True)
  labels = batch["label"]

  def loss_fn(params):
    if straight_through:
      params = optim.straight_through(params, state.masks)
    logits, updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates.get("batch_stats", state.batch_stats))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, grads, logits, batch_stats


@functools.partial(jax.jit, static_argnames=("model", "spec", "straight_through"))
def _dense_grads(state: TrainState, batch, key, *, model, spec, straight_through=False):
  """dL/dw at every weight, pruned ones included (RigL's growth criterion)."""
  return _loss_and_grads(
    state, batch, key, model=model, spec=spec, straight_through=straight_through
  )[1]


@functools.partial(jax.jit, static_argnames=("model", "spec", "config", "straight_through"))
def _train_step(state: TrainState, batch, key, *, model, spec, config, straight_through=False):
  loss, grads, logits, batch_stats = _loss_and_grads(
    state, batch, key, model=model, spec=spec, straight_through=straight_through
  )
  labels = batch["label"]
  # The masks are in opt_state: gradients and updates are masked there.
  updates, opt_state = make_masked_optimizer(config, None, straight_through).update(
    grads, state.opt_state, state.params
  )
  params = optax.apply_updates(state.params, updates)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  return new_state, {"loss": loss, "accuracy": accuracy}


def train_step(
  state: TrainState, batch, key: jax.Array, *, model, spec, config
) -> tuple[TrainState, dict]:
  """One SGD step on a uint8 batch; jitted with ``model``, ``spec``, ``config`` static.

  Normalizes and augments on the device with ``fold_in(key, state.step)`` (pass the
  run's key, the same at every step), computes the mean cross-entropy with batch
  statistics and applies :func:`make_masked_optimizer`'s update (gradients and
  updates masked by the masks in the state): pruned weights are exactly 0 after
  every step.

  Args:
    state: :class:`TrainState` (replicated when data parallel).
    batch: {"image": uint8 [B, H, W, C], "label": int32 [B]} (sharded along B).
    key: the run's PRNG key.
    model: the Flax module (hashable).
    spec: a ``data.DatasetSpec``, dataset name or ``models.ModelSpec``.
    config: a hashable ``TrainConfig``.

  Returns:
    (new state, {"loss": float32 [], "accuracy": float32 []}) for this batch, as
    device arrays (nothing is fetched to the host).
  """
  return _train_step(state, batch, key, model=model, spec=_dataset_spec(spec), config=config)


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
  return _eval_step(state, batch, model=model, spec=_dataset_spec(spec))


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """1-D mesh with axis 'data' over ``devices`` (default: ``jax.devices()``, every
  process's devices, grouped by process so that each process feeds one block of
  rows of a batch; one process: its local devices)."""
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  if not devices:
    raise ValueError("devices is empty; give at least one device.")
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicate(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
  """``tree`` copied to every device of ``sharding`` (a replicated sharding).

  ``jax.device_put`` when this process holds all of the devices; otherwise (several
  processes) each process passes the same values, and its host copy fills its own
  devices' shards of one global array (PRNG keys through their key data)."""
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def put(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def _mesh_of(state: TrainState) -> Mesh:
  sharding = jax.tree.leaves(state.params)[0].sharding
  if isinstance(sharding, NamedSharding):
    return sharding.mesh
  return make_mesh(sorted(sharding.device_set, key=lambda d: d.id))


def _check_divisible(batch_size: int, mesh: Mesh, name: str) -> None:
  if batch_size % mesh.size:
    raise ValueError(
      f"{name}={batch_size} must be divisible by the number of devices "
      f"({mesh.size}) to shard the batch."
    )


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
  mesh = _mesh_of(state) if mesh is None else mesh
  n = len(images)
  if n == 0:
    raise ValueError("images is empty; evaluation needs at least one example.")
  size = mesh.size
  batch_size = min(-(-int(batch_size) // size) * size, -(-n // size) * size)
  dspec = _dataset_spec(spec)
  totals = None
  for batch in data.eval_batches(
    images, labels, batch_size, sharding=NamedSharding(mesh, P(DATA_AXIS))
  ):
    sums = _eval_step(state, batch, model=model, spec=dspec)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return float(totals["loss"]) / count, float(totals["correct"]) / count


# ------------------------------------------------------------ moving masks


@jax.jit
def _update_stats(old: PyTree, new: PyTree, effective_masks: PyTree) -> dict:
  """Kept, dropped and grown weights of a mask update (and, with effective masks,
  active weights and grown weights that are not active), as int32 scalars."""
  count = lambda fn, *trees: sum(
    jnp.sum(fn(*xs), dtype=jnp.int32) for xs in zip(*(masks_lib.mask_leaves(t) for t in trees))
  )
  stats = {
    "kept": count(lambda n: n, new),
    "dropped": count(lambda o, n: o & ~n, old, new),
    "grown": count(lambda o, n: n & ~o, old, new),
  }
  if effective_masks is not None:
    stats["active"] = count(lambda e: e, effective_masks)
    stats["grown_dead"] = count(lambda o, n, e: n & ~o & ~e, old, new, effective_masks)
  return stats


class MaskUpdates:
  """Runs a :mod:`sparsejax.dynamic` updater inside :func:`train` and logs each update.

  At an update step s (before the optimizer step s) the updater computes new masks
  from the current params (and, for RigL, the dense gradient on batch s), the masks
  in the optimizer state are replaced (no recompilation) and dropped weights are set
  to 0. Each update appends a record: step, kept weights, dropped and grown weights,
  direct compression and, with ``track_effective``, effective compression, active
  units, dead kept weights (kept but inactive) and grown weights dead on arrival.
  """

  def __init__(self, updater, *, model, spec, input_shape, step_key, track_effective: bool = False):
    self.updater = updater
    self.model, self.spec, self.input_shape = model, spec, tuple(input_shape)
    self.step_key = step_key
    self.track_effective = track_effective
    self.records: list[dict] = []
    self._sweep = None
    if getattr(updater, "regrow", "any") == "active":
      from sparsejax import effective

      self._sweep = effective.connectivity_sweep(model, self.input_shape, units=False)

  def __call__(self, state: TrainState, batch, step: int) -> TrainState:
    from sparsejax import dynamic, effective

    u, old = self.updater, state.masks
    key = jax.random.fold_in(jax.random.fold_in(self.step_key, step), 1)
    grads = (
      _dense_grads(
        state,
        batch,
        self.step_key,
        model=self.model,
        spec=self.spec,
        straight_through=u.straight_through,
      )
      if u.needs_grads
      else None
    )
    extra = {"sweep": self._sweep} if self._sweep is not None else {}
    if getattr(u, "target", "direct") == "effective":
      new = u.update_effective(
        state.params, grads, old, step, key, model=self.model, input_shape=self.input_shape, **extra
      )
    else:
      new = u.update(state.params, grads, old, jnp.int32(step), key, **extra)
    new = jax.tree.map(lambda m, ref: replicate(m, ref.sharding), new, old)
    params = state.params if u.straight_through else dynamic.apply_update(state.params, new)
    state = state.replace(params=params, opt_state=optim.replace_masks(state.opt_state, new))
    total = masks_lib.count(new)[1]
    effective_masks = None
    if self.track_effective:
      conn = effective.connectivity(self.model, new, self.input_shape)
      effective_masks = conn.masks
    stats = jax.device_get(_update_stats(old, new, effective_masks))  # one transfer
    kept = int(stats["kept"])
    record = {
      "step": int(step),
      "kept": kept,
      "dropped": int(stats["dropped"]),
      "grown": int(stats["grown"]),
      "direct_compression": total / kept if kept else float("inf"),
    }
    if self.track_effective:
      active = int(stats["active"])
      record.update(
        effective_compression=total / active if active else float("inf"),
        dead_kept=kept - active,
        grown_dead=int(stats["grown_dead"]),
        active_units=int(sum(conn.active_units.values())),
        total_units=int(sum(conn.total_units.values())),
      )
    self.records.append(record)
    logging.info(
      "mask update at step %d: %s",
      step,
      ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in record.items()
        if k != "step"
      ),
    )
    return state


# ------------------------------------------------------------------- loop


def _split_history(saved: list) -> tuple[list, list]:
  """(evaluations, mask-update records) of a checkpoint's history item."""
  return (
    [h for h in saved if "mask_update" not in h],
    [h["mask_update"] for h in saved if "mask_update" in h],
  )


class DivergedError(FloatingPointError):
  """Training met a non-finite loss or parameter; ``step`` is the first step seen so.

  Raised by :func:`train` after it has stopped cleanly (data pipeline closed, pending
  checkpoints finished); no checkpoint holding non-finite values is ever saved."""

  def __init__(self, step: int, what: str):
    super().__init__(
      f"training diverged at step {step}: {what}; lower config.learning_rate or check the inputs."
    )
    self.step = step
    self.what = what


class CorruptCheckpointError(RuntimeError):
  """A checkpoint that cannot be read or whose checksum does not match."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"checkpoint at step {step} is unusable: {reason}")
    self.step = step
    self.reason = reason


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns.

  Attributes:
    history: [{"step", "test_loss", "test_accuracy"}] at every evaluation (those of
      earlier, resumed-from segments included).
    final_test_loss, final_test_accuracy: at the last step.
    steps_per_second: training steps per second in this call, excluding the first
      step (compilation), evaluations and checkpoints (nan if fewer than 2 steps).
    wall_time: seconds spent in this call.
    start_step: the step this call started from (> 0 after a resume).
    state: the final :class:`TrainState` (replicated over the mesh).
    mask_updates: the records of :class:`MaskUpdates` (empty without an updater),
      those of earlier, resumed-from segments included.
  """

  history: list[dict]
  final_test_loss: float
  final_test_accuracy: float
  steps_per_second: float
  wall_time: float
  start_step: int
  state: TrainState
  mask_updates: list = dataclasses.field(default_factory=list)


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _meta(config, seed: int, key: jax.Array, masked: bool, updater=None) -> dict:
  """What must match for a checkpoint to be resumed (JSON-able)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  meta = {
    "config": {
      k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    },
    "seed": int(seed),
    "key": np.asarray(key).ravel().tolist(),
    "masked": bool(masked),
  }
  if updater is not None:
    meta["updater"] = repr(updater)
  return meta


def state_checksum(state: TrainState) -> str:
  """SHA-256 over every array of ``state`` (path, dtype, shape and bytes), as hex."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state)):
    if jnp.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _read_checkpoint(manager, step: int, state: TrainState):
  """(saved meta, state, history) of step ``step``, checksum verified.

  Raises:
    CorruptCheckpointError: any read failure (missing or truncated files, an empty
      step folder) or a checksum that does not match what was read.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(),
        checksum=ocp.args.JsonRestore(),
        state=ocp.args.StandardRestore(abstract),
        history=ocp.args.JsonRestore(),
      ),
    )
    saved_sum = restored["checksum"]["sha256"]
  except Exception as err:  # pylint: disable=broad-except
    # Orbax and TensorStore raise many types for damaged files; all mean "unusable".
    raise CorruptCheckpointError(step, f"{type(err).__name__}: {str(err)[:300]}") from err
  got = state_checksum(restored["state"])
  if got != saved_sum:
    raise CorruptCheckpointError(
      step, f"checksum {got[:12]}... does not match the saved {str(saved_sum)[:12]}..."
    )
  return restored["meta"], restored["state"], list(restored["history"])


def _set_aside(manager, step: int) -> str:
  """Moves a corrupted step folder out of the checkpoint folder (kept for inspection)."""
  workdir = os.fspath(manager.directory)
  aside = os.path.join(
    os.path.dirname(workdir.rstrip("/")), os.path.basename(workdir.rstrip("/")) + "-corrupt"
  )
  os.makedirs(aside, exist_ok=True)
  target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
  os.replace(os.path.join(workdir, str(step)), target)
  return target


def _restore(manager, step: int, state: TrainState, meta: dict):
  saved_meta, restored_state, history = _read_checkpoint(manager, step, state)
  if saved_meta != meta:
    differing = sorted(k for k in set(meta) | set(saved_meta) if meta.get(k) != saved_meta.get(k))
    raise ValueError(
      f"workdir={manager.directory!s} holds a run with different settings "
      f"({', '.join(differing)}): saved {saved_meta}, now {meta}. Use another "
      "workdir or the same settings to resume."
    )
  if state.masks is not None and "updater" not in meta:  # moving masks differ, rightly
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.masks, restored_state.masks)
    if not all(jax.tree.leaves(same)):
      raise ValueError(
        f"workdir={manager.directory!s} holds a run with different masks; "
        "use another workdir to train these masks."
      )
  return restored_state, history


def _restore_latest_intact(manager, state: TrainState, meta: dict, stop: int):
  """(state, history) of the newest checkpoint that reads back intact, or None.

  A checkpoint that cannot be read or fails its checksum is logged (naming its step),
  moved to ``<workdir>-corrupt/`` and the next older one is tried; with none left the
  run starts fresh. Checkpoints of other settings or masks raise ValueError."""
  for step in sorted(manager.all_steps(), reverse=True):
    if step > stop:
      raise ValueError(
        f"workdir={manager.directory!s} holds a checkpoint at step {step}, past num_steps={stop}."
      )
    try:
      restored = _restore(manager, step, state, meta)
    except CorruptCheckpointError as err:
      moved = _set_aside(manager, step)
      logging.error(
        "%s in %s; moved to %s, falling back to an earlier checkpoint.",
        err,
        manager.directory,
        moved,
      )
      manager.reload()
      continue
    if not bool(_all_finite(restored[0])):
      raise DivergedError(step, "the checkpoint holds non-finite values")
    logging.info("Resumed from %s at step %d.", manager.directory, step)
    return restored
  return None


def train(
  model: flax.linen.Module,
  spec,
  config,
  train_data: tuple[np.ndarray, np.ndarray],
  test_data: tuple[np.ndarray, np.ndarray],
  *,
  masks: PyTree = None,
  params: PyTree = None,
  seed: int = 0,
  key: jax.Array | None = None,
  workdir: str | None = None,
  checkpoint_every: int = 5000,
  keep_checkpoints: int = 3,
  eval_every: int = 5000,
  log_every: int = 500,
  num_steps: int | None = None,
  eval_batch_size: int = 1000,
  devices: Sequence[jax.Device] | None = None,
  prefetch: int = 2,
  updater=None,
  track_effective: bool = False,
) -> TrainResult:
  """Trains ``model`` (masked when ``masks`` is given), resuming from ``workdir``.

  Args:
    model: the Flax module.
    spec: a ``models.ModelSpec``, ``data.DatasetSpec`` or dataset name (decides the
      normalization and augmentation); None: ``config.dataset``.
    config: a ``TrainConfig``; its ``train_steps`` sets the learning-rate schedule.
    train_data, test_data: (uint8 images [N, H, W, C], int32 labels [N]) on the host.
    masks: mask tree for ``params`` (bool at prunable kernels, None elsewhere);
      None trains densely.
    params: initial parameters (those the masks were computed on); default: a
      fresh ``model.init``.
    seed: shuffling seed of the training batches (and the key when ``key`` is None).
    key: PRNG key; split into the init key and the augmentation key, which is
      folded with the step number. Default ``jax.random.key(seed)``.
    workdir: folder for Orbax checkpoints; a run resumes from its latest one.
      None: no checkpoints.
    checkpoint_every: save every this many steps (and at the end); the last
      ``keep_checkpoints`` are kept.
    eval_every: evaluate on ``test_data`` every this many steps (and at the end).
    log_every: log step, loss, accuracy, steps/s and ETA every this many steps
      (the only host round-trips of the loop besides evaluations).
    num_steps: stop once the state reaches this step (a total, not a count of new
      steps); default ``config.train_steps``.
    eval_batch_size: evaluation batch (rounded up to a multiple of the devices).
    devices: devices of the data-parallel mesh; default ``jax.devices()`` (with
      several processes: all of theirs; see the module docstring).
    prefetch: batches put on the devices ahead of the step.
    updater: a :mod:`sparsejax.dynamic` updater (GMP, SET, RigL, STE) that moves the
      masks during training (``masks`` are the starting masks; all ones for GMP from
      dense); see :class:`MaskUpdates`.
    track_effective: with an updater, log effective sparsity at every mask update.

  Returns:
    A :class:`TrainResult`.

  Checkpoints hold a SHA-256 of their state (:func:`state_checksum`); one that cannot
  be read or does not match is logged by step, moved to ``<workdir>-corrupt/``, and
  the next older one is used (with none left: a fresh start). A state with a NaN or
  infinite value is never saved.

  Raises:
    ValueError: batch size not divisible by the device count, bad arguments, or a
      workdir holding a run with other settings or masks.
    DivergedError: a non-finite training loss (checked every ``log_every`` steps) or
      a non-finite state when a checkpoint is due; raised after a clean stop.
  """
  start_time = time.perf_counter()
  dspec = _dataset_spec(config.dataset if spec is None else spec)
  train_images, train_labels = train_data
  test_images, test_labels = test_data
  for name, value in (
    ("checkpoint_every", checkpoint_every),
    ("eval_every", eval_every),
    ("log_every", log_every),
    ("keep_checkpoints", keep_checkpoints),
  ):
    if int(value) != value or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer.")
  stop = config.train_steps if num_steps is None else int(num_steps)
  if not 0 <= stop <= config.train_steps:
    raise ValueError(
      f"num_steps={num_steps!r} must be in [0, config.train_steps={config.train_steps}]."
    )
  if tuple(train_images.shape[1:]) != dspec.image_shape:
    raise ValueError(
      f"train_data images have shape {tuple(train_images.shape[1:])} per "
      f"example; dataset {dspec.name!r} has {dspec.image_shape}."
    )
  mesh = make_mesh(devices)
  _check_divisible(config.batch_size, mesh, "config.batch_size")
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

  key = jax.random.key(seed) if key is None else key
  init_key, step_key = jax.random.split(key)
  if updater is not None and masks is None:
    raise ValueError(
      "updater needs starting masks: pass masks= (e.g. masks.ones(params) "
      "for gradual magnitude pruning from a dense network)."
    )
  straight_through = bool(getattr(updater, "straight_through", False))
  state = create_train_state(
    model,
    init_key,
    dspec.image_shape,
    config,
    masks=masks,
    params=params,
    straight_through=straight_through,
  )
  state = replicate(state, replicated)
  step_key = replicate(step_key, replicated)
  mask_updates = (
    None
    if updater is None
    else MaskUpdates(
      updater,
      model=model,
      spec=dspec,
      input_shape=dspec.image_shape,
      step_key=step_key,
      track_effective=track_effective,
    )
  )

  meta = _meta(config, seed, key, masks is not None, updater)
  manager = (
    None
    if workdir is None
    else ocp.CheckpointManager(
      workdir, options=ocp.CheckpointManagerOptions(max_to_keep=keep_checkpoints, create=True)
    )
  )
  try:
    return _train_loop(
      model,
      dspec,
      config,
      state,
      step_key,
      meta,
      manager,
      seed=seed,
      stop=stop,
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      mesh=mesh,
      batch_sharding=batch_sharding,
      checkpoint_every=checkpoint_every,
      eval_every=eval_every,
      log_every=log_every,
      eval_batch_size=eval_batch_size,
      prefetch=prefetch,
      start_time=start_time,
      mask_updates=mask_updates,
    )
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()


def _train_loop(
  model,
  dspec,
  config,
  state,
  step_key,
  meta,
  manager,
  *,
  seed,
  stop,
  train_images,
  train_labels,
  test_images,
  test_labels,
  mesh,
  batch_sharding,
  checkpoint_every,
  eval_every,
  log_every,
  eval_batch_size,
  prefetch,
  start_time,
  mask_updates=None,
) -> TrainResult:
  history: list[dict] = []
  straight_through = bool(mask_updates is not None and mask_updates.updater.straight_through)
  if manager is not None and manager.all_steps():
    restored = _restore_latest_intact(manager, state, meta, stop)
    if restored is None:
      logging.error("No intact checkpoint left in %s: starting from step 0.", manager.directory)
    else:
      state, history = restored
      if mask_updates is not None:
        history, mask_updates.records = _split_history(history)

  def save(step: int) -> None:
    if manager is not None and manager.latest_step() != step:
      if not bool(_all_finite(state)):
        raise DivergedError(step, "non-finite parameters or optimizer state")
      saved = history + (
        [{"mask_update": r} for r in mask_updates.records] if mask_updates is not None else []
      )
      manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          history=ocp.args.JsonSave(saved),
          meta=ocp.args.JsonSave(meta),
          checksum=ocp.args.JsonSave({"sha256": state_checksum(state), "step": step}),
        ),
        force=True,
      )

  def run_eval(step: int) -> tuple[float, float]:
    loss, accuracy = evaluate(
      state,
      test_images,
      test_labels,
      model=model,
      spec=dspec,
      batch_size=eval_batch_size,
      mesh=mesh,
    )
    if not math.isfinite(loss):  # Infinite or NaN logits: nothing to report.
      raise DivergedError(step, f"test loss is {loss}")
    history.append({"step": step, "test_loss": loss, "test_accuracy": accuracy})
    logging.info("step %d/%d: test loss %.4f, test accuracy %.4f", step, stop, loss, accuracy)
    return loss, accuracy

  start = int(jax.device_get(state.step))
  logging.info(
    "Training %s on %s: steps %d -> %d of %d, batch %d over %d device(s).",
    type(model).__name__,
    dspec.name,
    start,
    stop,
    config.train_steps,
    config.batch_size,
    mesh.size,
  )
  side_time = 0.0  # Evaluations and checkpoints, excluded from steps/s.
  timed_from, timed_steps, train_time = 0.0, 0, 0.0
  final = None
  if start < stop:
    batches = data.train_batches(
      train_images,
      train_labels,
      config.batch_size,
      seed,
      start_step=start,
      prefetch=prefetch,
      num_steps=stop - start,
      sharding=batch_sharding,
    )
    window: list[dict] = []
    window_start = time.perf_counter()
    try:
      for step, batch in zip(range(start, stop), batches):
        if mask_updates is not None and mask_updates.updater.is_update_step(step):
          state = mask_updates(state, batch, step)
        state, metrics = _train_step(
          state,
          batch,
          step_key,
          model=model,
          spec=dspec,
          config=config,
          straight_through=straight_through,
        )
        done = step + 1
        window.append(metrics)
        if step == start:  # The first call compiles; time the steps after it.
          jax.block_until_ready(state)
          timed_from, timed_steps = time.perf_counter(), 0
        else:
          timed_steps += 1
        if done % log_every == 0 or done == stop:
          losses = np.asarray(jax.device_get([m["loss"] for m in window]))
          if not np.all(np.isfinite(losses)):
            bad = int(np.argmin(np.isfinite(losses)))  # window[i] is step done - len + i + 1
            raise DivergedError(done - len(window) + bad + 1, f"training loss is {losses[bad]}")
          means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *window))
          now = time.perf_counter()
          rate = len(window) / max(now - window_start, 1e-9)
          logging.info(
            "step %d/%d: loss %.4f, accuracy %.4f, %.1f steps/s, ETA %s",
            done,
            stop,
            means["loss"],
            means["accuracy"],
            rate,
            _format_seconds((stop - done) / rate),
          )
          window, window_start = [], now
        do_eval = done % eval_every == 0 or done == stop
        do_save = manager is not None and (done % checkpoint_every == 0 or done == stop)
        if do_eval or do_save:
          jax.block_until_ready(state)  # Queued steps count as training time.
          side_start = time.perf_counter()
          if do_eval:
            final = run_eval(done)
          if do_save:
            save(done)
          side_time += time.perf_counter() - side_start
          window_start += time.perf_counter() - side_start
    finally:
      batches.close()
    train_time = time.perf_counter() - timed_from - side_time
  if final is None:  # Nothing to train: evaluate what was restored.
    final = (
      (history[-1]["test_loss"], history[-1]["test_accuracy"])
      if (history and history[-1]["step"] == stop)
      else run_eval(stop)
    )
  steps_per_second = timed_steps / train_time if timed_steps and train_time > 0 else float("nan")
  return TrainResult(
    history=history,
    final_test_loss=final[0],
    final_test_accuracy=final[1],
    steps_per_second=steps_per_second,
    wall_time=time.perf_counter() - start_time,
    start_step=start,
    state=state,
    mask_updates=[] if mask_updates is None else list(mask_updates.records),
  )


__all__ = [
  "TrainConfig",
  "weight_decay_from_keras_l2",
  "TrainState",
  "TrainResult",
  "DivergedError",
  "CorruptCheckpointError",
  "state_checksum",
  "MaskUpdates",
  "make_schedule",
  "make_optimizer",
  "make_masked_optimizer",
  "kernel_mask",
  "create_train_state",
  "train_step",
  "eval_step",
  "evaluate",
  "make_mesh",
  "replicate",
  "train",
]
