"""Result files: strict JSON, readable by the group, validated when read back."""

import glob
import json
import math
import os
import stat

import pytest

from experiments import results
from sparsejax import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reject(name):
  raise ValueError(f"{name} is not JSON")


def test_every_committed_result_is_strict_json_and_valid():
  paths = glob.glob(os.path.join(REPO, "results", "**", "result.json"), recursive=True)
  assert paths
  for path in paths:
    with open(path) as f:
      json.loads(f.read(), parse_constant=_reject)
    results.load(path)


def test_writer_turns_non_finite_numbers_into_null(tmp_path):
  import numpy as np

  path = tmp_path / "r.json"
  results.atomic_write_json(
    str(path),
    {"a": math.inf, "b": [float("nan"), 1.5], "c": np.float32(-np.inf), "d": np.arange(2)},
  )
  assert json.loads(path.read_text(), parse_constant=_reject) == {
    "a": None,
    "b": [None, 1.5],
    "c": None,
    "d": [0, 1],
  }


def test_result_files_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    results.atomic_write_json(str(tmp_path / "r.json"), {"x": 1})
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o644
    os.umask(0o027)
    files.atomic_write(str(tmp_path / "s.txt"), b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "s.txt").st_mode) == 0o640
  finally:
    os.umask(old)


def _valid(**changes):
  r = {
    "config": {
      "arch": "lenet300100",
      "dataset": "mnist",
      "pruner": "random/igq",
      "pruning_type": "direct",
      "seed": 0,
      "target_compression": 10.0,
      "train": {"train_steps": 20},
    },
    "status": "ok",
    "test_accuracy": 0.9,
    "test_loss": 0.3,
    "direct_compression": 10.0,
    "effective_compression": 11.0,
    "history": [],
  }
  r.update(changes)
  return r


@pytest.mark.parametrize(
  "text,why",
  [
    ('{"config": {"arch": "lenet3', "not strict JSON"),
    ('{"x": NaN}', "not strict JSON"),
    (json.dumps(_valid(status="weird")), "status='weird'"),
    (json.dumps(_valid(test_accuracy=None)), "test_accuracy=None"),
    (json.dumps(_valid(status="diverged")), "diverged_step=None"),
    (json.dumps({k: v for k, v in _valid().items() if k != "config"}), "config"),
  ],
)
def test_load_names_the_file_and_the_reason(tmp_path, text, why):
  path = tmp_path / "result.json"
  path.write_text(text)
  with pytest.raises(results.InvalidResultError, match=why) as err:
    results.load(str(path))
  assert err.value.path == str(path) and str(path) in str(err.value)


def test_disconnected_reads_back_as_infinite(tmp_path):
  path = tmp_path / "result.json"
  results.atomic_write_json(
    str(path), _valid(status="disconnected", effective_compression=math.inf)
  )
  assert results.load(str(path))["effective_compression"] == math.inf


def test_is_done_moves_a_torn_file_aside(tmp_path):
  path = tmp_path / "result.json"
  assert not results.is_done(str(path))
  path.write_text(json.dumps(_valid())[:40])
  assert not results.is_done(str(path))
  assert not path.exists()
  [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("result.json.invalid-")]
  assert aside.read_text() == json.dumps(_valid())[:40]
  results.atomic_write_json(str(path), _valid())
  assert results.is_done(str(path))


def test_plots_and_tables_show_diverged_runs(tmp_path):
  from experiments import plot

  runs = [
    dict(
      pruner=p,
      pruning_type="direct",
      target_compression=10.0,
      seed=0,
      status=st,
      test_accuracy=a,
      direct_compression=10.0,
      effective_compression=12.0,
      diverged_step=step,
    )
    for p, st, a, step in (
      ("random/igq", "ok", 0.9, None),
      ("random/uniform", "diverged", None, 7),
      ("dense", "ok", 0.95, None),
    )
  ]
  runs[2].update(target_compression=1.0, direct_compression=1.0, effective_compression=1.0)
  assert plot._summary(runs[1:2])["status"] == "diverged"
  assert "| random/uniform | direct | diverged |" in plot.accuracy_table(runs)
  plot.plot_accuracy(runs, str(tmp_path / "a.png"), "t")
  assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_compaction_figures_and_tables_from_their_csvs(tmp_path):
  from experiments import plot

  runs = [
    dict(
      pruner=p,
      pruning_type="effective",
      target_compression=t,
      seed=s,
      status="ok",
      test_accuracy=0.9 - 0.01 * s,
      direct_compression=t,
      effective_compression=t,
      diverged_step=None,
    )
    for p in ("snip", "neuron/snip")
    for t in (10.0, 100.0)
    for s in (0, 1)
  ]
  runs.append(
    dict(
      runs[0],
      pruner="neuron/random",
      target_compression=1000.0,
      status="unreachable",
      test_accuracy=None,
    )
  )
  lat = [
    dict(
      pruner=p,
      target_compression=t,
      masked_latency_ms=1.0,
      compact_latency_ms=0.5,
      masked_throughput=1e5,
      compact_throughput=2e5,
      latency_speedup=2.0,
      throughput_speedup=2.0,
      live_channel_fraction=0.5,
      compact_params=10.0,
      params_dense=20.0,
      compact_flops=20.0,
      flops_dense=40.0,
      load_average=1.0,
      reproduced=p == "snip",
      widths="150;50",
      batch=256.0,
    )
    for p in ("snip", "neuron/snip")
    for t in (10.0, 100.0)
  ]
  path = tmp_path / "lat.csv"
  results.write_csv(str(path), lat, results.LATENCY_COLUMNS)
  lat = results.read_latency_csv(str(path))
  table = plot.speed_table(runs, lat)
  assert "| snip | 10x | 2 | 0.8950 ±0.005 | 10x | 150-50 | 1 / 0.5 | 2.00x |" in table
  assert "150-50 (not reproduced)" in table  # the neuron/snip rows: flagged
  assert "| neuron/random | 1000x | 1 | unreachable |" in table
  plot.plot_speed(runs, lat, str(tmp_path / "s.png"), "t")
  rows = {
    "vgg19": [
      dict(
        pruner="synflow",
        target_compression=t,
        status="ok",
        effective_compression=t,
        live_channel_fraction=1 / t**0.5,
        flops_dense=100.0,
        compact_flops=100 / t**0.5,
        flops_effective=100 / t,
        params_dense=50.0,
        compact_params=50 / t**0.5,
      )
      for t in (10.0, 100.0)
    ]
    + [dict(pruner="grasp", target_compression=1000.0, status="unreachable")]
  }
  table = plot.compaction_table(rows)
  assert "| vgg19 | synflow | 100x | 100x | 0.10 | 10.00x | 100x | 10.00x |" in table
  assert "| vgg19 | grasp | 1000x | unreachable |" in table
  for xkey in ("effective_compression", "flops_effective"):
    plot.plot_compaction(rows, str(tmp_path / f"{xkey}.png"), xkey)
    assert (tmp_path / f"{xkey}.png").read_bytes()[:4] == b"\x89PNG"


def test_csv_schemas_are_the_committed_tables_columns():
  """The compression and latency tables keep the columns of the committed results."""
  header = lambda *path: open(os.path.join(REPO, "results", *path)).readline().strip().split(",")
  assert header("compaction", "vgg19", "compression.csv") == results.COMPRESSION_COLUMNS
  assert header("compaction", "lenet300100_latency.csv") == results.LATENCY_COLUMNS
  rows = results.read_compression_csv(
    os.path.join(REPO, "results", "init_curves", "lenet300100", "synflow.csv")
  )
  assert isinstance(rows[0]["direct_compression"], float) and rows[0]["pruner"] == "synflow"
  lat = results.read_latency_csv(
    os.path.join(REPO, "results", "compaction", "lenet300100_latency.csv")
  )
  assert {r["reproduced"] for r in lat} <= {True, False, None}


def test_a_pruner_without_a_colour_gets_its_own_from_the_default_cycle():
  from experiments import plot

  a, b = plot._colour("toy/a-new-method"), plot._colour("toy/another")
  assert a != b and a == plot._colour("toy/a-new-method")
  assert not {a, b} & set(plot.COLOURS.values())
  assert plot._colour("snip") == plot.COLOURS["snip"]
  assert plot._order(["toy/another", "snip", "dense"]) == ["dense", "snip", "toy/another"]
