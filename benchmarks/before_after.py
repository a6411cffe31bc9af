"""Benchmark: the library before and after a change, measured in one run (issue 24).

Runs ``benchmarks.effective``, ``benchmarks.effective_pruning`` and
``benchmarks.training`` (with ``--no_doc`` and the reduced settings of ``SUITE``) as
child processes on a baseline commit (exported with git archive beside this checkout)
and on this checkout, alternating which goes first, and compares every table they
print: rows are matched by their non-timed cells (network, compression, effective
compression, method, ...: equal cells also check that both computed the same thing),
and for each timed cell (ms, s, steps/s, ratio, GFLOP/s) the baseline's value, this
checkout's and their ratio *after / before* are listed. For times (ms, s) a ratio
below 1 is faster; for rates (steps/s, GFLOP/s) above 1 is faster. Each child takes
its own medians after compilation.

  python -m benchmarks.before_after --baseline=6091dac   # table, docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks import report

#: (module, arguments): the reduced settings of each benchmark in this comparison.
SUITE = (
  (
    "benchmarks.effective",
    ["--compressions=100,1000", "--repeats=15", "--skip_profile"],
  ),
  (
    "benchmarks.effective_pruning",
    ["--compressions=100,1000", "--repeats=3", "--synflow_rounds=20", "--skip_fresh"],
  ),
  (
    "benchmarks.training",
    ["--windows=7", "--skip_vgg", "--dynamic_steps=300", "--dynamic_repeats=3"],
  ),
)

#: A column whose cells are timings or rates (the others identify the row).
TIMED = re.compile(r"(\bms\b|\bs\b|/s\b|ratio|speed|steps|overhead|GFLOP)")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
LOWER_IS_FASTER = re.compile(r"(\bms\b|\bs\b)")


def tables(text: str) -> list[tuple[tuple[str, ...], list[list[str]]]]:
  """The markdown tables in ``text``: (header, rows of cells)."""
  out, block = [], []
  for line in [*text.splitlines(), ""]:
    if line.startswith("|"):
      block.append([c.strip() for c in line.strip().strip("|").split("|")])
      continue
    if len(block) >= 3 and set("".join(block[1])) <= set("-: "):
      out.append((tuple(block[0]), block[2:]))
    block = []
  return out


def timed_values(text: str) -> dict[tuple, float]:
  """{(header, row key, column): value} of every timed cell (its first number)."""
  values = {}
  for header, rows in tables(text):
    timed = [j for j, h in enumerate(header) if TIMED.search(h)]
    for row in rows:
      key = tuple(c for j, c in enumerate(row) if j not in timed)
      for j in timed:
        m = NUMBER.search(row[j]) if j < len(row) else None
        if m:
          values[(header, key, header[j])] = float(m.group())
  return values


def run(module: str, args: list[str], cwd: str) -> str:
  """The stdout of ``python -m module args`` importing the library of ``cwd``."""
  env = dict(os.environ, PYTHONPATH=cwd)
  proc = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode:
    raise RuntimeError(f"{module} in {cwd} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
  return proc.stdout


def compare(before: str, after: str) -> list[list[str]]:
  """Rows [table, row key, column, before, after, after / before] of the timed cells
  both outputs have."""
  b, a = timed_values(before), timed_values(after)
  rows = []
  for k in b:
    if k in a:
      header, key, col = k
      ratio = a[k] / b[k] if b[k] else math.nan
      rows.append([header[0], " / ".join(key), col, f"{b[k]:g}", f"{a[k]:g}", f"{ratio:.2f}"])
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--baseline", required=True, help="the commit to compare with")
  parser.add_argument("--only", default="", help="comma-separated modules of SUITE to run")
  parser.add_argument("--no_doc", action="store_true")
  args = parser.parse_args()
  suite = [s for s in SUITE if not args.only or s[0] in args.only.split(",")]
  rows, unmatched = [], []
  started = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    old = report.export_commit(
      args.baseline, os.path.join(tmp, "baseline"), ("sparsejax", "benchmarks", "experiments")
    )
    for i, (module, margs) in enumerate(suite):
      order = [("before", old), ("after", report.ROOT)]
      out = {}
      for name, cwd in order if i % 2 == 0 else order[::-1]:
        t = time.perf_counter()
        out[name] = run(module, margs, cwd)
        print(f"{module} {name}: {time.perf_counter() - t:.0f} s", flush=True)
      got = compare(out["before"], out["after"])
      rows += [[module.split(".")[1], *r] for r in got]
      if not got:
        unmatched.append(module)
  header = ["benchmark", "table", "row", "column", "before", "after", "after / before"]
  table = report.markdown_table(header, rows)
  print(table)
  times = [float(r[-1]) for r in rows if LOWER_IS_FASTER.search(r[3]) and r[-1] != "nan"]
  geo = math.exp(sum(math.log(x) for x in times) / len(times)) if times else math.nan
  print(f"geometric mean of after / before over {len(times)} times: {geo:.3f}")
  if unmatched:
    print(f"no comparable table from: {', '.join(unmatched)}")
  if not args.no_doc:
    report.update_section(
      "before_after",
      f"""
## Before and after issue 24 (`python -m benchmarks.before_after --baseline={args.baseline}`)

{report.stamp()}; load average {report.load_average()} at the end;
{time.perf_counter() - started:.0f} s in all. Each benchmark run as a child process on
the baseline commit {args.baseline} (git archive) and on this checkout, alternating which
goes first, with the settings of `benchmarks.before_after.SUITE`; rows matched by their
non-timed cells. Times (ms, s): after / before < 1 is faster; rates (steps/s, GFLOP/s):
> 1 is faster. Geometric mean of after / before over the {len(times)} times: **{geo:.3f}**.

{table}
""",
    )


if __name__ == "__main__":
  main()
