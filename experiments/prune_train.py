r"""Prune a network, train it, and record direct/effective sparsity and accuracy.

  python -m experiments.prune_train --arch=lenet300100 --pruner=random/igq \
      --compression=100 --pruning_type=effective --train_steps=3000 \
      --tfds_manual_dir=../shared/data/mnist

One run writes <out_dir>/<run name>/result.json atomically: the full config, direct
and effective compression, per-layer direct and effective sparsity, active units,
the test accuracy/loss history, the final test accuracy, steps per second and wall
time. Training checkpoints (Orbax) go to <run dir>/checkpoints, and an interrupted
run resumes from them; the masks are saved as <run dir>/masks.npz.

Paper flows (method.md section 4):
- --pruner=dense saves the initial and final weights (<run dir>/weights/); the
  magnitude and LAMP pruners score the final weights of the dense run with the same
  arch/dataset/seed/train_steps (or --dense_dir) and train from its initial weights.
- --pruner=imp: iterative magnitude pruning with rewinding: train, prune globally by
  magnitude to density d^(r/R) in round r of R = --imp_rounds, rewind the kept weights
  to their values at --rewind_step (0: initialization), repeat; the last round's
  training is the result.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from experiments import common, configs, processes, rundir
from sparsejax import data, effective, masks as masks_lib, models, pruning, training

FLAGS = flags.FLAGS
# Exit status of a run refused because another process works in its folder.
EXIT_LOCKED = 75


def target_sparsity(compression: float | None, sparsity: float | None) -> float:
  if (compression is None) == (sparsity is None):
    if compression is None and sparsity is None:
      return 0.0
    raise ValueError("give either --compression or --target_sparsity, not both.")
  if compression is not None:
    return 1.0 - 1.0 / common.check_compression_flag("compression", compression)
  if not 0 <= sparsity < 1:
    raise ValueError(f"--target_sparsity={sparsity!r} is outside the allowed range [0, 1).")
  return sparsity


def connectivity_report(model, masks, input_shape) -> dict:
  conn = effective.connectivity(model, masks, input_shape)
  direct = masks_lib.layer_sparsities(masks)
  eff = masks_lib.layer_sparsities(conn.masks)
  return {
      "direct_compression": masks_lib.compression(masks),
      "effective_compression": masks_lib.compression(conn.masks),
      "direct_sparsity": masks_lib.direct_sparsity(masks),
      "effective_sparsity": masks_lib.direct_sparsity(conn.masks),
      "layers": [{"layer": k, "direct_sparsity": direct[k], "effective_sparsity": eff[k]}
                 for k in direct],
      "active_units": {k: [conn.active_units[k], conn.total_units[k]]
                       for k in conn.active_units},
      "active_inputs": [conn.active_inputs, conn.total_inputs],
  }


def _save_params(path: str, params) -> None:
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), params, force=True)
  ckptr.wait_until_finished()


def _load_params(path: str, like):
  if not os.path.exists(path):
    raise FileNotFoundError(f"no weights at {path!r}: run --pruner=dense with the same "
                            "--arch, --dataset, --seed and --train_steps first (or pass "
                            "--dense_dir).")
  return ocp.StandardCheckpointer().restore(os.path.abspath(path), like)


def run(*, arch: str, dataset: str | None, pruner: str, sparsity: float, pruning_type: str,
        seed: int, train_steps: int | None, out_dir: str, synthetic: bool,
        manual_dir: str | None, data_dir: str | None, dense_dir: str | None = None,
        eval_every: int = 1000, checkpoint_every: int = 1000, log_every: int = 500,
        imp_rounds: int = 5, rewind_step: int = 0, score_batches: int = 10,
        score_kwargs: dict | None = None, num_examples: int | None = None) -> dict:
  """Prunes, trains and writes the result JSON; returns the result.

  A run whose training diverges (non-finite loss or parameters) is recorded with
  status 'diverged' and the step (no checkpoint holds non-finite values).

  Raises:
    ValueError: a bad argument (named as its flag), before any work.
    rundir.RunLockedError: another process is working on this run.
  """
  start_time = time.time()
  _check_args(sparsity=sparsity, seed=seed, train_steps=train_steps, out_dir=out_dir,
              eval_every=eval_every, checkpoint_every=checkpoint_every, log_every=log_every,
              imp_rounds=imp_rounds, rewind_step=rewind_step, score_batches=score_batches,
              num_examples=num_examples)
  spec = models.get_spec(arch)
  dataset = dataset or spec.dataset
  dspec = data.get_spec(dataset)
  overrides = {"dataset": dataset} | (
      {} if train_steps is None else {"train_steps": train_steps})
  config = configs.get_config(arch, **overrides)
  if pruner != "imp":
    pruning.get_pruner(pruner)
  name = common.run_name(arch, dataset, pruner, pruning_type, sparsity, seed,
                         config.train_steps)
  run_dir = os.path.join(out_dir, name)
  result_path = os.path.join(run_dir, "result.json")
  os.makedirs(run_dir, exist_ok=True)

  with rundir.locked(run_dir), rundir.WallClock(run_dir, start_time) as clock:
    model = models.create(arch, dspec.num_classes)
    input_shape = dspec.image_shape
    key = jax.random.key(seed)
    variables = model.init(jax.random.fold_in(key, 0), jnp.ones((1,) + input_shape))
    init_params = variables["params"]
    load = lambda split: common.load_data(dataset, split, synthetic=synthetic,
                                          manual_dir=manual_dir, data_dir=data_dir, seed=seed,
                                          num_examples=num_examples if synthetic else None)
    train_data, test_data = load("train"), load("test")
    train_kwargs = dict(seed=seed, eval_every=eval_every, checkpoint_every=checkpoint_every,
                        log_every=log_every)

    def dense_weights():
      folder = dense_dir or os.path.join(out_dir, common.run_name(
          arch, dataset, "dense", "direct", 0.0, seed, config.train_steps))
      return (_load_params(os.path.join(folder, "weights", "initial"), init_params),
              _load_params(os.path.join(folder, "weights", "final"), init_params))

    mask_path = os.path.join(run_dir, "masks.npz")
    rounds = []
    p = pruning.get_pruner(pruner) if pruner != "imp" else None
    record = lambda: _config_record(arch, dataset, pruner, pruning_type, sparsity, seed,
                                    synthetic, imp_rounds, rewind_step, config)
    if pruner == "imp":
      try:
        result = _imp(model, dspec, config, train_data, test_data, init_params, sparsity,
                      pruning_type, input_shape, run_dir, imp_rounds, rewind_step,
                      train_kwargs, rounds)
      except training.DivergedError as err:
        return _record_diverged(err, result_path, record(), {"imp_rounds": rounds}, clock)
      masks, start_params = result.state.masks, None
    else:
      start_params = init_params
      if os.path.exists(mask_path):  # resumed run: the same masks, no re-scoring
        masks = masks_lib.load(mask_path, init_params)
      else:
        trained = None
        if p.after_training:
          start_params, trained = dense_weights()
        batches = None
        if p.needs_data:
          batches = common.score_batches(
              dataset, num_batches=score_batches, batch_size=config.snip_batch_size, seed=seed,
              synthetic=synthetic, manual_dir=manual_dir, data_dir=data_dir)
        try:
          masks = pruning.prune(pruner, key=jax.random.fold_in(key, 1), model=model,
                                variables={**variables, "params": start_params},
                                sparsity=sparsity, pruning_type=pruning_type,
                                input_shape=input_shape, batches=batches,
                                trained_params=trained, score_kwargs=score_kwargs)
        except ValueError as err:
          if "cannot be reached" not in str(err):
            raise
          # An effective target beyond this ranking's reach is a result, not a failure:
          # record it so the grid is complete and the sweep does not retry it.
          logging.warning("%s: %s", name, err)
          summary = {"config": _config_record(arch, dataset, pruner, pruning_type, sparsity,
                                              seed, synthetic, imp_rounds, rewind_step, config),
                     "status": "unreachable", "error": str(err), "test_accuracy": None,
                     **_wall_times(clock), "platform": jax.default_backend()}
          common.atomic_write_json(result_path, summary)
          return summary
        masks_lib.save(mask_path, masks)
      if pruner == "dense":
        _save_params(os.path.join(run_dir, "weights", "initial"), init_params)
      report = connectivity_report(model, masks, input_shape)
      logging.info("%s: direct %.4gx, effective %.4gx compression.", name,
                   report["direct_compression"], report["effective_compression"])
      try:
        result = training.train(model, dspec, config, train_data, test_data, masks=masks,
                                params=start_params,
                                workdir=os.path.abspath(os.path.join(run_dir, "checkpoints")),
                                **train_kwargs)
      except training.DivergedError as err:
        return _record_diverged(err, result_path, record(), report, clock)
      if pruner == "dense":
        _save_params(os.path.join(run_dir, "weights", "final"), result.state.params)
    report = connectivity_report(model, masks, input_shape)
    summary = {
        "config": _config_record(arch, dataset, pruner, pruning_type, sparsity, seed,
                                 synthetic, imp_rounds, rewind_step, config),
        "status": "disconnected" if report["effective_compression"] == float("inf") else "ok",
        **report,
        "history": result.history,
        "test_accuracy": result.final_test_accuracy,
        "test_loss": result.final_test_loss,
        # None (not NaN) when this process trained no steps (a finished run resumed).
        "steps_per_second": (result.steps_per_second
                             if math.isfinite(result.steps_per_second) else None),
        **_wall_times(clock),
        "imp_rounds": rounds or None,
        "platform": jax.default_backend(),
    }
    common.atomic_write_json(result_path, summary)
    logging.info("Wrote %s: test accuracy %.4f.", result_path, result.final_test_accuracy)
    return summary


def _wall_times(clock: rundir.WallClock) -> dict:
  """wall_time: seconds over all processes of the run; the last one's separately."""
  return {"wall_time": clock.total(), "wall_time_last_process": clock.this_process(),
          "processes": clock.processes()}


def _record_diverged(err: training.DivergedError, result_path: str, config_record: dict,
                     extra: dict, clock: rundir.WallClock) -> dict:
  """Writes and returns the result of a run whose training diverged: finished, not
  failed (a sweep does not retry it)."""
  logging.error("%s: %s", os.path.dirname(result_path), err)
  summary = {"config": config_record, "status": "diverged", "diverged_step": err.step,
             "error": str(err), "test_accuracy": None, **extra, **_wall_times(clock),
             "platform": jax.default_backend()}
  common.atomic_write_json(result_path, summary)
  return summary


def _check_args(*, sparsity, seed, train_steps, out_dir, eval_every, checkpoint_every,
                log_every, imp_rounds, rewind_step, score_batches, num_examples) -> None:
  """Every numeric argument and out_dir, before any work (named as the flags)."""
  if isinstance(sparsity, bool) or not (isinstance(sparsity, (int, float))
                                        and 0 <= sparsity < 1):
    raise ValueError(f"sparsity={sparsity!r} (from --compression or --target_sparsity) "
                     "must be in [0, 1).")
  common.check_run_args(
      out_dir=out_dir, nonnegative={"seed": seed, "rewind_step": rewind_step},
      counts={"eval_every": eval_every, "checkpoint_every": checkpoint_every,
              "log_every": log_every, "imp_rounds": imp_rounds,
              "score_batches": score_batches},
      optional_counts={"train_steps": train_steps, "num_examples": num_examples})


def _config_record(arch, dataset, pruner, pruning_type, sparsity, seed, synthetic,
                   imp_rounds, rewind_step, config) -> dict:
  return {"arch": arch, "dataset": dataset, "pruner": pruner,
          "pruning_type": pruning_type, "target_sparsity": sparsity,
          "target_compression": 1.0 / (1.0 - sparsity), "seed": seed,
          "synthetic_data": synthetic, "imp_rounds": imp_rounds if pruner == "imp" else None,
          "rewind_step": rewind_step if pruner == "imp" else None,
          "train": {k: getattr(config, k) for k in config.__dataclass_fields__}}


def _imp(model, dspec, config, train_data, test_data, init_params, sparsity, pruning_type,
         input_shape, run_dir, imp_rounds, rewind_step, train_kwargs, rounds):
  """Iterative magnitude pruning with rewinding; returns the last round's TrainResult."""
  if imp_rounds < 1:
    raise ValueError(f"--imp_rounds={imp_rounds!r} must be at least 1.")
  if not 0 <= rewind_step < config.train_steps:
    raise ValueError(f"--rewind_step={rewind_step!r} must be in [0, train_steps).")
  workdir = lambda r: os.path.abspath(os.path.join(run_dir, f"round{r}", "checkpoints"))
  masks = masks_lib.ones(init_params)
  rewind = init_params
  if rewind_step > 0:
    early = training.train(model, dspec, config, train_data, test_data, masks=masks,
                           params=init_params, workdir=workdir(0), num_steps=rewind_step,
                           **train_kwargs)
    rewind = early.state.params
  result = training.train(model, dspec, config, train_data, test_data, masks=masks,
                          params=init_params, workdir=workdir(0), **train_kwargs)
  for r in range(1, imp_rounds + 1):
    round_sparsity = 1.0 - (1.0 - sparsity) ** (r / imp_rounds)
    # Global magnitude among the kept weights; pruned ones rank last.
    scores = masks_lib.map_masks(lambda m, w: jnp.where(m, jnp.abs(w), -1.0), masks,
                                 result.state.params)
    masks = pruning.masks_from_ranking(pruning.rank_scores(scores), round_sparsity,
                                       pruning_type, model=model, input_shape=input_shape)
    rounds.append({"round": r, "target_sparsity": round_sparsity,
                   "test_accuracy_before": result.final_test_accuracy,
                   **{k: v for k, v in connectivity_report(model, masks, input_shape).items()
                      if k.endswith("compression")}})
    logging.info("IMP round %d/%d: direct %.4gx, effective %.4gx.", r, imp_rounds,
                 rounds[-1]["direct_compression"], rounds[-1]["effective_compression"])
    result = training.train(model, dspec, config, train_data, test_data, masks=masks,
                            params=masks_lib.apply(rewind, masks), workdir=workdir(r),
                            **train_kwargs)
  return result



def define_flags() -> None:
  """The command-line flags (defined only when run as a binary)."""
  flags.DEFINE_string("arch", "lenet300100", f"Network: {', '.join(models.MODELS)}.")
  flags.DEFINE_string("dataset", None, "Dataset (default: the network's paper dataset).")
  flags.DEFINE_string("pruner", "random/igq",
                      f"Pruner: {', '.join(pruning.PRUNERS)}, or imp.")
  flags.DEFINE_float("compression", None, "Target compression (100 = 99% sparse).")
  flags.DEFINE_float("target_sparsity", None, "Target sparsity in [0, 1) (or --compression).")
  flags.DEFINE_enum("pruning_type", "direct", list(pruning.PRUNING_TYPES),
                    "Hit the target in direct or in effective sparsity.")
  flags.DEFINE_integer("seed", 0, "Seed: initial weights, pruning, data order.")
  flags.DEFINE_integer("train_steps", None, "Training steps (default: the paper's); the "
                       "learning-rate decays stay at the same fractions of the run.")
  flags.DEFINE_integer("eval_every", 1000, "Evaluate on the test split every N steps.")
  flags.DEFINE_integer("checkpoint_every", 1000, "Checkpoint every N steps.")
  flags.DEFINE_integer("log_every", 500, "Progress line every N steps.")
  flags.DEFINE_string("out_dir", "out/prune_train", "Where run folders go.")
  flags.DEFINE_string("dense_dir", None, "Run folder of the dense run whose weights "
                      "magnitude/LAMP/imp score (default: the matching dense run in out_dir).")
  flags.DEFINE_integer("imp_rounds", 5, "Rounds of iterative magnitude pruning.")
  flags.DEFINE_integer("rewind_step", 0, "IMP rewinds kept weights to this training step.")
  flags.DEFINE_integer("score_batches", 10, "Training batches for SNIP/GraSP scores.")
  flags.DEFINE_integer("snip_rounds", 300, "Rounds of iterative SNIP.")
  flags.DEFINE_integer("synflow_rounds", 100, "Rounds of SynFlow.")
  common.define_data_flags()


def main(argv):
  del argv
  processes.exit_with_parent()
  sparsity = target_sparsity(FLAGS.compression, FLAGS.target_sparsity)
  common.check_run_args(counts={"snip_rounds": FLAGS.snip_rounds,
                                "synflow_rounds": FLAGS.synflow_rounds})
  score_kwargs = ({"rounds": FLAGS.snip_rounds} if FLAGS.pruner == "snip/iterative" else
                  {"rounds": FLAGS.synflow_rounds} if FLAGS.pruner == "synflow" else None)
  try:
    summary = run(arch=FLAGS.arch, dataset=FLAGS.dataset, pruner=FLAGS.pruner,
                  sparsity=sparsity, pruning_type=FLAGS.pruning_type, seed=FLAGS.seed,
                  train_steps=FLAGS.train_steps, out_dir=FLAGS.out_dir,
                  synthetic=FLAGS.synthetic_data, manual_dir=FLAGS.tfds_manual_dir,
                  data_dir=FLAGS.tfds_data_dir, dense_dir=FLAGS.dense_dir,
                  eval_every=FLAGS.eval_every, checkpoint_every=FLAGS.checkpoint_every,
                  log_every=FLAGS.log_every, imp_rounds=FLAGS.imp_rounds,
                  rewind_step=FLAGS.rewind_step, score_batches=FLAGS.score_batches,
                  score_kwargs=score_kwargs)
  except rundir.RunLockedError as err:
    logging.error("%s", err)
    sys.exit(EXIT_LOCKED)
  if summary["status"] in ("unreachable", "diverged"):
    print(json.dumps(common.strict_json({k: summary[k] for k in (
        "config", "status", "error", "diverged_step") if k in summary}), indent=2))
    return
  brief = {k: summary[k] for k in ("direct_compression", "effective_compression",
                                   "test_accuracy", "test_loss", "steps_per_second",
                                   "wall_time")}
  print(json.dumps(common.strict_json({"config": summary["config"], **brief}), indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
