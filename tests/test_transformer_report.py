"""experiments.transformer_report: the tables and figure of docs/results.md section 9
from hand-written init-curve rows and result files."""

from __future__ import annotations

import json
import os

from experiments import results, transformer_report


def _curve_row(pruner, target, effective, heads, status="ok"):
  return {
    "arch": "gpt",
    "pruner": pruner,
    "pruning_type": "direct",
    "seed": 0,
    "target_compression": target,
    "direct_compression": target,
    "effective_compression": effective,
    "status": status,
    "dead_heads": heads,
    "dead_mlp_neurons": "5/2048",
    "dead_embedding_dims": "0/128",
  }


def _result(path, pruner, ptype, target, bits, status="ok", effective=None):
  r = {
    "config": {
      "arch": "gpt",
      "dataset": "text",
      "pruner": pruner,
      "pruning_type": ptype,
      "seed": 0,
      "target_compression": target,
      "train": {"train_steps": 20},
    },
    "status": status,
    "test_accuracy": None if status == "unreachable" else 0.5,
    "test_loss": None if status == "unreachable" else bits * 0.6931,
    "test_bits_per_byte": None if status == "unreachable" else bits,
    "direct_compression": target,
    "effective_compression": effective or target,
    "history": [],
  }
  if status == "unreachable":
    r["error"] = "beyond the ranking"
  os.makedirs(path)
  with open(os.path.join(path, "result.json"), "w") as f:
    json.dump(r, f)


def test_tables_and_figure_from_curves_and_runs(tmp_path):
  curves = tmp_path / "results" / "init_curves" / "gpt"
  curves.mkdir(parents=True)
  results.write_csv(
    str(curves / "random-igq.csv"),
    [_curve_row("random/igq", 10.0, 10.0, "0/16"), _curve_row("random/igq", 100.0, 121.0, "2/16")],
    results.COMPRESSION_COLUMNS,
  )
  runs = tmp_path / "runs" / "gpt"
  _result(str(runs / "dense"), "dense", "direct", 1.0, 2.0)
  _result(str(runs / "a"), "random/igq", "direct", 10.0, 2.5, effective=12.5)
  _result(str(runs / "b"), "random/igq", "effective", 10.0, 2.25)
  _result(str(runs / "c"), "random/igq", "effective", 1000.0, 0.0, status="unreachable")
  doc = tmp_path / "doc.md"
  written = transformer_report.make(
    str(tmp_path / "results"), str(tmp_path / "runs"), str(tmp_path / "fig"), str(doc)
  )
  assert str(tmp_path / "fig" / "transformer_gpt.png") in written
  assert (tmp_path / "fig" / "transformer_gpt.png").read_bytes()[:4] == b"\x89PNG"
  text = doc.read_text()
  assert "| GPT (byte-level) | random/igq | 100x | 121x | 2/16 | 5/2048 | 0/128 |" in text
  assert "| dense | direct | 2.0000 |  |" in text
  assert "| random/igq | direct | 2.5000 (12.5x) |  |" in text
  assert "| random/igq | effective | 2.2500 (10x) | unreachable |" in text
