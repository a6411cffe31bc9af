"""Benchmark: mask updates inside the jitted step against updates between steps, same run.

Three ways to train with moving masks, measured side by side in one process on batches
already on the device:

- fixed mask: :func:`sparsejax.training.train_step`, masks never move (the baseline, from
  each method's starting masks);
- between steps: :class:`sparsejax.training.MaskUpdates` called from Python at
  ``is_update_step`` (a host round trip: dense gradient, update, mask replacement,
  counts), then the same train step;
- in jit: :func:`sparsejax.training.update_train_step`, the update as a ``lax.cond`` on
  the step inside one jitted program.

Methods: RigL (drop fraction 0.3, random/ERK start at 99%) and GMP (to 99% from dense),
updates every 100 steps, effective tracking off. Reported: ms per step of steps without
an update (the in-jit program's cost of carrying the update branch), ms per step over a
run with updates every 100 steps (the updates' amortized cost), and the ratios to the
fixed mask. Target: in-jit steps at most 5% slower than fixed-mask steps.

LeNet-300-100 (batch 100): loops of --steps steps end to end, interleaved, median of
--repeats after a compiling repeat. VGG-16 (batch --vgg_batch; about a second per step
on a 2-core CPU): single steps and single updates timed (median of --vgg_repeats), the
amortized time per step = step + update / 100.

  python -m benchmarks.jit_updates          # prints the table, updates docs/benchmarks.md
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import report
from experiments import configs
from sparsejax import data, dynamic, models, pruning, timing, training
from sparsejax import masks as masks_lib


def _setup(arch: str, batch_size: int):
  spec = models.get_spec(arch)
  dspec = data.get_spec(spec.dataset)
  config = configs.get_config(arch, batch_size=batch_size, train_steps=100_000)
  model = models.create(arch)
  key = jax.random.key(0)
  variables = models.init(model, key, dspec.image_shape)
  erk = pruning.prune(
    "random/erk",
    key=key,
    model=model,
    variables=variables,
    sparsity=0.99,
    input_shape=dspec.image_shape,
  )
  images, labels = data.synthetic_split(spec.dataset, "train", num_examples=8 * batch_size)
  batches = [
    {
      "image": jnp.asarray(images[i * batch_size : (i + 1) * batch_size]),
      "label": jnp.asarray(labels[i * batch_size : (i + 1) * batch_size]),
    }
    for i in range(8)
  ]
  return model, dspec, config, variables, erk, batches, key


def _methods(total_steps: int):
  return {
    "RigL": (dynamic.RigL(end=100 * total_steps, every=100), "erk"),
    "GMP": (dynamic.GradualMagnitude(0.99, start=0, end=100 * total_steps, every=100), "dense"),
  }


class _Run:
  """One way of stepping: fresh state, then ``steps`` steps from step ``first``."""

  def __init__(self, kind, updater, start_masks, model, dspec, config, variables, key):
    self.kind, self.updater = kind, updater
    self.model, self.dspec, self.key = model, dspec, key
    self.state0 = training.create_train_state(
      model, key, dspec.image_shape, config, masks=start_masks, params=variables["params"]
    )
    self.updates = (
      None
      if updater is None
      else training.MaskUpdates(
        updater, model=model, spec=dspec, input_shape=dspec.image_shape, step_key=key
      )
    )

  def between(self, state, batch, t: int, donate: bool = False):
    """Step ``t`` with the between-steps update due before it (as ``training.train``):
    the update shares the step's forward and backward pass (``apply_step``)."""
    outputs = None
    if self.kind == "between steps" and self.updater.is_update_step(t):
      state, outputs = self.updates.update(state, batch, t)
    if outputs is not None:
      return training.apply_step(state, outputs)
    return training.train_step(
      state, batch, self.key, model=self.model, spec=self.dspec, donate=donate
    )

  def loop(self, batches, first: int, steps: int):
    """``steps`` steps from step ``first`` (updates included), each step donating its
    state as in ``training.train`` (from a copy of the first); waits for the last."""
    state = jax.tree.map(jnp.copy, self.state0.replace(step=jnp.int32(first)))
    for t in range(first, first + steps):
      batch = batches[t % len(batches)]
      if self.kind == "in jit":
        state, metrics = training.update_train_step(
          state,
          batch,
          self.key,
          model=self.model,
          spec=self.dspec,
          updater=self.updater,
          donate=True,
        )
      else:
        state, metrics = self.between(state, batch, t, donate=True)
    return jax.block_until_ready((state, metrics))


def bench_loops(arch, batch, steps, repeats):
  """{(method, kind): (ms per step without updates, ms per step with updates every
  100)}: each method's loops timed in turns with its fixed-mask baseline's
  (``timing.alternate``, only the loops compared, seconds apart); a loop's time
  includes the copy of its first state, under 1% of 99 LeNet-300-100 steps."""
  model, dspec, config, variables, erk, batches, key = _setup(arch, batch)
  dense = masks_lib.map_masks(jnp.ones_like, erk)
  out = {}
  for name, (updater, start) in _methods(steps).items():
    base, masks = ("ERK", erk) if start == "erk" else ("dense", dense)
    runs = {
      (base, "fixed mask"): _Run("fixed mask", None, masks, model, dspec, config, variables, key)
    }
    for kind in ("between steps", "in jit"):
      runs[(name, kind)] = _Run(kind, updater, masks, model, dspec, config, variables, key)
    ms = {}
    # Steps 1-99 have no update for either method (GMP updates at 0, 100, ...).
    for first, length in ((1, 99), (0, steps)):
      fns = {k: lambda r=r, a=first, n=length: r.loop(batches, a, n) for k, r in runs.items()}
      for fn in fns.values():
        fn()  # compiles
      ms[length] = {k: 1000 * t / length for k, t in timing.alternate(fns, repeats).items()}
    out.update({k: (ms[99][k], ms[steps][k]) for k in runs})
  return out


def bench_parts(arch, batch, repeats):
  """{(method, kind): (ms per step without update, ms per update)} from single steps,
  every variant timed in turns (``timing.alternate``: a step of seconds drifts by 10-20%
  over the minutes between variants timed one after another)."""
  model, dspec, config, variables, erk, batches, key = _setup(arch, batch)
  dense = masks_lib.map_masks(jnp.ones_like, erk)
  fns = {}
  for base, m in (("ERK", erk), ("dense", dense)):
    fixed = _Run("fixed mask", None, m, model, dspec, config, variables, key).state0
    fns[(base, "fixed")] = lambda fixed=fixed: training.train_step(
      fixed, batches[0], key, model=model, spec=dspec
    )
  for name, (updater, start) in _methods(10_000).items():
    masks = erk if start == "erk" else dense
    run = _Run("in jit", updater, masks, model, dspec, config, variables, key)
    between = _Run("between steps", updater, masks, model, dspec, config, variables, key)
    at = lambda t, run=run: run.state0.replace(step=jnp.int32(t))
    step = lambda t, at=at, updater=updater: training.update_train_step(
      at(t), batches[0], key, model=model, spec=dspec, updater=updater
    )
    fns[(name, "quiet")] = lambda step=step: step(1)
    fns[(name, "update")] = lambda step=step: step(100)
    fns[(name, "between")] = lambda run=between, at=at: run.between(at(100), batches[0], 100)[0]
  for fn in fns.values():
    jax.block_until_ready(fn())  # compiles
  ms = {k: 1000 * v for k, v in timing.alternate(fns, repeats).items()}
  out = {}
  for base in ("ERK", "dense"):
    out[(base, "fixed mask")] = (ms[(base, "fixed")], 0.0)
  for name, (_, start) in _methods(10_000).items():
    plain = ms[("ERK" if start == "erk" else "dense", "fixed")]
    out[(name, "between steps")] = (plain, max(ms[(name, "between")] - plain, 0.0))
    out[(name, "in jit")] = (
      ms[(name, "quiet")],
      max(ms[(name, "update")] - ms[(name, "quiet")], 0.0),
    )
  return out


def _baseline(method: str) -> str:
  """The fixed-mask run a method's rows compare with: the same starting masks (RigL:
  random ERK at 99%; GMP: dense), so that both run the same weights."""
  return {"RigL": "ERK", "GMP": "dense"}.get(method, method)


def table(args) -> str:
  rows = []
  loops = bench_loops("lenet300100", 100, args.steps, args.repeats)
  for (name, kind), (quiet, busy) in loops.items():
    base_q, base_b = loops[(_baseline(name), "fixed mask")]
    rows.append(
      [
        "lenet300100",
        100,
        name,
        kind,
        f"{quiet:.3f}",
        f"{quiet / base_q:.3f}",
        f"{busy:.3f}",
        f"{busy / base_b:.3f}",
      ]
    )
    print(" | ".join(str(c) for c in rows[-1]), flush=True)
  if not args.skip_vgg:
    parts = bench_parts("vgg16", args.vgg_batch, args.vgg_repeats)
    for (name, kind), (step_ms, update_ms) in parts.items():
      base = parts[(_baseline(name), "fixed mask")][0]
      busy = step_ms + update_ms / 100
      rows.append(
        [
          "vgg16",
          args.vgg_batch,
          name,
          kind + ("" if kind == "fixed mask" else f" (update {update_ms:.0f} ms)"),
          f"{step_ms:.1f}",
          f"{step_ms / base:.3f}",
          f"{busy:.1f}",
          f"{busy / base:.3f}",
        ]
      )
      print(" | ".join(str(c) for c in rows[-1]), flush=True)
  return report.markdown_table(
    [
      "network",
      "batch",
      "method",
      "updates",
      "ms per step, no update",
      "vs fixed mask",
      "ms per step, updates every 100",
      "vs fixed mask",
    ],
    rows,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--vgg_batch", type=int, default=32)
  parser.add_argument("--vgg_repeats", type=int, default=5)
  parser.add_argument("--skip_vgg", action="store_true")
  parser.add_argument("--no_doc", action="store_true")
  args = parser.parse_args()
  load = report.load_average()
  body = table(args)
  print(body)
  if not args.no_doc:
    report.update_section(
      "jit-updates",
      f"""
## Mask updates inside the jitted step (`python -m benchmarks.jit_updates`)

{report.stamp()}; load average {load} at the start (a shared machine: ratios measured
side by side in one process, absolute times noisy). RigL (drop fraction 0.3, random/ERK
start at 99%) and GMP (to 99% from dense), masks moving every 100 steps, effective
tracking off; *between steps*: `MaskUpdates` from Python at the update steps (a host
round trip), *in jit*: `training.update_train_step` (`lax.cond` on the step inside the
one jitted program), against the same train step with a fixed mask, from the same
starting masks (the rows *ERK* and *dense*; RigL starts from ERK, GMP from dense). LeNet-300-100:
loops end to end (99 steps without an update; {args.steps} steps with updates at every
100th), each method's loops and its baseline's timed in turns, median of {args.repeats}
rounds after compilation, every step
donating its state to the next (`donate=True`, as `training.train` runs them). VGG-16:
single steps and updates from one state (not donated), every variant in turns (median
of {args.vgg_repeats}), per step with updates = step + update / 100 (an update's cost:
its step's time beyond a plain step).
Target: in-jit steps at most 5% slower than fixed-mask steps.

{body}
""",
    )


if __name__ == "__main__":
  main()
