"""The binaries' command lines: --import of a user's pruner and network (by path and by
module name, passed on by the sweep), --help listing config fields, pruners and
networks, and one-line usage errors for a mistyped field, a missing config file or a
module that does not import."""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import configs, datasource, grid, plugins

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A user's module: a pruner (keeps the weights closest to zero) and an MLP, registered
# when it is imported.
TOY = textwrap.dedent(
  """
  import flax.linen as nn
  import jax.numpy as jnp

  from sparsejax import masks, models, pruning


  def _score(c):
    return masks.map_prunable(lambda w: -jnp.abs(w), c.params, prunable=c.prunable)


  class ToyMLP(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
      return nn.Dense(self.num_classes)(x)


  pruning.register_pruner(pruning.Pruner("toy/inverse", _score, quota="erk"))
  models.register_model("toymlp", models.ModelSpec(ToyMLP, {}, "mnist", (28, 28, 1), 10))
  """
)
TINY = [
  "--config.train_steps=4",
  "--config.eval_every=2",
  "--config.log_every=2",
  "--config.checkpoint_every=2",
]


@pytest.fixture
def toy(tmp_path) -> str:
  path = tmp_path / "plugin" / "toy_plugin.py"
  path.parent.mkdir()
  path.write_text(TOY)
  return str(path)


def binary(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", f"experiments.{name}", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, **(env or {})},
  )


def test_compression_runs_a_pruner_and_network_imported_by_path(toy, tmp_path):
  out = tmp_path / "out"
  r = binary(
    "compression",
    f"--import={toy}",
    "--arch=toymlp",
    "--pruners=toy/inverse",
    "--pruning_types=direct,effective",
    "--compressions=10",
    f"--out_dir={out}",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out / "compression.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(x["arch"], x["pruner"], x["status"]) for x in rows] == [
    ("toymlp", "toy/inverse", "ok")
  ] * 2
  assert "toy/inverse" in r.stdout


def test_prune_train_runs_them_imported_by_module_name_with_the_generic_config(toy, tmp_path):
  r = binary(
    "prune_train",
    "--import=toy_plugin",
    f"--config={configs.GENERIC}:toymlp",
    "--config.pruner=toy/inverse",
    "--config.compression=10",
    "--config.pruning_type=effective",
    *TINY,
    "--synthetic_data",
    f"--out_dir={tmp_path / 'out'}",
    env={"PYTHONPATH": os.pathsep.join([os.path.dirname(toy), os.environ.get("PYTHONPATH", "")])},
  )
  assert r.returncode == 0, r.stderr[-3000:]
  (path,) = glob.glob(str(tmp_path / "out" / "*" / "result.json"))
  result = json.load(open(path))
  assert result["status"] == "ok" and result["effective_compression"] >= 10 * (1 - 1e-9)
  c = result["config"]
  assert (c["arch"], c["dataset"], c["pruner"]) == ("toymlp", "mnist", "toy/inverse")
  # The generic config's documented training settings, with the run's overrides.
  assert c["train"]["batch_size"] == 128 and c["train"]["train_steps"] == 4
  assert os.path.basename(os.path.dirname(path)).startswith("toymlp-mnist_toy-inverse_effective")


@pytest.mark.slow
def test_sweep_passes_the_import_on_to_its_child_processes(toy, tmp_path):
  out = tmp_path / "out"
  r = binary(
    "sweep",
    f"--import={toy}",
    "--archs=toymlp",
    "--pruners=toy/inverse",
    "--compressions=10",
    "--train_steps=4",
    "--eval_every=2",
    "--extra_flags=--config.log_every=2 --config.checkpoint_every=2",
    "--synthetic_data",
    "--jobs=2",  # a child process: it gets --import on its command line
    f"--out_dir={out}",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "1 ran, 0 skipped" in r.stdout
  # The child parsed generic.py:toymlp and ran toy/inverse: it had imported the module.
  (path,) = glob.glob(str(out / "*" / "result.json"))
  assert json.load(open(path))["config"]["pruner"] == "toy/inverse"


def test_the_child_command_line_carries_the_imports_with_absolute_paths(toy, monkeypatch):
  point = dict(arch="lenet300100", pruner="random/igq", compression=10.0, pruning_type="direct")
  point["seed"] = 0
  source = datasource.DataSource(synthetic=True)
  assert not any(a.startswith("--import") for a in grid.command(point, [], "o", source))
  monkeypatch.chdir(os.path.dirname(toy))
  cmd = grid.command(point, [], "o", source, imports=["toy_plugin.py", "lab.pruners"])
  assert f"--import={toy},lab.pruners" in cmd


def test_imports_happen_once_and_name_what_failed(toy, tmp_path):
  first = plugins.import_module(toy)
  assert first.__name__ == "sparsejax_import_toy_plugin"
  assert plugins.import_modules([toy, f" {toy} "]) == [first, first]  # not registered twice
  from sparsejax import models, pruning

  try:
    assert "toy/inverse" in pruning.PRUNERS and "toymlp" in models.MODELS
    assert configs.path("toymlp") == f"{configs.GENERIC}:toymlp"
    assert configs.load("toymlp", ["seed=2"]).dataset == "mnist"
  finally:
    del pruning.PRUNERS["toy/inverse"], models.MODELS["toymlp"]
    del sys.modules[first.__name__]
  broken = tmp_path / "broken.py"
  broken.write_text("raise RuntimeError('boom')\n")
  with pytest.raises(plugins.ImportFailedError, match=r"--import=.*broken.py.*RuntimeError: boom"):
    plugins.import_module(str(broken))
  with pytest.raises(plugins.ImportFailedError, match="no such file"):
    plugins.import_module(str(tmp_path / "absent.py"))
  with pytest.raises(plugins.ImportFailedError, match="cannot import module 'no_such_mod_x'"):
    plugins.import_module("no_such_mod_x")
  flagfile = tmp_path / "flags"
  flagfile.write_text("--import=no_such_mod_y\n")
  with pytest.raises(plugins.ImportFailedError, match="no_such_mod_y"):
    plugins.import_from_argv(["prog", "--other=1", f"--flagfile={flagfile}"])
  assert plugins.import_from_argv(["prog", "--config.seed=1"]) == []


def test_help_lists_config_fields_pruners_and_networks_after_import(toy):
  r = binary("prune_train", f"--import={toy}", "--help")
  text = r.stdout
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  for expected in (
    "--import",
    "--synthetic_data",
    "pruner='random/igq'",  # config fields with their defaults
    "train_steps=96000",
    "learning_rate=0.1",
    "toy/inverse",  # pruners, the imported one too
    "synflow",
    "rigl",
    "toymlp",  # networks
    "generic.py:<arch>",
  ):
    assert expected in " ".join(text.split()), expected
  r = binary("sweep", f"--import={toy}", "--help")
  text = " ".join(r.stdout.split())
  for expected in ("--import", "toy/inverse", "toymlp", "imp_rounds=5", "--extra_flags"):
    assert expected in text, expected
  r = binary("compression", f"--import={toy}", "--help")
  text = " ".join(r.stdout.split())
  for expected in ("--import", "toy/inverse", "toymlp", "--pruners"):
    assert expected in text, expected


@pytest.mark.parametrize(
  "args,message",
  [
    (["--config.prunr=x"], "--config.prunr: there is no field 'prunr'"),
    (
      [f"--config={configs.path('vgg16')}", "--config.prunr=x"],
      "did you mean --config.pruner?",
    ),
    (["--config=/nonexistent.py"], "--config='/nonexistent.py': no such config file"),
    (["--import=no_such_module_z"], "--import='no_such_module_z': cannot import"),
    (["--config.train_steps=abc"], "--config.train_steps=abc"),
  ],
)
def test_command_line_mistakes_are_one_line_usage_errors(args, message, tmp_path):
  r = binary("prune_train", *args, f"--out_dir={tmp_path}")
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  (line,) = [x for x in r.stderr.splitlines() if x.startswith("FATAL Flags parsing error")]
  assert message in line
  assert os.listdir(tmp_path) == []


def test_a_field_value_the_run_rejects_is_a_usage_error(tmp_path):
  r = binary("prune_train", "--config.pruner=snp", "--synthetic_data", f"--out_dir={tmp_path}")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "pruner='snp' is not a known pruner; allowed: " in r.stderr


def test_sweep_reports_a_mistyped_shared_field_as_a_usage_error(tmp_path):
  r = binary("sweep", "--extra_flags=--config.prunr=x", "--dry_run", f"--out_dir={tmp_path}")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "--config.prunr: there is no field 'prunr'" in r.stderr
  assert "did you mean --config.pruner?" in r.stderr
