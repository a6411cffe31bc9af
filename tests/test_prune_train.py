"""prune_train and sweep end to end on synthetic data (tiny runs)."""

import json
import os

import numpy as np
import pytest

from experiments import common, configs, prune_train, sweep

TINY = ["train_steps=20", "eval_every=10", "checkpoint_every=10", "log_every=10"]
SOURCE = common.DataSource(synthetic=True, num_examples=512)


def config(**fields):
  """LeNet-300-100's config for a tiny synthetic run, with ``fields`` overridden."""
  return configs.load("lenet300100", TINY + [f"{k}={v}" for k, v in fields.items()])


def run(out_dir, **fields):
  return prune_train.run(config(**fields), out_dir=str(out_dir), source=SOURCE)


def test_result_json_has_what_a_researcher_needs(tmp_path):
  r = run(tmp_path, pruner="random/igq", compression=100, pruning_type="effective")
  name = common.run_name(config(pruner="random/igq", compression=100,
                                pruning_type="effective"))
  assert name == "lenet300100-mnist_random-igq_effective_c100_s0_t20"
  on_disk = json.load(open(tmp_path / name / "result.json"))
  assert on_disk["config"]["pruner"] == "random/igq"
  for key in ("direct_compression", "effective_compression", "layers", "active_units",
              "history", "test_accuracy", "test_loss", "steps_per_second", "wall_time"):
    assert key in on_disk, key
  assert r["effective_compression"] == pytest.approx(100, rel=0.01)
  assert r["direct_compression"] < r["effective_compression"]
  assert [h["step"] for h in r["history"]] == [10, 20]
  assert len(r["layers"]) == 3 and set(r["layers"][0]) == {
      "layer", "direct_sparsity", "effective_sparsity"}
  assert (tmp_path / name / "masks.npz").exists()
  assert not [f for f in os.listdir(tmp_path / name) if f.startswith(".tmp")]


def test_dense_then_magnitude_uses_the_dense_weights(tmp_path):
  run(tmp_path, pruner="dense")
  dense = common.run_name(config(pruner="dense"))
  assert (tmp_path / dense / "weights" / "initial").exists()
  assert (tmp_path / dense / "weights" / "final").exists()
  r = run(tmp_path, pruner="magnitude/global", compression=10)
  assert r["direct_compression"] == pytest.approx(10, rel=1e-3)
  with pytest.raises(FileNotFoundError, match="run --pruner=dense"):
    run(tmp_path / "elsewhere", pruner="lamp", compression=10)


def test_imp_rounds_reach_the_target(tmp_path):
  r = run(tmp_path, pruner="imp", compression=10, imp_rounds=2, rewind_step=5)
  assert [x["round"] for x in r["imp_rounds"]] == [1, 2]
  assert r["imp_rounds"][0]["direct_compression"] == pytest.approx(10 ** 0.5, rel=1e-3)
  assert r["direct_compression"] == pytest.approx(10, rel=1e-3)


def test_target_arguments():
  assert common.target_sparsity(config(compression=100.0)) == pytest.approx(0.99)
  assert common.target_sparsity(config(target_sparsity=0.9)) == 0.9
  assert common.target_sparsity(config()) == 0.0
  with pytest.raises(ValueError, match="not both"):
    common.target_sparsity(config(compression=10.0, target_sparsity=0.9))
  with pytest.raises(ValueError, match="--config.target_sparsity=1.5"):
    common.target_sparsity(config(target_sparsity=1.5))
  with pytest.raises(ValueError, match="--config.compression=0.5"):
    common.target_sparsity(config(compression=0.5))


def test_sweep_grid_orders_dense_first_and_skips_done(tmp_path):
  runs = sweep.grid(["lenet300100"], ["random/igq", "magnitude/global"], [10.0, 100.0],
                    ["direct", "effective"], [0, 1])
  assert [r["pruner"] for r in runs[:2]] == ["dense", "dense"]
  assert len(runs) == 2 + 2 * 2 * 2 * 2
  with pytest.raises(ValueError, match="pruner='nope'"):
    sweep.grid(["lenet300100"], ["nope"], [10.0], ["direct"], [0])
  shared = sweep.shared_overrides(20, 10, "--config.checkpoint_every=10 --config.log_every=10")
  source = common.DataSource(synthetic=True)
  small = sweep.grid(["lenet300100"], ["random/uniform"], [10.0], ["direct", "effective"], [0])
  done, skipped, failed = sweep.execute(small, shared, str(tmp_path), source, jobs=2)
  assert (done, skipped, failed) == (2, 0, 0)
  for r in small:
    assert os.path.exists(sweep.result_path(sweep.config_for(r, shared), str(tmp_path)))
  # resumable: nothing re-runs
  assert sweep.execute(small, shared, str(tmp_path), source, jobs=2) == (0, 2, 0)


def test_sweep_in_process_runs_records_unreachable_and_resumes(tmp_path):
  shared = sweep.shared_overrides(
      20, 10, "--config.checkpoint_every=10 --config.log_every=10 --config.rounds=3")
  source = common.DataSource(synthetic=True)
  small = sweep.grid(["lenet300100"], ["random/uniform"], [10.0, 1e6], ["effective"], [0])
  assert sweep.execute(small, shared, str(tmp_path), source, jobs=1) == (2, 0, 0)
  path = lambda point: sweep.result_path(sweep.config_for(point, shared), str(tmp_path))
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
