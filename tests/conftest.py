"""Shared fixtures: real MNIST prepared offline by TFDS from the raw files beside the
checkout (../shared/data/mnist), once per test session; JAX's persistent compilation
cache shared by the test processes."""

from __future__ import annotations

import os
import pathlib
import tempfile

# XLA:CPU's LLVM at -O1 for every program the tests compile (the library's own programs
# already use it, sparsejax.compilation): most of the suite's time is compilation, and
# -O1 compiles 2-3x faster. Set before JAX creates its CPU client; a user's XLA_FLAGS
# that name a level are kept. tests/test_structured.py and test_compact_models.py into
# an empty compilation cache (2 cores): 196 s at -O3, 157 s at -O1.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1"
  ).strip()

import pytest  # noqa: E402

from experiments import compilation_cache  # noqa: E402
from sparsejax import data  # noqa: E402

#: Where the test processes share compiled programs (kept between runs on one machine).
JAX_CACHE = pathlib.Path(tempfile.gettempdir()) / f"sparsejax-tests-jax-cache-{os.getuid()}"


def pytest_configure(config):
  """Turns on JAX's persistent compilation cache for the test processes and the
  processes they start (unless JAX_COMPILATION_CACHE_DIR names one already): most of
  the suite's time is compilation, and test modules on different xdist workers (or
  after ``jax.clear_caches()``) compile the same programs (the zoo's train steps,
  scores, sweeps). Measured on tests/test_structured.py and test_compact_models.py
  (2 cores): 189 s without, 196 s into an empty cache, 57 s from a filled one."""
  directory = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(JAX_CACHE))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  compilation_cache.enable(directory)


MNIST_RAW = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_tfds(tmp_path_factory) -> dict:
  """``load_split`` keyword arguments for real MNIST (data_dir, manual_dir); skips when the
  raw files are absent (a user's fresh clone has no offline copy; CI always has it)."""
  if not all((MNIST_RAW / f).exists() for f in data.get_spec("mnist").manual_files):
    pytest.skip(
      f"raw MNIST files not found in {MNIST_RAW} (only present beside the "
      "project's own checkout; a fresh clone has no offline copy)"
    )
  return dict(data_dir=str(tmp_path_factory.mktemp("tfds_mnist")), manual_dir=str(MNIST_RAW))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops JAX's compiled programs after every test module. XLA:CPU maps memory for
  each executable it keeps; over the whole suite (600+ tests, thousands of programs)
  the process reached Linux's vm.max_map_count (65,530 mappings) and crashed at the
  end of a CI run (segfault in libgcc_s's unwinder, then SIGABRT, always at the same
  test). Modules share nothing compiled, so clearing between them costs only their
  own recompilation."""
  yield
  import jax

  jax.clear_caches()


@pytest.fixture(scope="module")
def one_ray_at_a_time():
  """Holds a machine-wide lock for a test module that starts Ray: the README's command
  runs test files in parallel (pytest-xdist), and two local Ray instances starting at
  once would compete for the same ports and /tmp/ray session folder."""
  import fcntl
  import tempfile

  with open(pathlib.Path(tempfile.gettempdir(), "sparsejax-tests-ray.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
