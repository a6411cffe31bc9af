"""Benchmark: the masked network against its compaction (sparsejax.compact), side by side.

For each network, pruner and effective compression (a *row*): prune at initialization
to the effective target, compact (``fold=False``: the compacted network is also the one
to train), check the logits agree, then time in one run, alternating masked and
compacted (medians of ``--repeats``):

- inference latency, batch 1 (jitted ``apply``, inference mode);
- inference time of a batch of ``--batch`` (default 256): throughput;
- one masked training step (``training.train_step``: augmentation, SGD momentum, L2,
  masked gradients) at the paper's batch size (``experiments/configs``; ``--no_train``
  skips it).

Ratios are masked time / compacted time, beside the FLOPs ratio (dense FLOPs of the
masked network / dense FLOPs of the compacted one, :mod:`sparsejax.flops`): what a
dense kernel could gain with equal efficiency. Compile times (``lower().compile()``)
are recorded separately. Target: SynFlow VGG-19 at 100x effective, compacted, runs
inference >= 5x faster than masked, within a factor 2 of its FLOPs ratio.

Pruners are registry names (``random/igq``, ``snip``, ``channel/l1``, ...) or
``structured``: ``channel/l1`` for convnets, ``neuron/l1`` for LeNet-300-100 (l1 scores
the initial weights here: the timings depend on the mask's structure, not on which
weights survive). SNIP scores ``--snip_examples`` synthetic examples (0: the paper's
``snip_batch_size``, in chunks of 128; any number, also above the synthetic split's 1024).

Every row runs in its own subprocess (its compiled programs and arrays are freed with
it: a whole grid in one process ran out of memory on ResNet-18) and is written to
``--csv`` (default results/compaction/benchmark_<platform>.csv) as soon as it is done,
atomically. A rerun skips the rows already there (``--overwrite`` to redo them), so a
long grid is filled row by row; ``--rows`` picks rows by ``arch:pruner:compression``
patterns. A row's masks are kept in results/compaction/masks/ (reused by a rerun and
by benchmarks.compaction_layers). ``--doc`` writes the table of the CSV into docs/benchmarks.md.

  python -m benchmarks.compaction                      # the default grid, into the CSV
  python -m benchmarks.compaction --archs vgg19 --pruners synflow --compressions 100
  python -m benchmarks.compaction --rows 'resnet18:synflow:100,resnet18:structured:100'
  python -m benchmarks.compaction --table_only --doc   # the CSV's table into the docs
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import fnmatch
import functools
import io
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from flax import traverse_util

from benchmarks import report
from experiments import configs
from sparsejax import compact, data, errors, files, flops, models, pruning, timing, training
from sparsejax import masks as masks_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("vgg19", "lenet300100", "resnet18")
PRUNERS = ("random/igq", "random/uniform", "snip", "synflow", "structured")
STRUCTURED = "structured"
#: Examples per SNIP scoring batch when --snip_examples exceeds it.
SNIP_CHUNK = 128
#: Row identity in the CSV (a rerun skips rows whose key is there).
KEY = ("platform", "arch", "pruner", "compression", "batch", "train")
FIELDS = KEY + (
  "status",
  "widths",
  "params_masked",
  "params_compact",
  "flops_masked",
  "flops_compact",
  "flops_effective",
  "flops_ratio",
  "latency_masked_s",
  "latency_compact_s",
  "batch_masked_s",
  "batch_compact_s",
  "train_batch",
  "train_masked_s",
  "train_compact_s",
  "compile_masked_s",
  "compile_compact_s",
  "repeats",
  "rounds",
  "snip_examples",
  "prune_s",
  "load_before",
  "load_after",
  "date",
)


def pruner_for(arch: str, name: str) -> str:
  """The registry name of ``name`` for ``arch`` ('structured': channel/l1 for convnets,
  neuron/l1 for LeNet-300-100); ValueError for an unknown pruner."""
  if name == STRUCTURED:
    return "neuron/l1" if arch == "lenet300100" else "channel/l1"
  try:
    pruning.get_pruner(name)
  except ValueError:
    raise ValueError(
      f"--pruners: {name!r} is not a pruner; use registry names "
      f"(e.g. {', '.join(PRUNERS[:-1])}, channel/l1, neuron/l1) or "
      f"{STRUCTURED!r}."
    ) from None
  return name


def grid(archs: str, pruners: str, compressions: str, rows: str | None = None) -> list:
  """[(arch, pruner, compression)] of the comma-separated lists, restricted to the
  ``arch:pruner:compression`` fnmatch patterns of ``rows`` (if given)."""
  arch_list = [a for a in archs.split(",") if a]
  for a in arch_list:
    if a not in models.MODELS:
      raise ValueError(
        f"--archs: {a!r} is not a network; allowed: {', '.join(sorted(models.MODELS))}."
      )
  try:
    cs = [float(c) for c in compressions.split(",") if c]
  except ValueError:
    raise ValueError(
      f"--compressions={compressions!r} must be comma-separated numbers "
      "(effective compression ratios > 1, e.g. 10,100,1000)."
    ) from None
  for c in cs:
    if not c > 1:
      raise ValueError(f"--compressions: {c:g} is not an effective compression > 1.")
  pats = None
  if rows:
    pats = [p.split(":") for p in rows.split(",") if p]
    for p in pats:
      if len(p) != 3:
        raise ValueError(
          f"--rows: {':'.join(p)!r} must be arch:pruner:compression "
          "(fnmatch patterns, e.g. 'resnet18:synflow:100' or 'vgg19:*:*')."
        )
  out = []
  for a in arch_list:
    for name in (p for p in pruners.split(",") if p):
      pr = pruner_for(a, name)
      for c in cs:
        if pats is None or any(
          fnmatch.fnmatchcase(a, pa)
          and (fnmatch.fnmatchcase(pr, pp) or fnmatch.fnmatchcase(name, pp))
          and fnmatch.fnmatchcase(f"{c:g}", pc)
          for pa, pp, pc in pats
        ):
          out.append((a, pr, c))
  if not out:
    raise ValueError(
      f"no row matches --archs={archs!r} --pruners={pruners!r} "
      f"--compressions={compressions!r} --rows={rows!r}."
    )
  return out


def score_batches(arch: str, examples: int) -> list:
  """``examples`` synthetic training examples (normalized) in batches of <= SNIP_CHUNK;
  0: the paper's ``snip_batch_size``."""
  spec = models.get_spec(arch)
  n = examples or configs.get_config(arch).snip_batch_size
  images, labels = data.synthetic_split(spec.dataset, "train", n)
  dspec = data.get_spec(spec.dataset)
  return [
    {
      "image": data.preprocess(
        jax.random.key(0), jnp.asarray(images[i : i + SNIP_CHUNK]), dspec, train=False
      ),
      "label": jnp.asarray(labels[i : i + SNIP_CHUNK]),
    }
    for i in range(0, n, SNIP_CHUNK)
  ]


def mask_path(arch: str, pruner: str, compression: float, rounds: int, snip_examples: int) -> str:
  """Where :func:`prune` keeps a row's masks (results/compaction/masks/...npz)."""
  extra = (
    f"_r{rounds}" if pruner == "synflow" else (f"_n{snip_examples}" if "snip" in pruner else "")
  )
  return os.path.join(
    ROOT,
    "results",
    "compaction",
    "masks",
    f"{arch}_{pruner.replace('/', '-')}_{compression:g}x{extra}.npz",
  )


def prune(
  arch: str,
  pruner: str,
  compression: float,
  *,
  rounds: int = 100,
  snip_examples: int = 128,
  cache: bool = False,
):
  """(model, input shape, variables at init, masks at ``compression`` effective).

  ``cache``: load the masks from :func:`mask_path` if there, else save them there
  (the initialization is fixed: key 0 for the weights, key 1 for the pruner)."""
  model, shape = models.create(arch), models.input_shape(arch)
  v = model.init(jax.random.key(0), jnp.ones((1,) + shape))
  path = mask_path(arch, pruner, compression, rounds, snip_examples)
  if cache and os.path.exists(path):
    return model, shape, v, masks_lib.load(path, v["params"])
  p = pruning.get_pruner(pruner)
  batches = score_batches(arch, snip_examples) if p.needs_data else None
  m = pruning.prune(
    p,
    key=jax.random.key(1),
    model=model,
    variables=v,
    sparsity=1 - 1 / compression,
    pruning_type="effective",
    input_shape=shape,
    batches=batches,
    trained_params=v["params"] if p.after_training else None,
    rounds=rounds if pruner == "synflow" else None,
  )
  if cache:
    masks_lib.save(path, m)
  return model, shape, v, m


def _compile(fn, *args):
  """(compiled fn, seconds to lower and compile it)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _load() -> str:
  load = timing.load_average()
  return "" if load is None else f"{load:.2f}"


def bench_row(
  arch: str,
  pruner: str,
  compression: float,
  *,
  batch: int = 256,
  repeats: int = 5,
  train: bool = True,
  rounds: int = 100,
  snip_examples: int = 128,
  train_batch: int | None = None,
  cache: bool = False,
) -> dict:
  """One row: prune, compact (verified), time masked against compacted.

  Returns a dict of :data:`FIELDS` (seconds; FLOPs per example). ``status`` is 'ok', or
  'unreachable: ...' for an effective target the pruner cannot reach.
  """
  for name, value, low in (
    ("batch", batch, 1),
    ("repeats", repeats, 1),
    ("rounds", rounds, 1),
    ("snip_examples", snip_examples, 0),
  ):
    if int(value) != value or value < low:
      raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
  cfg = configs.get_config(arch, train_steps=1000)
  row = dict(
    platform=jax.default_backend(),
    arch=arch,
    pruner=pruner,
    compression=f"{compression:g}",
    batch=batch,
    train=int(train),
    repeats=repeats,
    rounds=rounds if pruner == "synflow" else "",
    snip_examples=(snip_examples or cfg.snip_batch_size) if "snip" in pruner else "",
    load_before=_load(),
    date=time.strftime("%Y-%m-%d %H:%M"),
  )
  start = time.perf_counter()
  try:
    model, shape, v, m = prune(
      arch, pruner, compression, rounds=rounds, snip_examples=snip_examples, cache=cache
    )
  except errors.UnreachableSparsityError as err:
    return {**row, "status": f"unreachable: {err}"}
  row["prune_s"] = time.perf_counter() - start
  masked = {
    **v,
    "params": jax.tree.map(
      lambda p, k: p if k is None else p * k, v["params"], m, is_leaf=lambda x: x is None
    ),
  }
  new_model, new_v, new_m = compact.compact(model, v, m, input_shape=shape, fold=False, verify=True)
  before, after = flops.total(model, m, shape), flops.total(new_model, new_m, shape)
  kernels = [
    k
    for p, k in sorted(traverse_util.flatten_dict(new_v["params"], sep="/").items())
    if p.endswith("/kernel")
  ]
  row.update(
    widths="-".join(str(k.shape[-1]) for k in kernels),
    params_masked=before.params_dense,
    params_compact=after.params_dense,
    flops_masked=before.flops_dense,
    flops_compact=after.flops_dense,
    flops_effective=before.flops_effective,
    flops_ratio=before.flops_dense / after.flops_dense,
  )
  infer = {
    "masked": (functools.partial(model.apply, train=False), masked),
    "compact": (functools.partial(new_model.apply, train=False), new_v),
  }
  for field, b in (("latency", 1), ("batch", batch)):
    x = jax.random.normal(jax.random.key(2), (b,) + shape)
    fns = {}
    for k, (fn, variables) in infer.items():
      compiled, seconds = _compile(fn, variables, x)
      if b == 1:
        row[f"compile_{k}_s"] = seconds
      fns[k] = functools.partial(compiled, variables, x)
      jax.block_until_ready(fns[k]())  # warm-up
    t = timing.alternate(fns, repeats)
    row[f"{field}_masked_s"], row[f"{field}_compact_s"] = t["masked"], t["compact"]
    del fns
  if train:
    spec = models.get_spec(arch)
    row["train_batch"] = tb = train_batch or cfg.batch_size
    images, labels = data.synthetic_split(spec.dataset, "train", tb)
    batch_ = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    steps = {}
    for k, mdl, mk, vv in (("masked", model, m, v), ("compact", new_model, new_m, new_v)):
      state = training.create_train_state(
        mdl, jax.random.key(0), shape, cfg, masks=mk, params=vv["params"]
      )
      fn = functools.partial(training.train_step, model=mdl, spec=spec.dataset, config=cfg)
      compiled, _ = _compile(fn, state, batch_, jax.random.key(3))
      steps[k] = functools.partial(compiled, state, batch_, jax.random.key(3))
      jax.block_until_ready(steps[k]())
    t = timing.alternate(steps, max(1, repeats // 2))
    row["train_masked_s"], row["train_compact_s"] = t["masked"], t["compact"]
  row["load_after"] = _load()
  return {**row, "status": "ok"}


# ------------------------------------------------------------------ the CSV


def default_csv() -> str:
  return os.path.join(ROOT, "results", "compaction", f"benchmark_{jax.default_backend()}.csv")


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _key(row: dict) -> tuple:
  return tuple(str(row.get(k, "")) for k in KEY)


def write_row(path: str, row: dict) -> None:
  """Adds ``row`` to the CSV at ``path`` (replacing one with the same key), atomically;
  under a lock (``path``.lock), so that several grids can fill one CSV at once."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    rows = [r for r in read_rows(path) if _key(r) != _key(row)] + [row]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    files.atomic_write(path, buf.getvalue().encode())


def _done(row: dict | None) -> bool:
  return row is not None and (row["status"] == "ok" or row["status"].startswith("unreachable"))


# ------------------------------------------------------------------ the table


def _ms(a, b) -> str:
  f = lambda t: f"{1e3 * t:,.0f}" if t >= 0.1 else f"{1e3 * t:.3g}"
  return f"{f(float(a))} / {f(float(b))}" if a not in ("", None) else "-"


def _ratio(a, b) -> str:
  return f"{float(a) / float(b):.2f}x" if a not in ("", None) else "-"


def table(rows: list[dict]) -> str:
  """The markdown table of CSV rows (grid order: network, pruner, compression)."""
  order = {a: i for i, a in enumerate(ARCHS)}
  porder = lambda p: next((i for i, q in enumerate(PRUNERS) if p == q), len(PRUNERS))
  rows = sorted(
    rows,
    key=lambda r: (
      order.get(r["arch"], 99),
      porder(r["pruner"]),
      r["pruner"],
      float(r["compression"]),
    ),
  )
  out = []
  for r in rows:
    r = {k: r.get(k, "") for k in FIELDS}
    head = [r["arch"], r["pruner"], f"{r['compression']}x"]
    if r["status"] != "ok":
      most = re.search(r"\(compression ([0-9.e+]+x)\)", r["status"])
      status = f"unreachable (at most {most.group(1)})" if most else r["status"][:60]
      out.append(head + [status] + ["-"] * 9)
      continue
    out.append(
      head
      + [
        f"{int(r['params_masked']):,} / {int(r['params_compact']):,}",
        f"{float(r['flops_ratio']):.2f}x",
        _ms(r["latency_masked_s"], r["latency_compact_s"]),
        _ratio(r["latency_masked_s"], r["latency_compact_s"]),
        _ms(r["batch_masked_s"], r["batch_compact_s"]),
        _ratio(r["batch_masked_s"], r["batch_compact_s"]),
        (
          _ms(r["train_masked_s"], r["train_compact_s"]) + f" (b={r['train_batch']})"
          if r["train_masked_s"]
          else "-"
        ),
        _ratio(r["train_masked_s"], r["train_compact_s"]),
        f"{float(r['compile_masked_s']):.1f} / {float(r['compile_compact_s']):.1f}",
        r["load_before"].split(" ")[0] + "-" + r["load_after"].split(" ")[0],
      ]
    )
  header = [
    "network",
    "pruner",
    "effective",
    "kernel params masked / compact",
    "FLOPs ratio",
    "latency b=1 ms masked / compact",
    "speed-up",
    "b=256 ms masked / compact",
    "speed-up",
    "train step ms masked / compact",
    "speed-up",
    "compile b=1 s",
    "load (1 min)",
  ]
  return report.markdown_table(header, out)


def write_doc(path: str, rows: list[dict]) -> None:
  report.update_section(
    "compaction-table",
    f"""
### Measured grid (generated from `{os.path.relpath(path, ROOT)}`)

{report.machine()}. Speed-up = masked time / compacted time (medians of alternated
timings); FLOPs ratio = dense FLOPs of the masked network / of the compacted one;
load = 1-minute load average before-after the row (2 cores, shared).

{table(rows)}
""",
  )


# ------------------------------------------------------------------ main


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--archs", default=",".join(ARCHS))
  parser.add_argument(
    "--pruners",
    default=",".join(PRUNERS),
    help=f"registry names or {STRUCTURED!r} (channel/l1, neuron/l1).",
  )
  parser.add_argument("--compressions", default="10,100,1000")
  parser.add_argument(
    "--rows", default=None, help="comma-separated arch:pruner:compression fnmatch patterns."
  )
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=100, help="SynFlow rounds.")
  parser.add_argument(
    "--snip_examples",
    type=int,
    default=128,
    help="SNIP scoring examples (0: the paper's snip_batch_size).",
  )
  parser.add_argument("--no_train", action="store_true", help="Skip the training step.")
  parser.add_argument(
    "--csv",
    default=None,
    help="default: "
    + os.path.relpath(os.path.join("results", "compaction", "benchmark_<platform>.csv")),
  )
  parser.add_argument("--overwrite", action="store_true", help="Redo rows in the CSV.")
  parser.add_argument(
    "--in_process",
    action="store_true",
    help="Run the rows in this process (no subprocess per row).",
  )
  parser.add_argument("--table_only", action="store_true", help="Only print the table.")
  parser.add_argument(
    "--doc", action="store_true", help="Write the CSV's table into docs/benchmarks.md."
  )
  parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for name in ("batch", "repeats", "rounds"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be >= 1.")
  if args.snip_examples < 0:
    parser.error(f"--snip_examples={args.snip_examples} must be >= 0 (0: the paper's).")
  try:
    args.grid = grid(args.archs, args.pruners, args.compressions, args.rows)
  except ValueError as err:
    parser.error(str(err))
  args.csv = args.csv or default_csv()
  return args


def _run_one(args, arch, pruner, c) -> dict:
  kw = dict(
    batch=args.batch,
    repeats=args.repeats,
    train=not args.no_train,
    rounds=args.rounds,
    snip_examples=args.snip_examples,
  )
  if args.in_process:
    # No jax.clear_caches() here: freeing XLA:CPU executables inside a long-lived process
    # (the test suite) is what preceded a segfault in libgcc_s's unwinder at the end of a
    # CI run; rows that need their memory back run in subprocesses (the default).
    row = bench_row(arch, pruner, c, **kw)
    write_row(args.csv, row)
    return row
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.compaction",
    "--_one",
    f"{arch}:{pruner}:{c:g}",
    "--archs",
    arch,
    "--pruners",
    pruner,
    "--compressions",
    f"{c:g}",
    "--batch",
    str(args.batch),
    "--repeats",
    str(args.repeats),
    "--rounds",
    str(args.rounds),
    "--snip_examples",
    str(args.snip_examples),
    "--csv",
    args.csv,
  ]
  cmd += ["--no_train"] if args.no_train else []
  proc = subprocess.run(cmd, cwd=ROOT)
  key = (
    jax.default_backend(),
    arch,
    pruner,
    f"{c:g}",
    str(args.batch),
    str(int(not args.no_train)),
  )
  row = next((r for r in read_rows(args.csv) if _key(r) == key), None)
  if proc.returncode != 0 or row is None:
    row = dict(
      zip(KEY, key),
      status=f"error: exit code {proc.returncode}",
      load_after=_load(),
      date=time.strftime("%Y-%m-%d %H:%M"),
    )
    write_row(args.csv, row)
  return row


def main(argv=None):
  args = parse_args(argv)
  if args._one:
    ((arch, pruner, c),) = args.grid
    row = bench_row(
      arch,
      pruner,
      c,
      batch=args.batch,
      repeats=args.repeats,
      train=not args.no_train,
      rounds=args.rounds,
      snip_examples=args.snip_examples,
      cache=True,
    )
    write_row(args.csv, row)
    return
  if not args.table_only:
    have = {_key(r): r for r in read_rows(args.csv)}
    for arch, pruner, c in args.grid:
      key = (
        jax.default_backend(),
        arch,
        pruner,
        f"{c:g}",
        str(args.batch),
        str(int(not args.no_train)),
      )
      if not args.overwrite and _done(have.get(key)):
        print(f"{arch} {pruner} {c:g}x: in {args.csv} already", flush=True)
        continue
      row = _run_one(args, arch, pruner, c)
      print(table([row]).splitlines()[-1], flush=True)
  rows = read_rows(args.csv)
  print(table(rows))
  if args.doc:
    write_doc(args.csv, rows)


if __name__ == "__main__":
  main()
