"""experiments.one_shot: the grid on synthetic MNIST-shaped data (a short dense run),
its resumable CSV, N:M targets on the layers M fits, the tables and the figure."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import checks, configs, datasource, one_shot

REPO = pathlib.Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------ the language model

TINY_GPT = """
from sparsejax import models

models.register_model(
  "gpt_tiny",
  models.ModelSpec(
    models.gpt.build,
    dict(context=16, width=16, depth=1, heads=2, mlp_ratio=2),
    "text",
    (16,),
    256,
    input_dtype="int32",
  ),
)
"""


@pytest.mark.slow
def test_the_language_model_task_end_to_end(tmp_path):
  """The binary on synthetic text with a tiny GPT (--import): dense training, 16
  calibration windows, held-out bits per byte on a prefix of the test split, the CSV,
  the tables (lower is better, perplexity) and the figure in --doc."""
  plugin = tmp_path / "tiny_gpt.py"
  plugin.write_text(TINY_GPT)
  doc = tmp_path / "doc.md"
  doc.write_text("# results\n")
  out = tmp_path / "gpt.csv"
  steps = ["train_steps=6", "eval_every=6", "checkpoint_every=6", "log_every=2", "batch_size=8"]
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.one_shot",
      f"--import={plugin}",
      "--config=experiments/configs/gpt.py",
      "--config.arch=gpt_tiny",
      *[f"--config.{s}" for s in steps],
      "--synthetic_data",
      "--methods=magnitude/uniform,wanda,sparsegpt",
      "--targets=0.5,2:4",
      "--seeds=0",
      "--calibration=16",
      "--eval_bytes=1000",
      f"--out={out}",
      f"--doc={doc}",
      f"--figures_dir={tmp_path}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  rows = one_shot.read_rows(str(out))
  assert [(x["method"], x["target"], str(x["seed"])) for x in rows] == [
    ("magnitude/uniform", "0.5", "-"),
    ("magnitude/uniform", "2:4", "-"),
    ("wanda", "0.5", "0"),
    ("wanda", "2:4", "0"),
    ("sparsegpt", "0.5", "0"),
    ("sparsegpt", "2:4", "0"),
  ]
  for x in rows:
    assert x["status"] == "ok" and x["metric"] == "bits_per_byte"
    assert x["value"] == pytest.approx(x["loss"] / math.log(2))
    # an untrained byte model is near uniform: about 8 bits per byte
    assert 4 < x["value"] < 12
    # the block's six linear layers (2,048 weights) at 50%, or 2:4 (M divides 16 and 32
    # inputs); the embedding and the head (4,096 weights each) stay dense
    assert x["pruned_layers"] == 6
    assert x["direct_sparsity"] == pytest.approx(1024 / 10_240, abs=1e-6)
    assert x["effective_sparsity"] >= x["direct_sparsity"] - 1e-9
    units = dict(u.split("=") for u in x["dead_units"].split())
    assert "block_0/mlp/fc" in units and "head" in units
    assert x["dead_units_total"] == sum(int(v) for v in units.values())
  # the causal mask's scores (2 heads x 16 x 15 / 2 = 240 per block) are dead in the
  # dense network too: not counted; magnitude at 50% kills no query or key of a whole head
  units = dict(u.split("=") for u in rows[0]["dead_units"].split())
  scores = [k for k in units if k.startswith("dot_general")]
  assert scores and all(units[k] == "0" for k in scores)
  assert {x["calibration"] for x in rows} == {0, 16}
  text = doc.read_text()
  assert "Test bits per byte (lower is better) without fine-tuning" in text
  assert "Test perplexity exp(loss)" in text and "| sparsegpt |" in text
  assert (tmp_path / "one_shot_gpt_tiny.png").stat().st_size > 1000


def test_the_language_model_task_evaluates_a_prefix_and_names_bad_options():
  config = configs.load("gpt", ["train_steps=2"])
  source = datasource.DataSource(synthetic=True, num_examples=5000)
  task = one_shot.task_for(config, source, eval_bytes=300)
  assert isinstance(task, one_shot.LanguageModel) and not task.higher_is_better
  assert task.eval_bytes == 300 and task.context == 128
  (calib,) = task.calibration(0, 4)
  assert calib.shape == (4, 128) and calib.dtype == np.int32
  with pytest.raises(ValueError, match=r"eval_bytes=1 must be None"):
    one_shot.task_for(config, source, eval_bytes=1)
