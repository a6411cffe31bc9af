r"""Effective sparsity in transformers: the tables and figures of a docs/results.md section.

Reads what two binaries wrote and writes the section's tables and figures (issue 25):
- the at-initialization curves of the ViT and the GPT (experiments.init_curves, CSVs
  under <results_dir>/init_curves/<arch>/): the figures of section 1 (init_<arch>.png,
  units_<arch>.png), its table, and per pruner the dead heads, MLP neurons and
  embedding dimensions of the effective masks (the ``dead_*`` columns,
  :func:`sparsejax.models.transformer.dead_parts`) at 10x, 100x and 1000x direct;
- the trained runs (experiments.sweep, result.json files under <runs_dir>/<arch>/):
  test accuracy (ViT) or held-out bits per byte (GPT) per pruner, pruning type and
  target, and a figure of the metric against effective compression.

  python -m experiments.init_curves --archs=vit,gpt --tfds_manual_dir=../shared/data/mnist \
      --text_dir=../shared/data/text/python-docs
  python -m experiments.sweep --archs=vit --pruners=random/igq,snip,synflow \
      --compressions=10,100,1000 --pruning_types=direct,effective --train_steps=600 \
      --out_dir=results/transformers/vit --tfds_manual_dir=../shared/data/mnist
  python -m experiments.transformer_report --doc=docs/results.md
"""

from __future__ import annotations

import glob
import json
import math
import os

from absl import flags

from experiments import cli, plot, results

FLAGS = flags.FLAGS

ARCHS = ("vit", "gpt")
#: What each network's trained runs report: (result.json key, name, higher is better).
METRICS = {
  "vit": ("test_accuracy", "test accuracy", True),
  "gpt": ("test_bits_per_byte", "held-out bits per byte", False),
}


def parts_table(curves: dict[str, list[dict]], targets=(10.0, 100.0, 1000.0)) -> str:
  """Per network, pruner and direct target (pruning type 'direct'): the effective
  compression and the dead heads, MLP neurons and embedding dimensions ('dead/total')
  of its effective masks."""
  header = [
    "network",
    "pruner",
    "direct",
    "effective",
    "dead heads",
    "dead MLP neurons",
    "dead embedding dims",
  ]
  rows = []
  for arch in [a for a in ARCHS if a in curves]:
    rs = curves[arch]
    for pruner in plot._order(r["pruner"] for r in rs):
      direct = [r for r in rs if r["pruner"] == pruner and r["pruning_type"] == "direct"]
      for t in targets:
        r = plot._nearest(direct, t)
        if r is None:
          continue
        eff = r["effective_compression"]
        rows.append(
          [
            plot.ARCH_TITLES.get(arch, arch),
            pruner,
            f"{plot._fmt(r['direct_compression'])}x",
            "disconnected" if math.isinf(eff) else f"{plot._fmt(eff)}x",
            r.get("dead_heads") or "-",
            r.get("dead_mlp_neurons") or "-",
            r.get("dead_embedding_dims") or "-",
          ]
        )
  return results.markdown_table(header, rows)


def load_runs(runs_dir: str, arch: str) -> list[dict]:
  """The trained runs of ``arch`` (:func:`experiments.plot.load_runs`) with their
  metric (``value``: the :data:`METRICS` key of the result, None when not trained)."""
  key = METRICS[arch][0]
  runs = plot.load_runs(os.path.join(runs_dir, arch))
  for r in runs:
    with open(r["path"]) as f:
      r["value"] = json.load(f).get(key)
  return runs


def runs_table(runs: list[dict], arch: str) -> str:
  """Pruner x type rows, a column per target: the metric (mean over seeds) and, in
  parentheses, the other compression (effective for direct pruning, direct for
  effective pruning); the dense run first."""
  groups = plot._group(runs)
  targets = sorted({t for (p, _, t) in groups if p != "dense"})
  header = ["pruner", "type"] + [f"{t:.4g}x" for t in targets]
  rows = []
  for pruner in plot._order(p for p, _, _ in groups):
    types = ("direct",) if pruner == "dense" else ("direct", "effective")
    for ptype in types:
      cells = []
      for t in [1.0] if pruner == "dense" else targets:
        rs = groups.get((pruner, ptype, t), [])
        ok = [r for r in rs if r["value"] is not None]
        if not rs:
          cells.append("")
        elif not ok:
          cells.append(rs[0]["status"])
        else:
          value = sum(r["value"] for r in ok) / len(ok)
          other = ok[0]["effective_compression" if ptype == "direct" else "direct_compression"]
          note = "disconnected" if other is None or math.isinf(other) else f"{plot._fmt(other, 3)}x"
          cells.append(f"{value:.4f}" if pruner == "dense" else f"{value:.4f} ({note})")
      if pruner == "dense":
        cells += [""] * (len(targets) - 1)
      rows.append([pruner, ptype] + cells)
  return results.markdown_table(header, rows)


def plot_runs(runs: list[dict], arch: str, path: str) -> None:
  """The metric against effective compression (log x), a line per pruner and pruning
  type (solid: direct, dashed: effective), the dense run as a horizontal line."""
  plt = plot._pyplot()
  _, name, _ = METRICS[arch]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for pruner in plot._order(r["pruner"] for r in runs):
    for ptype, style in (("direct", "-"), ("effective", "--")):
      pts = sorted(
        (r["effective_compression"], r["value"])
        for r in runs
        if r["pruner"] == pruner
        and r["pruning_type"] == ptype
        and r["value"] is not None
        and r["effective_compression"] is not None
        and math.isfinite(r["effective_compression"])
      )
      if pruner == "dense":
        for _, v in pts:
          ax.axhline(v, color="gray", linestyle=":", label="dense")
        continue
      if pts:
        ax.plot(
          [x for x, _ in pts],
          [y for _, y in pts],
          style,
          marker="o",
          color=plot._colour(pruner),
          label=f"{pruner} ({ptype})",
        )
  ax.set_xscale("log")
  ax.set_xlabel("effective compression")
  ax.set_ylabel(name)
  ax.set_title(f"{plot.ARCH_TITLES.get(arch, arch)}: {name} after training")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  plot._save(fig, path)


def make(results_dir: str, runs_dir: str, figures_dir: str, doc: str | None) -> list[str]:
  """Writes the figures and (with ``doc``) the tables it has data for; returns the
  files written."""
  written = []
  curves = {
    a: rs
    for a, rs in plot.load_curves(os.path.join(results_dir, "init_curves")).items()
    if a in ARCHS
  }
  sections = []
  for arch, rows in curves.items():  # the figures of section 1, for the transformers
    for kind, fn in (("init", plot.plot_curves), ("units", plot.plot_units)):
      path = os.path.join(figures_dir, f"{kind}_{arch}.png")
      fn(arch, rows, path)
      written.append(path)
  if curves:
    sections.append(("transformer-parts-table", parts_table(curves)))
    sections.append(("transformer-curves-table", plot.curves_table(curves)))
  for arch in ARCHS:
    if not glob.glob(os.path.join(runs_dir, arch, "**", "result.json"), recursive=True):
      continue
    runs = load_runs(runs_dir, arch)
    path = os.path.join(figures_dir, f"transformer_{arch}.png")
    plot_runs(runs, arch, path)
    written.append(path)
    sections.append((f"transformer-{arch}-table", runs_table(runs, arch)))
  if doc:
    for name, table in sections:
      results.update_markdown_section(doc, name, table)
    if sections:
      written.append(doc)
  return written


def define_flags() -> None:
  flags.DEFINE_string("results_dir", "results", "Where init_curves/<arch>/ is.")
  flags.DEFINE_string(
    "runs_dir", "results/transformers", "Where the sweeps' <arch>/ run folders are."
  )
  flags.DEFINE_string("figures_dir", "docs/figures", "Where the PNGs go.")
  flags.DEFINE_string("doc", "", "The markdown whose sections get the tables.")


def main(argv):
  del argv
  for path in make(FLAGS.results_dir, FLAGS.runs_dir, FLAGS.figures_dir, FLAGS.doc or None):
    print("wrote", path)


if __name__ == "__main__":
  cli.run(main, define_flags)
