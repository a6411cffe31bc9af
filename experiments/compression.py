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

Writes <out_dir>/compression.csv and <out_dir>/compression.png (effective against
direct compression, log-log), and prints the table.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import common
from experiments import configs
from sparsejax import effective, masks, models, pruning

FLAGS = flags.FLAGS
COLUMNS = ["arch", "pruner", "pruning_type", "seed", "target_compression",
           "direct_compression", "effective_compression", "direct_sparsity",
           "effective_sparsity", "active_units", "total_units", "active_units_per_layer",
           "unit_layers", "status", "seconds", "ranking_seconds"]


def default_compressions() -> list[float]:
  return [10 ** (0.2 * i) for i in range(1, 16)]


def _iterative(p: pruning.Pruner) -> bool:
  """Pruners whose ranking depends on the target sparsity."""
  return p.score in ("snip_iterative", "synflow") or p.quota == "synflow"


def sweep(arch: str, pruner_names: list[str], pruning_types: list[str],
          compressions: list[float], *, seed: int = 0, batches_fn=None,
          score_kwargs_fn=None, stop_at_disconnection: bool = True) -> list[dict]:
  """Rows of the compression table (dicts with :data:`COLUMNS`)."""
  for name in pruner_names:
    pruning.get_pruner(name)
  for t in pruning_types:
    if t not in pruning.PRUNING_TYPES:
      raise ValueError(f"pruning type {t!r} is not allowed; allowed: "
                       f"{', '.join(pruning.PRUNING_TYPES)}.")
  for c in compressions:
    common.check_compression_flag("compressions", c)
  model = models.create(arch)
  input_shape = models.input_shape(arch)
  key = jax.random.key(seed)
  variables = model.init(jax.random.fold_in(key, 0), jnp.ones((1,) + input_shape))
  rows = []
  for name in pruner_names:
    p = pruning.get_pruner(name)
    batches = batches_fn() if p.needs_data and batches_fn else None
    if p.after_training:
      logging.warning("%s scores trained weights; with no training here it scores the "
                      "initial weights.", name)
    kwargs = dict(key=jax.random.fold_in(key, 1), model=model, variables=variables,
                  input_shape=input_shape, batches=batches,
                  trained_params=variables["params"],
                  score_kwargs=score_kwargs_fn(p) if score_kwargs_fn else None)
    rows.extend(_sweep_pruner(arch, p, pruning_types, compressions, seed, model,
                              input_shape, variables, kwargs, stop_at_disconnection))
  return rows


def _sweep_pruner(arch, p, pruning_types, compressions, seed, model, input_shape, variables,
                  kwargs, stop_at_disconnection) -> list[dict]:
  """Rows of one pruner. A ranking serves both pruning types: one ranking for the
  whole sweep, or one per target for iterative pruners (their ranking depends on it)."""
  rows, stopped, ranking = [], set(), None
  for target in compressions:
    if len(stopped) == len(pruning_types):
      break
    sparsity = 1.0 - 1.0 / target
    rank_seconds = 0.0
    if p.score != "dense" and (ranking is None or _iterative(p)):
      start = time.time()
      ranking = pruning.ranking_for(p, sparsity=sparsity, **kwargs)
      rank_seconds = time.time() - start
    for pruning_type in pruning_types:
      if pruning_type in stopped:
        continue
      start = time.time()
      row = dict(arch=arch, pruner=p.name, pruning_type=pruning_type, seed=seed,
                 target_compression=target, ranking_seconds=rank_seconds)
      try:
        if p.score == "dense":
          m = masks.ones(variables["params"])
        else:
          m = pruning.masks_from_ranking(ranking, sparsity, pruning_type, model=model,
                                         input_shape=input_shape)
      except ValueError as err:
        # An effective target beyond the ranking's connected masks, or a direct target
        # beyond what the quota allows (uniform+ keeps the first layer dense): the end
        # of this pruner's curve, not an error.
        if "cannot be reached" not in str(err) and "cannot reach sparsity" not in str(err):
          raise
        logging.info("%s %s %.4gx: %s", p.name, pruning_type, target, err)
        rows.append(dict(row, status="unreachable", seconds=time.time() - start))
        stopped.add(pruning_type)
        continue
      conn = effective.connectivity(model, m, input_shape)
      eff_density = masks.density(conn.masks)
      per_layer = [f"{conn.active_units[k]}/{conn.total_units[k]}" for k in conn.active_units]
      rows.append(dict(
          row, direct_compression=masks.compression(m),
          effective_compression=masks.compression_of(eff_density),
          direct_sparsity=masks.direct_sparsity(m), effective_sparsity=1.0 - eff_density,
          active_units=sum(conn.active_units.values()),
          total_units=sum(conn.total_units.values()),
          active_units_per_layer=";".join(per_layer), unit_layers=";".join(conn.active_units),
          status="disconnected" if eff_density == 0 else "ok",
          seconds=time.time() - start))
      logging.info("%s %s %.4gx: direct %.4gx effective %.4gx (%.2fs + ranking %.2fs)",
                   p.name, pruning_type, target, rows[-1]["direct_compression"],
                   rows[-1]["effective_compression"], rows[-1]["seconds"], rank_seconds)
      if eff_density == 0 and stop_at_disconnection:
        stopped.add(pruning_type)
  return rows


def format_table(rows: list[dict]) -> str:
  head = (f"{'pruner':<18} {'type':<9} {'target':>9} {'direct':>9} {'effective':>10} "
          f"{'active units':>13}  status")
  lines = [head, "-" * len(head)]
  for r in rows:
    fmt = lambda v: "-" if v is None else ("inf" if math.isinf(v) else f"{v:.4g}")
    units = (f"{r['active_units']}/{r['total_units']}" if "active_units" in r else "-")
    lines.append(f"{r['pruner']:<18} {r['pruning_type']:<9} {fmt(r['target_compression']):>9} "
                 f"{fmt(r.get('direct_compression')):>9} "
                 f"{fmt(r.get('effective_compression')):>10} {units:>13}  {r['status']}")
  return "\n".join(lines)


def write_csv(path: str, rows: list[dict], columns: list[str] | None = None) -> None:
  """Writes ``rows`` (the ``columns``, default :data:`COLUMNS`) to ``path`` atomically."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns or COLUMNS, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  common.atomic_write_bytes(path, buf.getvalue().encode())


def plot(path: str, rows: list[dict], title: str) -> None:
  """Effective against direct compression, log-log, one line per pruner and type.

  As in the table, every row shows: infinite compressions (a disconnected network, or
  a target so high that no weight is kept) sit on a line at the top or right edge,
  and a line whose later targets are unreachable says from which target in its label.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 5.2))
  lines, unreachable = {}, {}
  for r in rows:
    key = (r["pruner"], r["pruning_type"])
    if r["status"] in ("ok", "disconnected"):
      lines.setdefault(key, []).append(r)
    elif r["status"] == "unreachable":
      unreachable.setdefault(key, r["target_compression"])
  finite = lambda key: [r[key] for rs in lines.values() for r in rs if math.isfinite(r[key])]
  top = max(finite("effective_compression") + [10.0]) * 2
  edge = max(finite("direct_compression") + [10.0]) * 2  # x of "no weight kept"
  any_edge = any(math.isinf(r["direct_compression"]) for rs in lines.values() for r in rs)
  for key in set(unreachable) - set(lines):
    lines[key] = []
  for (pruner, ptype), rs in lines.items():
    x = [r["direct_compression"] if math.isfinite(r["direct_compression"]) else edge
         for r in rs]
    y = [r["effective_compression"] if math.isfinite(r["effective_compression"]) else top
         for r in rs]
    style = "-" if ptype == "direct" else "--"
    label = f"{pruner} ({ptype})"
    if (pruner, ptype) in unreachable:
      label += f", unreachable from {unreachable[(pruner, ptype)]:.4g}x"
    (line,) = ax.plot(x, y, style, marker="o", ms=3, label=label)
    cut = [(a, b) for a, b, r in zip(x, y, rs) if r["status"] == "disconnected"]
    if cut:
      ax.plot(*zip(*cut), "x", color=line.get_color(), ms=8)
  right = edge * 1.5 if any_edge else edge * 0.75
  ax.plot([1, right], [1, right], ":", color="gray", lw=1, label="effective = direct")
  if any_edge:
    ax.axvline(edge, color="gray", lw=0.5)
    ax.text(edge * 1.05, 1.1, "no weight kept", fontsize=8, color="gray", rotation=90)
  ax.set_xlim(0.9, right)
  ax.set(xscale="log", yscale="log", xlabel="direct compression",
         ylabel="effective compression", title=title)
  ax.axhline(top, color="gray", lw=0.5)
  ax.text(1.05, top * 0.8, "x: disconnected", fontsize=8, color="gray")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  common.atomic_write_bytes(path, buf.getvalue())



def define_flags() -> None:
  """The command-line flags (defined only when run as a binary)."""
  flags.DEFINE_string("arch", "lenet300100", f"Network: {', '.join(models.MODELS)}.")
  flags.DEFINE_string("pruners", "random/uniform,random/erk,random/igq",
                      f"Comma-separated pruners: {', '.join(pruning.PRUNERS)}.")
  flags.DEFINE_string("pruning_types", "direct", "Comma-separated: direct, effective.")
  flags.DEFINE_string("compressions", "",
                      "Comma-separated compressions (10 = 90% sparse); default 10^(0.2 i) "
                      "for i = 1..15, up to 1000x.")
  flags.DEFINE_integer("seed", 0, "Seed for initial weights and random scores.")
  flags.DEFINE_string("out_dir", "out/compression", "Where the CSV and the plot go.")
  flags.DEFINE_integer("score_batches", 10, "Batches of training data for SNIP/GraSP.")
  flags.DEFINE_integer("score_batch_size", 0, "Batch size for data scores (0: the paper's).")
  flags.DEFINE_integer("snip_rounds", 300, "Rounds of iterative SNIP.")
  flags.DEFINE_integer("synflow_rounds", 100, "Rounds of SynFlow.")
  flags.DEFINE_bool("stop_at_disconnection", True,
                    "Stop a pruner's sweep at its first disconnected network.")
  common.define_data_flags()


def main(argv):
  del argv
  pruner_names = common.parse_list(FLAGS.pruners, name="pruners")
  types = common.parse_list(FLAGS.pruning_types, name="pruning_types")
  comps = (common.parse_list(FLAGS.compressions, float, "compressions")
           or default_compressions())
  common.check_run_args(out_dir=FLAGS.out_dir, compressions={"compressions": comps},
                        nonnegative={"seed": FLAGS.seed,
                                     "score_batch_size": FLAGS.score_batch_size},
                        counts={"score_batches": FLAGS.score_batches,
                                "snip_rounds": FLAGS.snip_rounds,
                                "synflow_rounds": FLAGS.synflow_rounds})
  spec = models.get_spec(FLAGS.arch)
  config = configs.get_config(FLAGS.arch)

  def batches_fn():
    return common.score_batches(
        spec.dataset, num_batches=FLAGS.score_batches,
        batch_size=FLAGS.score_batch_size or config.snip_batch_size or config.batch_size,
        seed=FLAGS.seed, synthetic=FLAGS.synthetic_data, manual_dir=FLAGS.tfds_manual_dir,
        data_dir=FLAGS.tfds_data_dir)

  def score_kwargs_fn(p):
    if p.score == "snip_iterative":
      return {"rounds": FLAGS.snip_rounds}
    if p.score == "synflow":
      return {"rounds": FLAGS.synflow_rounds}
    return None

  start = time.time()
  rows = sweep(FLAGS.arch, pruner_names, types, comps, seed=FLAGS.seed,
               batches_fn=batches_fn, score_kwargs_fn=score_kwargs_fn,
               stop_at_disconnection=FLAGS.stop_at_disconnection)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  write_csv(os.path.join(FLAGS.out_dir, "compression.csv"), rows)
  data_note = ""
  if any(pruning.get_pruner(n).needs_data for n in pruner_names):
    data_note = ", synthetic data" if FLAGS.synthetic_data else f", {spec.dataset}"
  plot(os.path.join(FLAGS.out_dir, "compression.png"), rows,
       f"{FLAGS.arch} (seed {FLAGS.seed}{data_note})")
  print(format_table(rows))
  print(f"\nWrote {FLAGS.out_dir}/compression.csv and compression.png "
        f"in {time.time() - start:.1f}s.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
