"""Batching on the host: batch indices as a pure function of (seed, step), training and
evaluation iterators that put batches on the devices ahead of the step (sharded along
the batch axis; with several processes, each gathers only its rows).

A run resumed at step s sees exactly the batches an uninterrupted run would
(:func:`batch_indices`).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from sparsejax.data.specs import Batch


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  return num_examples // batch_size


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of examples in ``epoch``: int64 [num_examples], read-only.

  A fresh permutation per (seed, epoch) from ``np.random.default_rng``; cached
  because every step of an epoch slices the same one.
  """
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of the examples in training batch ``step``: int64 [batch_size].

  Step s is slice s mod (N // B) of the permutation of epoch s // (N // B); the
  last N mod B examples of each epoch's order are dropped. A pure function of
  (seed, step), so resuming at step s reproduces an uninterrupted run.
  """
  for arg, value, low in (
    ("num_examples", num_examples, 1),
    ("batch_size", batch_size, 1),
    ("seed", seed, 0),
    ("step", step, 0),
  ):
    if int(value) != value or value < low:
      raise ValueError(f"{arg}={value!r} must be an integer >= {low}")
  if batch_size > num_examples:
    raise ValueError(f"batch_size={batch_size} must be <= num_examples={num_examples}")
  epoch, i = divmod(int(step), steps_per_epoch(num_examples, batch_size))
  return epoch_permutation(int(num_examples), int(seed), epoch)[
    i * batch_size : (i + 1) * batch_size
  ]


class _Raised:
  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def process_rows(sharding: jax.sharding.Sharding | None, batch_size: int) -> tuple[int, int]:
  """Rows ``[lo, hi)`` of a global batch of ``batch_size`` examples that this process's
  devices hold under ``sharding`` (batch axis first): ``(0, batch_size)`` unless the
  sharding spans devices of other processes (multi-host data parallelism).

  Raises:
    ValueError: this process's rows are not one contiguous block (a mesh whose devices
      are not grouped by process).
  """
  if sharding is None or sharding.is_fully_addressable:
    return 0, batch_size
  spans = sorted(
    {
      (s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
      for s in sharding.addressable_devices_indices_map((batch_size,)).values()
    }
  )
  if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
    raise ValueError(
      f"sharding={sharding!r} gives process {jax.process_index()} the rows "
      f"{spans} of a batch, not one block; order the mesh's devices by process."
    )
  return spans[0][0], spans[-1][1]


def _put(sharding, global_size: int):
  """Host batch -> device arrays: ``jax.device_put`` onto ``sharding``; when the
  sharding spans several processes, the batch holds only this process's rows
  (:func:`process_rows`) and becomes a global array of ``global_size`` rows."""
  if sharding is None:
    return jax.device_put
  if sharding.is_fully_addressable:
    return lambda b: jax.device_put(b, sharding)
  return lambda b: jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x, (global_size,) + x.shape[1:]), b
  )


def _prefetch(batches: Iterable[Batch], size: int, put=None) -> Iterator[Batch]:
  """Puts host batches on the devices (``put``, default ``jax.device_put``) ``size``
  ahead, from a background thread."""
  put = put or jax.device_put
  if size <= 0:  # Synchronous: simpler to debug.
    for batch in batches:
      yield put(batch)
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def offer(item) -> bool:
    # Time out so that the thread ends when the consumer stops early.
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for batch in batches:
        if not offer(put(batch)):
          return
      offer(_END)
    except BaseException as err:  # Re-raised in the consumer.
      offer(_Raised(err))

  threading.Thread(target=produce, daemon=True, name="sparsejax-prefetch").start()
  try:
    while True:
      item = q.get()
      if item is _END:
        return
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()


def train_batches(
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  seed: int,
  start_step: int = 0,
  prefetch: int = 2,
  *,
  num_steps: int | None = None,
  sharding: jax.sharding.Sharding | None = None,
) -> Iterator[Batch]:
  """Training batches from step ``start_step`` on, as :func:`batch_indices` orders them.

  Args:
    images: uint8 [N, H, W, C] on the host.
    labels: int32 [N].
    batch_size: B (<= N).
    seed: shuffling seed.
    start_step: first step to yield (to resume).
    prefetch: batches put on the device ahead by a background thread (0: none).
    num_steps: stop after this many batches; None: never stop.
    sharding: passed to ``jax.device_put`` (e.g. a batch-axis NamedSharding). One
      spanning several processes: each process gathers only its rows of every
      batch (:func:`process_rows`) and the batch is a global array.

  Yields:
    {"image": uint8 [B, H, W, C], "label": int32 [B]} as device arrays.
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"labels has {len(labels)} entries but images has {n}")
  batch_indices(n, batch_size, seed, start_step)  # Validates the arguments early.
  lo, hi = process_rows(sharding, batch_size)

  def host_batches():
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      idx = batch_indices(n, batch_size, seed, step)[lo:hi]
      yield {"image": images[idx], "label": labels[idx].astype(np.int32)}
      step += 1

  return _prefetch(host_batches(), prefetch, _put(sharding, batch_size))


def eval_batches(
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  prefetch: int = 2,
  *,
  sharding: jax.sharding.Sharding | None = None,
) -> Iterator[Batch]:
  """The split in order, ceil(N / B) batches, every one of size B.

  The last batch is padded with zero images and label 0; ``mask`` marks the real
  examples, so a jitted eval step sees one shape and sums ``mask``-weighted
  metrics (accuracy = sum(mask * correct) / sum(mask)).

  Yields:
    {"image": uint8 [B, H, W, C], "label": int32 [B], "mask": bool [B]} as device
    arrays.
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"labels has {len(labels)} entries but images has {n}")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
  lo, hi = process_rows(sharding, batch_size)

  def host_batches():
    for start in range(0, n, batch_size):
      image = images[start : start + batch_size]
      label = labels[start : start + batch_size].astype(np.int32)
      k = len(image)
      mask = np.arange(batch_size) < k
      if k < batch_size:
        image = np.concatenate([image, np.zeros((batch_size - k,) + image.shape[1:], image.dtype)])
        label = np.concatenate([label, np.zeros(batch_size - k, np.int32)])
      yield {"image": image[lo:hi], "label": label[lo:hi], "mask": mask[lo:hi]}

  return _prefetch(host_batches(), prefetch, _put(sharding, batch_size))
