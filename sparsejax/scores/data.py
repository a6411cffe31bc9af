"""Scores computed on data: SNIP, iterative SNIP and GraSP (float32 score trees).

Their default loss is the mean cross-entropy of a Flax module on one of two kinds of
batch:

- images: ``{'image': float32 [B, H, W, C] (preprocessed), 'label': int32 [B]}``, the
  cross-entropy of ``model(image)`` logits [B, classes] against the labels;
- token windows: ``{'tokens': int [B, T + 1]}``, the next-token cross-entropy of a
  language model: ``model(tokens[:, :-1])`` gives logits [B, T, vocab] (the output's
  last axis is the vocabulary) whose targets are ``tokens[:, 1:]``, averaged over the
  B T positions.

Any other model or batch takes the user's ``loss(params, batch) -> scalar``. The
prunable set is ``prunable=`` (a collection of paths), else the bool leaves of
``masks``, else the traced program's linear-op weights (a :class:`sparsejax.Traced`
model, or a module traced on a batch's image or input tokens).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as masks_lib
from sparsejax import models, tracing
from sparsejax.scores import rounds as rounds_lib
from sparsejax.scores import trees

PyTree = Any


_BATCHES = (
  "preprocessed batches {'image': float32 [B, H, W, C] normalized, 'label': int32 [B]}, "
  "or token windows {'tokens': int [B, T + 1]} for a language model"
)


def _check_tokens(batch, who: str, vocab: int | None = None) -> dict:
  """A token-window batch {'tokens': int32 [B, T + 1]}; with ``vocab``, the tokens are
  checked to be ids of the model's vocabulary."""
  tokens = np.asarray(batch["tokens"])
  if not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(
      f"{who} needs 'tokens' as integer ids [B, T + 1] (inputs tokens[:, :-1], next-token "
      f"targets tokens[:, 1:]); got dtype {tokens.dtype}, shape {tokens.shape}."
    )
  if vocab is not None and tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
    raise ValueError(
      f"{who}: tokens must be ids in [0, {vocab}) (the model's output has a vocabulary of "
      f"{vocab}); got ids from {tokens.min()} to {tokens.max()}."
    )
  return {"tokens": jnp.asarray(tokens, jnp.int32)}


def _check_batch(batch, who: str, classes: int | None = None) -> dict:
  """An image/label batch (float32 images, int32 labels) or a token-window batch
  (int32 tokens [B, T + 1]); with ``classes``, the labels (tokens) are checked to be
  class indices (vocabulary ids) of the model's outputs."""
  if isinstance(batch, Mapping) and "tokens" in batch:
    return _check_tokens(batch, who, classes)
  if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
    raise ValueError(f"{who} needs {_BATCHES}; got {type(batch).__name__}.")
  image = jnp.asarray(batch["image"])
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(
      f"{who} needs preprocessed batches (float images, normalized); got "
      f"image dtype {image.dtype}: apply sparsejax.data.preprocess first."
    )
  labels = np.asarray(batch["label"])
  if classes is not None and labels.size and (labels.min() < 0 or labels.max() >= classes):
    raise ValueError(
      f"{who}: batch labels must be class indices in [0, {classes}) (the model has "
      f"{classes} outputs); got labels from {labels.min()} to {labels.max()}. Pass loss= "
      "for another kind of target."
    )
  return {"image": image.astype(jnp.float32), "label": jnp.asarray(labels, jnp.int32)}


def _inputs_targets(batch) -> tuple[jax.Array, jax.Array]:
  """The model's input and the targets of a checked batch: (image, label), or
  (tokens[:, :-1], tokens[:, 1:]) for token windows (traceable)."""
  if "tokens" in batch:
    return batch["tokens"][:, :-1], batch["tokens"][:, 1:]
  return batch["image"], batch["label"]


def _labelled(model, params, rest, first, who: str):
  """The check of the default loss's batches: :func:`_check_batch` against the number
  of classes the model outputs on ``first``'s inputs (shapes only, nothing is run). A
  token batch needs logits [B, T, vocab] (else ValueError: pass ``loss=``)."""
  x, _ = _inputs_targets(_check_batch(first, who))
  x = x[:1]
  try:
    logits, _ = jax.eval_shape(
      lambda p: _module(model).apply(
        {"params": p, **rest}, x, **_train_kwargs(model), mutable=["batch_stats"]
      ),
      params,
    )
  except Exception:  # pylint: disable=broad-except  (the loss itself reports it)
    logits = None
  if "tokens" in first and logits is not None:
    shape = getattr(logits, "shape", None)
    if shape is None or len(shape) != 3 or tuple(shape[:2]) != tuple(x.shape):
      raise ValueError(
        f"{who}: the default loss of token batches is next-token cross-entropy, which "
        f"needs logits [B, T, vocab] for tokens[:, :-1] of shape {tuple(x.shape)}; the "
        f"model returns {shape if shape is not None else type(logits).__name__}. Pass "
        "loss=(params, batch) -> scalar."
      )
  classes = None if logits is None or not hasattr(logits, "shape") else int(logits.shape[-1])
  return lambda batch, who: _check_batch(batch, who, classes)


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
  if isinstance(batch, Mapping) and "tokens" in batch:
    return int(np.shape(batch["tokens"])[0])
  return int(np.shape(jax.tree.leaves(batch)[0])[0])


def _batches_list(batches, who: str, check=None) -> list[dict]:
  """All batches, checked; ValueError if there are none."""
  check = check or _check_batch
  if batches is None:
    raise ValueError(f"{who} needs data: batches=None; pass an iterable of {_BATCHES}.")
  if isinstance(batches, Mapping):
    batches = [batches]
  out = []
  for b in batches:
    out.append(check(b, who))
  if not out:
    raise ValueError(f"{who} needs data: batches is empty; pass at least one of {_BATCHES}.")
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


def _module(model):
  """The Flax module (or function) of ``model``, which may be a sparsejax.Traced."""
  return model.model if isinstance(model, tracing.Traced) else model


def _model_key(model, loss):
  """The model as a cache key: unused (None) with a user loss; else a hashable module."""
  if loss is not None:
    if not callable(loss):
      raise ValueError(f"loss={loss!r} must be a function loss(params, batch) -> scalar.")
    return None
  return models.check_model(_module(model))


def _slots(model, params, first, prunable, masks, loss, who) -> tuple:
  """The prunable leaves' slots (:func:`sparsejax.scores.trees.prunable_paths`; the
  model traced on the ``first`` batch's image when nothing else says)."""
  example = None
  if prunable is None and masks is None and loss is None and not isinstance(model, tracing.Traced):
    if isinstance(first, Mapping) and "tokens" in first:
      length = np.shape(first["tokens"])[1] - 1
      example = jax.ShapeDtypeStruct((1, length), jnp.int32)
    elif isinstance(first, Mapping) and "image" in first:
      example = jax.ShapeDtypeStruct((1, *np.shape(first["image"])[1:]), jnp.float32)
  chosen = trees.prunable_paths(_module(model), prunable, masks, example)
  if chosen is None and isinstance(model, tracing.Traced):
    chosen = frozenset(model.prunable_paths)
  if chosen is None:
    raise ValueError(
      f"{who}: which weights to score is the traced program's linear-op weights: pass "
      "prunable=sparsejax.trace(model, input_shape).prunable_paths, masks=, or a "
      "sparsejax.Traced as model."
    )
  return trees.slots(params, chosen, masks, who=who)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (the default data loss): logits
  [..., classes] and labels [...] (images: [B]; token windows: [B, T], next tokens)."""
  import optax  # an optional heavy import: pruning by rank alone never needs it

  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _train_kwargs(model) -> dict:
  """{'train': True} where the module's ``__call__`` takes it (a plain Flax model may not)."""
  try:
    call = inspect.signature(type(_module(model)).__call__).parameters
    takes_train = "train" in call or any(p.kind == p.VAR_KEYWORD for p in call.values())
  except (TypeError, ValueError):
    takes_train = True
  return {"train": True} if takes_train else {}


def _data_loss(model, loss_fn: Callable, temperature: float | None = None, loss=None):
  """loss(params, rest, batch): the user's ``loss(params, batch)`` if given (GraSP's
  temperature passed as ``temperature=`` when the loss accepts it), else ``loss_fn``
  on ``model.apply(..., train=True)`` logits of image/label batches, or of token
  windows' inputs against their next tokens (``train=True`` only where the module's
  ``__call__`` takes it: a plain Flax model may not)."""
  if loss is not None:
    try:
      takes_t = "temperature" in inspect.signature(loss).parameters
    except (TypeError, ValueError):
      takes_t = False
    if temperature is not None and takes_t:
      return lambda params, rest, batch: loss(params, batch, temperature=temperature)
    return lambda params, rest, batch: loss(params, batch)

  train = _train_kwargs(model)

  def loss(params, rest, batch):
    x, targets = _inputs_targets(batch)
    logits, _ = model.apply({"params": params, **rest}, x, **train, mutable=["batch_stats"])
    if temperature is not None:
      logits = logits / temperature
    return loss_fn(logits, targets)

  return loss


@functools.lru_cache(maxsize=32)
def _snip_fns(model, loss_fn: Callable, user_loss: Callable | None, slots: tuple):
  loss = _data_loss(model, loss_fn, loss=user_loss)

  def kernel_grads(params, rest, batch, mask_leaves):
    """dL/dw at the masked weights, at the prunable leaves only."""
    kernels = trees.kernels(params, slots)
    if mask_leaves is not None:
      kernels = [jnp.where(m, w, 0) for w, m in zip(kernels, mask_leaves)]
    g = jax.grad(loss)(trees.with_kernels(params, kernels, slots), rest, batch)
    return trees.kernels(g, slots), kernels

  @jax.jit
  def accumulate(acc, weight, params, rest, batch, mask_leaves):
    g, _ = kernel_grads(params, rest, batch, mask_leaves)
    return [a + weight * gi.astype(jnp.float32) for a, gi in zip(acc, g)]

  @jax.jit
  def finish(acc, total, params, mask_leaves):
    kernels = trees.kernels(params, slots)
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
  mutable=['batch_stats'])`` logits, next-token cross-entropy for token windows: module
  docstring; ``loss_fn(logits, labels) -> scalar`` replaces it). Gradients are averaged
  over ``batches`` weighted by batch size; batch-norm statistics are those of each batch
  and are not updated.

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=...)`` (or its
      :class:`sparsejax.Traced`).
    variables: {'params': ..., 'batch_stats': ...} (any collections besides params).
    batches: iterable of preprocessed batches {'image': float32 [B, H, W, C]
      normalized, 'label': int32 [B]}, or of token windows {'tokens': int [B, T + 1]}
      for a language model (a single such dict is accepted too).
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
  batches = iter([batches] if isinstance(batches, Mapping) else batches)
  first = next(batches, None)
  if first is None:
    _batches_list([], who)
  batches = itertools.chain([first], batches)  # read once: batches may be a generator
  slots = _slots(model, params, first, prunable, masks, loss, who)
  check = _any_batch if loss is not None else _labelled(model, params, rest, first, who)
  mask_leaves = trees.mask_arrays(masks)
  accumulate, finish, _ = _snip_fns(_model_key(model, loss), loss_fn or cross_entropy, loss, slots)
  acc = [jnp.zeros(w.shape, jnp.float32) for w in trees.kernels(params, slots)]
  total = 0
  for batch in batches:
    batch = check(batch, who)
    size = _batch_size(batch)
    acc = accumulate(acc, jnp.float32(size), params, rest, batch, mask_leaves)
    total += size
  if total == 0:
    _batches_list([], who)
  out = finish(acc, jnp.float32(total), params, mask_leaves)
  trees.check_finite(out, who)
  return trees.score_tree(params, out, slots)


@functools.lru_cache(maxsize=32)
def _iterative_snip_step(model, loss_fn: Callable, user_loss: Callable | None, slots: tuple):
  _, _, round_scores = _snip_fns(model, loss_fn, user_loss, slots)
  return rounds_lib.make_step(
    lambda alive, params, rest, batch: round_scores(params, rest, batch, alive)
  )


def iterative_snip(
  model,
  variables: PyTree,
  batches: Iterable[dict],
  *,
  sparsity: float,
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

  Returns an int32 priority tree (:mod:`sparsejax.scores.rounds`): its top
  round((1 - s) N) is the final mask. With ``masks``, pruning starts from them and
  the density goes geometrically from theirs to 1 - s. ``return_stats=True`` also
  returns :class:`~sparsejax.scores.rounds.RoundStats`.
  """
  who = "iterative_snip"
  sparsity = masks_lib.check_sparsity(sparsity)
  rounds = trees.check_rounds(rounds)
  params, rest = _split_for(variables, loss)
  source = _Cycle(batches, who, _check_batch if loss is None else _any_batch)
  if loss is None:  # the labels checked against the model's classes
    source.check = _labelled(model, params, rest, source.get(0), who)
    source.cache = [source.check(b, who) for b in source.cache]
  slots = _slots(model, params, source.get(0), prunable, masks, loss, who)
  step = _iterative_snip_step(_model_key(model, loss), loss_fn or cross_entropy, loss, slots)
  args = lambda t: (params, rest, source.get(t))
  return rounds_lib.iterate(
    step, args, params, slots, trees.mask_arrays(masks), sparsity, rounds, who, return_stats
  )


@functools.lru_cache(maxsize=32)
def _grasp_fns(
  model,
  loss_fn: Callable,
  temperature: float,
  user_loss: Callable | None,
  slots: tuple,
):
  loss = _data_loss(model, loss_fn, temperature, user_loss)

  @jax.jit
  def grad_acc(acc, weight, params, rest, batch):
    g = jax.grad(loss)(params, rest, batch)
    return [a + weight * gi for a, gi in zip(acc, trees.kernels(g, slots))]

  @jax.jit
  def hvp_acc(acc, weight, params, rest, batch, g_kernels):
    # Tangent g on the prunable kernels only, as GraSP differentiates only the weights.
    tangent = trees.with_kernels(jax.tree.map(jnp.zeros_like, params), g_kernels, slots)
    grad = lambda p: jax.grad(loss)(p, rest, batch)
    _, hg = jax.jvp(grad, (params,), (tangent,))
    return [a + weight * h for a, h in zip(acc, trees.kernels(hg, slots))]

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
  if loss is None:  # the labels checked against the model's classes
    check = _labelled(model, params, rest, batch_list[0], who)
    batch_list = [check(b, who) for b in batch_list]
  slots = _slots(model, params, batch_list[0], prunable, None, loss, who)
  grad_acc, hvp_acc = _grasp_fns(_model_key(model, loss), loss_fn or cross_entropy, t, loss, slots)
  zeros = [jnp.zeros(w.shape, jnp.float32) for w in trees.kernels(params, slots)]
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
  batches = _batches_list(batches, "grasp", _check_batch if loss is None else _any_batch)
  slots = _slots(model, params, batches[0], prunable, None, loss, "grasp")
  _, hg = grasp_hessian_gradient(
    model,
    variables,
    batches,
    temperature=temperature,
    loss_fn=loss_fn,
    loss=loss,
    prunable=trees.kernel_paths(params, slots),
  )
  out = [(w.astype(jnp.float32) * h) for w, h in zip(trees.kernels(params, slots), hg)]
  trees.check_finite(out, "grasp")
  return trees.score_tree(params, out, slots)
