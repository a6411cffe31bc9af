"""Where a binary's data comes from: TFDS (prepared offline) or synthetic data of the
same shapes, its flags, and the score batches of data-driven pruners."""

from __future__ import annotations

import dataclasses
import functools

import jax
from absl import flags, logging

from sparsejax import data
from sparsejax.data import synthetic


@functools.lru_cache(maxsize=8)
def load_data(
  dataset: str,
  split: str,
  *,
  synthetic: bool,
  manual_dir: str | None,
  data_dir: str | None,
  seed: int = 0,
  num_examples: int | None = None,
):
  """(images uint8, labels int32) of a split: real (TFDS, offline from manual_dir) or
  synthetic data of the same shapes. Cached: the runs of an in-process sweep read a
  split once (callers must not modify the arrays)."""
  if synthetic:
    return data.synthetic_split(dataset, split, num_examples=num_examples, seed=seed)
  return data.load_split(dataset, split, data_dir=data_dir, manual_dir=manual_dir)


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where a binary's data comes from: TFDS (prepared offline from ``manual_dir``) or
  synthetic data of the same shapes (``num_examples`` per split, synthetic only)."""

  synthetic: bool = False
  manual_dir: str | None = None
  data_dir: str | None = None
  num_examples: int | None = None

  @classmethod
  def from_flags(cls) -> DataSource:
    """From --synthetic_data, --tfds_manual_dir and --tfds_data_dir."""
    return cls(
      synthetic=flags.FLAGS.synthetic_data,
      manual_dir=flags.FLAGS.tfds_manual_dir,
      data_dir=flags.FLAGS.tfds_data_dir,
    )

  def split(self, dataset: str, split: str, seed: int = 0):
    """(images uint8 [N, H, W, C], labels int32 [N]) of a split (cached, read-only)."""
    return load_data(
      dataset,
      split,
      synthetic=self.synthetic,
      manual_dir=self.manual_dir,
      data_dir=self.data_dir,
      seed=seed,
      num_examples=self.num_examples if self.synthetic else None,
    )

  def num_examples_of(self, dataset: str, split: str = "train") -> int | None:
    """The examples of a split, known before it is read: the synthetic split's, or
    the dataset spec's size (``num_train``, ``num_test``; None where the spec gives
    none)."""
    if self.synthetic:
      return self.num_examples or synthetic.DEFAULT_NUM_EXAMPLES[split]
    spec = data.get_spec(dataset)
    return (spec.num_train if split == "train" else spec.num_test) or None

  def score_batches(
    self, dataset: str, *, num_batches: int, batch_size: int, seed: int
  ) -> list[dict]:
    """Preprocessed (normalized, not augmented) training batches for data-driven
    scores (SNIP, iterative SNIP, GraSP): a list of {'image': float32 NHWC, 'label':
    int32}. Batch s is :func:`sparsejax.data.batch_indices` of (seed, s).

    A ``batch_size`` above the split's size: synthetic data (a smoke-test stand-in,
    1024 training examples by default) scores on the whole split instead, with a
    warning (VGG-19's SNIP batch is 1280, ResNet-18's 2560); real data raises a
    ValueError naming both sizes."""
    images, labels = self.split(dataset, "train", seed)
    if batch_size > len(images):
      if not self.synthetic:
        raise ValueError(
          f"batch_size={batch_size} (score batch, e.g. the config's "
          f"snip_batch_size) exceeds the {len(images)} examples of {dataset} "
          "train; pass a smaller score batch size."
        )
      logging.warning(
        "Score batch size %d exceeds the %d synthetic %s training examples; "
        "scoring on batches of %d.",
        batch_size,
        len(images),
        dataset,
        len(images),
      )
      batch_size = len(images)
    spec = data.get_spec(dataset)
    batches = []
    for step in range(num_batches):
      idx = data.batch_indices(len(images), batch_size, seed, step)
      x = data.preprocess(jax.random.key(0), images[idx], spec, False)
      batches.append({"image": x, "label": labels[idx]})
    logging.info(
      "Score data: %d batches of %d from %s %s.",
      num_batches,
      batch_size,
      "synthetic" if self.synthetic else "TFDS",
      dataset,
    )
    return batches

  def describe(self, dataset: str) -> str:
    return f"synthetic {dataset}" if self.synthetic else f"{dataset} (TFDS)"


def define_flags() -> None:
  """--synthetic_data, --tfds_manual_dir and --tfds_data_dir (:meth:`DataSource.from_flags`)."""
  flags.DEFINE_bool(
    "synthetic_data", False, "Use synthetic data of the dataset's shapes instead of TFDS."
  )
  flags.DEFINE_string(
    "tfds_manual_dir",
    None,
    "Folder with the raw dataset files for offline TFDS preparation "
    f"(default ${data.MANUAL_DIR_ENV}); e.g. ../shared/data/mnist.",
  )
  flags.DEFINE_string(
    "tfds_data_dir",
    None,
    f"Where TFDS keeps prepared data (default ${data.DATA_DIR_ENV}, then ~/tensorflow_datasets).",
  )
