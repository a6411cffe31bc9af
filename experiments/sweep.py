r"""A resumable grid of prune-and-train runs.

  python -m experiments.sweep --archs=lenet300100 --pruners=random/igq,snip \
      --compressions=10,100 --pruning_types=direct,effective --seeds=0,1 \
      --train_steps=6000 --tfds_manual_dir=../shared/data/mnist --jobs=2

Each grid point is a list of overrides of its network's config
(experiments/configs/<arch>.py): its pruner, type, seed and compression, then the
sweep's shared ones (--train_steps, --eval_every, --extra_flags). One code path runs
them: :func:`experiments.configs.load` parses the overrides exactly as the command
line does, and experiments.prune_train runs the config, in this process
(--jobs=1: the dataset is read and the training step compiled once) or in --jobs
subprocesses given the same overrides on their command lines. Each run writes
<out_dir>/<run name>/result.json. A point whose result is valid (experiments.results:
it parses and has what its status needs; a diverged or unreachable run is finished
too) is skipped; an invalid one is moved aside (result.json.invalid-<time>) and run
again; an interrupted point resumes from its Orbax checkpoint. Dense runs go first,
because magnitude and LAMP pruners score the weights they end with. A failed point is
reported and the others go on. Child processes run in their own process groups and
end with the sweep: SIGINT or SIGTERM ends them, and a child whose sweep died
(SIGKILL) stops by itself (experiments.processes).

--executor=ray runs each point as a Ray task instead, on a local Ray instance or the
cluster at --ray_address, each declaring --ray_cpus_per_run CPUs and
--ray_gpus_per_run GPUs; the task runs the same function in a Ray worker, so locking,
skipping and resuming are the ones above, and a point whose worker died is run again
(--ray_max_retries) from its checkpoint (experiments.ray_executor). SIGINT or SIGTERM
cancels the tasks in flight.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import signal
import sys
import threading
import time

import ml_collections
from absl import app, flags, logging

from experiments import common, configs, processes, ray_executor, results

FLAGS = flags.FLAGS


def grid(archs, pruners, compressions, pruning_types, seeds) -> list[dict]:
  """The grid points, dense runs first; duplicates (dense at several targets) removed.

  A point is {arch, pruner, pruning_type, seed, compression} (compression None for
  dense); :func:`overrides` turns it into config overrides.
  """
  for name in pruners:
    common.check_pruner(name)
  common.check_run_args(
    compressions={"compressions": list(compressions)}, nonnegative={"seeds": list(seeds)}
  )
  needs_dense = any(p == "dense" or common.after_training(p) for p in pruners)
  runs = []
  for arch, seed in itertools.product(archs, seeds):
    configs.path(arch)
    if needs_dense:
      runs.append(
        dict(arch=arch, pruner="dense", pruning_type="direct", seed=seed, compression=None)
      )
  for arch, pruner, c, t, seed in itertools.product(
    archs, pruners, compressions, pruning_types, seeds
  ):
    if pruner != "dense":
      runs.append(dict(arch=arch, pruner=pruner, pruning_type=t, seed=seed, compression=c))
  out, seen = [], set()
  for r in runs:
    key = tuple(sorted(r.items()))
    if key not in seen:
      seen.add(key)
      out.append(r)
  return out


def overrides(point: dict, shared: list[str]) -> list[str]:
  """Config overrides ('field=value') of a grid point, then the sweep's shared ones."""
  own = [
    f"pruner={point['pruner']}",
    f"pruning_type={point['pruning_type']}",
    f"seed={point['seed']}",
  ]
  if point["compression"] is not None:
    own.append(f"compression={point['compression']:.10g}")
  return own + list(shared)


def config_for(point: dict, shared: list[str]) -> ml_collections.ConfigDict:
  """The run's config: the network's file with the point's and the shared overrides."""
  return configs.load(point["arch"], overrides(point, shared))


def result_path(config: ml_collections.ConfigDict, out_dir: str) -> str:
  return os.path.join(out_dir, common.run_name(config), "result.json")


def command(
  point: dict,
  shared: list[str],
  out_dir: str,
  source: common.DataSource,
  compilation_cache_dir: str | None = None,
) -> list[str]:
  """The experiments.prune_train command line of a grid point; the child uses the
  persistent compilation cache in ``compilation_cache_dir`` ('' : none; None: the
  child's default)."""
  cmd = [
    sys.executable,
    "-m",
    "experiments.prune_train",
    f"--config={configs.path(point['arch'])}",
    *configs.override_args(overrides(point, shared)),
    f"--out_dir={out_dir}",
  ]
  if compilation_cache_dir is not None:
    cmd.append(f"--compilation_cache_dir={compilation_cache_dir}")
  if source.manual_dir:
    cmd.append(f"--tfds_manual_dir={source.manual_dir}")
  if source.data_dir:
    cmd.append(f"--tfds_data_dir={source.data_dir}")
  if source.synthetic:
    cmd.append("--synthetic_data")
  return cmd


def _run_in_process(
  config: ml_collections.ConfigDict, out_dir: str, source: common.DataSource
) -> int:
  """One grid point in this process (data and compiled steps are reused across runs);
  returns 0 on success, 1 on failure (logged, the sweep goes on)."""
  from experiments import prune_train

  try:
    prune_train.run(config, out_dir=out_dir, source=source)
  except Exception:  # pylint: disable=broad-except
    logging.exception("Run failed: %s", common.run_name(config))
    return 1
  return 0


def run_point(point: dict, shared: list[str], out_dir: str, source: common.DataSource) -> int:
  """A grid point in this process: 0 on success, 1 on failure (logged). What a Ray
  task runs (experiments.ray_executor); --jobs=1 runs the same on its parsed config."""
  return _run_in_process(config_for(point, shared), out_dir, source)


EXECUTORS = ("local", "ray")


def execute(
  points: list[dict],
  shared: list[str],
  out_dir: str,
  source: common.DataSource,
  jobs: int | None = 1,
  executor: str = "local",
  ray_options: ray_executor.RayOptions | None = None,
  compilation_cache_dir: str | None = None,
) -> tuple[int, int, int]:
  """Runs the grid; returns (done, skipped, failed).

  Args:
    jobs: local: runs at once (1: in this process, more: that many subprocesses;
      None: 1). ray: the most runs in flight (None: as many as the cluster holds).
    executor: 'local' (this machine) or 'ray' (Ray tasks, experiments.ray_executor).
    ray_options: the Ray cluster and each task's resources (executor='ray').
    compilation_cache_dir: the persistent compilation cache local child processes
      and Ray workers use ('': none; None: their default). In-process runs use this
      process's setting (:func:`experiments.common.enable_compilation_cache`).

  Raises:
    ValueError: a bad config or flag, ray not installed or its cluster unreachable
      (before any run starts and before any file is written).
    processes.Stopped: SIGINT or SIGTERM while child processes or Ray tasks ran; they
      have been ended.
  """
  from experiments import prune_train  # Imported here: it defines no flags on import.

  if executor not in EXECUTORS:
    raise ValueError(
      f"--executor={executor!r} is not an executor; allowed: {', '.join(EXECUTORS)}."
    )
  runs = [(point, config_for(point, shared)) for point in points]
  for _, config in runs:  # Every point's settings, before any work.
    prune_train.check_config(config, out_dir, source)
  runner = None
  if executor == "ray":
    options = ray_options or ray_executor.RayOptions()
    ray = ray_executor.connect(options)
    runner = ray_executor.RayRuns(ray, options, compilation_cache_dir)
    jobs = jobs or ray_executor.capacity(ray, options)
  jobs = jobs or 1
  todo = [(point, c) for point, c in runs if not results.is_done(result_path(c, out_dir))]
  skipped = len(runs) - len(todo)
  logging.info(
    "Sweep: %d runs, %d already done, %d to run with %d %s.",
    len(runs),
    skipped,
    len(todo),
    jobs,
    "Ray task(s) in flight" if runner else "job(s)",
  )
  dense = [r for r in todo if r[0]["pruner"] == "dense"]
  rest = [r for r in todo if r[0]["pruner"] != "dense"]
  start = time.time()
  children = processes.Children()

  def one(run):
    point, config = run
    if runner is not None:
      return (point, *runner.run(point, shared, out_dir, source))
    if jobs <= 1:
      return point, _run_in_process(config, out_dir, source), "see this process's log"
    log = result_path(config, out_dir).replace("result.json", "log.txt")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
      code = children.run(command(point, shared, out_dir, source, compilation_cache_dir), f)
    return point, code, f"see {log}"

  stoppable = runner if runner is not None else children
  signals = (
    processes.stop_on_signals(stoppable)
    if (jobs > 1 or runner is not None) and threading.current_thread() is threading.main_thread()
    else contextlib.nullcontext()
  )
  with signals:
    return _execute_phases(dense, rest, one, jobs, todo, skipped, start)


def _execute_phases(dense, rest, one, jobs, todo, skipped, start) -> tuple[int, int, int]:
  done = failed = 0
  for phase in (dense, rest):
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
      for point, code, log in pool.map(one, phase):
        if code == 0:
          done += 1
        else:
          failed += 1
          logging.error("Run failed (exit %d; %s): %s", code, log, point)
        finished = done + failed
        elapsed = time.time() - start
        logging.info(
          "[%d/%d] %s %s %s %s seed %d: %s; ETA %.0fs",
          finished,
          len(todo),
          point["arch"],
          point["pruner"],
          point["pruning_type"],
          "dense" if point["compression"] is None else f"{point['compression']:.4g}x",
          point["seed"],
          "ok" if code == 0 else "FAILED",
          elapsed / finished * (len(todo) - finished),
        )
  return done, skipped, failed


def define_flags() -> None:
  """The command-line flags (defined only when run as a binary)."""
  flags.DEFINE_string("archs", "lenet300100", "Comma-separated networks.")
  flags.DEFINE_string("pruners", "random/igq", "Comma-separated pruners (and imp).")
  flags.DEFINE_string("compressions", "10,100", "Comma-separated target compressions.")
  flags.DEFINE_string("pruning_types", "direct", "Comma-separated: direct, effective.")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds.")
  flags.DEFINE_integer(
    "train_steps",
    None,
    "Training steps (default: each network's "
    "config); the same as --extra_flags=--config.train_steps=N.",
  )
  flags.DEFINE_integer("eval_every", None, "Evaluate every N steps (default: the config's).")
  flags.DEFINE_string("out_dir", "out/sweep", "Where run folders go.")
  flags.DEFINE_integer(
    "jobs",
    None,
    "Runs at once. --executor=local: 1 (default) runs "
    "them in this process, more in that many subprocesses. "
    "--executor=ray: the most Ray tasks in flight (default: as many as "
    "the cluster's CPUs and GPUs hold).",
  )
  flags.DEFINE_enum(
    "executor",
    "local",
    list(EXECUTORS),
    "Where runs go: 'local' (this "
    "machine) or 'ray' (one Ray task per run; pip install "
    "'sparsejax[ray]').",
  )
  flags.DEFINE_string(
    "ray_address",
    None,
    "--executor=ray: the cluster's head "
    "('host:port' from `ray start --head`, 'auto', 'ray://host:port'); "
    "empty: start a local Ray instance.",
  )
  flags.DEFINE_float("ray_cpus_per_run", 1.0, "--executor=ray: CPUs each run declares.")
  flags.DEFINE_float(
    "ray_gpus_per_run", 0.0, "--executor=ray: GPUs each run declares (fractions share a GPU)."
  )
  flags.DEFINE_integer(
    "ray_max_retries",
    3,
    "--executor=ray: times a run is started again "
    "after its worker died (it resumes from its checkpoint).",
  )
  flags.DEFINE_string(
    "extra_flags",
    "",
    "Config overrides for every run, space-separated "
    "--config.<field>=<value> (e.g. '--config.imp_rounds=3 "
    "--config.rounds=100').",
  )
  flags.DEFINE_bool("dry_run", False, "List the grid and what would run; run nothing.")
  common.define_compilation_cache_flags()
  common.define_data_flags()


def shared_overrides(train_steps: int | None, eval_every: int | None, extra: str) -> list[str]:
  """The overrides every run of the sweep gets ('field=value')."""
  shared = []
  if train_steps is not None:
    shared.append(f"train_steps={train_steps}")
  if eval_every is not None:
    shared.append(f"eval_every={eval_every}")
  return shared + [a[len("--config.") :] for a in configs.override_args(extra.split())]


def _ray_options():
  if FLAGS.executor != "ray":
    return None
  return ray_executor.RayOptions(
    address=FLAGS.ray_address or None,
    cpus_per_run=FLAGS.ray_cpus_per_run,
    gpus_per_run=FLAGS.ray_gpus_per_run,
    max_retries=FLAGS.ray_max_retries,
  )


def main(argv):
  del argv
  common.check_run_args(
    out_dir=None if FLAGS.dry_run else FLAGS.out_dir,
    optional_counts={
      "jobs": FLAGS.jobs,
      "train_steps": FLAGS.train_steps,
      "eval_every": FLAGS.eval_every,
    },
  )
  points = grid(
    common.parse_list(FLAGS.archs, name="archs"),
    common.parse_list(FLAGS.pruners, name="pruners"),
    common.parse_list(FLAGS.compressions, float, "compressions"),
    common.parse_list(FLAGS.pruning_types, name="pruning_types"),
    common.parse_list(FLAGS.seeds, int, "seeds"),
  )
  shared = shared_overrides(FLAGS.train_steps, FLAGS.eval_every, FLAGS.extra_flags)
  source = common.DataSource.from_flags()
  if FLAGS.dry_run:
    for point in points:
      state = "done  "
      try:
        results.load(result_path(config_for(point, shared), FLAGS.out_dir))
      except FileNotFoundError:
        state = "todo  "
      except results.InvalidResultError:
        state = "redo  "  # Invalid result: a real run moves it aside and runs again.
      print(state + " ".join(command(point, shared, FLAGS.out_dir, source)[3:]))
    return
  cache = common.compilation_cache_from_flags()  # in-process runs, and the children
  try:
    done, skipped, failed = execute(
      points, shared, FLAGS.out_dir, source, FLAGS.jobs, FLAGS.executor, _ray_options(), cache or ""
    )
  except processes.Stopped as stop:
    print(
      f"Sweep stopped by {signal.Signals(stop.signum).name}; its runs were ended and "
      "resume from their checkpoints when the sweep runs again."
    )
    sys.exit(128 + stop.signum)
  print(f"Sweep finished: {done} ran, {skipped} skipped (valid results exist), {failed} failed.")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
