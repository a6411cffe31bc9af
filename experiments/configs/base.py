"""The fields every experiment config has; each network's file fills in the paper's values.

A config is an ``ml_collections.ConfigDict`` with flat fields (every one overridable
on the command line as ``--config.<field>=<value>``):

- what to run: ``arch``, ``dataset``, ``pruner``, ``pruning_type``, ``compression`` or
  ``target_sparsity`` (neither: dense), ``seed``;
- how to train (:class:`sparsejax.training.TrainConfig`'s fields): ``batch_size``,
  ``train_steps``, ``learning_rate``, ``momentum``, ``weight_decay``,
  ``decay_boundaries`` (fractions of the run), ``decay_factor``, ``snip_batch_size``;
- the run's rhythm: ``eval_every``, ``checkpoint_every``, ``log_every``;
- pruners: ``rounds`` (iterative pruners; None: the pruner's default),
  ``score_batches`` (batches of ``snip_batch_size`` examples for data-driven scores),
  ``dense_dir`` (the dense run whose weights magnitude/LAMP/IMP score),
  ``imp_rounds``, ``rewind_step``.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from sparsejax import training


def experiment(*, arch: str, dataset: str, batch_size: int, train_steps: int,
               learning_rate: float, keras_l2: float, decay_boundaries: tuple,
               snip_batch_size: int, momentum: float = 0.9) -> ml_collections.ConfigDict:
  """A config with the paper's training settings for ``arch`` and default run fields.

  ``keras_l2`` is the paper's Keras ``l2(c)`` coefficient; ``weight_decay`` is its
  gradient coefficient 2c (:func:`sparsejax.training.weight_decay_from_keras_l2`).
  """
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
  c.weight_decay = training.weight_decay_from_keras_l2(keras_l2)
  c.decay_boundaries = tuple(decay_boundaries)
  c.decay_factor = 0.1
  c.snip_batch_size = snip_batch_size

  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.log_every = 500

  c.rounds = config_dict.placeholder(int)
  c.score_batches = 10
  c.dense_dir = config_dict.placeholder(str)
  c.imp_rounds = 5
  c.rewind_step = 0
  return c
