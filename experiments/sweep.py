r"""A resumable grid of prune-and-train runs.

  python -m experiments.sweep --archs=lenet300100 --pruners=random/igq,snip \
      --compressions=10,100 --pruning_types=direct,effective --seeds=0,1 \
      --train_steps=6000 --tfds_manual_dir=../shared/data/mnist --jobs=2

Each grid point (experiments.grid) is a list of overrides of its network's config
(experiments/configs/<arch>.py, or generic.py:<arch> for a registered network without
one): its pruner, type, seed and compression, then the sweep's shared ones
(--train_steps, --eval_every, --extra_flags). One code path runs them:
:func:`experiments.configs.load` parses the overrides exactly as the command line
does, and experiments.prune_train runs the config, in this process (--jobs=1: the
dataset is read and the training step compiled once) or in --jobs subprocesses given
the same overrides on their command lines (experiments.executors). Each run writes
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

--import=module[,module] (module names or .py paths, experiments.plugins): imported by
the sweep before anything else and passed on to every child process and Ray task, so
the pruners and networks a module registers can be points of the grid.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Sequence

from absl import app, flags, logging

from experiments import (
  checks,
  cli,
  compilation_cache,
  configs,
  datasource,
  executors,
  grid,
  plugins,
  processes,
  prune_train,
  ray_executor,
  results,
  run_config,
)

FLAGS = flags.FLAGS


EXECUTORS = ("local", "ray")


def execute(
  points: list[dict],
  shared: list[str],
  out_dir: str,
  source: datasource.DataSource,
  jobs: int | None = 1,
  executor: str = "local",
  ray_options: ray_executor.RayOptions | None = None,
  compilation_cache_dir: str | None = None,
  imports: Sequence[str] = (),
) -> tuple[int, int, int]:
  """Runs the grid; returns (done, skipped, failed).

  Args:
    jobs: local: runs at once (1: in this process, more: that many subprocesses;
      None: 1). ray: the most runs in flight (None: as many as the cluster holds).
    executor: 'local' (this machine) or 'ray' (Ray tasks, experiments.ray_executor).
    ray_options: the Ray cluster and each task's resources (executor='ray').
    compilation_cache_dir: the persistent compilation cache local child processes
      and Ray workers use ('': none; None: their default). In-process runs use this
      process's setting (:func:`experiments.compilation_cache.enable`).
    imports: modules (names or .py paths, experiments.plugins) that register pruners
      or networks: imported here first, and by every child process and Ray task.

  Raises:
    experiments.checks.FlagError: a bad config or flag (before any run starts and
      before any file is written).
    ValueError: ray not installed, a bad Ray flag or its cluster unreachable
      (experiments.ray_executor; before any run starts).
    processes.Stopped: SIGINT or SIGTERM while child processes or Ray tasks ran; they
      have been ended.
  """
  plugins.import_modules(imports)
  if executor not in EXECUTORS:
    raise checks.FlagError(
      f"--executor={executor!r} is not an executor; allowed: {', '.join(EXECUTORS)}."
    )
  runs = [(point, grid.config_for(point, shared)) for point in points]
  for _, config in runs:  # Every point's settings, before any work.
    prune_train.check_config(config, out_dir, source)
  if executor == "ray":
    options = ray_options or ray_executor.RayOptions()
    ray = ray_executor.connect(options)
    runner = ray_executor.RayRuns(ray, options, compilation_cache_dir, imports)
    jobs = jobs or ray_executor.capacity(ray, options)
  elif (jobs or 1) <= 1:
    runner = executors.InProcess()
  else:
    runner = executors.ChildProcesses(compilation_cache_dir, imports)
  jobs = jobs or 1
  todo = [(point, c) for point, c in runs if not results.is_done(grid.result_path(c, out_dir))]
  skipped = len(runs) - len(todo)
  logging.info(
    "Sweep: %d runs, %d already done, %d to run with %d %s.",
    len(runs),
    skipped,
    len(todo),
    jobs,
    "Ray task(s) in flight" if executor == "ray" else "job(s)",
  )
  dense = [r for r in todo if r[0]["pruner"] == "dense"]
  rest = [r for r in todo if r[0]["pruner"] != "dense"]
  start = time.time()

  def one(run):
    point, _ = run
    return (point, *runner.run(point, shared, out_dir, source))

  signals = (
    processes.stop_on_signals(runner)
    if not isinstance(runner, executors.InProcess)
    and threading.current_thread() is threading.main_thread()
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
  """The command-line flags (defined only when run as a binary, after --import: the
  help lists the networks and pruners registered then)."""
  flags.DEFINE_string(
    "archs", "lenet300100", f"Comma-separated networks: {', '.join(configs.archs())}."
  )
  flags.DEFINE_string(
    "pruners",
    "random/igq",
    f"Comma-separated pruners: {', '.join(run_config.pruner_names())}.",
  )
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
    f"--config.rounds=100'). {configs.fields_help(configs.path('lenet300100'))}",
  )
  flags.DEFINE_bool("dry_run", False, "List the grid and what would run; run nothing.")
  plugins.define_flag()
  flags.declare_key_flag(plugins.FLAG)
  compilation_cache.define_flags()
  datasource.define_flags()


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
  imports = plugins.from_flags()
  plugins.import_modules(imports)  # before the networks and pruners are checked
  # Every flag and every point's config (--extra_flags), before any work; a bad one is
  # a FlagError, which experiments.cli reports as a usage error.
  checks.check_run_args(
    out_dir=None if FLAGS.dry_run else FLAGS.out_dir,
    optional_counts={
      "jobs": FLAGS.jobs,
      "train_steps": FLAGS.train_steps,
      "eval_every": FLAGS.eval_every,
    },
  )
  points = grid.grid(
    checks.parse_list(FLAGS.archs, name="archs"),
    checks.parse_list(FLAGS.pruners, name="pruners"),
    checks.parse_list(FLAGS.compressions, float, "compressions"),
    checks.parse_list(FLAGS.pruning_types, name="pruning_types"),
    checks.parse_list(FLAGS.seeds, int, "seeds"),
  )
  shared = grid.shared_overrides(FLAGS.train_steps, FLAGS.eval_every, FLAGS.extra_flags)
  for point in points:
    grid.config_for(point, shared)
  source = datasource.DataSource.from_flags()
  if FLAGS.dry_run:
    for point in points:
      state = "done  "
      try:
        results.load(grid.result_path(grid.config_for(point, shared), FLAGS.out_dir))
      except FileNotFoundError:
        state = "todo  "
      except results.InvalidResultError:
        state = "redo  "  # Invalid result: a real run moves it aside and runs again.
      cmd = grid.command(point, shared, FLAGS.out_dir, source, imports=imports)
      print(state + " ".join(cmd[3:]))
    return
  cache = compilation_cache.from_flags()  # in-process runs, and the children
  try:
    done, skipped, failed = execute(
      points,
      shared,
      FLAGS.out_dir,
      source,
      FLAGS.jobs,
      FLAGS.executor,
      _ray_options(),
      cache or "",
      imports,
    )
  except checks.FlagError:
    raise
  except ValueError as err:  # experiments.ray_executor's checks of its flags and cluster
    raise app.UsageError(str(err)) from None
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
  cli.run(main, define_flags)
