"""Why compaction gains more than its FLOPs ratio: every conv/dense layer timed alone.

For one row of benchmarks.compaction (prune at init to an effective compression,
compact), each Dense/Conv call of the masked and of the compacted network is timed in
isolation at its own input shape (jitted, inference, batch ``--batch``), twice: as
XLA's convolution the way the zoo's Conv calls it (``layers.conv_general_dilated``, what
the network runs) and as an
im2col matmul (``lax.conv_general_dilated_patches`` then one ``dot``), with the
achieved GFLOP/s (2 FLOPs per multiply-accumulate). Timings alternate masked/compact.

  python -m benchmarks.compaction_layers --arch vgg19 --pruner synflow --compression 100
  python -m benchmarks.compaction_layers --padding_check   # XLA:CPU 'SAME' conv at 2x2
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import compaction, report
from sparsejax import compact, timing
from sparsejax.models import layers


def layer_shapes(model, variables, shape) -> dict:
  """{layer path: (input shape [1, ...], kernel shape)} of every Dense/Conv call."""
  seen = compact._capture_inputs(model, variables, jnp.zeros((1,) + shape))
  flat = {}
  for path, (x, _) in seen.items():
    k = variables["params"]
    for part in path.split("/"):
      k = k[part]
    flat[path] = (tuple(x.shape), tuple(k["kernel"].shape))
  return flat


def _conv(x, k):
  """XLA's 3x3 'SAME' convolution as the zoo's Conv calls it (layers.conv_general_dilated:
  padded beforehand where the padding covers the input)."""
  return layers.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _conv_same(x, k):
  """``lax.conv_general_dilated`` 'SAME' as it is (XLA:CPU's slow path at 2x2)."""
  return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _im2col(x, k):
  kh, kw, cin, cout = k.shape
  p = lax.conv_general_dilated_patches(
    x, (kh, kw), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  # patches' feature axis is (cin, kh, kw)-major: reorder the kernel to match.
  w = jnp.transpose(k, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)
  return p @ w


def _dense(x, k):
  return x.reshape(x.shape[0], -1) @ k


def time_layers(
  arch, pruner, compression, *, batch=32, repeats=5, rounds=100, snip_examples=128
) -> list[dict]:
  model, shape, v, m = compaction.prune(
    arch, pruner, compression, rounds=rounds, snip_examples=snip_examples, cache=True
  )
  new_model, new_v, _ = compact.compact(model, v, m, input_shape=shape, fold=False)
  before, after = layer_shapes(model, v, shape), layer_shapes(new_model, new_v, shape)
  rows = []
  key = jax.random.key(0)
  for path in before:
    r = {"layer": path}
    for name, (xs, ks) in (("masked", before[path]), ("compact", after[path])):
      x = jax.random.normal(key, (batch,) + xs[1:])
      k = jax.random.normal(key, ks) * 0.05
      r[f"{name}_shape"] = f"{'x'.join(map(str, xs[1:]))} -> {ks[-1]}"
      positions = int(np.prod(xs[1:-1])) if len(ks) == 4 else 1
      r[f"{name}_flops"] = 2 * batch * positions * int(np.prod(ks))
      ops = {"xla": _conv, "im2col": _im2col} if len(ks) == 4 else {"xla": _dense}
      for op_name, op in ops.items():
        f = jax.jit(op).lower(x, k).compile()
        r[f"{name}_{op_name}"] = functools.partial(f, x, k)
    fns = {k: f for k, f in r.items() if callable(f)}
    t = timing.alternate(fns, repeats)
    r.update(t)
    rows.append(r)
  return rows


def padding_check(batch: int = 32, repeats: int = 3) -> list[tuple]:
  """[(case, seconds, GFLOP/s)]: XLA's 3x3 'SAME' conv at small spatial sizes and
  widths, and the 2x2x512 one as 'VALID' on a pre-padded input and forward+backward."""
  cases = {}
  for s_, c in ((2, 512), (2, 256), (2, 128), (4, 512), (8, 512)):
    x = jax.random.normal(jax.random.key(0), (batch, s_, s_, c))
    k = jax.random.normal(jax.random.key(1), (3, 3, c, c))
    fl = 2 * batch * s_ * s_ * 9 * c * c
    cases[f"SAME {s_}x{s_}x{c}"] = (_conv_same, x, k, fl)
    if s_ == 2:
      cases[f"zoo Conv (padded beforehand) {s_}x{s_}x{c}"] = (_conv, x, k, fl)
    if (s_, c) == (2, 512):
      xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      valid = lambda a, b: lax.conv_general_dilated(
        a, b, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      cases[f"VALID on pre-padded {s_}x{s_}x{c}"] = (valid, xp, k, fl)
      for name, f in (("SAME", _conv_same), ("zoo Conv", _conv)):
        grad = jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) ** 2), argnums=(0, 1))
        cases[f"forward+backward {name} {s_}x{s_}x{c}"] = (grad, x, k, 3 * fl)
  fns = {
    n: functools.partial(jax.jit(f).lower(x, k).compile(), x, k)
    for n, (f, x, k, _) in cases.items()
  }
  t = timing.alternate(fns, repeats)
  return [(n, t[n], fl / t[n] / 1e9) for n, (_, _, _, fl) in cases.items()]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--arch", default="vgg19")
  parser.add_argument("--pruner", default="synflow")
  parser.add_argument("--compression", type=float, default=100)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=100)
  parser.add_argument(
    "--padding_check",
    action="store_true",
    help="Only time XLA's 3x3 'SAME' conv at 2x2..8x8 (see padding_check).",
  )
  args = parser.parse_args(argv)
  if args.padding_check:
    print(f"{report.machine()}; batch {args.batch}; load {compaction._load()}")
    for n, t, g in padding_check(args.batch, args.repeats):
      print(f"{n}: {1e3 * t:.1f} ms, {g:.2f} GFLOP/s")
    return
  ((arch, pruner, c),) = compaction.grid(args.arch, args.pruner, f"{args.compression:g}")
  rows = time_layers(arch, pruner, c, batch=args.batch, repeats=args.repeats, rounds=args.rounds)
  ms = lambda t: f"{1e3 * t:.3g}"
  gf = lambda f, t: f"{f / t / 1e9:.3g}"
  out, tot = [], {}
  for r in rows:
    cells = [
      r["layer"],
      r["masked_shape"],
      r["compact_shape"],
      f"{r['masked_flops'] / r['compact_flops']:.2f}x",
    ]
    for op in ("xla", "im2col"):
      if f"masked_{op}" not in r:
        cells += ["-"] * 3
        continue
      tm, tc = r[f"masked_{op}"], r[f"compact_{op}"]
      for k, t in (("masked", tm), ("compact", tc)):
        tot[(op, k)] = tot.get((op, k), 0.0) + t
      cells += [
        f"{ms(tm)} / {ms(tc)}",
        f"{tm / tc:.2f}x",
        f"{gf(r['masked_flops'], tm)} / {gf(r['compact_flops'], tc)}",
      ]
    out.append(cells)
  fm = sum(r["masked_flops"] for r in rows)
  fc = sum(r["compact_flops"] for r in rows)
  header = [
    "layer",
    "masked in -> out",
    "compact in -> out",
    "FLOPs ratio",
    "XLA conv ms masked / compact",
    "speed-up",
    "GFLOP/s masked / compact",
    "im2col ms masked / compact",
    "speed-up",
    "GFLOP/s masked / compact",
  ]
  print(f"{report.machine()}; batch {args.batch}; load {compaction._load()}")
  print(report.markdown_table(header, out))
  for op in ("xla", "im2col"):
    if (op, "masked") in tot:
      print(
        f"sum {op} (convs{' + dense' if op == 'xla' else ''}): masked "
        f"{1e3 * tot[(op, 'masked')]:.4g} ms, compact {1e3 * tot[(op, 'compact')]:.4g} ms, "
        f"{tot[(op, 'masked')] / tot[(op, 'compact')]:.2f}x; FLOPs ratio {fm / fc:.2f}x"
      )


if __name__ == "__main__":
  main()
