"""The experiment config of a registered network that has no config file of its own.

  python -m experiments.prune_train --import=my_models.py \
      --config=experiments/configs/generic.py:my_mlp --config.compression=10

``get_config(arch)`` takes the dataset from the network's
:class:`sparsejax.models.ModelSpec` (its input shape and classes come with the
dataset) and the training settings from :data:`TRAINING`; every field can be
overridden as for any config (``--config.train_steps=3000``). ``experiments.configs.path``
names this file (``generic.py:<arch>``) for every network without ``<arch>.py``, so
``experiments.sweep --archs=my_mlp`` needs nothing more.
"""

from experiments.configs import base
from sparsejax import models

#: Training settings of a network without a config file: VGG-16's (Frankle et al.,
#: 2021; experiments/configs/vgg16.py): SGD with momentum 0.9 at batch 128 for 62.5k
#: steps, learning rate 0.1 divided by 10 at 1/2 and 3/4 of the run, Keras l2 1e-4
#: (weight decay 2e-4), data-driven scores on batches of 128.
TRAINING = dict(
  batch_size=128,
  train_steps=62_500,
  learning_rate=0.1,
  keras_l2=1e-4,
  decay_boundaries=(0.5, 0.75),
  snip_batch_size=128,
)


def get_config(arch: str):
  return base.experiment(arch=arch, dataset=models.get_spec(arch).dataset, **TRAINING)
