"""LeNet-5 on CIFAR-10 (Lee et al., 2019): 120k steps, decays at 30k, 60k, 90k."""

from experiments.configs import base


def get_config():
  return base.experiment(
    arch="lenet5",
    dataset="cifar10",
    batch_size=128,
    train_steps=120_000,
    learning_rate=0.1,
    keras_l2=5e-4,
    decay_boundaries=(0.25, 0.5, 0.75),
    snip_batch_size=128,
  )
