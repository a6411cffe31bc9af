"""Scores read off the weights alone: random, magnitude, LAMP (float32 or int32 trees).

Each takes ``params`` and the prunable set (``prunable=``, a collection of '/'-joined
paths: the traced program's linear-op weights, :class:`sparsejax.Traced`), and returns a
score tree (:mod:`sparsejax.scores.trees`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import compilation
from sparsejax import masks as masks_lib
from sparsejax.scores import trees

PyTree = Any


def random(params: PyTree, *, key: jax.Array, prunable: masks_lib.Prunable) -> PyTree:
  """Random scores: iid uniform integers in [0, 2^31) (int32, ranked exactly), one
  independent draw per layer from ``jax.random.split(key, L)``.

  A global threshold keeps a uniformly random subset and, inside each layer, the order
  is a uniformly random permutation (any quota gives random pruning with nested masks).
  Equal draws (about N^2 / 2^32 pairs, e.g. ~5e4 of 20M weights) are ordered by
  position; only ties at a mask's cut matter, so at most a weight or two. O(N): a
  permutation (jax.random.permutation) costs 20 s on 20M weights on CPU.
  """
  slots = trees.slots(params, prunable, who="random")
  kernels = trees.kernels(params, slots)
  draws = _random_bits(key, tuple(tuple(int(d) for d in w.shape) for w in kernels))
  return trees.score_tree(params, draws, slots)


def _random_bits_fn(key: jax.Array, shapes: tuple) -> list:
  keys = jax.random.split(key, len(shapes))
  return [(jax.random.bits(k, s, jnp.uint32) >> 1).astype(jnp.int32) for k, s in zip(keys, shapes)]


# all layers in one program (one compilation per model, not one per kernel shape)
_random_bits = compilation.jit(_random_bits_fn, static_argnums=1)


def magnitude(params: PyTree, *, prunable: masks_lib.Prunable) -> PyTree:
  """Magnitude scores |w| (float32) at the prunable leaves."""
  slots = trees.slots(params, prunable, who="magnitude")
  out = [jnp.abs(w).astype(jnp.float32) for w in trees.kernels(params, slots)]
  trees.check_finite(out, "magnitude")
  return trees.score_tree(params, out, slots)


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


def lamp(params: PyTree, *, prunable: masks_lib.Prunable) -> PyTree:
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
  slots = trees.slots(params, prunable, who="lamp")
  trees.check_finite_weights(params, slots, "lamp")
  out = [_lamp_layer_jit(w) for w in trees.kernels(params, slots)]
  trees.check_finite(out, "lamp")
  return trees.score_tree(params, out, slots)
