"""The training loop: :func:`train` with evaluation, checkpoints and resume, moving masks
(:class:`MaskUpdates`) and progress lines (:class:`Progress`), for image classifiers
and byte-level language models alike.

Reproducibility: batch ``s`` comes from :func:`sparsejax.data.batch_indices` (a
function of ``(seed, s)``) and the augmentation key of step ``s`` is ``fold_in(key,
s)``, so a run resumed from a checkpoint at step ``s`` sees the same inputs as an
uninterrupted run and ends with the same parameters.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax import data, dynamic, effective, tracing
from sparsejax import masks as masks_lib
from sparsejax.training import in_step
from sparsejax.training.checkpoints import Checkpoints, DivergedError, run_meta, split_history
from sparsejax.training.mesh import DATA_AXIS, check_divisible, make_mesh, replicate
from sparsejax.training.state import TrainState, create_train_state
from sparsejax.training.steps import (
  apply_step,
  dataset_spec,
  evaluate,
  evaluate_text,
  forward_backward,
  language_model_metrics,
  train_step,
)

PyTree = Any


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns.

  Attributes:
    history: [{"step", "test_loss", "test_accuracy"}] at every evaluation (those of
      earlier, resumed-from segments included); a language model's also have
      "test_bits_per_byte" and "test_perplexity".
    final_test_loss, final_test_accuracy: at the last step (a language model's: mean
      next-byte loss in nats, next-byte accuracy).
    steps_per_second: training steps per second in this call, excluding the first
      step (compilation), evaluations, checkpoints and mask updates between steps
      (each one's compilation included; their cost is ``update_seconds``), nan if
      fewer than 2 steps; the speed the last progress line logs. Updates inside the
      step (``update_in_jit``) are part of the steps.
    wall_time: seconds spent in this call.
    start_step: the step this call started from (> 0 after a resume).
    state: the final :class:`TrainState` (replicated over the mesh).
    mask_updates: the records of :class:`MaskUpdates` (empty without an updater),
      those of earlier, resumed-from segments included.
    update_seconds: wall time of each mask update between steps in this call, in
      order (the first one includes its compilation); empty in-jit.
    final_metrics: the last evaluation's entry of ``history`` without its step
      (test_loss, test_accuracy; test_bits_per_byte and test_perplexity for text).
  """

  history: list[dict]
  final_test_loss: float
  final_test_accuracy: float
  steps_per_second: float
  wall_time: float
  start_step: int
  state: TrainState
  mask_updates: list = dataclasses.field(default_factory=list)
  update_seconds: list = dataclasses.field(default_factory=list)
  final_metrics: dict = dataclasses.field(default_factory=dict)


class Interrupted(KeyboardInterrupt):
  """Training was interrupted (Ctrl-C, SIGINT) after ``step`` of ``stop`` steps.

  Raised by :func:`train` in place of the KeyboardInterrupt, after a clean stop (the data
  pipeline closed, pending checkpoints finished); a call with the same ``workdir``
  resumes from the newest checkpoint. It is a KeyboardInterrupt, so code that does not
  know it sees one."""

  def __init__(self, step: int, stop: int):
    super().__init__(f"training interrupted at step {step} of {stop}")
    self.step = step
    self.stop = stop


# ------------------------------------------------------------ moving masks


@jax.jit
def _update_stats(old: PyTree, new: PyTree, effective_masks: PyTree) -> dict:
  """Kept, dropped and grown weights of a mask update (and, with effective masks,
  active weights and grown weights that are not active), as int32 scalars."""
  count = lambda fn, *trees: sum(
    jnp.sum(fn(*xs), dtype=jnp.int32) for xs in zip(*(masks_lib.mask_leaves(t) for t in trees))
  )
  stats = {
    "kept": count(lambda n: n, new),
    "dropped": count(lambda o, n: o & ~n, old, new),
    "grown": count(lambda o, n: n & ~o, old, new),
  }
  if effective_masks is not None:
    stats["active"] = count(lambda e: e, effective_masks)
    stats["grown_dead"] = count(lambda o, n, e: n & ~o & ~e, old, new, effective_masks)
  return stats


class MaskUpdates:
  """Runs a :class:`sparsejax.dynamic.Updater` inside :func:`train` and logs each update.

  At an update step s (before the optimizer step s) the updater computes new masks from
  the current params (and, when it ``needs_grads``, the dense gradient of step s at
  those params, which the optimizer step s then applies to the weights kept (grown
  weights stay 0 through it): one forward and backward pass per step, as in RigL's code;
  with ``needs_sweep``, a connectivity sweep of the model; with ``target ==
  'effective'``, through its ``update_effective`` hook), the masks in the optimizer
  state are replaced (no recompilation) and dropped weights are set to 0 (not with
  ``straight_through``). Each update appends a record: step, kept weights, dropped and
  grown weights, direct compression and, with ``track_effective``, effective
  compression, active units, dead kept weights (kept but inactive) and grown weights
  dead on arrival. With ``reset_optimizer_state`` (default, as RigL's code), grown
  weights start with zero optimizer state (:func:`sparsejax.optim.zero_state_where`).



  With ``in_jit`` the update runs inside the jitted step instead
  (:func:`sparsejax.training.in_step.update_train_step`, :meth:`step`): the same masks,
  no host round trip; the records (kept, dropped, grown, direct compression) are read
  with the progress lines and before checkpoints (:meth:`flush`). Effective tracking
  and effective targets need the host and refuse ``in_jit``.
  """

  def __init__(
    self,
    updater,
    *,
    model,
    spec,
    input_shape,
    step_key,
    track_effective: bool = False,
    in_jit: bool = False,
    reset_optimizer_state: bool = True,
  ):
    dynamic.check_updater(updater)
    if in_jit:
      if track_effective or updater.target == "effective":
        raise ValueError(
          "update_in_jit=True: effective tracking and effective update targets search on "
          "the host between steps; pass track_effective=False and a direct target, or "
          "update_in_jit=False."
        )
      jax.eval_shape(updater.update_due, jnp.int32(0))  # ValueError: no in-jit schedule
    self.updater = updater
    self.model, self.spec, self.input_shape = model, spec, tuple(input_shape)
    self.step_key = step_key
    self.track_effective = track_effective
    self.in_jit, self.reset_optimizer_state = bool(in_jit), bool(reset_optimizer_state)
    self.records: list[dict] = []
    self.seconds: list[float] = []  # wall time of each update between steps
    self._pending: list = []  # (step, device stats) of in-jit updates not read yet
    self._sweep = (
      effective.connectivity_sweep(model, self.input_shape, units=False)
      if updater.needs_sweep
      else None
    )

  def step(self, state: TrainState, batch, step: int, donate: bool = False):
    """Train step ``step`` with its mask update inside (``in_jit``): (state, metrics);
    ``donate`` as :func:`sparsejax.training.train_step`."""
    state, metrics = in_step.update_train_step(
      state,
      batch,
      self.step_key,
      model=self.model,
      spec=self.spec,
      updater=self.updater,
      sweep=self._sweep,
      reset_optimizer_state=self.reset_optimizer_state,
      donate=donate,
    )
    stats = metrics.pop("mask_update")
    if self.updater.is_update_step(step):
      self._pending.append((step, stats))
      self._total = sum(math.prod(m.shape) for m in masks_lib.mask_leaves(state.masks))
    return state, metrics

  def flush(self) -> None:
    """Records of the in-jit updates done so far (one transfer)."""
    if not self._pending:
      return
    fetched = jax.device_get([x for _, x in self._pending])
    for (step, _), stats in zip(self._pending, fetched):
      self._record(step, stats, self._total)
    self._pending = []

  def _record(self, step: int, stats: dict, total: int, conn=None) -> None:
    kept = int(stats["kept"])
    record = {
      "step": int(step),
      "kept": kept,
      "dropped": int(stats["dropped"]),
      "grown": int(stats["grown"]),
      "direct_compression": total / kept if kept else float("inf"),
    }
    if conn is not None:
      active = int(stats["active"])
      record.update(
        effective_compression=total / active if active else float("inf"),
        dead_kept=kept - active,
        grown_dead=int(stats["grown_dead"]),
        active_units=int(sum(conn.active_units.values())),
        total_units=int(sum(conn.total_units.values())),
      )
    self.records.append(record)
    logging.info(
      "mask update at step %d: %s",
      step,
      ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in record.items()
        if k != "step"
      ),
    )

  def __call__(self, state: TrainState, batch, step: int) -> TrainState:
    """The state after the mask update due before step ``step`` (the update alone: a
    loop that calls it runs its own train step after it, whose gradient is then
    computed again at the new params; :meth:`update` and
    :func:`sparsejax.training.apply_step` share one pass, as :func:`train` does)."""
    return self.update(state, batch, step)[0]

  def forward_backward(self, state: TrainState, batch):
    """The forward and backward pass of the step at ``state`` when the updater reads
    gradients (:func:`sparsejax.training.forward_backward`), else None."""
    if not self.updater.needs_grads:
      return None
    return forward_backward(state, batch, self.step_key, model=self.model, spec=self.spec)

  def update(self, state: TrainState, batch, step: int, outputs=None):
    """The mask update due before step ``step``, between steps: (state, outputs). For an
    updater that reads gradients (RigL), ``outputs`` is step ``step``'s forward and
    backward pass at the params before the update (:meth:`forward_backward`, computed
    here unless given: its gradient is the growth criterion), and
    ``apply_step(state, outputs)`` finishes the step with that gradient under the new
    masks, as the in-jit step does; otherwise None and the ordinary train step
    follows."""
    u, old = self.updater, state.masks
    key = in_step.update_key(self.step_key, step)
    if outputs is None:
      outputs = self.forward_backward(state, batch)
    grads = None if outputs is None else outputs[1]
    if u.target == "effective":
      new = u.update_effective(
        state.params,
        grads,
        old,
        step,
        key,
        model=self.model,
        input_shape=self.input_shape,
        sweep=self._sweep,
      )
    else:
      new = u.update(state.params, grads, old, jnp.int32(step), key, sweep=self._sweep)
    new = jax.tree.map(lambda m, ref: replicate(m, ref.sharding), new, old)
    params, opt_state = dynamic.apply_masks(
      u, state.params, state.opt_state, old, new, self.reset_optimizer_state
    )
    state = state.replace(params=params, opt_state=opt_state)
    if outputs is not None:
      outputs = in_step.hold_grown(outputs, old, new)
    total = masks_lib.count(new)[1]
    effective_masks = conn = None
    if self.track_effective:
      conn = effective.connectivity(self.model, new, self.input_shape)
      effective_masks = conn.masks
    stats = jax.device_get(_update_stats(old, new, effective_masks))  # one transfer
    self._record(step, stats, total, conn)
    return state, outputs


# ------------------------------------------------------------------ progress


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """When a progress line is due and how fast training goes, compilation excluded.

  A line is due every ``log_seconds`` seconds or every ``every_steps`` steps (1% of
  the run's ``stop`` steps, rounded up, at most ``log_every``), whichever comes first,
  and at the last step. The speed is the steps after the first one of this call (it
  compiles) over the time since that one finished, evaluations, checkpoints and mask
  updates between steps (:meth:`add_pause`; each one compiles the first time) excluded;
  the last line's speed is ``TrainResult.steps_per_second``.
  """

  def __init__(
    self,
    start: int,
    stop: int,
    *,
    log_seconds: float,
    log_every: int,
    clock: Callable[[], float] = time.perf_counter,
  ):
    self.start, self.stop, self.clock = start, stop, clock
    self.log_seconds = float(log_seconds)
    self.every_steps = max(1, min(int(log_every), -(-stop // 100)))
    self.timed_from: float | None = None  # when the first (compiling) step finished
    self.timed_steps = 0
    self.paused = 0.0  # side work since timed_from
    self.last_log = clock()
    self.rate = float("nan")  # steps/s at the last line

  def step_done(self, done: int) -> bool:
    """Counts step ``done - 1`` as finished (the first of the call must be finished
    on the device: it starts the clock); True when a line is due after it."""
    now = self.clock()
    if self.timed_from is None:
      self.timed_from = now
    else:
      self.timed_steps += 1
    return (
      done == self.stop or done % self.every_steps == 0 or now - self.last_log >= self.log_seconds
    )

  def add_pause(self, seconds: float) -> None:
    """Side work (evaluation, checkpoint) that does not count as training time."""
    self.paused += seconds

  def line(self, done: int, loss: float, accuracy: float) -> str:
    """The progress line after step ``done`` (the queued steps must have finished: a
    fetch of their losses waits for them); updates :attr:`rate`."""
    now = self.clock()
    seconds = now - self.timed_from - self.paused if self.timed_from is not None else 0.0
    self.rate = self.timed_steps / seconds if self.timed_steps and seconds > 0 else float("nan")
    self.last_log = now
    speed = f"{self.rate:.1f} steps/s" if math.isfinite(self.rate) else "- steps/s (compiling)"
    eta = _format_seconds((self.stop - done) / self.rate) if math.isfinite(self.rate) else "?"
    return f"step {done}/{self.stop}: loss {loss:.4f}, accuracy {accuracy:.4f}, {speed}, ETA {eta}"


# ---------------------------------------------------------------------- train


def train(
  model: flax.linen.Module,
  spec,
  config,
  train_data: tuple[np.ndarray, np.ndarray] | np.ndarray,
  test_data: tuple[np.ndarray, np.ndarray] | np.ndarray,
  *,
  input_shape=None,
  masks: PyTree = None,
  params: PyTree = None,
  seed: int = 0,
  key: jax.Array | None = None,
  workdir: str | None = None,
  checkpoint_every: int = 5000,
  keep_checkpoints: int = 3,
  eval_every: int = 5000,
  log_every: int = 500,
  log_seconds: float = 30.0,
  num_steps: int | None = None,
  eval_batch_size: int | None = None,
  devices: Sequence[jax.Device] | None = None,
  prefetch: int = 2,
  updater=None,
  track_effective: bool = False,
  update_in_jit: bool = False,
  reset_optimizer_state: bool = True,
  verbose_checkpoints: bool = False,
) -> TrainResult:
  """Trains ``model`` (masked when ``masks`` is given), resuming from ``workdir``.

  Args:
    model: the Flax module.
    spec: a ``models.ModelSpec``, ``data.DatasetSpec``, ``data.TextSpec`` or dataset
      name (decides the normalization and augmentation, or next-token training on
      text); None: ``config.dataset``.
    config: a ``TrainConfig``; its ``train_steps`` sets the learning-rate schedule.
    train_data, test_data: (uint8 images [N, H, W, C], int32 labels [N]) on the host;
      for a text dataset, the splits' bytes, uint8 [N] (trained on windows of T + 1
      bytes, :func:`sparsejax.data.text_train_batches`; evaluated on every byte,
      :func:`sparsejax.training.evaluate_text`).
    input_shape: one example's shape: default the image shape of an image dataset;
      for text the context (T,) (default: the ModelSpec's ``input_shape`` when
      ``spec`` is one; else required).
    masks: mask tree for ``params`` (bool at prunable leaves, None elsewhere);
      None trains densely.
    params: initial parameters (those the masks were computed on); default: a
      fresh ``model.init``.
    seed: shuffling seed of the training batches (and the key when ``key`` is None).
    key: PRNG key; split into the init key and the augmentation key, which is
      folded with the step number. Default ``jax.random.key(seed)``.
    workdir: folder for Orbax checkpoints; a run resumes from its latest one.
      None: no checkpoints.
    checkpoint_every: save every this many steps (and at the end); the last
      ``keep_checkpoints`` are kept.
    eval_every: evaluate on ``test_data`` every this many steps (and at the end).
    log_every: the most steps between two progress lines (see ``log_seconds``).
    log_seconds: log a progress line (step/total, loss, accuracy, steps/s without
      compilation, ETA) every this many seconds or every 1% of the run (at most
      ``log_every`` steps), whichever comes first, and at the end; the non-finite
      loss check runs at the same cadence (these are the loop's only host
      round-trips besides evaluations and checkpoints).
    num_steps: stop once the state reaches this step (a total, not a count of new
      steps); default ``config.train_steps``.
    eval_batch_size: evaluation batch (rounded up to a multiple of the devices): images
      (default 1000), or windows of a text dataset (default 64).
    devices: devices of the data-parallel mesh; default ``jax.devices()`` (with
      several processes: all of theirs; see :mod:`sparsejax.training.mesh`).
    prefetch: batches put on the devices ahead of the step.
    updater: a :class:`sparsejax.dynamic.Updater` (GMP, SET, RigL, STE or a
      registered method) that moves the masks during training (``masks`` are the
      starting masks; all ones for GMP from dense); see :class:`MaskUpdates`.
    track_effective: with an updater, log effective sparsity at every mask update.
    update_in_jit: run the mask updates inside the jitted step (``lax.cond`` on the
      step; :mod:`sparsejax.training.in_step`): the same masks, no host round trip;
      not with ``track_effective`` or an effective update target.
    reset_optimizer_state: grown weights start with zero optimizer state (momentum,
      Adam's moments), as RigL's code does; False keeps whatever state they had.
    verbose_checkpoints: show Orbax's INFO lines (every save and restore); by default
      only its warnings and errors.

  Returns:
    A :class:`TrainResult`.

  Checkpoints hold a SHA-256 of their state (:func:`state_checksum`); one that cannot
  be read or does not match is logged by step, moved to ``<workdir>-corrupt/``, and
  the next older one is used (with none left: a fresh start). A state with a NaN or
  infinite value is never saved.

  Raises:
    ValueError: batch size not divisible by the device count, bad arguments, or a
      workdir holding a run with other settings or masks.
    DivergedError: a non-finite training loss (checked with every progress line) or
      a non-finite state when a checkpoint is due; raised after a clean stop.
    Interrupted: a KeyboardInterrupt (SIGINT) while training, with the steps done;
      raised after a clean stop.
    sparsejax.training.checkpoints.CheckpointWriteError: ``workdir`` cannot be written
      (raised before training starts, or by the save that fails).
  """
  start_time = time.perf_counter()
  dspec = dataset_spec(config.dataset if spec is None else spec)
  text = isinstance(dspec, data.TextSpec)
  example = _example(dspec, spec, input_shape)
  for name, value in (
    ("checkpoint_every", checkpoint_every),
    ("eval_every", eval_every),
    ("log_every", log_every),
    ("keep_checkpoints", keep_checkpoints),
  ):
    if int(value) != value or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer.")
  if isinstance(log_seconds, bool) or not log_seconds > 0:
    raise ValueError(f"log_seconds={log_seconds!r} must be a positive number of seconds.")
  stop = config.train_steps if num_steps is None else int(num_steps)
  if not 0 <= stop <= config.train_steps:
    raise ValueError(
      f"num_steps={num_steps!r} must be in [0, config.train_steps={config.train_steps}]."
    )
  if text:
    for name, split in (("train_data", train_data), ("test_data", test_data)):
      if not isinstance(split, np.ndarray) or split.ndim != 1 or split.dtype != np.uint8:
        raise ValueError(
          f"{name} of text dataset {dspec.name!r} must be its bytes, a uint8 numpy array "
          f"[N]; got {type(split).__name__} {getattr(split, 'shape', '')}."
        )
    data.num_train_windows(len(train_data), example.shape[1])  # long enough for a window
  elif tuple(train_data[0].shape[1:]) != dspec.image_shape:
    raise ValueError(
      f"train_data images have shape {tuple(train_data[0].shape[1:])} per "
      f"example; dataset {dspec.name!r} has {dspec.image_shape}."
    )
  if updater is not None:
    dynamic.check_updater(updater)
    if masks is None:
      raise ValueError(
        "updater needs starting masks: pass masks= (e.g. sparsejax.trace(model, "
        "input_shape).ones() for gradual magnitude pruning from a dense network)."
      )
  mesh = make_mesh(devices)
  check_divisible(config.batch_size, mesh, "config.batch_size")
  replicated = NamedSharding(mesh, P())

  key = jax.random.key(seed) if key is None else key
  init_key, step_key = jax.random.split(key)
  state = create_train_state(
    model,
    init_key,
    example,
    config,
    masks=masks,
    params=params,
    straight_through=updater is not None and updater.straight_through,
  )
  # The loop's steps donate their state (train_step's donate): its own copy, so that
  # the caller's params and masks outlive the run.
  state = jax.tree.map(jnp.copy, replicate(state, replicated))
  step_key = replicate(step_key, replicated)
  mask_updates = (
    None
    if updater is None
    else MaskUpdates(
      updater,
      model=model,
      spec=dspec,
      input_shape=example if text else dspec.image_shape,
      step_key=step_key,
      track_effective=track_effective,
      in_jit=update_in_jit,
      reset_optimizer_state=reset_optimizer_state,
    )
  )
  loop = _Loop(
    model=model,
    dspec=dspec,
    config=config,
    mesh=mesh,
    seed=seed,
    stop=stop,
    train_data=train_data,
    test_data=test_data,
    step_key=step_key,
    mask_updates=mask_updates,
    checkpoint_every=checkpoint_every,
    eval_every=eval_every,
    log_every=log_every,
    log_seconds=log_seconds,
    eval_batch_size=eval_batch_size or (64 if text else 1000),
    prefetch=prefetch,
    context=example.shape[1] if text else None,
  )
  if workdir is None:
    return loop.run(state, None, start_time)
  meta = run_meta(config, seed, key, masks is not None, updater)
  with Checkpoints(
    workdir, meta, keep=keep_checkpoints, verbose=verbose_checkpoints
  ) as checkpoints:
    return loop.run(state, checkpoints, start_time)


def _example(dspec, spec, input_shape) -> jax.ShapeDtypeStruct:
  """The init/trace input of one example ([1, ...]): an image dataset's image (or
  ``input_shape``) as float32; a text dataset's int32 tokens [1, T] with T from
  ``input_shape`` or the ModelSpec ``spec``."""
  if not isinstance(dspec, data.TextSpec):
    return tracing.example_input(dspec.image_shape if input_shape is None else input_shape)
  if input_shape is None and hasattr(spec, "input_shape") and hasattr(spec, "dataset"):
    input_shape = spec.input_shape
  if hasattr(input_shape, "shape") and hasattr(input_shape, "dtype"):
    input_shape = tuple(input_shape.shape[1:])
  if (
    input_shape is None
    or len(tuple(input_shape)) != 1
    or isinstance(tuple(input_shape)[0], bool)
    or int(tuple(input_shape)[0]) < 1
  ):
    raise ValueError(
      f"input_shape={input_shape!r}: a language model on text dataset {dspec.name!r} "
      "needs its context, input_shape=(T,) (windows of T + 1 bytes)."
    )
  return jax.ShapeDtypeStruct((1, int(tuple(input_shape)[0])), jnp.int32)


@dataclasses.dataclass
class _Loop:
  """The settings of one :func:`train` call; :meth:`run` trains from a state."""

  model: Any
  dspec: data.DatasetSpec
  config: Any
  mesh: Any
  seed: int
  stop: int
  train_data: tuple
  test_data: tuple
  step_key: jax.Array
  mask_updates: MaskUpdates | None
  checkpoint_every: int
  eval_every: int
  log_every: int
  log_seconds: float
  eval_batch_size: int
  prefetch: int
  context: int | None = None  # T of a language model (text datasets)

  def evaluate(self, state: TrainState, step: int, history: list) -> tuple[float, float]:
    if self.context is None:
      loss, accuracy = evaluate(
        state,
        *self.test_data,
        model=self.model,
        spec=self.dspec,
        batch_size=self.eval_batch_size,
        mesh=self.mesh,
      )
    else:
      loss, accuracy = evaluate_text(
        state,
        self.test_data,
        model=self.model,
        spec=self.dspec,
        context=self.context,
        batch_size=self.eval_batch_size,
        mesh=self.mesh,
      )
    if not math.isfinite(loss):  # Infinite or NaN logits: nothing to report.
      raise DivergedError(step, f"test loss is {loss}")
    entry = {"step": step, "test_loss": loss, "test_accuracy": accuracy}
    if self.context is None:
      logging.info(
        "step %d/%d: test loss %.4f, test accuracy %.4f", step, self.stop, loss, accuracy
      )
    else:
      lm = language_model_metrics(loss)
      entry.update(test_bits_per_byte=lm["bits_per_byte"], test_perplexity=lm["perplexity"])
      logging.info(
        "step %d/%d: test loss %.4f (%.4f bits per byte, perplexity %.4f), test accuracy %.4f",
        step,
        self.stop,
        loss,
        lm["bits_per_byte"],
        lm["perplexity"],
        accuracy,
      )
    history.append(entry)
    return loss, accuracy

  def train_batches(self, start: int):
    """The training batches from step ``start`` on, sharded along the batch axis."""
    sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    common = dict(
      start_step=start, prefetch=self.prefetch, num_steps=self.stop - start, sharding=sharding
    )
    if self.context is not None:
      return data.text_train_batches(
        self.train_data, self.context, self.config.batch_size, self.seed, **common
      )
    return data.train_batches(*self.train_data, self.config.batch_size, self.seed, **common)

  def run(self, state: TrainState, checkpoints: Checkpoints | None, start_time: float):
    history: list[dict] = []
    updates = self.mask_updates
    stop = self.stop
    if checkpoints is not None and checkpoints.has_checkpoints():
      restored = checkpoints.restore_latest(state, stop)
      if restored is None:
        logging.error(
          "No intact checkpoint left in %s: starting from step 0.", checkpoints.directory
        )
      else:
        state, history = restored
        if updates is not None:
          history, updates.records = split_history(history)

    def save(step: int) -> None:
      if updates is not None:
        updates.flush()
      records = [] if updates is None else [{"mask_update": r} for r in updates.records]
      checkpoints.save(step, state, history + records)

    start = int(jax.device_get(state.step))
    logging.info(
      "Training %s on %s: steps %d -> %d of %d, batch %d over %d device(s).",
      type(self.model).__name__,
      self.dspec.name,
      start,
      stop,
      self.config.train_steps,
      self.config.batch_size,
      self.mesh.size,
    )
    progress = Progress(start, stop, log_seconds=self.log_seconds, log_every=self.log_every)
    final = None
    if start < stop:
      batches = self.train_batches(start)
      window: list[dict] = []
      done = start
      try:
        for step, batch in zip(range(start, stop), batches):
          state, metrics = self.step(state, batch, step, progress)
          done = step + 1
          window.append(metrics)
          if step == start:  # The first call compiles; time the steps after it.
            jax.block_until_ready(state)
          if progress.step_done(done):
            losses = np.asarray(jax.device_get([m["loss"] for m in window]))  # waits
            if not np.all(np.isfinite(losses)):
              bad = int(np.argmin(np.isfinite(losses)))  # window[i] is step done - len + i + 1
              raise DivergedError(done - len(window) + bad + 1, f"training loss is {losses[bad]}")
            means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *window))
            logging.info("%s", progress.line(done, float(means["loss"]), float(means["accuracy"])))
            window = []
            if updates is not None:
              updates.flush()
          do_eval = done % self.eval_every == 0 or done == stop
          do_save = checkpoints is not None and (done % self.checkpoint_every == 0 or done == stop)
          if do_eval or do_save:
            jax.block_until_ready(state)  # Queued steps count as training time.
            side_start = progress.clock()
            if do_eval:
              final = self.evaluate(state, done, history)
            if do_save:
              save(done)
            progress.add_pause(progress.clock() - side_start)
      except KeyboardInterrupt:
        raise Interrupted(done, stop) from None
      finally:
        batches.close()
    if updates is not None:
      updates.flush()
    if final is None:  # Nothing to train: evaluate what was restored.
      final = (
        (history[-1]["test_loss"], history[-1]["test_accuracy"])
        if (history and history[-1]["step"] == stop)
        else self.evaluate(state, stop, history)
      )
    return TrainResult(
      history=history,
      final_test_loss=final[0],
      final_test_accuracy=final[1],
      steps_per_second=progress.rate,
      wall_time=time.perf_counter() - start_time,
      start_step=start,
      state=state,
      mask_updates=[] if updates is None else list(updates.records),
      update_seconds=[] if updates is None else list(updates.seconds),
      final_metrics=_final_metrics(history, stop, final),
    )

  def step(self, state: TrainState, batch, step: int, progress: Progress):
    """Train step ``step`` and the mask update due before it: inside the jitted step
    (in-jit), or between steps, timed apart from training (queued steps finish first)
    and left out of the speed."""
    updates = self.mask_updates
    if updates is not None and updates.in_jit:
      return updates.step(state, batch, step, donate=True)
    outputs = None
    if updates is not None and updates.updater.is_update_step(step):
      # The step's forward and backward pass is training time; the update is not.
      outputs = jax.block_until_ready(updates.forward_backward(state, batch))
      jax.block_until_ready(state)
      begin = progress.clock()
      state, outputs = jax.block_until_ready(updates.update(state, batch, step, outputs))
      seconds = progress.clock() - begin
      updates.seconds.append(seconds)
      if progress.timed_from is not None:  # before the first step, nothing is timed yet
        progress.add_pause(seconds)
    if outputs is not None:  # the step's forward and backward pass ran before the update
      return apply_step(state, outputs)
    return train_step(state, batch, self.step_key, model=self.model, spec=self.dspec, donate=True)


def _final_metrics(history: list, stop: int, final: tuple) -> dict:
  """The last evaluation's metrics (its history entry at ``stop``, without the step)."""
  if history and history[-1]["step"] == stop:
    return {k: v for k, v in history[-1].items() if k != "step"}
  return {"test_loss": final[0], "test_accuracy": final[1]}
