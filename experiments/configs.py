"""The paper's training configurations, one per network (method.md section 5).

Values follow the reference code (avysogorets/effective-sparsity, ``main.py``):
SGD with momentum 0.9, a piecewise-constant learning rate divided by 10 at the
listed steps, L2 on kernels only.

Learning-rate boundaries are stored as fractions of the run so that overriding
``train_steps`` (e.g. a short smoke run) scales the schedule with it;
:func:`sparsejax.training.make_schedule` turns them into steps with
``round(fraction * train_steps)``.

Weight decay: ``weight_decay`` is the coefficient added to the gradient,
``g + weight_decay * w`` (``optax.add_decayed_weights``). The paper's Keras
models add ``l2 * sum(w ** 2)`` to the loss (``kernel_regularizer=l2(l2)``, with
l2 = 5e-4 for the LeNets and 1e-4 for VGG and ResNet), whose gradient is
``2 * l2 * w``; so ``weight_decay = 2 * l2`` (:func:`weight_decay_from_keras_l2`):
1e-3 for the LeNets and 2e-4 for VGG and ResNet-18.
"""

from __future__ import annotations

import dataclasses


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
    weight_decay: L2 coefficient on the gradient of Dense/Conv kernels (see the
      module docstring for the mapping from the paper's Keras L2).
    decay_boundaries: increasing fractions in (0, 1] of ``train_steps`` at which
      the learning rate is multiplied by ``decay_factor``.
    decay_factor: multiplier at each boundary.
    snip_batch_size: examples in the batch that SNIP-like pruners score on.
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

  def __post_init__(self):
    for name in ("batch_size", "train_steps", "snip_batch_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    for name in ("learning_rate", "decay_factor"):
      value = getattr(self, name)
      if not value > 0:
        raise ValueError(f"{name}={value!r} must be positive.")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"momentum={self.momentum!r} must be in [0, 1).")
    if not self.weight_decay >= 0.0:
      raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0.")
    bounds = tuple(float(b) for b in self.decay_boundaries)
    if any(not 0.0 < b <= 1.0 for b in bounds) or list(bounds) != sorted(bounds):
      raise ValueError(f"decay_boundaries={self.decay_boundaries!r} must be increasing "
                       "fractions of the run in (0, 1].")
    object.__setattr__(self, "decay_boundaries", bounds)  # Lists -> tuple: hashable.

  def boundary_steps(self) -> tuple[int, ...]:
    """The decay boundaries in steps: round(fraction * train_steps)."""
    return tuple(int(round(b * self.train_steps)) for b in self.decay_boundaries)


CONFIGS: dict[str, TrainConfig] = {
    # Lee et al. (2019): 96k steps, decays at 25k, 50k, 75k.
    "lenet300100": TrainConfig(
        dataset="mnist", batch_size=100, train_steps=96_000, learning_rate=0.1,
        momentum=0.9, weight_decay=weight_decay_from_keras_l2(5e-4),
        decay_boundaries=(25 / 96, 50 / 96, 75 / 96), snip_batch_size=100),
    # Lee et al. (2019): 120k steps, decays at 30k, 60k, 90k.
    "lenet5": TrainConfig(
        dataset="cifar10", batch_size=128, train_steps=120_000, learning_rate=0.1,
        momentum=0.9, weight_decay=weight_decay_from_keras_l2(5e-4),
        decay_boundaries=(0.25, 0.5, 0.75), snip_batch_size=128),
    # Frankle et al. (2021): 62.5k steps, decays at 31,250 and 46,875.
    "vgg16": TrainConfig(
        dataset="cifar10", batch_size=128, train_steps=62_500, learning_rate=0.1,
        momentum=0.9, weight_decay=weight_decay_from_keras_l2(1e-4),
        decay_boundaries=(0.5, 0.75), snip_batch_size=128),
    # Wang et al. (2020): VGG-16's schedule; SNIP scores on 1280 examples.
    "vgg19": TrainConfig(
        dataset="cifar100", batch_size=128, train_steps=62_500, learning_rate=0.1,
        momentum=0.9, weight_decay=weight_decay_from_keras_l2(1e-4),
        decay_boundaries=(0.5, 0.75), snip_batch_size=1280),
    # Frankle et al. (2021): 78.2k steps, decays at 39,100 and 58,650.
    "resnet18": TrainConfig(
        dataset="tiny_imagenet", batch_size=256, train_steps=78_200, learning_rate=0.2,
        momentum=0.9, weight_decay=weight_decay_from_keras_l2(1e-4),
        decay_boundaries=(0.5, 0.75), snip_batch_size=2560),
}

_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def get_config(arch: str, **overrides) -> TrainConfig:
  """The paper's config for network ``arch`` with ``overrides`` replaced.

  Example: ``get_config("lenet300100", train_steps=960)`` keeps the decays at
  25/96, 50/96 and 75/96 of the (now shorter) run.

  Raises:
    ValueError: unknown ``arch``, unknown field in ``overrides`` or an invalid value.
  """
  if arch not in CONFIGS:
    raise ValueError(f"arch={arch!r} has no training config; allowed: {', '.join(CONFIGS)}.")
  unknown = sorted(set(overrides) - set(_FIELDS))
  if unknown:
    raise ValueError(f"overrides {unknown} are not TrainConfig fields; allowed: "
                     f"{', '.join(_FIELDS)}.")
  return dataclasses.replace(CONFIGS[arch], **overrides)


__all__ = ["TrainConfig", "CONFIGS", "get_config", "weight_decay_from_keras_l2"]
