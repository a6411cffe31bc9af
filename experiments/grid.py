"""A sweep's grid: its points and how each one is described to whoever runs it.

A point is {arch, pruner, pruning_type, seed, compression} (compression None for
dense). It becomes config overrides (:func:`overrides`, then the sweep's shared ones),
a config (:func:`config_for`, parsed as a command line would be), a result path
(:func:`result_path`) and a prune_train command line (:func:`command`).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Sequence

import ml_collections

from experiments import checks, configs, datasource, plugins, run_config
from sparsejax import pruning


def grid(archs, pruners, compressions, pruning_types, seeds) -> list[dict]:
  """The grid points, dense runs first; duplicates (dense at several targets) removed.

  Raises:
    experiments.checks.FlagError: an unknown network or pruner, a bad compression or
      seed (named as the sweep's flag).
  """
  for arch in archs:
    configs.check_arch(arch, "--archs")
  for name in pruners:
    run_config.check_pruner(name, "--pruners")
  for t in pruning_types:
    with checks.flag_errors():
      pruning.check_pruning_type(t, "--pruning_types")
  checks.check_run_args(compressions={"compressions": list(compressions)}, seeds={"seeds": seeds})
  needs_dense = any(p == "dense" or run_config.after_training(p) for p in pruners)
  runs = []
  for arch, seed in itertools.product(archs, seeds):
    configs.path(arch)
    if needs_dense:
      runs.append(
        dict(arch=arch, pruner="dense", pruning_type="direct", seed=seed, compression=None)
      )
  for arch, pruner, c, t, seed in itertools.product(
    archs, pruners, compressions, pruning_types, seeds
  ):
    if pruner != "dense":
      runs.append(dict(arch=arch, pruner=pruner, pruning_type=t, seed=seed, compression=c))
  out, seen = [], set()
  for r in runs:
    key = tuple(sorted(r.items()))
    if key not in seen:
      seen.add(key)
      out.append(r)
  return out


def overrides(point: dict, shared: list[str]) -> list[str]:
  """Config overrides ('field=value') of a grid point, then the sweep's shared ones."""
  own = [
    f"pruner={point['pruner']}",
    f"pruning_type={point['pruning_type']}",
    f"seed={point['seed']}",
  ]
  if point["compression"] is not None:
    own.append(f"compression={point['compression']:.10g}")
  return own + list(shared)


def shared_overrides(train_steps: int | None, eval_every: int | None, extra: str) -> list[str]:
  """The overrides every run of the sweep gets ('field=value')."""
  shared = []
  if train_steps is not None:
    shared.append(f"train_steps={train_steps}")
  if eval_every is not None:
    shared.append(f"eval_every={eval_every}")
  with checks.flag_errors(f"--extra_flags={extra!r}"):
    return shared + [a[len("--config.") :] for a in configs.override_args(extra.split())]


def config_for(point: dict, shared: list[str]) -> ml_collections.ConfigDict:
  """The run's config: the network's file with the point's and the shared overrides."""
  return configs.load(point["arch"], overrides(point, shared))


def result_path(config: ml_collections.ConfigDict, out_dir: str) -> str:
  return os.path.join(out_dir, run_config.run_name(config), "result.json")


def command(
  point: dict,
  shared: list[str],
  out_dir: str,
  source: datasource.DataSource,
  compilation_cache_dir: str | None = None,
  imports: Sequence[str] = (),
) -> list[str]:
  """The experiments.prune_train command line of a grid point; the child uses the
  persistent compilation cache in ``compilation_cache_dir`` ('' : none; None: the
  child's default) and imports ``imports`` first (``--import``, paths made absolute)."""
  cmd = [
    sys.executable,
    "-m",
    "experiments.prune_train",
    f"--config={configs.path(point['arch'])}",
    *configs.override_args(overrides(point, shared)),
    f"--out_dir={out_dir}",
  ]
  if compilation_cache_dir is not None:
    cmd.append(f"--compilation_cache_dir={compilation_cache_dir}")
  if source.manual_dir:
    cmd.append(f"--tfds_manual_dir={source.manual_dir}")
  if source.data_dir:
    cmd.append(f"--tfds_data_dir={source.data_dir}")
  if source.synthetic:
    cmd.append("--synthetic_data")
  if imports:
    cmd.append(f"--{plugins.FLAG}={','.join(plugins.normalized(imports))}")
  return cmd
