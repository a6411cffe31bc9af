"""What an experiment config means for its run: the target sparsity, the pruner (or
training procedure, :mod:`experiments.procedures`) and the run folder's name."""

from __future__ import annotations

from experiments import checks
from experiments.procedures import IMP
from sparsejax import dynamic, masks, pruning


def target_sparsity(config) -> float:
  """The run's target sparsity from ``config.compression`` or ``config.target_sparsity``
  (neither: 0, the dense network), validated; a bad one is a
  :class:`experiments.checks.FlagError` naming the field's flag."""
  compression, sparsity = config.compression, config.target_sparsity
  if compression is not None and sparsity is not None:
    raise checks.FlagError(
      "give either --config.compression or --config.target_sparsity, not both."
    )
  if compression is not None:
    return 1.0 - 1.0 / checks.check_compression_flag("config.compression", compression)
  if sparsity is None:
    return 0.0
  with checks.flag_errors():
    return masks.check_sparsity(sparsity, "--config.target_sparsity")


def check_pruner(name: str, flag: str = "--config.pruner") -> pruning.Pruner | None:
  """The registered pruner ``name``, or None for a training procedure ('imp' and the
  registered dynamic methods, :data:`sparsejax.dynamic.METHODS`); for anything else a
  :class:`experiments.checks.FlagError` naming ``flag``, the flag that gave it (an item
  of a list flag reads ``--pruners: pruner='x'``)."""
  if name == IMP or name in dynamic.METHODS:
    return None
  if name not in pruning.PRUNERS:
    given = f"{flag}={name!r}" if flag.startswith("--config.") else f"{flag}: pruner={name!r}"
    raise checks.FlagError(f"{given} is not a known pruner; allowed: {', '.join(pruner_names())}.")
  return pruning.PRUNERS[name]


def pruner_names() -> list[str]:
  """Every name a run's pruner may have: the registered pruners (those of --import
  too), then the training procedures."""
  return [*pruning.PRUNERS, IMP, *dynamic.METHODS]


def after_training(name: str) -> bool:
  """The pruner scores the weights of a matching dense run (IMP trains its own)."""
  p = check_pruner(name)
  return p is not None and p.after_training


def run_name(config) -> str:
  """The folder name of a run: network, dataset, pruner, type, target, seed, steps,
  ``_compact`` when the compacted network trains (``config.compact``), ``_jit`` when a
  moving-mask method updates inside the jitted step (``config.update_in_jit``; other
  pruners ignore the field, so their name does not change) and ``_topk<f>`` with top-k
  activations (``config.activation_topk``)."""
  compression = 1.0 / (1.0 - target_sparsity(config))
  compact = config.get("compact", False)
  # In-jit and between-steps updates give the same masks but not the same result file
  # (no effective tracking, other timings): the two runs need their own folders.
  in_jit = config.get("update_in_jit", False) and config.pruner in dynamic.METHODS
  topk = config.get("activation_topk", None)
  return (
    f"{config.arch}-{config.dataset}_{config.pruner.replace('/', '-')}_"
    f"{config.pruning_type}_c{compression:.4g}_s{config.seed}_t{config.train_steps}"
    + ("_compact" if compact else "")
    + ("_jit" if in_jit else "")
    + (f"_topk{topk:g}" if topk else "")
  )
