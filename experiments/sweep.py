r"""A resumable grid of prune-and-train runs.

  python -m experiments.sweep --archs=lenet300100 --pruners=random/igq,snip \
      --compressions=10,100 --pruning_types=direct,effective --seeds=0,1 \
      --train_steps=6000 --tfds_manual_dir=../shared/data/mnist --jobs=2

Each grid point is one `experiments.prune_train` process writing
<out_dir>/<run name>/result.json. A point whose result is valid (experiments.results:
it parses and has what its status needs; a diverged or unreachable run is finished
too) is skipped; an invalid one is moved aside (result.json.invalid-<time>) and run
again; an interrupted point resumes from its Orbax checkpoint. Dense runs go first,
because magnitude and LAMP pruners score the weights they end with. --jobs runs that
many processes at once; with --jobs=1 the runs share this process, so the dataset is
read and the training step compiled once. A failed point is reported and the others go
on. Child processes run in their own process groups and end with the sweep: SIGINT or
SIGTERM ends them, and a child whose sweep died (SIGKILL) stops by itself
(experiments.processes).
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

from absl import app, flags, logging

from experiments import common, configs, processes, results
from sparsejax import models, pruning

FLAGS = flags.FLAGS


def grid(archs, pruners, compressions, pruning_types, seeds, train_steps) -> list[dict]:
  """The runs, dense ones first; duplicates (dense at several targets) removed."""
  for name in pruners:
    if name != "imp":
      pruning.get_pruner(name)
  common.check_run_args(compressions={"compressions": list(compressions)},
                        nonnegative={"seeds": list(seeds)},
                        optional_counts={"train_steps": train_steps})
  runs, seen = [], set()
  needs_dense = any(p == "dense" or (p != "imp" and pruning.get_pruner(p).after_training)
                    for p in pruners)
  for arch, seed in itertools.product(archs, seeds):
    models.get_spec(arch)
    if needs_dense:
      runs.append(dict(arch=arch, pruner="dense", compression=1.0, pruning_type="direct",
                       seed=seed))
  for arch, pruner, c, t, seed in itertools.product(archs, pruners, compressions,
                                                   pruning_types, seeds):
    if pruner == "dense":
      continue
    runs.append(dict(arch=arch, pruner=pruner, compression=c, pruning_type=t, seed=seed))
  out = []
  for r in runs:
    key = tuple(sorted(r.items()))
    if key not in seen:
      seen.add(key)
      out.append(r)
  return out


def result_path(run: dict, out_dir: str, train_steps: int | None) -> str:
  spec = models.get_spec(run["arch"])
  steps = configs.get_config(run["arch"]).train_steps if train_steps is None else train_steps
  name = common.run_name(run["arch"], spec.dataset, run["pruner"], run["pruning_type"],
                              1.0 - 1.0 / run["compression"], run["seed"], steps)
  return os.path.join(out_dir, name, "result.json")


def command(run: dict, args: dict) -> list[str]:
  cmd = [sys.executable, "-m", "experiments.prune_train", f"--arch={run['arch']}",
         f"--pruner={run['pruner']}", f"--pruning_type={run['pruning_type']}",
         f"--seed={run['seed']}", f"--out_dir={args['out_dir']}",
         f"--eval_every={args['eval_every']}"]
  if run["pruner"] != "dense":
    cmd.append(f"--compression={run['compression']:.10g}")
  for flag in ("train_steps", "tfds_manual_dir", "tfds_data_dir"):
    if args.get(flag) is not None:
      cmd.append(f"--{flag}={args[flag]}")
  if args.get("synthetic_data"):
    cmd.append("--synthetic_data")
  return cmd + args.get("extra", [])


# prune_train flags that --extra_flags may set for in-process runs, with their types.
_EXTRA = {"imp_rounds": int, "rewind_step": int, "score_batches": int,
          "checkpoint_every": int, "log_every": int, "dense_dir": str}
_ROUNDS = {"snip_rounds": ("snip/iterative", int), "synflow_rounds": ("synflow", int)}


def _run_in_process(run: dict, args: dict) -> int:
  """One grid point in this process (data and compiled steps are reused across runs);
  returns 0 on success, 1 on failure (logged, the sweep goes on)."""
  from experiments import prune_train  # Imported here: it defines no flags on import.
  kwargs, score_kwargs = {}, None
  for item in args.get("extra", []):
    key, _, value = item.lstrip("-").partition("=")
    if key in _EXTRA:
      kwargs[key] = _EXTRA[key](value)
    elif key in _ROUNDS:
      if run["pruner"] == _ROUNDS[key][0]:
        score_kwargs = {"rounds": _ROUNDS[key][1](value)}
    else:
      raise ValueError(f"--extra_flags={item!r}: in-process runs (--jobs=1) take "
                       f"{', '.join(sorted(_EXTRA) + sorted(_ROUNDS))}.")
  try:
    prune_train.run(arch=run["arch"], dataset=None, pruner=run["pruner"],
                    sparsity=0.0 if run["pruner"] == "dense" else 1.0 - 1.0 / run["compression"],
                    pruning_type=run["pruning_type"], seed=run["seed"],
                    train_steps=args.get("train_steps"), out_dir=args["out_dir"],
                    synthetic=bool(args.get("synthetic_data")),
                    manual_dir=args.get("tfds_manual_dir"), data_dir=args.get("tfds_data_dir"),
                    eval_every=args["eval_every"], score_kwargs=score_kwargs, **kwargs)
  except Exception:  # pylint: disable=broad-except
    logging.exception("Run failed: %s", run)
    return 1
  return 0


def execute(runs: list[dict], args: dict, jobs: int = 1) -> tuple[int, int, int]:
  """Runs the grid; returns (done, skipped, failed).

  Raises:
    processes.Stopped: SIGINT or SIGTERM while child processes ran (jobs > 1); they
      have been ended.
  """
  todo = [r for r in runs if not results.is_done(result_path(r, args["out_dir"],
                                                             args.get("train_steps")))]
  skipped = len(runs) - len(todo)
  logging.info("Sweep: %d runs, %d already done, %d to run with %d job(s).", len(runs),
               skipped, len(todo), jobs)
  dense = [r for r in todo if r["pruner"] == "dense"]
  rest = [r for r in todo if r["pruner"] != "dense"]
  start = time.time()
  children = processes.Children()

  def one(run):
    if jobs <= 1:
      return run, _run_in_process(run, args), "(this process's log)"
    os.makedirs(args["out_dir"], exist_ok=True)
    log = result_path(run, args["out_dir"], args.get("train_steps")).replace(
        "result.json", "log.txt")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
      code = children.run(command(run, args), f)
    return run, code, log

  signals = (processes.stop_on_signals(children)
             if jobs > 1 and threading.current_thread() is threading.main_thread()
             else contextlib.nullcontext())
  with signals:
    return _execute_phases(dense, rest, one, jobs, todo, skipped, start)


def _execute_phases(dense, rest, one, jobs, todo, skipped, start) -> tuple[int, int, int]:
  done = failed = 0
  for phase in (dense, rest):
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
      for run, code, log in pool.map(one, phase):
        if code == 0:
          done += 1
        else:
          failed += 1
          logging.error("Run failed (exit %d), see %s: %s", code, log, run)
        finished = done + failed
        elapsed = time.time() - start
        logging.info("[%d/%d] %s %s %s %.4gx seed %d: %s; ETA %.0fs", finished, len(todo),
                     run["arch"], run["pruner"], run["pruning_type"], run["compression"],
                     run["seed"], "ok" if code == 0 else "FAILED",
                     elapsed / finished * (len(todo) - finished))
  return done, skipped, failed



def define_flags() -> None:
  """The command-line flags (defined only when run as a binary)."""
  flags.DEFINE_string("archs", "lenet300100", "Comma-separated networks.")
  flags.DEFINE_string("pruners", "random/igq", "Comma-separated pruners (and imp).")
  flags.DEFINE_string("compressions", "10,100", "Comma-separated target compressions.")
  flags.DEFINE_string("pruning_types", "direct", "Comma-separated: direct, effective.")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds.")
  flags.DEFINE_integer("train_steps", None, "Training steps (default: each paper config).")
  flags.DEFINE_string("out_dir", "out/sweep", "Where run folders go.")
  flags.DEFINE_integer("jobs", 1, "Runs at once: 1 runs them in this process, more in "
                       "that many subprocesses.")
  flags.DEFINE_integer("eval_every", 1000, "Evaluate every N steps.")
  flags.DEFINE_string("extra_flags", "", "More flags passed to every prune_train run, "
                      "space-separated (e.g. '--imp_rounds=3 --snip_rounds=100').")
  flags.DEFINE_bool("dry_run", False, "List the grid and what would run; run nothing.")
  common.define_data_flags()


def main(argv):
  del argv
  common.check_run_args(out_dir=None if FLAGS.dry_run else FLAGS.out_dir,
                        counts={"jobs": FLAGS.jobs, "eval_every": FLAGS.eval_every},
                        optional_counts={"train_steps": FLAGS.train_steps})
  runs = grid(common.parse_list(FLAGS.archs, name="archs"),
              common.parse_list(FLAGS.pruners, name="pruners"),
              common.parse_list(FLAGS.compressions, float, "compressions"),
              common.parse_list(FLAGS.pruning_types, name="pruning_types"),
              common.parse_list(FLAGS.seeds, int, "seeds"), FLAGS.train_steps)
  args = dict(out_dir=FLAGS.out_dir, train_steps=FLAGS.train_steps,
              tfds_manual_dir=FLAGS.tfds_manual_dir, tfds_data_dir=FLAGS.tfds_data_dir,
              synthetic_data=FLAGS.synthetic_data, eval_every=FLAGS.eval_every,
              extra=FLAGS.extra_flags.split())
  if FLAGS.dry_run:
    for r in runs:
      state = "done  "
      try:
        results.load(result_path(r, FLAGS.out_dir, FLAGS.train_steps))
      except FileNotFoundError:
        state = "todo  "
      except results.InvalidResultError:
        state = "redo  "  # Invalid result: a real run moves it aside and runs again.
      print(state + " ".join(command(r, args)[3:]))
    return
  try:
    done, skipped, failed = execute(runs, args, FLAGS.jobs)
  except processes.Stopped as stop:
    print(f"Sweep stopped by {signal.Signals(stop.signum).name}; its runs were ended and "
          "resume from their checkpoints when the sweep runs again.")
    sys.exit(128 + stop.signum)
  print(f"Sweep finished: {done} ran, {skipped} skipped (valid results exist), {failed} failed.")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
