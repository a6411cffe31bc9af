"""Pruning scores (method.md section 4): one number per prunable weight, higher = kept first.

Every function returns a *score tree*: shaped like ``params``, with an array of the
weight's shape at every prunable leaf and ``None`` elsewhere, ready for
:func:`sparsejax.pruning.rank_scores`. One-shot scores are float32. Iterative
pruners (:func:`iterative_snip`, :func:`synflow`) return int32 *priorities*: a
permutation of 0..N-1 that encodes their elimination order, so that
the top k = round((1 - s) N) priorities are exactly the pruner's final mask and a
slightly larger k re-adds the last-eliminated weights first (the effective-sparsity
search walks along this order).

Elimination order of an iterative pruner, lowest priority first:
1. weights masked out by the initial ``masks``;
2. weights pruned in round 0, then round 1, ... (within a round by that round's score,
   ascending; equal scores: the higher flat position goes first);
3. the survivors, by their score on the final mask (one extra scoring pass).
Positions are flat row-major indices within a layer, layers in input-to-output order,
the tie-break :func:`sparsejax.pruning.rank_scores` uses too.

Prunable leaves: those where ``masks`` is not None when masks are given, else those
chosen by ``prunable`` (:func:`sparsejax.masks.selector`: default the leaves named
'kernel' with at least two axes, or a predicate on the path, or a collection of paths,
e.g. the linear-op weights of a traced program that :func:`sparsejax.pruning.prune`
passes).

Per-round top-k is exact: a two-pass radix select on the float bits of the scores
(histograms of the high 16 and low 15 bits; non-negative float32 order = int32 order
of their bits), then ties at the threshold kept by position. No sort per round.

Rounds are driven from Python, one jitted step each (XLA:CPU runs convolutions inside
``lax.while_loop``/``fori_loop`` bodies through a 10-20x slower path, jax-ml/jax#12868);
per-round statistics stay on the device until the end.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import compilation, models
from sparsejax import masks as masks_lib

PyTree = Any

#: round_of value of a weight still alive (above every round index).
_ALIVE = 1 << 30
#: round_of value of a weight masked out before the first round.
_INITIAL = -1


class RoundStats(NamedTuple):
  """Per-round statistics of an iterative pruner: numpy arrays of length ``rounds + 1``,
  entry t for round t and entry ``rounds`` for the scoring pass on the final mask (which
  prunes nothing and orders the survivors).

  kept: weights alive when the round's scores were computed.
  target: weights kept after the round.
  zero_kept: alive weights whose score is exactly 0 (on no path, zero, or underflow).
  min_positive_score: smallest positive alive score, rounded down to its histogram
    bucket (within a factor 1 + 2^-8).
  max_score: largest alive score, rounded up to its bucket (within a factor 1 + 2^-8).
  threshold: the round's k-th largest score (the smallest kept).
  ties_split: whether weights with a score equal to the threshold were split by position.
  """

  kept: np.ndarray
  target: np.ndarray
  zero_kept: np.ndarray
  min_positive_score: np.ndarray
  max_score: np.ndarray
  threshold: np.ndarray
  ties_split: np.ndarray


# --------------------------------------------------------------------------- helpers


def _is_none(x) -> bool:
  return x is None


def _slots(params: PyTree, prunable: masks_lib.Prunable = None, masks=None) -> tuple:
  """Flat leaf indices of the prunable leaves (module docstring), checking ``masks``."""
  if masks is not None:
    masks_lib.validate(masks, params, prunable=prunable)
    flat = jax.tree.leaves(masks, is_leaf=_is_none)
    slots = tuple(i for i, m in enumerate(flat) if m is not None)
  else:
    chosen = masks_lib.selector(prunable)
    slots = tuple(
      i
      for i, (p, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(params))
      if chosen(p, leaf)
    )
  if not slots:
    raise ValueError(
      f"params has no prunable leaf (prunable={prunable!r}: default Dense/Conv "
      "'kernel' leaves with >= 2 axes)."
    )
  return slots


def _cache_slots(params: PyTree, slots: tuple) -> tuple | None:
  """``slots`` as a cache key of the compiled score functions: None for the default
  rule's leaves, so that callers with and without an explicit set share programs."""
  default = tuple(
    i
    for i, (p, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(params))
    if masks_lib.is_prunable(p, leaf)
  )
  return None if slots == default else slots


def _kernels(params: PyTree, slots: tuple | None = None) -> list:
  """The prunable leaves (``slots``; default :func:`_slots`), in tree order (traceable;
  also for gradient trees)."""
  leaves = jax.tree.leaves(params)
  slots = _slots(params) if slots is None else slots
  return [leaves[i] for i in slots]


def _with_kernels(params: PyTree, kernels: Sequence, slots: tuple | None = None) -> PyTree:
  """``params`` with its prunable leaves replaced, in tree order (traceable)."""
  slots = _slots(params) if slots is None else slots
  leaves, treedef = jax.tree.flatten(params)
  for i, k in zip(slots, kernels):
    leaves[i] = k
  return jax.tree.unflatten(treedef, leaves)


def _score_tree(params: PyTree, kernel_scores: Sequence, slots: tuple) -> PyTree:
  """Mask-shaped tree: the given arrays at the prunable leaves, None elsewhere."""
  leaves, treedef = jax.tree.flatten(params)
  out = [None] * len(leaves)
  for i, k in zip(slots, kernel_scores):
    out[i] = jnp.reshape(k, leaves[i].shape)
  return jax.tree.unflatten(treedef, out)


def _mask_leaves(masks) -> list | None:
  """The arrays of a mask tree already checked by :func:`_slots`."""
  if masks is None:
    return None
  return [jnp.asarray(m) for m in masks_lib.mask_leaves(masks)]


def _check_finite(kernel_scores: Sequence, who: str) -> None:
  bad = sum(int(jnp.sum(~jnp.isfinite(s))) for s in kernel_scores)
  if bad:
    raise ValueError(
      f"{who} computed {bad} NaN or infinite scores; scores must be finite "
      "(check the weights, the inputs and the loss)."
    )


def _check_finite_weights(params: PyTree, slots: tuple, who: str) -> None:
  """Scores of NaN or infinite weights mean nothing (LAMP would score such a layer 0)."""
  paths = [masks_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  bad = {paths[i]: int(jnp.sum(~jnp.isfinite(w))) for i, w in zip(slots, _kernels(params, slots))}
  bad = {p: n for p, n in bad.items() if n}
  if bad:
    raise ValueError(
      f"{who} got {sum(bad.values())} NaN or infinite weights (in "
      f"{', '.join(sorted(bad)[:5])}); weights must be finite (check the "
      "training run they come from)."
    )


def _check_rounds(rounds) -> int:
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
    raise ValueError(f"rounds={rounds!r} must be a positive integer.")
  return int(rounds)


def _check_batch(batch, who: str) -> dict:
  if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
    raise ValueError(
      f"{who} needs batches that are dicts with 'image' and 'label'; got {type(batch).__name__}."
    )
  image = jnp.asarray(batch["image"])
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(
      f"{who} needs preprocessed batches (float images, normalized); got "
      f"image dtype {image.dtype}: apply sparsejax.data.preprocess first."
    )
  return {"image": image.astype(jnp.float32), "label": jnp.asarray(batch["label"], jnp.int32)}


def _any_batch(batch, who: str):
  """A batch for a user loss: any pytree of arrays with a leading batch axis."""
  leaves = jax.tree.leaves(batch)
  if not leaves or not all(np.ndim(l) >= 1 for l in leaves):
    raise ValueError(
      f"{who} needs batches that are pytrees of arrays with a leading batch "
      f"axis; got {type(batch).__name__}."
    )
  return jax.tree.map(jnp.asarray, batch)


def _batch_size(batch) -> int:
  if isinstance(batch, Mapping) and "label" in batch:
    return int(np.shape(batch["label"])[0])
  return int(np.shape(jax.tree.leaves(batch)[0])[0])


def _batches_list(batches, who: str, check=None) -> list[dict]:
  """All batches, checked; ValueError if there are none."""
  check = check or _check_batch
  if batches is None:
    raise ValueError(
      f"{who} needs data: batches=None; pass an iterable of preprocessed "
      "batches {'image': float32 [B, H, W, C], 'label': int32 [B]}."
    )
  if isinstance(batches, Mapping):
    batches = [batches]
  out = []
  for b in batches:
    out.append(check(b, who))
  if not out:
    raise ValueError(
      f"{who} needs data: batches is empty; pass at least one preprocessed "
      "batch {'image': float32 [B, H, W, C], 'label': int32 [B]}."
    )
  return out


class _Cycle:
  """Batch t of ``batches``, cycling when they run out. Sequences are indexed; other
  iterables are read lazily, and their batches kept so that they can be cycled."""

  def __init__(self, batches, who: str, check=None):
    if batches is None:
      _batches_list(None, who)
    self.who = who
    self.check = check or _check_batch
    self.seq = batches if isinstance(batches, (list, tuple)) else None
    self.it = (
      None if self.seq is not None else iter([batches] if isinstance(batches, Mapping) else batches)
    )
    self.cache: list = []
    self.get(0)  # raises if there is no batch

  def get(self, t: int) -> dict:
    if self.seq is not None:
      if not self.seq:
        _batches_list([], self.who)
      return self.check(self.seq[t % len(self.seq)], self.who)
    while self.it is not None and len(self.cache) <= t:
      try:
        self.cache.append(self.check(next(self.it), self.who))
      except StopIteration:
        self.it = None
    if not self.cache:
      _batches_list([], self.who)
    return self.cache[t % len(self.cache)]


def _split_variables(variables) -> tuple[PyTree, dict]:
  if not isinstance(variables, dict) and not hasattr(variables, "keys"):
    raise ValueError(
      f"variables must be a dict {{'params': ..., ...}}; got {type(variables).__name__}."
    )
  if "params" not in variables:
    raise ValueError(
      "variables has no 'params' collection; pass the model's variables "
      "(e.g. model.init(...)), not the params alone."
    )
  rest = {k: v for k, v in variables.items() if k != "params"}
  return variables["params"], rest


def _split_for(variables, loss) -> tuple[PyTree, dict]:
  """(params, other collections); with a user ``loss``, bare params are accepted."""
  if loss is not None and not (hasattr(variables, "keys") and "params" in variables):
    return variables, {}
  return _split_variables(variables)


def _model_key(model, loss):
  """The model as a cache key: unused (None) with a user loss; else a hashable module."""
  if loss is not None:
    if not callable(loss):
      raise ValueError(f"loss={loss!r} must be a function loss(params, batch) -> scalar.")
    return None
  return models.check_model(model)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (the default data loss)."""
  import optax  # pylint: disable=g-import-not-at-top  (not needed to prune by rank)

  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# --------------------------------------------------------------------------- one-shot


def random(key: jax.Array, params: PyTree, prunable: masks_lib.Prunable = None) -> PyTree:
  """Random scores: iid uniform integers in [0, 2^31) (int32, ranked exactly), one
  independent draw per layer from ``jax.random.split(key, L)``.

  A global threshold keeps a uniformly random subset and, inside each layer, the order
  is a uniformly random permutation (any quota gives random pruning with nested masks).
  Equal draws (about N^2 / 2^32 pairs, e.g. ~5e4 of 20M weights) are ordered by
  position; only ties at a mask's cut matter, so at most a weight or two. O(N): a
  permutation (jax.random.permutation) costs 20 s on 20M weights on CPU.
  """
  slots = _slots(params, prunable)
  kernels = _kernels(params, slots)
  draws = _random_bits(key, tuple(tuple(int(d) for d in w.shape) for w in kernels))
  return _score_tree(params, draws, slots)


def _random_bits_fn(key: jax.Array, shapes: tuple) -> list:
  keys = jax.random.split(key, len(shapes))
  return [(jax.random.bits(k, s, jnp.uint32) >> 1).astype(jnp.int32) for k, s in zip(keys, shapes)]


# all layers in one program (one compilation per model, not one per kernel shape)
_random_bits = compilation.jit(_random_bits_fn, static_argnums=1)


def magnitude(params: PyTree, prunable: masks_lib.Prunable = None) -> PyTree:
  """Magnitude scores |w| (float32) at the ``prunable`` leaves (module docstring)."""
  slots = _slots(params, prunable)
  out = [jnp.abs(w).astype(jnp.float32) for w in _kernels(params, slots)]
  _check_finite(out, "magnitude")
  return _score_tree(params, out, slots)


def _lamp_layer(w: jax.Array) -> jax.Array:
  a = jnp.abs(w).reshape(-1).astype(jnp.float32)
  n = a.size
  # Ascending |w|; equal magnitudes by position descending, so that of tied weights the
  # lowest position comes last and gets the larger score (kept first, as rank_scores).
  order = (n - 1 - jnp.argsort(a[::-1], stable=True)).astype(jnp.int32)
  sq = jnp.square(a[order])
  tail = jnp.cumsum(sq[::-1])[::-1]  # sum_{v >= u} w_v^2
  s = jnp.where(tail > 0, sq / jnp.where(tail > 0, tail, 1.0), 0.0)
  return jnp.zeros(n, jnp.float32).at[order].set(s).reshape(w.shape)


_lamp_layer_jit = jax.jit(_lamp_layer)


def lamp(params: PyTree, prunable: masks_lib.Prunable = None) -> PyTree:
  """LAMP scores (Lee et al., 2021, "Layer-adaptive sparsity for the magnitude-based
  pruning"): in each layer, with weights sorted by |w| ascending (ties: higher flat
  position first),

      score(w_u) = w_u^2 / sum_{v >= u} w_v^2,

  returned at the original positions (float32). The largest weight of every layer
  scores exactly 1 and every other weight at most 1/2, so a global top-k with
  k >= number of layers never empties a layer. An all-zero layer scores 0.

  Raises:
    ValueError: a NaN or infinite weight (as :func:`magnitude`).
  """
  slots = _slots(params, prunable)
  _check_finite_weights(params, slots, "lamp")
  out = [_lamp_layer_jit(w) for w in _kernels(params, slots)]
  _check_finite(out, "lamp")
  return _score_tree(params, out, slots)


# --------------------------------------------------------------------------- SNIP


def _data_loss(model, loss_fn: Callable, temperature: float | None = None, loss=None):
  """loss(params, rest, batch): the user's ``loss(params, batch)`` if given (GraSP's
  temperature passed as ``temperature=`` when the loss accepts it), else ``loss_fn``
  on ``model.apply(..., train=True)`` logits of image/label batches (``train=True``
  only where the module's ``__call__`` takes it: a plain Flax model may not)."""
  if loss is not None:
    try:
      takes_t = "temperature" in inspect.signature(loss).parameters
    except (TypeError, ValueError):
      takes_t = False
    if temperature is not None and takes_t:
      return lambda params, rest, batch: loss(params, batch, temperature=temperature)
    return lambda params, rest, batch: loss(params, batch)

  try:
    call = inspect.signature(type(model).__call__).parameters
    takes_train = "train" in call or any(p.kind == p.VAR_KEYWORD for p in call.values())
  except (TypeError, ValueError):
    takes_train = True
  train = {"train": True} if takes_train else {}

  def loss(params, rest, batch):
    logits, _ = model.apply(
      {"params": params, **rest}, batch["image"], **train, mutable=["batch_stats"]
    )
    if temperature is not None:
      logits = logits / temperature
    return loss_fn(logits, batch["label"])

  return loss


@functools.lru_cache(maxsize=32)
def _snip_fns(
  model, loss_fn: Callable, user_loss: Callable | None = None, slots: tuple | None = None
):
  loss = _data_loss(model, loss_fn, loss=user_loss)

  def kernel_grads(params, rest, batch, mask_leaves):
    """dL/dw at the masked weights, at the prunable leaves only."""
    kernels = _kernels(params, slots)
    if mask_leaves is not None:
      kernels = [jnp.where(m, w, 0) for w, m in zip(kernels, mask_leaves)]
    g = jax.grad(loss)(_with_kernels(params, kernels, slots), rest, batch)
    return _kernels(g, slots), kernels

  @jax.jit
  def accumulate(acc, weight, params, rest, batch, mask_leaves):
    g, _ = kernel_grads(params, rest, batch, mask_leaves)
    return [a + weight * gi.astype(jnp.float32) for a, gi in zip(acc, g)]

  @jax.jit
  def finish(acc, total, params, mask_leaves):
    kernels = _kernels(params, slots)
    if mask_leaves is not None:
      kernels = [jnp.where(m, w, 0) for w, m in zip(kernels, mask_leaves)]
    return [jnp.abs(a / total * w).astype(jnp.float32) for a, w in zip(acc, kernels)]

  def round_scores(params, rest, batch, alive):
    """SNIP of one batch on the network masked by ``alive`` (traceable)."""
    g, kernels = kernel_grads(params, rest, batch, alive)
    return [jnp.abs(gi * w).astype(jnp.float32) for gi, w in zip(g, kernels)]

  return accumulate, finish, round_scores


def snip(
  model,
  variables: PyTree,
  batches: Iterable[dict],
  *,
  masks=None,
  loss_fn: Callable | None = None,
  loss: Callable | None = None,
  prunable: masks_lib.Prunable = None,
) -> PyTree:
  """SNIP connection sensitivity (Lee et al., 2019, "SNIP: single-shot network pruning
  based on connection sensitivity"):

      score(w) = | mean_b dL_b/dw * w |,

  at the masked weights w * m (pruned weights score 0), with L_b the loss of batch b
  (default: mean cross-entropy on ``model.apply(variables, x, train=True,
  mutable=['batch_stats'])`` logits; ``loss_fn(logits, labels) -> scalar`` replaces
  it). Gradients are averaged over ``batches`` weighted by batch size; batch-norm
  statistics are those of each batch and are not updated.

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=...)``.
    variables: {'params': ..., 'batch_stats': ...} (any collections besides params).
    batches: iterable of preprocessed batches {'image': float32 [B, H, W, C]
      normalized, 'label': int32 [B]} (a single such dict is accepted too).
    masks: optional bool mask tree (None at non-prunable leaves).
    loss: optional ``loss(params, batch) -> scalar`` over the user's own batches (any
      pytrees with a leading batch axis); replaces the model/image/label default, and
      ``variables`` may then be the params alone.
    prunable: which leaves are scored (module docstring).
  Returns:
    float32 score tree shaped like the params.
  """
  who = "snip"
  params, rest = _split_for(variables, loss)
  if batches is None:
    _batches_list(None, who)
  slots = _slots(params, prunable, masks)
  mask_leaves = _mask_leaves(masks)
  check = _check_batch if loss is None else _any_batch
  accumulate, finish, _ = _snip_fns(
    _model_key(model, loss), loss_fn or cross_entropy, loss, _cache_slots(params, slots)
  )
  acc = [jnp.zeros(w.shape, jnp.float32) for w in _kernels(params, slots)]
  total = 0
  for batch in [batches] if isinstance(batches, Mapping) else batches:
    batch = check(batch, who)
    size = _batch_size(batch)
    acc = accumulate(acc, jnp.float32(size), params, rest, batch, mask_leaves)
    total += size
  if total == 0:
    _batches_list([], who)
  out = finish(acc, jnp.float32(total), params, mask_leaves)
  _check_finite(out, who)
  return _score_tree(params, out, slots)


# --------------------------------------------------------------------------- GraSP


@functools.lru_cache(maxsize=32)
def _grasp_fns(
  model,
  loss_fn: Callable,
  temperature: float,
  user_loss: Callable | None = None,
  slots: tuple | None = None,
):
  loss = _data_loss(model, loss_fn, temperature, user_loss)

  @jax.jit
  def grad_acc(acc, weight, params, rest, batch):
    g = jax.grad(loss)(params, rest, batch)
    return [a + weight * gi for a, gi in zip(acc, _kernels(g, slots))]

  @jax.jit
  def hvp_acc(acc, weight, params, rest, batch, g_kernels):
    # Tangent g on the prunable kernels only, as GraSP differentiates only the weights.
    tangent = _with_kernels(jax.tree.map(jnp.zeros_like, params), g_kernels, slots)
    grad = lambda p: jax.grad(loss)(p, rest, batch)
    _, hg = jax.jvp(grad, (params,), (tangent,))
    return [a + weight * h for a, h in zip(acc, _kernels(hg, slots))]

  return grad_acc, hvp_acc


def grasp_hessian_gradient(
  model,
  variables: PyTree,
  batches: Iterable[dict],
  *,
  temperature: float = 200.0,
  loss_fn: Callable | None = None,
  loss: Callable | None = None,
  prunable: masks_lib.Prunable = None,
) -> tuple[list, list]:
  """(g, Hg) at the prunable kernels (lists in layer order, float32): g = mean_b
  dL_b/dw and Hg = mean_b H_b g, with L_b the loss on logits / temperature and H_b its
  Hessian over the prunable kernels. Hg is a forward-over-reverse product (jax.jvp of
  jax.grad)."""
  who = "grasp"
  try:
    t = float(temperature)
  except (TypeError, ValueError):
    t = float("nan")
  if isinstance(temperature, bool) or not (math.isfinite(t) and t > 0):
    raise ValueError(f"temperature={temperature!r} must be a positive finite number.")
  params, rest = _split_for(variables, loss)
  batch_list = _batches_list(batches, who, _check_batch if loss is None else _any_batch)
  slots = _slots(params, prunable)
  grad_acc, hvp_acc = _grasp_fns(
    _model_key(model, loss), loss_fn or cross_entropy, t, loss, _cache_slots(params, slots)
  )
  zeros = [jnp.zeros(w.shape, jnp.float32) for w in _kernels(params, slots)]
  sizes = [_batch_size(b) for b in batch_list]
  total = float(sum(sizes))
  g = zeros
  for b, n in zip(batch_list, sizes):
    g = grad_acc(g, jnp.float32(n / total), params, rest, b)
  hg = zeros
  for b, n in zip(batch_list, sizes):
    hg = hvp_acc(hg, jnp.float32(n / total), params, rest, b, g)
  return g, hg


def grasp(
  model,
  variables: PyTree,
  batches: Iterable[dict],
  *,
  temperature: float = 200.0,
  loss_fn: Callable | None = None,
  loss: Callable | None = None,
  prunable: masks_lib.Prunable = None,
) -> PyTree:
  """GraSP keep-scores (Wang et al., 2020, "Picking winning tickets before training by
  preserving gradient flow"): GraSP's score is S = -w * (H g), with g the loss gradient
  and H the Hessian of the loss on logits / ``temperature`` (both averaged over
  ``batches``, batch norm in training mode), and GraSP removes the *highest* S. This
  returns the keep-score -S = w * (H g) (float32; higher = kept first, may be
  negative). Batches and ``loss`` as in :func:`snip` (a user loss that accepts a
  ``temperature`` keyword gets GraSP's temperature; otherwise it is used as is).
  """
  params, _ = _split_for(variables, loss)
  slots = _slots(params, prunable)
  _, hg = grasp_hessian_gradient(
    model,
    variables,
    batches,
    temperature=temperature,
    loss_fn=loss_fn,
    loss=loss,
    prunable=prunable,
  )
  out = [(w.astype(jnp.float32) * h) for w, h in zip(_kernels(params, slots), hg)]
  _check_finite(out, "grasp")
  return _score_tree(params, out, slots)


# --------------------------------------------------------------------------- exact top-k

_HI = 1 << 16  # buckets of the high 16 bits of a non-negative float32
_LO = 1 << 15  # values of the low 15 bits
_INF_BUCKET = 0x7F800000 >> 15  # first bucket of inf/NaN bit patterns


def _score_bits(score: jax.Array, alive: jax.Array) -> jax.Array:
  """int32 keys ordered like the non-negative float32 scores; -1 where not alive."""
  bits = jax.lax.bitcast_convert_type(jnp.abs(score).astype(jnp.float32), jnp.int32)
  return jnp.where(alive, bits, -1)


def _suffix(h: jax.Array) -> jax.Array:
  """suffix[i] = sum_{j >= i} h[j], with a trailing 0."""
  return jnp.concatenate([jnp.cumsum(h[::-1])[::-1], jnp.zeros(1, h.dtype)])


class _Threshold(NamedTuple):
  tau: jax.Array  # the k-th largest key
  greater: jax.Array  # keys > tau
  ties: jax.Array  # keys == tau
  hist: jax.Array  # [1 + _HI]: bin 0 = zeros, bin 1 + j = positive keys with key >> 15 == j


def _threshold(bits: Sequence[jax.Array], k: jax.Array) -> _Threshold:
  """The k-th largest of the keys >= 0 (1 <= k <= their number) by a two-pass radix
  select: a histogram of the high bits (exact zeros in a bin of their own), then one of
  the low 15 bits inside the bucket that holds the k-th key. Two O(N) passes, no sort."""
  flat = [b.reshape(-1) for b in bits]
  hist = sum(
    jnp.bincount(jnp.where(b == 0, 0, jnp.where(b > 0, (b >> 15) + 1, _HI + 1)), length=_HI + 1)
    for b in flat
  ).astype(jnp.int32)
  above = _suffix(hist)  # above[j] = #(bin >= j)
  j = jnp.maximum(jnp.sum(above[: _HI + 1] >= k).astype(jnp.int32) - 1, 0)
  h = jnp.maximum(j - 1, 0)
  hist_lo = sum(
    jnp.bincount(jnp.where((b > 0) & ((b >> 15) == h), b & (_LO - 1), _LO), length=_LO)
    for b in flat
  ).astype(jnp.int32)
  above_lo = _suffix(hist_lo) + above[j + 1]
  l = jnp.maximum(jnp.sum(above_lo[:_LO] >= k).astype(jnp.int32) - 1, 0)
  zero = j == 0
  return _Threshold(
    tau=jnp.where(zero, 0, (h << 15) | l),
    greater=jnp.where(zero, above[1], above_lo[l + 1]),
    ties=jnp.where(zero, hist[0], hist_lo[l]),
    hist=hist,
  )


def _tie_cut(bits: Sequence[jax.Array], tau: jax.Array, wanted: jax.Array) -> jax.Array:
  """Global flat position p such that the keys == tau at positions < p are the first
  ``wanted`` of them (layers in order). Per-layer tie counts locate the layer of the
  wanted-th tie; a cumsum runs over that layer only. Used only when ties are split."""
  counts = jnp.stack([jnp.sum(b == tau, dtype=jnp.int32) for b in bits])
  before = jnp.cumsum(counts) - counts
  layer = jnp.minimum(jnp.sum(before + counts < wanted), len(bits) - 1)
  offsets = np.concatenate([[0], np.cumsum([b.size for b in bits])[:-1]]).astype(np.int32)

  def branch(i):
    def cut():
      inclusive = jnp.cumsum((bits[i].reshape(-1) == tau).astype(jnp.int32)) + before[i]
      return offsets[i] + jnp.sum(inclusive < wanted, dtype=jnp.int32) + 1

    return cut

  cut = jax.lax.switch(layer, [branch(i) for i in range(len(bits))])
  return jnp.where(wanted > 0, cut, 0)


def _keep_top(bits: Sequence[jax.Array], k: jax.Array):
  """Exact top-k of the keys >= 0 over all layers, ties by position (lower first):
  (keep masks shaped like ``bits``, threshold)."""
  k = jnp.asarray(k, jnp.int32)
  th = _threshold(bits, jnp.maximum(k, 1))
  wanted = k - th.greater
  total = sum(b.size for b in bits)
  cut = jax.lax.cond(
    th.ties <= wanted, lambda: jnp.int32(total), lambda: _tie_cut(bits, th.tau, wanted)
  )
  keep, offset = [], 0
  for b in bits:
    pos = jnp.arange(b.size, dtype=jnp.int32).reshape(b.shape) + offset
    keep.append(((b > th.tau) | ((b == th.tau) & (pos < cut))) & (k > 0))
    offset += b.size
  return keep, th


_keep_top_jit = jax.jit(_keep_top)


def select_top(scores: Sequence[jax.Array], k, alive: Sequence[jax.Array]) -> list:
  """Bool masks of the exact top-``k`` of non-negative ``scores`` among the ``alive``
  entries, over all arrays together, ties by position (lower first; arrays in order).
  A radix select (two histogram passes), no sort; jit-able with a traced ``k``."""
  keep, _ = _keep_top([_score_bits(s, a) for s, a in zip(scores, alive)], k)
  return keep


def top_k_masks(scores: PyTree, kept: int, masks=None) -> PyTree:
  """Exact global top-``kept`` of a score tree among the weights kept by ``masks`` (all
  if None), ties by position, without a sort: the mask ``rank_scores`` + ``masks_at``
  give. Scores are compared by absolute value (they must be non-negative floats)."""
  leaves = [s for s in jax.tree.leaves(scores, is_leaf=_is_none) if s is not None]
  alive = (
    [jnp.ones(s.shape, bool) for s in leaves] if masks is None else masks_lib.mask_leaves(masks)
  )
  avail = sum(int(jnp.sum(a)) for a in alive)
  if isinstance(kept, bool) or not 0 <= int(kept) <= avail:
    raise ValueError(f"kept={kept!r} must be in [0, {avail}] (the weights available).")
  keep, _ = _keep_top_jit([_score_bits(s, a) for s, a in zip(leaves, alive)], jnp.int32(kept))
  it = iter(keep)
  return jax.tree.map(lambda s: None if s is None else next(it), scores, is_leaf=_is_none)


# --------------------------------------------------------------------------- iteration


def _schedule(total: int, kept0: int, sparsity: float, rounds: int) -> np.ndarray:
  """Kept counts after rounds 1..R: round(N d0^(1 - t/R) (1 - s)^(t/R)), non-increasing,
  ending at round((1 - s) N); d0 = kept0 / N is the initial density (1 without masks)."""
  final = int(round((1.0 - sparsity) * total))
  if final > kept0:
    raise ValueError(
      f"sparsity={sparsity!r} keeps {final} weights, more than the {kept0} "
      "that masks keeps; an iterative pruner only removes weights."
    )
  if kept0 == 0:
    return np.zeros(rounds, np.int32)
  d0, d1 = kept0 / total, 1.0 - sparsity
  t = np.arange(1, rounds + 1, dtype=np.float64) / rounds
  ks = np.round(total * np.exp((1 - t) * np.log(d0) + t * np.log(d1))).astype(np.int64)
  ks[-1] = final
  ks = np.minimum.accumulate(np.minimum(ks, kept0))
  return np.maximum(ks, final).astype(np.int32)


def _bits_to_float(bits) -> np.ndarray:
  return np.asarray(bits, np.int32).view(np.float32)


def _make_step(score_fn: Callable):
  """Jitted round t: scores of the alive weights, exact top-k, bookkeeping.

  state = (round_of, last): per kernel, the round in which a weight was pruned (_ALIVE
  while alive, _INITIAL if masked from the start) and its score in that round (the
  latest score while alive). Per-round stats come from the selection's histogram.
  """

  def step(args, state, t, k):
    round_of, last = state
    alive = [r == _ALIVE for r in round_of]
    s = score_fn(alive, *args)
    bits = [_score_bits(si, a) for si, a in zip(s, alive)]
    keep, th = _keep_top(bits, k)
    round_of = [jnp.where(a & ~kp, t, r) for r, a, kp in zip(round_of, alive, keep)]
    last = [jnp.where(a, jnp.abs(si).astype(jnp.float32), l) for si, l, a in zip(s, last, alive)]
    hist = th.hist
    positive = hist[1:]
    finite = positive[:_INF_BUCKET]
    has_pos = jnp.any(finite > 0)
    lo_bucket = jnp.argmax(finite > 0).astype(jnp.int32)
    hi_bucket = (_INF_BUCKET - 1 - jnp.argmax(finite[::-1] > 0)).astype(jnp.int32)
    stats = jnp.stack(
      [
        hist[0],  # alive with score exactly 0
        jnp.sum(positive[_INF_BUCKET:]),  # NaN / inf
        jnp.where(has_pos, (lo_bucket << 15) | 1, 0),  # min positive, lower bound
        jnp.where(has_pos, (hi_bucket << 15) | (_LO - 1), 0),  # max, upper bound
        th.tau,
        (th.ties > k - th.greater).astype(jnp.int32),
      ]
    )  # ties split by position
    return (round_of, last), stats

  return jax.jit(step)


def _enable_x64():
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:  # jax < 0.6
    from jax.experimental import enable_x64 as ctx  # pylint: disable=g-import-not-at-top
  return ctx(True)


@functools.lru_cache(maxsize=8)
def _packed_priorities(n: int, round_bits: int, pos_bits: int):
  """Sorting one packed uint64 key per weight, (round, score bits, n-1-position): XLA
  sorts a single integer operand several times faster than tuples (10 s -> 2 s for
  20M weights on CPU)."""

  def prio(rnd, score):
    bits = jax.lax.bitcast_convert_type(score, jnp.int32).astype(jnp.uint64)
    pos = jnp.arange(n, dtype=jnp.uint64)
    key = (
      ((rnd + 1).astype(jnp.uint64) << (31 + pos_bits))
      | (bits << pos_bits)
      | (jnp.uint64(n - 1) - pos)
    )
    key = jnp.sort(key)
    order = (jnp.uint64(n - 1) - (key & jnp.uint64((1 << pos_bits) - 1))).astype(jnp.int32)
    return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))

  with _enable_x64():
    return jax.jit(prio)


@jax.jit
def _tuple_priorities(rnd: jax.Array, score: jax.Array) -> jax.Array:
  n = rnd.size
  pos = jnp.arange(n, dtype=jnp.int32)
  *_, order = jax.lax.sort((rnd, score, -pos, pos), num_keys=3, is_stable=False)
  return jnp.zeros(n, jnp.int32).at[order].set(pos)


def _priorities(round_of: list, last: list, rounds: int) -> list:
  """Ranks of (round pruned, score, -position) ascending: an int32 permutation of
  0..N-1 per layer slice (higher = eliminated later)."""
  sizes = [int(r.size) for r in round_of]
  rnd = jnp.concatenate([jnp.minimum(r.reshape(-1), rounds) for r in round_of])
  score = jnp.concatenate([l.reshape(-1) for l in last])
  n = int(rnd.size)
  round_bits = max(1, int(np.ceil(np.log2(rounds + 2))))
  pos_bits = max(1, int(np.ceil(np.log2(n))))
  if round_bits + 31 + pos_bits <= 64:
    with _enable_x64():
      prio = _packed_priorities(n, round_bits, pos_bits)(rnd, score)
  else:
    prio = _tuple_priorities(rnd, score)
  return jnp.split(prio, np.cumsum(sizes)[:-1])


def _iterate(
  step,
  args_for_round: Callable,
  params: PyTree,
  slots: tuple,
  mask_leaves,
  sparsity: float,
  rounds: int,
  who: str,
  return_stats: bool,
):
  kernels = _kernels(params, slots)
  total = int(sum(np.prod(w.shape) for w in kernels))
  if mask_leaves is None:
    round_of = [jnp.full(w.shape, _ALIVE, jnp.int32) for w in kernels]
    kept0 = total
  else:
    round_of = [jnp.where(m, _ALIVE, _INITIAL).astype(jnp.int32) for m in mask_leaves]
    kept0 = sum(int(jnp.sum(m)) for m in mask_leaves)
  schedule = _schedule(total, kept0, sparsity, rounds)
  state = (round_of, [jnp.zeros(w.shape, jnp.float32) for w in kernels])
  stats = []
  for t in range(rounds):
    state, st = step(args_for_round(t), state, jnp.int32(t), jnp.int32(schedule[t]))
    stats.append(st)
  # One more scoring pass on the final mask, pruning nothing: the survivors are ordered
  # by their final scores, so weights the last round cut off from every path (score 0)
  # come first when fewer than the final count are kept.
  state, st = step(args_for_round(rounds), state, jnp.int32(rounds), jnp.int32(schedule[-1]))
  stats.append(st)
  stats = np.asarray(jnp.stack(stats))
  bad = int(stats[:, 1].sum())
  if bad:
    first = int(np.argmax(stats[:, 1] > 0))
    raise ValueError(
      f"{who} computed {bad} NaN or infinite scores (first in round {first}); "
      "scores must be finite."
    )
  prio = _score_tree(params, _priorities(*state, rounds), slots)
  if not return_stats:
    return prio
  kept = np.concatenate([[kept0], schedule]).astype(np.int64)
  return prio, RoundStats(
    kept=kept,
    target=np.concatenate([schedule, schedule[-1:]]),
    zero_kept=stats[:, 0].astype(np.int64),
    min_positive_score=_bits_to_float(stats[:, 2]),
    max_score=_bits_to_float(stats[:, 3]),
    threshold=_bits_to_float(stats[:, 4]),
    ties_split=stats[:, 5].astype(bool),
  )


# --------------------------------------------------------------------------- iterative SNIP


@functools.lru_cache(maxsize=32)
def _iterative_snip_step(
  model, loss_fn: Callable, user_loss: Callable | None = None, slots: tuple | None = None
):
  _, _, round_scores = _snip_fns(model, loss_fn, user_loss, slots)
  return _make_step(lambda alive, params, rest, batch: round_scores(params, rest, batch, alive))


def iterative_snip(
  model,
  variables: PyTree,
  batches: Iterable[dict],
  sparsity: float,
  *,
  rounds: int = 300,
  masks=None,
  loss_fn: Callable | None = None,
  return_stats: bool = False,
  loss: Callable | None = None,
  prunable: masks_lib.Prunable = None,
):
  """Iterative SNIP (de Jorge et al., 2021, "Progressive skeletonization", FORCE-like
  schedule without resurrection): after round t = 1..R the density is
  (1 - s)^(t/R); each round recomputes :func:`snip` on the currently masked network
  with one batch (cycling through ``batches``) and keeps the top weights among those
  still kept (exact top-k, ties by position).

  Returns an int32 priority tree (see the module docstring): its top
  round((1 - s) N) is the final mask. With ``masks``, pruning starts from them and
  the density goes geometrically from theirs to 1 - s. ``return_stats=True`` also
  returns :class:`RoundStats`.
  """
  who = "iterative_snip"
  sparsity = masks_lib.check_sparsity(sparsity)
  rounds = _check_rounds(rounds)
  params, rest = _split_for(variables, loss)
  source = _Cycle(batches, who, _check_batch if loss is None else _any_batch)
  slots = _slots(params, prunable, masks)
  mask_leaves = _mask_leaves(masks)
  step = _iterative_snip_step(
    _model_key(model, loss), loss_fn or cross_entropy, loss, _cache_slots(params, slots)
  )
  args = lambda t: (params, rest, source.get(t))
  return _iterate(step, args, params, slots, mask_leaves, sparsity, rounds, who, return_stats)


# --------------------------------------------------------------------------- SynFlow


@functools.lru_cache(maxsize=32)
def _synflow_fns(traced):
  """(kernel paths, jitted one-round scores, jitted round step) of a traced model."""
  from sparsejax import connectivity as conn_lib  # pylint: disable=g-import-not-at-top

  kernel_slots = tuple(sorted(traced.prunable))  # the params' flattened (mask) order
  paths = tuple(traced.paths[i] for i in kernel_slots)
  linear = conn_lib.linear_scores(traced.program, kernel_slots)
  extra = [jnp.ones(s, jnp.float32) for s in traced.program.extra_shapes]

  def scores(abs_kernels, alive, abs_params):
    """|dR/dw * w| with w = |kernel| * alive on the linearized program (traceable)."""
    return linear(abs_kernels, alive, abs_params, extra)

  step = _make_step(lambda alive, abs_kernels, abs_params: scores(abs_kernels, alive, abs_params))
  return paths, jax.jit(scores), step


def _synflow_setup(model, params, input_shape, apply_kwargs=None, prunable=None, masks=None):
  """(params, slots, |kernels| float32, |params| flat, one-round scores fn, jitted round
  step, mask leaves) for the prunable leaves of the traced program (module docstring)."""
  from sparsejax import effective  # pylint: disable=g-import-not-at-top

  if hasattr(params, "keys") and "params" in params and hasattr(params["params"], "keys"):
    params = params["params"]  # model variables were passed
  if not hasattr(input_shape, "shape"):
    input_shape = models.check_input_shape(input_shape)
  kw = {"apply_kwargs": apply_kwargs} if apply_kwargs else {}
  if not isinstance(model, nn.Module):
    kw["params"] = params
  traced = effective.trace(model, input_shape, prunable=prunable, **kw)
  paths, scores, step = _synflow_fns(traced)
  mine = tuple(masks_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
  if mine != traced.paths:
    raise ValueError(
      f"params does not match the model: leaves {list(mine)[:3]}... vs the "
      f"model's {list(traced.paths)[:3]}...; pass the model's params."
    )
  slots = tuple(sorted(traced.prunable))
  if masks is not None:
    masks_lib.validate(masks, params, prunable=paths)
  abs_kernels = [jnp.abs(w).astype(jnp.float32) for w in _kernels(params, slots)]
  abs_params = [jnp.abs(jnp.asarray(w)).astype(jnp.float32) for w in jax.tree.leaves(params)]
  return params, slots, abs_kernels, abs_params, scores, step, _mask_leaves(masks)


def synflow_scores(
  model,
  params: PyTree,
  input_shape,
  masks=None,
  apply_kwargs: dict | None = None,
  prunable: masks_lib.Prunable = None,
) -> PyTree:
  """One round of SynFlow scores (Tanaka et al., 2020, "Pruning neural networks without
  any data by iteratively conserving synaptic flow"):

      R = 1^T f_lin(1; |w| * m),   score(w) = | dR/dw * w |,

  on the linearized program of any model (:mod:`sparsejax.connectivity`: activations
  and normalization the identity, max pooling as average, biases 0) with an all-ones
  input [1, *input_shape] (or shaped like an example input). Values are divided by a
  stop-gradient positive constant only at cuts of the traced graph (values every
  input-to-output path passes through, e.g. after a residual sum, never inside its
  branches), so R and all scores are the true ones times one common positive factor:
  same ranking, no overflow. float32; pruned weights score 0. ``model``: a Flax module
  or a function ``apply(params, x)``; ValueError where the model has no faithful
  linearization (layer norm, products of activations).
  """
  params, slots, abs_kernels, abs_params, scores, _, mask_leaves = _synflow_setup(
    model, params, input_shape, apply_kwargs, prunable, masks
  )
  alive = mask_leaves or [jnp.ones(w.shape, bool) for w in abs_kernels]
  out = scores(abs_kernels, alive, abs_params)
  _check_finite(out, "synflow")
  return _score_tree(params, out, slots)


def synflow(
  model,
  params: PyTree,
  input_shape,
  sparsity: float,
  *,
  rounds: int = 100,
  masks=None,
  return_stats: bool = False,
  apply_kwargs: dict | None = None,
  prunable: masks_lib.Prunable = None,
):
  """Iterative SynFlow (Tanaka et al., 2020): ``rounds`` rounds of
  :func:`synflow_scores` on the currently kept weights; after round t = 1..R the
  density is (1 - s)^(t/R), kept globally by exact top-k (ties by position).

  Data-free: ``params`` are the model's params (standard mode; only the kernels are
  used). Returns an int32 priority tree (see the module docstring) whose top
  round((1 - s) N) is the final mask; ``return_stats=True`` also returns
  :class:`RoundStats` (scores finite, and positive on every kept weight unless a
  weight lost all its paths).
  """
  who = "synflow"
  sparsity = masks_lib.check_sparsity(sparsity)
  rounds = _check_rounds(rounds)
  params, slots, abs_kernels, abs_params, _, step, mask_leaves = _synflow_setup(
    model, params, input_shape, apply_kwargs, prunable, masks
  )
  return _iterate(
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
