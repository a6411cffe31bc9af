"""The compression-curve job: rows, CSV, plot, and the absl binary end to end."""

import csv
import math
import os
import subprocess
import sys

import jax
import pytest

from experiments import compression, datasource, plot, results
from sparsejax import compact

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rows():
  return compression.sweep(
    "lenet300100",
    ["random/uniform", "random/igq"],
    ["direct", "effective"],
    [10.0, 100.0, 1000.0],
    seed=0,
  )


def test_rows_report_direct_and_effective_compression(rows):
  by = {(r["pruner"], r["pruning_type"], r["target_compression"]): r for r in rows}
  for pruner in ("random/uniform", "random/igq"):
    for c in (10.0, 100.0):
      d = by[(pruner, "direct", c)]
      assert d["direct_compression"] == pytest.approx(c, rel=1e-3)
      assert d["effective_compression"] >= d["direct_compression"]
      e = by[(pruner, "effective", c)]
      # At least the target; as close as the nested family allows (uniform quotas add
      # weights to every layer at once, so E(k) can jump past the target by a few %).
      assert c <= e["effective_compression"] <= c * (1.01 if pruner == "random/igq" else 1.05)
      assert e["direct_compression"] <= e["effective_compression"]
      assert 0 < e["active_units"] <= e["total_units"] == 410
  # Uniform random at 100x direct is far sparser in effect (method.md section 6).
  assert by[("random/uniform", "direct", 100.0)]["effective_compression"] > 500
  # Effective pruning needs much less direct compression for uniform quotas.
  assert by[("random/uniform", "effective", 1000.0)]["direct_compression"] < 200


def test_csv_and_plot(rows, tmp_path):
  path = tmp_path / "c.csv"
  results.write_csv(str(path), rows, results.COMPRESSION_COLUMNS)
  with open(path) as f:
    read = list(csv.DictReader(f))
  assert len(read) == len(rows)
  for column in (
    "arch",
    "pruner",
    "pruning_type",
    "target_compression",
    "direct_compression",
    "effective_compression",
    "active_units",
  ):
    assert column in read[0]
  plot.plot_curves("lenet300100", rows, str(tmp_path / "c.png"))
  assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
  assert compression.format_table(rows).count("\n") == len(rows) + 1


def test_plot_shows_targets_that_keep_nothing_or_are_unreachable(tmp_path):
  # 1e12x keeps no weight of LeNet-300-100: infinite direct and effective compression
  # (the table says inf); the effective type cannot reach it (the table: unreachable).
  rows = compression.sweep(
    "lenet300100", ["random/uniform"], ["direct", "effective"], [10.0, 1e12], seed=0
  )
  assert [r["status"] for r in rows] == ["ok", "ok", "disconnected", "unreachable"]
  assert math.isinf(rows[2]["direct_compression"])
  plot.plot_curves("lenet300100", rows, str(tmp_path / "c.png"))
  assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
  assert "inf" in compression.format_table(rows)


def test_unreachable_targets_are_reported_not_raised():
  rows = compression.sweep("lenet300100", ["random/uniform"], ["effective"], [1e5, 1e6], seed=0)
  assert rows[0]["status"] == "unreachable" and len(rows) == 1


def test_sweep_stops_at_disconnection():
  rows = compression.sweep("lenet300100", ["random/uniform"], ["direct"], [100.0, 1e4, 1e5], seed=0)
  assert rows[-1]["status"] == "disconnected" and math.isinf(rows[-1]["effective_compression"])
  assert len(rows) == 2


def test_bad_arguments():
  with pytest.raises(ValueError, match="pruner='prune_all'"):
    compression.sweep("lenet300100", ["prune_all"], ["direct"], [10.0])
  with pytest.raises(ValueError, match="pruning_types='both'"):
    compression.sweep("lenet300100", ["random/igq"], ["both"], [10.0])
  with pytest.raises(ValueError, match="--compressions=0.5"):
    compression.sweep("lenet300100", ["random/igq"], ["direct"], [0.5])
  for bad in (float("inf"), float("nan")):
    with pytest.raises(ValueError, match=f"--compressions={bad}"):
      compression.sweep("lenet300100", ["random/igq"], ["direct"], [bad])
  with pytest.raises(ValueError, match="name='resnet50'"):
    compression.sweep("resnet50", ["random/igq"], ["direct"], [10.0])


def test_binary_writes_csv_and_png(tmp_path):
  out = tmp_path / "out"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.compression",
      "--compressions=10,100",
      "--pruners=random/uniform",
      f"--out_dir={out}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "random/uniform" in result.stdout
  assert (out / "compression.csv").exists() and (out / "compression.png").exists()


def test_data_driven_pruners_on_synthetic_batches():
  batches = lambda: datasource.DataSource(synthetic=True).score_batches(
    "mnist", num_batches=2, batch_size=32, seed=0
  )
  rows = compression.sweep(
    "lenet300100",
    ["snip", "snip/iterative", "grasp", "random/snip", "synflow"],
    ["direct", "effective"],
    [100.0],
    seed=0,
    batches_fn=batches,
    rounds={"snip/iterative": 5, "synflow": 5},
  )
  assert [r["status"] for r in rows] == ["ok"] * 10
  for r in rows:
    if r["pruning_type"] == "direct":
      assert r["direct_compression"] == pytest.approx(100, rel=1e-3)
    else:
      assert r["effective_compression"] >= 100 * (1 - 1e-9)


def test_quota_limit_ends_the_curve_instead_of_raising():
  # uniform+ keeps LeNet-5's first layer dense and its last at least 20% dense, so
  # 1000x direct is beyond the quota: the curve ends there with an 'unreachable' row.
  rows = compression.sweep(
    "lenet5",
    ["random/uniform_plus"],
    ["direct"],
    [10.0, 1e3, 1e4],
    seed=0,
    stop_at_disconnection=False,
  )
  assert [r["status"] for r in rows] == ["ok", "unreachable"]


def test_flops_and_compact_columns():
  """At initialization every kept unit of a compacted LeNet-300-100 is live, so its
  unmasked weights are exactly the active ones: compacted direct FLOPs = effective."""
  rows = compression.sweep(
    "lenet300100", ["synflow"], ["effective"], [100.0], rounds={"synflow": 5}, compact=True
  )
  (r,) = rows
  assert r["flops_dense"] == 2 * 266200 and r["params_dense"] == 266200
  assert r["flops_effective"] <= r["flops_direct"] < r["flops_dense"]
  assert r["compact_flops_direct"] == r["flops_effective"]
  widths = [int(w) for w in r["compact_widths"].split(";")]
  assert r["compact_params"] == 784 * widths[0] + widths[0] * widths[1] + widths[1] * 10
  assert r["live_channel_fraction"] == sum(widths) / 400
  assert 0 <= r["compact_logit_rel_diff"] <= compact.RTOL


def test_compact_columns_fail_loudly_on_a_changed_function(monkeypatch):
  """A compaction that changes the function stops the sweep (never a silent row)."""
  real = compact.compact

  def broken(*args, **kwargs):
    new_model, new_v, new_m = real(*args, **kwargs)
    new_v = jax.tree_util.tree_map(lambda a: a * 1.5, new_v)
    return new_model, new_v, new_m

  monkeypatch.setattr(compact, "compact", broken)
  with pytest.raises(compact.CompactionMismatchError):
    compression.sweep("lenet300100", ["random/igq"], ["effective"], [10.0], compact=True)
