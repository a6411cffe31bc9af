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
import jax.numpy as jnp
import numpy as np

from sparsejax import blocks, errors, groups, patterns, search, selection, structured, tracing
from sparsejax import masks as masks_lib
from sparsejax import ranking as ranking_lib
from sparsejax.calibration import Pruned
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
from sparsejax.scores import calibration as calibration_scores
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
) -> Ranking | structured.ChannelRanking | blocks.BlockRanking:
  """The ranking of ``pruner`` (scores computed once; iterative pruners run to
  ``sparsity`` in ``rounds`` rounds, default the pruner's, and rank the eliminated
  weights by elimination order). Arguments as :func:`prune`.

  A structured pruner (``p.structured``) returns a
  :class:`sparsejax.structured.ChannelRanking` instead (any model; ``prunable``
  and ``score_kwargs`` are not taken), which :func:`masks_from_ranking` accepts too.
  A layerwise pruner (Wanda, SparseGPT: ``p.layerwise``) prunes at ``sparsity``; its
  ranking keeps those masks there (to the uniform quota's rounding) and orders the rest
  by the pruner's saliency, kept weights first (:func:`layerwise_priorities`).
  A block pruner (``p.ranking``) returns a :class:`sparsejax.blocks.BlockRanking`,
  which :func:`masks_from_ranking` accepts too.
  """
  p = get_pruner(pruner)
  if p.score is None:
    raise ValueError(f"pruner={p.name!r} has no ranking: it keeps every weight.")
  context, traced = _context(
    p,
    key=key,
    model=model,
    variables=variables,
    sparsity=masks_lib.check_sparsity(sparsity),
    input_shape=input_shape,
    batches=batches,
    trained_params=trained_params,
    rounds=rounds,
    score_kwargs=score_kwargs,
    loss=loss,
    apply_kwargs=apply_kwargs,
    prunable=prunable,
  )
  if p.structured:
    return _channel_ranking(p, prunable, context)
  if p.ranking is not None:  # whole blocks of weights: the pruner ranks the blocks
    return p.ranking(context)
  flow = traced.flow
  if p.layerwise:
    result = _layerwise(p, context, traced)
    return ranking_lib.rank_scores(layerwise_priorities(result), quota=p.quota, flow=flow)
  if p.quota_from is not None:
    # Per-layer counts from the source pruner's global ranking, `score` within layers.
    source = get_pruner(p.quota_from)
    source_context = dataclasses.replace(context, rounds=_rounds(source, None), score_kwargs={})
    counts = ranking_lib.rank_scores(_scored(source, source_context), flow=flow)
    within = ranking_lib.rank_scores(_scored(p, context), quota="uniform", flow=flow)
    return within.with_counts_from(counts)
  return ranking_lib.rank_scores(_scored(p, context), quota=p.quota, flow=flow)


def _context(
  p: Pruner,
  *,
  key,
  model,
  variables,
  sparsity,
  input_shape,
  batches,
  trained_params,
  rounds,
  score_kwargs,
  loss,
  apply_kwargs,
  prunable,
  pattern=None,
) -> tuple[ScoreContext, tracing.Traced | None]:
  """The :class:`ScoreContext` of ``p`` after the checks at the boundary, and the traced
  model whose weights it scores (None for a structured pruner, whose context has no
  prunable set)."""
  check_key(key)
  model, variables = tracing.as_function(model, variables)
  score_kwargs = dict(score_kwargs or {})
  if "rounds" in score_kwargs:  # rounds given the way older code gave it
    if rounds is not None:
      raise ValueError("give rounds= or score_kwargs['rounds'], not both.")
    rounds = score_kwargs.pop("rounds")
  if p.needs_data and not batches:
    raise ValueError(
      f"pruner={p.name!r} scores weights on "
      + ("calibration" if p.after_training else "training")
      + " data: pass batches= (from the dataset pipeline or synthetic data)."
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
    sparsity=sparsity,
    input_shape=input_shape,
    batches=batches,
    trained_params=trained_params,
    rounds=_rounds(p, rounds),
    score_kwargs=score_kwargs,
    loss=loss,
    apply_kwargs=apply_kwargs,
    pattern=pattern,
  )
  if p.structured:
    return ScoreContext(**context), None
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
  return ScoreContext(**context, prunable=frozenset(traced.prunable_paths)), traced


def _layerwise(p: Pruner, context: ScoreContext, traced: tracing.Traced) -> Pruned:
  """The :class:`Pruned` of a layerwise pruner at the context's target, checked."""
  result = p.score(context)
  if not isinstance(result, Pruned) or result.scores is None:
    raise ValueError(
      f"layerwise pruner {p.name!r} returned {type(result).__name__}; it returns a "
      "sparsejax.calibration.Pruned with masks, params and scores."
    )
  params = tracing.params_of(traced, context.variables)
  masks_lib.validate(result.masks, params, f"pruner {p.name!r}'s masks", context.prunable)
  if context.pattern is not None:
    patterns.check(traced, result.masks, context.pattern, f"pruner {p.name!r}'s masks")
  return result


def layerwise_priorities(result: Pruned) -> PyTree:
  """int32 priorities (higher = kept first) of a layerwise pruner's result: in each
  layer of n weights the kept ones get n + 1..2n and the pruned ones 1..n, each group
  in the order of ``result.scores`` (ties by position). Ranked with the uniform quota,
  the mask at the pruner's target is its own."""

  def layer(keep, sal):
    keep = np.asarray(keep).reshape(-1)
    n = keep.size
    order = selection.full_order(selection.descending_keys(np.asarray(sal, np.float32)))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    return jnp.asarray(np.where(keep, 2 * n - rank, n - rank).astype(np.int32)).reshape(
      np.shape(sal)
    )

  return masks_lib.map_masks(layer, result.masks, result.scores)


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
  traced = groups.traced_of(
    context.model,
    context.variables,
    context.input_shape,
    context.apply_kwargs,
    f"pruner {p.name!r}: ",
  )
  structured.spaces_of(traced, context.variables, p.kind, p.name)  # no such groups
  return structured.rank(
    p.name,
    p.kind,
    "global" if p.quota is None else p.quota,
    p.score(dataclasses.replace(context, model=traced)),
    traced,
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
    # a channel ranking knows its model (traced on the input it was ranked on)
    model = ranking.traced if input_shape is None and not trace_kw else ranking.model
  if pruning_type == "effective":
    if model is None or (input_shape is None and not isinstance(model, tracing.Traced)):
      raise ValueError(
        "pruning_type='effective' needs model= and input_shape= (or a sparsejax.Traced "
        "as model=) for the connectivity sweep."
      )
    traced = tracing.trace(model, input_shape, **trace_kw)
  if isinstance(ranking, structured.ChannelRanking):
    return structured.masks_for_target(ranking, sparsity, traced, loop=loop)
  if isinstance(ranking, blocks.BlockRanking):  # unions of whole blocks
    return ranking.direct(sparsity) if traced is None else ranking.effective(sparsity, traced)
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
  sparsity: float | None = None,
  pattern=None,
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
  ``sparsity`` (method.md section 2); or in an N:M ``pattern``.

  Args:
    pruner: a name from :data:`PRUNERS` (e.g. 'random/igq', 'snip', 'synflow', or a
      structured one, 'channel/l1', 'neuron/snip/global': :mod:`sparsejax.structured`;
      after training on calibration data: 'wanda', 'sparsegpt', 'obd', 'taylor':
      :mod:`sparsejax.scores.calibration`) or a :class:`Pruner`.
    key: PRNG key for random scores and random within-layer orders.
    model: a Flax module (zoo or user-written), a function ``apply(params, x)``, an
      NNX module (``variables`` then left out: its ``nnx.Param`` state is pruned), or a
      :class:`sparsejax.Traced` of any of them (``sparsejax.trace``).
    variables: the module's {'params': ..., 'batch_stats': ...} at initialization, or
      the function's params. Calibration pruners run the trained model: pass the
      trained variables (their batch statistics are used) and their params as
      ``trained_params``.
    sparsity: the target in [0, 1); leave it out with ``pattern``.
    pattern: 'N:M' (e.g. '2:4'): every output unit keeps the N best of every M
      consecutive inputs by the pruner's score (:mod:`sparsejax.patterns`; direct
      type only, unstructured pruners only).
    input_shape: one example's shape, e.g. (28, 28, 1), or an example input: the model
      is traced on it (the prunable weights, SynFlow's all-ones input, the effective
      type's sweep, the layers' input-to-output order). Not needed with a Traced, nor
      with image/label batches (their image's shape).
    batches: batches for data-driven scores (SNIP, GraSP; the calibration batches of
      Wanda, SparseGPT, OBD, Taylor): preprocessed image/label dicts for the default
      loss, any pytrees for a user ``loss``; calibration pruners read the model input
      (arrays, or dicts with it at ``score_kwargs['input_key']``, default 'image').
    trained_params: params after dense training (magnitude, LAMP, the calibration
      pruners; structured l1, magnitude and bn_scale).
    rounds: rounds of an iterative pruner (default: the pruner's).
    loss: ``loss(params, batch) -> scalar`` for SNIP, iterative SNIP, GraSP and Taylor.
    apply_kwargs: keyword arguments of the model's call (e.g. {'train': False}).
    prunable: narrows the prunable leaves, which are every parameter the traced
      program uses as a linear-op weight (Dense/Conv/Einsum kernels): a predicate on
      the '/'-joined path or a collection of paths (:func:`prunable_set`).

  Returns:
    A mask tree: bool at the prunable leaves, None elsewhere. SparseGPT also updates
    the weights it keeps: :func:`prune_with_params` returns them with the masks.

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
  return _prune(
    pruner,
    dict(
      key=key,
      model=model,
      variables=variables,
      input_shape=input_shape,
      batches=batches,
      trained_params=trained_params,
      rounds=rounds,
      score_kwargs=score_kwargs,
      loss=loss,
      apply_kwargs=apply_kwargs,
      prunable=prunable,
    ),
    sparsity,
    pattern,
    pruning_type,
    with_params=False,
  ).masks


def prune_with_params(
  pruner: str | Pruner,
  *,
  key: jax.Array,
  model,
  variables: PyTree,
  sparsity: float | None = None,
  pattern=None,
  pruning_type: str = "direct",
  input_shape=None,
  batches=None,
  trained_params=None,
  rounds: int | None = None,
  score_kwargs: dict | None = None,
  loss: Callable | None = None,
  apply_kwargs: dict | None = None,
  prunable: masks_lib.Prunable = None,
) -> Pruned:
  """:func:`prune`, returning the masks with the params they go with: a
  :class:`sparsejax.calibration.Pruned` (``.masks``, ``.params``). ``.params`` are the
  weights the pruner leaves -- SparseGPT's updated weights; for every other pruner the
  params it scored (``trained_params`` after training, else ``variables``' params) --
  with every pruned weight exactly zero (ready for evaluation, or for
  :func:`sparsejax.optim.with_masks`). Arguments as :func:`prune`.

  Example (one-shot after training, on calibration batches):
    >>> result = prune_with_params("sparsegpt", key=key, model=traced,
    ...     variables=trained, trained_params=trained["params"], batches=calib,
    ...     pattern="2:4")  # doctest: +SKIP
  """
  return _prune(
    pruner,
    dict(
      key=key,
      model=model,
      variables=variables,
      input_shape=input_shape,
      batches=batches,
      trained_params=trained_params,
      rounds=rounds,
      score_kwargs=score_kwargs,
      loss=loss,
      apply_kwargs=apply_kwargs,
      prunable=prunable,
    ),
    sparsity,
    pattern,
    pruning_type,
    with_params=True,
  )


def _prune(pruner, kw: dict, sparsity, pattern, pruning_type: str, with_params: bool) -> Pruned:
  """The masks and params of :func:`prune_with_params` (``kw``: its other arguments;
  ``with_params``: the params are wanted)."""
  p = get_pruner(pruner)
  sparsity, nm = calibration_scores.check_target(sparsity, pattern)
  check_pruning_type(pruning_type)
  kw["model"], kw["variables"] = tracing.as_function(kw["model"], kw["variables"])
  if nm is not None:
    who = f"pattern={patterns.shown(pattern)}"
    if p.score is None or p.structured:
      raise ValueError(f"{who}: pruner {p.name!r} has no weight scores to cut to a pattern.")
    if pruning_type != "direct":
      raise ValueError(
        f"pruning_type={pruning_type!r} with {who}: an N:M mask is fixed by its pattern "
        "(sparsity 1 - N/M); only 'direct' is allowed (measure its effective sparsity "
        "with sparsejax.effective_sparsity)."
      )
  if p.score is None:
    if sparsity != 0:
      raise ValueError(f"pruner='dense' keeps every weight; sparsity={sparsity!r} must be 0.")
    traced = trace_for(
      kw["model"],
      kw["variables"],
      kw["input_shape"],
      batches=kw["batches"],
      loss=kw["loss"],
      apply_kwargs=kw["apply_kwargs"],
      prunable=kw["prunable"],
    )
    return Pruned(traced.ones(), tracing.params_of(traced, kw["variables"]))
  if p.layerwise and pruning_type == "direct":
    context, traced = _context(p, sparsity=sparsity, pattern=nm, **kw)
    return _layerwise(p, context, traced)
  if p.updates_weights and with_params:
    raise ValueError(
      f"pruning_type={pruning_type!r}: pruner {p.name!r} updates the weights it keeps for "
      "its own masks at a direct target; prune_with_params takes it at direct targets "
      "only (prune gives the masks of an effective target)."
    )
  if nm is not None:
    context, traced = _context(p, sparsity=sparsity, pattern=nm, **kw)
    masks = patterns.n_m_masks(traced, _scored(p, context), nm)
  else:
    ranking = ranking_for(p, sparsity=sparsity, **kw)
    if pruning_type == "direct":
      masks = masks_from_ranking(ranking, sparsity, "direct")
    else:
      traced = trace_for(
        kw["model"],
        kw["variables"],
        kw["input_shape"],
        batches=kw["batches"],
        loss=kw["loss"],
        apply_kwargs=kw["apply_kwargs"],
      )
      masks = masks_from_ranking(ranking, sparsity, "effective", model=traced)
  scored = kw["trained_params"] if p.after_training and kw["trained_params"] is not None else None
  if scored is None:
    scored = tracing.params_of(kw["model"], kw["variables"])
  return Pruned(masks, masks_lib.apply(scored, masks))
