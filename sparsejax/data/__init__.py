"""Data: dataset specs, synthetic data, batching, preprocessing; TFDS loading on demand;
byte-level text.

The host keeps each split in memory as uint8 images [N, H, W, C] and int32 labels
[N]; per step it only gathers a batch of uint8 and puts it on the device.
Normalization and augmentation are jit-able JAX functions meant to run inside the
train step on the accelerator (:mod:`sparsejax.data.preprocessing`). Batching is a pure
function of (seed, step) (:func:`batch_indices`): a run resumed at step s sees exactly
the batches an uninterrupted run would.

One module per job:

- :mod:`~sparsejax.data.specs`: :class:`DatasetSpec`, :data:`DATASETS` (images),
  :class:`TextSpec`, :data:`TEXT_DATASETS` (text), :func:`get_spec` (either).
- :mod:`~sparsejax.data.synthetic`: :func:`synthetic_split`.
- :mod:`~sparsejax.data.batching`: :func:`batch_indices`, :func:`train_batches`,
  :func:`eval_batches`, :func:`process_rows`.
- :mod:`~sparsejax.data.preprocessing`: :func:`normalize`, :func:`augment`,
  :func:`preprocess`, :func:`rotate`, :func:`flip_and_shift`.
- :mod:`~sparsejax.data.text`: the ``text`` dataset, byte-level: :func:`load_text`
  (``<text_dir>/<split>.txt.gz``, splits train/valid/test), :func:`synthetic_text`,
  fixed-length windows of T + 1 bytes (:func:`text_train_batches` as a pure function
  of (seed, step), :func:`text_eval_batches` predicting every byte once).
- :mod:`~sparsejax.data.tfds_loading`: :func:`load_split` and the Tiny ImageNet builder
  :class:`TinyImagenetFolder`, the only part that needs TensorFlow Datasets (the
  ``data`` extra); imported on first use of either name, so ``import sparsejax.data``
  (and :mod:`sparsejax.training`) loads no TensorFlow.
"""

from __future__ import annotations

import importlib

from sparsejax.data.batching import _prefetch as _prefetch  # the tests drive it directly
from sparsejax.data.batching import (
  batch_indices,
  epoch_permutation,
  eval_batches,
  process_rows,
  steps_per_epoch,
  train_batches,
)
from sparsejax.data.preprocessing import (
  augment,
  fill_value,
  flip_and_shift,
  normalize,
  preprocess,
  rotate,
)
from sparsejax.data.specs import (
  DATA_DIR_ENV,
  DATASETS,
  MANUAL_DIR_ENV,
  TEXT_DATASETS,
  TEXT_DIR_ENV,
  TEXT_SPLITS,
  Batch,
  DatasetSpec,
  MissingDataError,
  TextSpec,
  get_spec,
  image_spec,
)
from sparsejax.data.synthetic import synthetic_split
from sparsejax.data.text import (
  load_text,
  num_eval_windows,
  num_train_windows,
  synthetic_text,
  text_eval_batches,
  text_train_batches,
  window_starts,
  windows,
)

# Names of the TFDS part, imported on first access (TensorFlow takes seconds to import
# and is an optional dependency).
_TFDS_NAMES = ("load_split", "TinyImagenetFolder")


def __getattr__(name: str):
  if name in _TFDS_NAMES:
    value = getattr(importlib.import_module("sparsejax.data.tfds_loading"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'sparsejax.data' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_TFDS_NAMES))


__all__ = [
  "DatasetSpec",
  "DATASETS",
  "TextSpec",
  "TEXT_DATASETS",
  "TEXT_DIR_ENV",
  "TEXT_SPLITS",
  "get_spec",
  "image_spec",
  "MissingDataError",
  "MANUAL_DIR_ENV",
  "DATA_DIR_ENV",
  "Batch",
  "load_split",
  "TinyImagenetFolder",
  "synthetic_split",
  "steps_per_epoch",
  "epoch_permutation",
  "batch_indices",
  "process_rows",
  "train_batches",
  "eval_batches",
  "normalize",
  "fill_value",
  "rotate",
  "flip_and_shift",
  "augment",
  "preprocess",
  "load_text",
  "synthetic_text",
  "num_train_windows",
  "num_eval_windows",
  "window_starts",
  "windows",
  "text_train_batches",
  "text_eval_batches",
]
