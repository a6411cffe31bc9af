"""One fresh process pruning with `pruning.prune`'s two steps, timed and counted.

Run by benchmarks/effective_pruning.py as a child process (a user running the CLI
once): imports, model initialization, the ranking and the effective-target search,
each phase's wall time and XLA compilations (count, seconds, persistent-cache hits).
Prints one JSON line. Works against an older checkout of the library too (then the
model is initialized by Flax's eager ``model.init``, as before).

  python -m benchmarks.fresh_prune --arch=vgg19 --compression=100 --cache_dir=DIR
"""

from __future__ import annotations

import time

START = time.perf_counter()

# pylint: disable=wrong-import-position
import argparse
import importlib.util
import json
import os
import resource

import jax
import jax.numpy as jnp


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _compile_log():
  """sparsejax.compilation.CompileLog of this checkout (also when an older library
  comes first on the path)."""
  path = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sparsejax", "compilation.py"
  )
  spec = importlib.util.spec_from_file_location("_benchmark_compilation", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.CompileLog


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--arch", default="vgg19")
  parser.add_argument("--pruner", default="random/uniform")
  parser.add_argument("--compression", type=float, default=100.0)
  parser.add_argument("--cache_dir", default="", help="persistent cache; empty: off")
  args = parser.parse_args()
  CompileLog = _compile_log()  # pylint: disable=invalid-name
  if args.cache_dir:  # as the experiment binaries' --compilation_cache_dir does
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  from sparsejax import masks, models, pruning

  phases = {
    "import": {
      "s": time.perf_counter() - START,
      "cpu_s": _cpu_seconds(),
      "compiles": 0,
      "compile_s": 0.0,
      "cache_hits": 0,
    }
  }

  def phase(name, fn):
    start, cpu = time.perf_counter(), _cpu_seconds()
    with CompileLog() as log:
      out = jax.block_until_ready(fn())
    phases[name] = {
      "s": time.perf_counter() - start,
      "cpu_s": _cpu_seconds() - cpu,
      "compiles": log.count,
      "compile_s": log.seconds,
      "cache_hits": log.cache_hits,
      "names": log.names,
    }
    return out

  model, shape = models.create(args.arch), models.input_shape(args.arch)
  key = jax.random.key(0)
  if hasattr(models, "init"):
    variables = phase("init", lambda: models.init(model, key, shape))
  else:
    variables = phase("init", lambda: model.init(key, jnp.ones((1,) + shape)))
  sparsity = 1 - 1 / args.compression
  ranking = phase(
    "ranking",
    lambda: pruning.ranking_for(
      args.pruner,
      key=jax.random.key(1),
      model=model,
      variables=variables,
      sparsity=sparsity,
      input_shape=shape,
    ),
  )
  m = phase(
    "search",
    lambda: pruning.masks_from_ranking(
      ranking, sparsity, "effective", model=model, input_shape=shape, variables=variables
    ),
  )
  print(
    json.dumps(
      {
        "phases": phases,
        "total_s": time.perf_counter() - START,
        "total_cpu_s": _cpu_seconds(),
        "direct_compression": masks.compression(m),
      }
    )
  )


if __name__ == "__main__":
  main()
