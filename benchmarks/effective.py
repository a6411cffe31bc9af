"""Benchmark: exact effective masks against a dense forward+backward pass.

For LeNet-300-100, VGG-19 and ResNet-18 with uniform random masks at 10x, 100x and
1000x direct compression, times (medians after compilation, measured in one run):
- `effective_masks` (public API: validation, one jitted connectivity sweep, result);
- one jitted dense forward+backward pass of the same network at batch size 1
  (cross-entropy gradient with respect to all parameters, batch norm in training mode);
and their ratio. Target: ratio <= 1.5 on VGG-19 and ResNet-18. The paper's reference
implementation needs about 0.05 s, 1 s and 0.5 s per computation on a 2-core CPU.

Second table (issue 10): the connectivity transform of the traced program against the
mode-based sweep it replaced (benchmarks/old_sweep.py, a copy of the old path), both
jitted, timed alternately in the same run on VGG-19 and ResNet-18, with and without
unit counts (the search uses the latter); target ratio <= 1.05. Also the one-time cost
of tracing (jaxpr + classification) and of compiling the transformed sweep.

  python -m benchmarks.effective            # prints the tables, updates docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import old_sweep
from benchmarks import report
from sparsejax import effective, masks, models

OLD_MODELS = {"vgg19": lambda: old_sweep.VGG(config=old_sweep.VGG19, num_classes=100),
              "resnet18": lambda: old_sweep.ResNet18(num_classes=200)}


def _alternating_medians(fns, repeats):
  """Medians of each fn's wall time, calls interleaved (fair under shared CPUs)."""
  for fn in fns:
    jax.block_until_ready(fn())
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[i].append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def transform_vs_old(archs, compressions, repeats):
  """Rows: network, compression, units?, old ms, transform ms, ratio, trace s, compile s."""
  rows = []
  for arch in archs:
    model, shape = models.create(arch), models.input_shape(arch)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1,) + shape))["params"]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    for units in (True, False):
      effective._trace_cached.cache_clear()
      start = time.perf_counter()
      traced = effective.trace(model, shape)
      trace_s = time.perf_counter() - start
      new = jax.jit(effective.sweep_of(traced, units))
      old = jax.jit(old_sweep.connectivity_sweep(OLD_MODELS[arch](), shape, units))
      m0 = masks.random(jax.random.key(1), zeros, 0.9)
      start = time.perf_counter()
      new.lower(m0).compile()
      compile_s = time.perf_counter() - start
      for c in compressions:
        m = masks.random(jax.random.key(1), zeros, 1 - 1 / c)
        t_old, t_new = _alternating_medians([lambda: old(m), lambda: new(m)], repeats)
        rows.append([arch, f"{c:g}x", "yes" if units else "no", f"{t_old * 1e3:.1f}",
                     f"{t_new * 1e3:.1f}", f"{t_new / t_old:.3f}", f"{trace_s:.2f}",
                     f"{compile_s:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
  return rows

REFERENCE_SECONDS = {"lenet300100": 0.05, "vgg19": 1.0, "resnet18": 0.5}


def dense_step(model, variables, input_shape, num_classes):
  x = jnp.ones((1,) + input_shape)
  y = jnp.zeros((1,), jnp.int32)

  @jax.jit
  def grad(params, batch_stats, x, y):
    def loss(p):
      logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jax.grad(loss)(params)

  return lambda: grad(variables["params"], variables["batch_stats"], x, y)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--archs", default="lenet300100,vgg19,resnet18")
  parser.add_argument("--compressions", default="10,100,1000")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--no_doc", action="store_true", help="do not update docs/")
  parser.add_argument("--transform_only", action="store_true",
                      help="only the transform vs old sweep table")
  args = parser.parse_args()
  compressions = [float(c) for c in args.compressions.split(",")]
  big = [a for a in args.archs.split(",") if a in OLD_MODELS]
  t_rows = transform_vs_old(big, compressions, args.repeats)
  t_table = report.markdown_table(
      ["network", "direct", "units", "old sweep ms", "transform ms", "ratio", "trace s",
       "compile s"], t_rows)
  print(t_table)
  if not args.no_doc:
    report.update_section("effective_transform", f"""
## Connectivity transform vs the mode-based sweep (`python -m benchmarks.effective`)

{report.stamp()}. Uniform random masks (seed 1), medians of {args.repeats} alternating
runs after compilation, both jitted: *old sweep* = the connectivity mode of the zoo's
layers as before issue 10 (a copy in benchmarks/old_sweep.py), *transform* = the
connectivity transform of the traced standard model (sparsejax.connectivity); *units*:
with active-unit counts (``effective.connectivity``) or masks only (the effective-target
search). Target ratio <= 1.05. *trace s*: tracing to a jaxpr, inlining and classifying
(once per model, input shape and variable shapes); *compile s*: XLA compilation of the
transformed sweep (once per traced model and mask structure).

{t_table}
""")
  if args.transform_only:
    return
  rows = []
  for arch in args.archs.split(","):
    model = models.create(arch)
    shape = models.input_shape(arch)
    variables = model.init(jax.random.key(0), jnp.ones((1,) + shape))
    dense = report.median_seconds(dense_step(model, variables, shape, None), args.repeats)
    for c in compressions:
      m = masks.random(jax.random.key(1), variables["params"], 1 - 1 / c)
      t = report.median_seconds(lambda: effective.effective_masks(model, m, shape),
                                args.repeats)
      eff = effective.effective_compression(model, m, shape)
      rows.append([arch, f"{c:g}x", "disconnected" if eff == float("inf") else f"{eff:.4g}x", f"{t * 1e3:.1f}", f"{dense * 1e3:.1f}",
                   f"{t / dense:.2f}", f"{REFERENCE_SECONDS[arch] * 1e3:.0f}",
                   f"{REFERENCE_SECONDS[arch] / t:.0f}x"])
      print(" | ".join(rows[-1]), flush=True)
  header = ["network", "direct", "effective", "effective_masks ms", "dense fwd+bwd ms",
            "ratio", "paper's reference ms", "speed-up"]
  table = report.markdown_table(header, rows)
  print(table)
  if not args.no_doc:
    report.update_section("effective", f"""
## Exact effective masks (`python -m benchmarks.effective`)

{report.stamp()}. Uniform random masks (seed 1), medians of {args.repeats} runs after
compilation. *ratio* = `effective_masks` / one jitted dense forward+backward pass at
batch size 1 measured in the same run (target <= 1.5 on VGG-19 and ResNet-18); the
paper's reference needs about 1 s (VGG-19), 0.5 s (ResNet-18) and 0.05 s (LeNet-300-100)
on a 2-core CPU of this kind.

{table}
""")


if __name__ == "__main__":
  main()
