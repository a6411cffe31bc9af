"""Byte-level text: a corpus's splits as bytes, fixed-length windows, batches.

A split is its file's bytes, uint8 [N] (the vocabulary is the 256 byte values). A
language model with context T reads windows of T + 1 bytes: inputs ``w[:-1]`` and
next-byte targets ``w[1:]``.

- Training (:func:`window_starts`, :func:`text_train_batches`): the split is cut into
  M = (N - T) // (T + 1) windows at ``offset + i (T + 1)``; each epoch draws a fresh
  offset in [0, T] and a fresh order of the M windows, so batch ``step`` is a pure
  function of (seed, step) as for images (:func:`sparsejax.data.batch_indices`).
- Evaluation (:func:`text_eval_batches`): every byte after the first is predicted
  exactly once: window i starts at ``i T`` (consecutive windows share one byte, the
  last target of one being the first input of the next); the last window and batch
  are padded, and ``mask`` [B, T] marks the real targets.

Files: ``<text_dir>/<split>.txt.gz`` (or ``<split>.txt``) for split train, valid or
test; ``text_dir`` defaults to ``$SPARSEJAX_TEXT_DIR``. The project's corpus is
``../shared/data/text/python-docs`` (the Python 3.11 documentation's sources). No
TensorFlow: the standard library's gzip reads them.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator

import jax
import numpy as np

from sparsejax.data.batching import _prefetch, _put, batch_indices, process_rows, steps_per_epoch
from sparsejax.data.specs import TEXT_DIR_ENV, Batch, MissingDataError, TextSpec, get_spec


def _check_split(spec: TextSpec, split: str) -> None:
  if split not in spec.splits:
    raise ValueError(f"split={split!r} is not allowed; use one of {', '.join(spec.splits)}.")


def split_path(text_dir: str, split: str) -> str | None:
  """The file of ``split`` in ``text_dir``: ``<split>.txt.gz``, else ``<split>.txt``;
  None when neither exists."""
  for name in (f"{split}.txt.gz", f"{split}.txt"):
    path = os.path.join(text_dir, name)
    if os.path.isfile(path):
      return path
  return None


def load_text(name: str, split: str, *, text_dir: str | None = None) -> np.ndarray:
  """The bytes of a split, uint8 [N] (read-only).

  Args:
    name: a key of :data:`TEXT_DATASETS` ('text').
    split: 'train', 'valid' or 'test'.
    text_dir: the corpus folder; default ``$SPARSEJAX_TEXT_DIR``.

  Raises:
    MissingDataError (a FileNotFoundError and a ValueError): no folder given, or the
      split's file is not in it (names both).
  """
  spec = get_spec(name)
  if not isinstance(spec, TextSpec):
    raise ValueError(f"name={name!r} is an image dataset; load it with load_split.")
  _check_split(spec, split)
  text_dir = text_dir or os.environ.get(TEXT_DIR_ENV) or None
  if text_dir is None:
    raise MissingDataError(
      f"Dataset {name!r} needs a folder: pass text_dir (the --text_dir flag) or set "
      f"${TEXT_DIR_ENV} to {spec.hint}."
    )
  path = split_path(text_dir, split)
  if path is None:
    raise MissingDataError(
      f"Dataset {name!r}: text_dir={text_dir!r} has neither {split}.txt.gz nor "
      f"{split}.txt; it must be {spec.hint}."
    )
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    corpus = np.frombuffer(f.read(), np.uint8)
  if corpus.size < 2:
    raise ValueError(f"{path} holds {corpus.size} bytes; a split needs at least 2.")
  return corpus


# Synthetic text: words of a random vocabulary chained by a random bigram model.
_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)


def synthetic_text(
  name: str, split: str, num_bytes: int | None = None, seed: int = 0
) -> np.ndarray:
  """Learnable random text with the dtype of a real split: uint8 [num_bytes].

  64 random lowercase words (2 to 7 letters) follow each other by a random sparse
  bigram model (each word has 4 possible successors) and are separated by a space, a
  newline after every 12th. The words and the bigram model depend on ``seed`` only,
  so every split shares them and held-out loss measures learning; the word sequence
  depends on the split.

  Args:
    name: a key of :data:`TEXT_DATASETS`.
    split: 'train', 'valid' or 'test'.
    num_bytes: N; default 65536 for train, 8192 for valid and test.
    seed: non-negative int.
  """
  spec = get_spec(name)
  if not isinstance(spec, TextSpec):
    raise ValueError(f"name={name!r} is an image dataset; use synthetic_split.")
  _check_split(spec, split)
  if num_bytes is None:
    num_bytes = 65536 if split == "train" else 8192
  if isinstance(num_bytes, bool) or int(num_bytes) != num_bytes or num_bytes < 2:
    raise ValueError(f"num_bytes={num_bytes!r} must be an integer >= 2.")
  rng = np.random.default_rng([seed, 7])
  words = [rng.choice(_LETTERS, rng.integers(2, 8)).tobytes() for _ in range(64)]
  successors = rng.integers(0, len(words), (len(words), 4))
  walk = np.random.default_rng([seed, 8, spec.splits.index(split)])
  out, size, w, count = [], 0, int(walk.integers(len(words))), 0
  while size < num_bytes:
    count += 1
    piece = words[w] + (b"\n" if count % 12 == 0 else b" ")
    out.append(piece)
    size += len(piece)
    w = int(successors[w, walk.integers(4)])
  return np.frombuffer(b"".join(out)[:num_bytes], np.uint8)


# ----------------------------------------------------------------- windows


def _check_context(num_bytes: int, context: int, minimum_windows: int = 1) -> None:
  if isinstance(context, bool) or int(context) != context or context < 1:
    raise ValueError(f"context={context!r} must be a positive integer (tokens per window).")
  if (num_bytes - context) // (context + 1) < minimum_windows:
    raise ValueError(
      f"context={context}: a split of {num_bytes} bytes holds no training window of "
      f"{context + 1} bytes at every offset (it needs at least {2 * context + 1} bytes)."
    )


def num_train_windows(num_bytes: int, context: int) -> int:
  """M = (N - T) // (T + 1): the training windows of an epoch (at any offset <= T)."""
  _check_context(num_bytes, context)
  return (num_bytes - context) // (context + 1)


def window_starts(num_bytes: int, context: int, batch_size: int, seed: int, step: int):
  """First byte of each window of training batch ``step``: int64 [batch_size].

  Step s is slice s mod (M // B) of epoch e = s // (M // B): windows
  ``batch_indices(M, B, seed, s)`` at ``offset_e + i (T + 1)``, with ``offset_e``
  uniform in [0, T] per (seed, epoch). A pure function of (seed, step).
  """
  m = num_train_windows(num_bytes, context)
  idx = batch_indices(m, batch_size, seed, step)
  epoch = int(step) // steps_per_epoch(m, batch_size)
  offset = int(np.random.default_rng([seed, epoch, 1]).integers(0, context + 1))
  return offset + idx * (context + 1)


def windows(corpus: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
  """``corpus[s : s + length]`` for each start: [len(starts), length], corpus dtype."""
  return corpus[np.asarray(starts)[:, None] + np.arange(length)]


def text_train_batches(
  corpus: np.ndarray,
  context: int,
  batch_size: int,
  seed: int,
  start_step: int = 0,
  prefetch: int = 2,
  *,
  num_steps: int | None = None,
  sharding: jax.sharding.Sharding | None = None,
) -> Iterator[Batch]:
  """Training batches of token windows from step ``start_step`` on (:func:`window_starts`).

  Args:
    corpus: uint8 [N] on the host.
    context: T, the model's input length (windows have T + 1 bytes).
    batch_size, seed, start_step, prefetch, num_steps, sharding: as
      :func:`sparsejax.data.train_batches`.

  Yields:
    {"tokens": uint8 [B, T + 1]} as device arrays (inputs ``[:, :-1]``, targets ``[:, 1:]``).
  """
  corpus = np.asarray(corpus)
  window_starts(len(corpus), context, batch_size, seed, start_step)  # validates early
  lo, hi = process_rows(sharding, batch_size)

  def host_batches():
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      starts = window_starts(len(corpus), context, batch_size, seed, step)[lo:hi]
      yield {"tokens": windows(corpus, starts, context + 1)}
      step += 1

  return _prefetch(host_batches(), prefetch, _put(sharding, batch_size))


def num_eval_windows(num_bytes: int, context: int) -> int:
  """ceil((N - 1) / T): the evaluation windows that predict every byte after the first."""
  if isinstance(context, bool) or int(context) != context or context < 1:
    raise ValueError(f"context={context!r} must be a positive integer (tokens per window).")
  return -(-(num_bytes - 1) // context)


def text_eval_batches(
  corpus: np.ndarray,
  context: int,
  batch_size: int,
  prefetch: int = 2,
  *,
  sharding: jax.sharding.Sharding | None = None,
) -> Iterator[Batch]:
  """The split in order as ceil(W / B) batches of B windows (W = :func:`num_eval_windows`):
  window i is bytes ``[i T, i T + T + 1)``, zero-padded past the end; every byte after
  the first is a target exactly once.

  Yields:
    {"tokens": uint8 [B, T + 1], "mask": bool [B, T]} as device arrays; ``mask`` is
    True at the real targets (padding and padded windows count 0).
  """
  corpus = np.asarray(corpus)
  n = len(corpus)
  if n < 2:
    raise ValueError(f"corpus has {n} bytes; evaluation needs at least 2.")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
  count = num_eval_windows(n, context)
  lo, hi = process_rows(sharding, batch_size)
  padded = np.concatenate([corpus, np.zeros(count * context + 1 - n, corpus.dtype)])
  positions = np.arange(1, context + 1)

  def host_batches():
    for first in range(0, count, batch_size):
      index = np.arange(first, first + batch_size)
      starts = np.minimum(index, count - 1) * context
      tokens = windows(padded, starts, context + 1)
      # target j of window i is byte i T + j + 1: real when < n and i is a window
      mask = (starts[:, None] + positions < n) & (index < count)[:, None]
      yield {"tokens": tokens[lo:hi], "mask": mask[lo:hi]}

  return _prefetch(host_batches(), prefetch, _put(sharding, batch_size))
