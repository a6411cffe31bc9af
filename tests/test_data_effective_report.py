"""experiments.data_effective_report: its table and figure from result rows (no JAX)."""

import math

from experiments import data_effective_report


def _layer(name, units, active, data_active, sparsity):
  return {
    "layer": name,
    "units": units,
    "active_units": active,
    "data_active_units": data_active,
    "never_active_fraction": 1.0 - data_active / units,
    "channels": units,
    "never_active_channels": units - data_active,
    "activation_sparsity": sparsity,
  }


def _row(pruner, target, effective, data, layers):
  return {
    "arch": "lenet300100",
    "dataset": "mnist",
    "pruner": pruner,
    "target": target,
    "topk": None,
    "accuracy": 0.9,
    "direct": target,
    "effective": effective,
    "data": data,
    "layers": layers,
    "examples": 10,
  }


ROWS = [
  _row(
    "magnitude/global",
    100.0,
    115.2,
    117.5,
    [
      _layer("dense_0", 300, 243, 239, None),
      _layer("dense_1", 100, 100, 100, 0.59),
      _layer("dense_2", 10, 10, 10, 0.49),
    ],
  ),
  _row(
    "acdc",
    100.0,
    math.inf,
    None,
    [
      _layer("dense_0", 300, 0, 0, None),
      _layer("dense_1", 100, 0, 0, 0.64),
      _layer("dense_2", 10, 0, 0, 0.48),
    ],
  ),
]


def test_table_splits_never_active_units_into_dead_and_silent():
  lines = data_effective_report.table(ROWS).splitlines()
  assert "dead + silent" in lines[0]
  magnitude = [c.strip() for c in lines[2].strip("|").split("|")]
  # 300 - 243 structurally dead, 243 - 239 on a path but 0 on every example.
  assert magnitude[-2] == "57 + 4 of 300; 0 + 0 of 100"
  assert magnitude[-4:-2] == ["117.5x", "1.02"]
  assert magnitude[-1] == "59%, 49%"
  disconnected = [c.strip() for c in lines[3].strip("|").split("|")]
  assert disconnected[5:8] == ["disconnected", "disconnected", "nan"]
  assert disconnected[-2] == "300 + 0 of 300; 100 + 0 of 100"


def test_figure_is_written(tmp_path):
  path = tmp_path / "data_effective_mnist.png"
  data_effective_report.figure(ROWS, str(path))
  assert path.stat().st_size > 0
