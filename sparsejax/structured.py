"""Structured pruning: whole channels (conv filters) or neurons (Dense units) removed.

Expressed as ordinary weight masks: removing channel c of a channel space
(:func:`sparsejax.compact.channel_spaces`: a layer's outputs, or a residual stream with
every layer that writes it, pruned as one group) masks its filter (the writers' kernel
columns [..., c]) and its downstream input slices (the readers' kernel rows). So
effective sparsity, training and compaction apply unchanged; :func:`sparsejax.compact`
turns the masks into a smaller dense network (the removed channels are not co-reachable,
hence dropped). Effective sparsity exceeds direct sparsity: the connections that only a
removed channel fed are dead too (report it with :mod:`sparsejax.effective`).

Channel scores (higher = kept), for the weights W_c of channel c (its filter and its
readers' input slices) and its filter F_c (the writers' kernel columns):

    l1:        sum |F_c|                        (filter L1 norm, Li et al. 2017)
    magnitude: sum_{w in W_c} |w|
    snip:      sum_{w in W_c} SNIP score(w)     (Lee et al. 2019)
    synflow:   sum_{w in W_c} SynFlow score(w)  (one round, Tanaka et al. 2020)
    bn_scale:  sum |gamma_c| over the writers' batch norms (Liu et al. 2017: after dense
               training; pass the trained variables)
    random:    uniform

Names: 'channel/<score>' prunes conv channels (and residual streams), 'neuron/<score>'
hidden Dense units; the input and the logits are never pruned. Quotas in channel counts:
'uniform' removes round(fraction * size) channels of every space, 'global' the
round(fraction * total) lowest scores over all spaces; every space keeps >= 1 channel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sparsejax import compact, scores
from sparsejax import masks as masks_lib

SCORES = ("l1", "magnitude", "snip", "synflow", "bn_scale", "random")
KINDS = ("channel", "neuron")
QUOTAS = ("uniform", "global")
NAMES = tuple(f"{k}/{s}" for k in KINDS for s in SCORES)


def _check(name, fraction, quota):
  if name not in NAMES:
    raise ValueError(f"name={name!r} is not a structured pruner; allowed: {', '.join(NAMES)}.")
  if not (isinstance(fraction, (float, int)) and 0.0 <= fraction < 1.0):
    raise ValueError(f"fraction={fraction!r} (of channels removed) must be in [0, 1).")
  if quota not in QUOTAS:
    raise ValueError(f"quota={quota!r} is not a channel quota; allowed: {', '.join(QUOTAS)}.")


def spaces_of(model, variables, kind: str) -> list:
  """The channel spaces of ``kind`` ('channel': conv writers, 'neuron': Dense writers)."""
  spaces, _ = compact.channel_spaces(model)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  ndim = 4 if kind == "channel" else 2
  chosen = [s for s in spaces if np.ndim(flat[f"{s.sites[0]}/kernel"]) == ndim]
  if not chosen:
    raise ValueError(f"model={type(model).__name__} has no {kind}s to prune "
                     f"({'conv channels' if kind == 'channel' else 'hidden Dense units'}); "
                     f"use {'neuron' if kind == 'channel' else 'channel'}/... instead.")
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


def channel_scores(name: str, *, key, model, variables, input_shape=None,
                   batches=None) -> dict:
  """{space name: scores [size]} of the spaces the pruner ``name`` prunes."""
  _check(name, 0.0, "uniform")
  kind, score = name.split("/")
  spaces = spaces_of(model, variables, kind)
  params = variables["params"]
  flat = traverse_util.flatten_dict(params, sep="/")
  if score == "random":
    return {s.name: np.asarray(jax.random.uniform(jax.random.fold_in(key, i), (s.size,)))
            for i, s in enumerate(spaces)}
  if score == "l1":
    return {s.name: sum(np.asarray(jnp.sum(jnp.abs(jnp.reshape(flat[f"{w}/kernel"],
                                                               (-1, s.size))), 0))
                        for w in s.sites) for s in spaces}
  if score == "bn_scale":
    out = {}
    for s in spaces:
      norms = [w for w in s.writers if f"{w}/scale" in flat]
      if not norms:
        raise ValueError(f"name={name!r}: space {s.name} has no batch norm.")
      out[s.name] = sum(np.abs(np.asarray(flat[f"{w}/scale"])) for w in norms)
    return out
  if score == "magnitude":
    w = scores.magnitude(params)
  elif score == "snip":
    if batches is None:
      raise ValueError(f"name={name!r} needs batches= (SNIP scores a loss).")
    w = scores.snip(model, variables, batches)
  else:
    if input_shape is None:
      raise ValueError(f"name={name!r} needs input_shape= (SynFlow's all-ones input).")
    w = scores.synflow_scores(model, params, input_shape)
  ws = {k: v for k, v in traverse_util.flatten_dict(w, sep="/").items() if v is not None}
  return {s.name: channel_score_of(s, ws) for s in spaces}


def keep_from_scores(sc: dict, fraction: float, quota: str) -> dict:
  """{space: kept channel indices} removing the lowest scores (ties: lower index goes
  first), ``fraction`` of each space (uniform) or of all channels (global)."""
  if quota == "uniform":
    keep = {}
    for n, s in sc.items():
      drop = min(int(round(fraction * len(s))), len(s) - 1)
      order = np.lexsort((np.arange(len(s)), s))  # ascending score
      keep[n] = np.sort(order[drop:])
    return keep
  items = [(v, i, n, c) for i, (n, s) in enumerate(sc.items()) for c, v in enumerate(s)]
  items.sort(key=lambda t: (t[0], t[1], t[3]))
  drop = int(round(fraction * len(items)))
  left = {n: len(s) for n, s in sc.items()}
  gone = {n: set() for n in sc}
  for v, _, n, c in items:
    if drop == 0:
      break
    if left[n] > 1:
      gone[n].add(c)
      left[n] -= 1
      drop -= 1
  return {n: np.array([c for c in range(len(s)) if c not in gone[n]]) for n, s in sc.items()}


def masks_for(model, variables, keep: dict) -> dict:
  """Weight masks removing every channel outside ``keep`` (filters and input slices)."""
  spaces, _ = compact.channel_spaces(model)
  m = masks_lib.ones(variables["params"])
  flat = traverse_util.flatten_dict(m, sep="/")
  for s in spaces:
    if s.name not in keep:
      continue
    off = np.ones(s.size, bool)
    off[np.asarray(keep[s.name], int)] = False
    if not off.any():
      continue
    off = jnp.asarray(off)
    for w in s.sites:
      k = f"{w}/kernel"
      flat[k] = flat[k] & ~off
    for r in s.readers:
      k = f"{r}/kernel"
      a = flat[k]
      flat[k] = (_rows(a, s.size) & ~off[None, :, None]).reshape(a.shape)
  return traverse_util.unflatten_dict(flat, sep="/")


def prune(name: str, *, key, model, variables, fraction: float, quota: str = "uniform",
          input_shape=None, batches=None) -> dict:
  """Masks removing ``fraction`` of the channels (or neurons) by the score of ``name``
  ('channel/l1', 'neuron/snip', ...: see the module docstring) under ``quota``."""
  _check(name, fraction, quota)
  sc = channel_scores(name, key=key, model=model, variables=variables,
                      input_shape=input_shape, batches=batches)
  return masks_for(model, variables, keep_from_scores(sc, fraction, quota))


__all__ = ["prune", "channel_scores", "keep_from_scores", "masks_for", "spaces_of",
           "NAMES", "SCORES", "QUOTAS"]
