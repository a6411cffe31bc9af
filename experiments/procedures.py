"""Training procedures that an experiment names as its pruner but that are not in the
pruner registry (:data:`sparsejax.pruning.PRUNERS`): they decide the masks while
training, so only experiments.prune_train runs them.

Plain names, no JAX: the plots tell these runs apart without importing the library.
"""

from __future__ import annotations

#: Iterative magnitude pruning with rewinding: a training procedure of
#: experiments.prune_train, not a ranking, so not in the pruner registry.
IMP = "imp"
#: The built-in methods whose masks move during training (sparsejax.dynamic), for the
#: plots' grouping only (plot imports no JAX); the binaries read the registry,
#: sparsejax.dynamic.METHODS, where a user's methods are too.
DYNAMIC = ("gmp", "set", "rigl", "ste", "acdc", "gmp/block4x4")
