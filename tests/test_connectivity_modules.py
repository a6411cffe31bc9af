"""The connectivity package's layering and the fence around JAX's internals, read from
the source (nothing imported)."""

import ast
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "sparsejax", "connectivity")
#: Each module imports only those before it (the kernels never import the semantics).
LAYERS = ["primitives", "program", "forest", "dims", "xla_cpu", "semantics", "sweeps", "rewrite"]


def _sparsejax_imports(source: str) -> list[str]:
  """Every sparsejax module named by an import in ``source`` (``from a import b``
  gives a and a.b)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparsejax"):
      found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      found += [a.name for a in node.names if a.name.startswith("sparsejax")]
  return found


def test_connectivity_modules_import_only_the_layers_before_them():
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(PACKAGE, "*.py")))
  assert names == sorted(LAYERS + ["__init__"])
  for i, name in enumerate(LAYERS):
    source = open(os.path.join(PACKAGE, f"{name}.py")).read()
    for module in _sparsejax_imports(source):
      if module.startswith("sparsejax.connectivity."):
        assert LAYERS.index(module.split(".")[2]) < i, f"{name} imports {module}"
    assert not re.search(r"^[ \t]+(from|import) sparsejax", source, re.M), (
      f"{name} imports inside a function"
    )
    assert len(source.splitlines()) <= 800, name


def test_jax_internals_are_imported_by_the_compat_module_only():
  paths = glob.glob(os.path.join(REPO, "sparsejax", "**", "*.py"), recursive=True)
  assert os.path.join(REPO, "sparsejax", "_jax_compat.py") in paths
  for path in paths:
    if not path.endswith("_jax_compat.py"):
      assert not re.search(r"\bjax\._src\b", open(path).read()), path
