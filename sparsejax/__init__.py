"""sparsejax: neural-network pruning in JAX/Flax through the lens of effective sparsity.

A weight that lies on no input-to-output path is as good as pruned (Vysogorets &
Kempe, "Connectivity Matters", JMLR 2023). Three lines in a training loop:

  traced = sparsejax.trace(model, input_shape, variables=variables)   # once
  masks = sparsejax.prune("snip", key=key, model=traced, variables=variables,
                          sparsity=0.99, pruning_type="effective", batches=...)
  tx = sparsejax.with_masks(optax.adamw(1e-3), masks)       # pruned weights stay 0
  sparsejax.effective_compression(traced, masks)

Argument convention everywhere: the model first (a Flax module, a function
``apply(params, x)``, or its :class:`Traced`), then its ``variables`` where values are
read, then ``masks``; the rest by keyword (``input_shape=``, ``sparsity=``, ``key=``).

``import sparsejax`` loads the pruning path: masks, tracing, connectivity, effective,
quotas, selection, ranking, search, layouts, patterns, calibration, scores, groups
(dependency groups: ``structure``), structured, compact (structured reads its zoo
tables), registry, pruning, models, errors. These load on first use: optim and dynamic
(Optax), training and data (Orbax; TensorFlow only in
``sparsejax.data.load_split``, the ``data`` extra),
flops, timing, ephemeral (activation sparsity), data_effective (effective sparsity on
data), blocks (block sparsity) (tests/test_library.py checks both lists in a fresh
process).
"""

from __future__ import annotations

import importlib

from sparsejax import (
  calibration,
  compact,
  connectivity,
  effective,
  errors,
  groups,
  layouts,
  masks,
  models,
  patterns,
  pruning,
  quotas,
  ranking,
  registry,
  scores,
  search,
  selection,
  structured,
  tracing,
)
from sparsejax.calibration import Pruned
from sparsejax.effective import (
  active_units,
  effective_compression,
  effective_masks,
  effective_sparsity,
)
from sparsejax.errors import UnreachableSparsityError
from sparsejax.groups import Structure, structure
from sparsejax.pruning import prune, prune_with_params, ranking_for
from sparsejax.registry import PRUNERS, Pruner, ScoreContext, get_pruner, register_pruner
from sparsejax.tracing import Traced, trace

__version__ = "0.2.0"

# Imported on first attribute access: they bring Optax, Orbax or TensorFlow Datasets,
# which a CLI run that prunes once should not pay for.
_LAZY_SUBMODULES = (
  "data",
  "training",
  "dynamic",
  "flops",
  "optim",
  "timing",
  "ephemeral",
  "data_effective",
  "blocks",
)
_LAZY_NAMES = {
  "WithMasksState": "optim",
  "get_masks": "optim",
  "replace_masks": "optim",
  "with_masks": "optim",
}


def __getattr__(name: str):
  if name in _LAZY_SUBMODULES:
    module = importlib.import_module(f"sparsejax.{name}")
    globals()[name] = module
    return module
  if name in _LAZY_NAMES:
    value = getattr(importlib.import_module(f"sparsejax.{_LAZY_NAMES[name]}"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'sparsejax' has no attribute {name!r}")


__all__ = [
  "__version__",
  # submodules
  "masks",
  "tracing",
  "connectivity",
  "effective",
  "quotas",
  "ranking",
  "search",
  "registry",
  "scores",
  "pruning",
  "models",
  "optim",
  "dynamic",
  "errors",
  "data",
  "training",
  "compact",
  "flops",
  "structured",
  "selection",
  "timing",
  "groups",
  "layouts",
  "patterns",
  "calibration",
  "ephemeral",
  "data_effective",
  "blocks",
  # the model, traced once
  "trace",
  "Traced",
  # its dependency groups
  "structure",
  "Structure",
  # pruning
  "prune",
  "prune_with_params",
  "Pruned",
  "ranking_for",
  "PRUNERS",
  "Pruner",
  "ScoreContext",
  "register_pruner",
  "get_pruner",
  "UnreachableSparsityError",
  # effective sparsity
  "effective_masks",
  "effective_sparsity",
  "effective_compression",
  "active_units",
  # training with masks
  "with_masks",
  "WithMasksState",
  "get_masks",
  "replace_masks",
]
