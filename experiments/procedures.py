"""Training procedures that an experiment names as its pruner but that are not in the
pruner registry (:data:`sparsejax.pruning.PRUNERS`): they decide the masks while
training, so only experiments.prune_train runs them.

Plain names, no JAX: the plots tell these runs apart without importing the library.
"""

from __future__ import annotations

#: Iterative magnitude pruning with rewinding: a training procedure of
#: experiments.prune_train, not a ranking, so not in the pruner registry.
IMP = "imp"
#: Masks that move during training (sparsejax.dynamic): gradual magnitude pruning,
#: SET, RigL and straight-through magnitude pruning. Training procedures too.
DYNAMIC = ("gmp", "set", "rigl", "ste")
