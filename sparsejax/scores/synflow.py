"""SynFlow (Tanaka et al., 2020): data-free scores on the linearized program of any model.

    R = 1^T f_lin(1; |w| * m),   score(w) = | dR/dw * w |,

on the linearized program (:mod:`sparsejax.connectivity`: activations and normalization
the identity, max pooling as average, biases 0) with an all-ones input. Values are
divided by a stop-gradient positive constant only at cuts of the traced graph (values
every input-to-output path passes through, e.g. after a residual sum, never inside its
branches), so R and all scores are the true ones times one common positive factor:
same ranking, no overflow.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax import connectivity as conn_lib
from sparsejax import masks as masks_lib
from sparsejax import tracing
from sparsejax.scores import rounds as rounds_lib
from sparsejax.scores import trees

PyTree = Any


@functools.lru_cache(maxsize=32)
def _synflow_fns(traced: tracing.Traced):
  """(jitted one-round scores, jitted round step) of a traced model."""
  kernel_slots = tuple(sorted(traced.prunable))  # the params' flattened (mask) order
  linear = conn_lib.linear_scores(traced.program, kernel_slots)
  extra = [jnp.ones(s, jnp.float32) for s in traced.program.extra_shapes]

  def scores(abs_kernels, alive, abs_params):
    """|dR/dw * w| with w = |kernel| * alive on the linearized program (traceable)."""
    return linear(abs_kernels, alive, abs_params, extra)

  step = rounds_lib.make_step(
    lambda alive, abs_kernels, abs_params: scores(abs_kernels, alive, abs_params)
  )
  return jax.jit(scores), step


def _setup(model, variables, input_shape, apply_kwargs, prunable, masks):
  """(params, slots, |kernels| float32, |params| flat, one-round scores, jitted round
  step, mask leaves) for the prunable leaves of the traced program: ``prunable``, else
  the masks' leaves, else every linear-op weight."""
  params = variables
  if hasattr(params, "keys") and "params" in params and hasattr(params["params"], "keys"):
    params = params["params"]  # model variables were passed
  module = model.model if isinstance(model, tracing.Traced) else model
  kw = {} if isinstance(module, nn.Module) else {"params": params}
  traced = tracing.trace(model, input_shape, apply_kwargs=apply_kwargs, prunable=prunable, **kw)
  mine = tuple(masks_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
  if mine != traced.paths:
    raise ValueError(
      f"variables does not match the model: leaves {list(mine)[:3]}... vs the "
      f"model's {list(traced.paths)[:3]}...; pass the model's variables."
    )
  if masks is not None:
    if prunable is None:
      traced = traced.masked(masks)
    masks_lib.validate(masks, params, prunable=traced.prunable_paths)
  scores, step = _synflow_fns(traced)
  slots = tuple(sorted(traced.prunable))
  abs_kernels = [jnp.abs(w).astype(jnp.float32) for w in trees.kernels(params, slots)]
  abs_params = [jnp.abs(jnp.asarray(w)).astype(jnp.float32) for w in jax.tree.leaves(params)]
  return params, slots, abs_kernels, abs_params, scores, step, trees.mask_arrays(masks)


def synflow_scores(
  model,
  variables: PyTree,
  *,
  input_shape=None,
  masks=None,
  apply_kwargs: dict | None = None,
  prunable: masks_lib.Prunable = None,
) -> PyTree:
  """One round of SynFlow scores (module docstring) with an all-ones input
  [1, *input_shape] (or shaped like an example input): float32, pruned weights score 0.

  ``model``: a Flax module, a function ``apply(params, x)`` or a
  :class:`sparsejax.Traced` (then without ``input_shape``); ``variables``: its variables
  or params (only the weights are used). ValueError where the model has no faithful
  linearization (layer norm, products of activations).
  """
  params, slots, abs_kernels, abs_params, scores, _, mask_leaves = _setup(
    model, variables, input_shape, apply_kwargs, prunable, masks
  )
  alive = mask_leaves or [jnp.ones(w.shape, bool) for w in abs_kernels]
  out = scores(abs_kernels, alive, abs_params)
  trees.check_finite(out, "synflow")
  return trees.score_tree(params, out, slots)


def synflow(
  model,
  variables: PyTree,
  *,
  sparsity: float,
  input_shape=None,
  rounds: int = 100,
  masks=None,
  return_stats: bool = False,
  apply_kwargs: dict | None = None,
  prunable: masks_lib.Prunable = None,
):
  """Iterative SynFlow (Tanaka et al., 2020): ``rounds`` rounds of
  :func:`synflow_scores` on the currently kept weights; after round t = 1..R the
  density is (1 - s)^(t/R), kept globally by exact top-k (ties by position).

  Data-free: only the weights of ``variables`` are read. Returns an int32 priority tree
  (:mod:`sparsejax.scores.rounds`) whose top round((1 - s) N) is the final mask;
  ``return_stats=True`` also returns :class:`~sparsejax.scores.rounds.RoundStats`
  (scores finite, and positive on every kept weight unless a weight lost all its paths).
  """
  who = "synflow"
  sparsity = masks_lib.check_sparsity(sparsity)
  rounds = trees.check_rounds(rounds)
  params, slots, abs_kernels, abs_params, _, step, mask_leaves = _setup(
    model, variables, input_shape, apply_kwargs, prunable, masks
  )
  return rounds_lib.iterate(
    step,
    lambda t: (abs_kernels, abs_params),
    params,
    slots,
    mask_leaves,
    sparsity,
    rounds,
    who,
    return_stats,
  )
