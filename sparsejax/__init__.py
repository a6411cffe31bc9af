"""sparsejax: neural-network pruning in JAX/Flax through the lens of effective sparsity.

A weight that lies on no input-to-output path is as good as pruned (Vysogorets &
Kempe, "Connectivity Matters", JMLR 2023). Three lines in a training loop:

  masks = sparsejax.prune("snip", key=key, model=model, variables=variables,
                          sparsity=0.99, pruning_type="effective", ...)
  tx = sparsejax.with_masks(optax.adamw(1e-3), masks)       # pruned weights stay 0
  sparsejax.effective_compression(model, masks, input_shape)

Submodules: masks, connectivity (the transform of a traced program that effective
sparsity and SynFlow use), effective, quotas, scores, pruning, models, optim, dynamic,
compact (dead units removed: a smaller dense network), flops, structured (channel and
neuron pruning), errors; data, training, optim, scores, dynamic, compact, flops and
structured are imported on first use. Nothing imports TensorFlow except
``sparsejax.data.load_split`` (the ``data`` extra).
"""

from __future__ import annotations

import importlib

from sparsejax import connectivity, effective, errors, masks, models, pruning, quotas
from sparsejax.effective import (
  active_units,
  effective_compression,
  effective_masks,
  effective_sparsity,
)
from sparsejax.errors import UnreachableSparsityError
from sparsejax.pruning import (
  PRUNERS,
  Pruner,
  ScoreContext,
  get_pruner,
  prune,
  ranking_for,
  register_pruner,
)

__version__ = "0.2.0"

# Imported on first attribute access: data and training (Orbax), optax, the structured
# and dynamic pruners are not needed to prune, and a CLI run that prunes once should not
# pay for their import.
_LAZY_SUBMODULES = (
  "data",
  "training",
  "compact",
  "dynamic",
  "flops",
  "optim",
  "scores",
  "structured",
)
_LAZY_NAMES = {
  "MaskedState": "optim",
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
  "connectivity",
  "effective",
  "quotas",
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
  # pruning
  "prune",
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
  "MaskedState",
  "get_masks",
  "replace_masks",
]
