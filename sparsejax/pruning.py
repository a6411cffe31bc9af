"""Pruning: a registered pruner's ranking, and the masks at a direct or effective target.

``prune(pruner, key=, model=, variables=, sparsity=, pruning_type=, input_shape=)`` is the
user API. The pieces it composes, one module each:

- :mod:`sparsejax.registry`: the pruner registry (a pruner is a score function over one
  :class:`~sparsejax.registry.ScoreContext` hook and a quota);
- :mod:`sparsejax.ranking`: scores -> a nested family of masks (ties by position);
- :mod:`sparsejax.search`: the largest member of a nested family that meets a target,
  for effective pruning the smallest direct sparsity whose effective sparsity is at
  least the target (method.md section 2);
- :mod:`sparsejax.structured`: channel / neuron rankings of structured pruners.

``model`` may be a :class:`sparsejax.Traced` (``sparsejax.trace(model, input_shape)``):
the input shape, apply kwargs and prunable set then come with it, and a pipeline traces
its model once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sparsejax import errors, search, structured, tracing
from sparsejax import masks as masks_lib
from sparsejax import ranking as ranking_lib
from sparsejax.ranking import (  # noqa: F401  (the API's names, kept importable from here)
  Ranking,
  kept_for_sparsity,
  masks_at,
  max_kept_for_sparsity,
  rank_scores,
)
from sparsejax.registry import (  # noqa: F401
  PRUNERS,
  Pruner,
  ScoreContext,
  get_pruner,
  register_pruner,
)
from sparsejax.search import PRUNING_TYPES, check_pruning_type  # noqa: F401

PyTree = Any


def _rounds(p: Pruner, rounds: int | None) -> int | None:
  if not p.iterative:
    return None
  rounds = p.default_rounds if rounds is None else rounds
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
    raise ValueError(f"rounds={rounds!r} must be a positive integer (pruner {p.name!r}).")
  return int(rounds)


def check_key(key, name: str = "key") -> jax.Array:
  """``key`` if it is a JAX PRNG key (``jax.random.key(seed)``, or a legacy uint32 [2]
  ``jax.random.PRNGKey(seed)``), else ValueError naming ``name``."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if np.ndim(key) == 0:
      return key
  elif dtype == np.uint32 and np.shape(key) == (2,):
    return key
  raise ValueError(
    f"{name}={key!r} must be one JAX PRNG key, e.g. jax.random.key(0) (or the legacy "
    "jax.random.PRNGKey(0))."
  )


def _example(input_shape, batches, loss):
  """The example input of the trace: ``input_shape``, else the first default-loss batch's
  image (one example); None when neither is known."""
  if input_shape is not None:
    return input_shape
  if loss is None and batches:
    first = batches if hasattr(batches, "keys") else next(iter(batches), None)
    if hasattr(first, "keys") and "image" in first:
      return jax.ShapeDtypeStruct((1, *np.shape(first["image"])[1:]), np.float32)
  return None


def trace_for(
  model, variables, input_shape=None, *, batches=None, loss=None, apply_kwargs=None, prunable=None
) -> tracing.Traced:
  """The :class:`sparsejax.Traced` a pruner ranks the weights of: ``model`` traced on
  ``input_shape`` (or on a default-loss batch's image), narrowed by ``prunable``."""
  example = _example(input_shape, batches, loss)
  if example is None and not isinstance(model, tracing.Traced):
    raise ValueError(
      "input_shape=None: the prunable weights are the parameters the model's traced "
      "program uses as linear-op weights, so it is traced on one example: pass "
      "input_shape= (one example's shape, e.g. (28, 28, 1), or an example input), or a "
      "sparsejax.trace(...) result as model=."
    )
  if isinstance(model, tracing.Traced):
    example = input_shape
  return tracing.trace(
    model, example, variables=variables, apply_kwargs=apply_kwargs, prunable=prunable
  )


def prunable_set(
  model,
  variables: PyTree,
  input_shape=None,
  *,
  prunable: masks_lib.Prunable = None,
  apply_kwargs: dict | None = None,
) -> frozenset:
  """The '/'-joined paths of the leaves a pruner prunes: the parameters the traced
  program uses as linear-op weights (:class:`sparsejax.Traced`), narrowed by
  ``prunable`` (a predicate on the path or a collection of paths)."""
  traced = trace_for(model, variables, input_shape, apply_kwargs=apply_kwargs, prunable=prunable)
  return frozenset(traced.prunable_paths)


def _check_score_leaves(scores: PyTree, chosen: frozenset, who: str) -> None:
  flat = jax.tree_util.tree_leaves_with_path(scores, is_leaf=lambda x: x is None)
  got = {masks_lib.path_str(p): s for p, s in flat if s is not None}
  if set(got) != chosen:
    raise ValueError(
      f"pruner {who!r} scored {sorted(set(got) - chosen)[:3]} and not "
      f"{sorted(chosen - set(got))[:3]}; a score tree has arrays exactly at the "
      "prunable leaves (ScoreContext.prunable)."
    )


def _check_score_shapes(scores: PyTree, params: PyTree, who: str) -> None:
  shapes = {
    masks_lib.path_str(p): np.shape(w) for p, w in jax.tree_util.tree_leaves_with_path(params)
  }
  for p, s in jax.tree_util.tree_leaves_with_path(scores, is_leaf=lambda x: x is None):
    path = masks_lib.path_str(p)
    if s is not None and np.shape(s) != shapes.get(path):
      raise ValueError(
        f"pruner {who!r} returned scores of shape {np.shape(s)} at {path!r}, whose weight "
        f"has shape {shapes.get(path)}; a score tree has one score per weight."
      )


def ranking_for(
  pruner: str | Pruner,
  *,
  key: jax.Array,
  model,
  variables: PyTree,
  sparsity: float,
  input_shape=None,
  batches=None,
  trained_params=None,
  rounds: int | None = None,
  score_kwargs: dict | None = None,
  loss: Callable | None = None,
  apply_kwargs: dict | None = None,
  prunable: masks_lib.Prunable = None,
) -> Ranking | structured.ChannelRanking:
  """The ranking of ``pruner`` (scores computed once; iterative pruners run to
  ``sparsity`` in ``rounds`` rounds, default the pruner's, and rank the eliminated
  weights by elimination order). Arguments as :func:`prune`.

  A structured pruner (``p.structured``) returns a
  :class:`sparsejax.structured.ChannelRanking` instead (zoo models only; ``prunable``
  and ``score_kwargs`` are not taken), which :func:`masks_from_ranking` accepts too.
  """
  p = get_pruner(pruner)
  if p.score is None:
    raise ValueError(f"pruner={p.name!r} has no ranking: it keeps every weight.")
  check_key(key)
  model, variables = tracing.as_function(model, variables)
  score_kwargs = dict(score_kwargs or {})
  if "rounds" in score_kwargs:  # rounds given the way older code gave it
    if rounds is not None:
      raise ValueError("give rounds= or score_kwargs['rounds'], not both.")
    rounds = score_kwargs.pop("rounds")
  if p.needs_data and not batches:
    raise ValueError(
      f"pruner={p.name!r} scores weights on training data: pass batches= "
      "(from the dataset pipeline or synthetic data)."
    )
  if p.after_training and trained_params is None:
    raise ValueError(
      f"pruner={p.name!r} scores the weights after dense training: pass "
      "trained_params= (the final params of a --pruner=dense run)."
    )
  if p.needs_input and input_shape is None and not isinstance(model, tracing.Traced):
    raise ValueError(f"pruner={p.name!r} needs input_shape= (SynFlow's all-ones input).")
  context = dict(
    key=key,
    model=model,
    variables=variables,
    sparsity=masks_lib.check_sparsity(sparsity),
    input_shape=input_shape,
    batches=batches,
    trained_params=trained_params,
    rounds=_rounds(p, rounds),
    score_kwargs=score_kwargs,
    loss=loss,
    apply_kwargs=apply_kwargs,
  )
  if p.structured:
    return _channel_ranking(p, prunable, ScoreContext(**context))
  traced = trace_for(
    model,
    variables,
    input_shape,
    batches=batches,
    loss=loss,
    apply_kwargs=apply_kwargs,
    prunable=prunable,
  )
  tracing.params_of(traced, variables)  # ValueError: no 'params' collection
  context = ScoreContext(**context, prunable=frozenset(traced.prunable_paths))
  flow = traced.flow
  if p.quota_from is not None:
    # Per-layer counts from the source pruner's global ranking, `score` within layers.
    source = get_pruner(p.quota_from)
    source_context = dataclasses.replace(context, rounds=_rounds(source, None), score_kwargs={})
    counts = ranking_lib.rank_scores(_scored(source, source_context), flow=flow)
    within = ranking_lib.rank_scores(_scored(p, context), quota="uniform", flow=flow)
    return within.with_counts_from(counts)
  return ranking_lib.rank_scores(_scored(p, context), quota=p.quota, flow=flow)


def _channel_ranking(p: Pruner, prunable, context: ScoreContext) -> structured.ChannelRanking:
  """The :class:`sparsejax.structured.ChannelRanking` of a structured pruner."""
  if prunable is not None:
    raise ValueError(
      f"prunable={prunable!r}: structured pruner {p.name!r} prunes whole "
      "channel spaces; prunable= is for unstructured pruners."
    )
  if context.score_kwargs:
    raise ValueError(
      f"score_kwargs={context.score_kwargs!r}: structured pruner {p.name!r} takes none."
    )
  tracing.params_of(context.model, context.variables)  # ValueError: no 'params' collection
  structured.spaces_of(context.module, context.variables, p.kind, p.name)  # no such channels
  return structured.rank(
    p.name,
    p.kind,
    "global" if p.quota is None else p.quota,
    p.score(context),
    context.module,
    context.variables,
  )


def _scored(p: Pruner, context: ScoreContext) -> PyTree:
  scores = p.score(context)
  _check_score_leaves(scores, context.prunable, p.name)
  _check_score_shapes(scores, context.params, p.name)
  return scores


def masks_from_ranking(
  ranking: Ranking | structured.ChannelRanking,
  sparsity: float,
  pruning_type: str = "direct",
  *,
  model=None,
  input_shape=None,
  loop: str = "auto",
  **trace_kw,
) -> PyTree:
  """Masks at direct sparsity ``sparsity``, or at the smallest direct sparsity whose
  effective sparsity is at least ``sparsity`` (``pruning_type='effective'``; ``model``,
  ``input_shape`` and ``trace_kw`` as :func:`sparsejax.trace`, ``loop`` as
  :func:`sparsejax.search.check_loop`). A :class:`sparsejax.structured.ChannelRanking`
  gives the member with the fewest channels removed whose direct (effective) sparsity
  is at least ``sparsity``.

  Raises:
    UnreachableSparsityError: an effective target beyond every connected mask of the
      ranking, or a target beyond the quota's (the channel family's) reach.
  """
  sparsity = masks_lib.check_sparsity(sparsity)
  check_pruning_type(pruning_type)
  traced = None
  if isinstance(ranking, structured.ChannelRanking) and model is None:
    model = ranking.model  # a channel ranking knows its model
  if pruning_type == "effective":
    if model is None or (input_shape is None and not isinstance(model, tracing.Traced)):
      raise ValueError(
        "pruning_type='effective' needs model= and input_shape= (or a sparsejax.Traced "
        "as model=) for the connectivity sweep."
      )
    traced = tracing.trace(model, input_shape, **trace_kw)
  if isinstance(ranking, structured.ChannelRanking):
    return structured.masks_for_target(ranking, sparsity, traced, loop=loop)
  if not isinstance(ranking, Ranking):
    raise ValueError(
      f"ranking={type(ranking).__name__} is not a Ranking (from rank_scores or ranking_for)."
    )
  if traced is None:
    return masks_at(ranking, kept_for_sparsity(sparsity, ranking.total))
  traced = traced.narrow(ranking.paths)
  target = max_kept_for_sparsity(sparsity, ranking.total)
  k, e, _ = search.effective_kept(ranking, target, traced, loop)
  if e == 0 or e > target:
    smallest = search.smallest_connected(ranking, traced, loop)
    raise errors.UnreachableSparsityError(
      f"sparsity={sparsity!r} (effective) cannot be reached: along this ranking every "
      f"connected mask keeps more than {target} weights; the largest reachable effective "
      f"sparsity is {1 - smallest / ranking.total:.6g} (compression "
      f"{ranking.total / smallest:.4g}x).",
      sparsity=sparsity,
      max_sparsity=1 - smallest / ranking.total,
    )
  return masks_at(ranking, k)


def prune(
  pruner: str | Pruner,
  *,
  key: jax.Array,
  model,
  variables: PyTree,
  sparsity: float,
  pruning_type: str = "direct",
  input_shape=None,
  batches=None,
  trained_params=None,
  rounds: int | None = None,
  score_kwargs: dict | None = None,
  loss: Callable | None = None,
  apply_kwargs: dict | None = None,
  prunable: masks_lib.Prunable = None,
) -> PyTree:
  """Masks of ``pruner`` at ``sparsity``: direct sparsity, or (``pruning_type=
  'effective'``) the smallest direct sparsity whose effective sparsity is at least
  ``sparsity`` (method.md section 2).

  Args:
    pruner: a name from :data:`PRUNERS` (e.g. 'random/igq', 'snip', 'synflow', or a
      structured one, 'channel/l1', 'neuron/snip/global': :mod:`sparsejax.structured`)
      or a :class:`Pruner`.
    key: PRNG key for random scores and random within-layer orders.
    model: a Flax module (zoo or user-written), a function ``apply(params, x)``, an
      NNX module (``variables`` then left out: its ``nnx.Param`` state is pruned), or a
      :class:`sparsejax.Traced` of any of them (``sparsejax.trace``).
    variables: the module's {'params': ..., 'batch_stats': ...} at initialization, or
      the function's params.
    input_shape: one example's shape, e.g. (28, 28, 1), or an example input: the model
      is traced on it (the prunable weights, SynFlow's all-ones input, the effective
      type's sweep, the layers' input-to-output order). Not needed with a Traced, nor
      with image/label batches (their image's shape).
    batches: batches for data-driven scores (SNIP, GraSP): preprocessed image/label
      dicts for the default loss, any pytrees for a user ``loss``.
    trained_params: params after dense training (magnitude, LAMP; structured l1,
      magnitude and bn_scale).
    rounds: rounds of an iterative pruner (default: the pruner's).
    loss: ``loss(params, batch) -> scalar`` for SNIP, iterative SNIP and GraSP.
    apply_kwargs: keyword arguments of the model's call (e.g. {'train': False}).
    prunable: narrows the prunable leaves, which are every parameter the traced
      program uses as a linear-op weight (Dense/Conv/Einsum kernels): a predicate on
      the '/'-joined path or a collection of paths (:func:`prunable_set`).

  Returns:
    A mask tree: bool at the prunable leaves, None elsewhere.

  Raises:
    UnreachableSparsityError: an effective target beyond every connected mask of the
      ranking, or a direct target beyond the quota's limit.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sparsejax import masks, models, pruning
    >>> model = models.create("lenet300100")
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    >>> m = pruning.prune("random/igq", key=jax.random.key(1), model=model,
    ...                   variables=variables, sparsity=0.9, input_shape=(28, 28, 1))
    >>> round(masks.compression(m), 2)
    10.0
  """
  p = get_pruner(pruner)
  sparsity = masks_lib.check_sparsity(sparsity)
  check_pruning_type(pruning_type)
  model, variables = tracing.as_function(model, variables)
  if p.score is None:
    if sparsity != 0:
      raise ValueError(f"pruner='dense' keeps every weight; sparsity={sparsity!r} must be 0.")
    traced = trace_for(
      model,
      variables,
      input_shape,
      batches=batches,
      loss=loss,
      apply_kwargs=apply_kwargs,
      prunable=prunable,
    )
    return traced.ones()
  ranking = ranking_for(
    p,
    key=key,
    model=model,
    variables=variables,
    sparsity=sparsity,
    input_shape=input_shape,
    batches=batches,
    trained_params=trained_params,
    rounds=rounds,
    score_kwargs=score_kwargs,
    loss=loss,
    apply_kwargs=apply_kwargs,
    prunable=prunable,
  )
  if pruning_type == "direct":
    return masks_from_ranking(ranking, sparsity, "direct")
  traced = trace_for(
    model, variables, input_shape, batches=batches, loss=loss, apply_kwargs=apply_kwargs
  )
  return masks_from_ranking(ranking, sparsity, "effective", model=traced)
