r"""Activation and data-effective sparsity of trained runs: a figure and tables.

Reads the result.json files of experiments.prune_train runs made with
``--config.data_effective=True`` (the test split's data-effective report,
sparsejax.data_effective) under --results_dir, and writes

- <figures_dir>/data_effective_<dataset>.png: structural effective compression against
  data-effective compression (the diagonal where the two agree) and below it their
  ratio, one marker per run (colour: pruner; shape: target; hollow: top-k
  activations), a column per network;
- the table of docs/results.md between ``<!-- data-effective-table:start -->`` and
  ``<!-- data-effective-table:end -->`` (--doc): per run the accuracy, the direct,
  effective and data-effective compression, per hidden layer the units never active on
  the test data, as structurally dead (on no input-output path of the masked graph) +
  silent (on a path, but 0 on every example) of all its output units, and the
  activation sparsity (zeros per example) of what each layer reads.

  python -m experiments.data_effective_report --results_dir=results/data_effective_mnist

Reads result files only (no JAX).
"""

from __future__ import annotations

import glob
import math
import os

from absl import flags

from experiments import checks, cli, plot, results

FLAGS = flags.FLAGS


def runs(results_dir: str) -> list[dict]:
  """The finished runs with a data-effective report, sorted by network, pruner, target."""
  out = []
  for path in sorted(glob.glob(os.path.join(results_dir, "*", "result.json"))):
    r = results.load(path)
    if r.get("status") not in ("ok", "disconnected") or "data_effective" not in r:
      continue
    c = r["config"]
    out.append(
      {
        "arch": c["arch"],
        "dataset": c["dataset"],
        "pruner": c["pruner"],
        "target": c["target_compression"],
        "topk": (c.get("experiment") or {}).get("activation_topk"),
        "accuracy": r["test_accuracy"],
        "direct": r["direct_compression"],
        "effective": r["effective_compression"],
        "data": r["data_effective"]["data_effective_compression"],
        "layers": r["data_effective"]["layers"],
        "examples": r["data_effective"]["examples"],
      }
    )
  order = {p: i for i, p in enumerate(plot.PRUNER_ORDER)}
  return sorted(
    out,
    key=lambda r: (r["arch"], r["topk"] or 0, r["target"], order.get(r["pruner"], 99), r["pruner"]),
  )


def _c(x) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "disconnected"
  return f"{x:.4g}x"


def _never_active(layer: dict) -> str:
  """'dead + silent of units' of one layer's output units: dead ones lie on no
  input-output path of the masked graph (structural), silent ones do but are 0 on every
  example (data-dependent)."""
  dead = layer["units"] - layer["active_units"]
  silent = layer["active_units"] - layer["data_active_units"]
  return f"{dead} + {silent} of {layer['units']}"


def table(rows: list[dict]) -> str:
  """The markdown table: one row per run."""
  body = []
  for r in rows:
    hidden = r["layers"][:-1]  # every linear op but the output layer
    never = "; ".join(_never_active(l) for l in hidden)
    sparsity = ", ".join(
      "-" if l["activation_sparsity"] is None else f"{100 * l['activation_sparsity']:.0f}%"
      for l in r["layers"][1:]
    )
    ratio = (
      r["data"] / r["effective"]
      if r["data"] and r["effective"] and math.isfinite(r["data"])
      else float("nan")
    )
    body.append(
      [
        plot.ARCH_TITLES.get(r["arch"], r["arch"]),
        r["pruner"] + (f" + top-{100 * r['topk']:g}%" if r["topk"] else ""),
        f"{r['target']:.4g}x",
        f"{r['accuracy']:.4f}",
        _c(r["direct"]),
        _c(r["effective"]),
        _c(r["data"]),
        f"{ratio:.2f}",
        never,
        sparsity,
      ]
    )
  return results.markdown_table(
    [
      "network",
      "pruner",
      "target",
      "accuracy",
      "direct",
      "effective",
      "data-effective",
      "data / effective",
      "units never active, layer by layer: dead + silent of all",
      "activation sparsity of the inputs of layers 2, 3, ...",
    ],
    body,
  )


def figure(rows: list[dict], path: str) -> None:
  """A column per network: effective against data-effective compression (top), and
  their ratio, data-effective / effective (bottom; 1 where the data silences no unit
  that is on a path)."""
  plt = plot._pyplot()
  known = list(plot.ARCH_TITLES)
  archs = sorted({r["arch"] for r in rows}, key=lambda a: (known.index(a) if a in known else 99, a))
  fig, axes = plt.subplots(
    2,
    len(archs),
    figsize=(5.2 * len(archs), 7.4),
    squeeze=False,
    gridspec_kw={"height_ratios": [3, 2]},
  )
  markers = {}
  for col, arch in enumerate(archs):
    top, bottom = axes[0][col], axes[1][col]
    pts = [r for r in rows if r["arch"] == arch and r["pruner"] != "dense"]
    finite = [r for r in pts if r["data"] and math.isfinite(r["data"])]
    lo = min([r["effective"] for r in finite] + [r["data"] for r in finite] + [5])
    hi = max([r["effective"] for r in finite] + [r["data"] for r in finite] + [10])
    top.plot([lo / 1.3, hi * 1.3], [lo / 1.3, hi * 1.3], color="0.6", lw=0.8, ls="--")
    bottom.axhline(1.0, color="0.6", lw=0.8, ls="--")
    for r in finite:
      marker = markers.setdefault(round(r["target"]), "os^Dv"[len(markers) % 5])
      colour = plot.COLOURS.get(r["pruner"], "#555555")
      face = "none" if r["topk"] else colour
      style = dict(marker=marker, s=42, edgecolors=colour, facecolors=face)
      top.scatter(r["effective"], r["data"], **style)
      bottom.scatter(r["effective"], r["data"] / r["effective"], **style)
    for ax in (top, bottom):
      ax.set_xscale("log")
    top.set_yscale("log")
    top.set_ylabel("data-effective compression (test split)")
    top.set_title(plot.ARCH_TITLES.get(arch, arch))
    bottom.set_xlabel("effective compression (structural)")
    bottom.set_ylabel("data-effective / effective")
  handles = [
    plt.Line2D([], [], marker="o", ls="", color=plot.COLOURS.get(p, "#555555"), label=p)
    for p in dict.fromkeys(r["pruner"] for r in rows if r["pruner"] != "dense")
  ]
  handles += [
    plt.Line2D([], [], marker=m, ls="", color="0.3", label=f"target {t}x")
    for t, m in markers.items()
  ]
  if any(r["topk"] for r in rows):
    handles.append(
      plt.Line2D([], [], marker="o", ls="", mfc="none", color="0.3", label="top-k activations")
    )
  axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def define_flags() -> None:
  flags.DEFINE_string("results_dir", "results/data_effective_mnist", "prune_train runs.")
  flags.DEFINE_string("figures_dir", "docs/figures", "Where the figure goes.")
  flags.DEFINE_string("doc", "docs/results.md", "The document whose table section is rewritten.")


def main(argv):
  del argv
  checks.check_existing_dir("results_dir", FLAGS.results_dir)
  checks.check_writable_dir("figures_dir", FLAGS.figures_dir)
  rows = runs(FLAGS.results_dir)
  if not rows:
    raise checks.FlagError(f"--results_dir={FLAGS.results_dir!r} holds no data-effective results.")
  datasets = sorted({r["dataset"] for r in rows})
  for dataset in datasets:
    figure(
      [r for r in rows if r["dataset"] == dataset],
      os.path.join(FLAGS.figures_dir, f"data_effective_{dataset}.png"),
    )
  body = table(rows)
  print(body)
  if FLAGS.doc:
    results.update_markdown_section(FLAGS.doc, "data-effective-table", body)


if __name__ == "__main__":
  cli.run(main, define_flags)
