r"""Prune a network, train it, and record direct/effective sparsity and accuracy.

  python -m experiments.prune_train --config=experiments/configs/lenet300100.py \
      --config.pruner=random/igq --config.compression=100 \
      --config.pruning_type=effective --config.train_steps=3000 \
      --tfds_manual_dir=../shared/data/mnist

The experiment is a config (experiments/configs/<arch>.py, every field overridable
as --config.<field>=<value>); where it runs and reads data are flags (--out_dir,
--tfds_manual_dir, --tfds_data_dir, --text_dir, --synthetic_data).

The byte-level language model trains on the ``text`` dataset (next-byte cross-entropy on
windows of context + 1 bytes) and its result.json adds held-out bits per byte and
perplexity (``test_bits_per_byte``, ``test_perplexity``) to the test loss (nats per
byte) and next-byte accuracy:

  python -m experiments.prune_train --config=experiments/configs/gpt.py \
      --text_dir=../shared/data/text/python-docs --config.pruner=snip \
      --config.compression=10 --config.train_steps=3000

A pruner or network of one's own: --import=my_module (a module name, or a path to a .py
file; experiments.plugins) registers it before the flags are read; a network without
experiments/configs/<arch>.py runs with --config=experiments/configs/generic.py:<arch>
(experiments.configs.generic).

Several hosts can train one run (data parallel): every process runs the same command
with --coordinator_address, --num_processes and its --process_id (or the JAX_*
variables, or a SLURM/Open MPI job; experiments.distributed, docs/cluster.md).

One run writes <out_dir>/<run name>/result.json atomically: the full config, direct
and effective compression, per-layer direct and effective sparsity, active units,
the test accuracy/loss history, the final test accuracy, steps per second and wall
time. Training checkpoints (Orbax) go to <run dir>/checkpoints, and an interrupted
run resumes from them; the masks are saved as <run dir>/masks.npz.

Paper flows (method.md section 4):
- pruner=dense saves the initial and final weights (<run dir>/weights/); the
  magnitude and LAMP pruners score the final weights of the dense run with the same
  arch/dataset/seed/train_steps (or config.dense_dir) and train from its initial
  weights.
- pruner=imp: iterative magnitude pruning with rewinding: train, prune globally by
  magnitude to density d^(r/R) in round r of R = config.imp_rounds, rewind the kept
  weights to their values at config.rewind_step (0: initialization), repeat; the last
  round's training is the result.
- compact=True (one-shot pruners): after pruning, the dead units are removed
  (sparsejax.compact, fold=False, logits checked equal) and the compacted network
  trains with its remaining masks; the run folder gets a ``_compact`` suffix and
  result.json a "compact" record: channel spaces and widths before and after, FLOPs,
  parameters and bytes before and after, and masked against compacted inference time
  (batch 1 latency, batch 256 throughput; ``timing_repeats`` each, sparsejax.timing).
  Compression, units and "cost" describe the pruned network (the same function).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import flags, logging
from ml_collections import config_flags

import sparsejax
from experiments import (
  checks,
  cli,
  compilation_cache,
  configs,
  datasource,
  distributed,
  plugins,
  procedures,
  processes,
  results,
  run_config,
  rundir,
)
from sparsejax import compact as compact_lib
from sparsejax import (
  data,
  dynamic,
  effective,
  ephemeral,
  errors,
  flops,
  models,
  pruning,
  quotas,
  timing,
  training,
)
from sparsejax import data_effective as data_effective_lib
from sparsejax import (
  masks as masks_lib,
)

FLAGS = flags.FLAGS
# Exit status of a run refused because another process works in its folder.
EXIT_LOCKED = 75
# Exit status after SIGINT (Ctrl-C), as a shell reports a process it ended: 128 + 2.
EXIT_INTERRUPTED = 130


def connectivity_report(net, masks) -> dict:
  """Direct and effective sparsity, active units and FLOPs of ``masks`` on the traced
  model ``net`` (:class:`sparsejax.Traced`)."""
  conn = effective.connectivity(net, masks)
  direct = masks_lib.layer_sparsities(masks)
  eff = masks_lib.layer_sparsities(conn.masks)
  return {
    "direct_compression": masks_lib.compression(masks),
    "effective_compression": masks_lib.compression(conn.masks),
    "direct_sparsity": masks_lib.direct_sparsity(masks),
    "effective_sparsity": masks_lib.direct_sparsity(conn.masks),
    "layers": [
      {"layer": k, "direct_sparsity": direct[k], "effective_sparsity": eff[k]} for k in direct
    ],
    "active_units": {k: [conn.active_units[k], conn.total_units[k]] for k in conn.active_units},
    "active_inputs": [conn.active_inputs, conn.total_inputs],
    # FLOPs (2 per multiply-accumulate, one example) and kernel parameters/bytes
    "cost": flops.total(net, masks).as_dict(),
  }


def with_activation_topk(model, fraction: float | None, at: str = "relu"):
  """``model`` with top-k activations (``fraction`` of each example's kept,
  :class:`sparsejax.ephemeral.Sparsified`) after every equation named ``at`` (e.g.
  'relu'), or before the linear ops of the modules matching ``before:<glob>``; ``model``
  itself for None."""
  if not fraction:
    return model
  op = ephemeral.TopK(fraction=float(fraction))
  if at.startswith("before:"):
    rule = ephemeral.Rule(op, before=at[len("before:") :])
  else:
    rule = ephemeral.Rule(op, primitive=at)
  return ephemeral.Sparsified(model, (rule,))


def data_effective_report(model, state, test_data, dspec, *, compact: bool = False) -> dict:
  """Effective sparsity on the test split of the trained ``model`` (its final params,
  batch statistics and masks; :func:`sparsejax.data_effective.data_effective`): per
  layer the never-active units and the activation sparsity, and the data-effective
  compression; ``compact`` notes the masks are those of the compacted network."""
  images, _ = test_data
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  x = data.normalize(images, dspec)
  got = data_effective_lib.data_effective(model, variables, state.masks, x)
  return {**got.as_dict(), "compacted_network": bool(compact)}


def masked_variables(variables: dict, masks) -> dict:
  """``variables`` with the masked weights zeroed (what the masked network computes)."""
  return {**variables, "params": masks_lib.apply(variables["params"], masks)}


def compact_network(model, variables, masks, input_shape):
  """The pruned network with its dead units removed (:func:`sparsejax.compact.compact`,
  ``fold=False``: it trains as the masked original does), checked to compute the same
  logits: ``(model, variables, masks, record)``.

  record: the channel spaces, their widths before and after, the live-channel fraction
  (kept / channels), the relative logit difference, the kernel FLOPs/parameters/bytes
  (dense, direct, effective; :mod:`sparsejax.flops`) and every variable's bytes, before
  and after.

  Raises:
    sparsejax.errors.CompactionMismatchError: the logits differ (more than 1e-5 x scale).
  """
  new_model, new_vars, new_masks = compact_lib.compact(
    model, variables, masks, input_shape=input_shape, fold=False
  )
  rel = compact_lib.check_equal(model, variables, masks, new_model, new_vars, input_shape)
  spaces = compact_lib.channel_spaces(model)[0]
  kept = compact_lib.channel_spaces(new_model)[0]
  record = {
    "spaces": [s.name for s in spaces],
    "widths_before": [s.size for s in spaces],
    "widths": [s.size for s in kept],
    "live_channel_fraction": sum(s.size for s in kept) / sum(s.size for s in spaces),
    "logits_relative_difference": rel,
    "cost_before": flops.total(model, masks, input_shape).as_dict(),
    "cost_after": flops.total(new_model, new_masks, input_shape).as_dict(),
    "network_bytes_before": flops.network_bytes(masked_variables(variables, masks)),
    "network_bytes_after": flops.network_bytes(new_vars),
  }
  return new_model, new_vars, new_masks, record


def time_compaction(
  model, masked, new_model, new_variables, input_shape, *, repeats: int, batch: int = 256
) -> dict:
  """Inference time of the masked network against its compaction, measured in turns in
  this process (:func:`sparsejax.timing.inference`): latency at batch 1, throughput at
  ``batch``, the speed-ups (masked / compacted time) and the load average."""
  t = timing.inference(
    {"masked": (model, masked), "compact": (new_model, new_variables)},
    input_shape,
    batch=batch,
    repeats=repeats,
  )
  return {
    **t,
    "batch": batch,
    "repeats": repeats,
    "latency_speedup": t["masked"]["latency_ms"] / t["compact"]["latency_ms"],
    "throughput_speedup": t["compact"]["throughput"] / t["masked"]["throughput"],
    "load_average": timing.load_average(),
    "platform": jax.default_backend(),
  }


def _save_params(path: str, params) -> None:
  """Saves ``params`` with Orbax (every process calls it; with several processes the
  host copies are saved, which Orbax writes once)."""
  if jax.process_count() > 1:  # Process-local or replicated arrays: same values.
    params = jax.device_get(params)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), params, force=True)
  ckptr.wait_until_finished()


def _load_params(path: str, like):
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"no weights at {path!r}: run --config.pruner=dense with the "
      "same arch, dataset, seed and train_steps first (or set "
      "--config.dense_dir)."
    )
  return ocp.StandardCheckpointer().restore(os.path.abspath(path), like)


def dense_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the dense run whose weights magnitude/LAMP score."""
  dense = config.copy_and_resolve_references()
  dense.update(dict(pruner="dense", pruning_type="direct", compression=None, target_sparsity=None))
  return dense


def dense_weights(config: ml_collections.ConfigDict, out_dir: str, like):
  """(initial, final) parameters of the dense run that magnitude/LAMP/neuron-l1 score:
  ``config.dense_dir`` or the matching dense run under ``out_dir``."""
  folder = config.dense_dir or os.path.join(out_dir, run_config.run_name(dense_config(config)))
  return (
    _load_params(os.path.join(folder, "weights", "initial"), like),
    _load_params(os.path.join(folder, "weights", "final"), like),
  )


def prune_one_shot(
  config: ml_collections.ConfigDict,
  p: pruning.Pruner,
  net,
  variables,
  source: datasource.DataSource,
  out_dir: str,
):
  """The masks of a one-shot pruner (at initialization, or after training: scoring the
  dense run's final weights) and the parameters training starts from: ``(masks,
  start_params)``. Deterministic in the config (seed: key 1 of ``jax.random.key(seed)``
  for the pruner, score batches by seed), so a finished run's masks can be re-created.

  Raises:
    errors.UnreachableSparsityError: an effective target beyond the ranking's reach.
  """
  key = jax.random.key(config.seed)
  start_params, trained = variables["params"], None
  if p.after_training:
    start_params, trained = dense_weights(config, out_dir, variables["params"])
  batches = None
  if p.needs_data:
    batches = source.score_batches(
      config.dataset,
      num_batches=config.score_batches,
      batch_size=config.snip_batch_size,
      seed=config.seed,
      input_shape=net.input_shape,
    )
  masks = pruning.prune(
    p,
    key=jax.random.fold_in(key, 1),
    model=net,
    variables={**variables, "params": start_params},
    sparsity=run_config.target_sparsity(config),
    pruning_type=config.pruning_type,
    batches=batches,
    trained_params=trained,
    rounds=config.rounds,
  )
  return masks, start_params


def run(
  config: ml_collections.ConfigDict,
  *,
  out_dir: str,
  source: datasource.DataSource | None = None,
) -> dict:
  """Prunes, trains and writes the result JSON; returns the result.

  A run whose training diverges (non-finite loss or parameters) is recorded with
  status 'diverged' and the step (no checkpoint holds non-finite values).

  Args:
    config: an experiment config (:mod:`experiments.configs`).
    out_dir: where the run folder goes.
    source: where the data comes from (TFDS offline, or synthetic).

  Raises:
    experiments.checks.FlagError: a bad config field or argument (named as its flag),
      a missing dense run, a run folder that cannot be written; before any work.
    rundir.RunLockedError: another process is working on this run.
    sparsejax.training.CheckpointWriteError: a checkpoint folder stopped taking writes.
    sparsejax.training.Interrupted: SIGINT while training (the run resumes when run
      again).
  """
  start_time = time.time()
  source = datasource.DataSource() if source is None else source
  check_config(config, out_dir, source)
  check_dense_run(config, out_dir)
  sparsity = run_config.target_sparsity(config)
  p = run_config.check_pruner(config.pruner)
  train_config = configs.train_config(config)
  arch, dataset = config.arch, config.dataset
  models.get_spec(arch)
  dspec = data.get_spec(dataset)
  updater = make_updater(config, sparsity) if config.pruner in dynamic.METHODS else None
  name = run_config.run_name(config)
  run_dir = os.path.join(out_dir, name)
  check_run_folder(run_dir)
  if not distributed.is_primary():  # Multi-host: process 0 locks and writes the files.
    return _run_locked(
      config,
      p,
      updater,
      sparsity,
      train_config,
      dspec,
      name,
      run_dir,
      out_dir,
      source,
      rundir.WallClock(run_dir, start_time),
    )
  with rundir.locked(run_dir), rundir.WallClock(run_dir, start_time) as clock:
    return _run_locked(
      config, p, updater, sparsity, train_config, dspec, name, run_dir, out_dir, source, clock
    )


def _run_locked(
  config, p, updater, sparsity, train_config, dspec, name, run_dir, out_dir, source, clock
) -> dict:
  arch, dataset, seed = config.arch, config.dataset, config.seed
  result_path = os.path.join(run_dir, "result.json")
  model = models.create(arch, dspec.num_classes)
  input_shape = model_input(arch, dspec)
  key = jax.random.key(seed)
  variables = models.init(model, jax.random.fold_in(key, 0), input_shape)
  net = sparsejax.trace(model, input_shape, variables=variables)  # one analysis of the model
  sparse_model = with_activation_topk(model, config.activation_topk, config.activation_at)
  if sparse_model is not model:  # a rule that matches nothing is a mistake, said now
    ephemeral.sites(
      sparse_model.model.apply,
      sparse_model.rules,
      variables,
      jnp.zeros((2, *input_shape), jnp.float32),
      strip_root=True,
    )
  init_params = variables["params"]
  train_data, test_data = source.split(dataset, "train", seed), source.split(dataset, "test", seed)
  train_kwargs = dict(
    input_shape=input_shape,
    seed=seed,
    eval_every=config.eval_every,
    checkpoint_every=config.checkpoint_every,
    log_every=config.log_every,
  )
  record = _config_record(config, sparsity, source)

  mask_path = os.path.join(run_dir, "masks.npz")
  rounds = []
  workdir = os.path.abspath(os.path.join(run_dir, "checkpoints"))
  if updater is not None:
    try:
      start_masks = _starting_masks(config, updater, model, variables, sparsity, key)
    except errors.UnreachableSparsityError as err:
      return _record_unreachable(err, name, record, result_path, clock)
    try:
      result = training.train(
        sparse_model,
        dspec,
        train_config,
        train_data,
        test_data,
        masks=start_masks,
        params=init_params,
        updater=updater,
        track_effective=config.track_effective,
        update_in_jit=config.update_in_jit,
        workdir=workdir,
        **train_kwargs,
      )
    except training.DivergedError as err:
      return _record_diverged(err, result_path, record, {}, clock)
    masks, start_params = result.state.masks, None
  elif p is None:  # IMP
    try:
      result = _imp(
        sparse_model,
        dspec,
        train_config,
        train_data,
        test_data,
        init_params,
        sparsity,
        config.pruning_type,
        net,
        run_dir,
        config.imp_rounds,
        config.rewind_step,
        train_kwargs,
        rounds,
      )
    except training.DivergedError as err:
      return _record_diverged(err, result_path, record, {"imp_rounds": rounds}, clock)
    masks, start_params = result.state.masks, None
  else:
    start_params = init_params
    if os.path.exists(mask_path):  # resumed run: the same masks, no re-scoring
      masks = masks_lib.load(mask_path, init_params)
    else:
      try:
        masks, start_params = prune_one_shot(config, p, net, variables, source, out_dir)
      except errors.UnreachableSparsityError as err:
        return _record_unreachable(err, name, record, result_path, clock)
      if distributed.is_primary():
        masks_lib.save(mask_path, masks)
    if p.score is None:
      _save_params(os.path.join(run_dir, "weights", "initial"), init_params)
    report = connectivity_report(net, masks)
    logging.info(
      "%s: direct %.4gx, effective %.4gx compression.",
      name,
      report["direct_compression"],
      report["effective_compression"],
    )
    train_model, train_masks, train_params = sparse_model, masks, start_params
    if config.compact:  # the same function with the dead units removed
      pruned = {**variables, "params": start_params}
      train_model, compacted, train_masks, compact_record = compact_network(
        model, pruned, masks, input_shape
      )
      train_params = compacted["params"]
      logging.info(
        "%s: compacted widths %s -> %s (logits equal to %.2g of their scale).",
        name,
        compact_record["widths_before"],
        compact_record["widths"],
        compact_record["logits_relative_difference"],
      )
      compact_record["timing"] = time_compaction(
        model,
        masked_variables(pruned, masks),
        train_model,
        compacted,
        input_shape,
        repeats=config.timing_repeats,
      )
    try:
      result = training.train(
        train_model,
        dspec,
        train_config,
        train_data,
        test_data,
        masks=train_masks,
        params=train_params,
        workdir=workdir,
        **train_kwargs,
      )
    except training.DivergedError as err:
      return _record_diverged(
        err,
        result_path,
        record,
        {**report, "compact": compact_record} if config.compact else report,
        clock,
      )
    if p.score is None:
      _save_params(os.path.join(run_dir, "weights", "final"), result.state.params)
  report = connectivity_report(net, masks)
  if config.data_effective:
    trained_model = train_model if (p is not None and updater is None) else sparse_model
    report["data_effective"] = data_effective_report(
      trained_model, result.state, test_data, dspec, compact=config.compact
    )
  summary = {
    "config": record,
    "status": "disconnected" if report["effective_compression"] == float("inf") else "ok",
    **report,
    "history": result.history,
    "test_accuracy": result.final_test_accuracy,
    "test_loss": result.final_test_loss,
    **_language_model_record(dspec, result),
    # None (not NaN) when this process trained no steps (a finished run resumed).
    "steps_per_second": (
      result.steps_per_second if math.isfinite(result.steps_per_second) else None
    ),
    **_wall_times(clock),
    "imp_rounds": rounds or None,
    "mask_updates": result.mask_updates or None,
    "platform": jax.default_backend(),
  }
  if config.compact:
    summary["compact"] = compact_record
  _write_result(result_path, summary)
  logging.info("Wrote %s: test accuracy %.4f.", result_path, result.final_test_accuracy)
  return summary


def model_input(arch: str, dspec):
  """What the network is initialized and traced on: the image dataset's image shape,
  or, for a text dataset, the network's int32 token ids [1, T]
  (:func:`sparsejax.models.example_input`)."""
  if isinstance(dspec, data.TextSpec):
    return models.example_input(arch)
  return dspec.image_shape


def _language_model_record(dspec, result: training.TrainResult) -> dict:
  """A language model's held-out bits per byte and perplexity (text datasets)."""
  if not isinstance(dspec, data.TextSpec):
    return {}
  lm = training.language_model_metrics(result.final_test_loss)
  return {"test_bits_per_byte": lm["bits_per_byte"], "test_perplexity": lm["perplexity"]}


def _record_unreachable(
  err: errors.UnreachableSparsityError,
  name: str,
  record: dict,
  result_path: str,
  clock: rundir.WallClock,
) -> dict:
  """An effective target beyond the ranking's reach is a result, not a failure: it is
  recorded so that the grid is complete and the sweep does not retry it."""
  logging.warning("%s: %s", name, err)
  summary = {
    "config": record,
    "status": "unreachable",
    "error": str(err),
    "max_sparsity": err.max_sparsity,
    "test_accuracy": None,
    **_wall_times(clock),
    "platform": jax.default_backend(),
  }
  _write_result(result_path, summary)
  return summary


def _write_result(path: str, summary: dict) -> None:
  """The run's result.json (strict JSON, atomic); with several processes, process 0's."""
  if distributed.is_primary():
    results.atomic_write_json(path, summary)


def _wall_times(clock: rundir.WallClock) -> dict:
  """wall_time: seconds over all processes of the run; the last one's separately."""
  return {
    "wall_time": clock.total(),
    "wall_time_last_process": clock.this_process(),
    "processes": clock.processes(),
  }


def _record_diverged(
  err: training.DivergedError,
  result_path: str,
  config_record: dict,
  extra: dict,
  clock: rundir.WallClock,
) -> dict:
  """Writes and returns the result of a run whose training diverged: finished, not
  failed (a sweep does not retry it)."""
  logging.error("%s: %s", os.path.dirname(result_path), err)
  summary = {
    "config": config_record,
    "status": "diverged",
    "diverged_step": err.step,
    "error": str(err),
    "test_accuracy": None,
    **extra,
    **_wall_times(clock),
    "platform": jax.default_backend(),
  }
  _write_result(result_path, summary)
  return summary


def check_config(
  config: ml_collections.ConfigDict, out_dir: str, source: datasource.DataSource
) -> None:
  """Every field a run needs and out_dir, before any work (named as their flags): the
  target, the pruner and pruning type, the network and dataset, the training fields,
  the counts, seed and steps, a moving-mask schedule, IMP's rewind step, and batch sizes
  against the dataset's size (known from its spec, before the data is read).

  Raises:
    experiments.checks.FlagError: the first bad field, its value and what is allowed.
  """
  f = lambda name: f"config.{name}"
  sparsity = run_config.target_sparsity(config)
  with checks.flag_errors():
    pruning.check_pruning_type(config.pruning_type, "--config.pruning_type")
  p = run_config.check_pruner(config.pruner)
  configs.check_arch(config.arch, "--config.arch")
  if config.dataset not in data.DATASETS and config.dataset not in data.TEXT_DATASETS:
    raise checks.FlagError(
      f"--config.dataset={config.dataset!r} is not a known dataset; allowed: "
      f"{', '.join([*data.DATASETS, *data.TEXT_DATASETS])}."
    )
  text = isinstance(data.get_spec(config.dataset), data.TextSpec)
  if text != (models.get_spec(config.arch).input_dtype[:3] in ("int", "uin")):
    raise checks.FlagError(
      f"--config.arch={config.arch!r} takes "
      f"{'images' if text else 'token ids'}, but --config.dataset={config.dataset!r} is "
      f"{'byte-level text' if text else 'an image dataset'}: a language model (e.g. "
      "'gpt') trains on 'text', an image classifier on an image dataset."
    )
  with checks.flag_errors():
    source.check_text(config.dataset)
  checks.check_run_args(
    out_dir=out_dir,
    seeds={f("seed"): config.seed},
    nonnegative={f("rewind_step"): config.rewind_step},
    counts={
      f(k): config[k]
      for k in (
        "train_steps",
        "batch_size",
        "eval_every",
        "checkpoint_every",
        "log_every",
        "imp_rounds",
        "score_batches",
        "snip_batch_size",
        "update_every",
        "timing_repeats",
      )
    },
    optional_counts={f("rounds"): config.rounds, "num_examples": source.num_examples},
  )
  configs.train_config(config)  # learning rate, momentum, decay, ...: named as flags
  if config.pruner in dynamic.METHODS:
    make_updater(config, sparsity)
  for field in ("compact", "data_effective", "update_in_jit"):
    if not isinstance(config[field], bool):
      raise checks.FlagError(f"--config.{field}={config[field]!r} must be True or False.")
  topk = config.activation_topk
  if topk is not None and (
    isinstance(topk, bool) or not (isinstance(topk, (int, float)) and 0.0 < topk <= 1.0)
  ):
    raise checks.FlagError(
      f"--config.activation_topk={topk!r} must be a fraction in (0, 1] (activations kept "
      "per example after each ReLU), or None."
    )
  if topk is not None and config.compact:
    raise checks.FlagError(
      "--config.compact=True compacts the pruned network before training; with "
      f"--config.activation_topk={topk!r} the top-k units are data dependent: not both."
    )
  if config.update_in_jit and config.pruner in dynamic.METHODS:
    target = config.update_target or config.pruning_type
    if config.track_effective or target == "effective":
      raise checks.FlagError(
        "--config.update_in_jit=True runs the mask updates inside the jitted step; "
        "--config.track_effective=True and an effective update target need the host "
        f"(got track_effective={config.track_effective!r}, update target {target!r})."
      )
  if config.compact and (
    config.pruner in dynamic.METHODS or config.pruner == procedures.IMP or config.pruner == "dense"
  ):
    raise checks.FlagError(
      f"--config.compact=True is for one-shot pruners (at initialization or after "
      f"training), not --config.pruner={config.pruner!r} (masks that move during "
      "training or IMP's rounds cannot be compacted before training; a dense network has "
      "nothing to remove)."
    )
  if config.pruner == procedures.IMP and not config.rewind_step < config.train_steps:
    raise checks.FlagError(
      f"--config.rewind_step={config.rewind_step!r} must be in [0, --config.train_steps="
      f"{config.train_steps}): the step of the dense run whose weights IMP rewinds to."
    )
  available = source.num_examples_of(config.dataset)
  if available is not None:
    data_name = source.describe(config.dataset)
    if config.batch_size > available:
      raise checks.FlagError(
        f"--config.batch_size={config.batch_size} exceeds the {available} training "
        f"examples of {data_name}; give at most {available}."
      )
    # Synthetic data scores on the whole split instead (DataSource.score_batches).
    if p is not None and p.needs_data and not source.synthetic:
      if config.snip_batch_size > available:
        raise checks.FlagError(
          f"--config.snip_batch_size={config.snip_batch_size} (the batch "
          f"{config.pruner} scores on) exceeds the {available} training examples of "
          f"{data_name}; give at most {available}."
        )


class MissingDenseRunError(checks.FlagError, FileNotFoundError):
  """No dense run's weights where a pruner that scores trained weights reads them: a
  usage error (:class:`experiments.checks.FlagError`) and a FileNotFoundError."""


def check_dense_run(config: ml_collections.ConfigDict, out_dir: str) -> None:
  """A pruner that scores trained weights (magnitude, LAMP, neuron/l1) needs the dense
  run's weights (:func:`dense_weights`); checked before any data is read or pruning
  starts. A run whose masks exist (resumed) does not read them again.

  Raises:
    MissingDenseRunError: no weights where the dense run keeps them.
  """
  p = run_config.check_pruner(config.pruner)
  if p is None or not p.after_training:
    return
  if os.path.exists(os.path.join(out_dir, run_config.run_name(config), "masks.npz")):
    return
  folder = config.dense_dir or os.path.join(out_dir, run_config.run_name(dense_config(config)))
  missing = [
    w for w in ("initial", "final") if not os.path.exists(os.path.join(folder, "weights", w))
  ]
  if not missing:
    return
  if config.dense_dir:
    raise MissingDenseRunError(
      f"--config.dense_dir={config.dense_dir!r} holds no dense weights (weights/"
      f"{missing[0]} is missing); --config.pruner={config.pruner!r} scores them."
    )
  raise MissingDenseRunError(
    f"--config.pruner={config.pruner!r} scores the trained weights of a dense run, and "
    f"there is none at {folder} (weights/{missing[0]} is missing): run "
    "--config.pruner=dense with the same arch, dataset, seed and train_steps and "
    "--out_dir first (or set --config.dense_dir)."
  )


def check_run_folder(run_dir: str) -> None:
  """The run's folder, and the checkpoint folders already in it, can be written: one
  that cannot (read-only, a full disk, a file in its place) is named before any work,
  not when the first checkpoint is due.

  Raises:
    experiments.checks.FlagError: naming the folder (inside --out_dir) and why.
  """
  folders = [run_dir]
  for root, dirs, names in os.walk(run_dir):
    folders += [os.path.join(root, n) for n in dirs + names if n == "checkpoints"]
    dirs[:] = [d for d in dirs if d != "checkpoints"]  # Orbax's steps: not ours to check
  for folder in folders:
    try:
      results.check_writable_dir(folder)
    except OSError as err:
      raise checks.FlagError(
        f"--out_dir: the run folder {folder} cannot be written ({err.strerror or err}); "
        "make it writable, or give another --out_dir."
      ) from None


def make_updater(config: ml_collections.ConfigDict, sparsity: float) -> dynamic.Updater:
  """The updater of the :mod:`sparsejax.dynamic` method ``config.pruner`` (registered in
  ``dynamic.METHODS``), built from the config's settings with its steps scaled to
  ``train_steps`` (update_start and update_end are fractions of the run)."""
  method = dynamic.get_method(config.pruner)
  for field in ("update_start", "update_end", "drop_fraction", "initial_sparsity"):
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
      raise checks.FlagError(f"--config.{field}={value!r} must be a fraction in [0, 1].")
  if config.quota is not None and config.quota not in quotas.QUOTAS:
    raise checks.FlagError(
      f"--config.quota={config.quota!r} is not a quota; allowed: None (global), "
      f"{', '.join(quotas.QUOTAS)}."
    )
  steps = config.train_steps
  target = config.update_target or config.pruning_type
  with checks.flag_errors():
    pruning.check_pruning_type(target, "--config.update_target")
  if target not in method.targets:
    raise checks.FlagError(
      f"--config.update_target={target!r} is not available for {method.name}; "
      f"allowed: {', '.join(method.targets)}."
    )
  with checks.flag_errors(f"--config.pruner={config.pruner!r}"):  # the method's own checks
    return method.make(
      sparsity=sparsity,
      start=round(config.update_start * steps),
      end=round(config.update_end * steps),
      every=config.update_every,
      quota=config.quota,
      target=target,
      drop_fraction=config.drop_fraction,
      initial_sparsity=config.initial_sparsity,
    )


def _starting_masks(config, updater, model, variables, sparsity, key):
  """The method's starting masks (``dynamic.starting_masks``): all ones (GMP; STE's
  first update, at step 0, prunes) or random at the target with the quota (SET, RigL;
  ERK by default), aimed at effective sparsity when the update target is effective."""
  del updater
  return dynamic.starting_masks(
    config.pruner,
    key=jax.random.fold_in(key, 1),
    model=model,
    variables=variables,
    sparsity=sparsity,
    input_shape=model_input(config.arch, data.get_spec(config.dataset)),
    quota=config.quota,
    target=config.update_target or config.pruning_type,
  )


def _config_record(config, sparsity: float, source: datasource.DataSource) -> dict:
  """What result.json records of the run's settings (``experiment``: the whole config)."""
  imp = config.pruner == procedures.IMP
  train_config = configs.train_config(config)
  return {
    "arch": config.arch,
    "dataset": config.dataset,
    "pruner": config.pruner,
    "pruning_type": config.pruning_type,
    "target_sparsity": sparsity,
    "target_compression": 1.0 / (1.0 - sparsity),
    "seed": config.seed,
    "synthetic_data": source.synthetic,
    "imp_rounds": config.imp_rounds if imp else None,
    "rewind_step": config.rewind_step if imp else None,
    "train": {k: getattr(train_config, k) for k in configs.TRAIN_FIELDS},
    "experiment": config.to_dict(),
  }


def _imp(
  model,
  dspec,
  config,
  train_data,
  test_data,
  init_params,
  sparsity,
  pruning_type,
  net,
  run_dir,
  imp_rounds,
  rewind_step,
  train_kwargs,
  rounds,
):
  """Iterative magnitude pruning with rewinding; returns the last round's TrainResult."""
  if imp_rounds < 1:
    raise ValueError(f"--config.imp_rounds={imp_rounds!r} must be at least 1.")
  if not 0 <= rewind_step < config.train_steps:
    raise ValueError(f"--config.rewind_step={rewind_step!r} must be in [0, train_steps).")
  workdir = lambda r: os.path.abspath(os.path.join(run_dir, f"round{r}", "checkpoints"))
  masks = net.ones()
  rewind = init_params
  if rewind_step > 0:
    early = training.train(
      model,
      dspec,
      config,
      train_data,
      test_data,
      masks=masks,
      params=init_params,
      workdir=workdir(0),
      num_steps=rewind_step,
      **train_kwargs,
    )
    rewind = early.state.params
  result = training.train(
    model,
    dspec,
    config,
    train_data,
    test_data,
    masks=masks,
    params=init_params,
    workdir=workdir(0),
    **train_kwargs,
  )
  for r in range(1, imp_rounds + 1):
    round_sparsity = 1.0 - (1.0 - sparsity) ** (r / imp_rounds)
    # Global magnitude among the kept weights; pruned ones rank last.
    scores = masks_lib.map_masks(
      lambda m, w: jnp.where(m, jnp.abs(w), -1.0), masks, result.state.params
    )
    masks = pruning.masks_from_ranking(
      pruning.rank_scores(scores),
      round_sparsity,
      pruning_type,
      model=net,
    )
    rounds.append(
      {
        "round": r,
        "target_sparsity": round_sparsity,
        "test_accuracy_before": result.final_test_accuracy,
        **{k: v for k, v in connectivity_report(net, masks).items() if k.endswith("compression")},
      }
    )
    logging.info(
      "IMP round %d/%d: direct %.4gx, effective %.4gx.",
      r,
      imp_rounds,
      rounds[-1]["direct_compression"],
      rounds[-1]["effective_compression"],
    )
    result = training.train(
      model,
      dspec,
      config,
      train_data,
      test_data,
      masks=masks,
      params=masks_lib.apply(rewind, masks),
      workdir=workdir(r),
      **train_kwargs,
    )
  return result


def _exit_interrupted() -> None:
  """Ends an interrupted run at once with EXIT_INTERRUPTED. Everything is saved by now
  (checkpoints waited for and closed, the run folder unlocked); an ordinary exit would
  run the interpreter's and XLA's shutdown while their worker threads may still be
  inside C++, which can abort the process ('exception not rethrown') after the line
  above was printed."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(EXIT_INTERRUPTED)


DEFAULT_CONFIG = configs.path("lenet300100")


def define_flags() -> None:
  """The command-line flags (defined only when run as a binary, after --import: the
  help lists the pruners registered then)."""
  config_flags.DEFINE_config_file(
    "config",
    DEFAULT_CONFIG,
    "Experiment config file: experiments/configs/<arch>.py, or "
    "experiments/configs/generic.py:<arch> for a registered network without one "
    f"(networks: {', '.join(configs.archs())}). Override any field with "
    f"--config.<field>=<value>. {configs.fields_help(DEFAULT_CONFIG)} "
    f"Pruners (--config.pruner): {', '.join(run_config.pruner_names())}.",
  )
  flags.DEFINE_string("out_dir", "out/prune_train", "Where run folders go.")
  plugins.define_flag()
  datasource.define_flags()
  distributed.define_flags()
  compilation_cache.define_flags()
  for name in (plugins.FLAG, "synthetic_data", "tfds_manual_dir", "text_dir"):
    flags.declare_key_flag(name)  # listed by --help, beside --config


def main(argv):
  del argv
  plugins.import_modules(plugins.from_flags())  # imported before the config is checked
  processes.exit_with_parent()
  distributed.initialize_from_flags()
  compilation_cache.from_flags()
  source = datasource.DataSource.from_flags()
  check_config(FLAGS.config, FLAGS.out_dir, source)  # FlagError: a usage error (cli)
  name = run_config.run_name(FLAGS.config)
  try:
    summary = run(FLAGS.config, out_dir=FLAGS.out_dir, source=source)
  except rundir.RunLockedError as err:
    logging.error("%s", err)
    sys.exit(EXIT_LOCKED)
  except training.CheckpointWriteError as err:  # the folder named; no traceback
    logging.error("%s: %s", name, err)
    sys.exit(1)
  except training.Interrupted as err:
    logging.error(
      "%s: interrupted at step %d of %d; run the same command to resume it from its "
      "last checkpoint.",
      name,
      err.step,
      err.stop,
    )
    _exit_interrupted()
  except KeyboardInterrupt:
    logging.error(
      "%s: interrupted before training started; run the same command to start it again.",
      name,
    )
    _exit_interrupted()
  if summary["status"] in ("unreachable", "diverged"):
    print(
      json.dumps(
        results.strict_json(
          {k: summary[k] for k in ("config", "status", "error", "diverged_step") if k in summary}
        ),
        indent=2,
      )
    )
    return
  brief = {
    k: summary[k]
    for k in (
      "direct_compression",
      "effective_compression",
      "test_accuracy",
      "test_loss",
      "test_bits_per_byte",
      "test_perplexity",
      "steps_per_second",
      "wall_time",
    )
    if k in summary  # bits per byte and perplexity: language models only
  }
  print(json.dumps(results.strict_json({"config": summary["config"], **brief}), indent=2))


if __name__ == "__main__":
  cli.run(main, define_flags, config_default=DEFAULT_CONFIG)
