"""Structured pruning: whole units of dependency groups removed, on any traced model.

The groups are those of :func:`sparsejax.structure` (:mod:`sparsejax.groups`): a
layer's outputs, a residual stream with every layer that writes it, an attention head
with its query/key/value columns and output rows (grouped-query attention: a key/value
head with the query heads that read it), a GLU's paired gate and up units, a grouped
convolution's groups. Removing unit u of a group is expressed as ordinary weight masks:
every position of a prunable weight that belongs to u (its kernel columns, its readers'
rows, a tied embedding's features) is masked. So effective sparsity, training and
compaction apply unchanged; :func:`sparsejax.compact.compact` turns the masks into a
smaller dense network (the removed units are not co-reachable, hence dropped).

By name, in the pruner registry (:mod:`sparsejax.registry`): 'channel/<score>' prunes
the groups written by convolutions only (conv channels, residual streams of conv
networks), 'neuron/<score>' those written by a Dense, an einsum or an embedding (hidden
units, residual streams of MLPs and transformers, GLU pairs), 'head/<score>' attention
heads; all with the uniform quota, 'channel/<score>/<quota>' (quota erk, igq or global)
picks another. Groups that are not removable (an input or output axis, an axis mixed in
a way no group can follow: :attr:`sparsejax.groups.Group.reason`) are never pruned;
every group keeps >= 1 unit. ``pruning.prune('channel/l1', ..., sparsity=s,
pruning_type=...)`` removes units along the pruner's order until the *weight* sparsity
(direct) or the effective sparsity (effective) reaches s, with the fewest units that
reach it.

Unit scores (higher = kept), for the weights W_u of unit u (every prunable slice of it:
kernel columns and rows) and its filter F_u (the slices it writes: kernel columns):

    l1:        sum |F_u|                        (filter L1 norm, Li et al. 2017)
    magnitude: sum_{w in W_u} |w|
    bn_scale:  sum |gamma_u| over the normalization scales the group owns (parameters
               named 'scale': batch, layer, group and RMS norms; Liu et al. 2017, who
               train with an L1 penalty on gamma; the dense runs here have none)
    snip:      sum_{w in W_u} SNIP score(w)     (Lee et al. 2019)
    synflow:   sum_{w in W_u} SynFlow score(w)  (one round, Tanaka et al. 2020)
    random:    uniform

l1, magnitude and bn_scale score the weights after dense training, as their weight
versions do (``trained_params``; the masks apply to the initial weights); snip,
synflow and random score at initialization.

The nested family (:class:`ChannelRanking`). Per group, units are removed in ascending
score order (ties: lower index first). Member m (0 <= m <= M) removes

    global:  the first m of all units sorted by (score, group, index), each group's
             best unit excluded (M = C - S for C units in S groups);
    quota:   n_l - kept_l(1 - m / C) of group l, kept_l from
             :func:`sparsejax.quotas.group_kept_counts` (uniform: round(n_l d); IGQ:
             d_l = 1 / (1 + F n_l); ERK: d_l = min(1, eps r_l), r_l the ERK ratio
             sum(shape) / prod(shape) of the group's writer kernels pooled), M = C.

Members are nested (more removed at larger m), so the kept weights K(m) and the active
weights E(m) are non-increasing in m, and the answer, the smallest m with K(m) (or
E(m)) <= floor((1 - s) N), is found by :func:`sparsejax.search.search`, the one search
the weight rankings use (one connectivity sweep per step for 'effective', the model's
one compiled sweep). A target beyond member M raises
:class:`sparsejax.errors.UnreachableSparsityError`.

Effective sparsity of these masks. The connections that only a removed unit fed (its
readers' slices) are masked with it, so they count in the direct sparsity already
(masking the filters alone would leave them dead but unmasked: effective > direct);
every kept unit still reads and feeds every kept unit of its neighbours. So effective
exceeds direct only by what is dead in the dense network too (e.g. kernel taps that
see nothing but zero padding on small inputs: ResNet-18 on 8x8 inputs); on
LeNet-300-100, LeNet-5 and VGG at their input sizes they are equal. Report both
(prune_train and compression do, from the masks).

Models: any model :func:`sparsejax.trace` traces (a Flax module, a function
``apply(params, x)``, an NNX module, a :class:`sparsejax.Traced`); ``input_shape`` is
needed unless the model is a Traced or a registered zoo network (its dataset's input).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import effective, errors, groups, quotas, scores, search, selection, tracing
from sparsejax import masks as masks_lib
from sparsejax import ranking as ranking_lib

SCORES = ("l1", "magnitude", "snip", "synflow", "bn_scale", "random")
KINDS = ("channel", "neuron", "head")
#: Channel quotas: the group quotas of :mod:`sparsejax.quotas` and one global ranking.
QUOTAS = quotas.GROUP_QUOTAS + ("global",)
DEFAULT_QUOTA = "uniform"
#: Scores read from the weights after dense training (``trained_params``).
AFTER_TRAINING = ("l1", "magnitude", "bn_scale")
#: Registry names: '<kind>/<score>' (the default quota) and '<kind>/<score>/<quota>'.
NAMES = tuple(
  f"{k}/{s}{q}"
  for k in KINDS
  for s in SCORES
  for q in [""] + [f"/{q}" for q in QUOTAS if q != DEFAULT_QUOTA]
)
_WHAT = {"channel": "conv channels", "neuron": "hidden Dense units", "head": "attention heads"}


def parse(name: str) -> tuple[str, str, str]:
  """(kind, score, quota) of a structured pruner name; ValueError for others."""
  parts = name.split("/") if isinstance(name, str) else []
  if name not in NAMES:
    raise ValueError(
      f"name={name!r} is not a structured pruner; allowed: "
      f"<kind>/<score>[/<quota>] with kind in {KINDS}, score in {SCORES}, "
      f"quota in {QUOTAS} (default {DEFAULT_QUOTA})."
    )
  return parts[0], parts[1], parts[2] if len(parts) == 3 else DEFAULT_QUOTA


def _check(name, fraction, quota):
  parse(name)
  if not (isinstance(fraction, (float, int)) and 0.0 <= fraction < 1.0):
    raise ValueError(f"fraction={fraction!r} (of channels removed) must be in [0, 1).")
  if quota not in QUOTAS:
    raise ValueError(f"quota={quota!r} is not a channel quota; allowed: {', '.join(QUOTAS)}.")


def _module(model):
  """The Flax module (or function) of ``model``, which may be a sparsejax.Traced."""
  return model.model if isinstance(model, tracing.Traced) else model


def spaces_of(
  model, variables, kind: str, who: str | None = None, *, input_shape=None, apply_kwargs=None
) -> list:
  """The removable dependency groups of ``kind`` ('channel', 'neuron' or 'head';
  :class:`sparsejax.groups.Group`), in order.

  ValueError (naming ``who``, the pruner, and the model) for a model without groups of
  that kind.
  """
  who = f"pruner {who!r}: " if who else ""
  traced = groups.traced_of(model, variables, input_shape, apply_kwargs, who)
  chosen = groups.of_traced(traced).removable(kind)
  if not chosen:
    others = [k for k in KINDS if k != kind and groups.of_traced(traced).removable(k)]
    raise ValueError(
      f"{who}model={tracing._name(_module(model))} has no {kind}s to prune "
      f"({_WHAT[kind]}); "
      + (f"use {' or '.join(f'{k}/...' for k in others)} instead." if others else "see ")
      + ("" if others else "sparsejax.structure(model, input_shape) for its groups.")
    )
  return chosen


def channel_score_of(group, weight_scores: dict) -> np.ndarray:
  """Sum of per-weight scores {path: scores} over each unit's slices (its filter and
  its readers' slices)."""
  return group.unit_sums(weight_scores)


def channel_scores(
  name: str,
  *,
  key,
  model,
  variables,
  input_shape=None,
  batches=None,
  trained_params=None,
  loss=None,
  apply_kwargs: dict | None = None,
) -> dict:
  """{group name: scores [size]} of the groups the pruner ``name`` prunes.

  l1, magnitude and bn_scale read ``trained_params`` (default: variables['params']).
  """
  kind, score, _ = parse(name)
  traced = groups.traced_of(model, variables, input_shape, apply_kwargs, f"pruner {name!r}: ")
  spaces = spaces_of(traced, variables, kind, name)
  params = tracing.params_of(traced, variables)
  prunable = traced.prunable_paths
  weights = params if trained_params is None else trained_params
  flat = _flat(weights)
  if score == "random":
    return {
      s.name: np.asarray(jax.random.uniform(jax.random.fold_in(key, i), (s.size,)))
      for i, s in enumerate(spaces)
    }
  if score == "l1":
    mags = {k: np.abs(np.asarray(v)) for k, v in flat.items() if k in set(prunable)}
    return {s.name: s.unit_sums(mags, role="writes") for s in spaces}
  if score == "bn_scale":
    out = {}
    for s in spaces:
      scales = {
        sl.path: np.abs(np.asarray(flat[sl.path]))
        for sl in s.slices_of("owns")
        if sl.path.rsplit("/", 1)[-1] == "scale"
      }
      if not scales:
        raise ValueError(f"name={name!r}: group {s.name} has no normalization scale.")
      out[s.name] = s.unit_sums(scales, role="owns")
    return out
  if score == "magnitude":
    w = scores.magnitude(weights, prunable=prunable)
  elif score == "snip":
    if not batches:
      raise ValueError(f"name={name!r} needs batches= (SNIP scores a loss).")
    w = scores.snip(
      _module(traced), variables, batches, prunable=prunable, **({"loss": loss} if loss else {})
    )
  else:
    w = scores.synflow_scores(traced, variables, prunable=prunable)
  ws = {k: v for k, v in _flat(w).items() if v is not None}
  return {s.name: channel_score_of(s, ws) for s in spaces}


def _flat(tree) -> dict:
  """{'/'-joined path: leaf} of a params-like tree (None leaves kept)."""
  return {
    masks_lib.path_str(p): v
    for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  }


def _erk_ratio(group, shapes: dict) -> float:
  """sum(shape) / prod(shape) of the group's writer kernels pooled (sums over leaves)."""
  leaves = sorted({sl.path for sl in group.slices_of("writes")})
  sh = [shapes[p] for p in leaves]
  return sum(sum(s) for s in sh) / sum(math.prod(s) for s in sh)


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelRanking:
  """The nested family of unit removals of a structured pruner (module docstring).

  spaces: the pruned groups (:class:`sparsejax.groups.Group`); orders: per group, unit
  indices in removal order (ascending score, ties by index); quota: a group quota or
  'global'; sequence: global only, the group index of each removal (length M); ratios:
  ERK ratios per group; template: the dense mask tree (numpy; None at non-prunable
  leaves); model: the model as given (a module or function); traced: its
  :class:`sparsejax.Traced`.
  """

  name: str
  model: Any
  spaces: tuple
  orders: tuple
  quota: str
  sequence: np.ndarray | None
  ratios: tuple
  template: Any
  traced: Any = None

  @property
  def sizes(self) -> tuple:
    return tuple(s.size for s in self.spaces)

  @property
  def steps(self) -> int:
    """M: the last member (every group down to one unit)."""
    return len(self.sequence) if self.quota == "global" else sum(self.sizes)

  @property
  def total(self) -> int:
    """N: prunable weights."""
    return sum(int(np.size(m)) for m in masks_lib.mask_leaves(self.template))

  def removed_counts(self, m: int) -> np.ndarray:
    """Units removed per group by member m, int [S]."""
    return _removed_counts(self.quota, self.sizes, self.sequence, self.ratios, m)

  def kept(self, m: int) -> dict:
    """{group name: kept unit indices (sorted)} of member m."""
    return _kept([s.name for s in self.spaces], self.orders, self.removed_counts(m))

  def masks_at(self, m: int, host: bool = False):
    """The mask tree of member m (numpy leaves when ``host``, else jax arrays)."""
    out = groups.of_traced(self.traced).unit_masks(self.kept(m), self.template)
    return out if host else masks_lib.map_masks(jnp.asarray, out)


def _removal_order(x) -> np.ndarray:
  """Indices by ascending score, ties by index: the ranking order of the negated scores
  (:mod:`sparsejax.selection`'s exact keys)."""
  return selection.full_order(selection.descending_keys(-np.asarray(x)))


def _orders(sc: list) -> tuple:
  """Per group, unit indices in removal order (ascending score, ties by index)."""
  return tuple(_removal_order(x) for x in sc)


def _sequence(sc: list, orders: tuple) -> np.ndarray:
  """Global family: the group of each removal, units in removal order over all
  groups (ties by group, then index), each group's best unit left out."""
  space = np.concatenate([np.full(len(x), i, np.int64) for i, x in enumerate(sc)])
  best = np.zeros(len(space), bool)
  offsets = np.cumsum([0] + [len(x) for x in sc])
  best[[offsets[i] + o[-1] for i, o in enumerate(orders)]] = True
  order = _removal_order(np.concatenate([np.asarray(x, np.float64) for x in sc]))
  return space[order[~best[order]]]


def _removed_counts(quota, sizes, sequence, ratios, m: int) -> np.ndarray:
  """Units removed per group by member m of the family (module docstring)."""
  steps = len(sequence) if quota == "global" else sum(sizes)
  if not 0 <= m <= steps:
    raise ValueError(f"m={m!r} must be in [0, {steps}].")
  if quota == "global":
    return np.bincount(sequence[:m], minlength=len(sizes))
  c = sum(sizes)
  return np.asarray(sizes) - quotas.group_kept_counts(quota, (c - m) / c, sizes, ratios)


def _kept(names, orders, removed) -> dict:
  return {n: np.sort(o[r:]) for n, o, r in zip(names, orders, removed)}


def rank(
  name: str,
  kind: str,
  quota: str,
  channel_scores_: dict,
  model,
  variables,
  *,
  input_shape=None,
  apply_kwargs=None,
) -> ChannelRanking:
  """The :class:`ChannelRanking` of the pruner ``name`` from its unit scores
  {group name: scores [size]} of the groups of ``kind`` under ``quota``."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is not allowed; allowed: {', '.join(KINDS)}.")
  if quota not in QUOTAS:
    raise ValueError(f"quota={quota!r} is not a channel quota; allowed: {', '.join(QUOTAS)}.")
  traced = groups.traced_of(model, variables, input_shape, apply_kwargs, f"pruner {name!r}: ")
  spaces = spaces_of(traced, variables, kind, name)
  for s in spaces:
    sc = channel_scores_.get(s.name)
    if sc is None or np.shape(sc) != (s.size,) or not np.all(np.isfinite(sc)):
      raise ValueError(
        f"pruner {name!r}: the scores of group {s.name} must be {s.size} "
        f"finite numbers; got {sc!r}."
      )
  values = [np.asarray(channel_scores_[s.name]) for s in spaces]
  orders = _orders(values)
  sequence = _sequence(values, orders) if quota == "global" else None
  shapes = dict(zip(traced.paths, traced.shapes))
  return ChannelRanking(
    name,
    _module(model),
    tuple(spaces),
    orders,
    quota,
    sequence,
    tuple(_erk_ratio(s, shapes) for s in spaces),
    _template(traced),
    traced,
  )


def _template(traced):
  """The dense mask (numpy) of the traced model's prunable weights."""
  return masks_lib.map_masks(lambda m: np.ones(np.shape(m), bool), traced.ones())


def masks_for(model, variables, keep: dict, *, input_shape=None, apply_kwargs=None) -> dict:
  """Weight masks removing every unit outside ``keep`` {group name: kept indices}
  (filters and readers' slices)."""
  traced = groups.traced_of(model, variables, input_shape, apply_kwargs)
  structure = groups.of_traced(traced)
  for name in keep:
    try:
      g = structure[name]
    except KeyError:
      raise ValueError(
        f"keep names group {name!r}, which model={tracing._name(_module(model))} does not "
        f"have; allowed: {', '.join(g.name for g in structure.removable())}."
      ) from None
    if not g.removable:
      raise ValueError(f"keep names group {name!r}, which is not removable: {g.reason}.")
  out = structure.unit_masks(keep, _template(traced))
  return masks_lib.map_masks(jnp.asarray, out)


class _Members:
  """A :class:`ChannelRanking` as a :class:`sparsejax.search.Family`: member k removes
  ``steps - k`` (member 0 removes the most), so members are nested in k."""

  def __init__(self, ranking: ChannelRanking):
    self.ranking, self.size = ranking, ranking.steps

  def masks_at(self, k):
    return self.ranking.masks_at(self.size - int(k), host=True)

  def window(self, k, xp):
    return None

  def bounds(self, window, k, eff, pot, xp):
    return None


def masks_for_target(ranking: ChannelRanking, sparsity: float, traced=None, *, loop: str = "auto"):
  """Member m* = min { m : K(m) <= T } (K: kept weights, or with ``traced``, a
  :class:`sparsejax.Traced` of the ranking's model, active weights), T = floor((1 - s)
  N): the search of :mod:`sparsejax.search` over the family (module docstring).

  Raises UnreachableSparsityError when member M misses the target.
  """
  sparsity = masks_lib.check_sparsity(sparsity)
  search.check_loop(loop)
  total = ranking.total
  target = ranking_lib.max_kept_for_sparsity(sparsity, total)
  pruning_type = "direct" if traced is None else "effective"
  if traced is None:
    measure = lambda masks: (masks, None)
  else:
    sweep = effective.compiled_sweep(traced.narrow(masks_lib.paths(ranking.template)))
    measure = lambda masks: (sweep(masks).masks, None)
  k, last, _ = search.search(_Members(ranking), measure, target)
  if last > target:  # k = 0: every group at its last unit(s)
    best = 1.0 - last / total
    raise errors.UnreachableSparsityError(
      f"sparsity={sparsity!r} ({pruning_type}) cannot be reached by {ranking.name!r}: "
      f"with every group at its last unit(s) {last} of {total} weights are "
      f"{'kept' if pruning_type == 'direct' else 'active'}; the largest reachable "
      f"{pruning_type} sparsity is {best:.6g} (compression {total / last:.4g}x).",
      sparsity=sparsity,
      max_sparsity=best,
    )
  return masks_lib.map_masks(jnp.asarray, ranking.masks_at(ranking.steps - k, host=True))


def prune(
  name: str,
  *,
  key,
  model,
  variables,
  fraction: float,
  quota: str | None = None,
  input_shape=None,
  batches=None,
  apply_kwargs=None,
  only=None,
) -> dict:
  """Masks removing ``fraction`` of the units of ``name``'s kind by its score: member
  round(fraction * C) of the family under the quota (uniform: kept_l = round(n_l (1 -
  fraction)); global: the round(fraction * C) lowest scores; each group keeps >= 1).
  The quota is the name's ('neuron/l1/igq': IGQ; 'neuron/l1': uniform); ``quota=`` may
  repeat it, not contradict it. ``only``: a predicate on
  :class:`sparsejax.groups.Group` choosing which groups of the kind to prune (e.g. the
  MLP hidden units of a transformer, not its residual stream). By target sparsity:
  :func:`sparsejax.pruning.prune`."""
  kind, score, named = parse(name)
  if quota is not None and quota != named:
    raise ValueError(
      f"quota={quota!r} contradicts the quota of name={name!r} ({named!r}); name the "
      f"quota in the pruner, e.g. '{kind}/{score}/{quota}'."
    )
  quota = named
  _check(name, fraction, quota)
  traced = groups.traced_of(model, variables, input_shape, apply_kwargs, f"pruner {name!r}: ")
  sc = channel_scores(name, key=key, model=traced, variables=variables, batches=batches)
  ranking = rank(name, kind, quota, sc, traced, variables)
  if only is not None:
    if not callable(only):
      raise ValueError(f"only={only!r} must be a predicate on sparsejax.groups.Group.")
    chosen = {s.name for s in ranking.spaces if only(s)}
    if not chosen:
      raise ValueError(
        f"only= selects none of the {kind} groups ({', '.join(s.name for s in ranking.spaces)})."
      )
    ranking = _restricted(ranking, chosen)
  m = int(round(fraction * sum(ranking.sizes)))
  return ranking.masks_at(min(m, ranking.steps))


def _restricted(ranking: ChannelRanking, names: set) -> ChannelRanking:
  """``ranking`` over the groups named only (same scores and quota)."""
  keep = [i for i, s in enumerate(ranking.spaces) if s.name in names]
  spaces = tuple(ranking.spaces[i] for i in keep)
  orders = tuple(ranking.orders[i] for i in keep)
  sequence = None
  if ranking.quota == "global":
    remap = {old: new for new, old in enumerate(keep)}
    sequence = np.asarray([remap[i] for i in ranking.sequence if i in remap], np.int64)
  ratios = tuple(ranking.ratios[i] for i in keep)
  return dataclasses.replace(
    ranking, spaces=spaces, orders=orders, sequence=sequence, ratios=ratios
  )


__all__ = [
  "prune",
  "channel_scores",
  "rank",
  "ChannelRanking",
  "masks_for_target",
  "masks_for",
  "spaces_of",
  "parse",
  "NAMES",
  "SCORES",
  "QUOTAS",
  "KINDS",
  "AFTER_TRAINING",
]
