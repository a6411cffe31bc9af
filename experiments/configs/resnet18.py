"""ResNet-18 on Tiny ImageNet (Frankle et al., 2021): 78.2k steps, decays at 39,100 and
58,650."""

from experiments.configs import base


def get_config():
  return base.experiment(
    arch="resnet18",
    dataset="tiny_imagenet",
    batch_size=256,
    train_steps=78_200,
    learning_rate=0.2,
    keras_l2=1e-4,
    decay_boundaries=(0.5, 0.75),
    snip_batch_size=2560,
  )
