"""experiments.one_shot: the grid on synthetic MNIST-shaped data (a short dense run),
its resumable CSV, N:M targets on the layers M fits, the tables and the figure."""

from __future__ import annotations

import os

import pytest

from experiments import checks, configs, datasource, one_shot


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
  config = configs.load("lenet300100", ["train_steps=30", "eval_every=30", "checkpoint_every=30"])
  source = datasource.DataSource(synthetic=True, num_examples=256)
  task = one_shot.task_for(config, source)
  folder = tmp_path_factory.mktemp("one_shot")
  return task, task.dense(str(folder / "dense")), folder


def test_grid_rows_resume_and_patterns_prune_the_layers_they_fit(dense):
  task, net, folder = dense
  out = str(folder / "grid.csv")
  args = (["magnitude/uniform", "wanda", "sparsegpt"], ["0.5", "4:8"], [0, 1], 32, out, False)
  rows = one_shot.sweep(task, net, *args, "lenet300100")
  # magnitude reads no calibration data: once per target
  assert len(rows) == 2 + 2 * 2 * 2
  assert {r["status"] for r in rows} == {"ok"}
  by = {(r["method"], r["target"], str(r["seed"])): r for r in rows}
  assert by[("magnitude/uniform", "0.5", "-")]["calibration"] == 0
  for r in rows:
    if r["target"] == "0.5":
      assert r["direct_sparsity"] == pytest.approx(0.5, abs=1e-4)
      assert r["pruned_layers"] == 3
    else:  # 4:8 fits 784 inputs, not 300 or 100: dense_0 alone is pruned
      assert r["pruned_layers"] == 1
      assert r["direct_sparsity"] == pytest.approx(0.5 * 784 * 300 / 266_200, abs=1e-6)
    assert r["effective_sparsity"] >= r["direct_sparsity"] - 1e-9
    assert r["gap"] == pytest.approx(r["effective_sparsity"] - r["direct_sparsity"])
    assert 0 <= r["value"] <= 1 and r["dead_units"].startswith("dense_0=")
  again = one_shot.sweep(task, net, *args, "lenet300100")  # resumed: nothing new
  assert len(again) == len(rows) and one_shot.read_rows(out) == again
  text = one_shot.tables(again, net.value, task.metric)
  assert "| sparsegpt |" in text and "| 4:8 |" in text and "50%" in text
  fig = str(folder / "fig.png")
  one_shot.figure(again, net.value, task.metric, fig, "test")
  assert os.path.getsize(fig) > 1000


def test_strict_patterns_refuse_a_layer_they_do_not_fit(dense):
  task, net, folder = dense
  with pytest.raises(ValueError, match=r"pattern='4:8': M=8 does not divide .*'dense_1/kernel'"):
    one_shot.run_one(task, net, "wanda", "4:8", 0, task.calibration(0, 16), True)
  row = one_shot.run_one(task, net, "wanda", "1:1024", 0, task.calibration(0, 16), False)
  assert row["status"] == "no layer fits"


@pytest.mark.parametrize(
  "value, match",
  [("0.5,1.5", r"--targets entry=1.5"), ("2:1", r"N=2 is larger than M=1"), ("", "empty")],
)
def test_bad_targets_are_named(value, match):
  # a FlagError: cli.run reports it as one usage line, without a traceback
  with pytest.raises(checks.FlagError, match=match):
    one_shot.parse_targets(value)


@pytest.mark.parametrize(
  "value, match",
  [("wanda,nope", r"--methods: pruner='nope' is not a known pruner"), (" ,", "empty")],
)
def test_bad_methods_are_named(value, match):
  with pytest.raises(checks.FlagError, match=match):
    one_shot.parse_methods(value)
  assert one_shot.parse_methods("magnitude/uniform, sparsegpt") == [
    "magnitude/uniform",
    "sparsegpt",
  ]
