"""VGG-16 on CIFAR-10 (Frankle et al., 2021): 62.5k steps, decays at 31,250 and 46,875."""

from experiments.configs import base


def get_config():
  return base.experiment(
    arch="vgg16",
    dataset="cifar10",
    batch_size=128,
    train_steps=62_500,
    learning_rate=0.1,
    keras_l2=1e-4,
    decay_boundaries=(0.5, 0.75),
    snip_batch_size=128,
  )
