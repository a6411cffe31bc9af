"""Masked training with Optax: config, state, steps, checkpoints, the loop.

The training recipe of method.md section 5: SGD with momentum, a piecewise-constant
learning rate, L2 on the prunable weights only, cross-entropy, per-step augmentation on
the device (AdamW with warmup and cosine decay as a config choice, for the
transformers). Byte-level language models train on text windows with next-token
cross-entropy; their evaluation adds bits per byte and perplexity. A sparse network is trained
by keeping its pruned weights at exactly zero with :func:`sparsejax.optim.with_masks`:
gradients are masked before the optimizer (its state stays 0 at pruned weights) and so
are the updates after it, so neither weight decay nor momentum (even momentum carried
over from dense training) can revive a pruned weight. The masks live in the optimizer
state.

One module per job, in the shape of the Flax ImageNet example:

- :mod:`~sparsejax.training.config`: :class:`TrainConfig` (the paper's per-network
  values are the experiment configs under ``experiments/configs/``), the schedule and
  the optimizer recipe (:func:`make_optimizer`).
- :mod:`~sparsejax.training.state`: :class:`TrainState`, which carries its optimizer
  ``tx`` (built once by :func:`create_train_state`) as a static field.
- :mod:`~sparsejax.training.steps`: :func:`train_step`, :func:`eval_step` (pure,
  jitted, reading ``state.tx``), the train step in two halves around a mask update
  (:func:`forward_backward`, :func:`apply_step`), :func:`evaluate` (images),
  :func:`evaluate_text` and :func:`language_model_metrics` (text).
- :mod:`~sparsejax.training.mesh`: data parallelism (:func:`make_mesh`,
  :func:`replicate`): a 1-D mesh over the devices (axis ``'data'``), batches sharded
  along their first axis, the state replicated; multi-host after
  ``jax.distributed.initialize``.
- :mod:`~sparsejax.training.checkpoints`: Orbax checkpoints with checksums, the
  fallback past a corrupt one, resume.
- :mod:`~sparsejax.training.loop`: :func:`train`, moving masks (:class:`MaskUpdates`
  over a :class:`sparsejax.dynamic.Updater`) and progress lines.
- :mod:`~sparsejax.training.in_step`: :func:`update_train_step`, the train step with the
  mask update scheduled inside it (``lax.cond``; ``train(..., update_in_jit=True)``).

No TensorFlow is imported (:mod:`sparsejax.data` loads TFDS only for real data).
"""

from __future__ import annotations

from sparsejax.training.checkpoints import (
  CheckpointWriteError,
  CorruptCheckpointError,
  DivergedError,
  state_checksum,
)
from sparsejax.training.config import (
  OPTIMIZERS,
  SCHEDULES,
  TrainConfig,
  decay_mask,
  make_masked_optimizer,
  make_optimizer,
  make_schedule,
  prunable_set,
  weight_decay_from_keras_l2,
)
from sparsejax.training.in_step import update_train_step
from sparsejax.training.loop import Interrupted, MaskUpdates, Progress, TrainResult, train
from sparsejax.training.mesh import make_mesh, replicate
from sparsejax.training.state import TrainState, create_train_state
from sparsejax.training.steps import (
  apply_step,
  eval_step,
  evaluate,
  evaluate_text,
  forward_backward,
  language_model_metrics,
  train_step,
)

__all__ = [
  "TrainConfig",
  "OPTIMIZERS",
  "SCHEDULES",
  "weight_decay_from_keras_l2",
  "TrainState",
  "TrainResult",
  "DivergedError",
  "CorruptCheckpointError",
  "CheckpointWriteError",
  "Interrupted",
  "state_checksum",
  "MaskUpdates",
  "Progress",
  "make_schedule",
  "make_optimizer",
  "make_masked_optimizer",
  "prunable_set",
  "decay_mask",
  "create_train_state",
  "train_step",
  "forward_backward",
  "apply_step",
  "update_train_step",
  "eval_step",
  "evaluate",
  "evaluate_text",
  "language_model_metrics",
  "make_mesh",
  "replicate",
  "train",
]
