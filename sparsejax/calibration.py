"""Calibration: the second moments of every linear op's inputs, layer by layer.

Pruning a trained network with a little data (OBS, SparseGPT, Wanda, OBD) reads, for
every prunable weight W [out, in] (its view, :mod:`sparsejax.layouts`), the inputs X
[rows, in] its op multiplies on calibration batches, through

    H = X^T X = sum over calibration rows x of x x^T      (float32 [in, in]),

the Hessian of the layer's squared reconstruction error ||W X^T - W' X^T||^2 / 2 in
each row of W', or only its diagonal, the squared input norms ||x_j||^2 (Wanda, OBD).
A row is one output position: an example of a Dense layer, a token of a sequence
model, an example and output pixel of a convolution (its patch). Lookups (embedding
tables) have no statistics.

How the program is walked. The model is traced on the calibration batch's shape
(:meth:`sparsejax.Traced.at`) to the program of :mod:`sparsejax.connectivity` (calls
inlined, loops unrolled, constants folded), and an interpreter binds every equation's
own primitive to concrete values: the model's own function, for any model the
transform traces, no hooks or special layers. At each linear op whose weight is being
calibrated, the op's input becomes X (:func:`sparsejax.layouts.input_rows`) and only
X^T X is added to a running sum: a batch's activations live inside one jitted call
and are never stored; the capture holds one [in, in] matrix per weight.

Layer by layer (:func:`layerwise`). Weights are processed in data-flow order in
*stages*: a stage is a run of consecutive weights (first-use order) none of which
feeds another's input (the q, k and v projections of one input are one stage; a chain
of Dense layers is a stage each). For each stage one jitted pass per calibration
batch evaluates the program up to the stage's last op (XLA drops what the stage does
not read), with the weights of every earlier stage already pruned -- and, for
SparseGPT, updated -- in place, and accumulates the stage's statistics; then each of
its weights is pruned. This is the sequential scheme of SparseGPT and Wanda (their
reference code captures all layers of a transformer block from the block's input at
once; here every layer sees its pruned predecessors). The compiled passes are cached
per (program, stage, statistic): pruning the same model again, at another target or on
another calibration sample, compiles nothing.

A weight used by several ops (in one view) is pruned once, from the sum of their
statistics, captured in one pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import layouts, tracing
from sparsejax.connectivity.program import bind

PyTree = Any
#: What is accumulated per weight: the full H = X^T X, or its diagonal only.
STATS = ("full", "diag")


@dataclasses.dataclass(frozen=True)
class Stats:
  """The calibration statistics of one weight.

  hessian: float32 [in, in], H = X^T X (None when only the diagonal was captured);
  diag: float32 [in], ||x_j||^2 = diag(H); rows: how many input rows were summed.
  """

  hessian: jax.Array | None
  diag: jax.Array
  rows: int


@dataclasses.dataclass(frozen=True)
class Pruned:
  """Masks with the params they go with (SparseGPT updates the weights it keeps).

  masks: bool at the pruned leaves, None elsewhere. params: the params tree with every
  pruned weight exactly zero. scores: None, or a float32 score tree of the pruner's
  saliency of every weight when it chose (higher = more important; a layerwise
  pruner's ranking orders the kept and the pruned weights by it).
  """

  masks: PyTree
  params: PyTree
  scores: PyTree = None


def calibration_inputs(batches, input_key: str = "image") -> list:
  """The model inputs of ``batches`` (a list): each batch is an array with a batch axis
  or a mapping holding one at ``input_key`` (image/label dicts: 'image'; text batches
  {'tokens': [B, T + 1]}, as training and SNIP read them: tokens[:, :-1]). ValueError
  naming the argument for no batches or a batch without an input."""
  if batches is None:
    raise ValueError(
      "batches=None: calibration needs data; pass an iterable of batches of model "
      "inputs (arrays [B, ...], or dicts holding them at input_key)."
    )
  if isinstance(batches, Mapping) or hasattr(batches, "shape"):
    batches = [batches]
  out = []
  for i, b in enumerate(batches):
    if isinstance(b, Mapping) and input_key == "image" and "image" not in b and "tokens" in b:
      b = b["tokens"][:, :-1]  # token windows [B, T + 1] (text batches): the model reads [:, :-1]
    elif isinstance(b, Mapping):
      if input_key not in b:
        raise ValueError(
          f"batches[{i}] has no {input_key!r} entry (keys {sorted(b)[:5]}); pass "
          "input_key= naming the model input, or arrays."
        )
      b = b[input_key]
    if not hasattr(b, "shape") or np.ndim(b) < 1 or np.shape(b)[0] < 1:
      raise ValueError(
        f"batches[{i}] is {type(b).__name__} of shape {np.shape(b)}; a calibration batch is "
        "an array of model inputs with a non-empty leading batch axis."
      )
    out.append(jnp.asarray(b))
  if not out:
    raise ValueError("batches is empty: calibration needs at least one batch of model inputs.")
  return out


def _check_stat(stat: str) -> str:
  if stat not in STATS:
    raise ValueError(f"stat={stat!r} is not allowed; allowed: {', '.join(STATS)}.")
  return stat


def trace_on(model, variables, first, prunable=None) -> tracing.Traced:
  """``model`` (a module, a function or a :class:`sparsejax.Traced`) traced on the
  calibration batch ``first``, narrowed by ``prunable``."""
  if isinstance(model, tracing.Traced):
    traced = tracing.trace(model, variables=variables)
    return traced.at(first).narrow(prunable)
  return tracing.trace(model, first, variables=variables, prunable=prunable)


def _flat(traced: tracing.Traced, variables) -> tuple[list, list]:
  """(param leaves, other collections' leaves) in the program's order."""
  params = tracing.params_of(traced, variables)
  extra = {}
  if isinstance(traced.model, nn.Module):
    extra = {k: v for k, v in variables.items() if k != "params"}
  return list(jax.tree.leaves(params)), list(jax.tree.leaves(extra))


def _stages(traced: tracing.Traced, paths: Sequence[str], sequential: bool) -> list[tuple]:
  """The stages of ``paths`` (module docstring): tuples of paths, data-flow order."""
  prog = traced.program
  views = layouts.of(traced).views
  first = {p: min(s.eqn for s in views[p].sites) for p in paths}
  ordered = sorted(paths, key=first.get)
  if not sequential:
    return [tuple(ordered)]
  leaf_of = {s.eqn: p for p in paths for s in views[p].sites}
  below: dict[int, frozenset] = {}  # 'x' value id -> weights upstream of it
  feeds: dict[str, frozenset] = {p: frozenset() for p in paths}
  for k, e in enumerate(prog.eqns):
    if e.kind != "x":
      continue
    up = frozenset().union(*[below.get(i, frozenset()) for i in e.ins])
    if k in leaf_of:
      p = leaf_of[k]
      feeds[p] = feeds[p] | up
      up = up | {p}
    for o in e.outs:
      below[o] = up
  stages, current = [], []
  for p in ordered:
    if feeds[p] & set(current):
      stages.append(tuple(current))
      current = []
    current.append(p)
  stages.append(tuple(current))
  return stages


@functools.lru_cache(maxsize=256)
def _stage_pass(traced: tracing.Traced, paths: tuple, stat: str) -> Callable:
  """``(acc, param leaves, extra leaves, x) -> acc`` with each weight's statistic of one
  batch added (jitted; ``acc`` a tuple per path, in ``paths`` order)."""
  prog = traced.program
  views = layouts.of(traced).views
  at = {}
  for j, p in enumerate(paths):
    for s in views[p].sites:
      at.setdefault(s.eqn, []).append((j, s))
  last = max(at)
  hi = lax.Precision.HIGHEST

  def run(acc, param_vals, extra_vals, x):
    acc = list(acc)
    env = dict(zip(prog.param_ids, param_vals))
    env.update(zip(prog.extra_ids, extra_vals))
    env[prog.x_ids[0]] = x
    get = lambda i: env[i] if i in env else prog.consts[i]
    for k, e in enumerate(prog.eqns[: last + 1]):
      vals = [get(i) for i in e.ins]
      for j, s in at.get(k, ()):
        rows = layouts.input_rows(e, s, vals[s.x_operand])
        if stat == "full":
          acc[j] = acc[j] + jnp.dot(rows.T, rows, precision=hi)
        else:
          acc[j] = acc[j] + jnp.sum(rows * rows, axis=0)
      if k < last:
        env.update(zip(e.outs, bind(e, *vals)))
    return tuple(acc)

  return jax.jit(run)


def _rows_per_batch(traced: tracing.Traced, path: str) -> int:
  """Input rows one batch adds to ``path``'s statistics (every site's output positions)."""
  prog = traced.program
  view = layouts.of(traced).views[path]
  rows = 0
  for s in view.sites:
    shape = prog.eqns[s.eqn].out_avals[0].shape
    rows += int(np.prod(shape)) // view.outputs
  return rows


def _accumulate(traced, inputs, stage, stat, param_vals, extra_vals) -> dict:
  """{path: Stats} of the weights of ``stage`` over all ``inputs``, with ``param_vals``
  in place."""
  views = layouts.of(traced).views
  size = lambda p: views[p].inputs
  acc = tuple(
    jnp.zeros((size(p), size(p)) if stat == "full" else (size(p),), jnp.float32) for p in stage
  )
  rows = dict.fromkeys(stage, 0)
  for x in inputs:
    t = traced.at(x)
    acc = _stage_pass(t, stage, stat)(acc, param_vals, extra_vals, x)
    for p in stage:
      rows[p] += _rows_per_batch(t, p)
  out = {}
  for p, a in zip(stage, acc):
    if stat == "full":
      out[p] = Stats(a, jnp.diagonal(a), rows[p])
    else:
      out[p] = Stats(None, a, rows[p])
  return out


def capture(
  model,
  variables: PyTree,
  batches: Iterable,
  *,
  stat: str = "full",
  input_key: str = "image",
  prunable=None,
) -> dict[str, Stats]:
  """{path: :class:`Stats`} of every prunable weight (or those ``prunable`` selects:
  a predicate on the path or a collection of paths) over ``batches``, on the model as
  it is (dense: one pass per batch, no pruning in between).

  Args:
    model: a Flax module, a function ``apply(params, x)`` or a :class:`sparsejax.Traced`.
    variables: the model's variables ({'params': ..., 'batch_stats': ...}; a
      function's params), the trained ones.
    batches: model inputs [B, ...], or dicts holding them at ``input_key``.
    stat: 'full' (H = X^T X) or 'diag' (its diagonal only: O(in) memory per weight).
  """
  _check_stat(stat)
  inputs = calibration_inputs(batches, input_key)
  traced = trace_on(model, variables, inputs[0], prunable)
  paths = tuple(traced.prunable_paths)
  layouts.of(traced).require(paths, "calibration")
  params, extra = _flat(traced, variables)
  return _accumulate(traced, inputs, paths, stat, params, extra)


#: ``prune_layer(path, W, stats) -> (W', keep, saliency)``: W float32 [out, in] (the
#: weight's view with earlier layers pruned), its :class:`Stats`; W' the new view (its
#: pruned entries are zeroed by :func:`layerwise`), keep bool [out, in], saliency float32
#: [out, in] (what the choice was made by, higher = more important).
PruneLayer = Callable[[str, jax.Array, Stats], tuple]


def layerwise(
  model,
  variables: PyTree,
  batches: Iterable,
  prune_layer: PruneLayer,
  *,
  stat: str = "full",
  sequential: bool = True,
  input_key: str = "image",
  prunable=None,
) -> Pruned:
  """Prunes every prunable weight with ``prune_layer`` in data-flow order, each on the
  statistics of its inputs with the earlier stages pruned in place (module docstring;
  ``sequential=False``: every weight on the dense model's inputs, one stage).

  Arguments as :func:`capture`. Returns :class:`Pruned`: the masks, the params with
  each pruned weight replaced by ``where(keep, W', 0)`` (cast to its dtype), and the
  saliencies as its scores.
  """
  _check_stat(stat)
  inputs = calibration_inputs(batches, input_key)
  traced = trace_on(model, variables, inputs[0], prunable)
  paths = tuple(traced.prunable_paths)
  views = layouts.of(traced).require(paths, "calibration")
  params, extra = _flat(traced, variables)
  leaf_of = {p: i for i, p in enumerate(traced.paths)}
  masks: list = [None] * len(params)
  saliency: list = [None] * len(params)
  for stage in _stages(traced, paths, sequential):
    stats = _accumulate(traced, inputs, stage, stat, params, extra)
    for p in stage:
      view, i = views[p], leaf_of[p]
      w = view.to_matrix(params[i]).astype(jnp.float32)
      new, keep, sal = prune_layer(p, w, stats[p])
      keep = jnp.asarray(keep, bool)
      if not jnp.shape(new) == keep.shape == jnp.shape(sal) == w.shape:
        raise ValueError(
          f"prune_layer returned shapes {jnp.shape(new)}, {keep.shape}, {jnp.shape(sal)} "
          f"for {p!r}, whose view is {w.shape}; it returns (W', keep, saliency), each "
          "[out, in]."
        )
      params[i] = view.from_matrix(jnp.where(keep, new, 0.0)).astype(params[i].dtype)
      masks[i] = view.from_matrix(keep)
      saliency[i] = view.from_matrix(jnp.asarray(sal, jnp.float32))
  tree = lambda leaves: jax.tree.unflatten(traced.params_spec[0], leaves)
  return Pruned(tree(masks), tree(params), tree(saliency))


__all__ = [
  "STATS",
  "Pruned",
  "PruneLayer",
  "Stats",
  "calibration_inputs",
  "capture",
  "layerwise",
  "trace_on",
]
