"""The fields every experiment config has; each network's file fills in the paper's values.

A config is an ``ml_collections.ConfigDict`` with flat fields (every one overridable
on the command line as ``--config.<field>=<value>``):

- what to run: ``arch``, ``dataset``, ``pruner``, ``pruning_type``, ``compression`` or
  ``target_sparsity`` (neither: dense), ``seed``;
- how to train (:class:`sparsejax.training.TrainConfig`'s fields): ``batch_size``,
  ``train_steps``, ``learning_rate``, ``momentum``, ``weight_decay``,
  ``decay_boundaries`` (fractions of the run), ``decay_factor``, ``snip_batch_size``
  (for text: windows), and the optimizer choice: ``optimizer`` ('sgd', the paper's, or
  'adamw'), ``schedule`` ('piecewise', the paper's, or 'cosine'), ``warmup_fraction``,
  ``beta2``, ``grad_clip`` (the paper's networks keep the defaults);
- the run's rhythm: ``eval_every``, ``checkpoint_every``, ``log_every``;
- pruners: ``rounds`` (iterative pruners; None: the pruner's default),
  ``score_batches`` (batches of ``snip_batch_size`` examples for data-driven scores),
  ``dense_dir`` (the dense run whose weights magnitude/LAMP/IMP score),
  ``imp_rounds``, ``rewind_step``;
- masks that move during training (pruner gmp, set, rigl or ste; sparsejax.dynamic):
  ``update_every`` (steps between mask updates), ``update_start`` and ``update_end``
  (fractions of the run: GMP prunes from start to end, SET/RigL update until end),
  ``initial_sparsity`` (GMP), ``drop_fraction`` (SET/RigL), ``quota`` (None: global
  magnitude for GMP and STE, ERK for the starting masks of SET and RigL),
  ``update_target`` (None: ``pruning_type``; 'effective' aims every GMP step at the
  schedule's sparsity in effective terms, and holds the active weights of SET/RigL at
  the target, regrowing only weights that would be active),
  ``track_effective`` (effective sparsity at every update, in the result),
  ``update_in_jit`` (the updates run inside the jitted step, sparsejax.training.in_step;
  not with ``track_effective`` or an effective update target; the run name gets
  ``_jit``);
- activations: ``activation_topk`` (None: off; a fraction: after every ReLU only that
  fraction of each example's activations is kept, the top ones by magnitude,
  sparsejax.ephemeral, straight-through gradient; the run name gets ``_topk<f>``),
  ``activation_at`` (where: a primitive or function name, default 'relu', or
  'before:<module glob>' for the inputs of those modules' linear ops, e.g. a
  transformer's 'before:*/mlp/fc2'),
  ``data_effective`` (after training, effective sparsity on the test split's data,
  sparsejax.data_effective: never-active units and activation sparsity per layer and
  the data-effective compression, in the result);
- compaction (one-shot pruners only): ``compact`` (train the pruned network with its
  dead units removed, :mod:`sparsejax.compact`, ``fold=False``; the run name gets a
  ``_compact`` suffix), ``timing_repeats`` (timings per network of masked against
  compacted inference at batch 1 and 256, :mod:`sparsejax.timing`).

Defaults of the moving-mask methods follow their papers, scaled to ``train_steps``:
RigL (Evci et al., 2020) updates every 100 steps with drop fraction 0.3, cosine decay
to 0 at 75% of the run and ERK starting masks; SET (Mocanu et al., 2018) the same
with a constant drop fraction; GMP (Zhu & Gupta, 2017) prunes from 25% to 75% of the
run with the cubic schedule, every 100 steps.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from sparsejax import training


def experiment(
  *,
  arch: str,
  dataset: str,
  batch_size: int,
  train_steps: int,
  learning_rate: float,
  decay_boundaries: tuple,
  snip_batch_size: int,
  keras_l2: float | None = None,
  weight_decay: float | None = None,
  momentum: float = 0.9,
  optimizer: str = "sgd",
  schedule: str = "piecewise",
  warmup_fraction: float = 0.0,
  beta2: float = 0.999,
  grad_clip: float = 0.0,
) -> ml_collections.ConfigDict:
  """A config with the training settings for ``arch`` and default run fields.

  ``keras_l2`` is the paper's Keras ``l2(c)`` coefficient; ``weight_decay`` is its
  gradient coefficient 2c (:func:`sparsejax.training.weight_decay_from_keras_l2`).
  Give ``weight_decay`` instead for a coefficient as it is (AdamW's decoupled decay).
  The optimizer fields default to the paper's recipe (SGD, piecewise schedule).
  """
  if (keras_l2 is None) == (weight_decay is None):
    raise ValueError(
      f"keras_l2={keras_l2!r}, weight_decay={weight_decay!r}: give exactly one of them."
    )
  c = ml_collections.ConfigDict()
  c.arch = arch
  c.dataset = dataset
  c.pruner = "random/igq"
  c.pruning_type = "direct"
  c.compression = config_dict.placeholder(float)
  c.target_sparsity = config_dict.placeholder(float)
  c.seed = 0

  c.batch_size = batch_size
  c.train_steps = train_steps
  c.learning_rate = learning_rate
  c.momentum = momentum
  c.weight_decay = (
    training.weight_decay_from_keras_l2(keras_l2) if weight_decay is None else weight_decay
  )
  c.decay_boundaries = tuple(decay_boundaries)
  c.decay_factor = 0.1
  c.snip_batch_size = snip_batch_size
  c.optimizer = optimizer
  c.schedule = schedule
  c.warmup_fraction = warmup_fraction
  c.beta2 = beta2
  c.grad_clip = grad_clip

  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.log_every = 500

  c.rounds = config_dict.placeholder(int)
  c.score_batches = 10
  c.dense_dir = config_dict.placeholder(str)
  c.imp_rounds = 5
  c.rewind_step = 0

  c.update_every = 100
  c.update_start = 0.25
  c.update_end = 0.75
  c.initial_sparsity = 0.0
  c.drop_fraction = 0.3
  c.quota = config_dict.placeholder(str)
  c.update_target = config_dict.placeholder(str)
  c.track_effective = True
  c.update_in_jit = False

  c.activation_topk = config_dict.placeholder(float)
  c.activation_at = "relu"
  c.data_effective = False

  c.compact = False
  c.timing_repeats = 20
  return c
