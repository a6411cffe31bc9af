"""The paper-reproduction jobs: at-init curves (CSV per network and pruner) and the
figures/tables of docs/results.md, on tiny budgets and synthetic data."""

import math
import os
import subprocess
import sys

import pytest

from experiments import configs, datasource, init_curves, plot, prune_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
  score_batches=1,
  batch_size=32,
  rounds={"snip/iterative": 3, "synflow": 3},
  iterative_step=5,
  max_exponent=10,
)


def test_cpu_budgets_of_the_paper_networks_come_from_their_size():
  """The budgets the paper's networks had in a hand-written table, now derived from each
  network's size and input (a new network needs no entry)."""
  small = dict(rounds={}, iterative_step=1, max_exponent=25, score_batches=10)
  large = dict(rounds={"snip/iterative": 10}, iterative_step=3, max_exponent=20, score_batches=1)
  assert init_curves.cpu_budget("lenet300100") == dict(small, batch_size=100)
  assert init_curves.cpu_budget("lenet5") == dict(small, batch_size=128)
  assert init_curves.cpu_budget("vgg16") == dict(large, batch_size=32)
  assert init_curves.cpu_budget("vgg19") == dict(large, batch_size=32)
  assert init_curves.cpu_budget("resnet18") == dict(large, batch_size=16)
  # the transformers are large by their forward pass (7 MFLOP, 0.2 GFLOP per example)
  assert init_curves.forward_flops("lenet300100") < init_curves.LARGE_FORWARD_FLOPS
  assert init_curves.forward_flops("vit") >= init_curves.LARGE_FORWARD_FLOPS
  assert init_curves.cpu_budget("vit") == dict(large, batch_size=36)  # 28x28 images
  assert init_curves.cpu_budget("gpt") == dict(large, batch_size=32)  # the config's windows
  assert [init_curves.network_shape(a)[1] for a in ("lenet300100", "lenet5", "vgg16")] == [
    False,
    True,
    True,
  ]


def test_compression_grid_is_ten_to_the_fifth_steps():
  c = init_curves.compressions(25)
  assert len(c) == 25 and c[0] == pytest.approx(10**0.2) and c[-1] == pytest.approx(1e5)
  assert init_curves.compressions(10, 5) == pytest.approx([10.0, 100.0])
  # Every default budget reaches at least 10^4x; iterative pruners sample the same grid.
  for arch in configs.archs():
    b = init_curves.cpu_budget(arch)
    full = init_curves.compressions(b["max_exponent"])
    assert full[-1] >= 1e4 * (1 - 1e-9), arch
    sampled = init_curves.compressions(b["max_exponent"], b["iterative_step"])
    assert all(any(math.isclose(c, f) for f in full) for c in sampled), arch
    assert set(b) == set(TINY), arch


@pytest.fixture(scope="module")
def curves_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("curves"))
  for pruner in ("random/igq", "synflow"):
    init_curves.run_one(
      "lenet300100",
      pruner,
      out_dir=out,
      seed=0,
      budget=TINY,
      source=datasource.DataSource(synthetic=True),
    )
  return out


def test_curves_csv_has_both_types_and_reaches_effective_targets(curves_dir):
  rows = init_curves.read_rows(init_curves.csv_path(curves_dir, "lenet300100", "random/igq"))
  assert {r["pruning_type"] for r in rows} == {"direct", "effective"}
  assert len([r for r in rows if r["pruning_type"] == "direct"]) == 10
  for r in rows:
    if r["pruning_type"] == "effective" and r["status"] == "ok":
      assert r["effective_compression"] >= r["target_compression"] * (1 - 1e-9)
    if r["pruning_type"] == "direct":
      assert r["direct_compression"] == pytest.approx(r["target_compression"], rel=1e-2)
      assert r["effective_compression"] >= r["direct_compression"]
    assert r["unit_layers"] == "dense_0;dense_1;dense_2"


def test_iterative_pruner_ranks_once_per_target_for_both_types(curves_dir):
  rows = init_curves.read_rows(init_curves.csv_path(curves_dir, "lenet300100", "synflow"))
  assert [r["target_compression"] for r in rows] == pytest.approx([10, 10, 100, 100])
  # One ranking per target, shared by the two pruning types (same time on both rows).
  assert rows[0]["ranking_seconds"] > 0 and rows[2]["ranking_seconds"] > 0
  assert rows[0]["ranking_seconds"] == rows[1]["ranking_seconds"]
  assert rows[2]["ranking_seconds"] == rows[3]["ranking_seconds"]
  # A one-shot pruner ranks once for the whole sweep.
  igq = init_curves.read_rows(init_curves.csv_path(curves_dir, "lenet300100", "random/igq"))
  assert [r["ranking_seconds"] > 0 for r in igq] == [True, True] + [False] * (len(igq) - 2)


def test_binary_skips_done_pairs_and_rejects_after_training_pruners(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "experiments.init_curves",
    "--archs=lenet300100",
    "--pruners=random/igq",
    "--max_exponent=3",
    f"--out_dir={tmp_path}",
    "--synthetic_data",
  ]
  first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-2000:]
  path = init_curves.csv_path(str(tmp_path), "lenet300100", "random/igq")
  assert len(init_curves.read_rows(path)) == 6
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert again.returncode == 0 and "exists; skipped" in again.stderr
  bad = subprocess.run(
    cmd[:4] + ["--pruners=magnitude/global", f"--out_dir={tmp_path}"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert bad.returncode != 0 and "'magnitude/global' prunes after training" in bad.stderr


def test_plot_makes_figures_and_fills_doc_sections(curves_dir, tmp_path):
  results = tmp_path / "results"
  results.mkdir()
  os.symlink(curves_dir, results / "init_curves")
  source = datasource.DataSource(synthetic=True, num_examples=512)
  tiny = ["eval_every=10", "checkpoint_every=10", "log_every=10"]

  def run(*overrides):
    prune_train.run(
      configs.load("lenet300100", tiny + list(overrides)),
      out_dir=str(results / "runs"),
      source=source,
    )

  run("pruner=dense", "train_steps=20")
  run("pruner=dense", "train_steps=40")
  for pruner in ("random/igq", "random/uniform"):
    for ptype in ("direct", "effective"):
      run(f"pruner={pruner}", "compression=10", f"pruning_type={ptype}", "train_steps=20")
  doc = tmp_path / "results.md"
  doc.write_text(
    "# Results\n\nHand-written text.\n\n<!-- accuracy-table:start -->\nold\n"
    "<!-- accuracy-table:end -->\n\nMore text.\n"
  )
  written = plot.make_all(str(results), str(tmp_path / "figs"), str(doc), 20, 40)
  for name in ("init_lenet300100.png", "units_lenet300100.png", "accuracy_lenet300100_t20.png"):
    assert (tmp_path / "figs" / name).read_bytes()[:4] == b"\x89PNG", name
  assert str(doc) in written
  text = doc.read_text()
  assert text.startswith("# Results\n\nHand-written text.") and "More text." in text
  assert "old" not in text
  table = text.split("<!-- accuracy-table:start -->")[1].split("<!-- accuracy-table:end")[0]
  assert "| random/igq | direct |" in table and "| random/igq | effective |" in table
  assert "| dense | direct |" in table
  schedule = text.split("<!-- schedule-table:start -->")[1]
  assert "| dense | direct | 1x |" in schedule
  claims = text.split("<!-- claims-table:start -->")[1].split("<!-- claims-table:end")[0]
  row = [line for line in claims.splitlines() if line.startswith("| 10x |")]
  assert len(row) == 1, claims  # both pruners ran both types at 10x
  cells = [c.strip() for c in row[0].split("|")[1:-1]]
  assert sorted(cells[1].split(", ")) == ["random/igq", "random/uniform"]
  assert -1.0 <= float(cells[3]) <= 1.0 and cells[4].startswith("random/")
  curves = text.split("<!-- init-curves-table:start -->")[1]
  assert "| LeNet-300-100 | synflow |" in curves


def test_summary_over_seeds():
  runs = [
    dict(status=st, test_accuracy=a, direct_compression=10.0, effective_compression=e)
    for st, a, e in (("ok", 0.9, 12.0), ("disconnected", 0.8, math.inf))
  ]
  s = plot._summary(runs)
  assert s["accuracy"] == pytest.approx(0.85) and s["accuracy_min"] == 0.8
  assert s["status"] == "disconnected" and math.isinf(s["effective"])
  assert plot._summary([dict(status="unreachable")])["status"] == "unreachable"


def test_kendall_tau_hand_cases():
  assert plot.kendall_tau(list("abcd"), list("abcd")) == 1.0
  assert plot.kendall_tau(list("abcd"), list("dcba")) == -1.0
  # One swapped adjacent pair out of 6 pairs: (5 - 1) / 6.
  assert plot.kendall_tau(list("abcd"), list("bacd")) == pytest.approx(4 / 6)
