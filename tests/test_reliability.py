"""Issue 28: no hangs and no tracebacks for a user's mistake.

- A checkpoint or run folder that cannot be written fails at once, naming the folder,
  and keeps the checkpoints already there (the process does not hang at exit).
- Every validation error of every binary is one line in absl's convention (exit status
  1, no traceback) naming the flag as written; a bug keeps its traceback.
- init_curves and plot check their flags before any work; plot lists only files it wrote.
- Inputs rejected before any data is read: non-finite rates, seeds out of range, batch
  sizes larger than the dataset, a missing dense run, IMP's rewind step.
- compaction_latency names a torn result.json; SIGINT ends prune_train in one line.

Binaries run on synthetic data with tiny settings. A folder that the process cannot
write is made by chmod when the tests do not run as root (root writes anyway), else by
a read-only bind mount in a private mount namespace (``unshare -m``) where that is
allowed; a test needing one is skipped elsewhere, and the ones with a file where a
folder is expected, or a dangling link where Orbax makes a step's folder, run anywhere.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from experiments import (
  checks,
  compaction_latency,
  configs,
  datasource,
  prune_train,
  results,
  run_config,
)
from sparsejax import data, models, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["train_steps=4", "eval_every=2", "checkpoint_every=2", "log_every=2"]
SYNTHETIC = datasource.DataSource(synthetic=True, num_examples=512)


def binary(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", f"experiments.{name}", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def assert_usage_error(r: subprocess.CompletedProcess, text: str) -> str:
  """``r`` ended with one usage-error line holding ``text``, exit status 1 or 2, no
  traceback; returns the line."""
  assert r.returncode in (1, 2), (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [x for x in r.stderr.splitlines() if x.startswith("FATAL Flags parsing error")]
  assert len(lines) == 1, r.stderr[-3000:]
  assert text in lines[0], lines[0]
  return lines[0]


# ------------------------------------------------ folders that cannot be written


@functools.cache
def read_only_mechanism() -> str | None:
  """How these tests make a folder the process cannot write: 'chmod' (not root),
  'mount' (root, read-only bind mounts in a private mount namespace allowed), or None."""
  if os.geteuid() != 0:
    return "chmod"
  if not (shutil.which("unshare") and shutil.which("mount")):
    return None
  probe = subprocess.run(
    [
      "unshare",
      "-m",
      "sh",
      "-c",
      'd=$(mktemp -d) && mount --bind "$d" "$d" && mount -o remount,bind,ro "$d" '
      '&& ! touch "$d/x" 2>/dev/null; s=$?; umount "$d" 2>/dev/null; rmdir "$d"; exit $s',
    ],
    capture_output=True,
  )
  return "mount" if probe.returncode == 0 else None


def needs_read_only_folders():
  if read_only_mechanism() is None:
    pytest.skip("running as root without the right to mount: no folder root cannot write")


def command_with_read_only(folder: str, cmd: list[str]) -> list[str]:
  """``cmd`` run with ``folder`` read-only (its bind mount lives in the command's own
  mount namespace and ends with it); under chmod the caller changes the mode."""
  if read_only_mechanism() == "mount":
    return [
      "unshare",
      "-m",
      "sh",
      "-c",
      'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
      folder,
      *cmd,
    ]
  os.chmod(folder, 0o555)
  return cmd


CHILD = textwrap.dedent(
  """
  import os, subprocess, sys, time
  import jax.numpy as jnp
  from sparsejax import data, models, training
  from sparsejax.training import checkpoints

  workdir, second, mode = sys.argv[1:4]

  def read_only(folder, on):
    if mode == "mount":
      if on:
        subprocess.run(["mount", "--bind", folder, folder], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
      else:
        subprocess.run(["umount", folder], check=True)
    else:
      os.chmod(folder, 0o555 if on else 0o755)

  config = training.TrainConfig(
    dataset="mnist", batch_size=8, train_steps=4, learning_rate=0.05, momentum=0.9,
    weight_decay=0.0, decay_boundaries=(0.5,),
  )
  model = models.create("lenet300100")
  train = data.synthetic_split("mnist", "train", num_examples=64)
  test = data.synthetic_split("mnist", "test", num_examples=16)
  kw = dict(workdir=workdir, checkpoint_every=2, eval_every=2, eval_batch_size=16)
  training.train(model, "mnist", config, train, test, num_steps=2, **kw)  # saves step 2

  # 1. Resumed in a folder that has become read-only: refused when it opens.
  read_only(workdir, True)
  start = time.monotonic()
  try:
    training.train(model, "mnist", config, train, test, **kw)
    sys.exit("no error for a read-only checkpoint folder")
  except training.CheckpointWriteError as err:
    assert workdir in str(err), err
    print("OPEN_ERROR", round(time.monotonic() - start, 2), err, flush=True)

  # 2. Nothing lost: writable again, the run resumes from step 2.
  read_only(workdir, False)
  result = training.train(model, "mnist", config, train, test, **kw)
  print("RESUMED_FROM", result.start_step, flush=True)

  # 3. A folder that turns read-only after it was opened: the save that fails raises.
  start = time.monotonic()
  try:
    with checkpoints.Checkpoints(second, {"run": 1}) as c:
      read_only(second, True)
      c.save(2, {"w": jnp.ones(3)}, [])
    sys.exit("no error for a save into a read-only folder")
  except training.CheckpointWriteError as err:
    assert second in str(err) and err.step == 2, err
    print("SAVE_ERROR", round(time.monotonic() - start, 2), err, flush=True)
  """
)


def test_a_read_only_checkpoint_folder_fails_at_once_naming_it_and_keeps_its_checkpoints(
  tmp_path,
):
  needs_read_only_folders()
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  workdir, second = str(tmp_path / "run" / "checkpoints"), str(tmp_path / "second")
  cmd = [sys.executable, str(script), workdir, second, read_only_mechanism()]
  if read_only_mechanism() == "mount":
    cmd = ["unshare", "-m", *cmd]  # the child's mounts end with it
  start = time.monotonic()
  # Before the fix the child hung for 300 s at exit (Orbax threads waiting for a folder).
  r = subprocess.run(
    cmd,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=150,
    env={**os.environ, "PYTHONPATH": REPO},
  )
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  lines = {x.split()[0]: x.split() for x in r.stdout.splitlines() if x.strip()}
  assert float(lines["OPEN_ERROR"][1]) < 20 and float(lines["SAVE_ERROR"][1]) < 20, r.stdout
  assert lines["RESUMED_FROM"][1] == "2", r.stdout
  assert "TimeoutError" not in r.stderr, r.stderr[-3000:]
  assert time.monotonic() - start < 150


DANGLING = textwrap.dedent(
  """
  import os, sys, time
  import jax.numpy as jnp
  from orbax.checkpoint._src.path import atomicity
  from sparsejax import training
  from sparsejax.training import checkpoints

  workdir = sys.argv[1]
  start = time.monotonic()
  try:
    with checkpoints.Checkpoints(workdir, {"run": 1}) as c:
      # Where Orbax makes step 2's folder, a link to nowhere: the folder cannot be made.
      step_folder = os.path.join(workdir, "2" + atomicity.TMP_DIR_SUFFIX)
      os.symlink(os.path.join(workdir, "no", "such"), step_folder)
      c.save(2, {"w": jnp.ones(3)}, [])
    sys.exit("no error for a step folder that cannot be made")
  except training.CheckpointWriteError as err:
    assert workdir in str(err) and err.step == 2, err
    print("SAVE_ERROR", round(time.monotonic() - start, 2), flush=True)
  """
)


def test_a_step_folder_that_cannot_be_made_fails_in_save_and_the_process_exits(tmp_path):
  """Runs anywhere (root too): before the fix Orbax made the folder in a background
  thread, save() returned, and the process hung at exit waiting for its threads."""
  script = tmp_path / "child.py"
  script.write_text(DANGLING)
  r = subprocess.run(
    [sys.executable, str(script), str(tmp_path / "checkpoints")],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": REPO},
  )
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "SAVE_ERROR" in r.stdout


def test_a_file_where_the_checkpoint_folder_should_be_is_named_when_training_starts(tmp_path):
  blocker = tmp_path / "checkpoints"
  blocker.write_text("not a folder")
  config = configs.train_config(configs.load("lenet300100", ["train_steps=2", "batch_size=8"]))
  train = data.synthetic_split("mnist", "train", num_examples=16)
  with pytest.raises(training.CheckpointWriteError, match=str(blocker)):
    training.train(
      models.create("lenet300100"), "mnist", config, train, train, workdir=str(blocker)
    )
  assert blocker.read_text() == "not a folder"


def run_folder(out_dir, *fields) -> str:
  return os.path.join(out_dir, run_config.run_name(configs.load("lenet300100", list(fields))))


def test_prune_train_names_a_run_folder_it_cannot_write_before_any_work(tmp_path):
  fields = [*TINY, "pruner=random/igq", "compression=10"]
  out = tmp_path / "out"
  checkpoints_dir = os.path.join(run_folder(out, *fields), "checkpoints")
  os.makedirs(os.path.dirname(checkpoints_dir))
  with open(checkpoints_dir, "w") as f:  # a file where the folder should be: root too
    f.write("x")
  args = [*configs.override_args(fields), "--synthetic_data", f"--out_dir={out}"]
  r = binary("prune_train", *args)
  assert_usage_error(r, f"the run folder {checkpoints_dir} cannot be written")
  assert os.listdir(os.path.dirname(checkpoints_dir)) == ["checkpoints"]  # no masks, no lock
  if read_only_mechanism() is None:
    return
  os.remove(checkpoints_dir)
  os.makedirs(checkpoints_dir)
  cmd = [sys.executable, "-m", "experiments.prune_train", *args]
  try:
    r = subprocess.run(
      command_with_read_only(checkpoints_dir, cmd),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=150,
    )
  finally:
    os.chmod(checkpoints_dir, 0o755)
  assert_usage_error(r, f"the run folder {checkpoints_dir} cannot be written")
  assert sorted(os.listdir(os.path.dirname(checkpoints_dir))) == ["checkpoints"]


# ------------------------------------------------------------ one-line usage errors


@pytest.mark.parametrize(
  "name,args,text",
  [
    ("prune_train", ["--config.learning_rate=nan"], "--config.learning_rate=nan must be"),
    ("prune_train", ["--config.decay_factor=inf"], "--config.decay_factor=inf must be"),
    ("prune_train", ["--config.seed=1180591620717411303424"], "--config.seed=11805916"),
    ("sweep", ["--seeds=-1", "--dry_run"], "--seeds=-1 must be"),
    ("sweep", ["--archs=lenet", "--dry_run"], "--archs='lenet' is not a known network"),
    ("compression", ["--arch=lenet"], "--arch='lenet' is not a known network"),
    ("compression", ["--pruning_types=both"], "--pruning_types='both' is not allowed"),
    ("init_curves", ["--seed=-1"], "--seed=-1 must be"),
    ("plot", ["--results_dir=/nonexistent/results"], "--results_dir='/nonexistent/results'"),
    ("compaction_latency", ["--pruners=rigl"], "--pruners: 'rigl' is not a one-shot pruner"),
  ],
)
def test_every_binary_reports_a_bad_value_as_one_usage_line_naming_the_flag(
  name, args, text, tmp_path
):
  out = tmp_path / "out"
  outs = {
    "plot": [f"--figures_dir={out}", "--doc="],
    "compaction_latency": [f"--out={out}/l.csv", f"--results_dir={tmp_path}"],
    "sweep": [f"--out_dir={out}"],
  }.get(name, [f"--out_dir={out}", "--synthetic_data"])
  r = binary(name, *args, *outs)
  assert_usage_error(r, text)
  assert not out.exists() or os.listdir(out) == []


def test_a_bug_keeps_its_traceback(tmp_path):
  code = (
    "from experiments import cli\n"
    "def main(argv):\n"
    "  raise ValueError('a bug, not a flag')\n"
    "cli.run(main, lambda: None)\n"
  )
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 1 and "Traceback" in r.stderr and "a bug, not a flag" in r.stderr
  assert "FATAL Flags parsing error" not in r.stderr
  with pytest.raises(checks.FlagError, match="--x='v': boom"):
    with checks.flag_errors("--x='v'"):
      raise ValueError("boom")
  with pytest.raises(KeyError):  # only ValueErrors of a check become flag errors
    with checks.flag_errors("--x='v'"):
      raise KeyError("bug")


# ------------------------------------------------------------------- init_curves


@pytest.mark.parametrize(
  "flag,text",
  [
    ("--seed=-1", "--seed=-1 must be an integer in [0, 4294967295]"),
    ("--max_exponent=-3", "--max_exponent=-3 must be an integer in [1, 50]"),
    ("--max_exponent=0", "--max_exponent=0 must be an integer in [1, 50]"),
    ("--max_exponent=1000000", "--max_exponent=1000000 must be an integer in [1, 50]"),
    ("--out_dir=FILE/curves", "is not a writable folder"),
  ],
)
def test_init_curves_checks_every_flag_before_any_work(flag, text, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  out = tmp_path / "curves"
  flag = flag.replace("FILE", str(blocker))
  args = ["--archs=lenet300100", "--pruners=random/uniform", "--synthetic_data"]
  r = binary("init_curves", *args, f"--out_dir={out}", flag, timeout=600)
  assert_usage_error(r, text.replace("FILE", str(blocker)))
  assert not out.exists() or os.listdir(out) == []


# -------------------------------------------------------------------------- plot


def test_plot_lists_only_files_it_wrote_and_refuses_what_it_cannot_write(tmp_path):
  results_dir = tmp_path / "results"
  results_dir.mkdir()
  figures = [f"--figures_dir={tmp_path / 'figures'}"]
  doc = tmp_path / "docs" / "results.md"
  r = binary("plot", f"--results_dir={results_dir}", *figures, f"--doc={doc}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert not doc.exists() and str(doc) not in r.stdout  # nothing to tabulate: not written
  assert "Wrote 0 files" in r.stdout
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  unwritable = [str(blocker / "x.md")] + (["/proc/x.md"] if os.path.isdir("/proc") else [])
  for path in unwritable:
    r = binary("plot", f"--results_dir={results_dir}", *figures, f"--doc={path}")
    assert_usage_error(r, f"--doc={path!r} cannot be written")
    assert "Wrote" not in r.stdout
  missing = tmp_path / "no_results"
  r = binary("plot", f"--results_dir={missing}", *figures, f"--doc={doc}")
  assert_usage_error(r, f"--results_dir={str(missing)!r} does not exist")
  assert "Wrote" not in r.stdout


# -------------------------------------------- inputs rejected before any data is read


class NoData(datasource.DataSource):
  """Synthetic sizes, but reading data fails the test: checks must come first."""

  def split(self, *args, **kwargs):
    raise AssertionError("data was read before the inputs were checked")

  def score_batches(self, *args, **kwargs):
    raise AssertionError("data was read before the inputs were checked")


NO_DATA = NoData(synthetic=True, num_examples=512)


@pytest.mark.parametrize(
  "fields,text",
  [
    (["learning_rate=inf"], "--config.learning_rate=inf must be a finite number > 0."),
    (["decay_factor=inf"], "--config.decay_factor=inf must be a finite number > 0."),
    (["weight_decay=inf"], "--config.weight_decay=inf must be a finite number >= 0."),
    ([f"seed={2**70}"], f"--config.seed={2**70} must be an integer in [0, 4294967295]."),
    (["batch_size=513"], "--config.batch_size=513 exceeds the 512 training examples"),
    (["pruner=imp", "rewind_step=4"], "--config.rewind_step=4 must be in [0, "),
    (["pruner=magnitude/global", "compression=10"], "scores the trained weights of a dense"),
    (
      ["pruner=lamp", "compression=10", "dense_dir=/nonexistent/dense"],
      "--config.dense_dir='/nonexistent/dense' holds no dense weights",
    ),
  ],
)
def test_bad_inputs_are_rejected_before_data_loading_or_pruning(fields, text, tmp_path):
  config = configs.load("lenet300100", TINY + fields)
  with pytest.raises(checks.FlagError) as err:
    prune_train.run(config, out_dir=str(tmp_path), source=NO_DATA)
  assert text in str(err.value)
  assert os.listdir(tmp_path) == []  # no run folder


def test_real_dataset_sizes_are_known_before_reading_them(tmp_path):
  real = NoData(synthetic=False)
  config = configs.load("lenet300100", TINY + ["batch_size=60001"])
  with pytest.raises(checks.FlagError, match="--config.batch_size=60001 exceeds the 60000"):
    prune_train.check_config(config, str(tmp_path), real)
  config = configs.load("lenet300100", TINY + ["pruner=snip", "snip_batch_size=70000"])
  with pytest.raises(checks.FlagError, match="--config.snip_batch_size=70000 .* the 60000"):
    prune_train.check_config(config, str(tmp_path), real)


def test_a_resumed_after_training_run_does_not_need_the_dense_run_again(tmp_path):
  config = configs.load("lenet300100", TINY + ["pruner=magnitude/global", "compression=10"])
  folder = tmp_path / run_config.run_name(config)
  folder.mkdir()
  (folder / "masks.npz").write_bytes(b"")  # its masks exist: no re-scoring
  prune_train.check_dense_run(config, str(tmp_path))


# ------------------------------------------------------------- compaction_latency


def test_compaction_latency_names_a_torn_result(tmp_path):
  good = {
    "config": {
      "arch": "lenet300100",
      "dataset": "mnist",
      "pruner": "random/igq",
      "pruning_type": "direct",
      "seed": 0,
      "target_compression": 10.0,
      "train": {"train_steps": 4},
    },
    "status": "ok",
    "test_accuracy": 0.5,
    "test_loss": 1.0,
    "direct_compression": 10.0,
    "effective_compression": 10.0,
    "history": [],
  }
  results.atomic_write_json(str(tmp_path / "runs" / "a-run" / "result.json"), good)
  torn = tmp_path / "runs" / "torn-run" / "result.json"
  torn.parent.mkdir()
  torn.write_text(json.dumps(good)[:200])
  with pytest.raises(results.InvalidResultError, match=str(torn)):
    compaction_latency.find_runs(str(tmp_path / "runs"), ["random/igq"], "direct", "lenet300100", 4)
  r = binary(
    "compaction_latency",
    f"--results_dir={tmp_path / 'runs'}",
    f"--out={tmp_path / 'latency.csv'}",
    "--pruning_type=direct",
    "--train_steps=4",
    "--synthetic_data",
  )
  assert r.returncode != 0 and f"{torn}: invalid result (not strict JSON" in r.stderr


# ------------------------------------------------------------------------ SIGINT


def _wait_for(path, text: str, proc: subprocess.Popen, timeout: float = 240) -> str:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    log = open(path).read()
    if text in log:
      return log
    assert proc.poll() is None, log[-3000:]
    time.sleep(0.2)
  raise AssertionError(f"{text!r} not seen in {timeout} s: {open(path).read()[-3000:]}")


def test_sigint_ends_prune_train_in_one_line_and_the_same_command_resumes(tmp_path):
  fields = ["train_steps=100000", "checkpoint_every=20", "eval_every=100000", "log_every=20"]
  args = [*configs.override_args(fields + ["pruner=random/igq", "compression=10"])]
  cmd = [sys.executable, "-m", "experiments.prune_train", *args, "--synthetic_data"]
  cmd.append(f"--out_dir={tmp_path}")
  checkpoint = os.path.join(
    run_folder(tmp_path, *fields, "pruner=random/igq", "compression=10"), "checkpoints", "20"
  )
  for attempt, wait_for in ((1, None), (2, "Resumed from")):
    log_path = tmp_path / f"log{attempt}.txt"
    with open(log_path, "w") as log:
      proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
      if wait_for is None:
        deadline = time.monotonic() + 240
        while not os.path.isdir(checkpoint) and time.monotonic() < deadline:
          assert proc.poll() is None, open(log_path).read()[-3000:]
          time.sleep(0.2)
      else:
        _wait_for(log_path, wait_for, proc)
      _wait_for(log_path, "steps/s", proc)  # training, past the first progress line
      proc.send_signal(signal.SIGINT)
      proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
    text = open(log_path).read()
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "interrupted at step " in text and "of 100000; run the same command to resume" in text
    saved = sorted(int(d) for d in os.listdir(os.path.dirname(checkpoint)) if d.isdigit())
    if attempt == 1:
      assert os.path.isdir(checkpoint), saved
      first = saved
    else:  # resumed from the first attempt's newest checkpoint, and saved beyond it (only
      # the newest 3 are kept: step 20 may be gone by now on a fast machine)
      resumed = re.search(r"Resumed from \S+ at step (\d+)\.", text)
      assert resumed and int(resumed.group(1)) == first[-1], (first, text[-3000:])
      assert saved and saved[-1] > first[-1], (first, saved)


def test_a_sigint_during_a_checkpoint_save_is_raised_after_it():
  """Row 9: a SIGINT that lands in Orbax's save (log_every == checkpoint_every makes it
  likely) must not cut the save midway: it is held back and raised at its end."""
  from sparsejax.training import checkpoints

  finished = []
  with pytest.raises(KeyboardInterrupt):
    with checkpoints._sigint_held():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)  # the handler runs between bytecodes of the main thread
      finished.append(True)
  assert finished == [True]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
