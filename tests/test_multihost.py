"""Multi-host data parallelism: experiments.prune_train as two processes on localhost
(CPU, gloo collectives) trains what one process trains."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import configs, datasource, distributed, prune_train, results, run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["pruner=dense", "train_steps=20", "eval_every=10", "checkpoint_every=10", "log_every=10"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _weights(run_dir, which):
  return ocp.StandardCheckpointer().restore(os.path.join(run_dir, "weights", which))


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path):
  config = configs.load("lenet300100", TINY)
  name = run_config.run_name(config)
  one = tmp_path / "one"
  prune_train.run(config, out_dir=str(one), source=datasource.DataSource(synthetic=True))
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # One CPU device per process: a mesh of two.
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "experiments.prune_train",
        "--synthetic_data",
        f"--out_dir={tmp_path / 'two'}",
        *[f"--config.{o}" for o in TINY],
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    logs = [p.communicate(timeout=400)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert "over 2 device(s)" in logs[0] and "over 2 device(s)" in logs[1]
  single = results.load(str(one / name / "result.json"))
  multi = results.load(str(tmp_path / "two" / name / "result.json"))
  assert [h["step"] for h in multi["history"]] == [10, 20]
  for a, b in zip(single["history"], multi["history"]):
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5, abs=1e-6)
    # Summation order may flip an argmax within float tolerance: one example of 256.
    assert abs(b["test_accuracy"] - a["test_accuracy"]) <= 1 / 256 + 1e-9
  for which in ("initial", "final"):
    want, got = _weights(one / name, which), _weights(tmp_path / "two" / name, which)
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
  # One process wrote the run's files: no second lock holder, no torn writes.
  assert multi["processes"] == 1
  assert not [f for f in os.listdir(tmp_path / "two" / name) if f.startswith(".tmp")]


def test_settings_come_from_flags_then_environment_and_are_checked():
  full = {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  assert distributed.settings(environ={}) is None
  assert distributed.settings("h:1", 2, 1, environ={}) == full
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.settings(environ=env) == full
  assert distributed.settings(None, None, 0, environ=env) == {**full, "process_id": 0}
  assert distributed.settings("auto", environ={}) == {}  # JAX detects SLURM, Open MPI
  assert distributed.settings("auto", 4, environ={}) == {"num_processes": 4}
  assert distributed.settings(environ={"SLURM_NTASKS": "4"}) is None  # not assumed
  assert distributed.settings(None, 1, 0, environ={}) is None
  for args, environ, message in (
    (("h:1", 2, None), {}, "--coordinator_address='h:1' needs --num_processes"),
    ((None, 2, 0), {}, "--num_processes=2 --process_id=0 need --coordinator_address"),
    (("h:1", 2, 2), {}, r"--process_id=2 must be in \[0, 2\)"),
    (("h:1", 0, 0), {}, "--num_processes=0 must be an integer >= 1"),
    (("h", 2, 0), {}, "--coordinator_address='h' must be 'host:port'"),
    ((None, None, None), {**env, "JAX_PROCESS_ID": "x"}, r"\$JAX_PROCESS_ID='x'"),
  ):
    with pytest.raises(ValueError, match=message):
      distributed.settings(*args, environ=environ)
