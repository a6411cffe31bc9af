"""Benchmark: pruning to a target *effective* sparsity, against direct pruning.

For VGG-19 and ResNet-18, random/uniform and a global-score pruner
(magnitude/global, scored on the initial weights), time (medians after compilation,
in one run) of the masks at 100x and 1000x compression:
- direct: masks at that direct compression along the ranking;
- effective: the exact search for the smallest direct sparsity whose effective
  sparsity reaches the target (sweeps counted).
The ranking (scores + sort) is computed once per pruner and timed separately.
Target: VGG-19, random/uniform, 1000x effective in <= 3 s on a 2-core CPU; the paper's
reference needs about 30 s there. Also: SynFlow's 100 rounds on VGG-16.

Fresh processes (issue 15): `benchmarks/fresh_prune.py` run as a child, VGG-19
random/uniform to 100x and 1000x effective, cold (empty persistent compilation cache)
and warm (a second process on the same cache), for this checkout and for a baseline
commit (``--baseline``, exported with git archive) in the same run: wall and CPU
seconds and XLA compilations per phase (init, ranking, search).

  python -m benchmarks.effective_pruning   # prints the table, updates docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax

from benchmarks import report
from sparsejax import effective, masks, models, pruning

REFERENCE = {("vgg19", "random/uniform", 100.0): 31.0, ("vgg19", "random/uniform", 1000.0): 28.0}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _library(commit: str | None, tmp: str) -> str:
  """A folder whose sparsejax is this checkout's (None) or ``commit``'s."""
  if commit is None:
    return ROOT
  folder = os.path.join(tmp, "baseline")
  os.makedirs(folder, exist_ok=True)
  archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "sparsejax"],
                           check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
  return folder


def fresh_runs(baseline: str | None, compressions, arch="vgg19", pruner="random/uniform"):
  """Rows of child processes: (version, target, cache, phases...)."""
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    versions = [("this checkout", None)] + ([(f"baseline {baseline[:7]}", baseline)]
                                             if baseline else [])
    for c in compressions:
      for label, commit in versions:
        library = _library(commit, tmp)
        cache = os.path.join(tmp, f"cache-{commit}-{c:g}")
        shutil.rmtree(cache, ignore_errors=True)
        for state in ("cold", "warm"):
          env = dict(os.environ, PYTHONPATH=library)
          out = subprocess.run(
              [sys.executable, os.path.join(ROOT, "benchmarks", "fresh_prune.py"),
               f"--arch={arch}", f"--pruner={pruner}", f"--compression={c}",
               f"--cache_dir={cache}"], env=env, cwd=tmp, capture_output=True, text=True,
              check=True)
          got = json.loads(out.stdout.strip().splitlines()[-1])
          ph = got["phases"]
          cell = lambda n: (f"{ph[n]['s']:.2f} ({ph[n]['compiles']}, "
                            f"{ph[n]['compile_s']:.1f} s)")
          rows.append([label, f"{c:g}x", state, f"{ph['import']['s']:.2f}", cell("init"),
                       cell("ranking"), cell("search"), f"{got['total_s']:.1f}",
                       f"{got['total_cpu_s']:.1f}"])
          print(" | ".join(rows[-1]), flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--archs", default="vgg19,resnet18")
  parser.add_argument("--pruners", default="random/uniform,magnitude/global")
  parser.add_argument("--compressions", default="100,1000")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--synflow_rounds", type=int, default=100)
  parser.add_argument("--skip_synflow", action="store_true")
  parser.add_argument("--no_doc", action="store_true")
  parser.add_argument("--baseline", default="9bcc800",
                      help="commit whose library the fresh-process rows compare with "
                           "(before issue 15); empty: none")
  parser.add_argument("--fresh_compressions", default="100,1000")
  parser.add_argument("--skip_fresh", action="store_true")
  args = parser.parse_args()
  fresh_table = ""
  if not args.skip_fresh:
    fresh = fresh_runs(args.baseline or None,
                       [float(c) for c in args.fresh_compressions.split(",")])
    fresh_table = report.markdown_table(
        ["library", "target", "cache", "import s", "init s (compiles, compile s)",
         "ranking s (compiles, compile s)", "search s (compiles, compile s)",
         "total wall s", "total CPU s"], fresh)
    print(fresh_table)
  rows = []
  for arch in args.archs.split(","):
    model = models.create(arch)
    shape = models.input_shape(arch)
    variables = models.init(model, jax.random.key(0), shape)
    for name in args.pruners.split(","):
      make_ranking = lambda seed=1: pruning.ranking_for(
          name, key=jax.random.key(seed), model=model, variables=variables, sparsity=0.99,
          input_shape=shape, trained_params=variables["params"])
      start = time.perf_counter()
      ranking = jax.block_until_ready(make_ranking())
      rank_s = time.perf_counter() - start
      rank_warm = report.median_seconds(lambda: make_ranking(2), args.repeats)
      for c in [float(c) for c in args.compressions.split(",")]:
        s = 1 - 1 / c
        direct = report.median_seconds(
            lambda: pruning.masks_from_ranking(ranking, s, "direct"), args.repeats)
        target = pruning.max_kept_for_sparsity(s, ranking.total)

        def search():  # what masks_from_ranking(..., "effective") does, minus errors
          k, _, _ = pruning.effective_kept(model, ranking, target, shape)
          return pruning.masks_at(ranking, k)

        eff = report.median_seconds(search, args.repeats)
        k, e, sweeps = pruning.effective_kept(model, ranking, target, shape)
        ref = REFERENCE.get((arch, name, c))
        if 0 < e <= target:
          reached = f"{ranking.total / e:.4g}x"
        else:  # no connected mask of this ranking is that sparse
          try:
            pruning.masks_from_ranking(ranking, s, "effective", model=model, input_shape=shape)
          except ValueError as err:
            reached = "unreachable (max " + str(err).rsplit("(compression ", 1)[1].rstrip(".")
        rows.append([arch, name, f"{c:g}x", f"{rank_s:.2f}", f"{rank_warm:.2f}",
                     f"{direct:.3f}", f"{eff:.2f}",
                     sweeps, f"{ranking.total / max(k, 1):.4g}x", reached,
                     f"{ref:.0f}" if ref else "-", f"{ref / eff:.0f}x" if ref else "-"])
        print(" | ".join(str(x) for x in rows[-1]), flush=True)
  header = ["network", "pruner", "target", "ranking s", "ranking warm s", "direct s",
            "effective s", "sweeps",
            "direct compression needed", "effective reached", "paper's reference s",
            "speed-up"]
  table = report.markdown_table(header, rows)
  synflow_line = ""
  if not args.skip_synflow:
    from sparsejax import scores
    model = models.create("vgg16")
    variables = models.init(model, jax.random.key(0), (32, 32, 3))
    start = time.perf_counter()
    pr = scores.synflow(model, variables["params"], (32, 32, 3), 0.999,
                        rounds=args.synflow_rounds)
    jax.block_until_ready(pr)
    total = time.perf_counter() - start
    m = pruning.masks_from_ranking(pruning.rank_scores(pr), 0.999)
    eff = effective.effective_compression(model, m, (32, 32, 3))
    synflow_line = (f"SynFlow, {args.synflow_rounds} rounds on VGG-16 to 1000x (compilation "
                    f"included): {total:.1f} s; its mask: direct {masks.compression(m):.4g}x, "
                    f"effective {eff:.4g}x.")
    print(synflow_line)
  print(table)
  if not args.no_doc:
    report.update_section("effective_pruning", f"""
## Pruning to a target effective sparsity (`python -m benchmarks.effective_pruning`)

{report.stamp()}. Medians of {args.repeats} runs after compilation. *direct s*: masks
at the target direct compression; *ranking s*: scores + sort, first call (compilation
included); *ranking warm s*: the same again (another seed), median; *effective s*:
the exact search (host-stepped jitted
sweeps with bounds, see `sparsejax/pruning.py`) for the smallest direct sparsity whose
effective sparsity reaches the target. Magnitude is scored on the initial weights here
(only the timing matters). The paper's reference needs about 31 s (100x) and 28 s (1000x)
for VGG-19 with random/uniform on this kind of 2-core CPU; target <= 3 s at 1000x.

{table}

{synflow_line}

Fresh processes (`benchmarks/fresh_prune.py`, VGG-19 random/uniform to an effective
target; what one CLI run pays): phases in wall seconds with (XLA compilations, their
seconds; a warm process loads them from the persistent cache and counts them too).
*cold*: empty persistent compilation cache; *warm*: a second process on the same
cache. *baseline*: the library before issue 15, same child script, same run. Targets
(issue 15): cold <= 6 s, warm <= 2 s to 100x. The paper's reference needs about 31 s.
The machine was shared with two other sessions (load average well above 2 on 2
cores): wall times are inflated; *total CPU s* (user + system of the process) is the
steadier figure.

{fresh_table}
""")


if __name__ == "__main__":
  main()
