"""prune_train and sweep end to end on synthetic data (tiny runs)."""

import json
import os

import numpy as np
import pytest

from experiments import configs, datasource, grid, prune_train, run_config, sweep

TINY = ["train_steps=20", "eval_every=10", "checkpoint_every=10", "log_every=10"]
SOURCE = datasource.DataSource(synthetic=True, num_examples=512)


def config(**fields):
  """LeNet-300-100's config for a tiny synthetic run, with ``fields`` overridden."""
  return configs.load("lenet300100", TINY + [f"{k}={v}" for k, v in fields.items()])


def run(out_dir, **fields):
  return prune_train.run(config(**fields), out_dir=str(out_dir), source=SOURCE)


def test_result_json_has_what_a_researcher_needs(tmp_path):
  r = run(tmp_path, pruner="random/igq", compression=100, pruning_type="effective")
  name = run_config.run_name(config(pruner="random/igq", compression=100, pruning_type="effective"))
  assert name == "lenet300100-mnist_random-igq_effective_c100_s0_t20"
  on_disk = json.load(open(tmp_path / name / "result.json"))
  assert on_disk["config"]["pruner"] == "random/igq"
  for key in (
    "direct_compression",
    "effective_compression",
    "layers",
    "active_units",
    "history",
    "test_accuracy",
    "test_loss",
    "steps_per_second",
    "wall_time",
  ):
    assert key in on_disk, key
  assert r["effective_compression"] == pytest.approx(100, rel=0.01)
  assert r["direct_compression"] < r["effective_compression"]
  assert [h["step"] for h in r["history"]] == [10, 20]
  assert len(r["layers"]) == 3 and set(r["layers"][0]) == {
    "layer",
    "direct_sparsity",
    "effective_sparsity",
  }
  assert (tmp_path / name / "masks.npz").exists()
  assert not [f for f in os.listdir(tmp_path / name) if f.startswith(".tmp")]


def test_dense_then_magnitude_uses_the_dense_weights(tmp_path):
  run(tmp_path, pruner="dense")
  dense = run_config.run_name(config(pruner="dense"))
  assert (tmp_path / dense / "weights" / "initial").exists()
  assert (tmp_path / dense / "weights" / "final").exists()
  r = run(tmp_path, pruner="magnitude/global", compression=10)
  assert r["direct_compression"] == pytest.approx(10, rel=1e-3)
  with pytest.raises(FileNotFoundError, match="run --config.pruner=dense"):
    run(tmp_path / "elsewhere", pruner="lamp", compression=10)


def test_imp_rounds_reach_the_target(tmp_path):
  r = run(tmp_path, pruner="imp", compression=10, imp_rounds=2, rewind_step=5)
  assert [x["round"] for x in r["imp_rounds"]] == [1, 2]
  assert r["imp_rounds"][0]["direct_compression"] == pytest.approx(10**0.5, rel=1e-3)
  assert r["direct_compression"] == pytest.approx(10, rel=1e-3)


def test_target_arguments():
  assert run_config.target_sparsity(config(compression=100.0)) == pytest.approx(0.99)
  assert run_config.target_sparsity(config(target_sparsity=0.9)) == 0.9
  assert run_config.target_sparsity(config()) == 0.0
  with pytest.raises(ValueError, match="not both"):
    run_config.target_sparsity(config(compression=10.0, target_sparsity=0.9))
  with pytest.raises(ValueError, match="--config.target_sparsity=1.5"):
    run_config.target_sparsity(config(target_sparsity=1.5))
  with pytest.raises(ValueError, match="--config.compression=0.5"):
    run_config.target_sparsity(config(compression=0.5))


def test_sweep_grid_orders_dense_first_and_skips_done(tmp_path):
  runs = grid.grid(
    ["lenet300100"],
    ["random/igq", "magnitude/global"],
    [10.0, 100.0],
    ["direct", "effective"],
    [0, 1],
  )
  assert [r["pruner"] for r in runs[:2]] == ["dense", "dense"]
  assert len(runs) == 2 + 2 * 2 * 2 * 2
  with pytest.raises(ValueError, match="pruner='nope'"):
    grid.grid(["lenet300100"], ["nope"], [10.0], ["direct"], [0])
  shared = grid.shared_overrides(20, 10, "--config.checkpoint_every=10 --config.log_every=10")
  source = datasource.DataSource(synthetic=True)
  small = grid.grid(["lenet300100"], ["random/uniform"], [10.0], ["direct", "effective"], [0])
  done, skipped, failed = sweep.execute(small, shared, str(tmp_path), source, jobs=2)
  assert (done, skipped, failed) == (2, 0, 0)
  for r in small:
    assert os.path.exists(grid.result_path(grid.config_for(r, shared), str(tmp_path)))
  # resumable: nothing re-runs
  assert sweep.execute(small, shared, str(tmp_path), source, jobs=2) == (0, 2, 0)


def test_sweep_in_process_runs_records_unreachable_and_resumes(tmp_path):
  shared = grid.shared_overrides(
    20, 10, "--config.checkpoint_every=10 --config.log_every=10 --config.rounds=3"
  )
  source = datasource.DataSource(synthetic=True)
  small = grid.grid(["lenet300100"], ["random/uniform"], [10.0, 1e6], ["effective"], [0])
  assert sweep.execute(small, shared, str(tmp_path), source, jobs=1) == (2, 0, 0)
  path = lambda point: grid.result_path(grid.config_for(point, shared), str(tmp_path))
  ok = json.load(open(path(small[0])))
  assert ok["status"] == "ok" and ok["effective_compression"] >= 10
  # 10^6x effective is beyond any connected uniform mask of LeNet-300-100: recorded as
  # a result (so the grid is complete), not retried, not a failure.
  far = json.load(open(path(small[1])))
  assert far["status"] == "unreachable" and far["test_accuracy"] is None
  assert "cannot be reached" in far["error"] and 0 < far["max_sparsity"] < 1 - 1e-6
  assert sweep.execute(small, shared, str(tmp_path), source, jobs=1) == (0, 2, 0)
  # An override that is not a config field fails before anything runs, naming it.
  with pytest.raises(ValueError, match="there is no field 'nope'"):
    sweep.execute(small, shared + ["nope=1"], str(tmp_path), source, jobs=1)


def test_direct_pruning_to_disconnection_is_marked(tmp_path):
  r = run(tmp_path, pruner="random/uniform", compression=1e4)
  assert r["status"] == "disconnected" and r["effective_compression"] == float("inf")


# ------------------------------------- nothing lost, nothing silently wrong (issue 12)


def _reject(name):
  raise ValueError(f"{name} is not JSON")


def _strict(path):
  with open(path) as f:
    return json.loads(f.read(), parse_constant=_reject)


def test_sweep_redoes_a_torn_result_and_keeps_it_aside(tmp_path):
  shared = grid.shared_overrides(20, 10, "--config.checkpoint_every=10 --config.log_every=10")
  source = datasource.DataSource(synthetic=True)
  small = grid.grid(["lenet300100"], ["random/uniform"], [10.0], ["direct"], [0])
  assert sweep.execute(small, shared, str(tmp_path), source, jobs=1) == (1, 0, 0)
  path = grid.result_path(grid.config_for(small[0], shared), str(tmp_path))
  whole = open(path).read()
  with open(path, "w") as f:
    f.write(whole[: len(whole) // 2])
  from experiments import plot, results

  with pytest.raises(results.InvalidResultError, match="result.json: invalid result") as err:
    plot.load_runs(str(tmp_path))
  assert err.value.path == path
  # redone, not skipped
  assert sweep.execute(small, shared, str(tmp_path), source, jobs=1) == (1, 0, 0)
  assert _strict(path)["status"] == "ok"
  aside = [f for f in os.listdir(os.path.dirname(path)) if ".invalid-" in f]
  assert len(aside) == 1 and aside[0].startswith("result.json.invalid-")
  assert sweep.execute(small, shared, str(tmp_path), source, jobs=1) == (0, 1, 0)


def test_zero_steps_negative_seeds_and_infinite_targets_are_rejected_before_work(tmp_path):
  for field, value in (("train_steps", 0), ("seed", -1), ("eval_every", 0), ("update_every", 0)):
    with pytest.raises(ValueError, match=f"--config.{field}={value}"):
      run(tmp_path, pruner="random/igq", compression=10, **{field: value})
  with pytest.raises(ValueError, match="--num_examples=0"):
    prune_train.run(
      config(pruner="random/igq", compression=10),
      out_dir=str(tmp_path),
      source=datasource.DataSource(synthetic=True, num_examples=0),
    )
  assert os.listdir(tmp_path) == []  # no run folder, no masks.npz
  for bad in ("inf", "nan"):
    with pytest.raises(ValueError, match=f"--config.compression={bad}"):
      run(tmp_path, pruner="random/igq", compression=bad)
  with pytest.raises(ValueError, match="--compressions=inf"):
    grid.grid(["lenet300100"], ["random/igq"], [float("inf")], ["direct"], [0])
  with pytest.raises(ValueError, match="--seeds=-1"):
    grid.grid(["lenet300100"], ["random/igq"], [10.0], ["direct"], [-1])
  with pytest.raises(ValueError, match="--config.train_steps=0"):
    sweep.execute(
      grid.grid(["lenet300100"], ["random/igq"], [10.0], ["direct"], [0]),
      grid.shared_overrides(0, None, ""),
      str(tmp_path),
      datasource.DataSource(synthetic=True),
      jobs=1,
    )
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ValueError, match="--out_dir=.*a_file/runs.* is not a writable folder"):
    run(blocker / "runs", pruner="random/igq", compression=10)
  # 0 is a value, not "not given": the sweep passes it on.
  point = dict(
    arch="lenet300100", pruner="random/igq", compression=10.0, pruning_type="direct", seed=0
  )
  cmd = grid.command(
    point, grid.shared_overrides(0, None, ""), "o", datasource.DataSource(synthetic=True)
  )
  assert "--config.train_steps=0" in cmd
  assert not any(a.startswith("--compilation_cache_dir") for a in cmd)  # child's default
  cmd = grid.command(point, [], "o", datasource.DataSource(synthetic=True), "")
  assert "--compilation_cache_dir=" in cmd  # the sweep's --nocompilation_cache


def test_diverging_run_is_recorded_and_not_retried(tmp_path):
  shared = grid.shared_overrides(
    20, 10, "--config.checkpoint_every=1 --config.log_every=10 --config.learning_rate=1e30"
  )
  source = datasource.DataSource(synthetic=True)
  small = grid.grid(["lenet300100"], ["random/uniform"], [10.0], ["direct"], [0])
  # finished, not failed: exit 0
  assert sweep.execute(small, shared, str(tmp_path), source, jobs=1) == (1, 0, 0)
  path = grid.result_path(grid.config_for(small[0], shared), str(tmp_path))
  r = _strict(path)
  assert r["status"] == "diverged" and 1 <= r["diverged_step"] <= 20
  assert f"step {r['diverged_step']}" in r["error"]
  assert sweep.execute(small, shared, str(tmp_path), source, jobs=1) == (0, 1, 0)
  import jax
  import orbax.checkpoint as ocp

  ckpts = os.path.join(os.path.dirname(path), "checkpoints")
  for step in [s for s in os.listdir(ckpts) if s.isdigit()]:
    assert int(step) < r["diverged_step"]
    state = ocp.StandardCheckpointer().restore(os.path.join(ckpts, step, "state"))
    assert all(
      np.all(np.isfinite(x))
      for x in jax.tree.leaves(state)
      if np.issubdtype(np.asarray(x).dtype, np.floating)
    ), step


def test_wall_time_sums_processes_and_results_are_strict_and_group_readable(tmp_path):
  import stat

  old = os.umask(0o022)
  try:
    first = run(tmp_path, pruner="random/igq", compression=10)
    again = run(tmp_path, pruner="random/igq", compression=10)  # resumed, no steps left
  finally:
    os.umask(old)
  name = run_config.run_name(config(pruner="random/igq", compression=10))
  on_disk = _strict(tmp_path / name / "result.json")
  assert first["processes"] == 1 and on_disk["processes"] == 2
  assert on_disk["steps_per_second"] is None and again["steps_per_second"] is None
  assert on_disk["wall_time"] >= first["wall_time"] + on_disk["wall_time_last_process"] - 1e-6
  for f in ("result.json", "masks.npz"):
    assert stat.S_IMODE(os.stat(tmp_path / name / f).st_mode) == 0o644, f


def test_a_second_run_on_a_locked_folder_refuses(tmp_path):
  from experiments import rundir

  name = run_config.run_name(config(pruner="random/igq", compression=10))
  with rundir.locked(str(tmp_path / name)):
    with pytest.raises(rundir.RunLockedError, match=f"pid {os.getpid()}"):
      run(tmp_path, pruner="random/igq", compression=10)
  assert not (tmp_path / name / "masks.npz").exists()


def test_the_next_holder_of_a_run_folder_removes_a_killed_writers_temp_files(tmp_path):
  from experiments import rundir
  from sparsejax import files

  stale = tmp_path / (files.TMP_PREFIX + "x1y2wall_time.json")  # as atomic_write names it
  stale.write_text('{"processes": [')
  (tmp_path / "result.json").write_text("{}")
  (tmp_path / "checkpoints").mkdir()
  with rundir.locked(str(tmp_path)):
    assert not stale.exists()
  assert sorted(os.listdir(tmp_path)) == [".lock", "checkpoints", "result.json"]


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/status") as f:
      return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
  except FileNotFoundError:
    return False


def _child_pids(parent: int, count: int, timeout=120.0) -> list[int]:
  """Pids of ``parent``'s prune_train children (from /proc), once ``count`` run."""
  import time

  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    pids = []
    for entry in os.listdir("/proc"):
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          cmdline = f.read()
      except (OSError, ValueError, IndexError):
        continue
      if ppid == parent and b"experiments.prune_train" in cmdline:
        pids.append(int(entry))
    if len(pids) == count:
      return pids
    time.sleep(0.5)
  raise AssertionError(f"the sweep's {count} children did not start in {timeout}s")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_stopping_the_sweep_leaves_no_child_running(tmp_path, sig):
  import signal
  import subprocess
  import sys
  import time

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [
    sys.executable,
    "-m",
    "experiments.sweep",
    "--archs=lenet300100",
    "--pruners=random/uniform",
    "--compressions=10",
    "--pruning_types=direct,effective",
    "--train_steps=100000",
    "--jobs=2",
    "--synthetic_data",
    f"--out_dir={tmp_path}",
  ]
  parent = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    pids = _child_pids(parent.pid, 2)
    time.sleep(3)  # into their imports and training
    assert all(_alive(p) for p in pids)
    parent.send_signal(getattr(signal, sig))
    parent.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not [p for p in pids if _alive(p)]
  finally:
    if parent.poll() is None:
      parent.kill()
  if sig != "SIGKILL":
    assert parent.returncode == 128 + getattr(signal, sig)


def test_binary_rejects_bad_flags_by_name_before_any_work(tmp_path):
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for flag in ("--config.compression=inf", "--config.seed=-1", "--config.train_steps=0"):
    result = subprocess.run(
      [
        sys.executable,
        "-m",
        "experiments.prune_train",
        flag,
        "--synthetic_data",
        f"--out_dir={tmp_path}",
      ],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode != 0 and flag in result.stderr, result.stderr[-2000:]
  assert os.listdir(tmp_path) == []


def test_compact_run_trains_the_compacted_network_and_follows_the_masked_run(tmp_path):
  # neuron/random at 10x removes whole neurons: the compacted LeNet is narrower.
  fields = dict(pruner="neuron/random", compression=10, pruning_type="effective", timing_repeats=2)
  masked = run(tmp_path, **fields)
  r = run(tmp_path, compact=True, **fields)
  name = run_config.run_name(config(compact=True, **fields))
  assert name == "lenet300100-mnist_neuron-random_effective_c10_s0_t20_compact"
  assert name != run_config.run_name(config(**fields))
  on_disk = json.load(open(tmp_path / name / "result.json"))
  c = on_disk["compact"]
  assert c["widths_before"] == [300, 100]
  assert all(a < b for a, b in zip(c["widths"], c["widths_before"]))
  assert c["logits_relative_difference"] <= 1e-5
  assert c["cost_after"]["flops_dense"] < c["cost_before"]["flops_dense"]
  # Dead units carry no live path: the effective cost is unchanged by compaction.
  assert c["cost_after"]["flops_effective"] == c["cost_before"]["flops_effective"]
  assert c["cost_after"]["params_effective"] == c["cost_before"]["params_effective"]
  assert c["network_bytes_after"] < c["network_bytes_before"]
  for net in ("masked", "compact"):
    assert c["timing"][net]["latency_ms"] > 0 and c["timing"][net]["throughput"] > 0
  assert c["timing"]["batch"] == 256 and c["timing"]["repeats"] == 2
  # The pruned network's compression, units and cost are recorded as for any run.
  assert r["effective_compression"] == pytest.approx(masked["effective_compression"])
  assert r["cost"] == masked["cost"]
  # Same seed, same data: the compacted network trains as the masked one does.
  assert [h["step"] for h in r["history"]] == [h["step"] for h in masked["history"]]
  for a, b in zip(r["history"], masked["history"]):
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4, abs=1e-5)
    assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=2e-3)


def test_uncompacted_runs_record_flops_and_params(tmp_path):
  r = run(
    tmp_path,
    pruner="random/igq",
    compression=10,
    pruning_type="direct",
    train_steps=10,
    eval_every=10,
    checkpoint_every=10,
  )
  cost = r["cost"]
  assert cost["params_dense"] == 784 * 300 + 300 * 100 + 100 * 10
  assert cost["flops_dense"] == 2 * cost["params_dense"]
  assert cost["params_direct"] == pytest.approx(cost["params_dense"] / 10, rel=1e-3)
  assert cost["flops_effective"] <= cost["flops_direct"] <= cost["flops_dense"]
  assert "compact" not in r


def test_compact_is_refused_for_moving_masks_imp_and_dense_before_any_file(tmp_path):
  for pruner in ("rigl", "gmp", "set", "ste", "imp", "dense"):
    with pytest.raises(ValueError, match=f"--config.compact=True .*'{pruner}'"):
      run(tmp_path, pruner=pruner, compression=10, compact=True)
  with pytest.raises(ValueError, match="--config.timing_repeats=0"):
    run(tmp_path, pruner="random/igq", compression=10, compact=True, timing_repeats=0)
  assert os.listdir(tmp_path) == []


def test_run_name_tells_in_jit_updates_apart_for_moving_masks_only():
  """Two runs differing only in update_in_jit have their own folders (a sweep would
  otherwise skip the second as finished); a pruner that ignores the field keeps its name."""
  between = run_config.run_name(config(pruner="rigl", compression=10, track_effective=False))
  in_jit = run_config.run_name(
    config(pruner="rigl", compression=10, track_effective=False, update_in_jit=True)
  )
  assert between == "lenet300100-mnist_rigl_direct_c10_s0_t20"
  assert in_jit == "lenet300100-mnist_rigl_direct_c10_s0_t20_jit"
  for pruner in ("gmp", "set", "ste", "acdc"):
    assert run_config.run_name(
      config(pruner=pruner, compression=10, update_in_jit=True)
    ) != run_config.run_name(config(pruner=pruner, compression=10))
  one_shot = dict(pruner="magnitude/global", compression=10)
  assert run_config.run_name(config(update_in_jit=True, **one_shot)) == run_config.run_name(
    config(**one_shot)
  )


def test_in_jit_updates_top_k_activations_and_the_data_effective_report(tmp_path):
  """update_in_jit, activation_topk and data_effective in one tiny RigL run: the run name
  says top-k, result.json holds the test split's data-effective report, whose
  compression is at least the structural effective one; bad values are named first."""
  fields = dict(
    pruner="rigl",
    compression=10,
    update_in_jit=True,
    track_effective=False,
    activation_topk=0.5,
    data_effective=True,
    update_every=5,
  )
  r = run(tmp_path, **fields)
  name = run_config.run_name(config(**fields))
  assert name.endswith("_jit_topk0.5")
  on_disk = json.load(open(tmp_path / name / "result.json"))
  de = on_disk["data_effective"]
  assert de["examples"] > 0 and de["compacted_network"] is False
  assert de["data_effective_compression"] >= r["effective_compression"] * (1 - 1e-6)
  assert len(de["layers"]) == 3
  for layer in de["layers"]:
    assert 0.0 <= layer["never_active_fraction"] <= 1.0
  bad = {
    "activation_topk": dict(activation_topk=1.5),
    "not both": dict(pruner="magnitude/global", activation_topk=0.5, compact=True),
    "track_effective=True": dict(update_in_jit=True, track_effective=True),
  }
  (tmp_path / "bad").mkdir()
  for match, extra in bad.items():
    with pytest.raises(ValueError, match=match):
      run(tmp_path / "bad", **{**fields, **extra})
  assert os.listdir(tmp_path / "bad") == []
