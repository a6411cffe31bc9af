r"""Direct against effective compression for pruners at initialization.

For one network, each pruner and pruning type, and direct compressions 10^(0.2 i),
prune, compute the exact effective masks, and report direct and effective
compression and active units (method.md sections 1-2). No training, no data
download: data-driven pruners (SNIP, iterative SNIP, GraSP) read MNIST prepared
offline by TFDS from --tfds_manual_dir, or synthetic batches with --synthetic_data.

  python -m experiments.compression                      # LeNet-300-100, random pruners
  python -m experiments.compression --arch=vgg19 --pruners=random/uniform,random/igq
  python -m experiments.compression --pruners=snip,synflow \
      --pruning_types=direct,effective --tfds_manual_dir=../shared/data/mnist

A pruner or network of one's own reaches it with --import=my_module (a module name or
a path to a .py file that registers it; experiments.plugins).

Writes <out_dir>/compression.csv and <out_dir>/compression.png (effective against
direct compression, log-log), and prints the table.
"""

from __future__ import annotations

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
  plot,
  plugins,
  results,
)
from sparsejax import compact as compact_lib
from sparsejax import effective, errors, flops, masks, models, pruning

FLAGS = flags.FLAGS


def cost_columns(net, m) -> dict:
  """The FLOPs and parameter columns of one mask (:mod:`sparsejax.flops`) of the traced
  model ``net``."""
  c = flops.total(net, m)
  return {k: v for k, v in c.as_dict().items() if k.startswith(("flops_", "params_"))}


def compact_columns(net, variables, m) -> dict:
  """The compacted network's widths (';'-joined per channel space), live-channel
  fraction (kept / channels over the spaces), all parameters of its kernels, its dense
  and direct (masked) FLOPs, and max |logit difference| / max |logit| against the masked
  network (8 standard normal inputs, inference mode); a compaction that changes the
  function raises :class:`sparsejax.compact.CompactionMismatchError`."""
  p = compact_lib.plan(net, variables, m)
  new_model, new_v, new_m = compact_lib.compact(net, variables, m)
  rel = compact_lib.check_equal(net.model, variables, m, new_model, new_v, net.input_shape)
  c = flops.total(new_model, new_m, net.input_shape)
  return dict(
    compact_widths=";".join(str(len(k)) for k in p.kept.values()),
    live_channel_fraction=p.live_fraction(),
    compact_params=c.params_dense,
    compact_flops=c.flops_dense,
    compact_flops_direct=c.flops_direct,
    compact_logit_rel_diff=rel,
  )


def transformer_columns(net, effective_masks) -> dict:
  """The dead heads, MLP neurons and embedding dimensions ('dead/total') of a zoo
  transformer's effective masks (:func:`sparsejax.models.transformer.dead_parts`); {}
  for other networks."""
  if not isinstance(net.model, (models.ViT, models.GPT)):
    return {}
  parts = models.transformer.dead_parts(effective_masks, net.model.heads)
  return {f"dead_{k}": f"{d}/{t}" for k, (d, t) in parts.items()}


def default_compressions() -> list[float]:
  return [10 ** (0.2 * i) for i in range(1, 16)]


def sweep(
  arch: str,
  pruner_names: list[str],
  pruning_types: list[str],
  compressions: list[float],
  *,
  seed: int = 0,
  batches_fn=None,
  rounds: dict | None = None,
  stop_at_disconnection: bool = True,
  compact: bool = False,
) -> list[dict]:
  """Rows of the compression table (dicts with
  :data:`experiments.results.COMPRESSION_COLUMNS`).

  compact: also compact every mask (the ``compact_*`` columns).

  batches_fn: () -> score batches, called once per data-driven pruner.
  rounds: {pruner name: rounds} for iterative pruners (default: each pruner's).
  """
  for name in pruner_names:
    pruning.get_pruner(name)
  for t in pruning_types:
    pruning.check_pruning_type(t, "pruning_types")
  for c in compressions:
    checks.check_compression_flag("compressions", c)
  model = models.create(arch)
  input_shape = models.example_input(arch)  # float32 images, int32 token ids
  key = jax.random.key(seed)
  variables = models.init(model, jax.random.fold_in(key, 0), input_shape)
  net = sparsejax.trace(model, input_shape, variables=variables)  # one analysis for all
  rows = []
  for name in pruner_names:
    p = pruning.get_pruner(name)
    batches = batches_fn() if p.needs_data and batches_fn else None
    if p.after_training:
      logging.warning(
        "%s scores trained weights; with no training here it scores the initial weights.", name
      )
    kwargs = dict(
      key=jax.random.fold_in(key, 1),
      model=net,
      variables=variables,
      batches=batches,
      trained_params=variables["params"],
      rounds=(rounds or {}).get(name),
    )
    rows.extend(
      _sweep_pruner(
        arch,
        p,
        pruning_types,
        compressions,
        seed,
        net,
        variables,
        kwargs,
        stop_at_disconnection,
        compact,
      )
    )
  return rows


def _sweep_pruner(
  arch,
  p,
  pruning_types,
  compressions,
  seed,
  net,
  variables,
  kwargs,
  stop_at_disconnection,
  compact=False,
) -> list[dict]:
  """Rows of one pruner. A ranking serves both pruning types: one ranking for the
  whole sweep, or one per target for iterative pruners (their ranking depends on it)."""
  rows, stopped, ranking = [], set(), None
  for target in compressions:
    if len(stopped) == len(pruning_types):
      break
    sparsity = 1.0 - 1.0 / target
    rank_seconds = 0.0
    if p.score is not None and (ranking is None or p.target_dependent):
      start = time.time()
      ranking = pruning.ranking_for(p, sparsity=sparsity, **kwargs)
      rank_seconds = time.time() - start
    for pruning_type in pruning_types:
      if pruning_type in stopped:
        continue
      start = time.time()
      row = dict(
        arch=arch,
        pruner=p.name,
        pruning_type=pruning_type,
        seed=seed,
        target_compression=target,
        ranking_seconds=rank_seconds,
      )
      try:
        if p.score is None:
          m = net.ones()
        else:
          m = pruning.masks_from_ranking(ranking, sparsity, pruning_type, model=net)
      except errors.UnreachableSparsityError as err:
        # An effective target beyond the ranking's connected masks, or a direct target
        # beyond what the quota allows (uniform+ keeps the first layer dense): the end
        # of this pruner's curve, not an error.
        logging.info("%s %s %.4gx: %s", p.name, pruning_type, target, err)
        rows.append(dict(row, status="unreachable", seconds=time.time() - start))
        stopped.add(pruning_type)
        continue
      conn = effective.connectivity(net, m)
      eff_density = masks.density(conn.masks)
      per_layer = [f"{conn.active_units[k]}/{conn.total_units[k]}" for k in conn.active_units]
      rows.append(
        dict(
          row,
          direct_compression=masks.compression(m),
          effective_compression=masks.compression_of(eff_density),
          direct_sparsity=masks.direct_sparsity(m),
          effective_sparsity=1.0 - eff_density,
          active_units=sum(conn.active_units.values()),
          total_units=sum(conn.total_units.values()),
          active_units_per_layer=";".join(per_layer),
          unit_layers=";".join(conn.active_units),
          status="disconnected" if eff_density == 0 else "ok",
          **cost_columns(net, m),
          **transformer_columns(net, conn.masks),
          **(compact_columns(net, variables, m) if compact else {}),
          seconds=time.time() - start,
        )
      )
      logging.info(
        "%s %s %.4gx: direct %.4gx effective %.4gx (%.2fs + ranking %.2fs)",
        p.name,
        pruning_type,
        target,
        rows[-1]["direct_compression"],
        rows[-1]["effective_compression"],
        rows[-1]["seconds"],
        rank_seconds,
      )
      if eff_density == 0 and stop_at_disconnection:
        stopped.add(pruning_type)
  return rows


def format_table(rows: list[dict]) -> str:
  head = (
    f"{'pruner':<18} {'type':<9} {'target':>9} {'direct':>9} {'effective':>10} "
    f"{'active units':>13}  status"
  )
  lines = [head, "-" * len(head)]
  for r in rows:
    fmt = lambda v: "-" if v is None else ("inf" if math.isinf(v) else f"{v:.4g}")
    units = f"{r['active_units']}/{r['total_units']}" if "active_units" in r else "-"
    lines.append(
      f"{r['pruner']:<18} {r['pruning_type']:<9} {fmt(r['target_compression']):>9} "
      f"{fmt(r.get('direct_compression')):>9} "
      f"{fmt(r.get('effective_compression')):>10} {units:>13}  {r['status']}"
    )
  return "\n".join(lines)


def define_flags() -> None:
  """The command-line flags (defined only when run as a binary)."""
  flags.DEFINE_string("arch", "lenet300100", f"Network: {', '.join(configs.archs())}.")
  flags.DEFINE_string(
    "pruners",
    "random/uniform,random/erk,random/igq",
    f"Comma-separated pruners: {', '.join(pruning.PRUNERS)}.",
  )
  plugins.define_flag()
  flags.declare_key_flag(plugins.FLAG)
  flags.DEFINE_string("pruning_types", "direct", "Comma-separated: direct, effective.")
  flags.DEFINE_string(
    "compressions",
    "",
    "Comma-separated compressions (10 = 90% sparse); default 10^(0.2 i) "
    "for i = 1..15, up to 1000x.",
  )
  flags.DEFINE_integer("seed", 0, "Seed for initial weights and random scores.")
  flags.DEFINE_string("out_dir", "out/compression", "Where the CSV and the plot go.")
  flags.DEFINE_integer("score_batches", 10, "Batches of training data for SNIP/GraSP.")
  flags.DEFINE_integer("score_batch_size", 0, "Batch size for data scores (0: the paper's).")
  flags.DEFINE_integer(
    "rounds",
    None,
    "Rounds of every iterative pruner (SynFlow, iterative SNIP); default: each pruner's own.",
  )
  flags.DEFINE_bool(
    "stop_at_disconnection", True, "Stop a pruner's sweep at its first disconnected network."
  )
  flags.DEFINE_bool(
    "compact",
    False,
    "Also compact every mask (sparsejax.compact): "
    "compacted widths, live-channel fraction, parameters and FLOPs, each compaction "
    "checked to compute the masked network's logits.",
  )
  datasource.define_flags()
  compilation_cache.define_flags()


def main(argv):
  del argv
  plugins.import_modules(plugins.from_flags())  # before the pruners and network are checked
  compilation_cache.from_flags()
  pruner_names = checks.parse_list(FLAGS.pruners, name="pruners")
  types = checks.parse_list(FLAGS.pruning_types, name="pruning_types")
  comps = checks.parse_list(FLAGS.compressions, float, "compressions") or default_compressions()
  configs.check_arch(FLAGS.arch, "--arch")
  for name in pruner_names:
    if name not in pruning.PRUNERS:
      raise checks.FlagError(
        f"--pruners: {name!r} is not a known pruner; allowed: {', '.join(pruning.PRUNERS)}."
      )
  for t in types:
    with checks.flag_errors():
      pruning.check_pruning_type(t, "--pruning_types")
  checks.check_run_args(
    out_dir=FLAGS.out_dir,
    compressions={"compressions": comps},
    seeds={"seed": FLAGS.seed},
    nonnegative={"score_batch_size": FLAGS.score_batch_size},
    counts={"score_batches": FLAGS.score_batches},
    optional_counts={"rounds": FLAGS.rounds},
  )
  spec = models.get_spec(FLAGS.arch)
  config = configs.get_config(FLAGS.arch)
  source = datasource.DataSource.from_flags()
  available = source.num_examples_of(spec.dataset)
  batch = FLAGS.score_batch_size or config.snip_batch_size
  needs_data = any(pruning.PRUNERS[n].needs_data for n in pruner_names)
  # Synthetic data scores on the whole split instead (DataSource.score_batches).
  if needs_data and not source.synthetic and available is not None and batch > available:
    raise checks.FlagError(
      f"--score_batch_size={batch} (0: the network's snip_batch_size) exceeds the "
      f"{available} training examples of {source.describe(spec.dataset)}."
    )

  def batches_fn():
    return source.score_batches(
      spec.dataset,
      num_batches=FLAGS.score_batches,
      batch_size=FLAGS.score_batch_size or config.snip_batch_size,
      seed=FLAGS.seed,
      input_shape=spec.input_shape,
    )

  start = time.time()
  rounds = None if FLAGS.rounds is None else {n: FLAGS.rounds for n in pruner_names}
  rows = sweep(
    FLAGS.arch,
    pruner_names,
    types,
    comps,
    seed=FLAGS.seed,
    batches_fn=batches_fn,
    rounds=rounds,
    stop_at_disconnection=FLAGS.stop_at_disconnection,
    compact=FLAGS.compact,
  )
  data_name = source.describe(spec.dataset)
  for r in rows:
    r["data"] = data_name if pruning.get_pruner(r["pruner"]).needs_data else "-"
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  results.write_csv(
    os.path.join(FLAGS.out_dir, "compression.csv"), rows, results.COMPRESSION_COLUMNS
  )
  plot.plot_curves(
    FLAGS.arch, rows, os.path.join(FLAGS.out_dir, "compression.png"), seed=FLAGS.seed
  )
  print(format_table(rows))
  print(
    f"\nWrote {FLAGS.out_dir}/compression.csv and compression.png in {time.time() - start:.1f}s."
  )


if __name__ == "__main__":
  cli.run(main, define_flags)
