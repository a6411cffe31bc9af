r"""Figures and tables of the paper reproduction from the files under results/.

  python -m experiments.plot          # reads results/, writes docs/figures/*.png and
                                      # the generated tables of docs/results.md

Inputs:
- results/init_curves/<arch>/<pruner>.csv (experiments.init_curves): direct and
  effective compression and active units per layer at initialization.
- results/<arch>_<dataset>/<run>/result.json (experiments.sweep / prune_train): test
  accuracy of pruned-and-trained networks.
- results/compaction/lenet300100_latency.csv (experiments.compaction_latency): masked
  and compacted inference time of the trained LeNet-300-100 runs' networks;
  results/compaction/<arch>/compression.csv (experiments.compression --compact;
  VGG-19 and ResNet-18 here): live channels and compacted FLOPs at initialization.

Outputs (docs/figures/): init_<arch>.png (effective against direct compression,
log-log, one colour per pruner), units_<arch>.png (fraction of active units per layer
at a few compressions), accuracy_<arch>_t<steps>.png (test accuracy against direct
and against effective compression, one panel per pruning type, seed spread as error
bars), speed_lenet300100_t<steps>.png (test accuracy against effective compression
and against the compacted network's measured inference time, unstructured against
neuron pruners), compaction_channels_{compression,flops}.png (live-channel fraction
and compacted FLOPs of VGG-19 and ResNet-18 against effective compression and against
effective FLOPs). The markdown tables go between the <!-- name:start/end --> markers of
docs/results.md; the hand-written text around them is left alone.

Reads files only (through experiments.results): no JAX, Flax or network is imported,
and matplotlib only inside the functions that draw. Every network and pruner is
drawn: the tables below give the paper's ones their titles, order and colours, and
any other gets its name as title and a colour of :data:`EXTRA_COLOURS`.
"""

from __future__ import annotations

import glob
import io
import math
import os
import statistics

from absl import flags, logging

from experiments import checks, cli, procedures, results

FLAGS = flags.FLAGS

# One colour per pruner, the same in every figure.
PRUNER_ORDER = (
  "dense",
  "random/uniform",
  "random/uniform_plus",
  "random/erk",
  "random/igq",
  "random/snip",
  "random/synflow",
  "snip",
  "snip/iterative",
  "grasp",
  "synflow",
  "lamp",
  "magnitude/global",
  "magnitude/igq",
  "imp",
  "gmp",
  "set",
  "rigl",
  "ste",
  "acdc",
  "gmp/block4x4",
  "block/4x4/mean",
  "block/4x4/max",
  "block/8x8/mean",
  "block/8x8/max",
  "neuron/l1",
  "neuron/magnitude",
  "neuron/snip",
  "neuron/synflow",
  "neuron/random",
)
# Display names of the paper's networks, in the order figures and tables list networks
# (others follow by name, titled by their registered name).
ARCH_TITLES = {
  "lenet300100": "LeNet-300-100",
  "lenet5": "LeNet-5",
  "vgg16": "VGG-16",
  "vgg19": "VGG-19",
  "resnet18": "ResNet-18",
  "vit": "ViT",
  "gpt": "GPT (byte-level)",
}


# Quotas borrowed from a pruner share its hue (random/snip light red, snip red).
COLOURS = {
  "dense": "#000000",
  "random/uniform": "#1f77b4",
  "random/uniform_plus": "#aec7e8",
  "random/erk": "#ff7f0e",
  "random/igq": "#2ca02c",
  "random/snip": "#ff9896",
  "snip": "#d62728",
  "snip/iterative": "#8c564b",
  "random/synflow": "#c5b0d5",
  "synflow": "#9467bd",
  "grasp": "#e377c2",
  "lamp": "#bcbd22",
  "magnitude/global": "#17becf",
  "magnitude/igq": "#7f7f7f",
  "imp": "#000080",
  "gmp": "#e6550d",
  "set": "#31a354",
  "rigl": "#6a3d9a",
  "ste": "#b15928",
  "acdc": "#c51b7d",
  "gmp/block4x4": "#fdae6b",
  "block/4x4/mean": "#80cdc1",
  "block/4x4/max": "#018571",
  "block/8x8/mean": "#b2abd2",
  "block/8x8/max": "#5e3c99",
  # structured (neuron) pruners: darker shades of their weight scores' hues
  "neuron/l1": "#004d4d",
  "neuron/magnitude": "#0b6e7a",
  "neuron/snip": "#7f0000",
  "neuron/synflow": "#3f007d",
  "neuron/random": "#08306b",
}


#: Colours of pruners and methods not in :data:`COLOURS` (a user's, through --import),
#: handed out in order of first use in this process: Dark2, then tab20b's dark shades;
#: none is a colour of :data:`COLOURS`.
EXTRA_COLOURS = (
  "#1b9e77",
  "#d95f02",
  "#7570b3",
  "#e7298a",
  "#66a61e",
  "#e6ab02",
  "#a6761d",
  "#393b79",
  "#637939",
  "#8c6d31",
  "#843c39",
  "#7b4173",
)
_extra_colours: dict[str, str] = {}


def _colour(pruner: str) -> str:
  """The pruner's colour in every figure: its own (:data:`COLOURS`), else the next of
  :data:`EXTRA_COLOURS` (cycling), kept for the rest of the process."""
  if pruner in COLOURS:
    return COLOURS[pruner]
  if pruner not in _extra_colours:
    _extra_colours[pruner] = EXTRA_COLOURS[len(_extra_colours) % len(EXTRA_COLOURS)]
  return _extra_colours[pruner]


def _arch_order(archs) -> list[str]:
  """Networks in :data:`ARCH_TITLES`'s order, any other after them by name."""
  known = list(ARCH_TITLES)
  return sorted(set(archs), key=lambda a: (known.index(a) if a in known else len(known), a))


def _order(pruners) -> list[str]:
  return sorted(set(pruners), key=lambda p: (PRUNER_ORDER.index(p) if p in PRUNER_ORDER else 99, p))


def _pyplot():
  """``matplotlib.pyplot`` on the Agg backend. Imported when a figure is drawn, not with
  this module: reading results and writing tables need no matplotlib."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  _pyplot().close(fig)
  results.atomic_write(path, buf.getvalue())


def _fmt(x: float | None, digits: int = 4) -> str:
  if x is None:
    return "-"
  if math.isinf(x):
    return "inf"
  return f"{x:.{digits}g}"


# ---------------------------------------------------------------- loading


def load_curves(curves_dir: str) -> dict[str, list[dict]]:
  """{arch: rows of every pruner's CSV} from experiments.init_curves."""
  out = {}
  for path in sorted(glob.glob(os.path.join(curves_dir, "*", "*.csv"))):
    arch = os.path.basename(os.path.dirname(path))
    out.setdefault(arch, []).extend(results.read_compression_csv(path))
  return out


def grid_target(compression: float) -> float:
  """A target compression to 4 significant digits: the key runs and timings are grouped
  by (63.1 given on a command line and 10^1.8 = 63.0957 are one target)."""
  return float(f"{compression:.4g}")


def load_runs(results_dir: str) -> list[dict]:
  """One flat record per result.json under ``results_dir`` (any depth); targets by
  :func:`grid_target`."""
  runs = []
  for path in sorted(glob.glob(os.path.join(results_dir, "**", "result.json"), recursive=True)):
    r = results.load(path)  # InvalidResultError names a torn or incomplete file.
    c = r["config"]
    runs.append(
      dict(
        arch=c["arch"],
        dataset=c["dataset"],
        pruner=c["pruner"],
        pruning_type=c["pruning_type"],
        seed=c["seed"],
        target_compression=grid_target(c["target_compression"]),
        train_steps=c["train"]["train_steps"],
        status=r.get("status", "ok"),
        direct_compression=r.get("direct_compression"),
        effective_compression=r.get("effective_compression"),
        test_accuracy=r.get("test_accuracy"),
        wall_time=r.get("wall_time"),
        steps_per_second=r.get("steps_per_second"),
        mask_updates=r.get("mask_updates"),
        diverged_step=r.get("diverged_step"),
        compact=bool(c.get("experiment", {}).get("compact")),
        path=path,
      )
    )
  return runs


def _group(runs: list[dict]) -> dict[tuple, list[dict]]:
  """Runs grouped by (pruner, pruning_type, target compression) over seeds."""
  groups = {}
  for r in runs:
    key = (r["pruner"], r["pruning_type"], round(r["target_compression"], 6))
    groups.setdefault(key, []).append(r)
  return groups


def _summary(rs: list[dict]) -> dict:
  """Mean and range over seeds of accuracy and compressions (trained runs only; a
  group with none is 'diverged' when a seed diverged, else 'unreachable')."""
  ok = [r for r in rs if r["status"] not in ("unreachable", "diverged")]
  if not ok:
    diverged = [r for r in rs if r["status"] == "diverged"]
    if diverged:
      return {
        "status": "diverged",
        "seeds": len(rs),
        "direct": diverged[0].get("direct_compression"),
        "effective": diverged[0].get("effective_compression"),
      }
    return {"status": "unreachable", "seeds": len(rs)}
  acc = [r["test_accuracy"] for r in ok]
  return {
    "status": "disconnected" if any(r["status"] == "disconnected" for r in ok) else "ok",
    "seeds": len(ok),
    "accuracy": statistics.fmean(acc),
    "accuracy_min": min(acc),
    "accuracy_max": max(acc),
    "direct": statistics.fmean(r["direct_compression"] for r in ok),
    "effective": (
      math.inf
      if any(math.isinf(r["effective_compression"]) for r in ok)
      else statistics.fmean(r["effective_compression"] for r in ok)
    ),
  }


# ---------------------------------------------------------------- figures


def plot_curves(arch: str, rows: list[dict], path: str, seed: int = 0) -> None:
  """Effective against direct compression (log-log): lines for the direct pruning
  type, crosses for the effective type, x where the network disconnects. The one
  compression-curve figure (experiments.compression and the reproduction's)."""
  plt = _pyplot()

  fig, ax = plt.subplots(figsize=(7.2, 5.6))
  # Infinite compressions sit on edge lines, as in the table: a disconnected network at
  # the top, a target so high that no weight is kept at the right.
  measured = [r for r in rows if r["status"] in ("ok", "disconnected")]
  finite = [
    r["effective_compression"]
    for r in measured
    if r["status"] == "ok" and math.isfinite(r["effective_compression"])
  ]
  top = max(finite + [10.0]) * 3
  edge = (
    max(
      [r["direct_compression"] for r in measured if math.isfinite(r["direct_compression"])] + [10.0]
    )
    * 2
  )
  any_edge = any(math.isinf(r["direct_compression"]) for r in measured)
  right = edge * 1.5 if any_edge else edge * 0.75
  data_notes = sorted({r.get("data", "-") for r in rows} - {"-", ""})
  for pruner in _order(r["pruner"] for r in rows):
    colour = _colour(pruner)
    for ptype, style in (("direct", "-"), ("effective", "")):
      mine = [r for r in rows if r["pruner"] == pruner and r["pruning_type"] == ptype]
      rs = [r for r in mine if r["status"] in ("ok", "disconnected")]
      unreachable = [r["target_compression"] for r in mine if r["status"] == "unreachable"]
      label = None
      if ptype == "direct" or (unreachable and not rs):
        label = pruner
      if unreachable and label:
        label += f" ({ptype} unreachable from {min(unreachable):.4g}x)"
      if not rs:
        if label:
          ax.plot([], [], style or "-", color=colour, label=label)
        continue
      x = [r["direct_compression"] if math.isfinite(r["direct_compression"]) else edge for r in rs]
      y = [min(r["effective_compression"], top) for r in rs]
      ax.plot(
        x,
        y,
        style,
        marker="o" if ptype == "direct" else "+",
        ms=3 if ptype == "direct" else 7,
        color=colour,
        lw=1.3,
        label=label,
      )
      cut = [(a, b) for a, b, r in zip(x, y, rs) if r["status"] == "disconnected"]
      if cut:
        ax.plot(*zip(*cut), "x", color=colour, ms=9, mew=2)
  if any_edge:
    ax.axvline(edge, color="gray", lw=0.5)
    ax.text(edge * 1.05, 1.1, "no weight kept", fontsize=8, color="gray", rotation=90)
  ax.plot([1, right], [1, right], ":", color="gray", lw=1)
  ax.axhline(top, color="gray", lw=0.5)
  ax.text(1.1, top * 0.75, "disconnected (x)", fontsize=8, color="gray")
  ax.set(
    xscale="log",
    yscale="log",
    xlim=(1, right),
    xlabel="direct compression",
    ylabel="effective compression",
  )
  note = f"; data scores: {', '.join(data_notes)}" if data_notes else ""
  ax.set_title(
    f"{ARCH_TITLES.get(arch, arch)} at initialization (seed {seed}{note})\n"
    "lines: pruned to direct target; +: pruned to effective target",
    fontsize=9,
  )
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", ncol=2)
  fig.tight_layout()
  _save(fig, path)


def _nearest(rows: list[dict], target: float) -> dict | None:
  rs = [r for r in rows if r["status"] != "unreachable"]
  if not rs:
    return None
  best = min(rs, key=lambda r: abs(math.log(r["target_compression"] / target)))
  return best if abs(math.log(best["target_compression"] / target)) < 0.05 else None


def plot_units(arch: str, rows: list[dict], path: str, targets=(10.0, 100.0, 1000.0)) -> None:
  """Fraction of active units per layer, one panel per direct compression, one line
  per pruner (direct pruning type)."""
  plt = _pyplot()

  direct_rows = [r for r in rows if r["pruning_type"] == "direct"]
  fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.8), sharey=True)
  for ax, target in zip(axes, targets):
    names = None
    for pruner in _order(r["pruner"] for r in direct_rows):
      r = _nearest([q for q in direct_rows if q["pruner"] == pruner], target)
      if r is None or not r.get("active_units_per_layer"):
        continue
      counts = [tuple(int(v) for v in s.split("/")) for s in r["active_units_per_layer"].split(";")]
      names = r["unit_layers"].split(";")
      ax.plot(
        range(len(counts)),
        [a / t for a, t in counts],
        "-o",
        ms=3,
        color=_colour(pruner),
        label=pruner,
      )
    if names:
      ax.set_xticks(range(len(names)))
      ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_title(f"{target:g}x direct", fontsize=9)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
  axes[0].set_ylabel("fraction of units active")
  handles, labels = [], []
  for ax in axes:  # One legend with every pruner that appears in any panel.
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  axes[0].legend(handles, labels, fontsize=7, loc="lower left")
  fig.suptitle(
    f"{ARCH_TITLES.get(arch, arch)}: active units per layer at initialization", fontsize=10
  )
  fig.tight_layout()
  _save(fig, path)


def plot_accuracy(runs: list[dict], path: str, title: str) -> None:
  """Test accuracy against direct (left) and effective (right) compression, one row
  per pruning type; error bars span the seeds."""
  plt = _pyplot()

  groups = {k: _summary(v) for k, v in _group(runs).items()}
  dense = [g for (p, _, _), g in groups.items() if p == "dense" and "accuracy" in g]
  fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), sharey=True)
  for row, ptype in enumerate(("direct", "effective")):
    for col, xkey in enumerate(("direct", "effective")):
      ax = axes[row, col]
      for pruner in _order(p for p, _, _ in groups):
        if pruner == "dense":
          continue
        pts = sorted(
          (g[xkey], g)
          for (p, t, _), g in groups.items()
          if p == pruner and t == ptype and "accuracy" in g and math.isfinite(g[xkey])
        )
        if not pts:
          continue
        x = [a for a, _ in pts]
        y = [g["accuracy"] for _, g in pts]
        err = [
          [g["accuracy"] - g["accuracy_min"] for _, g in pts],
          [g["accuracy_max"] - g["accuracy"] for _, g in pts],
        ]
        style = "--" if pruner.startswith("random/") else "-"
        ax.errorbar(
          x,
          y,
          yerr=err,
          fmt=style + "o",
          ms=3,
          lw=1.2,
          capsize=2,
          color=_colour(pruner),
          label=pruner,
        )
      # Diverged runs have no accuracy: an X on the bottom edge at their compression.
      gone = [
        g[xkey]
        for (p, t, _), g in groups.items()
        if t == ptype
        and p != "dense"
        and g["status"] == "diverged"
        and g.get(xkey) is not None
        and math.isfinite(g[xkey])
      ]
      if gone:
        ax.plot(
          gone,
          [0.02] * len(gone),
          "X",
          color="red",
          ms=7,
          transform=ax.get_xaxis_transform(),
          label="diverged" if row == 0 and col == 1 else None,
        )
      for g in dense:
        ax.axhline(g["accuracy"], color="black", lw=0.8, ls=":")
      ax.set_xscale("log")
      ax.set_xlabel(f"{xkey} compression")
      ax.set_title(f"pruned to a {ptype} target; x = {xkey} compression", fontsize=9)
      ax.grid(True, which="both", alpha=0.3)
    axes[row, 0].set_ylabel("test accuracy")
  axes[0, 1].legend(fontsize=7, loc="lower left", ncol=2)
  fig.suptitle(title + " (dotted: dense)", fontsize=10)
  fig.tight_layout()
  _save(fig, path)


#: At-init pruners and IMP drawn beside the moving-mask methods.
DYNAMIC_REFERENCES = ("random/igq", "snip", "synflow", "imp")


def plot_dynamic_accuracy(runs: list[dict], path: str, title: str) -> None:
  """Test accuracy against effective compression of the moving-mask methods (solid:
  direct update target, dashed: effective), beside at-init pruners and IMP (thin)."""
  plt = _pyplot()

  groups = {k: _summary(v) for k, v in _group(runs).items()}
  fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
  for ax, xkey in zip(axes, ("direct", "effective")):
    for pruner in _order(p for p, _, _ in groups):
      dynamic = pruner in procedures.DYNAMIC
      if not dynamic and pruner not in DYNAMIC_REFERENCES:
        continue
      for ptype, style in (("direct", "-"), ("effective", "--")):
        pts = sorted(
          (g[xkey], g)
          for (p, t, _), g in groups.items()
          if p == pruner and t == ptype and "accuracy" in g and math.isfinite(g[xkey])
        )
        if not pts or (not dynamic and ptype == "direct" and pruner != "imp"):
          continue
        err = [
          [g["accuracy"] - g["accuracy_min"] for _, g in pts],
          [g["accuracy_max"] - g["accuracy"] for _, g in pts],
        ]
        ax.errorbar(
          [a for a, _ in pts],
          [g["accuracy"] for _, g in pts],
          yerr=err,
          fmt=style + "o",
          ms=3 if dynamic else 2,
          lw=1.6 if dynamic else 0.8,
          capsize=2,
          color=_colour(pruner),
          alpha=1.0 if dynamic else 0.6,
          label=f"{pruner} ({ptype} target)",
        )
    for g in [g for (p, _, _), g in groups.items() if p == "dense" and "accuracy" in g]:
      ax.axhline(g["accuracy"], color="black", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(f"{xkey} compression at the end of training")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("test accuracy")
  axes[1].legend(fontsize=7, loc="lower left", ncol=2)
  fig.suptitle(title + " (dotted: dense; thin: at-init pruners and IMP for reference)", fontsize=10)
  fig.tight_layout()
  _save(fig, path)


def plot_dead_weights(
  runs: list[dict], path: str, title: str, targets=(25.118864315, 158.48931925, 1000.0)
) -> None:
  """Fraction of kept weights that are dead (on no input-output path) at every mask
  update, per moving-mask method and update target; one panel per target (seed 0)."""
  plt = _pyplot()

  fig, axes = plt.subplots(1, len(targets), figsize=(4.6 * len(targets), 4), sharey=True)
  for ax, target in zip(axes, targets):
    for r in sorted(runs, key=lambda r: (r["pruner"], r["pruning_type"])):
      if (
        r["pruner"] not in procedures.DYNAMIC
        or r["seed"] != 0
        or not r.get("mask_updates")
        or not math.isclose(r["target_compression"], target, rel_tol=1e-6)
      ):
        continue
      ups = [u for u in r["mask_updates"] if "dead_kept" in u and u["kept"]]
      ax.plot(
        [u["step"] for u in ups],
        [u["dead_kept"] / u["kept"] for u in ups],
        "-" if r["pruning_type"] == "direct" else "--",
        marker=".",
        ms=3,
        color=_colour(r["pruner"]),
        label=f"{r['pruner']} ({r['pruning_type']})",
      )
    ax.set_title(f"target {target:.4g}x", fontsize=9)
    ax.set_xlabel("training step")
    ax.grid(True, alpha=0.3)
  axes[0].set_ylabel("dead kept weights / kept weights")
  if axes[0].get_legend_handles_labels()[0]:
    axes[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  _save(fig, path)


def dynamic_table(runs: list[dict]) -> str:
  """Moving-mask methods: per target, accuracy and the compressions reached at the end
  (direct / effective; effective/direct is the hidden gap), mean over seeds."""
  groups = {k: _summary(v) for k, v in _group(runs).items()}
  targets = sorted({t for (p, _, t) in groups if p in procedures.DYNAMIC})
  header = ["method", "update target"] + [f"{t:.4g}x" for t in targets]
  rows = []
  for pruner in _order(p for p, _, _ in groups if p in procedures.DYNAMIC):
    for ptype in ("direct", "effective"):
      cells = []
      for t in targets:
        g = groups.get((pruner, ptype, t))
        if g is None:
          cells.append("")
        elif g["status"] == "unreachable":
          cells.append("unreachable")
        elif "accuracy" not in g:
          cells.append(g["status"])
        else:
          gap = (g["effective"] / g["direct"]) if math.isfinite(g["effective"]) else math.inf
          cells.append(
            f"{g['accuracy']:.4f} ({_fmt(g['direct'], 3)}x / "
            f"{_fmt(g['effective'], 3)}x, gap {_fmt(gap, 3)})"
          )
      rows.append([pruner, ptype] + cells)
  return results.markdown_table(header, rows)


# ---------------------------------------------------------------- tables


def accuracy_table(runs: list[dict]) -> str:
  """Pruner x type rows; per target: accuracy (effective compression)."""
  groups = {k: _summary(v) for k, v in _group(runs).items()}
  targets = sorted({t for (p, _, t) in groups if p != "dense"})
  header = ["pruner", "type"] + [f"{t:.4g}x" for t in targets]
  rows = []
  for pruner in _order(p for p, _, _ in groups):
    types = ("direct",) if pruner == "dense" else ("direct", "effective")
    for ptype in types:
      cells = []
      for t in [1.0] if pruner == "dense" else targets:
        g = groups.get((pruner, ptype, t))
        if g is None:
          cells.append("")
        elif g["status"] in ("unreachable", "diverged"):
          cells.append(g["status"])
        else:
          spread = f" ±{(g['accuracy_max'] - g['accuracy_min']) / 2:.3f}" if g["seeds"] > 1 else ""
          other = g["effective"] if ptype == "direct" else g["direct"]
          note = "disconnected" if math.isinf(other) else f"{_fmt(other, 3)}x"
          cells.append(f"{g['accuracy']:.4f}{spread} ({note})")
      if pruner == "dense":
        cells += [""] * (len(targets) - 1)
      rows.append([pruner, ptype] + cells)
  return results.markdown_table(header, rows)


RANDOM = ("random/uniform", "random/erk", "random/igq", "random/snip", "random/synflow")
AT_INIT = ("snip", "snip/iterative", "grasp", "synflow")


def kendall_tau(a: list[str], b: list[str]) -> float:
  """Kendall's tau between two orders of the same items (1: same, -1: reversed)."""
  pos = {x: i for i, x in enumerate(b)}
  n, s = len(a), 0
  for i in range(n):
    for j in range(i + 1, n):
      s += 1 if pos[a[i]] < pos[a[j]] else -1
  return s / (n * (n - 1) / 2) if n > 1 else 1.0


def claims_table(runs: list[dict]) -> str:
  """Per target compression: pruners ordered by accuracy when pruned to the direct and
  to the effective target, Kendall's tau between the two orders, the best random pruner
  against the best data/SynFlow pruner at initialization (effective targets), and IGQ
  against the other random quotas (effective targets)."""
  groups = {k: _summary(v) for k, v in _group(runs).items()}
  targets = sorted({t for (p, _, t) in groups if p != "dense"})
  header = [
    "target",
    "order, direct targets (best first)",
    "order, effective targets",
    "Kendall tau",
    "best random (eff.)",
    "best at-init (eff.)",
    "IGQ rank among random",
  ]
  rows = []
  acc = lambda p, t, x: groups.get((p, t, x), {}).get("accuracy")
  for x in targets:
    common_pruners = [
      p
      for p in _order(p for p, _, _ in groups)
      if p != "dense" and acc(p, "direct", x) is not None and acc(p, "effective", x) is not None
    ]
    if len(common_pruners) < 2:
      continue  # e.g. the extra 100x effective runs of the schedule comparison
    by_d = sorted(common_pruners, key=lambda p: -acc(p, "direct", x))
    by_e = sorted(common_pruners, key=lambda p: -acc(p, "effective", x))
    best = lambda names: max(
      ((acc(p, "effective", x), p) for p in names if acc(p, "effective", x) is not None),
      default=None,
    )
    br, bi = best(RANDOM), best(AT_INIT)
    rand = [p for p in by_e if p in RANDOM]
    rows.append(
      [
        f"{x:.4g}x",
        ", ".join(by_d),
        ", ".join(by_e),
        f"{kendall_tau(by_d, by_e):.2f}",
        "-" if br is None else f"{br[1]} {br[0]:.4f}",
        "-" if bi is None else f"{bi[1]} {bi[0]:.4f}",
        f"{rand.index('random/igq') + 1} of {len(rand)}" if "random/igq" in rand else "-",
      ]
    )
  return results.markdown_table(header, rows)


def schedule_table(short: list[dict], full: list[dict]) -> str:
  """The same runs with the short and the full schedule, side by side."""
  header = [
    "pruner",
    "type",
    "target",
    "effective",
    "accuracy (short)",
    "accuracy (full)",
    "difference",
    "full-run wall time",
  ]
  rows = []
  short_by = {
    (r["pruner"], r["pruning_type"], round(r["target_compression"], 6), r["seed"]): r for r in short
  }
  for r in sorted(
    full,
    key=lambda r: (
      _order([r["pruner"]])[0] != "dense",
      PRUNER_ORDER.index(r["pruner"]) if r["pruner"] in PRUNER_ORDER else 99,
    ),
  ):
    s = short_by.get((r["pruner"], r["pruning_type"], round(r["target_compression"], 6), r["seed"]))
    if r["test_accuracy"] is None:
      continue
    acc_s = s["test_accuracy"] if s and s["test_accuracy"] is not None else None
    rows.append(
      [
        r["pruner"],
        r["pruning_type"],
        f"{r['target_compression']:.4g}x",
        f"{_fmt(r['effective_compression'])}x",
        "-" if acc_s is None else f"{acc_s:.4f}",
        f"{r['test_accuracy']:.4f}",
        "-" if acc_s is None else f"{r['test_accuracy'] - acc_s:+.4f}",
        f"{r['wall_time'] / 60:.1f} min",
      ]
    )
  return results.markdown_table(header, rows)


def curves_table(curves: dict[str, list[dict]], targets=(10.0, 100.0, 1000.0)) -> str:
  """Per network and pruner: effective compression at direct targets, the first
  disconnected direct compression, and the direct compression needed for 100x and
  1000x effective."""
  header = (
    ["network", "pruner"]
    + [f"eff. at {t:g}x direct" for t in targets]
    + ["disconnects at", "direct for 100x eff.", "direct for 1000x eff."]
  )
  rows = []
  for arch in _arch_order(curves):
    rs = curves[arch]
    for pruner in _order(r["pruner"] for r in rs):
      direct = [
        r
        for r in rs
        if r["pruner"] == pruner and r["pruning_type"] == "direct" and r["status"] != "unreachable"
      ]
      eff = [r for r in rs if r["pruner"] == pruner and r["pruning_type"] == "effective"]
      cells = []
      cut = [r for r in direct if r["status"] == "disconnected"]
      for t in targets:
        r = _nearest(direct, t)
        if r is None and cut and cut[0]["direct_compression"] < t:
          cells.append("disconnected")
          continue
        cells.append(
          "-"
          if r is None
          else (
            "disconnected"
            if r["status"] == "disconnected"
            else f"{_fmt(r['effective_compression'])}x"
          )
        )
      cells.append(
        f"{_fmt(cut[0]['direct_compression'])}x"
        if cut
        else f"> {_fmt(max((r['direct_compression'] for r in direct), default=None))}x"
      )
      for t in (100.0, 1000.0):
        r = _nearest(eff, t)
        # The sweep stops at its first unreachable target: later targets are too.
        missed = [
          q for q in eff if q["status"] == "unreachable" and q["target_compression"] <= t * 1.05
        ]
        cells.append(
          f"unreachable (from {_fmt(missed[0]['target_compression'])}x)"
          if missed and r is None
          else "-"
          if r is None
          else f"{_fmt(r['direct_compression'])}x"
        )
      rows.append([ARCH_TITLES.get(arch, arch), pruner] + cells)
  return results.markdown_table(header, rows)


# ---------------------------------------------------------------- main

# ------------------------------------------------------- compaction (section 5)

LATENCY_CSV = os.path.join("compaction", "lenet300100_latency.csv")


def _compaction_figures(results_dir, figures_dir, doc, short, short_steps) -> list[str]:
  """The speed figure and table of LeNet-300-100 (results/compaction/
  lenet300100_latency.csv with the trained runs) and the live-channel figures of every
  network with a results/compaction/<arch>/compression.csv (VGG-19 and ResNet-18),
  where their data exist; the files written (``doc`` once if a table went there)."""
  written = []
  latency_path = os.path.join(results_dir, LATENCY_CSV)
  if os.path.exists(latency_path):
    lat = results.read_latency_csv(latency_path)
    rs = [r for r in short if r["arch"] == "lenet300100" and r["pruning_type"] == "effective"]
    path = os.path.join(figures_dir, f"speed_lenet300100_t{short_steps}.png")
    plot_speed(rs, lat, path, f"LeNet-300-100 on MNIST, {short_steps} training steps")
    written.append(path)
    if doc:
      results.update_markdown_section(doc, "speed-table", speed_table(rs, lat))
      written.append(doc)
  found = glob.glob(os.path.join(results_dir, "compaction", "*", "compression.csv"))
  by_arch = {os.path.basename(os.path.dirname(p)): p for p in found}
  rows = {arch: results.read_compression_csv(by_arch[arch]) for arch in _arch_order(by_arch)}
  if rows:
    for xkey, name in (("effective_compression", "compression"), ("flops_effective", "flops")):
      path = os.path.join(figures_dir, f"compaction_channels_{name}.png")
      plot_compaction(rows, path, xkey)
      written.append(path)
    if doc:
      results.update_markdown_section(doc, "compaction-table", compaction_table(rows))
      written.append(doc)
  return list(dict.fromkeys(written))


def _latency_groups(lat: list[dict]) -> dict[tuple, dict]:
  """(pruner, target) -> means over the timed seeds of the latency CSV's times."""
  groups = {}
  for r in lat:
    if r.get("masked_latency_ms") is None:
      continue
    groups.setdefault((r["pruner"], grid_target(r["target_compression"])), []).append(r)
  out = {}
  for k, rs in groups.items():
    mean = lambda key: statistics.fmean(r[key] for r in rs)
    out[k] = {
      key: mean(key)
      for key in (
        "masked_latency_ms",
        "compact_latency_ms",
        "masked_throughput",
        "compact_throughput",
        "latency_speedup",
        "throughput_speedup",
        "live_channel_fraction",
        "compact_params",
        "params_dense",
        "compact_flops",
        "flops_dense",
        "load_average",
      )
    }
    out[k]["seeds"] = len(rs)
    out[k]["reproduced"] = all(r["reproduced"] for r in rs)
    out[k]["widths"] = sorted({r["widths"] for r in rs})
  return out


def plot_speed(runs: list[dict], lat: list[dict], path: str, title: str) -> None:
  """Test accuracy against effective compression (left) and against the measured
  inference time of the compacted network (middle: batch 1; right: time per example at
  the throughput batch), unstructured at-init pruners (solid) against neuron pruners
  (dashed); means over seeds, error bars the seeds' range."""
  plt = _pyplot()

  groups = {k: _summary(v) for k, v in _group(runs).items()}
  times = _latency_groups(lat)
  batch = int(next((r["batch"] for r in lat if r.get("batch")), 256))
  fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), sharey=True)
  xs = (
    ("effective compression", None),
    ("compacted inference latency, batch 1 (ms)", "compact_latency_ms"),
    (f"compacted inference time per example, batch {batch} (us)", "compact_throughput"),
  )
  masked = list(times.values())
  for pruner in _order(results.LATENCY_UNSTRUCTURED + results.LATENCY_NEURON):
    pts = sorted(
      (t, g)
      for (p, ptype, t), g in groups.items()
      if p == pruner and ptype == "effective" and "accuracy" in g and math.isfinite(g["effective"])
    )
    if not pts:
      continue
    style = "--s" if pruner.startswith("neuron/") else "-o"
    for ax, (_, key) in zip(axes, xs):
      if key is None:
        x = [g["effective"] for _, g in pts]
        keep = pts
      else:
        keep = [(t, g) for t, g in pts if (pruner, round(t, 6)) in times]
        x = [times[(pruner, round(t, 6))][key] for t, _ in keep]
        if key == "compact_throughput":
          x = [1e6 / v for v in x]
      if not keep:
        continue
      y = [g["accuracy"] for _, g in keep]
      err = [
        [g["accuracy"] - g["accuracy_min"] for _, g in keep],
        [g["accuracy_max"] - g["accuracy"] for _, g in keep],
      ]
      ax.errorbar(
        x,
        y,
        yerr=err,
        fmt=style,
        ms=3,
        lw=1.1,
        capsize=2,
        color=_colour(pruner),
        label=pruner if key is None else None,
      )
  if masked:  # every masked network is the dense-size one: its time, as a reference
    for ax, key, scale in (
      (axes[1], "masked_latency_ms", 1.0),
      (axes[2], "masked_throughput", None),
    ):
      v = statistics.median(g[key] for g in masked)
      ax.axvline(v if scale else 1e6 / v, color="black", lw=0.8, ls=":")
  from matplotlib.ticker import NullFormatter  # with pyplot, where a figure is drawn

  for ax, (label, _) in zip(axes, xs):
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("test accuracy")
  axes[0].legend(fontsize=7, loc="lower left", ncol=2)
  loads = [r["load_average"] for r in lat if r.get("load_average") is not None]
  load = f"; load average {min(loads):.1f}-{max(loads):.1f} while timing" if loads else ""
  fig.suptitle(
    title + ": unstructured at-init pruners (solid, compacted) against neuron "
    "pruners (dashed), pruned to an effective target; dotted: the masked "
    f"(dense-size) network's time{load}",
    fontsize=9,
  )
  fig.tight_layout()
  _save(fig, path)


def speed_table(runs: list[dict], lat: list[dict]) -> str:
  """Per pruner and target: mean test accuracy, compacted widths, and masked against
  compacted inference time (batch 1 latency; time per example at the throughput
  batch) with the speed-ups."""
  groups = {k: _summary(v) for k, v in _group(runs).items()}
  times = _latency_groups(lat)
  header = [
    "pruner",
    "target",
    "seeds",
    "test accuracy",
    "effective",
    "widths",
    "b=1 ms masked / compact",
    "speed-up",
    "per-example us masked / compact",
    "speed-up",
  ]
  rows = []
  for pruner in _order(results.LATENCY_UNSTRUCTURED + results.LATENCY_NEURON):
    for (p, ptype, t), g in sorted(groups.items(), key=lambda kv: kv[0][2]):
      if p != pruner or ptype != "effective":
        continue
      tm = times.get((p, grid_target(t)))
      if "accuracy" not in g:
        rows.append([p, f"{t:.4g}x", g["seeds"], g["status"], "", "", "", "", "", ""])
        continue
      acc = f"{g['accuracy']:.4f}" + (
        f" ±{(g['accuracy_max'] - g['accuracy_min']) / 2:.3f}" if g["seeds"] > 1 else ""
      )
      cells = [p, f"{t:.4g}x", g["seeds"], acc, f"{_fmt(g['effective'], 4)}x"]
      if tm is None:
        rows.append(cells + ["not timed", "", "", "", ""])
        continue
      widths = " ".join(w.replace(";", "-") for w in tm["widths"][:3])
      widths += "" if tm["reproduced"] else " (not reproduced)"
      rows.append(
        cells
        + [
          widths,
          f"{tm['masked_latency_ms']:.3g} / {tm['compact_latency_ms']:.3g}",
          f"{tm['latency_speedup']:.2f}x",
          f"{1e6 / tm['masked_throughput']:.3g} / {1e6 / tm['compact_throughput']:.3g}",
          f"{tm['throughput_speedup']:.2f}x",
        ]
      )
  return results.markdown_table(header, rows)


def plot_compaction(rows: dict[str, list[dict]], path: str, xkey: str) -> None:
  """Per network (rows of the figure): the live-channel fraction and the compacted
  network's dense FLOPs (relative to the original's) of every at-init pruner, against
  ``xkey`` ('effective_compression', or 'flops_effective': FLOPs on live paths)."""
  plt = _pyplot()

  fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.2 * len(rows)), squeeze=False)
  for i, (arch, rs) in enumerate(rows.items()):
    ok = [r for r in rs if r["status"] == "ok" and r.get("live_channel_fraction") is not None]
    for pruner in _order(r["pruner"] for r in ok):
      pts = sorted((r[xkey], r) for r in ok if r["pruner"] == pruner)
      x = [a for a, _ in pts]
      style = "--o" if pruner.startswith("random/") else "-o"
      axes[i, 0].plot(
        x,
        [r["live_channel_fraction"] for _, r in pts],
        style,
        ms=4,
        color=_colour(pruner),
        label=pruner,
      )
      axes[i, 1].plot(
        x,
        [r["compact_flops"] / r["flops_dense"] for _, r in pts],
        style,
        ms=4,
        color=_colour(pruner),
        label=pruner,
      )
    name = ARCH_TITLES.get(arch, arch)
    axes[i, 0].set_ylabel(f"{name}: live-channel fraction")
    axes[i, 1].set_ylabel(f"{name}: compacted FLOPs / dense FLOPs")
    for ax in axes[i]:
      ax.set_xscale("log")
      if xkey == "flops_effective":
        ax.invert_xaxis()
      ax.set_xlabel(
        "effective compression"
        if xkey == "effective_compression"
        else "effective FLOPs (FLOPs on live paths, one example)"
      )
      ax.grid(True, which="both", alpha=0.3)
    axes[i, 1].set_yscale("log")
  axes[0, 0].legend(fontsize=7, loc="lower left", ncol=2)
  fig.suptitle(
    "At initialization (no training), pruned to an effective target, seed 0; "
    "channels kept by sparsejax.compact (a residual stream counts once per "
    "channel)",
    fontsize=9,
  )
  fig.tight_layout()
  _save(fig, path)


def compaction_table(rows: dict[str, list[dict]]) -> str:
  """Per network, pruner and target: effective compression, live-channel fraction and
  the original/compacted dense FLOPs, effective FLOPs and kernel parameter ratios."""
  header = [
    "network",
    "pruner",
    "target",
    "effective",
    "live channels",
    "compacted FLOPs ratio",
    "effective FLOPs ratio",
    "compacted params ratio",
  ]
  out = []
  for arch, rs in rows.items():
    for pruner in _order(r["pruner"] for r in rs):
      for r in sorted(
        (r for r in rs if r["pruner"] == pruner), key=lambda r: r["target_compression"]
      ):
        cells = [arch, pruner, f"{r['target_compression']:.4g}x"]
        if r["status"] != "ok" or r.get("live_channel_fraction") is None:
          out.append(cells + [r["status"], "", "", "", ""])
          continue
        out.append(
          cells
          + [
            f"{_fmt(r['effective_compression'], 4)}x",
            f"{r['live_channel_fraction']:.2f}",
            f"{r['flops_dense'] / r['compact_flops']:.2f}x",
            f"{_fmt(r['flops_dense'] / r['flops_effective'], 3)}x",
            f"{r['params_dense'] / r['compact_params']:.2f}x",
          ]
        )
  return results.markdown_table(header, out)


def make_all(
  results_dir: str, figures_dir: str, doc: str | None, short_steps: int, full_steps: int
) -> list[str]:
  """Draws every figure and writes every table it has data for; returns the files
  written (``doc`` only when a table of it was)."""
  written = []
  curves = load_curves(os.path.join(results_dir, "init_curves"))
  for arch, rows in curves.items():
    for kind, fn in (("init", plot_curves), ("units", plot_units)):
      path = os.path.join(figures_dir, f"{kind}_{arch}.png")
      fn(arch, rows, path)
      written.append(path)
  runs = load_runs(results_dir)
  # Compacted training runs (prune_train --config.compact) are not the masked runs'
  # repeats: they stay out of these figures.
  runs = [r for r in runs if not r["compact"]]
  # The paper reproduction's figures and tables hold the pruners of the paper; the
  # moving-mask methods get their own.
  moving = [
    r for r in runs if r["train_steps"] == short_steps and r["pruner"] in procedures.DYNAMIC
  ]
  runs = [r for r in runs if r["pruner"] not in procedures.DYNAMIC]
  short = [r for r in runs if r["train_steps"] == short_steps]
  full = [r for r in runs if r["train_steps"] == full_steps]
  for arch in sorted({r["arch"] for r in moving}):
    rs = [r for r in short + moving if r["arch"] == arch]
    title = (
      f"{ARCH_TITLES.get(arch, arch)} on {rs[0]['dataset']}, {short_steps} steps, "
      "masks that move during training"
    )
    for name, fn in (
      (f"accuracy_dynamic_{arch}_t{short_steps}.png", plot_dynamic_accuracy),
      (f"dead_weights_{arch}_t{short_steps}.png", plot_dead_weights),
    ):
      fn(rs, os.path.join(figures_dir, name), title)
      written.append(os.path.join(figures_dir, name))
  for arch in sorted({r["arch"] for r in short}):
    rs = [r for r in short if r["arch"] == arch]
    dataset = rs[0]["dataset"]
    path = os.path.join(figures_dir, f"accuracy_{arch}_t{short_steps}.png")
    seeds = sorted({r["seed"] for r in rs})
    plot_accuracy(
      rs,
      path,
      f"{ARCH_TITLES.get(arch, arch)} on {dataset}, "
      f"{short_steps} training steps, seeds {', '.join(map(str, seeds))} "
      "(error bars: range over the seeds a point has)",
    )
    written.append(path)
  written += _compaction_figures(results_dir, figures_dir, doc, short, short_steps)
  if doc:
    tables = []
    if curves:
      tables.append(("init-curves-table", curves_table(curves)))
    if short:
      tables.append(("accuracy-table", accuracy_table(short)))
      tables.append(("claims-table", claims_table(short)))
    if full:
      tables.append(("schedule-table", schedule_table(short, full)))
    if moving:
      tables.append(("dynamic-table", dynamic_table(moving)))
    for name, table in tables:
      results.update_markdown_section(doc, name, table)
    if tables:
      written.append(doc)
  return list(dict.fromkeys(written))  # the doc once, where several tables went


def define_flags() -> None:
  flags.DEFINE_string("results_dir", "results", "Where the runs' files are.")
  flags.DEFINE_string("figures_dir", "docs/figures", "Where the PNGs go.")
  flags.DEFINE_string(
    "doc",
    "docs/results.md",
    "Markdown file whose generated tables "
    "(between <!-- name:start/end --> markers) are rewritten; '' for none.",
  )
  flags.DEFINE_integer("short_steps", 3000, "Training steps of the grid's short schedule.")
  flags.DEFINE_integer("full_steps", 96000, "Training steps of the full schedule.")


def check_flags() -> None:
  """Every flag before any file is read or drawn: --results_dir a folder that exists,
  --figures_dir and the folder of --doc writable (created if missing), the steps
  positive.

  Raises:
    experiments.checks.FlagError: the first bad flag, its value and what is allowed.
  """
  checks.check_existing_dir("results_dir", FLAGS.results_dir)
  checks.check_run_args(counts={"short_steps": FLAGS.short_steps, "full_steps": FLAGS.full_steps})
  checks.check_writable_dir("figures_dir", FLAGS.figures_dir)
  if FLAGS.doc:
    if os.path.isdir(FLAGS.doc):
      raise checks.FlagError(f"--doc={FLAGS.doc!r} is a folder, not a markdown file.")
    folder = os.path.dirname(os.path.abspath(FLAGS.doc))
    try:
      results.check_writable_dir(folder)
    except OSError as err:
      raise checks.FlagError(
        f"--doc={FLAGS.doc!r} cannot be written: its folder {folder} is not writable "
        f"({err.strerror or err})."
      ) from None


def main(argv):
  del argv
  check_flags()
  written = make_all(
    FLAGS.results_dir, FLAGS.figures_dir, FLAGS.doc or None, FLAGS.short_steps, FLAGS.full_steps
  )
  for path in written:
    logging.info("wrote %s", path)
  print(f"Wrote {len(written)} files" + (": " + ", ".join(written) if written else "."))


if __name__ == "__main__":
  cli.run(main, define_flags)
