r"""One-shot pruning after training on calibration data, no fine-tuning (issue 27).

Train a network densely (or resume its finished dense run), then prune it one-shot at
every --targets entry (direct sparsities such as 0.5, or N:M patterns such as 2:4) with
every --methods pruner (magnitude, Wanda, SparseGPT; any registered pruner) on
--calibration examples of the training split, for every --seeds calibration sample, and
evaluate each pruned network as it is: test metric, direct and effective sparsity,
dead units per layer (beyond those the dense network has: a causal mask's attention
scores), dead inputs.

  # LeNet-300-100 (the config's recipe, 3,000 steps as docs/results.md's grid)
  python -m experiments.one_shot --config.train_steps=3000 \
      --tfds_manual_dir=/work/shared/data/mnist --doc=docs/results.md
  # the ViT on MNIST
  python -m experiments.one_shot --config=experiments/configs/vit.py \
      --tfds_manual_dir=/work/shared/data/mnist
  # the byte-level GPT: held-out bits per byte (lower is better) and perplexity
  python -m experiments.one_shot --config=experiments/configs/gpt.py \
      --text_dir=/work/shared/data/text/python-docs

An N:M pattern applies to the layers whose inputs per output unit M divides (the
others stay dense; --pattern_layers=all refuses such a network instead); the row
records how many layers it pruned and the direct sparsity reached. Pruners that do not
read calibration data (magnitude) run once per target (seed '-').

Writes --out (a CSV of :data:`COLUMNS`, rewritten atomically after every row; a rerun
skips the rows it has), and with --doc a figure (docs/figures/one_shot_<arch>.png) and
the tables of a section of docs/results.md. The dense run lives in
--dense_dir (default <out's folder>/dense_<arch>_t<steps>_s<seed>: its checkpoints, so a
rerun does not retrain).

Tasks: what "dense", "calibration", "prunable" and "evaluate" mean depends on the
data. Image classification (MNIST, CIFAR, ...) prunes every prunable layer and reports
test accuracy (:class:`Classification`). A byte-level language model
(:class:`LanguageModel`, text datasets) is :class:`Classification` with four changes:
``dense`` trains on the text splits, ``prunable`` is the linear layers of the
transformer blocks (the embedding and the output head stay dense, as in the SparseGPT
and Wanda papers), ``calibration`` returns model inputs (--calibration training windows,
tokens[:, :-1], as arrays: the calibration pruners read arrays as the model input) and
``evaluate`` returns held-out bits per byte (``metric='bits_per_byte'``,
``higher_is_better=False``) and the loss (perplexity = exp(loss), a table of its own);
--eval_bytes evaluates the pruned networks on a prefix of the test split. Another kind
of data registers its own task with :func:`register_task` from a module passed as
--import; :func:`task_for` picks by the dataset's spec.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

import sparsejax
from experiments import checks, cli, configs, datasource, plot, plugins, prune_train, results
from sparsejax import data, layouts, models, patterns, pruning, training
from sparsejax import masks as masks_lib

FLAGS = flags.FLAGS

#: The CSV's columns, one row per (method, target, seed).
COLUMNS = [
  "arch",
  "method",
  "target",
  "seed",
  "calibration",
  "status",
  "metric",
  "value",
  "loss",
  "direct_sparsity",
  "effective_sparsity",
  "gap",
  "pruned_layers",
  "dead_units",
  "dead_units_total",
  "dead_inputs",
  "seconds",
]
_TEXT = ("arch", "method", "target", "seed", "status", "metric", "dead_units")
DEFAULT_TARGETS = "0.5,0.6,0.7,0.8,2:4,4:8"
DEFAULT_METHODS = "magnitude/uniform,wanda,sparsegpt"


# ------------------------------------------------------------------ tasks


@dataclasses.dataclass
class Dense:
  """A trained network: the module, its trained variables, the traced model (on one
  example), the dense network's test metric and loss."""

  model: object
  variables: dict
  traced: sparsejax.Traced
  value: float
  loss: float


class Classification:
  """Image classification: dense training with :func:`sparsejax.training.train` (the
  config's recipe, checkpoints under the dense folder), calibration examples from the
  train split (normalized, not augmented), test accuracy with the running batch-norm
  statistics."""

  metric = "accuracy"
  higher_is_better = True

  def __init__(self, config, source: datasource.DataSource):
    self.config, self.source = config, source
    self.spec = data.get_spec(config.dataset)
    self.test = source.split(config.dataset, "test", config.seed)

  def dense(self, dense_dir: str) -> Dense:
    c = self.config
    model = models.create(c.arch, self.spec.num_classes)
    key = jax.random.key(c.seed)
    example = prune_train.model_input(c.arch, self.spec)
    variables = models.init(model, jax.random.fold_in(key, 0), example)
    result = training.train(
      model,
      self.spec,
      configs.train_config(c),
      self.source.split(c.dataset, "train", c.seed),
      self.test,
      input_shape=example,
      params=variables["params"],
      seed=c.seed,
      workdir=os.path.abspath(os.path.join(dense_dir, "checkpoints")),
      checkpoint_every=c.checkpoint_every,
      eval_every=c.eval_every,
      log_every=c.log_every,
    )
    self._state = result.state
    trained = {"params": result.state.params}
    if result.state.batch_stats:
      trained["batch_stats"] = result.state.batch_stats
    traced = sparsejax.trace(model, example, variables=trained)
    value, loss = self.evaluate(model, trained)
    return Dense(model, trained, traced, value, loss)

  def calibration(self, seed: int, examples: int) -> list:
    return self.source.score_batches(
      self.config.dataset, num_batches=1, batch_size=examples, seed=seed
    )

  def prunable(self, traced: sparsejax.Traced) -> list[str] | None:
    """The layers every method prunes: None, every prunable layer of ``traced``."""
    del traced
    return None

  def evaluate(self, model, variables) -> tuple[float, float]:
    """(test metric, test loss) of ``variables``."""
    loss, acc = self._evaluate(model, variables)
    return acc, loss

  def _evaluate(self, model, variables) -> tuple[float, float]:
    state = self._state.replace(
      params=variables["params"],
      batch_stats=variables.get("batch_stats", self._state.batch_stats),
    )
    return training.evaluate(state, *self.test, model=model, spec=self.spec)


class LanguageModel(Classification):
  """A byte-level language model on a text dataset: dense training on the text splits
  (windows of T + 1 bytes), pruning of the transformer blocks' linear layers
  (:meth:`prunable`), calibration inputs ``tokens[:, :-1]`` (int32 [examples, T])
  of training windows, and the held-out next-byte loss L (nats per byte) reported as
  bits per byte L / ln 2 (lower is better; perplexity = exp(L)).

  ``eval_bytes``: evaluate on the test split's first this many bytes (every byte after
  the first predicted once from the window before it,
  :func:`sparsejax.training.evaluate_text`); None: the whole split. The dense run's
  evaluations during training read the whole split either way."""

  metric = "bits_per_byte"
  higher_is_better = False
  perplexity = True  # the tables add exp(loss)

  def __init__(self, config, source: datasource.DataSource, eval_bytes: int | None = None):
    super().__init__(config, source)
    if eval_bytes is not None and (isinstance(eval_bytes, bool) or int(eval_bytes) < 2):
      raise ValueError(
        f"eval_bytes={eval_bytes!r} must be None (the whole test split) or an integer >= 2."
      )
    self.eval_bytes = None if eval_bytes is None else int(eval_bytes)
    self.context = int(models.get_spec(config.arch).input_shape[0])

  def prunable(self, traced: sparsejax.Traced) -> list[str]:
    """The linear layers of the transformer blocks (paths 'block_<i>/...'), as SparseGPT
    and Wanda prune decoders: the token embedding (a lookup, which the calibration
    pruners cannot score) and the output head stay dense, for every method."""
    return [p for p in layouts.of(traced).views if p.startswith("block_")]

  def calibration(self, seed: int, examples: int) -> list:
    (batch,) = self.source.score_batches(
      self.config.dataset,
      num_batches=1,
      batch_size=examples,
      seed=seed,
      input_shape=(self.context,),
    )
    return [batch["tokens"][:, :-1]]

  def evaluate(self, model, variables) -> tuple[float, float]:
    """(test bits per byte, test loss in nats per byte) of ``variables``."""
    state = self._state.replace(params=variables["params"])
    corpus = self.test if self.eval_bytes is None else self.test[: self.eval_bytes]
    loss, _ = training.evaluate_text(
      state, corpus, model=model, spec=self.spec, context=self.context
    )
    return training.language_model_metrics(loss)["bits_per_byte"], loss


#: Tasks by the kind of data: a function (config, DataSource, **options) -> task with
#: ``dense``, ``calibration``, ``evaluate``, ``metric`` and ``higher_is_better`` as
#: :class:`Classification` has them (and ``perplexity = True`` where the tables should
#: add exp(loss), as :class:`LanguageModel`).
TASKS: dict[str, Callable] = {"image": Classification, "TextSpec": LanguageModel}


def register_task(kind: str, factory: Callable) -> None:
  """Registers the task of datasets of ``kind`` (:func:`task_for`)."""
  TASKS[kind] = factory


def task_for(config, source: datasource.DataSource, **options):
  """The task of ``config.dataset``, by its spec: the spec's ``kind`` attribute if it has
  one, else 'image' for a :class:`sparsejax.data.DatasetSpec`, else the spec's class name
  (e.g. 'TextSpec': :class:`LanguageModel`). ``options``: keyword arguments of the
  task's factory (e.g. :class:`LanguageModel`'s ``eval_bytes``)."""
  spec = data.get_spec(config.dataset)
  kind = getattr(spec, "kind", None) or (
    "image" if isinstance(spec, data.DatasetSpec) else type(spec).__name__
  )
  if kind not in TASKS:
    raise ValueError(
      f"dataset {config.dataset!r} is {kind!r} data, for which no one-shot task is "
      f"registered (known: {', '.join(TASKS)}); register one with "
      "experiments.one_shot.register_task from an --import module."
    )
  return TASKS[kind](config, source, **options)


# ------------------------------------------------------------------ the grid


def parse_methods(value: str) -> list[str]:
  """'magnitude/uniform,sparsegpt' -> the registered pruners' names; a
  :class:`experiments.checks.FlagError` naming --methods for an unknown one or none."""
  out = checks.parse_list(value, name="methods")
  for m in out:
    with checks.flag_errors("--methods"):
      pruning.get_pruner(m)
  if not out:
    raise checks.FlagError("--methods is empty; pass e.g. magnitude/uniform,wanda,sparsegpt.")
  return out


def parse_targets(value: str) -> list[str]:
  """'0.5,2:4' -> ['0.5', '2:4'], each a sparsity in [0, 1) or an N:M pattern; a
  :class:`experiments.checks.FlagError` naming --targets otherwise."""
  out = []
  for t in checks.parse_list(value, name="targets"):
    with checks.flag_errors():
      if ":" in t:
        patterns.parse(t, "--targets entry")
      else:
        masks_lib.check_sparsity(_float(t), "--targets entry")
    out.append(t)
  if not out:
    raise checks.FlagError("--targets is empty; pass e.g. 0.5,0.6,2:4.")
  return out


def _float(t: str):
  try:
    return float(t)
  except ValueError:
    return t


def _fitting(
  traced: sparsejax.Traced, target: str, strict: bool, allowed: list[str] | None = None
) -> list[str] | None:
  """The layers ``target`` prunes among ``allowed`` (None: every prunable layer): for an
  N:M pattern those whose inputs M divides (all of them, or ValueError, when
  ``strict``); for a sparsity ``allowed`` itself."""
  if ":" not in target:
    return allowed
  views = layouts.of(traced).views
  if allowed is not None:
    views = {p: v for p, v in views.items() if p in allowed}
  if strict:
    patterns.check_widths(views, target)
    return list(views)
  _, m = patterns.parse(target)
  return [p for p, v in views.items() if v.inputs % m == 0]


def run_one(task, dense: Dense, method: str, target: str, seed, batches, strict: bool) -> dict:
  """One row: ``method`` at ``target`` on the calibration ``batches`` of ``seed``."""
  p = pruning.get_pruner(method)
  row = {"method": method, "target": target, "seed": seed, "metric": task.metric}
  allowed = getattr(task, "prunable", lambda traced: None)(dense.traced)
  layers = _fitting(dense.traced, target, strict, allowed)
  if layers == []:
    return {**row, "status": "no layer fits", "pruned_layers": 0}
  kw = {"pattern": target} if ":" in target else {"sparsity": float(target)}
  start = time.perf_counter()
  result = pruning.prune_with_params(
    p,
    key=jax.random.key(0),
    model=dense.traced,
    variables=dense.variables,
    trained_params=dense.variables["params"],
    batches=batches if p.needs_data else None,
    prunable=layers,
    **kw,
  )
  seconds = time.perf_counter() - start
  masks = _full_masks(dense.traced, result.masks)
  value, loss = task.evaluate(dense.model, {**dense.variables, "params": result.params})
  report = prune_train.connectivity_report(dense.traced, masks)
  # Units dead in the dense network too (a causal mask's attention scores, a ViT's
  # last-block tokens other than the class token) are no effect of pruning.
  base = _dead(prune_train.connectivity_report(dense.traced, dense.traced.ones()))
  dead = {k: v - base.get(k, 0) for k, v in _dead(report).items()}
  active_in, total_in = report["active_inputs"]
  return {
    **row,
    "status": "ok",
    "value": value,
    "loss": loss,
    "direct_sparsity": float(report["direct_sparsity"]),
    "effective_sparsity": float(report["effective_sparsity"]),
    "gap": float(report["effective_sparsity"]) - float(report["direct_sparsity"]),
    "pruned_layers": len(masks_lib.paths(result.masks)),
    "dead_units": " ".join(f"{k}={v}" for k, v in dead.items()),
    "dead_units_total": sum(dead.values()),
    "dead_inputs": int(total_in) - int(active_in),
    "seconds": seconds,
  }


def _dead(report: dict) -> dict:
  """{layer: its output units on no input-to-output path} of a connectivity report."""
  return {k: int(t) - int(a) for k, (a, t) in report["active_units"].items()}


def _full_masks(traced: sparsejax.Traced, masks):
  """``masks`` over every prunable layer of ``traced`` (dense where it has None), so that
  sparsities count the layers a pattern left dense."""
  return masks_lib.map_prunable(
    lambda ones, m: ones if m is None else m,
    traced.ones(),
    masks,
    prunable=traced.prunable_paths,
  )


def _key(r: dict) -> tuple:
  return (r["method"], str(r["target"]), str(r["seed"]))


def read_rows(path: str) -> list[dict]:
  """The rows of a one-shot CSV, numbers parsed back (empty cells None)."""
  return results._read_csv(path, _TEXT) if os.path.exists(path) else []


def sweep(task, dense: Dense, methods, targets, seeds, examples, out, strict, arch) -> list[dict]:
  """Every (method, target, seed) row not yet in ``out``, appended and written after
  each; returns all rows."""
  rows = read_rows(out)
  done = {_key(r) for r in rows}
  calib = {}
  for method in methods:
    p = pruning.get_pruner(method)
    for target in targets:
      for seed in seeds if p.needs_data else ["-"]:
        key = (method, target, str(seed))
        if key in done:
          continue
        if p.needs_data and seed not in calib:
          calib[seed] = task.calibration(int(seed), examples)
        row = run_one(task, dense, method, target, seed, calib.get(seed), strict)
        row.update(arch=arch, calibration=examples if p.needs_data else 0)
        logging.info(
          "%s %s seed %s: %s %.4f, direct %.4f, effective %.4f (%.1f s).",
          method,
          target,
          seed,
          task.metric,
          row.get("value") or float("nan"),
          row.get("direct_sparsity") or float("nan"),
          row.get("effective_sparsity") or float("nan"),
          row.get("seconds") or 0.0,
        )
        rows.append(row)
        done.add(key)
        results.write_csv(out, rows, COLUMNS)
  return rows


# ------------------------------------------------------------------ tables and figure


def summarize(rows: list[dict]) -> dict:
  """{(method, target): {value, spread, loss, direct, effective, dead, ..., n}} over
  seeds: means, and half the range of the metric."""
  groups: dict = {}
  for r in rows:
    if r["status"] == "ok":
      groups.setdefault((r["method"], str(r["target"])), []).append(r)
  out = {}
  for k, rs in groups.items():
    v = [float(r["value"]) for r in rs]
    out[k] = {
      "value": statistics.mean(v),
      "spread": (max(v) - min(v)) / 2,
      "direct": statistics.mean(float(r["direct_sparsity"]) for r in rs),
      "effective": statistics.mean(float(r["effective_sparsity"]) for r in rs),
      "loss": statistics.mean(float(r["loss"]) for r in rs),
      "dead": statistics.mean(float(r["dead_units_total"]) for r in rs),
      "dead_inputs": statistics.mean(float(r["dead_inputs"]) for r in rs),
      "units": rs[0]["dead_units"],
      "n": len(rs),
      "layers": int(rs[0]["pruned_layers"]),
    }
  return out


def _methods(rows: list[dict], order) -> list[str]:
  """The rows' methods, those of ``order`` first in its order."""
  present = list(dict.fromkeys(r["method"] for r in rows))
  return [m for m in order or () if m in present] + [m for m in present if m not in (order or ())]


def metric_name(metric: str, higher_is_better: bool = True) -> str:
  """How the tables and the figure name ``metric``: 'bits_per_byte' -> 'bits per byte',
  with '(lower is better)' unless ``higher_is_better``."""
  name = metric.replace("_", " ")
  return name if higher_is_better else f"{name} (lower is better)"


def tables(
  rows: list[dict],
  dense_value: float,
  metric: str,
  order=None,
  *,
  higher_is_better: bool = True,
  dense_loss: float | None = None,
) -> str:
  """The markdown tables: the metric per method (``order`` first) and target (mean ±
  half range over the calibration seeds), with ``dense_loss`` (a language model's, nats
  per byte) also the perplexity exp(loss) (mean over the seeds), and the sparsity each
  reached (direct and effective, their gap, dead units and inputs)."""
  s = summarize(rows)
  methods = _methods(rows, order)
  targets = list(dict.fromkeys(str(r["target"]) for r in rows))
  head = ["method", *[_target_name(t) for t in targets]]
  first = [["dense", f"{dense_value:.4f}", *[""] * (len(targets) - 1)]]
  for m in methods:
    cells = []
    for t in targets:
      c = s.get((m, t))
      cells.append("-" if c is None else f"{c['value']:.4f}" + _spread(c))
    first.append([m, *cells])
  perplexity = ""
  if dense_loss is not None:
    ppl = [["dense", _perplexity(dense_loss), *[""] * (len(targets) - 1)]]
    for m in methods:
      cells = []
      for t in targets:
        c = s.get((m, t))
        cells.append("-" if c is None else _perplexity(c["loss"]))
      ppl.append([m, *cells])
    perplexity = (
      "\n\nTest perplexity exp(loss) per byte (lower is better; mean over the seeds):\n\n"
      + results.markdown_table(head, ppl)
    )
  second = []
  for m in methods:
    for t in targets:
      c = s.get((m, t))
      if c is not None:
        second.append(
          [
            m,
            _target_name(t),
            f"{c['direct']:.4f}",
            f"{c['effective']:.4f}",
            f"{c['effective'] - c['direct']:+.4f}",
            f"{c['dead']:.1f}",
            f"{c['dead_inputs']:.1f}",
            _nonzero(c["units"]) + ("" if c["n"] == 1 else " (seed 0)"),
          ]
        )
  return (
    f"Test {metric_name(metric, higher_is_better)} without fine-tuning (mean over the "
    "calibration seeds, ± half the range):\n\n"
    + results.markdown_table(head, first)
    + perplexity
    + "\n\nDirect and effective sparsity of every result (means over the seeds), the gap, "
    "dead units (output units of a layer on no input-to-output path, beyond the dense "
    "network's), dead inputs, and "
    "the layers with dead units:\n\n"
    + results.markdown_table(
      [
        "method",
        "target",
        "direct",
        "effective",
        "gap",
        "dead units",
        "dead inputs",
        "dead units per layer",
      ],
      second,
    )
  )


def _nonzero(units: str) -> str:
  """'a=0 b=3 c=1' -> 'b=3 c=1' (the layers with dead units; 'none')."""
  kept = [u for u in str(units or "").split() if u.rpartition("=")[2] != "0"]
  return " ".join(kept) or "none"


def _perplexity(loss: float) -> str:
  return f"{training.language_model_metrics(loss)['perplexity']:.3f}"


def _spread(c: dict) -> str:
  return f" ±{c['spread']:.4f}" if c["n"] > 1 else ""


def _target_name(t: str) -> str:
  return t if ":" in t else f"{float(t):.0%}"


def figure(
  rows: list[dict],
  dense_value: float,
  metric: str,
  path: str,
  title: str,
  order=None,
  *,
  higher_is_better: bool = True,
) -> None:
  """The metric against the target, a line per method through the sparsity targets and
  markers at the N:M patterns (error bars: half the seeds' range)."""
  s = summarize(rows)
  methods = _methods(rows, order)
  targets = list(dict.fromkeys(str(r["target"]) for r in rows))
  targets = [t for t in targets if ":" not in t] + [t for t in targets if ":" in t]
  plt = plot._pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  xs = np.arange(len(targets))
  for i, m in enumerate(methods):
    pts = [(x, t, s[(m, t)]) for x, t in zip(xs, targets) if (m, t) in s]
    shift = (i - (len(methods) - 1) / 2) * 0.06
    colour = None
    for pattern in (False, True):  # no line from a sparsity to a pattern
      part = [p for p in pts if (":" in p[1]) == pattern]
      if not part:
        continue
      bars = ax.errorbar(
        np.array([p[0] for p in part]) + shift,
        [p[2]["value"] for p in part],
        yerr=[p[2]["spread"] for p in part],
        marker="o",
        capsize=3,
        linestyle="none" if pattern else "-",
        color=colour,
        label=None if colour else m,
      )
      colour = bars[0].get_color()
  if any(":" in t for t in targets) and any(":" not in t for t in targets):
    ax.axvline(sum(":" not in t for t in targets) - 0.5, color="lightgray", linewidth=1)
  ax.axhline(dense_value, color="gray", linestyle="--", label="dense")
  ax.set_xticks(xs, [_target_name(t) for t in targets])
  ax.set_xlabel("target (direct sparsity, or N:M pattern)")
  ax.set_ylabel(f"test {metric_name(metric, higher_is_better)}\n(no fine-tuning)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  plot._save(fig, path)


# ------------------------------------------------------------------ the binary


def define_flags() -> None:
  config_flags.DEFINE_config_file(
    "config",
    configs.path("lenet300100"),
    "The network's config file (its training recipe, seed, train_steps): "
    "experiments/configs/<arch>.py, or experiments/configs/generic.py:<arch>.",
    lock_config=True,
  )
  plugins.define_flag()
  flags.declare_key_flag(plugins.FLAG)
  flags.DEFINE_string("methods", DEFAULT_METHODS, "Comma-separated pruners.")
  flags.DEFINE_string("targets", DEFAULT_TARGETS, "Comma-separated sparsities and N:M patterns.")
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated calibration sampling seeds.")
  flags.DEFINE_integer("calibration", 128, "Calibration examples from the train split.")
  flags.DEFINE_string("out", "", "The CSV (default results/one_shot/<arch>.csv).")
  flags.DEFINE_string("dense_dir", "", "The dense run's folder (default: beside --out).")
  flags.DEFINE_enum(
    "pattern_layers",
    "fit",
    ["fit", "all"],
    "N:M targets: prune the layers M fits (fit) or refuse a network where one does not (all).",
  )
  flags.DEFINE_integer(
    "eval_bytes",
    0,
    "Text datasets: evaluate each pruned network on the test split's first this many "
    "bytes (0: the whole split).",
  )
  flags.DEFINE_string("doc", "", "Also write the figure and the tables into this markdown.")
  flags.DEFINE_string("figures_dir", "docs/figures", "Where --doc's figure goes.")
  datasource.define_flags()


def main(argv):
  del argv
  plugins.import_modules(plugins.from_flags())
  config = FLAGS.config
  methods = parse_methods(FLAGS.methods)
  targets = parse_targets(FLAGS.targets)
  seeds = checks.parse_list(FLAGS.seeds, int, "seeds")
  checks.check_int_flag("calibration", FLAGS.calibration)
  arch = config.arch
  out = FLAGS.out or os.path.join("results", "one_shot", f"{arch}.csv")
  dense_dir = FLAGS.dense_dir or os.path.join(
    os.path.dirname(out), f"dense_{arch}_t{config.train_steps}_s{config.seed}"
  )
  source = datasource.DataSource.from_flags()
  text = isinstance(data.get_spec(config.dataset), data.TextSpec)
  checks.check_int_flag("eval_bytes", FLAGS.eval_bytes, low=0)
  if FLAGS.eval_bytes and not text:
    raise checks.FlagError(
      f"--eval_bytes={FLAGS.eval_bytes} applies to text datasets only; "
      f"--config.dataset={config.dataset!r} is not one."
    )
  with checks.flag_errors():
    source.check_text(config.dataset)
  options = {"eval_bytes": FLAGS.eval_bytes or None} if text else {}
  task = task_for(config, source, **options)
  start = time.time()
  dense = task.dense(dense_dir)
  logging.info("Dense %s: test %s %.4f.", arch, task.metric, dense.value)
  rows = sweep(
    task,
    dense,
    methods,
    targets,
    seeds,
    FLAGS.calibration,
    out,
    FLAGS.pattern_layers == "all",
    arch,
  )
  text = tables(
    rows,
    dense.value,
    task.metric,
    methods,
    higher_is_better=task.higher_is_better,
    dense_loss=dense.loss if getattr(task, "perplexity", False) else None,
  )
  print(text)
  if FLAGS.doc:
    fig = os.path.join(FLAGS.figures_dir, f"one_shot_{arch}.png")
    figure(
      rows,
      dense.value,
      task.metric,
      fig,
      f"{arch}: one-shot pruning after training",
      methods,
      higher_is_better=task.higher_is_better,
    )
    rel = os.path.relpath(fig, os.path.dirname(os.path.abspath(FLAGS.doc)))
    results.update_markdown_section(
      FLAGS.doc, f"one-shot-{arch}", f"![one-shot {arch}]({rel})\n\n{text}"
    )
  print(f"\n{len(rows)} rows in {out} ({time.time() - start:.0f} s).")


if __name__ == "__main__":
  cli.run(main, define_flags, config_default=configs.path("lenet300100"))
