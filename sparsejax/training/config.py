"""How a network is trained: :class:`TrainConfig`, the learning-rate schedule and the
optimizer recipe (the paper's SGD with momentum and L2 on the prunable weights, or AdamW
with decoupled decay for the transformers), built once per run.

The prunable set, which L2 applies to, is the one rule of :mod:`sparsejax.masks`: the
mask tree's non-None leaves when masks are given, otherwise the weights that the
model's traced program uses in a linear op (:func:`sparsejax.effective.prunable_paths`),
whatever they are called (:func:`sparsejax.training.create_train_state` picks it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Collection
from typing import Any

import jax
import numpy as np
import optax

from sparsejax import masks as masks_lib
from sparsejax import optim
from sparsejax.errors import FieldError

PyTree = Any


#: Optimizers of :class:`TrainConfig` ('sgd' is the paper's).
OPTIMIZERS = ("sgd", "adamw")
#: Learning-rate schedules of :class:`TrainConfig` ('piecewise' is the paper's).
SCHEDULES = ("piecewise", "cosine")


def _finite_at_least(value, low: float, strict: bool = False) -> bool:
  """``value`` is a real number (not a bool), finite, and >= ``low`` (> when strict)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    return False
  return math.isfinite(value) and (value > low if strict else value >= low)


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
    weight_decay: L2 coefficient on the gradient of the prunable weights (see
      :func:`make_optimizer` for the mapping from the paper's Keras L2).
    decay_boundaries: increasing fractions in (0, 1] of ``train_steps`` at which
      the learning rate is multiplied by ``decay_factor``.
    decay_factor: multiplier at each boundary.
    snip_batch_size: examples in the batch that SNIP-like pruners score on.
    optimizer: 'sgd' (the paper's: heavy-ball momentum, L2 on the gradient) or 'adamw'
      (Loshchilov & Hutter, 2019: Adam with ``b1 = momentum``, ``b2 = beta2`` and decay
      ``weight_decay`` decoupled from the gradient, both on the prunable weights only).
    schedule: 'piecewise' (the paper's ``decay_boundaries``) or 'cosine' (linear warmup
      from 0 over ``warmup_fraction`` of the run, then cosine decay to 0 at its end).
    warmup_fraction: fraction of ``train_steps`` in [0, 1) that warms up ('cosine' only).
    beta2: AdamW's second-moment decay.
    grad_clip: clip the gradient's global norm to this before the optimizer (0: no
      clipping); the norm is the masked gradient's.
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
  optimizer: str = "sgd"
  schedule: str = "piecewise"
  warmup_fraction: float = 0.0
  beta2: float = 0.999
  grad_clip: float = 0.0

  def __post_init__(self):
    """Raises :class:`sparsejax.errors.FieldError` naming the first bad field."""
    for name in ("batch_size", "train_steps", "snip_batch_size"):
      value = getattr(self, name)
      if not _finite_at_least(value, 1.0) or int(value) != value:
        raise FieldError(name, value, "a positive integer")
    # An infinite rate or factor passes "> 0" and only shows as a diverged run.
    for name in ("learning_rate", "decay_factor"):
      if not _finite_at_least(getattr(self, name), 0.0, strict=True):
        raise FieldError(name, getattr(self, name), "a finite number > 0")
    if not _finite_at_least(self.momentum, 0.0) or not self.momentum < 1.0:
      raise FieldError("momentum", self.momentum, "a number in [0, 1)")
    if not _finite_at_least(self.weight_decay, 0.0):
      raise FieldError("weight_decay", self.weight_decay, "a finite number >= 0")
    try:
      bounds = tuple(float(b) for b in self.decay_boundaries)
    except (TypeError, ValueError):
      bounds = None
    if bounds is None or any(not 0.0 < b <= 1.0 for b in bounds) or list(bounds) != sorted(bounds):
      raise FieldError(
        "decay_boundaries",
        self.decay_boundaries,
        "increasing fractions of the run in (0, 1]",
      )
    object.__setattr__(self, "decay_boundaries", bounds)  # Lists -> tuple: hashable.
    if self.optimizer not in OPTIMIZERS:
      raise FieldError("optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
    if self.schedule not in SCHEDULES:
      raise FieldError("schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
    if not _finite_at_least(self.warmup_fraction, 0.0) or not self.warmup_fraction < 1.0:
      raise FieldError("warmup_fraction", self.warmup_fraction, "a number in [0, 1)")
    if self.warmup_fraction and self.schedule != "cosine":
      raise FieldError(
        "warmup_fraction",
        self.warmup_fraction,
        f"0 for schedule={self.schedule!r} (a warmup is for schedule='cosine')",
      )
    if not _finite_at_least(self.beta2, 0.0) or not self.beta2 < 1.0:
      raise FieldError("beta2", self.beta2, "a number in [0, 1)")
    if not _finite_at_least(self.grad_clip, 0.0):
      raise FieldError("grad_clip", self.grad_clip, "a finite number >= 0 (0: no clipping)")

  def warmup_steps(self) -> int:
    """The warmup in steps: round(warmup_fraction * train_steps)."""
    return int(round(self.warmup_fraction * self.train_steps))

  def boundary_steps(self) -> tuple[int, ...]:
    """The decay boundaries in steps: round(fraction * train_steps)."""
    return tuple(int(round(b * self.train_steps)) for b in self.decay_boundaries)


def make_schedule(config) -> optax.Schedule:
  """The learning rate of ``config.schedule`` at each step.

  'piecewise' (the paper's): ``learning_rate * decay_factor ** k`` after k boundaries.
  Boundary i is at step ``round(config.decay_boundaries[i] * config.train_steps)``;
  the new rate applies from that step on (the update made at step b, counting
  from 0, uses the decayed rate; Keras' ``PiecewiseConstantDecay`` switches one
  step later). Boundaries that round to the same step compound.

  'cosine': ``learning_rate * t / W`` for t < W = ``config.warmup_steps()``, then
  ``learning_rate * (1 + cos(pi (t - W) / (S - W))) / 2`` to 0 at S = train_steps
  (``optax.warmup_cosine_decay_schedule``).
  """
  if getattr(config, "schedule", "piecewise") == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0,
      config.learning_rate,
      config.warmup_steps(),
      max(config.train_steps, config.warmup_steps() + 1),
      0.0,
    )
  scales: dict[int, float] = {}
  for fraction in config.decay_boundaries:
    boundary = int(round(fraction * config.train_steps))
    scales[boundary] = scales.get(boundary, 1.0) * config.decay_factor
  return optax.piecewise_constant_schedule(config.learning_rate, scales)


# ------------------------------------------------------------ the prunable set


def prunable_set(prunable: PyTree | Collection[str]) -> frozenset[str]:
  """The prunable set as '/'-joined parameter paths.

  Args:
    prunable: a mask tree (its non-None leaves: the mask tree *is* the prunable set)
      or a collection of '/'-joined paths, e.g.
      :func:`sparsejax.effective.prunable_paths` of the model.
  """
  if isinstance(prunable, (frozenset, set, list, tuple)) and all(
    isinstance(p, str) for p in prunable
  ):
    return frozenset(prunable)
  leaves = jax.tree_util.tree_leaves_with_path(prunable, is_leaf=lambda x: x is None)
  return frozenset(masks_lib.path_str(p) for p, m in leaves if m is not None)


@dataclasses.dataclass(frozen=True)
class DecayMask:
  """Optax mask function (``add_decayed_weights(mask=...)``): True at the leaves of
  ``params`` whose path is in ``paths``. Hashable, so equal settings give equal
  optimizers (and a jitted step compiled for one state serves the next)."""

  paths: frozenset[str]

  def __call__(self, params: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(
      lambda p, _: masks_lib.path_str(p) in self.paths, params
    )


def decay_mask(params: PyTree, prunable: PyTree | Collection[str]) -> PyTree:
  """Bool tree shaped like ``params``: True at the prunable weights (what L2 applies
  to), False elsewhere (biases, batch-norm scales and offsets, ...)."""
  return DecayMask(prunable_set(prunable))(params)


# ------------------------------------------------------------------ optimizer


def make_optimizer(config, prunable: PyTree | Collection[str]) -> optax.GradientTransformation:
  """The optimizer of ``config``: by default SGD with momentum, the paper's schedule and
  L2 on the prunable weights only.

  ``chain(add_decayed_weights(weight_decay, mask=prunable), sgd(schedule, momentum))``:
  the update is ``-lr_t * m_t`` with ``m_t = momentum * m_{t-1} + g_t + wd * w`` at
  prunable weights (``g_t`` elsewhere). Decay enters the momentum like a loss term
  does, so ``wd`` is the gradient of an L2 penalty ``wd / 2 * sum(w ** 2)``. The
  paper's Keras ``l2(c)`` regularizer adds ``c * sum(w ** 2)`` to the loss, hence
  ``wd = 2c`` (``experiments.configs`` stores 2 x 5e-4 for the LeNets and 2 x 1e-4
  for VGG/ResNet). Biases and batch-norm scales/offsets are not decayed.

  ``optimizer='adamw'``: ``optax.adamw(schedule, b1=momentum, b2=beta2,
  weight_decay=weight_decay, mask=prunable)``, the decay decoupled from the gradient
  (``w <- w - lr_t * (adam_t + wd * w)``) and applied to the prunable weights only.
  With ``grad_clip > 0`` the gradient's global norm is clipped first
  (``optax.clip_by_global_norm``).

  Args:
    config: a ``TrainConfig`` (learning_rate, momentum, weight_decay,
      decay_boundaries, decay_factor, train_steps, optimizer, schedule, ...).
    prunable: the prunable set (:func:`prunable_set`): a mask tree or '/'-joined paths.
  """
  decayed = DecayMask(prunable_set(prunable))
  schedule = make_schedule(config)
  if getattr(config, "optimizer", "sgd") == "adamw":
    steps = [
      optax.adamw(
        schedule,
        b1=config.momentum,
        b2=config.beta2,
        weight_decay=config.weight_decay,
        mask=decayed,
      )
    ]
  else:
    momentum = config.momentum if config.momentum else None
    steps = [
      optax.add_decayed_weights(config.weight_decay, mask=decayed),
      optax.sgd(schedule, momentum=momentum),
    ]
  if getattr(config, "grad_clip", 0.0) > 0:
    steps.insert(0, optax.clip_by_global_norm(config.grad_clip))
  return optax.chain(*steps)


def make_masked_optimizer(
  config, prunable: PyTree | Collection[str], straight_through: bool = False
) -> optax.GradientTransformation:
  """:func:`make_optimizer` wrapped in :func:`sparsejax.optim.with_masks`.

  The masks are state, not recipe: the wrapper's ``init`` leaves them None and
  :func:`sparsejax.training.create_train_state` puts them into the optimizer state
  (:func:`sparsejax.optim.replace_masks`), where the update reads them. So one
  optimizer serves every mask of a (config, prunable set, straight_through), and equal
  settings return the same object (cached). With ``straight_through`` the masks only
  mask the forward pass (STE training).
  """
  return _masked_optimizer(config, prunable_set(prunable), bool(straight_through))


@functools.lru_cache(maxsize=32)
def _masked_optimizer(config, paths: frozenset[str], straight_through: bool):
  return optim.with_masks(make_optimizer(config, paths), None, straight_through=straight_through)
