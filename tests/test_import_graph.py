"""The import graph of the repository's packages has no cycle, and the plots import no
JAX.

Every module of sparsejax/ and experiments/ is parsed with ``ast``; an edge goes from a
module to each module of the two packages it imports, at module level or inside a
function (a function-local import that works around an order is still an edge), but
not under ``if TYPE_CHECKING:``. ``from package import name`` is an edge to
``package.name`` when that is a module, else to ``package`` (its ``__init__``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("sparsejax", "experiments")


def modules(package: str) -> dict[str, str]:
  """{dotted module name: file} of every module under ``package``."""
  out = {}
  for root, dirs, names in os.walk(os.path.join(REPO, package)):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
    for name in sorted(names):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = path
  return out


def _type_checking_only(node: ast.AST) -> bool:
  test = node.test if isinstance(node, ast.If) else None
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
  )


def _imports(tree: ast.AST):
  """Every Import/ImportFrom node, at any depth, except under ``if TYPE_CHECKING:``."""
  stack = [tree]
  while stack:
    node = stack.pop()
    if _type_checking_only(node):
      stack.extend(node.orelse)
      continue
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    stack.extend(ast.iter_child_nodes(node))


def edges(module: str, path: str, known: dict[str, str]) -> set[str]:
  """The package-internal modules ``module`` imports."""
  is_package = os.path.basename(path) == "__init__.py"
  out = set()
  for node in _imports(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    else:
      base = node.module or ""
      if node.level:  # relative: resolved against this module's package
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    for name in names:
      while name and name not in known:  # `import a.b.c` of a known a.b
        name = name.rpartition(".")[0]
      if name and name != module:
        out.add(name)
  return out


def graph(package: str) -> dict[str, set[str]]:
  known = {}
  for p in PACKAGES:
    known.update(modules(p))
  return {
    m: {e for e in edges(m, path, known) if e.split(".")[0] == package}
    for m, path in modules(package).items()
  }


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
  """One cycle of ``g`` (its modules, the first repeated at the end), or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(g.get(m, ())):
      if state.get(n) == "open":
        return stack[stack.index(n) :] + [n]
      if n not in state:
        cycle = visit(n)
        if cycle:
          return cycle
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(g):
    if m not in state:
      cycle = visit(m)
      if cycle:
        return cycle
  return None


def test_the_cycle_finder_finds_cycles_and_only_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
  known = {"pkg": "", "pkg.a": "", "pkg.b": "", "pkg.c": "", "pkg.sub": "", "pkg.sub.d": ""}
  source = tmp_path / "a.py"
  source.write_text(
    "from typing import TYPE_CHECKING\n"
    "from pkg import b\n"
    "if TYPE_CHECKING:\n  from pkg import sub\n"
    "def f():\n  from . import c\n  import pkg.sub.d\n"
  )
  assert edges("pkg.a", str(source), known) == {"pkg.b", "pkg.c", "pkg.sub.d"}


def test_experiments_have_no_import_cycle():
  g = graph("experiments")
  assert len(g) > 10 and "experiments.plot" in g
  cycle = find_cycle(g)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_has_no_import_cycle():
  g = graph("sparsejax")
  assert len(g) > 20 and "sparsejax.pruning" in g
  cycle = find_cycle(g)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_data_flows_one_way():
  """Data flows model -> scores -> ranking -> search -> pruning: nothing below imports
  what is above it (the design's chain), so the registry and the user API sit on top."""
  g = graph("sparsejax")
  below_pruning = [
    "sparsejax.masks",
    "sparsejax.tracing",
    "sparsejax.effective",
    "sparsejax.selection",
    "sparsejax.ranking",
    "sparsejax.search",
    "sparsejax.scores",
    "sparsejax.structured",
  ]

  def reach(m, seen=None):
    seen = set() if seen is None else seen
    for n in g.get(m, ()):
      if n not in seen:
        seen.add(n)
        reach(n, seen)
    return seen

  for m in below_pruning:
    up = reach(m) & {
      "sparsejax.pruning",
      "sparsejax.registry",
      "sparsejax.dynamic",
      "sparsejax.training",
      "sparsejax.optim",
    }
    assert not up, f"{m} reaches {sorted(up)}"


def test_import_sparsejax_loads_what_its_docstring_says():
  """`import sparsejax` loads the pruning path, and nothing of Optax, Orbax or
  TensorFlow: optim, dynamic, training, data, flops and timing load on first use."""
  code = (
    "import sys, sparsejax\n"
    "mods = set(sys.modules)\n"
    "print('LOADED', sorted(m for m in mods if m.startswith('sparsejax')))\n"
    "print('HEAVY', sorted(m for m in mods if m.split('.')[0] in\n"
    "      ('optax', 'orbax', 'tensorflow', 'tensorflow_datasets')))\n"
    "sparsejax.with_masks, sparsejax.training\n"
    "print('LATER', 'optax' in sys.modules, 'sparsejax.training' in sys.modules)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
  loaded = set(ast.literal_eval(lines["LOADED"]))
  eager = {
    "masks",
    "tracing",
    "connectivity",
    "effective",
    "quotas",
    "selection",
    "ranking",
    "search",
    "scores",
    "structured",
    "compact",
    "registry",
    "pruning",
    "models",
    "errors",
  }
  lazy = {"optim", "dynamic", "training", "data", "flops", "timing"}
  assert {f"sparsejax.{m}" for m in eager} <= loaded
  assert not {f"sparsejax.{m}" for m in lazy} & loaded
  assert lines["HEAVY"] == "[]"
  assert lines["LATER"] == "True True"


def test_plots_import_no_jax_flax_or_compactor(tmp_path):
  """``python -m experiments.plot`` reads result files only: run on an empty results
  folder, and on a small one, it loads no JAX, Flax or sparsejax.compact."""
  results = tmp_path / "results"
  curves = results / "init_curves" / "lenet300100"
  curves.mkdir(parents=True)
  (tmp_path / "empty").mkdir()  # a --results_dir that does not exist is an error
  header = open(os.path.join(REPO, "results", "init_curves", "lenet300100", "random-igq.csv"))
  with header, open(curves / "random-igq.csv", "w") as out:
    out.writelines(header.readlines()[:4])
  code = (
    "import sys\n"
    "from absl import flags\n"
    "from experiments import plot\n"
    "plot.define_flags()\n"
    "for folder in sys.argv[1:]:\n"
    "  flags.FLAGS.unparse_flags()\n"
    "  flags.FLAGS(['plot', '--results_dir=' + folder, '--figures_dir=' + folder + '/f',\n"
    "               '--doc=' + folder + '/results.md'])\n"
    "  plot.main([])\n"
    "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')\n"
    "               or m == 'sparsejax.compact' or m == 'sparsejax')\n"
    "print('HEAVY', heavy)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path / "empty"), str(results)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "HEAVY []" in out.stdout, out.stdout[-2000:]
  assert (results / "f" / "init_lenet300100.png").exists()  # it did draw
