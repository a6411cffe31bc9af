"""Synthetic data: random images with the shapes of a real split and learnable labels
(synthetic text: :func:`sparsejax.data.synthetic_text`)."""

from __future__ import annotations

import numpy as np

from sparsejax.data.specs import image_spec

#: Examples per split of :func:`synthetic_split` when ``num_examples`` is not given.
DEFAULT_NUM_EXAMPLES = {"train": 1024, "test": 256}


def synthetic_split(
  name: str, split: str, num_examples: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Random data with the shapes and dtypes of a real split, and learnable labels.

  Each class has a fixed low-frequency pattern (a random 4x4 grid per channel,
  upsampled, so flips/shifts/rotations keep it recognizable); an image is its
  class pattern plus Gaussian noise (std 40 of 255). The patterns depend on
  (name, seed) only, so train and test share them and test accuracy measures
  learning.

  Args:
    name: a key of :data:`DATASETS`.
    split: "train" or "test".
    num_examples: N; default :data:`DEFAULT_NUM_EXAMPLES` (1024 for train, 256 for test).
    seed: non-negative int.

  Returns:
    images uint8 [N, H, W, C], labels int32 [N] in [0, num_classes).
  """
  spec = image_spec(name)
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r} is not allowed; use 'train' or 'test'")
  if num_examples is None:
    num_examples = DEFAULT_NUM_EXAMPLES[split]
  if num_examples < 1:
    raise ValueError(f"num_examples={num_examples} must be at least 1")
  h, w, c = spec.image_shape
  pattern_rng = np.random.default_rng([seed, sum(map(ord, name))])
  grid = pattern_rng.uniform(32, 224, (spec.num_classes, 4, 4, c))
  patterns = np.repeat(np.repeat(grid, -(-h // 4), axis=1), -(-w // 4), axis=2)[:, :h, :w]
  rng = np.random.default_rng([seed, sum(map(ord, name)), 1 if split == "train" else 2])
  labels = rng.integers(0, spec.num_classes, num_examples).astype(np.int32)
  noise = rng.normal(0.0, 40.0, (num_examples, h, w, c))
  images = np.clip(np.rint(patterns[labels] + noise), 0, 255).astype(np.uint8)
  return images, labels
