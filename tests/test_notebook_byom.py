"""Executes notebooks/bring_your_own_model.ipynb (a plain-Flax CNN: effective sparsity,
SNIP and SynFlow to an effective target, brief training; a plain-Flax transformer
language model: the same without training) and checks what it printed."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "bring_your_own_model.ipynb"


def test_notebook_is_valid_and_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.id


@pytest.mark.slow
def test_notebook_runs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
  )
  client.execute(env=dict(os.environ))
  out = {
    c.id: "".join(
      o.get("text", "")
      for o in c.get("outputs", [])
      if o.output_type == "stream" and o.name == "stdout"
    )
    for c in nb.cells
    if c.cell_type == "code"
  }
  s = json.loads(out["summary"])
  assert s["prunable_paths"] == [
    "Conv_0/kernel",
    "Conv_1/kernel",
    "Dense_0/kernel",
    "Dense_1/kernel",
  ]
  for c, row in s["random_uniform"].items():
    assert row["effective"] >= row["direct"] * (1 - 1e-9)
    assert row["direct"] == pytest.approx(float(c), rel=1e-2)  # per-layer rounding
  for pruner in ("snip", "synflow"):
    row = s["pruned"][pruner]
    assert row["effective"] >= s["effective_target"] * (1 - 1e-9), (pruner, row)
    assert 1.0 <= row["direct"] <= row["effective"] * (1 + 1e-9)
    assert s["test_accuracy"][pruner] > 0.2, s["test_accuracy"]
  assert s["train_steps"] == 300
  assert s["data"] in ("mnist", "synthetic")
  # the transformer language model: the tied table is one prunable weight, listed first
  # (the input embedding) and read again by the output layer
  paths = s["lm_prunable_paths"]
  assert paths[0] == "Embed_0/embedding" and paths.count("Embed_0/embedding") == 1
  assert sum("MultiHeadDotProductAttention" in p for p in paths) == 2 * 4  # q, k, v, out
  for name, row in s["lm"].items():
    assert row["effective"] >= row["direct"] * (1 - 1e-9), (name, row)
    if "effective" in name:
      assert row["effective"] >= 10 * (1 - 1e-9), (name, row)
  assert s["lm_data"] in ("python-docs", "synthetic")
  # structured pruning and compaction of the language model: one of two heads and half of
  # each MLP's neurons left per layer, the stream and head widths whole, fewer parameters
  # (the timings are printed, never asserted)
  comp = s["lm_compaction"]
  for name, size in comp["sizes"].items():
    want = size // 2 if name.endswith("/heads") or name.startswith("Dense_") else size
    assert comp["kept"][name] == want, (name, comp["kept"][name], size)
  assert sum(name.endswith("/heads") for name in comp["sizes"]) == 2
  assert comp["params"][1] < comp["params"][0]
  assert set(comp["ms"]) == {"dense", "masked", "compacted"}
