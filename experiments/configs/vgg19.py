"""VGG-19 on CIFAR-100 (Wang et al., 2020): VGG-16's schedule; SNIP scores 1280 examples."""

from experiments.configs import base


def get_config():
  return base.experiment(
    arch="vgg19",
    dataset="cifar100",
    batch_size=128,
    train_steps=62_500,
    learning_rate=0.1,
    keras_l2=1e-4,
    decay_boundaries=(0.5, 0.75),
    snip_batch_size=1280,
  )
