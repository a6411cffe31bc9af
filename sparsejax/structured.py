"""Structured pruning: whole channels (conv filters) or neurons (Dense units) removed.

Expressed as ordinary weight masks: removing channel c of a channel space
(:func:`sparsejax.compact.channel_spaces`: a layer's outputs, or a residual stream with
every layer that writes it, pruned as one group) masks its filter (the writers' kernel
columns [..., c]) and its downstream input slices (the readers' kernel rows). So
effective sparsity, training and compaction apply unchanged; :func:`sparsejax.compact`
turns the masks into a smaller dense network (the removed channels are not co-reachable,
hence dropped).

By name, in the pruner registry (:mod:`sparsejax.pruning`): 'channel/<score>' prunes
conv channels (and residual streams), 'neuron/<score>' hidden Dense units, both with
the uniform channel quota; 'channel/<score>/<quota>' (quota erk, igq or global) picks
another. The input and the logits are never pruned; every space keeps >= 1 channel.
``pruning.prune('channel/l1', ..., sparsity=s, pruning_type=...)`` removes channels
along the pruner's order until the *weight* sparsity (direct) or the effective
sparsity (effective) reaches s, with the fewest channels that reach it.

Channel scores (higher = kept), for the weights W_c of channel c (its filter and its
readers' input slices) and its filter F_c (the writers' kernel columns):

    l1:        sum |F_c|                        (filter L1 norm, Li et al. 2017)
    magnitude: sum_{w in W_c} |w|
    bn_scale:  sum |gamma_c| over the writers' batch norms (Liu et al. 2017, who
               train with an L1 penalty on gamma; the dense runs here have none)
    snip:      sum_{w in W_c} SNIP score(w)     (Lee et al. 2019)
    synflow:   sum_{w in W_c} SynFlow score(w)  (one round, Tanaka et al. 2020)
    random:    uniform

l1, magnitude and bn_scale score the weights after dense training, as their weight
versions do (``trained_params``; the masks apply to the initial weights); snip,
synflow and random score at initialization.

The nested family (:class:`ChannelRanking`). Per space, channels are removed in
ascending score order (ties: lower index first). Member m (0 <= m <= M) removes

    global:  the first m of all channels sorted by (score, space, index), each space's
             best channel excluded (M = C - S for C channels in S spaces);
    quota:   n_l - kept_l(1 - m / C) of space l, kept_l from
             :func:`sparsejax.quotas.group_kept_counts` (uniform: round(n_l d); IGQ:
             d_l = 1 / (1 + F n_l); ERK: d_l = min(1, eps r_l), r_l the ERK ratio
             sum(shape) / prod(shape) of the space's writer kernels pooled), M = C.

Members are nested (more removed at larger m), so the kept weights K(m) and the active
weights E(m) are non-increasing in m, and the answer, the smallest m with K(m) (or
E(m)) <= floor((1 - s) N), is found by :func:`sparsejax.search.search`, the one search
the weight rankings use (one connectivity sweep per step for 'effective', the model's
one compiled sweep). A target beyond member M raises
:class:`sparsejax.errors.UnreachableSparsityError`.

Effective sparsity of these masks. The connections that only a removed channel fed
(its readers' input slices) are masked with it, so they count in the direct sparsity
already (masking the filters alone would leave them dead but unmasked: effective >
direct); every kept channel still reads and feeds every kept channel of its
neighbours. So effective exceeds direct only by what is dead in the dense network too
(e.g. kernel taps that see nothing but zero padding on small inputs: ResNet-18 on 8x8
inputs); on LeNet-300-100, LeNet-5 and VGG at their input sizes they are equal. Report
both (prune_train and compression do, from the masks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sparsejax import compact, effective, errors, quotas, scores, search, selection, tracing
from sparsejax import masks as masks_lib
from sparsejax import ranking as ranking_lib

SCORES = ("l1", "magnitude", "snip", "synflow", "bn_scale", "random")
KINDS = ("channel", "neuron")
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


def spaces_of(model, variables, kind: str, who: str | None = None) -> list:
  """The channel spaces of ``kind`` ('channel': conv writers, 'neuron': Dense writers).

  ValueError (naming ``who``, the pruner, and the model) for a function model, a model
  the compactor does not know, or one without spaces of that kind.
  """
  who = f"pruner {who!r}: " if who else ""
  model = _module(model)
  if not isinstance(model, nn.Module):
    raise ValueError(
      f"{who}model={getattr(model, '__name__', type(model).__name__)} is "
      "a function; structured pruners need a zoo Flax module "
      f"({', '.join(c.__name__ for c in compact.FAMILIES)}), whose channel "
      "spaces (the parameters each unit owns, the kernels that read it) "
      "are known."
    )
  try:
    spaces, _ = compact.channel_spaces(model)
  except ValueError as err:
    raise ValueError(f"{who}{err}") from None
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  ndim = 4 if kind == "channel" else 2
  chosen = [s for s in spaces if np.ndim(flat[f"{s.sites[0]}/kernel"]) == ndim]
  if not chosen:
    raise ValueError(
      f"{who}model={type(model).__name__} has no {kind}s to prune "
      f"({'conv channels' if kind == 'channel' else 'hidden Dense units'}); "
      f"use {'neuron' if kind == 'channel' else 'channel'}/... instead."
    )
  return chosen


def _rows(a, size):
  """Kernel [..., in, out] with input axis positions * size -> [positions, size, out]."""
  return jnp.reshape(a, (-1, size, a.shape[-1]))


def channel_score_of(space, weight_scores: dict) -> np.ndarray:
  """Sum of per-weight scores over each channel's filter and readers' input slices."""
  s = np.zeros(space.size)
  for w in space.sites:
    s += np.asarray(jnp.sum(jnp.reshape(weight_scores[f"{w}/kernel"], (-1, space.size)), 0))
  for r in space.readers:
    s += np.asarray(jnp.sum(_rows(weight_scores[f"{r}/kernel"], space.size), (0, 2)))
  return s


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
  """{space name: scores [size]} of the spaces the pruner ``name`` prunes.

  l1, magnitude and bn_scale read ``trained_params`` (default: variables['params']).
  """
  kind, score, _ = parse(name)
  spaces = spaces_of(model, variables, kind, name)
  params = variables["params"]
  prunable = masks_lib.paths(_template(_module(model), variables))
  weights = params if trained_params is None else trained_params
  flat = traverse_util.flatten_dict(weights, sep="/")
  if score == "random":
    return {
      s.name: np.asarray(jax.random.uniform(jax.random.fold_in(key, i), (s.size,)))
      for i, s in enumerate(spaces)
    }
  if score == "l1":
    return {
      s.name: sum(
        np.asarray(jnp.sum(jnp.abs(jnp.reshape(flat[f"{w}/kernel"], (-1, s.size))), 0))
        for w in s.sites
      )
      for s in spaces
    }
  if score == "bn_scale":
    out = {}
    for s in spaces:
      norms = [w for w in s.writers if f"{w}/scale" in flat]
      if not norms:
        raise ValueError(f"name={name!r}: space {s.name} has no batch norm.")
      out[s.name] = sum(np.abs(np.asarray(flat[f"{w}/scale"])) for w in norms)
    return out
  if score == "magnitude":
    w = scores.magnitude(weights, prunable=prunable)
  elif score == "snip":
    if not batches:
      raise ValueError(f"name={name!r} needs batches= (SNIP scores a loss).")
    w = scores.snip(
      _module(model), variables, batches, prunable=prunable, **({"loss": loss} if loss else {})
    )
  else:
    if input_shape is None and not isinstance(model, tracing.Traced):
      raise ValueError(f"name={name!r} needs input_shape= (SynFlow's all-ones input).")
    w = scores.synflow_scores(
      model, variables, input_shape=input_shape, apply_kwargs=apply_kwargs, prunable=prunable
    )
  ws = {k: v for k, v in traverse_util.flatten_dict(w, sep="/").items() if v is not None}
  return {s.name: channel_score_of(s, ws) for s in spaces}


def _erk_ratio(space, flat_params) -> float:
  """sum(shape) / prod(shape) of the space's writer kernels pooled (sums over sites)."""
  shapes = [np.shape(flat_params[f"{w}/kernel"]) for w in space.sites]
  return sum(sum(s) for s in shapes) / sum(math.prod(s) for s in shapes)


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelRanking:
  """The nested family of channel removals of a structured pruner (module docstring).

  spaces: the pruned channel spaces; orders: per space, channel indices in removal
  order (ascending score, ties by index); quota: a group quota or 'global';
  sequence: global only, the space index of each removal (length M); ratios: ERK
  ratios per space; template: the flat mask template {path: shape} of the prunable
  kernels and the mask tree (None elsewhere).
  """

  name: str
  model: Any
  spaces: tuple
  orders: tuple
  quota: str
  sequence: np.ndarray | None
  ratios: tuple
  template: Any

  @property
  def sizes(self) -> tuple:
    return tuple(s.size for s in self.spaces)

  @property
  def steps(self) -> int:
    """M: the last member (every space down to one channel)."""
    return len(self.sequence) if self.quota == "global" else sum(self.sizes)

  @property
  def total(self) -> int:
    """N: prunable weights."""
    return sum(int(np.size(m)) for m in masks_lib.mask_leaves(self.template))

  def removed_counts(self, m: int) -> np.ndarray:
    """Channels removed per space by member m, int [S]."""
    return _removed_counts(self.quota, self.sizes, self.sequence, self.ratios, m)

  def kept(self, m: int) -> dict:
    """{space name: kept channel indices (sorted)} of member m."""
    return _kept([s.name for s in self.spaces], self.orders, self.removed_counts(m))

  def masks_at(self, m: int, host: bool = False):
    """The mask tree of member m (numpy leaves when ``host``, else jax arrays)."""
    out = _masks(self.template, self.spaces, self.kept(m))
    return out if host else masks_lib.map_masks(jnp.asarray, out)


def _removal_order(x) -> np.ndarray:
  """Indices by ascending score, ties by index: the ranking order of the negated scores
  (:mod:`sparsejax.selection`'s exact keys)."""
  return selection.full_order(selection.descending_keys(-np.asarray(x)))


def _orders(sc: list) -> tuple:
  """Per space, channel indices in removal order (ascending score, ties by index)."""
  return tuple(_removal_order(x) for x in sc)


def _sequence(sc: list, orders: tuple) -> np.ndarray:
  """Global family: the space of each removal, channels in removal order over all
  spaces (ties by space, then index), each space's best channel left out."""
  space = np.concatenate([np.full(len(x), i, np.int64) for i, x in enumerate(sc)])
  best = np.zeros(len(space), bool)
  offsets = np.cumsum([0] + [len(x) for x in sc])
  best[[offsets[i] + o[-1] for i, o in enumerate(orders)]] = True
  order = _removal_order(np.concatenate([np.asarray(x, np.float64) for x in sc]))
  return space[order[~best[order]]]


def _removed_counts(quota, sizes, sequence, ratios, m: int) -> np.ndarray:
  """Channels removed per space by member m of the family (module docstring)."""
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
  name: str, kind: str, quota: str, channel_scores_: dict, model, variables
) -> ChannelRanking:
  """The :class:`ChannelRanking` of the pruner ``name`` from its channel scores
  {space name: scores [size]} of the spaces of ``kind`` under ``quota``."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is not allowed; allowed: {', '.join(KINDS)}.")
  if quota not in QUOTAS:
    raise ValueError(f"quota={quota!r} is not a channel quota; allowed: {', '.join(QUOTAS)}.")
  spaces = spaces_of(model, variables, kind, name)
  for s in spaces:
    sc = channel_scores_.get(s.name)
    if sc is None or np.shape(sc) != (s.size,) or not np.all(np.isfinite(sc)):
      raise ValueError(
        f"pruner {name!r}: the scores of space {s.name} must be {s.size} "
        f"finite numbers; got {sc!r}."
      )
  values = [np.asarray(channel_scores_[s.name]) for s in spaces]
  orders = _orders(values)
  sequence = _sequence(values, orders) if quota == "global" else None
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  return ChannelRanking(
    name,
    model,
    tuple(spaces),
    orders,
    quota,
    sequence,
    tuple(_erk_ratio(s, flat) for s in spaces),
    _template(model, variables),
  )


def _template(model, variables):
  """The dense mask (numpy) of a zoo model: the kernels its channel spaces write or
  read (every linear-op weight of the zoo's families)."""
  spaces, _ = compact.channel_spaces(_module(model))
  paths = {f"{w}/kernel" for s in spaces for w in s.sites + s.readers}
  dense = masks_lib.ones(variables["params"], paths)
  return masks_lib.map_masks(lambda m: np.ones(m.shape, bool), dense)


def _masks(template, spaces, keep: dict):
  """Masks (numpy) removing every channel outside ``keep``: filters and input slices."""
  flat = traverse_util.flatten_dict(jax.tree.map(np.copy, template), sep="/")
  for s in spaces:
    if s.name not in keep:
      continue
    off = np.ones(s.size, bool)
    off[np.asarray(keep[s.name], int)] = False
    if not off.any():
      continue
    for w in s.sites:
      flat[f"{w}/kernel"][..., off] = False
    for r in s.readers:
      a = flat[f"{r}/kernel"]
      a.reshape(-1, s.size, a.shape[-1])[:, off, :] = False  # a view: writes into a
  return traverse_util.unflatten_dict(flat, sep="/")


def masks_for(model, variables, keep: dict) -> dict:
  """Weight masks removing every channel outside ``keep`` (filters and input slices)."""
  spaces, _ = compact.channel_spaces(model)
  return masks_lib.map_masks(jnp.asarray, _masks(_template(model, variables), spaces, keep))


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
  if last > target:  # k = 0: every space at its last channel(s)
    best = 1.0 - last / total
    raise errors.UnreachableSparsityError(
      f"sparsity={sparsity!r} ({pruning_type}) cannot be reached by {ranking.name!r}: "
      f"with every channel space at its last channel(s) {last} of {total} weights are "
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
) -> dict:
  """Masks removing ``fraction`` of the channels (or neurons) of ``name``'s kind by its
  score: member round(fraction * C) of the family under the quota (uniform: kept_l =
  round(n_l (1 - fraction)); global: the round(fraction * C) lowest scores; each space
  keeps >= 1). The quota is the name's ('neuron/l1/igq': IGQ; 'neuron/l1': uniform);
  ``quota=`` may repeat it, not contradict it. By target sparsity:
  :func:`sparsejax.pruning.prune`."""
  kind, score, named = parse(name)
  if quota is not None and quota != named:
    raise ValueError(
      f"quota={quota!r} contradicts the quota of name={name!r} ({named!r}); name the "
      f"quota in the pruner, e.g. '{kind}/{score}/{quota}'."
    )
  quota = named
  _check(name, fraction, quota)
  sc = channel_scores(
    name, key=key, model=model, variables=variables, input_shape=input_shape, batches=batches
  )
  ranking = rank(name, kind, quota, sc, model, variables)
  m = int(round(fraction * sum(ranking.sizes)))
  return ranking.masks_at(min(m, ranking.steps))


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
