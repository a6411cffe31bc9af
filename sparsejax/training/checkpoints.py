"""Checkpoints: Orbax saves with a checksum, the newest intact one restored.

A checkpoint holds the train state (its pytree leaves: ``tx`` is rebuilt by
:func:`sparsejax.training.create_train_state`), the history of evaluations and mask
updates, the run's settings (what must match to resume) and a SHA-256 of the state
(:func:`state_checksum`). One that cannot be read or does not match is logged by
step, moved to ``<workdir>-corrupt/``, and the next older one is used (with none left:
a fresh start). A state with a NaN or infinite value is never saved.

A folder that cannot be written (read-only, a full disk, a file where the folder should
be) is a :class:`CheckpointWriteError` naming it, raised when :class:`Checkpoints` opens
and by the save that fails, never minutes later: Orbax creates a step's folder in this
thread (``create_directories_asynchronously=False``), because with the folder created in
its background thread a failure left its other threads waiting 300 s for the folder's
signal (the process then hung at exit). The checkpoints already there are kept.

Orbax reports every save and restore at INFO through absl logging; while a
:class:`Checkpoints` is open those lines are dropped unless ``verbose`` (its warnings
and errors always pass).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging as std_logging
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from sparsejax import files
from sparsejax.training.state import TrainState

PyTree = Any


class DivergedError(FloatingPointError):
  """Training met a non-finite loss or parameter; ``step`` is the first step seen so.

  Raised by :func:`sparsejax.training.train` after it has stopped cleanly (data
  pipeline closed, pending checkpoints finished); no checkpoint holding non-finite
  values is ever saved."""

  def __init__(self, step: int, what: str):
    super().__init__(
      f"training diverged at step {step}: {what}; lower config.learning_rate or check the inputs."
    )
    self.step = step
    self.what = what


class CorruptCheckpointError(RuntimeError):
  """A checkpoint that cannot be read or whose checksum does not match."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"checkpoint at step {step} is unusable: {reason}")
    self.step = step
    self.reason = reason


class CheckpointWriteError(OSError):
  """A checkpoint folder that cannot be written; the checkpoints in it are kept.

  Attributes:
    directory: the checkpoint folder.
    step: the step whose save failed (None: the folder failed its check on opening, or
      a pending save failed when closing).
  """

  def __init__(self, directory: str, step: int | None, cause: OSError):
    what = "cannot be written" if step is None else f"cannot take the checkpoint of step {step}"
    super().__init__(
      f"checkpoint folder {directory} {what}: {cause.strerror or cause}. The checkpoints already "
      "there are kept; make the folder writable (or free space) and run again to resume."
    )
    self.directory = directory
    self.step = step
    self.errno = cause.errno


def state_checksum(state: TrainState) -> str:
  """SHA-256 over every array of ``state`` (path, dtype, shape and bytes), as hex."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state)):
    if jnp.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


@jax.jit
def all_finite(tree) -> jax.Array:
  """bool []: no NaN or infinity in any floating-point leaf of ``tree``."""
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


_LATER_FIELDS = ("optimizer", "schedule", "warmup_fraction", "beta2", "grad_clip")


def run_meta(config, seed: int, key: jax.Array, masked: bool, updater=None) -> dict:
  """What must match for a checkpoint to be resumed (JSON-able)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  # Fields added after the paper's recipe (the optimizer choice) are recorded only where
  # they differ from their defaults: checkpoints of earlier runs still resume.
  later = {f.name: f.default for f in dataclasses.fields(config) if f.name in _LATER_FIELDS}
  meta = {
    "config": {
      k: list(v) if isinstance(v, tuple) else v
      for k, v in dataclasses.asdict(config).items()
      if k not in later or v != later[k]
    },
    "seed": int(seed),
    "key": np.asarray(key).ravel().tolist(),
    "masked": bool(masked),
  }
  if updater is not None:
    meta["updater"] = repr(updater)
  return meta


def split_history(saved: list) -> tuple[list, list]:
  """(evaluations, mask-update records) of a checkpoint's history item."""
  return (
    [h for h in saved if "mask_update" not in h],
    [h["mask_update"] for h in saved if "mask_update" in h],
  )


# ----------------------------------------------------------------- Orbax's logs


_ORBAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__))) + os.sep


class _QuietOrbax(std_logging.Filter):
  """Drops records below WARNING that Orbax's own modules log (absl logging sends every
  module's lines through the one 'absl' logger, so the record's source file tells
  Orbax's apart, not the logger's name)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not record.pathname.startswith(_ORBAX_DIR)


# ------------------------------------------------------------------ the manager


@contextlib.contextmanager
def _sigint_held():
  """SIGINT held back for the block and raised as a KeyboardInterrupt at its end: an
  Orbax save or wait cut midway leaves background threads that fail at interpreter
  shutdown with tracebacks (in the main thread only, where signals arrive)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    raise KeyboardInterrupt


class Checkpoints:
  """An Orbax ``CheckpointManager`` over ``workdir`` with checksums, the fallback to
  the newest intact checkpoint, and Orbax's INFO lines filtered (unless ``verbose``).

  Use as a context manager; leaving it waits for pending saves and closes Orbax.
  """

  def __init__(self, workdir: str, meta: dict, *, keep: int = 3, verbose: bool = False):
    """Opens (creates) the checkpoint folder ``workdir``.

    Raises:
      CheckpointWriteError: ``workdir`` cannot be created or written.
    """
    self.meta = meta
    try:
      files.check_writable_dir(workdir)  # before any work that a save would lose
    except OSError as err:
      raise CheckpointWriteError(os.path.abspath(workdir), None, err) from err
    self._filter = None if verbose else _QuietOrbax()
    if self._filter is not None:
      std_logging.getLogger("absl").addFilter(self._filter)
    try:
      self.manager = ocp.CheckpointManager(
        workdir,
        options=ocp.CheckpointManagerOptions(
          max_to_keep=keep,
          create=True,
          # A folder that cannot be made raises in save(); see the module docstring.
          async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        ),
      )
    except BaseException:
      self._remove_filter()
      raise

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # an error on the way out is logged: the one that ended the block goes on
      self.close()
    except Exception as err:  # pylint: disable=broad-except
      logging.error("Closing the checkpoints in %s after an error: %s", self.directory, err)

  def close(self) -> None:
    """Waits for pending saves and closes Orbax.

    Raises:
      CheckpointWriteError: a pending save failed to write.
    """
    try:
      try:
        with _sigint_held():
          self.manager.wait_until_finished()
      except OSError as err:
        raise CheckpointWriteError(self.directory, None, err) from err
      finally:
        self.manager.close()
    finally:
      self._remove_filter()

  def _remove_filter(self) -> None:
    if self._filter is not None:
      std_logging.getLogger("absl").removeFilter(self._filter)
      self._filter = None

  @property
  def directory(self) -> str:
    return os.fspath(self.manager.directory)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, history: list) -> None:
    """Saves ``state`` at ``step`` (once per step) with its checksum.

    Raises:
      DivergedError: the state holds a non-finite value (nothing is saved).
      CheckpointWriteError: the step's folder cannot be written (or a pending save of
        an earlier step failed); the checkpoints already saved are kept.
    """
    if self.manager.latest_step() == step:
      return
    if not bool(all_finite(state)):
      raise DivergedError(step, "non-finite parameters or optimizer state")
    try:
      with _sigint_held():
        self.manager.save(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            history=ocp.args.JsonSave(history),
            meta=ocp.args.JsonSave(self.meta),
            checksum=ocp.args.JsonSave({"sha256": state_checksum(state), "step": step}),
          ),
          force=True,
        )
    except OSError as err:
      raise CheckpointWriteError(self.directory, step, err) from err

  def restore_latest(self, state: TrainState, stop: int) -> tuple[TrainState, list] | None:
    """(state, history) of the newest checkpoint that reads back intact, or None.

    ``state`` gives the structure (and ``tx``) to restore into. A checkpoint that
    cannot be read or fails its checksum is logged (naming its step), moved to
    ``<workdir>-corrupt/`` and the next older one is tried; with none left: None.

    Raises:
      ValueError: a checkpoint past ``stop``, or of other settings or masks.
      DivergedError: the newest intact checkpoint holds non-finite values.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      if step > stop:
        raise ValueError(
          f"workdir={self.directory} holds a checkpoint at step {step}, past num_steps={stop}."
        )
      try:
        restored = self._restore(step, state)
      except CorruptCheckpointError as err:
        moved = self._set_aside(step)
        logging.error(
          "%s in %s; moved to %s, falling back to an earlier checkpoint.",
          err,
          self.directory,
          moved,
        )
        self.manager.reload()
        continue
      if not bool(all_finite(restored[0])):
        raise DivergedError(step, "the checkpoint holds non-finite values")
      logging.info("Resumed from %s at step %d.", self.directory, step)
      return restored
    return None

  def has_checkpoints(self) -> bool:
    return bool(self.manager.all_steps())

  def _read(self, step: int, state: TrainState):
    """(saved meta, state, history) of step ``step``, checksum verified.

    Raises:
      CorruptCheckpointError: any read failure (missing or truncated files, an empty
        step folder) or a checksum that does not match what was read.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          meta=ocp.args.JsonRestore(),
          checksum=ocp.args.JsonRestore(),
          state=ocp.args.StandardRestore(abstract),
          history=ocp.args.JsonRestore(),
        ),
      )
      saved_sum = restored["checksum"]["sha256"]
    except Exception as err:  # pylint: disable=broad-except
      # Orbax and TensorStore raise many types for damaged files; all mean "unusable".
      raise CorruptCheckpointError(step, f"{type(err).__name__}: {str(err)[:300]}") from err
    got = state_checksum(restored["state"])
    if got != saved_sum:
      raise CorruptCheckpointError(
        step, f"checksum {got[:12]}... does not match the saved {str(saved_sum)[:12]}..."
      )
    return restored["meta"], restored["state"], list(restored["history"])

  def _restore(self, step: int, state: TrainState):
    saved_meta, restored_state, history = self._read(step, state)
    meta = self.meta
    if saved_meta != meta:
      differing = sorted(k for k in set(meta) | set(saved_meta) if meta.get(k) != saved_meta.get(k))
      raise ValueError(
        f"workdir={self.directory} holds a run with different settings "
        f"({', '.join(differing)}): saved {saved_meta}, now {meta}. Use another "
        "workdir or the same settings to resume."
      )
    if state.masks is not None and "updater" not in meta:  # moving masks differ, rightly
      same = jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)), state.masks, restored_state.masks
      )
      if not all(jax.tree.leaves(same)):
        raise ValueError(
          f"workdir={self.directory} holds a run with different masks; "
          "use another workdir to train these masks."
        )
    return restored_state, history

  def _set_aside(self, step: int) -> str:
    """Moves a corrupted step folder out of the checkpoint folder (kept for inspection)."""
    workdir = self.directory.rstrip("/")
    aside = os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + "-corrupt")
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    os.replace(os.path.join(workdir, str(step)), target)
    return target
