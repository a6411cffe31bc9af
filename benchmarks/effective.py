"""Benchmark: exact effective masks against a dense forward+backward pass.

For LeNet-300-100, VGG-19, ResNet-18 and the transformers (the zoo's ViT and GPT, and
a 6-layer width-256 GPT-style decoder at context 256) with uniform random masks at 10x,
100x and 1000x direct compression, times (medians after compilation, measured in one run):
- `effective_masks` (public API: validation, one jitted connectivity sweep, result);
- one jitted dense forward+backward pass of the same network at batch size 1
  (cross-entropy gradient with respect to all parameters, batch norm in training mode);
and their ratio. Target: ratio <= 1.5 on VGG-19 and ResNet-18. The paper's reference
implementation needs about 0.05 s, 1 s and 0.5 s per computation on a 2-core CPU.
For the transformers (``--archs=vit,gpt,gpt-6x256``, their own section) also the
effective-target search to 100x, warm.

Second table: the connectivity transform's sweep on VGG-19 and ResNet-18 with its
XLA:CPU kernels (sparsejax.connectivity.xla_cpu) against the same sweep with XLA's
convolutions and gradients, all jitted and timed alternately in the same run, with and
without unit counts (the search uses the latter); also the one-time cost of tracing
(jaxpr + classification) and of compiling the sweep, and a profile per convolution.
(Until issue 24 it also timed the mode-based sweep the transform replaced, a copy kept
in benchmarks/old_sweep.py; docs/benchmarks.md keeps those figures as measured.)

  python -m benchmarks.effective            # prints the tables, updates docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax
from benchmarks import report
from sparsejax import compilation, effective, masks, models, pruning, timing, tracing
from sparsejax.connectivity import program, xla_cpu

#: The convolutional networks of the transform's tables.
CONV_ARCHS = ("vgg19", "resnet18")


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


def _compile(fn, example, max_positions=None, kernel_grad_patches=True):
  """``fn`` compiled as the library compiles its sweep; ``max_positions`` overrides
  xla_cpu.MAX_POSITIONS while tracing (0: every convolution as XLA's);
  ``kernel_grad_patches=False``: every kernel gradient XLA's (before
  ``xla_cpu.conv_patches_kernel_grad``)."""
  saved = xla_cpu.MAX_POSITIONS, xla_cpu.MAX_KERNEL_GRAD_PATCHES
  if max_positions is not None:
    xla_cpu.MAX_POSITIONS = max_positions
  if not kernel_grad_patches:
    xla_cpu.MAX_KERNEL_GRAD_PATCHES = 0
  try:
    options = compilation.CPU_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(fn).lower(example).compile(options)
  finally:
    xla_cpu.MAX_POSITIONS, xla_cpu.MAX_KERNEL_GRAD_PATCHES = saved


def _gflop(compiled) -> float:
  """XLA's count of floating-point operations of a compiled program, in 1e9."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) / 1e9


def matmul_gflops(repeats: int, n: int = 2048) -> float:
  """The machine's float32 matrix-product rate (1e9 FLOP/s), an n x n product: the
  ceiling the sweep's arithmetic is compared with."""
  a = jnp.ones((n, n), jnp.float32)
  product = jax.jit(lambda a: a @ a)
  return 2 * n**3 / report.median_seconds(lambda: product(a), repeats) / 1e9


def _convolutions(traced, example):
  """(eqn, lhs shape, rhs shape) of every convolution the reachability sweep runs."""
  found, saved = [], xla_cpu.reach_linear

  def record(e, x, w):
    if e.prim.name == "conv_general_dilated":
      found.append((e, tuple(x.shape), tuple(w.shape)))
    return saved(e, x, w)

  xla_cpu.reach_linear = record  # the semantics' one hook into the kernels
  try:
    jax.eval_shape(effective.sweep_of(traced, units=False), example)
  finally:
    xla_cpu.reach_linear = saved
  return found


def layer_profile(archs, repeats):
  """Rows per convolution of the sweep: forward, input-gradient and kernel-gradient
  ms of XLA's convolution and of the patches product, on binary values at batch 1."""
  rows = []
  for arch in archs:
    model, shape = models.create(arch), models.input_shape(arch)
    traced = sparsejax.trace(model, shape)
    example = masks.random(jax.random.key(1), traced.ones(), 0.99)
    for n, (e, xs, ws) in enumerate(_convolutions(traced, example)):
      keys = jax.random.split(jax.random.key(n), 3)
      x = (jax.random.uniform(keys[0], xs) > 0.5).astype(jnp.float32)
      w = (jax.random.uniform(keys[1], ws) > 0.99).astype(jnp.float32)
      ops = {
        "conv": lambda a, b, e=e: program.bind(e, a, b, preferred_element_type=jnp.float32)[0],
        "patches": lambda a, b, e=e: xla_cpu.conv_as_patches(e, a, b, 1 << 30),
      }
      y = ops["conv"](x, w)
      g = (jax.random.uniform(keys[2], y.shape) > 0.5).astype(jnp.float32)
      times = {"patches": [float("nan")] * 3}  # nan: no patches product (too large)
      for name, op in ops.items():
        if op(x, w) is None:
          continue
        # x, w and g are arguments, not constants XLA could fold into the program.
        fwd = jax.jit(op)
        dx = jax.jit(lambda a, b, gg, op=op: jax.vjp(lambda t: op(t, b), a)[1](gg)[0])
        dw = jax.jit(lambda a, b, gg, op=op: jax.vjp(lambda t: op(a, t), b)[1](gg)[0])
        times[name] = [
          report.median_seconds(lambda: fwd(x, w), repeats) * 1e3,
          report.median_seconds(lambda: dx(x, w, g), repeats) * 1e3,
          report.median_seconds(lambda: dw(x, w, g), repeats) * 1e3,
        ]
      kernel_grad = jax.jit(
        lambda a, b, gg, e=e: jax.vjp(lambda t: xla_cpu.conv_patches_kernel_grad(e, a, t), b)[1](
          gg
        )[0]
      )
      times["conv"].append(report.median_seconds(lambda: kernel_grad(x, w, g), repeats) * 1e3)
      positions = int(np.prod(y.shape[1:-1]))
      used = "patches" if positions <= xla_cpu.MAX_POSITIONS else "conv, patches kernel-grad"
      rows.append(
        [
          arch,
          n,
          f"{xs[1]}x{xs[2]}x{xs[3]} -> {ws[-1]}",
          positions,
          *[f"{t:.2f}" for t in times["conv"]],
          *["-" if t != t else f"{t:.2f}" for t in times["patches"]],
          used,
        ]
      )
      print(" | ".join(str(r) for r in rows[-1]), flush=True)
  return rows


def transform_variants(archs, compressions, repeats):
  """Rows: network, compression, units?, ms of the transform with XLA's convolutions
  only, with XLA's kernel gradients, and as the library runs it; the ratio of the last
  two; GFLOP of one sweep and its rate; trace s; compile s."""
  rows = []
  for arch in archs:
    model, shape = models.create(arch), models.input_shape(arch)
    for units in (True, False):
      tracing._traced.cache_clear()
      start = time.perf_counter()
      traced = sparsejax.trace(model, shape)
      trace_s = time.perf_counter() - start
      dense = traced.ones()
      m0 = masks.random(jax.random.key(1), dense, 0.9)
      # A new function each: jit caches the trace of one function object, and the
      # variants differ in module constants read while tracing.
      sweep = lambda: effective.sweep_of(traced, units)
      convs = _compile(sweep(), m0, max_positions=0, kernel_grad_patches=False)
      before = _compile(sweep(), m0, kernel_grad_patches=False)
      start = time.perf_counter()
      new = _compile(sweep(), m0)
      compile_s = time.perf_counter() - start
      gflop = _gflop(new)
      for c in compressions:
        m = masks.random(jax.random.key(1), dense, 1 - 1 / c)
        t_conv, t_before, t_new = _alternating_medians(
          [lambda: convs(m), lambda: before(m), lambda: new(m)], repeats
        )
        want = jax.tree.leaves(convs(m))
        for other in (before, new):
          assert all(
            bool(jnp.array_equal(a, b)) for a, b in zip(want, jax.tree.leaves(other(m)))
          ), "a variant changed the sweep's result"
        rows.append(
          [
            arch,
            f"{c:g}x",
            "yes" if units else "no",
            f"{t_conv * 1e3:.1f}",
            f"{t_before * 1e3:.1f}",
            f"{t_new * 1e3:.1f}",
            f"{t_new / t_before:.3f}",
            f"{gflop:.2f}",
            f"{gflop / t_new:.0f}",
            f"{trace_s:.2f}",
            f"{compile_s:.2f}",
          ]
        )
        print(" | ".join(rows[-1]), flush=True)
  return rows


REFERENCE_SECONDS = {"lenet300100": 0.05, "vgg19": 1.0, "resnet18": 0.5}


def dense_step(model, variables, example):
  """One jitted dense forward+backward pass at ``example`` (a shape struct, batch
  included): the cross-entropy gradient with respect to all parameters (batch norm in
  training mode; a language model's loss over every position)."""
  x = jnp.ones(example.shape, example.dtype)
  batch_stats = variables.get("batch_stats")

  @jax.jit
  def grad(params, batch_stats, x):
    def loss(p):
      if batch_stats is None:
        logits = model.apply({"params": p}, x, train=True)
      else:
        logits, _ = model.apply(
          {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
      labels = jnp.zeros(logits.shape[:-1], jnp.int32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.grad(loss)(params)

  return lambda: grad(variables["params"], batch_stats, x)


#: The transformers' rows (issue 25): the zoo's ViT and byte-level GPT, and a larger
#: GPT-style decoder (6 layers, width 256, 8 heads, context 256, 4.9M parameters).
TRANSFORMERS = {
  "vit": lambda: (models.create("vit"), models.example_input("vit")),
  "gpt": lambda: (models.create("gpt"), models.example_input("gpt")),
  "gpt-6x256": lambda: (
    models.GPT(context=256, width=256, depth=6, heads=8),
    jax.ShapeDtypeStruct((1, 256), jnp.int32),
  ),
}


#: The least repeats of the side-by-side timing of effective_masks and the dense step.
_SMALL_REPEATS = 31


def network(arch):
  """(module, example input [1, ...]) of a zoo network or of :data:`TRANSFORMERS`."""
  if arch in TRANSFORMERS:
    return TRANSFORMERS[arch]()
  return models.create(arch), jax.ShapeDtypeStruct((1, *models.input_shape(arch)), jnp.float32)


def search_seconds(traced, variables, compression, repeats):
  """Median seconds of ``pruning.prune('random/igq', pruning_type='effective')`` to
  ``compression`` effective, warm (after a first call compiled it), and the effective
  compression it reached."""
  run = lambda seed: pruning.prune(
    "random/igq",
    key=jax.random.key(seed),
    model=traced,
    variables=variables,
    sparsity=1 - 1 / compression,
    pruning_type="effective",
  )
  m = jax.block_until_ready(run(0))
  seconds = report.median_seconds(lambda: run(1), repeats)
  return seconds, effective.effective_compression(traced, m)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  # CNN rows go to the section "effective", transformer rows (--archs=vit,gpt,gpt-6x256)
  # to "effective_transformers"
  parser.add_argument("--archs", default="lenet300100,vgg19,resnet18")
  parser.add_argument("--compressions", default="10,100,1000")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--no_doc", action="store_true", help="do not update docs/")
  parser.add_argument(
    "--transform_only", action="store_true", help="only the transform's kernel tables"
  )
  parser.add_argument("--skip_profile", action="store_true", help="no per-convolution profile")
  args = parser.parse_args()
  compressions = [float(c) for c in args.compressions.split(",")]
  big = [a for a in args.archs.split(",") if a in CONV_ARCHS]
  t_rows = transform_variants(big, compressions, args.repeats)
  peak = matmul_gflops(args.repeats)
  t_table = report.markdown_table(
    [
      "network",
      "direct",
      "units",
      "XLA convolutions ms",
      "XLA kernel gradients ms",
      "transform ms",
      "ratio to XLA kernel gradients",
      "GFLOP",
      "GFLOP/s",
      "trace s",
      "compile s",
    ],
    t_rows,
  )
  print(t_table)
  p_table = ""
  if not args.skip_profile:
    p_rows = layer_profile(big, max(3, args.repeats // 2))
    p_table = report.markdown_table(
      [
        "network",
        "conv",
        "input -> channels",
        "positions",
        "conv fwd ms",
        "conv input-grad ms",
        "conv kernel-grad ms",
        "conv kernel-grad as patches product ms",
        "patches fwd ms",
        "patches input-grad ms",
        "patches kernel-grad ms",
        "sweep uses",
      ],
      p_rows,
    )
    print(p_table)
  if big and not args.no_doc:
    report.update_section(
      "effective_kernels",
      f"""
## Connectivity transform: XLA:CPU kernels (`python -m benchmarks.effective`)

{report.stamp()}. Uniform random masks (seed 1), medians of {args.repeats} alternating
runs after compilation, all jitted: the connectivity transform of the traced standard
model (sparsejax.connectivity); *units*: with active-unit counts
(``effective.connectivity``) or masks only (the effective-target search). *trace s*:
tracing to a jaxpr, inlining and classifying (once per model, input shape and variable
shapes); *compile s*: XLA compilation of the sweep (once per traced model and mask
structure). *XLA convolutions*: the transform with every convolution and its gradients
XLA's (before issue 15); *XLA kernel gradients*: convolutions with at most
{xla_cpu.MAX_POSITIONS} output positions as one patches-times-kernel product
(`xla_cpu.conv_as_patches`), the others XLA's with XLA's gradients; *transform* (the
library): as that, with the kernel gradients of the others as one
patches-transposed-times-cotangent product (`xla_cpu.conv_patches_kernel_grad`). Masks
and unit counts checked equal across the three. *GFLOP*: XLA's count for one sweep of
the transform; *GFLOP/s*: that over its time, against a {peak:.0f} GFLOP/s float32
matrix product (2048 x 2048) measured in the same run, the machine's ceiling for this
arithmetic. Issue 15 targets: one sweep of VGG-19 <= 60 ms, ResNet-18 <= 50 ms. (The
comparison with the mode-based sweep, removed in issue 24, is the historical section
"Connectivity transform vs the mode-based sweep".)

{t_table}

Per convolution of the sweep (binary values, batch 1, medians): where the time goes,
forward, input-gradient (coreach) and kernel-gradient (potential) of XLA's convolution
against the patches product, and the kernel gradient as one patches-transposed product
(`xla_cpu.conv_patches_kernel_grad`). XLA:CPU's convolutions at few positions (4x4,
2x2) are 10-100x slower than the product of the same arithmetic; large images favor
the convolution, except for its kernel gradient.

{p_table}
""",
    )
  if args.transform_only:
    return
  rows, search_rows = [], []
  for arch in args.archs.split(","):
    model, example = network(arch)
    variables = models.init(model, jax.random.key(0), example)
    dense_fn = dense_step(model, variables, example)
    traced = sparsejax.trace(model, example, variables=variables)
    ones = traced.ones()
    for c in compressions:
      m = masks.random(jax.random.key(1), ones, 1 - 1 / c)
      sweep_fn = lambda m=m: effective.effective_masks(traced, m)
      for fn in (dense_fn, sweep_fn):  # compile and warm up
        jax.block_until_ready(fn())
      # Side by side, in turns: a millisecond program's median moves between processes
      # and minutes (thread wake-ups), so the two are timed interleaved, many times.
      timed = timing.alternate(
        {"dense": dense_fn, "sweep": sweep_fn}, repeats=max(args.repeats, _SMALL_REPEATS)
      )
      t, dense = timed["sweep"], timed["dense"]
      eff = effective.effective_compression(traced, m)
      reference = REFERENCE_SECONDS.get(arch)
      rows.append(
        [
          arch,
          f"{c:g}x",
          "disconnected" if eff == float("inf") else f"{eff:.4g}x",
          f"{t * 1e3:.1f}",
          f"{dense * 1e3:.1f}",
          f"{t / dense:.2f}",
          "-" if reference is None else f"{reference * 1e3:.0f}",
          "-" if reference is None else f"{reference / t:.0f}x",
        ]
      )
      print(" | ".join(rows[-1]), flush=True)
    if arch in TRANSFORMERS:
      seconds, reached = search_seconds(traced, variables, 100.0, args.repeats)
      search_rows.append([arch, f"{seconds:.2f}", f"{reached:.4g}x"])
      print(" | ".join(search_rows[-1]), flush=True)
  header = [
    "network",
    "direct",
    "effective",
    "effective_masks ms",
    "dense fwd+bwd ms",
    "ratio",
    "paper's reference ms",
    "speed-up",
  ]
  cnn_rows = [r for r in rows if r[0] not in TRANSFORMERS]
  t_rows = [r[:6] for r in rows if r[0] in TRANSFORMERS]  # no reference for these
  table = report.markdown_table(header, cnn_rows)
  transformer_table = report.markdown_table(header[:6], t_rows)
  search_table = report.markdown_table(
    ["network", "search to 100x effective, warm s", "effective reached"], search_rows
  )
  for name, text in (("CNNs", table), ("transformers", transformer_table)):
    print(name, text, "", sep="\n")
  if search_rows:
    print(search_table)
  if cnn_rows and not args.no_doc:
    report.update_section(
      "effective",
      f"""
## Exact effective masks (`python -m benchmarks.effective`)

{report.stamp()}. Uniform random masks (seed 1), medians of
{max(args.repeats, _SMALL_REPEATS)} alternating runs (effective_masks, dense) after
compilation. *ratio* = `effective_masks` / one jitted dense forward+backward pass at
batch size 1 measured in the same run (target <= 1.5 on VGG-19 and ResNet-18); the
paper's reference needs about 1 s (VGG-19), 0.5 s (ResNet-18) and 0.05 s (LeNet-300-100)
on a 2-core CPU of this kind.

{table}
""",
    )
  if t_rows and not args.no_doc:
    report.update_section(
      "effective_transformers",
      f"""
## Exact effective masks of transformers (`benchmarks.effective --archs=vit,gpt,gpt-6x256`)

{report.stamp()}. Issue 25: the zoo's ViT (patch 7, width 64, depth 4, 4 heads) and
byte-level GPT (context 128, width 128, depth 4, 4 heads), and a larger GPT-style
decoder (*gpt-6x256*: 6 layers, width 256, 8 heads, context 256), at batch 1 (one
image, one window of token ids). Uniform random masks (seed 1), medians of
{max(args.repeats, _SMALL_REPEATS)} alternating runs (effective_masks, dense) after
compilation; *ratio* = `effective_masks` / one jitted dense
forward+backward pass measured in the same run (the decoders' loss: next-byte
cross-entropy at every position). Target: ratio <= 1.5, as for the CNNs. (The paper's
reference has no rule for embeddings or attention.)

{transformer_table}

The effective-target search (`pruning.prune('random/igq', pruning_type='effective',
sparsity=0.99)`: random scores, the smallest direct sparsity whose exact effective
compression reaches 100x), warm: the median of {args.repeats} calls after a first call
compiled it.

{search_table}
""",
    )


if __name__ == "__main__":
  main()
