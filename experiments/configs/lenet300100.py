"""LeNet-300-100 on MNIST (Lee et al., 2019): 96k steps, decays at 25k, 50k, 75k."""

from experiments.configs import base


def get_config():
  return base.experiment(
    arch="lenet300100",
    dataset="mnist",
    batch_size=100,
    train_steps=96_000,
    learning_rate=0.1,
    keras_l2=5e-4,
    decay_boundaries=(25 / 96, 50 / 96, 75 / 96),
    snip_batch_size=100,
  )
