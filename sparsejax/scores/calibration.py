"""Pruning after training on calibration data: SparseGPT, Wanda, OBD and Taylor.

Every score here reads the trained model's variables and a few calibration batches
(:mod:`sparsejax.calibration`: per weight W [out, in], the statistics of its inputs X,
H = X^T X). With W' the pruned weights, each layer's objective is its reconstruction
error on the calibration inputs, ||W X^T - W' X^T||^2 (Optimal Brain Surgeon's layer-wise
form; Hassibi & Stork, 1993; Frantar & Alistarh, 2022):

- :func:`sparsegpt` (Frantar & Alistarh, 2023, "SparseGPT: massive language models can
  be accurately pruned in one-shot"): OBS made scalable. Columns are visited left to
  right in lazy blocks of ``blocksize``; when a weight is pruned, the not yet visited
  weights of its row absorb its error through the upper Cholesky factor of the
  dampened inverse Hessian, (H + damp * mean(diag H) I)^{-1} = U^T U. The mask of each
  block is chosen when the block is reached, by the OBS saliency w^2 / U_jj^2 of the
  updated weights (unstructured: the block's share of the layer's count, over all its
  rows; N:M: per group of M columns of each row, when the group is reached). Returns
  new weights as well as masks (:class:`sparsejax.calibration.Pruned`). A port of the
  reference implementation (IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``) with two
  deliberate differences: each block prunes its exact share of the layer's count (the
  reference's ``<=`` threshold prunes one weight more per block, plus ties), and the
  inverse's Cholesky factor is computed as the reversed inverse of the Cholesky factor
  of the reversed H (one factorization and one triangular inverse instead of two
  factorizations and an inversion; the same U, as H^{-1} = U^T U has one such factor).
- :func:`wanda` (Sun et al., 2024, "A simple and effective pruning approach for large
  language models"): score |W_ij| * ||x_j||_2, compared within each output row (the
  paper's default; ``compare='layer'``: within the layer); the kept weights keep their
  values.
- :func:`obd` (LeCun et al., 1990, "Optimal brain damage"): the diagonal second-order
  saliency of the layer objective, w_ij^2 H_jj / 2 (the error a lone pruned weight
  adds); one ranking over all layers. Within a layer it orders as Wanda's per-layer
  score (its square).
- :func:`taylor` (Molchanov et al., 2019, "Importance estimation for neural network
  pruning"): the first-order Taylor term |w * dL/dw| of the loss on trained weights,
  averaged over the batches (SNIP's formula, :func:`sparsejax.scores.snip`, applied to
  trained weights).

Targets: a direct ``sparsity`` s (each layer keeps round((1 - s) n_l), the uniform
quota's count; Wanda's rows keep it within one, SparseGPT's blocks their share) or an
N:M ``pattern`` (:mod:`sparsejax.patterns`). SparseGPT and Wanda prune layer by layer
with the earlier layers pruned in place (``sequential=True``, the papers' scheme).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import calibration, layouts, patterns, quotas, selection, tracing
from sparsejax import masks as masks_lib
from sparsejax.scores import data as data_scores

#: Comparison groups of Wanda: each output row, or the whole layer.
COMPARE = ("row", "layer")


def check_target(sparsity, pattern) -> tuple[float, tuple[int, int] | None]:
  """(s, (N, M) or None): a direct sparsity, or an N:M pattern (whose sparsity is
  1 - N/M; a sparsity given beside it must be that one). ValueError naming them."""
  if pattern is None:
    if sparsity is None:
      raise ValueError(
        "sparsity=None and pattern=None: pass a sparsity in [0, 1) or pattern='N:M'."
      )
    return masks_lib.check_sparsity(sparsity), None
  n, m = patterns.parse(pattern)
  implied = 1.0 - n / m
  if sparsity is not None and abs(masks_lib.check_sparsity(sparsity) - implied) > 1e-9:
    raise ValueError(
      f"sparsity={sparsity!r} contradicts pattern={patterns.shown(pattern)} (sparsity "
      f"{implied:g}); give one."
    )
  return implied, (n, m)


def kept_count(shape, sparsity: float) -> int:
  """Weights a layer of ``shape`` keeps at direct ``sparsity``: the uniform quota's
  round((1 - s) n)."""
  counts = quotas.layer_kept_counts("uniform", 1.0 - float(sparsity), (tuple(shape),))
  return int(np.asarray(counts)[0])


# ---------------------------------------------------------------------------- SparseGPT


def inverse_cholesky(h: jax.Array) -> jax.Array:
  """U, upper triangular with a positive diagonal, such that U^T U = H^{-1} (H [n, n]
  positive definite): the reference's ``cholesky(cholesky_inverse(cholesky(H)),
  upper=True)``. With P the reversal and P H P = L L^T, H^{-1} = (P L^{-1} P)^T (P L^{-1}
  P), and P L^{-1} P is upper triangular: one factorization, one triangular inverse."""
  lower = jnp.linalg.cholesky(h[::-1, ::-1])
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  inv = lax.linalg.triangular_solve(lower, eye, left_side=True, lower=True)
  return inv[::-1, ::-1]


@functools.partial(jax.jit, static_argnames=("blocksize", "n", "m"))
def _sparsegpt(w, h, block_kept, damp, *, blocksize: int, n: int | None, m: int | None):
  """(W' [rows, cols], keep [rows, cols], saliency [rows, cols], finite): the OBS sweep
  of the module docstring. ``block_kept`` int32 [blocks]: weights kept per column block
  (unstructured). The saliency is w^2 / U_jj^2 of the updated weights when their mask
  was chosen."""
  hi = lax.Precision.HIGHEST
  rows, cols = w.shape
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(dead.astype(h.dtype))  # the reference's H[dead, dead] = 1
  w = jnp.where(dead[None, :], 0.0, w)
  h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(cols, dtype=h.dtype)
  hinv = inverse_cholesky(h)
  finite = jnp.all(jnp.isfinite(hinv))
  size = blocksize
  blocks = -(-cols // size)
  pad = blocks * size - cols
  w = jnp.pad(w, ((0, 0), (0, pad)))
  hinv = jnp.pad(hinv, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(cols + pad) >= cols)
  real = jnp.arange(cols + pad) < cols
  column_index = jnp.arange(cols + pad)

  def block(b, carry):
    w, keep, sal = carry
    i1 = b * size
    w1 = lax.dynamic_slice(w, (0, i1), (rows, size))
    hinv1 = lax.dynamic_slice(hinv, (i1, i1), (size, size))
    d = jnp.diagonal(hinv1)
    if n is None:  # the block's mask now, from the updated weights' OBS saliency
      alive = jnp.broadcast_to(lax.dynamic_slice(real, (i1,), (size,)), (rows, size))
      sal1 = jnp.square(w1) / jnp.square(d)[None, :]
      (keep1,), _ = selection.top_k(
        [selection.device_keys(sal1)], block_kept[b], [alive.reshape(-1)]
      )
      keep1 = keep1.reshape(rows, size)
    else:
      keep1 = jnp.ones((rows, size), bool)
      sal1 = jnp.zeros((rows, size), w.dtype)

    def column(i, w1, keep1, err1):
      col = lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
      kept = lax.dynamic_index_in_dim(keep1, i, axis=1, keepdims=False)
      err = (col - jnp.where(kept, col, 0.0)) / d[i]
      # Hinv1 is upper triangular: columns left of i are not touched, column i becomes q
      w1 = w1 - err[:, None] * lax.dynamic_index_in_dim(hinv1, i, axis=0)
      return w1, lax.dynamic_update_index_in_dim(err1, err, i, axis=1)

    def one(i, c):
      w1, keep1, sal1, err1 = c
      w1, err1 = column(i, w1, keep1, err1)
      return w1, keep1, sal1, err1

    def group(g, c):  # N:M: a group's mask when the sweep reaches it, then its columns
      w1, keep1, sal1, err1 = c
      i0 = g * m
      tmp = (
        jnp.square(lax.dynamic_slice(w1, (0, i0), (rows, m)))
        / jnp.square(lax.dynamic_slice(d, (i0,), (m,)))[None, :]
      )
      keep1 = lax.dynamic_update_slice(keep1, patterns.n_best(tmp, n), (0, i0))
      sal1 = lax.dynamic_update_slice(sal1, tmp, (0, i0))
      for j in range(m):
        w1, err1 = column(i0 + j, w1, keep1, err1)
      return w1, keep1, sal1, err1

    start = (w1, keep1, sal1, jnp.zeros_like(w1))
    if n is None:
      w1, keep1, sal1, err1 = lax.fori_loop(0, size, one, start)
    else:
      w1, keep1, sal1, err1 = lax.fori_loop(0, size // m, group, start)
    later = lax.dynamic_slice(hinv, (i1, 0), (size, cols + pad))
    later = jnp.where(column_index[None, :] >= i1 + size, later, 0.0)
    w = w - jnp.dot(err1, later, precision=hi)
    w = lax.dynamic_update_slice(w, jnp.where(keep1, w1, 0.0), (0, i1))
    keep = lax.dynamic_update_slice(keep, keep1, (0, i1))
    return w, keep, lax.dynamic_update_slice(sal, sal1, (0, i1))

  keep = jnp.zeros((rows, cols + pad), bool)
  w, keep, sal = lax.fori_loop(0, blocks, block, (w, keep, jnp.zeros_like(w)))
  return w[:, :cols], keep[:, :cols], sal[:, :cols], finite & jnp.all(jnp.isfinite(w))


def block_counts(rows: int, cols: int, kept: int, blocksize: int) -> np.ndarray:
  """int32 [blocks]: weights each block of ``blocksize`` columns keeps when the layer
  keeps ``kept``: pruned(c) = round(P c / cols) of the first c columns, P = rows cols -
  kept, so each block prunes its share within one and the total is exact."""
  pruned = rows * cols - int(kept)
  edges = np.minimum(np.arange(0, cols + blocksize, blocksize), cols)
  edges[-1] = cols
  cum = (2 * pruned * edges + cols) // (2 * cols)
  widths = np.diff(edges)
  return (rows * widths - np.diff(cum)).astype(np.int32)[: -(-cols // blocksize)]


def _check_solver_args(blocksize, damp, pattern) -> tuple[int, float]:
  if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or blocksize < 1:
    raise ValueError(f"blocksize={blocksize!r} must be a positive integer (the reference's 128).")
  if pattern is not None and blocksize % pattern[1]:
    raise ValueError(
      f"blocksize={blocksize} must be a multiple of M={pattern[1]} (N:M groups must not "
      "straddle two lazy blocks)."
    )
  try:
    d = float(damp)
  except (TypeError, ValueError):
    d = float("nan")
  if isinstance(damp, bool) or not (math.isfinite(d) and d >= 0):
    raise ValueError(f"damp={damp!r} must be a finite number >= 0 (the reference's 0.01).")
  return int(blocksize), d


def sparsegpt_layer(
  w,
  h,
  *,
  kept: int | None = None,
  pattern=None,
  blocksize: int = 128,
  damp: float = 0.01,
  name: str = "the layer",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """SparseGPT on one layer: (W' float32 [out, in], keep bool [out, in], saliency
  float32 [out, in]: w^2 / U_jj^2 of the updated weights when their mask was chosen).

  Args:
    w: [out, in] weights (rows are output units).
    h: [in, in] H = X^T X of the calibration inputs (any positive scale).
    kept: weights kept in all (unstructured), or
    pattern: 'N:M' (N kept in every M consecutive inputs of a row).
    blocksize: columns per lazy block (the reference's 128).
    damp: H + damp * mean(diag H) I is inverted (the reference's ``percdamp``, 0.01).

  Raises:
    ValueError: a bad argument, or a Hessian that is not positive definite after
      dampening (e.g. ``damp=0`` with fewer independent calibration rows than inputs).
  """
  nm = None if pattern is None else patterns.parse(pattern)
  blocksize, d = _check_solver_args(blocksize, damp, nm)
  w = jnp.asarray(w, jnp.float32)
  h = jnp.asarray(h, jnp.float32)
  rows, cols = w.shape
  if h.shape != (cols, cols):
    raise ValueError(f"h has shape {h.shape}; the layer's {cols} inputs need ({cols}, {cols}).")
  if nm is None:
    if kept is None or not 0 <= int(kept) <= rows * cols:
      raise ValueError(f"kept={kept!r} must be a count in [0, {rows * cols}] (or give pattern=).")
    counts = block_counts(rows, cols, int(kept), blocksize)
  else:
    if cols % nm[1]:
      raise ValueError(
        f"pattern={patterns.shown(pattern)}: M={nm[1]} does not divide the {cols} inputs of {name} "
        "(N:M groups are M consecutive inputs)."
      )
    counts = np.zeros(-(-cols // blocksize), np.int32)
  new, keep, sal, finite = _sparsegpt(
    w,
    h,
    jnp.asarray(counts),
    jnp.float32(d),
    blocksize=blocksize,
    n=None if nm is None else nm[0],
    m=None if nm is None else nm[1],
  )
  if not bool(finite):
    raise ValueError(
      f"sparsegpt: the Hessian of {name} ({cols} inputs) is not positive definite with "
      f"damp={damp!r}: its calibration inputs do not span all {cols} dimensions (fewer "
      "independent rows than inputs, or inputs that are always equal). Pass damp > 0 "
      "(the reference's 0.01) or more calibration data."
    )
  return new, keep, sal


# ---------------------------------------------------------------------------- Wanda


def wanda_scores(w, diag) -> jax.Array:
  """Wanda's scores |W_ij| ||x_j|| (float32 [out, in]; ``diag`` [in] the squared input
  norms)."""
  w = jnp.asarray(w, jnp.float32)
  return jnp.abs(w) * jnp.sqrt(jnp.maximum(jnp.asarray(diag, jnp.float32), 0.0))[None, :]


def wanda_layer(
  w, diag, *, kept: int | None = None, pattern=None, compare: str = "row"
) -> jax.Array:
  """Wanda's mask of one layer, bool [out, in]: by :func:`wanda_scores`, the ``kept``
  best per row (``compare='row'``, each row within one) or per layer, or the N best of
  every M inputs of a row (``pattern``)."""
  if compare not in COMPARE:
    raise ValueError(f"compare={compare!r} is not allowed; allowed: {', '.join(COMPARE)}.")
  score = wanda_scores(w, diag)
  if pattern is not None:
    n, m = patterns.parse(pattern)
    return patterns.keep_n_m(score, n, m)
  if compare == "row":
    return patterns.keep_rows(score, int(kept))
  return patterns.keep_top(score, jnp.int32(kept))


# ---------------------------------------------------------------------------- tree level


def _prepare(model, variables, batches, prunable, pattern, input_key, who):
  """(inputs, views) after the checks at the boundary: data, the prunable weights'
  views, the pattern's widths."""
  inputs = calibration.calibration_inputs(batches, input_key)
  traced = calibration.trace_on(model, variables, inputs[0], prunable)
  views = layouts.of(traced).require(traced.prunable_paths, who)
  if pattern is not None:
    patterns.check_widths(views, pattern)
  return inputs, views


def wanda(
  model,
  variables,
  batches: Iterable,
  *,
  sparsity: float | None = None,
  pattern=None,
  compare: str = "row",
  sequential: bool = True,
  prunable=None,
  input_key: str = "image",
) -> calibration.Pruned:
  """Wanda (module docstring) at direct ``sparsity`` or N:M ``pattern``, layer by layer.

  Args:
    model: a Flax module, a function ``apply(params, x)``, or a :class:`sparsejax.Traced`.
    variables: the trained model's variables (batch statistics included) or params.
    batches: calibration batches: model inputs [B, ...] or dicts with them at
      ``input_key`` (image/label dicts: 'image').
    compare: 'row' (each output unit keeps the same count, within one) or 'layer'.
    sequential: each layer's inputs with the earlier layers pruned (the paper's
      scheme); False: every layer's on the dense model.
    prunable: which weights (a predicate on the path or a collection of paths;
      default every linear-op weight; lookups have no inputs to read: leave them out).

  Returns:
    :class:`sparsejax.calibration.Pruned`: masks, and params with the pruned weights
    zero (the others unchanged).
  """
  sparsity, nm = check_target(sparsity, pattern)
  if compare not in COMPARE:
    raise ValueError(f"compare={compare!r} is not allowed; allowed: {', '.join(COMPARE)}.")
  inputs, views = _prepare(model, variables, batches, prunable, pattern, input_key, "wanda")

  def prune_layer(path, w, stats):
    kept = kept_count(views[path].shape, sparsity)
    keep = wanda_layer(w, stats.diag, kept=kept, pattern=nm, compare=compare)
    return w, keep, wanda_scores(w, stats.diag)

  return calibration.layerwise(
    model,
    variables,
    inputs,
    prune_layer,
    stat="diag",
    sequential=sequential,
    prunable=list(views),
  )


def sparsegpt(
  model,
  variables,
  batches: Iterable,
  *,
  sparsity: float | None = None,
  pattern=None,
  blocksize: int = 128,
  damp: float = 0.01,
  sequential: bool = True,
  prunable=None,
  input_key: str = "image",
) -> calibration.Pruned:
  """SparseGPT (module docstring) at direct ``sparsity`` or N:M ``pattern``, layer by
  layer with the earlier layers pruned and updated in place. Arguments as
  :func:`wanda`; ``blocksize`` and ``damp`` as :func:`sparsegpt_layer`.

  Returns:
    :class:`sparsejax.calibration.Pruned`: masks, and the updated params (pruned
    weights zero, kept weights compensating for them).
  """
  sparsity, nm = check_target(sparsity, pattern)
  _check_solver_args(blocksize, damp, nm)
  inputs, views = _prepare(model, variables, batches, prunable, pattern, input_key, "sparsegpt")

  def prune_layer(path, w, stats):
    kept = None if nm is not None else kept_count(views[path].shape, sparsity)
    return sparsegpt_layer(
      w,
      stats.hessian,
      kept=kept,
      pattern=nm,
      blocksize=blocksize,
      damp=damp,
      name=f"{path!r}",
    )

  return calibration.layerwise(
    model,
    variables,
    inputs,
    prune_layer,
    stat="full",
    sequential=sequential,
    prunable=list(views),
  )


def obd(model, variables, batches: Iterable, *, prunable=None, input_key: str = "image") -> dict:
  """OBD scores w_ij^2 H_jj / 2 (float32 score tree) of the layer objective, H_jj the
  squared input norms summed over the calibration rows, on the dense trained model.
  Arguments as :func:`wanda`."""
  inputs, views = _prepare(model, variables, batches, prunable, None, input_key, "obd")
  stats = calibration.capture(
    model, variables, inputs, stat="diag", prunable=list(views), input_key=input_key
  )
  traced = calibration.trace_on(model, variables, inputs[0], list(views))
  params = jax.tree.leaves(tracing.params_of(traced, variables))
  leaf_of = {p: i for i, p in enumerate(traced.paths)}
  out: list = [None] * len(params)
  for p, view in views.items():
    w = view.to_matrix(params[leaf_of[p]]).astype(jnp.float32)
    out[leaf_of[p]] = view.from_matrix(0.5 * jnp.square(w) * stats[p].diag[None, :])
  return jax.tree.unflatten(traced.params_spec[0], out)


def taylor(
  model,
  variables,
  batches: Iterable,
  *,
  loss_fn: Callable | None = None,
  loss: Callable | None = None,
  prunable=None,
):
  """Taylor scores |mean_b dL_b/dw * w| (float32 score tree) on the trained
  ``variables``: :func:`sparsejax.scores.snip`'s formula and arguments (labelled
  batches, or a user ``loss(params, batch)``)."""
  return data_scores.snip(model, variables, batches, loss_fn=loss_fn, loss=loss, prunable=prunable)


__all__ = [
  "COMPARE",
  "block_counts",
  "check_target",
  "inverse_cholesky",
  "kept_count",
  "obd",
  "sparsegpt",
  "sparsegpt_layer",
  "taylor",
  "wanda",
  "wanda_layer",
  "wanda_scores",
]
