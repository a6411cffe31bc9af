"""Executes notebooks/effective_sparsity_tour.ipynb top to bottom and checks what it printed.

The notebook trains on real MNIST when its raw files are at hand (beside the checkout or in
$SPARSEJAX_TFDS_MANUAL_DIR) and on synthetic data otherwise. The first run takes whatever this
machine has; when that was real MNIST, a second run points $SPARSEJAX_TFDS_MANUAL_DIR at an
empty folder to exercise the synthetic fallback too.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = (
  pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "effective_sparsity_tour.ipynb"
)
CELL_TIMEOUT_S = 600
MANUAL_DIR_ENV = "SPARSEJAX_TFDS_MANUAL_DIR"  # sparsejax.data.MANUAL_DIR_ENV


class Run:
  """An executed notebook: its stdout per cell id and the summary it printed last."""

  def __init__(self, nb):
    self.nb = nb
    self.stdout = {
      cell.id: "".join(
        o.get("text", "")
        for o in cell.get("outputs", [])
        if o.output_type == "stream" and o.name == "stdout"
      )
      for cell in nb.cells
      if cell.cell_type == "code"
    }
    self.summary = json.loads(self.stdout["summary"])

  def images(self) -> int:
    return sum(
      "image/png" in o.get("data", {}) for cell in self.nb.cells for o in cell.get("outputs", [])
    )


def execute(env_overrides: dict[str, str]) -> Run:
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOK.parent)}},
  )
  client.execute(env=dict(os.environ, **env_overrides))  # raises on any cell's error
  return Run(nb)


@pytest.fixture(scope="module")
def default_run() -> Run:
  return execute({})


@pytest.fixture(scope="module")
def synthetic_run(default_run, tmp_path_factory) -> Run:
  if default_run.summary["data"] == "synthetic":
    return default_run
  empty = tmp_path_factory.mktemp("no_mnist_here")
  return execute({MANUAL_DIR_ENV: str(empty)})


def check_run(run: Run) -> None:
  s = run.summary
  # Step 2: 100x direct; the printed line agrees with the summary.
  line = re.search(
    r"direct compression ([\d.]+)x, effective compression ([\d.]+)x", run.stdout["prune-direct"]
  )
  assert line, run.stdout["prune-direct"]
  direct, eff = s["direct_100x_uniform"]["direct"], s["direct_100x_uniform"]["effective"]
  assert (float(line[1]), float(line[2])) == (round(direct, 1), round(eff, 1))
  assert direct == pytest.approx(100.0, rel=1e-3)
  assert eff >= direct
  # Step 3: effective >= direct at every point of the sweep (up to float rounding).
  assert s["sweep_min_effective_over_direct"] >= 1.0 - 1e-9
  assert run.images() == 2
  # Step 4: every quota reaches at least 100x effective, with at most 100x direct.
  assert set(s["effective_100x"]) == {"uniform", "erk", "igq"}
  for quota, c in s["effective_100x"].items():
    assert c["effective"] >= 100.0, (quota, c)
    assert 1.0 <= c["direct"] <= c["effective"], (quota, c)
  assert s["effective_100x"]["uniform"]["direct"] < 100.0  # uniform needs a denser mask
  # Step 5: the network with 100x effective compression learns; the 100x direct one,
  # which is far sparser effectively, learns less.
  acc = s["test_accuracy"]
  assert acc["uniform, 100x effective"] > 0.5, acc
  assert acc["uniform, 100x effective"] > acc["uniform, 100x direct"], acc
  assert s["train_steps"] == 400


def test_notebook_is_valid_and_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.id


@pytest.mark.slow
def test_notebook_runs(default_run):
  check_run(default_run)
  data_line = default_run.stdout["data"]
  if default_run.summary["data"] == "mnist":
    assert "real MNIST" in data_line and "60000 train / 10000 test" in data_line
  else:
    assert "synthetic" in data_line


@pytest.mark.slow
def test_notebook_falls_back_to_synthetic_data(synthetic_run):
  check_run(synthetic_run)
  assert synthetic_run.summary["data"] == "synthetic"
  assert "synthetic" in synthetic_run.stdout["data"]


def test_readme_says_how_to_run_every_notebook_with_the_test_extra():
  """The README's command for each notebook (``jupyter execute``, from nbclient) works
  with what ``pip install -e ".[test]"`` installs."""
  root = NOTEBOOK.parents[1]
  readme = (root / "README.md").read_text()
  for path in sorted((root / "notebooks").glob("*.ipynb")):
    assert f"jupyter execute notebooks/{path.name}" in readme, path.name
  extra = (root / "pyproject.toml").read_text().split("\ntest = [", 1)[1].split("\n]", 1)[0]
  for package in ("nbclient", "ipykernel", "nbformat", "jupyter_core"):
    assert package in extra, package
  out = subprocess.run(
    [sys.executable, "-m", "jupyter", "execute", "--help"], capture_output=True, text=True
  )
  assert out.returncode == 0 and "execute notebook" in out.stdout, out.stderr[-2000:]
