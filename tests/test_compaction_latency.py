"""experiments.compaction_latency on a tiny synthetic run: re-created, checked, timed."""

import json

import pytest

from experiments import compaction_latency, configs, datasource, prune_train, results

SOURCE = datasource.DataSource(synthetic=True, num_examples=512)
TINY = ["train_steps=10", "eval_every=10", "checkpoint_every=10", "log_every=10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("runs")
  for fields in (["pruner=neuron/random", "compression=10"], ["pruner=snip", "compression=100"]):
    cfg = configs.load("lenet300100", TINY + fields + ["pruning_type=effective"])
    prune_train.run(cfg, out_dir=str(out), source=SOURCE)
  return out


def test_runs_are_recreated_checked_compacted_and_timed(runs, tmp_path):
  found = compaction_latency.find_runs(
    str(runs), ["neuron/random", "snip"], "effective", "lenet300100", 10
  )
  assert [r["config"]["pruner"] for _, r in found] == ["neuron/random", "snip"]
  assert compaction_latency.find_runs(str(runs), ["snip"], "direct", "lenet300100", 10) == []
  rows = [
    compaction_latency.measure(p, r, source=SOURCE, dense_out=str(tmp_path), batch=4, repeats=1)
    for p, r in found
  ]
  for row, (_, r) in zip(rows, found):
    assert row["reproduced"] is True and row["reason"] == ""
    assert row["effective_compression"] == pytest.approx(r["effective_compression"], rel=1e-9)
    assert row["logits_relative_difference"] <= 1e-5
    assert row["masked_latency_ms"] > 0 and row["compact_throughput"] > 0
    assert row["compact_flops"] <= row["flops_dense"]
  assert rows[0]["widths_before"] == "300;100"
  assert rows[0]["compact_params"] < rows[0]["params_dense"]  # neurons removed
  path = tmp_path / "latency.csv"
  results.write_csv(str(path), rows, results.LATENCY_COLUMNS)
  back = results.read_latency_csv(str(path))
  assert [r["reproduced"] for r in back] == [True, True]
  assert back[0]["seed"] == 0.0 and back[0]["widths"] == rows[0]["widths"]


def test_a_run_that_does_not_reproduce_is_flagged_and_failed_runs_are_skipped(runs):
  path, r = compaction_latency.find_runs(str(runs), ["snip"], "effective", "lenet300100", 10)[0]
  doctored = json.loads(json.dumps(r))
  doctored["effective_compression"] *= 1.5
  row = compaction_latency.measure(
    path, doctored, source=SOURCE, dense_out="unused", batch=4, repeats=1
  )
  assert row["reproduced"] is False and "re-created masks differ" in row["reason"]
  assert row["masked_latency_ms"] is not None  # flagged, not hidden
  for status in ("unreachable", "diverged"):
    row = compaction_latency.measure(
      path,
      dict(r, status=status, error="why"),
      source=SOURCE,
      dense_out="unused",
      batch=4,
      repeats=1,
    )
    assert row["reason"].startswith(f"status {status}") and "masked_latency_ms" not in row
  row = compaction_latency.measure(
    path, r, source=datasource.DataSource(), dense_out="unused", batch=4, repeats=1
  )
  assert "synthetic_data" in row["reason"]
