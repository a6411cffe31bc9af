"""Where a binary's data comes from: TFDS (prepared offline), a text folder (the byte-level
``text`` dataset, --text_dir) or synthetic data of the same shapes, its flags, and the
score batches of data-driven pruners."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
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
  text_dir: str | None = None,
):
  """(images uint8, labels int32) of a split: real (TFDS, offline from manual_dir) or
  synthetic data of the same shapes; for a text dataset, the split's bytes uint8 [N]
  (from text_dir, or synthetic text of ``num_examples`` bytes). Cached: the runs of an
  in-process sweep read a split once (callers must not modify the arrays)."""
  if isinstance(data.get_spec(dataset), data.TextSpec):
    if synthetic:
      return data.synthetic_text(dataset, split, num_bytes=num_examples, seed=seed)
    return data.load_text(dataset, split, text_dir=text_dir)
  if synthetic:
    return data.synthetic_split(dataset, split, num_examples=num_examples, seed=seed)
  return data.load_split(dataset, split, data_dir=data_dir, manual_dir=manual_dir)


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where a binary's data comes from: TFDS (prepared offline from ``manual_dir``), the
  text folder ``text_dir`` (text datasets; default ``$SPARSEJAX_TEXT_DIR``) or synthetic
  data of the same shapes (``num_examples`` per split, synthetic only: bytes for text)."""

  synthetic: bool = False
  manual_dir: str | None = None
  data_dir: str | None = None
  num_examples: int | None = None
  text_dir: str | None = None

  @classmethod
  def from_flags(cls) -> DataSource:
    """From --synthetic_data, --tfds_manual_dir, --tfds_data_dir and --text_dir."""
    return cls(
      synthetic=flags.FLAGS.synthetic_data,
      manual_dir=flags.FLAGS.tfds_manual_dir,
      data_dir=flags.FLAGS.tfds_data_dir,
      text_dir=flags.FLAGS.text_dir,
    )

  def split(self, dataset: str, split: str, seed: int = 0):
    """(images uint8 [N, H, W, C], labels int32 [N]) of a split, or a text split's
    bytes uint8 [N] (cached, read-only)."""
    return load_data(
      dataset,
      split,
      synthetic=self.synthetic,
      manual_dir=self.manual_dir,
      data_dir=self.data_dir,
      seed=seed,
      num_examples=self.num_examples if self.synthetic else None,
      text_dir=self.text_dir,
    )

  def check_text(self, dataset: str) -> None:
    """ValueError (before any work) unless a text dataset's splits can be read: synthetic,
    or a ``text_dir`` (or ``$SPARSEJAX_TEXT_DIR``) holding train, valid and test files."""
    spec = data.get_spec(dataset)
    if self.synthetic or not isinstance(spec, data.TextSpec):
      return
    folder = self.text_dir or os.environ.get(data.TEXT_DIR_ENV)
    if not folder:
      raise ValueError(
        f"dataset {dataset!r} reads a text folder: pass --text_dir (or set "
        f"${data.TEXT_DIR_ENV}) to {spec.hint}, or --synthetic_data."
      )
    missing = [s for s in spec.splits if data.text.split_path(folder, s) is None]
    if missing:
      raise ValueError(
        f"--text_dir={folder!r} lacks {', '.join(f'{s}.txt.gz' for s in missing)}; it must "
        f"be {spec.hint}."
      )

  def num_examples_of(self, dataset: str, split: str = "train") -> int | None:
    """The examples of a split, known before it is read: the synthetic split's, or
    the dataset spec's size (``num_train``, ``num_test``; None where the spec gives
    none; None for a text dataset: its windows depend on the model's context and the
    corpus's size, and batch_indices checks the batch against them once it is read)."""
    spec = data.get_spec(dataset)
    if isinstance(spec, data.TextSpec):
      return None
    if self.synthetic:
      return self.num_examples or synthetic.DEFAULT_NUM_EXAMPLES[split]
    return (spec.num_train if split == "train" else spec.num_test) or None

  def score_batches(
    self, dataset: str, *, num_batches: int, batch_size: int, seed: int, input_shape=None
  ) -> list[dict]:
    """Preprocessed (normalized, not augmented) training batches for data-driven
    scores (SNIP, iterative SNIP, GraSP): a list of {'image': float32 NHWC, 'label':
    int32}. Batch s is :func:`sparsejax.data.batch_indices` of (seed, s). For a text
    dataset: token windows {'tokens': int32 [batch_size, T + 1]} of training step s
    (:func:`sparsejax.data.window_starts`), T = ``input_shape[0]`` (the model's
    context; required for text, unused for images).

    A ``batch_size`` above the split's size: synthetic data (a smoke-test stand-in,
    1024 training examples by default) scores on the whole split instead, with a
    warning (VGG-19's SNIP batch is 1280, ResNet-18's 2560); real data raises a
    ValueError naming both sizes."""
    if isinstance(data.get_spec(dataset), data.TextSpec):
      return self._token_batches(dataset, num_batches, batch_size, seed, input_shape)
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

  def _token_batches(self, dataset, num_batches, batch_size, seed, input_shape) -> list[dict]:
    if input_shape is None or len(tuple(input_shape)) != 1:
      raise ValueError(
        f"input_shape={input_shape!r}: score batches of text dataset {dataset!r} need the "
        "model's context, input_shape=(T,)."
      )
    context = int(tuple(input_shape)[0])
    corpus = self.split(dataset, "train", seed)
    available = data.num_train_windows(len(corpus), context)
    if batch_size > available:
      if not self.synthetic:
        raise ValueError(
          f"batch_size={batch_size} (score batch, e.g. the config's snip_batch_size) "
          f"exceeds the {available} windows of {context + 1} bytes of {dataset} train; "
          "pass a smaller score batch size."
        )
      logging.warning(
        "Score batch size %d exceeds the %d windows of synthetic %s; scoring on %d.",
        batch_size,
        available,
        dataset,
        available,
      )
      batch_size = available
    batches = []
    for step in range(num_batches):
      starts = data.window_starts(len(corpus), context, batch_size, seed, step)
      batches.append({"tokens": data.windows(corpus, starts, context + 1).astype(np.int32)})
    logging.info(
      "Score data: %d batches of %d windows of %d bytes from %s.",
      num_batches,
      batch_size,
      context + 1,
      self.describe(dataset),
    )
    return batches

  def describe(self, dataset: str) -> str:
    if isinstance(data.get_spec(dataset), data.TextSpec):
      return (
        f"synthetic {dataset}"
        if self.synthetic
        else f"{dataset} ({self.text_dir or os.environ.get(data.TEXT_DIR_ENV)})"
      )
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
  flags.DEFINE_string(
    "text_dir",
    None,
    "Folder of the byte-level text dataset 'text': train.txt.gz, valid.txt.gz, "
    f"test.txt.gz (default ${data.TEXT_DIR_ENV}); e.g. ../shared/data/text/python-docs.",
  )
