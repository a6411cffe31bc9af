"""benchmarks.compaction: its row function on LeNet-300-100 (tiny repeats), the
resumable CSV, the flag checks; and score batches larger than the synthetic split."""

import pytest

from benchmarks import compaction
from experiments import datasource


@pytest.mark.slow
def test_row_times_masked_and_compacted_lenet300100():
  row = compaction.bench_row("lenet300100", "neuron/l1", 10, batch=4, repeats=1)
  assert row["status"] == "ok"
  assert row["train_batch"] == 100  # the paper's batch size
  assert row["flops_ratio"] == pytest.approx(row["flops_masked"] / row["flops_compact"])
  assert row["flops_ratio"] > 5  # whole neurons removed
  for k in ("latency", "batch", "train", "compile"):
    assert row[f"{k}_masked_s"] > 0 and row[f"{k}_compact_s"] > 0
  assert set(row) <= set(compaction.FIELDS)


@pytest.mark.slow
def test_grid_is_written_row_by_row_and_resumed(tmp_path, capsys):
  path = str(tmp_path / "bench.csv")
  argv = [
    "--archs",
    "lenet300100",
    "--pruners",
    "structured",
    "--compressions",
    "10",
    "--batch",
    "2",
    "--repeats",
    "1",
    "--no_train",
    "--in_process",
    "--csv",
    path,
  ]
  compaction.main(argv)
  (row,) = compaction.read_rows(path)
  assert (row["arch"], row["pruner"], row["status"]) == ("lenet300100", "neuron/l1", "ok")
  assert "neuron/l1" in compaction.table([row])
  capsys.readouterr()
  compaction.main(argv)  # resumed: nothing to do
  assert "already" in capsys.readouterr().out
  assert len(compaction.read_rows(path)) == 1


@pytest.mark.parametrize(
  "argv, match",
  [
    (["--archs", "vgg99"], "--archs: 'vgg99' is not a network"),
    (["--pruners", "nope"], "--pruners: 'nope' is not a pruner"),
    (["--compressions", "1"], "not an effective compression > 1"),
    (["--compressions", "ten"], "must be comma-separated numbers"),
    (["--rows", "vgg19:synflow"], "must be arch:pruner:compression"),
    (["--rows", "lenet5:*:*"], "no row matches"),
    (["--repeats", "0"], "--repeats=0 must be >= 1"),
  ],
)
def test_bad_flags_are_named(argv, match, capsys):
  with pytest.raises(SystemExit):
    compaction.parse_args(argv + ["--csv", "unused.csv"])
  assert match in capsys.readouterr().err


def test_structured_resolves_per_network_and_rows_filter():
  rows = compaction.grid(
    "vgg19,lenet300100", "structured,synflow", "10,100", rows="*:structured:100,vgg19:synflow:1*"
  )
  assert rows == [
    ("vgg19", "channel/l1", 100.0),
    ("vgg19", "synflow", 10.0),
    ("vgg19", "synflow", 100.0),
    ("lenet300100", "neuron/l1", 100.0),
  ]
  with pytest.raises(ValueError, match="batch=0 must be an integer >= 1"):
    compaction.bench_row("lenet300100", "synflow", 10, batch=0)


def test_score_batches_above_the_synthetic_split_size():
  # VGG-19's SNIP batch (1280) and ResNet-18's (2560) exceed the 1024 synthetic examples.
  (batch,) = datasource.DataSource(synthetic=True).score_batches(
    "mnist", num_batches=1, batch_size=1500, seed=0
  )
  assert batch["image"].shape == (1024, 28, 28, 1)
  chunks = compaction.score_batches("lenet300100", 1500)
  assert sum(len(b["label"]) for b in chunks) == 1500
  assert max(len(b["label"]) for b in chunks) <= compaction.SNIP_CHUNK


def test_layer_benchmark_im2col_equals_the_convolution():
  import jax
  import numpy as np

  from benchmarks import compaction_layers

  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  k = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
  np.testing.assert_allclose(
    compaction_layers._im2col(x, k), compaction_layers._conv(x, k), rtol=1e-5, atol=1e-5
  )


def test_effective_benchmark_finds_the_sweeps_convolutions_and_parses_flags():
  """benchmarks.effective wraps the semantics' hook into the XLA:CPU kernels
  (xla_cpu.reach_linear) to profile each convolution of the sweep; its --help runs."""
  import os
  import subprocess
  import sys

  import jax

  import sparsejax
  from benchmarks import effective as bench
  from sparsejax import masks, models
  from sparsejax.connectivity import xla_cpu

  model, shape = models.create("lenet5"), models.input_shape("lenet5")
  traced = sparsejax.trace(model, shape)
  example = masks.random(jax.random.key(1), traced.ones(), 0.9)
  hook = xla_cpu.reach_linear
  found = bench._convolutions(traced, example)
  assert xla_cpu.reach_linear is hook  # restored
  assert [(xs[-1], ws[-1]) for _, xs, ws in found] == [(3, 6), (6, 16)]
  assert all(e.prim.name == "conv_general_dilated" for e, _, _ in found)
  out = subprocess.run(
    [sys.executable, "-m", "benchmarks.effective", "--help"],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert out.returncode == 0 and "--transform_only" in out.stdout, out.stderr[-2000:]


def test_before_after_matches_rows_by_their_untimed_cells():
  from benchmarks import before_after

  def out(ms, effective):
    return (
      "noise\n| network | direct | effective | effective_masks ms | steps/s |\n"
      "|---|---|---|---|---|\n"
      f"| vgg19 | 100x | {effective} | {ms} | 2.5 / 3 |\n"
      "| lenet | 10x | 12x | 1.0 | 8 |\ntrailer\n"
    )

  rows = before_after.compare(out(20.0, "120x"), out(10.0, "120x"))
  assert [r[1:] for r in rows if r[1].startswith("vgg19")] == [
    ["vgg19 / 100x / 120x", "effective_masks ms", "20", "10", "0.50"],
    ["vgg19 / 100x / 120x", "steps/s", "2.5", "2.5", "1.00"],
  ]
  assert len(rows) == 4
  # a row whose untimed cells differ (another effective compression) is not compared
  assert len(before_after.compare(out(20.0, "120x"), out(10.0, "130x"))) == 2


@pytest.mark.slow
def test_compaction_any_row_of_the_vit_and_its_flags(monkeypatch):
  from benchmarks import compaction_any

  row = compaction_any.bench_row("vit", [2], repeats=1)
  (m0, m1), (p0, p1) = row["macs"], row["params"]
  # half of every head and MLP neuron: the blocks' MACs halve, the patch embedding and
  # the head stay
  assert 1.5 < m0 / m1 < 2 and p1 < p0
  assert set(row[2]) == {"dense", "masked", "compacted"} and min(row[2].values()) > 0
  (flops0, bytes0), (flops1, bytes1) = row[("xla", 2)]["masked"], row[("xla", 2)]["compacted"]
  assert flops0 > flops1 > 0 and bytes0 > bytes1 > 0
  assert "| vit | 2 |" in compaction_any.table([row], {"vit": (2,)})
  monkeypatch.setattr("sys.argv", ["compaction_any", "--rows", "vgg99", "--no_doc"])
  with pytest.raises(ValueError, match="--rows: 'vgg99' is not a row"):
    compaction_any.main()
  assert compaction_any.parse_row("vgg19:synflow:100/8") == ("vgg19", "synflow", 100.0, 8)
  assert compaction_any.parse_row("resnet18-imagenet") == ("resnet18-imagenet", None, None, 1)
  assert compaction_any.parse_row("resnet18:channel/l1:10/8") == (
    "resnet18",
    "channel/l1",
    10.0,
    8,
  )
  for bad in ("vit:synflow:1", "vit:nothing:10", "vit:synflow:x", "vgg99:synflow:10"):
    with pytest.raises(ValueError, match=f"--rows: {bad!r} is not a row"):
      compaction_any.parse_row(bad)
  gone = compaction_any.table([{"row": "vit:synflow:1000", "unreachable": 512.3}], {})
  assert "| vit:synflow:1000 | - | unreachable (at most 512.3x effective) |" in gone
