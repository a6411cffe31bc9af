"""sparsejax as a library: the public import, registered pruners, configs, doctests."""

import doctest
import glob
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import sparsejax
from experiments import compression, configs, datasource, grid, prune_train
from sparsejax import effective, masks, optim, pruning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ public API


def test_every_public_name_exists_and_version_matches_pyproject():
  for name in sparsejax.__all__:
    assert getattr(sparsejax, name) is not None, name
  version = re.search(
    r'^version = "(.+)"', open(os.path.join(REPO, "pyproject.toml")).read(), re.M
  ).group(1)
  assert sparsejax.__version__ == version
  assert sparsejax.prune is pruning.prune and sparsejax.with_masks is optim.with_masks
  assert issubclass(sparsejax.UnreachableSparsityError, ValueError)


def test_import_brings_no_tensorflow():
  code = (
    "import sys, sparsejax; bad = [m for m in sys.modules if m.split('.')[0] in "
    "('tensorflow', 'tensorflow_datasets', 'experiments')]; print(bad)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"


def test_library_stands_alone():
  """Nothing under sparsejax/ imports experiments, and experiments is no installed
  top-level package (it runs from the repository root)."""
  for path in glob.glob(os.path.join(REPO, "sparsejax", "**", "*.py"), recursive=True):
    assert not re.search(r"^\s*(from|import) experiments", open(path).read(), re.M), path
  out = subprocess.run(
    [sys.executable, "-c", "import experiments"],
    capture_output=True,
    text=True,
    cwd="/",
    timeout=120,
  )
  assert out.returncode != 0 and "No module named 'experiments'" in out.stderr


@pytest.mark.parametrize("module", ["sparsejax.optim", "sparsejax.pruning", "sparsejax.effective"])
def test_docstring_examples_run(module):
  mod = __import__(module, fromlist=["_"])
  result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0, result
  assert "toy/inverse" not in pruning.PRUNERS


@pytest.mark.slow
def test_readme_library_example_runs():
  readme = open(os.path.join(REPO, "README.md")).read()
  section = readme.split("## Use it in your own training loop", 1)[1]
  code = section.split("```python", 1)[1].split("```", 1)[0]
  # The model definition included: a complete program a user can paste and run.
  assert len([line for line in code.splitlines() if line.strip()]) <= 25
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    cwd="/",
    timeout=600,
    env={**os.environ, "PYTHONPATH": REPO},  # this checkout, not an installed copy
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "effective compression" in out.stdout


def test_readme_quick_start_and_structured_examples_run():
  """The first two examples of the README (effective pruning, then structured pruning
  and compaction continuing it) run as one program on this checkout."""
  readme = open(os.path.join(REPO, "README.md")).read()
  head = readme.split("## Use it in your own training loop", 1)[0]
  blocks = [b.split("```", 1)[0] for b in head.split("```python")[1:]]
  assert len(blocks) == 2 and "sparsejax.trace" in blocks[0] and "compact" in blocks[1]
  out = subprocess.run(
    [sys.executable, "-c", "\n".join(blocks)],
    capture_output=True,
    text=True,
    cwd="/",
    timeout=600,
    env={**os.environ, "PYTHONPATH": REPO},
  )
  assert out.returncode == 0, out.stderr[-3000:]
  first, second = out.stdout.splitlines()[-2:]
  direct, effective_c = (float(v) for v in first.split())
  assert effective_c == 100.0 and 90 < direct < 100  # effective pruning keeps more weights
  compression, hidden = second.split(" ", 1)
  assert float(compression) >= 10 and hidden.startswith("(")  # fewer neurons: (a, b)


# ----------------------------------------------------------- registered pruners


def _toy_score(c: pruning.ScoreContext):
  """Keeps the weights closest to zero first: deliberately unlike any built-in."""
  return masks.map_prunable(lambda w: -jnp.abs(w), c.params, prunable=c.prunable)


@pytest.fixture
def toy_pruner():
  p = pruning.register_pruner(pruning.Pruner("toy/inverse", _toy_score, quota="erk"))
  yield p
  del pruning.PRUNERS["toy/inverse"]


def test_registered_pruner_prunes_both_types(toy_pruner):
  from sparsejax import models

  model = models.create("lenet300100")
  variables = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
  kw = dict(
    key=jax.random.key(1), model=model, variables=variables, sparsity=0.99, input_shape=(28, 28, 1)
  )
  direct = sparsejax.prune("toy/inverse", pruning_type="direct", **kw)
  assert masks.compression(direct) == pytest.approx(100, rel=1e-3)
  kept = [
    w[m]
    for w, m in zip(
      masks.mask_leaves(masks.map_masks(lambda m, w: w, direct, variables["params"])),
      masks.mask_leaves(direct),
    )
  ]
  assert max(float(jnp.max(jnp.abs(k))) for k in kept) < 0.05  # the smallest weights
  eff = sparsejax.prune("toy/inverse", pruning_type="effective", **kw)
  assert effective.effective_compression(model, eff, (28, 28, 1)) >= 100 * (1 - 1e-9)


def test_registered_pruner_runs_through_the_compression_job_and_prune_train(toy_pruner, tmp_path):
  rows = compression.sweep(
    "lenet300100", ["toy/inverse"], ["direct", "effective"], [10.0, 100.0], seed=0
  )
  assert [r["status"] for r in rows] == ["ok"] * 4
  config = configs.load(
    "lenet300100",
    [
      "pruner=toy/inverse",
      "compression=10",
      "pruning_type=effective",
      "train_steps=10",
      "eval_every=10",
      "log_every=10",
    ],
  )
  r = prune_train.run(
    config, out_dir=str(tmp_path), source=datasource.DataSource(synthetic=True, num_examples=256)
  )
  assert r["status"] == "ok" and r["effective_compression"] >= 10 * (1 - 1e-9)
  assert grid.grid(["lenet300100"], ["toy/inverse"], [10.0], ["direct"], [0])


def test_registry_rejects_bad_pruners():
  with pytest.raises(ValueError, match="already registered"):
    pruning.register_pruner(pruning.Pruner("snip", _toy_score))
  with pytest.raises(ValueError, match="default_rounds"):
    pruning.Pruner("toy/iter", _toy_score, iterative=True)
  with pytest.raises(ValueError, match="not callable"):
    pruning.Pruner("toy/str", "magnitude")
  with pytest.raises(ValueError, match="quota="):
    pruning.Pruner("toy/q", _toy_score, quota="nope")
  assert pruning.get_pruner("synflow").default_rounds == 100
  assert pruning.get_pruner("random/synflow").target_dependent
  assert not pruning.get_pruner("random/igq").target_dependent


def test_rounds_come_as_an_argument_or_as_the_older_score_kwargs():
  from sparsejax import models

  model = models.create("lenet300100")
  variables = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
  kw = dict(
    key=jax.random.key(1), model=model, variables=variables, sparsity=0.9, input_shape=(28, 28, 1)
  )
  a = pruning.ranking_for("synflow", rounds=2, **kw)
  b = pruning.ranking_for("synflow", score_kwargs={"rounds": 2}, **kw)
  assert all(bool(jnp.array_equal(x, y)) for x, y in zip(a.order, b.order))
  with pytest.raises(ValueError, match="not both"):
    pruning.ranking_for("synflow", rounds=2, score_kwargs={"rounds": 3}, **kw)


def test_unreachable_targets_raise_a_typed_error_with_the_reachable_limit():
  from sparsejax import models

  model = models.create("lenet300100")
  variables = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
  with pytest.raises(sparsejax.UnreachableSparsityError) as info:
    sparsejax.prune(
      "random/uniform",
      key=jax.random.key(1),
      model=model,
      variables=variables,
      sparsity=1 - 1e-6,
      pruning_type="effective",
      input_shape=(28, 28, 1),
    )
  assert 0.99 < info.value.max_sparsity < 1 - 1e-6
  assert info.value.max_compression == pytest.approx(1 / (1 - info.value.max_sparsity))


# --------------------------------------------------------------------- configs


@pytest.mark.parametrize("arch", configs.archs())
def test_every_network_config_loads(arch):
  c = configs.load(arch)
  assert c.arch == arch and c.dataset == sparsejax.models.get_spec(arch).dataset
  t = configs.train_config(c)
  assert t == configs.CONFIGS[arch] and t.train_steps > 10_000
  assert configs.load(configs.path(arch), ["train_steps=7"]).train_steps == 7


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="there is no field 'lr'"):
    configs.load("lenet300100", ["lr=0.1"])
  with pytest.raises(ValueError, match="train_steps=abc"):
    configs.load("lenet300100", ["train_steps=abc"])
  with pytest.raises(ValueError, match="arch='lenet'"):
    configs.load("lenet")


@pytest.mark.slow
def test_command_line_override_reaches_the_run(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "experiments.prune_train",
    "--config=experiments/configs/lenet300100.py",
    "--config.pruner=random/uniform",
    "--config.compression=10",
    "--config.train_steps=6",
    "--config.eval_every=3",
    "--config.log_every=3",
    "--config.learning_rate=0.05",
    "--synthetic_data",
    f"--out_dir={tmp_path}",
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  (path,) = glob.glob(str(tmp_path / "*" / "result.json"))
  result = json.load(open(path))
  assert result["config"]["train"]["train_steps"] == 6
  assert result["config"]["train"]["learning_rate"] == 0.05
  assert result["config"]["experiment"]["eval_every"] == 3
  assert [h["step"] for h in result["history"]] == [3, 6]
