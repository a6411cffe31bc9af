"""Benchmark: masked against dense train-step throughput, measured side by side.

- LeNet-300-100, batch 100, MNIST-shaped uint8 batches, rotation augmentation on
  (inside the jitted step), masked at 100x (random/igq) vs dense.
- VGG-16, batch 128, synthetic CIFAR-10-shaped batches, flip+shift augmentation,
  masked at 100x vs dense.
Steps per second are medians over windows of consecutive jitted steps on batches
already on the device (the host only feeds uint8 batches, prefetched in training).
Targets: masked/dense time ratio <= 1.05; LeNet-300-100 masked >= 5x the paper's
reference (about 56 steps/s masked, 80 dense, on a 2-core CPU of this kind).

  python -m benchmarks.training            # prints the table, updates docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from experiments import configs
from sparsejax import data, masks as masks_lib, models, pruning, training

REFERENCE = {"lenet300100": (56.0, 80.0)}  # paper's reference: (masked, dense) steps/s


def steps_per_second(state, batches, key, *, model, spec, config, window, windows):
  step = lambda s, b: training.train_step(s, b, key, model=model, spec=spec, config=config)
  state, _ = step(state, batches[0])  # compile
  jax.block_until_ready(state)
  rates = []
  for _ in range(windows):
    start = time.perf_counter()
    for i in range(window):
      state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    rates.append(window / (time.perf_counter() - start))
  return statistics.median(rates)


def bench(arch, batch_size, window, windows, compression=100.0):
  spec = models.get_spec(arch)
  dspec = data.get_spec(spec.dataset)
  config = configs.get_config(arch, batch_size=batch_size)
  model = models.create(arch)
  key = jax.random.key(0)
  variables = model.init(key, jnp.ones((1,) + dspec.image_shape))
  m = pruning.prune("random/igq", key=key, model=model, variables=variables,
                    sparsity=1 - 1 / compression)
  images, labels = data.synthetic_split(spec.dataset, "train", num_examples=8 * batch_size)
  batches = [{"image": jnp.asarray(images[i * batch_size:(i + 1) * batch_size]),
              "label": jnp.asarray(labels[i * batch_size:(i + 1) * batch_size])}
             for i in range(8)]
  out = {}
  # Interleave masked and dense windows so both see the same machine state.
  states = {kind: training.create_train_state(model, key, dspec.image_shape, config,
                                              masks=mk, params=variables["params"])
            for kind, mk in (("masked", m), ("dense", None))}
  rates = {"masked": [], "dense": []}
  for _ in range(windows):
    for kind in ("masked", "dense"):
      rates[kind].append(steps_per_second(states[kind], batches, key, model=model,
                                          spec=dspec, config=config, window=window,
                                          windows=1))
  for kind in rates:
    out[kind] = statistics.median(rates[kind])
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--windows", type=int, default=15)
  parser.add_argument("--lenet_window", type=int, default=200)
  parser.add_argument("--vgg_window", type=int, default=2)
  parser.add_argument("--vgg_windows", type=int, default=3)
  parser.add_argument("--skip_vgg", action="store_true")
  parser.add_argument("--no_doc", action="store_true")
  args = parser.parse_args()
  rows = []
  cases = [("lenet300100", 100, args.lenet_window, args.windows)]
  if not args.skip_vgg:
    cases.append(("vgg16", 128, args.vgg_window, args.vgg_windows))
  for arch, batch, window, windows in cases:
    r = bench(arch, batch, window, windows)
    ref = REFERENCE.get(arch)
    rows.append([arch, batch, f"{r['masked']:.3g}", f"{r['dense']:.3g}",
                 f"{r['dense'] / r['masked']:.3f}",
                 f"{ref[0]:.0f} / {ref[1]:.0f}" if ref else "-",
                 f"{r['masked'] / ref[0]:.1f}x" if ref else "-"])
    print(" | ".join(str(c) for c in rows[-1]), flush=True)
  header = ["network", "batch", "masked steps/s", "dense steps/s", "masked/dense time",
            "paper's reference masked / dense steps/s", "masked vs reference"]
  table = report.markdown_table(header, rows)
  print(table)
  if not args.no_doc:
    report.update_section("training", f"""
## Training throughput (`python -m benchmarks.training`)

{report.stamp()}. One jitted train step (augmentation on the device, SGD momentum,
L2, gradients and updates masked) on uint8 batches already on the device; medians
over interleaved windows of masked (random/igq, 100x) and dense steps: LeNet-300-100
{args.windows} windows of {args.lenet_window} steps, VGG-16 {args.vgg_windows} of
{args.vgg_window} steps. Run-to-run noise on this machine is a few percent.
Targets: masked/dense time <= 1.05; LeNet-300-100 masked >= 5x the paper's reference.

{table}
""")


if __name__ == "__main__":
  main()
