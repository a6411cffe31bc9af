"""Dataset specs: shapes, classes, normalization, augmentation and where TFDS finds them
(images, :data:`DATASETS`); byte-level text corpora (:data:`TEXT_DATASETS`).

TensorFlow-free: the loading itself is :mod:`sparsejax.data.tfds_loading` (images) and
:mod:`sparsejax.data.text` (text).
"""

from __future__ import annotations

import dataclasses
from typing import Any

MANUAL_DIR_ENV = "SPARSEJAX_TFDS_MANUAL_DIR"
DATA_DIR_ENV = "SPARSEJAX_TFDS_DATA_DIR"
TEXT_DIR_ENV = "SPARSEJAX_TEXT_DIR"
TEXT_SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """A byte-level text dataset (hashable: a static jit argument, like DatasetSpec).

  Attributes:
    name: registry name (:data:`TEXT_DATASETS`).
    vocab_size: 256 (bytes); ``num_classes`` is the same number (the next-byte classes
      a model outputs, as an image dataset's classes).
    splits: the split names, each a file ``<split>.txt.gz`` or ``<split>.txt``.
    hint: where the files come from.
  """

  name: str
  vocab_size: int = 256
  splits: tuple[str, ...] = TEXT_SPLITS
  hint: str = ""

  @property
  def num_classes(self) -> int:
    return self.vocab_size


TEXT_DATASETS: dict[str, TextSpec] = {
  "text": TextSpec(
    name="text",
    hint="a folder with train.txt.gz, valid.txt.gz and test.txt.gz (e.g. "
    "../shared/data/text/python-docs, the Python 3.11 documentation's sources)",
  ),
}

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about a dataset.

  Attributes:
    name: registry name.
    image_shape: (H, W, C) of one image.
    num_classes: labels are int32 in [0, num_classes).
    mean, std: per-channel normalization in the [0, 1] scale (length C).
    augmentation: "rotate" (mnist) or "flip_shift" (cifar, tiny imagenet).
    max_rotation_deg: rotation angle is uniform in [-max, max] degrees.
    max_shift: shifts are integers uniform in [-max, max] pixels on both axes.
    num_train, num_test: sizes of the real splits.
    tfds_name: TFDS builder name.
    tfds_test_split: TFDS split used as "test" (Tiny ImageNet has no labelled test).
    manual_files: paths, relative to manual_dir, that offline preparation needs.
    manual_hint: where those files come from.
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augmentation: str
  max_rotation_deg: float = 0.0
  max_shift: int = 0
  num_train: int = 0
  num_test: int = 0
  tfds_name: str = ""
  tfds_test_split: str = "test"
  manual_files: tuple[str, ...] = ()
  manual_hint: str = ""


_MNIST_FILES = (
  "train-images-idx3-ubyte.gz",
  "train-labels-idx1-ubyte.gz",
  "t10k-images-idx3-ubyte.gz",
  "t10k-labels-idx1-ubyte.gz",
)

DATASETS: dict[str, DatasetSpec] = {
  "mnist": DatasetSpec(
    name="mnist",
    image_shape=(28, 28, 1),
    num_classes=10,
    mean=(0.1307,),
    std=(0.3081,),
    augmentation="rotate",
    max_rotation_deg=4.0,
    num_train=60_000,
    num_test=10_000,
    tfds_name="mnist",
    manual_files=_MNIST_FILES,
    manual_hint="the four official MNIST idx .gz files "
    "(https://storage.googleapis.com/cvdf-datasets/mnist/), not unzipped",
  ),
  "cifar10": DatasetSpec(
    name="cifar10",
    image_shape=(32, 32, 3),
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    augmentation="flip_shift",
    max_shift=4,
    num_train=50_000,
    num_test=10_000,
    tfds_name="cifar10",
    manual_files=("cifar-10-binary.tar.gz",),
    manual_hint="the official tarball "
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, not extracted",
  ),
  "cifar100": DatasetSpec(
    name="cifar100",
    image_shape=(32, 32, 3),
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    augmentation="flip_shift",
    max_shift=4,
    num_train=50_000,
    num_test=10_000,
    tfds_name="cifar100",
    manual_files=("cifar-100-binary.tar.gz",),
    manual_hint="the official tarball "
    "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz, not extracted",
  ),
  # The paper gives no statistics for Tiny ImageNet; these are the usual ImageNet
  # mean/std (Tiny ImageNet is a 64x64 subset of ImageNet).
  "tiny_imagenet": DatasetSpec(
    name="tiny_imagenet",
    image_shape=(64, 64, 3),
    num_classes=200,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    augmentation="flip_shift",
    max_shift=4,
    num_train=100_000,
    num_test=10_000,
    tfds_name="tiny_imagenet_folder",
    tfds_test_split="validation",
    manual_files=(
      "tiny-imagenet-200/wnids.txt",
      "tiny-imagenet-200/train",
      "tiny-imagenet-200/val/images",
      "tiny-imagenet-200/val/val_annotations.txt",
    ),
    manual_hint="the folder tiny-imagenet-200/ unzipped from "
    "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
  ),
}


def get_spec(name: str) -> DatasetSpec | TextSpec:
  """The spec registered as ``name``: a :class:`DatasetSpec` (images,
  :data:`DATASETS`) or a :class:`TextSpec` (:data:`TEXT_DATASETS`); ValueError if
  unknown."""
  if name in TEXT_DATASETS:
    return TEXT_DATASETS[name]
  if name not in DATASETS:
    raise ValueError(
      f"name={name!r} is not a known dataset; allowed: {sorted(DATASETS) + sorted(TEXT_DATASETS)}"
    )
  return DATASETS[name]


def image_spec(spec: DatasetSpec | str) -> DatasetSpec:
  """The image :class:`DatasetSpec` of ``spec`` (or of its name); ValueError for a text
  dataset or an unknown name."""
  spec = get_spec(spec) if isinstance(spec, str) else spec
  if isinstance(spec, TextSpec):
    raise ValueError(
      f"dataset {spec.name!r} is byte-level text, not images; its data comes from "
      "sparsejax.data.load_text / synthetic_text and text_train_batches."
    )
  return spec


_as_spec = image_spec


def _check_split(split: str) -> None:
  if split.split("[")[0] not in ("train", "test"):
    raise ValueError(
      f"split={split!r} is not allowed; use 'train' or 'test' "
      "(optionally sliced, e.g. 'train[:90%]')"
    )


class MissingDataError(FileNotFoundError, ValueError):
  """A dataset is neither prepared nor preparable offline; says what to put where."""
