"""Benchmark: structured pruning and compaction of models beyond the zoo's tables (issue 26).

Each row prunes whole units of a model's dependency groups (:func:`sparsejax.structure`)
by name, compacts the masks (:func:`sparsejax.compact.compact`, ``verify=True``: the
compacted program computes the masked model's outputs) and times, in turns
(``timing.alternate``), the dense model, the masked model (the same program, pruned
weights zero) and the compacted program (``Compacted.apply``, jitted), inference at
batch 1 and at ``--batch``. Beside each time ratio: the FLOPs ratio (dense FLOPs of the
masked model / dense FLOPs of the compacted one, :mod:`sparsejax.flops`, 2 per
multiply-accumulate of the linear ops), and the ratios of FLOPs and bytes accessed of the
two compiled programs by XLA's cost analysis (every op: attention scores, softmax,
normalization and activations too, which weight masks do not shrink).

Rows:
- ``vit``, ``gpt``: the zoo's ViT and byte-level GPT with half of every layer's attention
  heads (``head/l1``) and half of every MLP's neurons (``neuron/l1`` on the MLP groups)
  removed; the residual stream is kept. Target: the ViT compacted at least 1.5x faster
  than dense at ``--batch``.
- ``resnet18-imagenet``: the Flax examples' ResNet-18 (BasicBlock, 64 filters, 7x7 stem
  and max pooling, 1000 classes; torchvision's architecture) with 50% of the channels of
  every group removed by ``channel/l1`` (uniform), beside Torch-Pruning's published
  figures for that setting (1.82 -> 0.487 GMACs, 11.69M -> 3.06M parameters at 224x224).
  Timed at batch 1 and ``--imagenet_batch`` (224x224 on a CPU).
- ``ARCH:PRUNER:C``: a zoo network (``vit``, ``gpt``, ``vgg19``, ``resnet18``, ...) pruned
  at initialization by a registered pruner to C-fold *effective* compression, then
  compacted: ``synflow`` (100 rounds) leaves dead units only (what unstructured pruning
  leaves for compaction), ``channel/l1`` removes whole channels. A target the pruner
  cannot reach is reported as such.
- ``ROW/8``: any row with ``multiple=8`` (widths rounded up to a multiple of 8, the extra
  channels zero, the function unchanged).

  python -m benchmarks.compaction_any                 # prints the table, updates docs/
  python -m benchmarks.compaction_any --rows vit,gpt --batch 64 --no_doc
  python -m benchmarks.compaction_any --rows vgg19:synflow:100,vgg19:synflow:100/8
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import sparsejax
from benchmarks import report
from sparsejax import compact, errors, flops, models, pruning, structured, timing
from sparsejax import masks as masks_lib

#: Rows of the default run (see the module docstring for the forms a row may take).
ROWS = (
  "vit",
  "gpt",
  *(f"{a}:synflow:{c}" for a in ("vit", "gpt") for c in (10, 100, 1000)),
  *(f"{a}:synflow:{c}" for a in ("vgg19", "resnet18") for c in (10, 100, 1000)),
  "vgg19:synflow:100/8",
  "vgg19:channel/l1:10",
  "resnet18:channel/l1:10",
  "resnet18-imagenet",
  "resnet18-imagenet/8",
)
#: Rows with a fixed setting (the others are ARCH:PRUNER:C).
NAMED = ("vit", "gpt", "resnet18-imagenet")

#: Torch-Pruning's ResNet-18 (ImageNet, 224x224), 50% of channels removed uniformly:
#: (MACs, parameters) before and after, from its README's benchmark.
TORCH_PRUNING = {"macs": (1.82e9, 0.487e9), "params": (11.69e6, 3.06e6)}


class BasicBlock(nn.Module):
  """The Flax examples' ResNet block (examples/imagenet/models.py), inference mode."""

  filters: int
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s=(1, 1), name=None: nn.Conv(
      f, k, s, padding=[(k[0] // 2, k[0] // 2)] * 2, use_bias=False, name=name
    )
    norm = lambda name=None: nn.BatchNorm(use_running_average=True, name=name)
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(x)))
    y = norm()(conv(self.filters, (3, 3))(y))
    if x.shape != y.shape:
      x = norm(name="norm_proj")(conv(self.filters, (1, 1), self.strides, name="conv_proj")(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 for 224x224 ImageNet images (torchvision's layout)."""

  num_classes: int = 1000

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False, name="conv_init")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, filters in enumerate((64, 128, 256, 512)):
      for j in range(2):
        x = BasicBlock(filters, (2, 2) if i > 0 and j == 0 else (1, 1))(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _half_heads_and_mlp(traced, variables) -> Any:
  """Masks removing half of every attention layer's heads and half of every MLP's
  neurons (the residual stream kept)."""
  key = jax.random.key(1)
  heads = structured.prune("head/l1", key=key, model=traced, variables=variables, fraction=0.5)
  mlp = structured.prune(
    "neuron/l1",
    key=key,
    model=traced,
    variables=variables,
    fraction=0.5,
    only=lambda g: g.kind == "neuron" and not g.name.startswith("stream"),
  )
  return masks_lib.map_masks(lambda a, b: a & b, heads, mlp)


def parse_row(row: str) -> tuple[str, str | None, float | None, int]:
  """(model name, pruner or None, effective compression or None, multiple) of a row:
  one of :data:`NAMED`, or ``ARCH:PRUNER:C`` (a zoo network, a registered pruner such as
  ``synflow`` or ``channel/l1``, C > 1), either with an optional ``/8`` suffix;
  ValueError naming the row otherwise."""
  base, multiple = (row[:-2], 8) if row.endswith("/8") else (row, 1)
  if base in NAMED:
    return base, None, None, multiple
  parts = base.split(":")
  ok = len(parts) == 3 and parts[0] in models.MODELS and parts[1] in pruning.PRUNERS
  try:
    c = float(parts[2]) if ok else 0.0
  except ValueError:
    c = 0.0
  if not c > 1:
    raise ValueError(
      f"--rows: {row!r} is not a row; allowed: {', '.join(NAMED)} or ARCH:PRUNER:C "
      f"(ARCH one of {', '.join(sorted(models.MODELS))}, PRUNER a registered pruner, "
      "e.g. synflow or channel/l1, C > 1), each optionally with /8."
    )
  return parts[0], parts[1], c, multiple


def setup(row: str):
  """(model, example input [1, ...], variables, masks, compact kwargs) of a row;
  :class:`sparsejax.errors.UnreachableSparsityError` for a target out of reach."""
  name, pruner, compression, multiple = parse_row(row)
  kw = {"multiple": multiple} if multiple > 1 else {}
  if name == "resnet18-imagenet":
    model = ResNet18()
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  else:
    model, x = models.create(name), models.example_input(name)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros(x.shape, x.dtype))
  traced = sparsejax.trace(model, x, variables=v)
  key = jax.random.key(1)
  if pruner is not None:
    m = pruning.prune(
      pruner,
      key=key,
      model=traced,
      variables=v,
      sparsity=1 - 1 / compression,
      pruning_type="effective",
      rounds=100,
      # l1 and the other after-training scores read the initial weights here: the
      # timings depend on the masks' structure, not on which units survive
      trained_params=v["params"] if pruning.get_pruner(pruner).after_training else None,
    )
  elif name == "resnet18-imagenet":
    m = structured.prune("channel/l1", key=key, model=traced, variables=v, fraction=0.5)
  else:
    m = _half_heads_and_mlp(traced, v)
  return model, x, v, m, kw


def _inputs(x, batch: int):
  shape = (batch, *x.shape[1:])
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jax.random.randint(jax.random.key(2), shape, 0, 256, x.dtype)
  return jax.random.normal(jax.random.key(2), shape, x.dtype)


def _xla_cost(fn, *args) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of the program XLA compiles for ``fn(*args)``, every op
  counted (attention scores and softmax, normalization, activations, pooling too), from
  its cost analysis."""
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list before JAX 0.4.30
  return float(cost["flops"]), float(cost["bytes accessed"])


def bench_row(row: str, batches: Sequence[int], repeats: int) -> dict:
  """Times (seconds), FLOPs and parameter counts of one row; ``{"row", "unreachable":
  the largest effective compression reachable}`` for a target the pruner cannot reach."""
  try:
    model, x, v, m, kw = setup(row)
  except errors.UnreachableSparsityError as err:
    print(row, "unreachable:", err, flush=True)
    return {"row": row, "unreachable": 1 / (1 - err.max_sparsity)}
  traced = sparsejax.trace(model, x, variables=v)
  start = time.perf_counter()
  c = compact.compact(traced, v, m, verify=True, **kw)
  out: dict = {"row": row, "compact_s": time.perf_counter() - start}
  before = flops.total(traced, m)
  after = flops.total(c, c.masks, x, params=c.params)
  out.update(
    macs=(before.flops_dense / 2, after.flops_dense / 2),
    params=(
      sum(int(np.size(a)) for a in jax.tree.leaves(v["params"])),
      sum(int(np.size(a)) for a in jax.tree.leaves(c.params)),
    ),
  )
  masked = {**v, "params": masks_lib.apply(v["params"], m)}
  full = jax.jit(lambda variables, x: model.apply(variables, x))
  small = jax.jit(c.apply)
  for b in batches:
    xb = _inputs(x, b)
    fns = {
      "dense": lambda: full(v, xb),
      "masked": lambda: full(masked, xb),
      "compacted": lambda: small(c.params, xb),
    }
    for fn in fns.values():
      jax.block_until_ready(fn())  # compiles
    out[("xla", b)] = {
      "masked": _xla_cost(full, masked, xb),
      "compacted": _xla_cost(small, c.params, xb),
    }
    out[b] = timing.alternate(
      {k: lambda f=f: jax.block_until_ready(f()) for k, f in fns.items()}, repeats
    )
    print(row, b, {k: f"{1e3 * s:.1f} ms" for k, s in out[b].items()}, flush=True)
  return out


def table(results: list[dict], batches: dict) -> str:
  rows = []
  for r in results:
    if "unreachable" in r:
      most = f"unreachable (at most {r['unreachable']:.4g}x effective)"
      rows.append([r["row"], "-", most] + ["-"] * 11)
      continue
    (m0, m1), (p0, p1) = r["macs"], r["params"]
    for b in batches[r["row"]]:
      t, xla = r[b], r[("xla", b)]
      rows.append(
        [
          r["row"],
          b,
          f"{m0 / 1e6:,.1f} -> {m1 / 1e6:,.1f}",
          f"{m0 / m1:.2f}x",
          f"{xla['masked'][0] / xla['compacted'][0]:.2f}x",
          f"{xla['masked'][1] / xla['compacted'][1]:.2f}x",
          f"{p0 / 1e6:.3f} -> {p1 / 1e6:.3f}",
          f"{1e3 * t['dense']:,.1f}",
          f"{1e3 * t['masked']:,.1f}",
          f"{1e3 * t['compacted']:,.1f}",
          f"{t['masked'] / t['compacted']:.2f}x",
          f"{t['masked'] / t['compacted'] / (m0 / m1):.2f}",
          f"{t['dense'] / t['compacted']:.2f}x",
          f"{r['compact_s']:.1f}",
        ]
      )
  return report.markdown_table(
    [
      "row",
      "batch",
      "MMACs masked -> compacted",
      "FLOPs ratio",
      "XLA FLOPs ratio",
      "XLA bytes ratio",
      "params (M)",
      "dense ms",
      "masked ms",
      "compacted ms",
      "compacted vs masked",
      "of FLOPs ratio",
      "compacted vs dense",
      "compact s",
    ],
    rows,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS))
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--imagenet_batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--no_doc", action="store_true")
  args = parser.parse_args()
  rows = [r for r in args.rows.split(",") if r]
  for r in rows:
    parse_row(r)
  batches = {
    r: (1, args.imagenet_batch if r.startswith("resnet18-imagenet") else args.batch) for r in rows
  }
  load = report.load_average()
  results = []
  for r in rows:
    results.append(bench_row(r, batches[r], args.repeats))
    jax.clear_caches()  # one row's programs and buffers go before the next
    gc.collect()
  body = table(results, batches)
  print(body)
  if not args.no_doc:
    tp = TORCH_PRUNING
    report.update_section(
      "compaction_any",
      f"""
## Structured pruning and compaction of any model (`python -m benchmarks.compaction_any`)

{report.stamp()}; load average {load} at the start. Dense, masked (pruned weights zero,
same program) and compacted (`Compacted.apply`, jitted) inference timed in turns
(medians of {args.repeats}); *FLOPs ratio*: dense MACs of the masked model over those of
the compacted one (linear ops); *XLA FLOPs* and *XLA bytes ratio*: the same ratio of the
FLOPs and bytes accessed of the two compiled programs at that batch by XLA's cost
analysis (every op: attention scores and softmax, normalization, activations). ViT
and GPT (the zoo's): half of every layer's heads (`head/l1`) and
half of every MLP's neurons (`neuron/l1` on the MLP groups) removed, the residual stream
kept. ResNet-18 (ImageNet layout, 224x224): 50% of every group's channels removed by
`channel/l1` (uniform quota). `ARCH:synflow:C`: SynFlow (100 rounds) at initialization to
C-fold effective compression, then compaction (what unstructured pruning leaves: the dead
units); `ARCH:channel/l1:C`: whole channels removed to C-fold effective compression
(ResNet-18 and VGG-19 are the zoo's CIFAR-10 networks). `/8`: widths rounded up to
multiples of 8. Torch-Pruning's
published figures for that ResNet-18 setting: {tp["macs"][0] / 1e9:.2f} ->
{tp["macs"][1] / 1e9:.3f} GMACs, {tp["params"][0] / 1e6:.2f}M -> {tp["params"][1] / 1e6:.2f}M
parameters. Targets: at batch {args.batch}, every row whose FLOPs ratio is at least 2
runs at least 0.8 of that ratio faster compacted than masked (*of FLOPs ratio* >= 0.8),
and the ViT compacted at least 1.5x faster than dense.

{body}
""",
    )


if __name__ == "__main__":
  main()
