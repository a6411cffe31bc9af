r"""Measured inference time of trained runs' networks, masked against compacted.

For every finished run in --results_dir (LeNet-300-100 by default; result.json of
experiments.prune_train) whose pruner is one-shot (--pruners) and whose pruning type is
--pruning_type: re-create its pruned network from the recorded config with
prune_train's own pruning path (:func:`experiments.prune_train.prune_one_shot`: the
same seed, pruner, target, score batches), check the re-created masks reproduce the
recorded effective compression and active units (a run that does not is kept and
flagged ``reproduced=False``, never dropped), compact it (fold=False, logits checked
equal), and time masked and compacted inference in turns in this process
(:mod:`sparsejax.timing`): latency at batch 1, throughput at --batch.

  python -m experiments.compaction_latency --tfds_manual_dir=/work/shared/data/mnist

Writes --out (CSV of experiments.results.LATENCY_COLUMNS, atomically, rewritten after
every run so an interrupted sweep keeps its rows). Runs with status != ok are listed
with the reason and not timed. Pruners that score trained weights (neuron/l1,
neuron/magnitude, magnitude/*, lamp) need the dense run's weights: the recorded
dense_dir, else --dense_out/<dense run> (trained there by prune_train when missing;
deterministic on one machine, and the reproduction check says whether the masks came
out the same). Timing values are the pruned initial
weights: a dense kernel's speed does not depend on the values.
"""

from __future__ import annotations

import glob
import math
import os
import time

import jax
from absl import flags, logging

import sparsejax
from experiments import (
  checks,
  cli,
  compilation_cache,
  configs,
  datasource,
  plugins,
  prune_train,
  results,
  run_config,
)
from sparsejax import data, effective, models, pruning
from sparsejax import masks as masks_lib

FLAGS = flags.FLAGS


def recorded_config(result: dict):
  """The experiment config of a result.json: the arch's config file with every recorded
  field that it still has (lists back to tuples). Older results record no
  ``experiment``: then the pruner, type, target, seed and training fields, the rest
  being today's defaults (the reproduction check tells whether that matters)."""
  c = result["config"]
  exp = c.get("experiment")
  if exp is None:
    exp = {
      **{k: v for k, v in c["train"].items() if k != "dataset"},
      "pruner": c["pruner"],
      "pruning_type": c["pruning_type"],
      "seed": c["seed"],
      "target_sparsity": c["target_sparsity"],
      "compression": None,
    }
  config = configs.load(c["arch"])
  config.update({k: tuple(v) if isinstance(v, list) else v for k, v in exp.items() if k in config})
  return config


def find_runs(
  results_dir: str, pruners, pruning_type: str, arch: str, train_steps: int | None
) -> list[tuple[str, dict]]:
  """(path, result) of the matching result.json files under ``results_dir``, sorted;
  compacted runs (name suffix ``_compact``) are not re-timed.

  Raises:
    experiments.results.InvalidResultError: a result.json that is torn or incomplete
      (the file named).
  """
  out = []
  for path in sorted(glob.glob(os.path.join(results_dir, "**", "result.json"), recursive=True)):
    r = results.load(path)
    c = r["config"]
    if (
      c["arch"] != arch
      or c["pruner"] not in pruners
      or c["pruning_type"] != pruning_type
      or c.get("experiment", {}).get("compact")
      or (train_steps is not None and c["train"]["train_steps"] != train_steps)
    ):
      continue
    out.append((path, r))
  return out


def _dense_dir(config, source: datasource.DataSource, dense_out: str) -> str:
  """A folder holding the dense run's weights: the recorded dense_dir, else
  ``dense_out``'s run (trained by prune_train when missing)."""
  if config.dense_dir and os.path.exists(os.path.join(config.dense_dir, "weights", "final")):
    return config.dense_dir
  dense = prune_train.dense_config(config)
  dense.dense_dir = None
  folder = os.path.join(dense_out, run_config.run_name(dense))
  if not os.path.exists(os.path.join(folder, "weights", "final")):
    logging.info("Training the dense run %s (its weights are scored).", folder)
    prune_train.run(dense, out_dir=dense_out, source=source)
  return folder


def measure(
  path: str,
  result: dict,
  *,
  source: datasource.DataSource,
  dense_out: str,
  batch: int,
  repeats: int,
) -> dict:
  """One CSV row: the run re-created, checked, compacted and timed (or skipped)."""
  start = time.time()
  c = result["config"]
  row = dict(
    run=os.path.basename(os.path.dirname(path)),
    arch=c["arch"],
    pruner=c["pruner"],
    pruning_type=c["pruning_type"],
    seed=c["seed"],
    target_compression=c["target_compression"],
    train_steps=c["train"]["train_steps"],
    status=result.get("status", "ok"),
    test_accuracy=result.get("test_accuracy"),
    recorded_effective_compression=result.get("effective_compression"),
  )
  if row["status"] != "ok":
    return dict(
      row,
      reason=f"status {row['status']}: not timed"
      + (f" ({result['error'][:120]})" if result.get("error") else ""),
    )
  if c.get("synthetic_data") != source.synthetic:
    return dict(
      row,
      reason=f"recorded synthetic_data={c.get('synthetic_data')} but this "
      f"run reads synthetic={source.synthetic}: its scores would differ",
    )
  config = recorded_config(result)
  p = run_config.check_pruner(config.pruner)
  dspec = data.get_spec(config.dataset)
  input_shape = dspec.image_shape
  model = models.create(config.arch, dspec.num_classes)
  variables = models.init(model, jax.random.fold_in(jax.random.key(config.seed), 0), input_shape)
  net = sparsejax.trace(model, input_shape, variables=variables)  # as prune_train traces it
  if p.after_training:
    config.dense_dir = _dense_dir(config, source, dense_out)
  masks, start_params = prune_train.prune_one_shot(config, p, net, variables, source, dense_out)
  conn = effective.connectivity(net, masks)
  eff = masks_lib.compression(conn.masks)
  units = {k: [conn.active_units[k], conn.total_units[k]] for k in conn.active_units}
  recorded = row["recorded_effective_compression"]
  same = math.isclose(eff, recorded, rel_tol=1e-9) and units == result.get("active_units", units)
  notes = (
    []
    if same
    else [
      f"re-created masks differ from the run's: effective "
      f"{eff:.6g}x (recorded {recorded:.6g}x), active units {units} "
      f"(recorded {result.get('active_units')})"
    ]
  )
  pruned = {**variables, "params": start_params}
  new_model, new_vars, _, rec = prune_train.compact_network(model, pruned, masks, input_shape)
  t = prune_train.time_compaction(
    model,
    prune_train.masked_variables(pruned, masks),
    new_model,
    new_vars,
    input_shape,
    repeats=repeats,
    batch=batch,
  )
  before, after = rec["cost_before"], rec["cost_after"]
  return dict(
    row,
    reason="; ".join(notes),
    effective_compression=eff,
    reproduced=same,
    widths_before=";".join(map(str, rec["widths_before"])),
    widths=";".join(map(str, rec["widths"])),
    live_channel_fraction=rec["live_channel_fraction"],
    flops_dense=before["flops_dense"],
    flops_effective=before["flops_effective"],
    compact_flops=after["flops_dense"],
    params_dense=before["params_dense"],
    params_effective=before["params_effective"],
    compact_params=after["params_dense"],
    network_bytes=rec["network_bytes_before"],
    compact_network_bytes=rec["network_bytes_after"],
    logits_relative_difference=rec["logits_relative_difference"],
    masked_latency_ms=t["masked"]["latency_ms"],
    compact_latency_ms=t["compact"]["latency_ms"],
    latency_speedup=t["latency_speedup"],
    masked_throughput=t["masked"]["throughput"],
    compact_throughput=t["compact"]["throughput"],
    throughput_speedup=t["throughput_speedup"],
    batch=batch,
    repeats=repeats,
    load_average=t["load_average"],
    platform=t["platform"],
    seconds=time.time() - start,
  )


def define_flags() -> None:
  flags.DEFINE_string("results_dir", "results/lenet300100_mnist", "Where the runs are.")
  flags.DEFINE_string("out", "results/compaction/lenet300100_latency.csv", "The CSV.")
  flags.DEFINE_string("arch", "lenet300100", "Network of the runs.")
  flags.DEFINE_string(
    "pruners",
    ",".join(results.LATENCY_UNSTRUCTURED + results.LATENCY_NEURON),
    "Comma-separated one-shot pruners whose runs are timed.",
  )
  flags.DEFINE_string("pruning_type", "effective", "Pruning type of the runs.")
  flags.DEFINE_integer("train_steps", 3000, "Only runs of this many steps (0: any).")
  flags.DEFINE_string("seeds", "", "Comma-separated seeds (default: every seed).")
  flags.DEFINE_integer("batch", 256, "Throughput batch.")
  flags.DEFINE_integer("repeats", 20, "Timings per network and batch size (medians).")
  flags.DEFINE_string(
    "dense_out",
    "out/compaction_dense",
    "Where a missing dense run (scored by after-training pruners) trains.",
  )
  datasource.define_flags()
  compilation_cache.define_flags()
  plugins.define_flag()
  flags.declare_key_flag(plugins.FLAG)


def main(argv):
  del argv
  plugins.import_modules(plugins.from_flags())  # before the pruners are checked
  compilation_cache.from_flags()
  pruners = checks.parse_list(FLAGS.pruners, name="pruners")
  for name in pruners:
    if run_config.check_pruner(name, "--pruners") is None:
      raise checks.FlagError(
        f"--pruners: {name!r} is not a one-shot pruner (its masks move "
        "during training or come from IMP's rounds)."
      )
  seeds = checks.parse_list(FLAGS.seeds, int, "seeds")
  configs.check_arch(FLAGS.arch, "--arch")
  with checks.flag_errors():
    pruning.check_pruning_type(FLAGS.pruning_type, "--pruning_type")
  checks.check_existing_dir("results_dir", FLAGS.results_dir)
  checks.check_run_args(
    out_dir=os.path.dirname(FLAGS.out) or ".",
    counts={"batch": FLAGS.batch, "repeats": FLAGS.repeats},
    nonnegative={"train_steps": FLAGS.train_steps},
    seeds={"seeds": seeds},
  )
  source = datasource.DataSource.from_flags()
  runs = find_runs(
    FLAGS.results_dir, pruners, FLAGS.pruning_type, FLAGS.arch, FLAGS.train_steps or None
  )
  runs = [(p, r) for p, r in runs if not seeds or r["config"]["seed"] in seeds]
  logging.info("%d runs to re-create and time.", len(runs))
  rows = []
  for i, (path, result) in enumerate(runs):
    rows.append(
      measure(
        path,
        result,
        source=source,
        dense_out=FLAGS.dense_out,
        batch=FLAGS.batch,
        repeats=FLAGS.repeats,
      )
    )
    r = rows[-1]
    print(
      f"[{i + 1}/{len(runs)}] {r['run']}: "
      + (
        f"{r['masked_latency_ms']:.3g} -> {r['compact_latency_ms']:.3g} ms, widths "
        f"{r['widths']}, reproduced {r['reproduced']} (load {r['load_average']:.2f})"
        if r.get("masked_latency_ms") is not None
        else f"skipped: {r['reason']}"
      ),
      flush=True,
    )
    results.write_csv(FLAGS.out, rows, results.LATENCY_COLUMNS)
  flagged = [r["run"] for r in rows if r.get("reproduced") is False]
  print(
    f"Wrote {FLAGS.out}: {len(rows)} runs, {len(flagged)} not reproduced"
    + (f": {', '.join(flagged)}" if flagged else ".")
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
