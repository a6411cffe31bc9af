"""Benchmark: the masked network against its compaction (sparsejax.compact), side by side.

For each network, at-init pruner and effective compression: prune at initialization to
the effective target, compact (``fold=False``: the compacted network is also the one to
train), check the logits agree, then time in one run, alternating masked and compacted:

- inference latency, batch 1 (jitted ``apply``, inference mode);
- inference throughput, batch ``--batch`` (default 256);
- one masked training step (``training.train_step``: augmentation, SGD momentum, L2,
  masked gradients) at the paper's batch size (``--train`` to enable; slow on a CPU).

Ratios are masked time / compacted time, beside the FLOPs ratio (dense FLOPs of the
masked network / dense FLOPs of the compacted one, :mod:`sparsejax.flops`): what a
dense kernel could gain at most. Target: SynFlow VGG-19 at 100x effective, compacted,
runs inference >= 5x faster than masked, within a factor 2 of its FLOPs ratio.

  python -m benchmarks.compaction                       # the default grid
  python -m benchmarks.compaction --archs vgg19 --pruners synflow --compressions 100
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import report
from experiments import configs
from sparsejax import compact, data, flops, models, pruning, timing, training


def _prune(arch, pruner, compression, rounds):
  model, shape = models.create(arch), models.input_shape(arch)
  v = model.init(jax.random.key(0), jnp.ones((1,) + shape))
  batches = None
  if pruning.get_pruner(pruner).needs_data:
    images, labels = data.synthetic_split(models.get_spec(arch).dataset, "train", 128)
    spec = data.get_spec(models.get_spec(arch).dataset)
    batches = [{"image": data.preprocess(jax.random.key(0), jnp.asarray(images), spec,
                                         train=False), "label": jnp.asarray(labels)}]
  m = pruning.prune(pruner, key=jax.random.key(1), model=model, variables=v,
                    sparsity=1 - 1 / compression, pruning_type="effective",
                    input_shape=shape, batches=batches,
                    rounds=rounds if pruner == "synflow" else None)
  return model, shape, v, m


def bench(arch, pruner, compression, *, batch, repeats, train, rounds):
  model, shape, v, m = _prune(arch, pruner, compression, rounds)
  masked = {**v, "params": jax.tree.map(lambda p, k: p if k is None else p * k,
                                        v["params"], m, is_leaf=lambda x: x is None)}
  new_model, new_v, new_m = compact.compact(model, v, m, input_shape=shape, fold=False,
                                            verify=True)
  before = flops.total(model, m, shape)
  after = flops.total(new_model, new_m, shape)
  row = dict(flops_ratio=before.flops_dense / after.flops_dense,
             params=(before.params_dense, after.params_dense))
  t = timing.inference({"masked": (model, masked), "compact": (new_model, new_v)}, shape,
                       batch=batch, repeats=repeats, key=jax.random.key(2))
  row["latency"] = (t["masked"]["latency_ms"] / 1e3, t["compact"]["latency_ms"] / 1e3)
  row["throughput"] = (t["masked"]["batch_ms"] / 1e3, t["compact"]["batch_ms"] / 1e3)
  if train:
    cfg = configs.get_config(arch, train_steps=1000)
    spec = models.get_spec(arch)
    images, labels = data.synthetic_split(spec.dataset, "train", cfg.batch_size)
    batch_ = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    states = {k: training.create_train_state(mdl, jax.random.key(0), shape, cfg, masks=mk,
                                             params=vv["params"])
              for k, mdl, mk, vv in (("masked", model, m, v), ("compact", new_model, new_m,
                                                                new_v))}
    mdls = {"masked": model, "compact": new_model}
    step = {k: (lambda k=k: training.train_step(states[k], batch_, jax.random.key(3),
                                                model=mdls[k], spec=spec.dataset,
                                                config=cfg)) for k in states}
    for fn in step.values():
      jax.block_until_ready(fn())
    t = timing.alternate(step, max(1, repeats // 2))
    row["train"] = (t["masked"], t["compact"])
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--archs", default="lenet300100,vgg19,resnet18")
  parser.add_argument("--pruners", default="random/igq,random/uniform,snip,synflow")
  parser.add_argument("--compressions", default="10,100,1000")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=100, help="SynFlow rounds.")
  parser.add_argument("--train", action="store_true", help="Also time one training step.")
  parser.add_argument("--no_doc", action="store_true")
  args = parser.parse_args()
  rows = []
  for arch in args.archs.split(","):
    for pruner in args.pruners.split(","):
      for c in (float(x) for x in args.compressions.split(",")):
        try:
          r = bench(arch, pruner, c, batch=args.batch, repeats=args.repeats,
                    train=args.train, rounds=args.rounds)
        except ValueError as err:  # e.g. an unreachable effective target
          print(f"{arch} {pruner} {c:g}x: {type(err).__name__}: {err}", flush=True)
          continue
        ms = lambda t: f"{1e3 * t[0]:.3g} / {1e3 * t[1]:.3g}"
        ratio = lambda t: f"{t[0] / t[1]:.2f}x"
        rows.append([arch, pruner, f"{c:g}x", f"{r['params'][0]} / {r['params'][1]}",
                     f"{r['flops_ratio']:.2f}x", ms(r["latency"]), ratio(r["latency"]),
                     ms(r["throughput"]), ratio(r["throughput"]),
                     ms(r["train"]) if "train" in r else "-",
                     ratio(r["train"]) if "train" in r else "-"])
        print(" | ".join(rows[-1]), flush=True)
  header = ["network", "pruner", "effective", "kernel params masked / compact",
            "FLOPs ratio", "latency b=1 ms masked / compact", "speed-up",
            f"b={args.batch} ms masked / compact", "speed-up", "train step ms", "speed-up"]
  table = report.markdown_table(header, rows)
  print(table)
  if not args.no_doc:
    report.update_section("compaction", f"""
## Compaction: masked against compacted (`python -m benchmarks.compaction`)

{report.stamp()}. Pruned at initialization to the effective compression shown,
compacted by `sparsejax.compact` (`fold=False`, logits checked equal), then timed
alternately: jitted inference at batch 1 and batch {args.batch} (medians of
{args.repeats}){", one masked training step at the paper's batch size" if args.train
 else ""}. Speed-up = masked time / compacted time; FLOPs ratio = dense FLOPs of the
masked network / of the compacted one. Target: SynFlow VGG-19 at 100x, inference >= 5x.

{table}
""")


if __name__ == "__main__":
  main()
