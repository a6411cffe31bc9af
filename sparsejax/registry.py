"""The pruner registry: a pruner is a score function over one hook, and a quota.

A :class:`Pruner` names a score function ``ScoreContext -> scores`` (higher = kept
first; one number per prunable weight, or per channel for structured pruners) and how
layers share the budget (one global ranking, a quota of :mod:`sparsejax.quotas`, or
another pruner's per-layer counts). :data:`PRUNERS` holds the built-in ones by name;
:func:`register_pruner` adds a user's, which then works with both pruning types, every
quota and every experiment binary (``--import=your_module``), by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from sparsejax import blocks, scores, structured, tracing
from sparsejax import masks as masks_lib
from sparsejax import quotas as quotas_lib

PyTree = Any
#: Pruner kinds: unstructured weights, or structured channels / neurons.
KINDS = ("weights",) + structured.KINDS


@dataclasses.dataclass(frozen=True)
class ScoreContext:
  """What a pruner's score function may read (:attr:`Pruner.score`).

  key: PRNG key for random scores. model, variables: a Flax module and its variables
  ({'params': ..., 'batch_stats': ...}) at initialization, a function ``apply(params,
  x)`` and its params, or a :class:`sparsejax.Traced` and its model's variables.
  sparsity: the target (iterative pruners prune towards it). input_shape: one
  example's shape or an example input (SynFlow's all-ones input). batches: batches for
  data-driven scores. trained_params: params after dense training (magnitude, LAMP).
  rounds: rounds of an iterative pruner. score_kwargs: extra keyword arguments for the
  score function. loss: the user's ``loss(params, batch) -> scalar`` for data-driven
  scores (None: the image/label cross-entropy of a Flax module). apply_kwargs: keyword
  arguments of the model's call (e.g. {'train': False}). prunable: the '/'-joined paths
  of the prunable leaves (the linear-op weights of the traced program, narrowed by the
  caller); a score tree has arrays exactly there (``masks.map_prunable(fn, c.params,
  prunable=c.prunable)``). pattern: (N, M) when the target is an N:M pattern
  (:mod:`sparsejax.patterns`; ``sparsity`` is then 1 - N/M), else None.
  """

  key: jax.Array
  model: Any
  variables: PyTree
  sparsity: float
  input_shape: tuple | None = None
  batches: Any = None
  trained_params: PyTree = None
  rounds: int | None = None
  score_kwargs: dict = dataclasses.field(default_factory=dict)
  loss: Callable | None = None
  apply_kwargs: dict | None = None
  prunable: frozenset | None = None
  pattern: tuple | None = None

  @property
  def params(self) -> PyTree:
    return tracing.params_of(self.model, self.variables)

  @property
  def trained_variables(self) -> PyTree:
    """``variables`` with ``trained_params`` as their params (a module's other
    collections, e.g. the batch statistics, as given): the trained model that
    calibration pruners run on their batches."""
    if isinstance(self.module, nn.Module) or (
      hasattr(self.variables, "keys") and "params" in self.variables
    ):
      return {**self.variables, "params": self.trained_params}
    return self.trained_params

  @property
  def module(self):
    """The Flax module or function (the model a Traced was made of)."""
    return self.model.model if isinstance(self.model, tracing.Traced) else self.model

  def data_kwargs(self, who: str) -> dict:
    """Keyword arguments of a data-driven score: score_kwargs, the user's loss and the
    prunable set."""
    kw = dict(self.score_kwargs, prunable=self.prunable)
    if self.loss is not None:
      kw["loss"] = self.loss
    elif not isinstance(self.module, nn.Module):
      raise ValueError(
        f"pruner {who!r} on a function model needs loss= (a function "
        "loss(params, batch) -> scalar over your batches)."
      )
    return kw


ScoreFn = Callable[[ScoreContext], PyTree]


@dataclasses.dataclass(frozen=True)
class Pruner:
  """A named pruner: a score function over one hook, and how layers share the budget.

  Attributes:
    name: registry name, e.g. 'random/igq' ('/' separates a score from its quota).
    score: ``ScoreContext -> score tree`` shaped like the masks (higher = kept
      first; int32 priorities for iterative pruners); None only for 'dense'.
    quota: None for one global ranking, or a quota name (:mod:`sparsejax.quotas`).
    quota_from: the name of another pruner whose global ranking gives the per-layer
      kept counts; weights are then ranked inside each layer by ``score`` (the
      paper's random/snip and random/synflow).
    iterative: the score function prunes towards the target in rounds, so its
      ranking depends on the target sparsity.
    default_rounds: rounds of an iterative pruner when none are given.
    needs_data: scores need training batches (``ScoreContext.batches``).
    after_training: scores are taken from weights after dense training (the masks
      are applied to the initial weights), as the paper does for magnitude and LAMP.
    layerwise: ``score`` returns a :class:`sparsejax.calibration.Pruned` (masks and
      new params) at the context's target (``sparsity`` or ``pattern``), chosen layer
      by layer on calibration batches with the earlier layers pruned in place (Wanda,
      SparseGPT: :mod:`sparsejax.scores.calibration`). Its ranking (one per target)
      keeps those masks at the target and orders the weights by the saliency it chose
      by (``Pruned.scores``), kept ones first: effective targets search it.
    updates_weights: a layerwise pruner whose params are new values for the weights it
      keeps (SparseGPT); they belong to its masks at a direct target.
    needs_input: scores need ``input_shape`` (SynFlow's all-ones input).
    kind: 'weights' (unstructured: ``score`` returns a score tree shaped like the
      masks) or a structured kind, 'channel' or 'neuron' (``score`` returns
      {space name: channel scores [size]}, :mod:`sparsejax.structured`; ``quota`` is a
      group quota, uniform, erk or igq, or None for one global channel ranking).
    ranking: for a pruner of whole groups of weights (block sparsity),
      ``ranking(context) -> sparsejax.blocks.BlockRanking``: its masks are unions of
      whole blocks (:func:`sparsejax.pruning.masks_from_ranking` takes it); ``score``
      then gives each weight its block's score (for display).
  """

  name: str
  score: ScoreFn | None
  quota: str | None = None
  quota_from: str | None = None
  iterative: bool = False
  default_rounds: int | None = None
  needs_data: bool = False
  after_training: bool = False
  needs_input: bool = False
  kind: str = "weights"
  layerwise: bool = False
  updates_weights: bool = False
  ranking: Callable[[ScoreContext], Any] | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"name={self.name!r} must be a non-empty string.")
    if self.score is None and self.name != "dense":
      raise ValueError(
        f"pruner {self.name!r}: score must be a function ScoreContext -> "
        "scores (None is reserved for 'dense')."
      )
    if self.score is not None and not callable(self.score):
      raise ValueError(f"pruner {self.name!r}: score={self.score!r} is not callable.")
    if self.kind not in KINDS:
      raise ValueError(
        f"pruner {self.name!r}: kind={self.kind!r} is not allowed; allowed: {', '.join(KINDS)}."
      )
    if self.structured:
      if self.quota is not None and self.quota not in quotas_lib.GROUP_QUOTAS:
        raise ValueError(
          f"pruner {self.name!r}: quota={self.quota!r} is not a channel "
          f"quota; allowed: None (global), {', '.join(quotas_lib.GROUP_QUOTAS)}."
        )
      if self.quota_from is not None or self.iterative:
        raise ValueError(
          f"pruner {self.name!r}: a structured pruner takes neither quota_from nor iterative."
        )
    elif self.quota is not None and self.quota not in quotas_lib.QUOTAS:
      raise ValueError(
        f"pruner {self.name!r}: quota={self.quota!r} is not a quota; allowed: "
        f"None (global ranking), {', '.join(quotas_lib.QUOTAS)}."
      )
    if self.quota is not None and self.quota_from is not None:
      raise ValueError(f"pruner {self.name!r}: give quota or quota_from, not both.")
    if self.layerwise and (self.structured or self.iterative or self.quota_from is not None):
      raise ValueError(
        f"pruner {self.name!r}: a layerwise pruner prunes weights to one target itself; "
        "it is neither structured nor iterative and takes no quota_from."
      )
    if self.updates_weights and not self.layerwise:
      raise ValueError(f"pruner {self.name!r}: updates_weights needs layerwise=True.")
    if self.ranking is not None and (
      not callable(self.ranking)
      or self.structured
      or self.quota_from
      or self.iterative
      or self.layerwise
    ):
      raise ValueError(
        f"pruner {self.name!r}: ranking={self.ranking!r} must be callable and is for "
        "unstructured pruners without quota_from or rounds (whole blocks of weights)."
      )
    if self.iterative and (not isinstance(self.default_rounds, int) or self.default_rounds < 1):
      raise ValueError(
        f"pruner {self.name!r}: an iterative pruner needs default_rounds, a "
        f"positive integer; got {self.default_rounds!r}."
      )

  @property
  def structured(self) -> bool:
    """It removes whole channels or neurons (kind 'channel' or 'neuron')."""
    return self.kind != "weights"

  @property
  def target_dependent(self) -> bool:
    """Its ranking depends on the target sparsity (compute one ranking per target)."""
    return (
      self.iterative
      or self.layerwise
      or (self.quota_from is not None and get_pruner(self.quota_from).target_dependent)
    )


# ---------------------------------------------------------------------------- builtins


def _random(c: ScoreContext):
  return scores.random(c.params, key=c.key, prunable=c.prunable)


def _magnitude(c: ScoreContext):
  return scores.magnitude(c.trained_params, prunable=c.prunable)


def _lamp(c: ScoreContext):
  return scores.lamp(c.trained_params, prunable=c.prunable)


def _snip(c: ScoreContext):
  return scores.snip(c.model, c.variables, c.batches, **c.data_kwargs("snip"))


def _iterative_snip(c: ScoreContext):
  return scores.iterative_snip(
    c.model,
    c.variables,
    c.batches,
    sparsity=c.sparsity,
    rounds=c.rounds,
    **c.data_kwargs("snip/iterative"),
  )


def _grasp(c: ScoreContext):
  return scores.grasp(c.model, c.variables, c.batches, **c.data_kwargs("grasp"))


def _synflow(c: ScoreContext):
  return scores.synflow(
    c.model,
    c.variables,
    input_shape=c.input_shape,
    sparsity=c.sparsity,
    rounds=c.rounds,
    apply_kwargs=c.apply_kwargs,
    prunable=c.prunable,
    **c.score_kwargs,
  )


def _wanda(compare: str) -> ScoreFn:
  def score(c: ScoreContext):
    return scores.wanda(
      c.model,
      c.trained_variables,
      c.batches,
      sparsity=c.sparsity,
      pattern=c.pattern,
      compare=compare,
      prunable=c.prunable,
      **c.score_kwargs,
    )

  score.__name__ = f"wanda[{compare}]"
  return score


def _sparsegpt(c: ScoreContext):
  return scores.sparsegpt(
    c.model,
    c.trained_variables,
    c.batches,
    sparsity=c.sparsity,
    pattern=c.pattern,
    prunable=c.prunable,
    **c.score_kwargs,
  )


def _obd(c: ScoreContext):
  return scores.obd(c.model, c.trained_variables, c.batches, prunable=c.prunable, **c.score_kwargs)


def _taylor(c: ScoreContext):
  kw = c.data_kwargs("taylor")
  return scores.taylor(c.model, c.trained_variables, c.batches, **kw)


def _channel_score(name: str) -> ScoreFn:
  """The score function of the structured pruner ``name``: {space: scores [size]}."""

  def score(c: ScoreContext):
    return structured.channel_scores(
      name,
      key=c.key,
      model=c.model,
      variables=c.variables,
      input_shape=c.input_shape,
      batches=c.batches,
      trained_params=c.trained_params,
      loss=c.loss,
      apply_kwargs=c.apply_kwargs,
    )

  score.__name__ = f"channel_score[{name}]"
  return score


#: Block pruners in the registry: ``block/<b>x<b>/<reduce>`` for these b.
BLOCK_SIZES = (4, 8)


def _block_pruner(b: int, reduce: str) -> Pruner:
  """``block/<b>x<b>/<reduce>``: whole b x b blocks by the mean or max |w| of the weights
  after dense training (:mod:`sparsejax.blocks`), one ranking over all layers."""

  def like(c: ScoreContext):
    return masks_lib.ones(c.trained_params, c.prunable)

  def score(c: ScoreContext):
    def per_weight(w):
      return blocks.expand(blocks.block_scores(w, b, reduce), w.shape, b)

    return masks_lib.map_prunable(per_weight, c.trained_params, prunable=c.prunable)

  def ranking(c: ScoreContext):
    return blocks.rank(c.trained_params, like(c), b, reduce)

  return Pruner(f"block/{b}x{b}/{reduce}", score, after_training=True, ranking=ranking)


def _builtin() -> list[Pruner]:
  entries = [Pruner("dense", None)]
  entries += [Pruner(f"random/{q}", _random, q) for q in quotas_lib.QUOTAS]
  entries += [
    Pruner("random/snip", _random, quota_from="snip", needs_data=True),
    Pruner("random/synflow", _random, quota_from="synflow", needs_input=True),
    Pruner("magnitude/global", _magnitude, after_training=True),
  ]
  entries += [
    Pruner(f"magnitude/{q}", _magnitude, q, after_training=True) for q in quotas_lib.QUOTAS
  ]
  entries += [
    Pruner("lamp", _lamp, after_training=True),
    Pruner("snip", _snip, needs_data=True),
    Pruner("snip/iterative", _iterative_snip, iterative=True, default_rounds=300, needs_data=True),
    Pruner("synflow", _synflow, iterative=True, default_rounds=100, needs_input=True),
    Pruner("grasp", _grasp, needs_data=True),
    # after training, on calibration data (sparsejax.scores.calibration)
    Pruner("wanda", _wanda("row"), "uniform", needs_data=True, after_training=True, layerwise=True),
    Pruner(
      "wanda/layer",
      _wanda("layer"),
      "uniform",
      needs_data=True,
      after_training=True,
      layerwise=True,
    ),
    Pruner(
      "sparsegpt",
      _sparsegpt,
      "uniform",
      needs_data=True,
      after_training=True,
      layerwise=True,
      updates_weights=True,
    ),
    Pruner("obd", _obd, needs_data=True, after_training=True),
    Pruner("taylor", _taylor, needs_data=True, after_training=True),
  ]
  entries += [_block_pruner(b, r) for b in BLOCK_SIZES for r in blocks.REDUCES]
  for name in structured.NAMES:  # '<kind>/<score>' (uniform quota), '<kind>/<score>/<quota>'
    kind, score, quota = structured.parse(name)
    entries.append(
      Pruner(
        name,
        _channel_score(name),
        None if quota == "global" else quota,
        needs_data=score == "snip",
        after_training=score in structured.AFTER_TRAINING,
        needs_input=score == "synflow",
        kind=kind,
      )
    )
  return entries


#: The pruner registry: name -> :class:`Pruner`. Extend it with :func:`register_pruner`.
PRUNERS: dict[str, Pruner] = {p.name: p for p in _builtin()}


def register_pruner(pruner: Pruner, *, overwrite: bool = False) -> Pruner:
  """Adds ``pruner`` to :data:`PRUNERS`; it then works with both pruning types,
  every quota and every experiment binary, by name.

  Example:
    >>> import jax.numpy as jnp
    >>> from sparsejax import masks, registry
    >>> def smallest_first(c):  # keeps the weights closest to zero: a toy score
    ...   return masks.map_prunable(lambda w: -jnp.abs(w), c.params, prunable=c.prunable)
    >>> _ = registry.register_pruner(registry.Pruner("toy/inverse", smallest_first, "erk"))
    >>> registry.get_pruner("toy/inverse").quota
    'erk'
    >>> del registry.PRUNERS["toy/inverse"]

  Raises:
    ValueError: the name is taken (unless ``overwrite``), or ``quota_from`` names an
      unknown pruner or one without a ranking.
  """
  if not isinstance(pruner, Pruner):
    raise ValueError(f"pruner={pruner!r} must be a sparsejax.Pruner.")
  if pruner.name in PRUNERS and not overwrite:
    raise ValueError(
      f"pruner name {pruner.name!r} is already registered; pass overwrite=True to replace it."
    )
  if pruner.quota_from is not None:
    source = get_pruner(pruner.quota_from)
    if source.score is None:
      raise ValueError(f"pruner {pruner.name!r}: quota_from={pruner.quota_from!r} has no ranking.")
  PRUNERS[pruner.name] = pruner
  return pruner


def get_pruner(name: str | Pruner) -> Pruner:
  """The registered :class:`Pruner` ``name`` (a Pruner is returned as it is)."""
  if isinstance(name, Pruner):
    return name
  if name not in PRUNERS:
    raise ValueError(f"pruner={name!r} is not a known pruner; allowed: {', '.join(PRUNERS)}.")
  return PRUNERS[name]


__all__ = [
  "BLOCK_SIZES",
  "KINDS",
  "PRUNERS",
  "Pruner",
  "ScoreContext",
  "ScoreFn",
  "get_pruner",
  "register_pruner",
]
