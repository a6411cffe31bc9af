"""The round driver of iterative pruners (iterative SNIP, SynFlow): priorities from rounds.

An iterative pruner scores the alive weights, keeps the top k_t of them (exact top-k,
ties by position: :func:`sparsejax.selection.top_k`), and repeats with the next round's
kept count k_t (a geometric schedule from the initial density to 1 - s). It returns
int32 *priorities*: a permutation of 0..N-1 that encodes the elimination order, so that
the top k = round((1 - s) N) priorities are exactly the pruner's final mask and a
slightly larger k re-adds the last-eliminated weights first (the effective-sparsity
search walks along this order).

Elimination order, lowest priority first:
1. weights masked out by the initial ``masks``;
2. weights pruned in round 0, then round 1, ... (within a round by that round's score,
   ascending; equal scores: the higher flat position goes first);
3. the survivors, by their score on the final mask (one extra scoring pass).
Positions are flat row-major indices within a layer, layers in the params' tree order,
the tie-break of :func:`sparsejax.ranking.rank_scores` too.

Rounds are driven from Python, one jitted step each (XLA:CPU runs convolutions inside
``lax.while_loop``/``fori_loop`` bodies through a 10-20x slower path, jax-ml/jax#12868);
per-round statistics stay on the device until the end.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import selection
from sparsejax.scores import trees

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
  min_positive_score: smallest positive alive score (0: none).
  max_score: largest alive finite score.
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


def schedule(total: int, kept0: int, sparsity: float, rounds: int) -> np.ndarray:
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


def make_step(score_fn: Callable):
  """Jitted round t: scores of the alive weights, exact top-k, bookkeeping.

  ``score_fn(alive, *args) -> [scores per prunable leaf]``. state = (round_of, last):
  per kernel, the round in which a weight was pruned (_ALIVE while alive, _INITIAL if
  masked from the start) and its score in that round (the latest score while alive).
  Per-round statistics: int32 [zero, non-finite, ties split] and float32 [min
  positive, max, threshold] of the alive scores.
  """

  def step(args, state, t, k):
    round_of, last = state
    alive = [r == _ALIVE for r in round_of]
    s = [jnp.abs(si).astype(jnp.float32) for si in score_fn(alive, *args)]
    keys = [selection.device_keys(si) for si in s]
    keep, found = selection.top_k(keys, k, alive)
    keep = [kp.reshape(si.shape) for kp, si in zip(keep, s)]
    round_of = [jnp.where(a & ~kp, t, r) for r, a, kp in zip(round_of, alive, keep)]
    last = [jnp.where(a, si, l) for si, l, a in zip(s, last, alive)]
    finite = [a & jnp.isfinite(si) for si, a in zip(s, alive)]
    count = lambda xs: sum(jnp.sum(x, dtype=jnp.int32) for x in xs)
    ints = jnp.stack(
      [
        count(a & (si == 0) for si, a in zip(s, alive)),
        count(a & ~f for a, f in zip(alive, finite)),
        (found.ties > k - found.less).astype(jnp.int32),  # ties split by position
      ]
    )
    inf = jnp.float32(jnp.inf)
    smallest = min_all(jnp.where(f & (si > 0), si, inf) for si, f in zip(s, finite))
    # tau is the key of the k-th score: a non-negative float's bits complemented
    threshold = jax.lax.bitcast_convert_type(
      (found.tau ^ jnp.uint32(0x7FFFFFFF)).astype(jnp.uint32), jnp.float32
    )
    floats = jnp.stack(
      [
        jnp.where(jnp.isfinite(smallest), smallest, 0.0),
        max_all(jnp.where(f, si, 0.0) for si, f in zip(s, finite)),
        threshold,
      ]
    )
    return (round_of, last), (ints, floats)

  return jax.jit(step)


def min_all(xs) -> jax.Array:
  return jnp.min(jnp.stack([jnp.min(x) for x in xs]))


def max_all(xs) -> jax.Array:
  return jnp.max(jnp.stack([jnp.max(x) for x in xs]))


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


def iterate(
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
  """Runs ``rounds`` rounds of ``step`` (:func:`make_step`) plus the final scoring pass;
  the priority tree (module docstring), and with ``return_stats`` its
  :class:`RoundStats`."""
  kernels = trees.kernels(params, slots)
  total = int(sum(np.prod(w.shape) for w in kernels))
  if mask_leaves is None:
    round_of = [jnp.full(w.shape, _ALIVE, jnp.int32) for w in kernels]
    kept0 = total
  else:
    round_of = [jnp.where(m, _ALIVE, _INITIAL).astype(jnp.int32) for m in mask_leaves]
    kept0 = sum(int(jnp.sum(m)) for m in mask_leaves)
  kept_after = schedule(total, kept0, sparsity, rounds)
  state = (round_of, [jnp.zeros(w.shape, jnp.float32) for w in kernels])
  stats = []
  for t in range(rounds):
    state, st = step(args_for_round(t), state, jnp.int32(t), jnp.int32(kept_after[t]))
    stats.append(st)
  # One more scoring pass on the final mask, pruning nothing: the survivors are ordered
  # by their final scores, so weights the last round cut off from every path (score 0)
  # come first when fewer than the final count are kept.
  state, st = step(args_for_round(rounds), state, jnp.int32(rounds), jnp.int32(kept_after[-1]))
  stats.append(st)
  ints = np.asarray(jnp.stack([i for i, _ in stats]))
  floats = np.asarray(jnp.stack([f for _, f in stats]))
  bad = int(ints[:, 1].sum())
  if bad:
    first = int(np.argmax(ints[:, 1] > 0))
    raise ValueError(
      f"{who} computed {bad} NaN or infinite scores (first in round {first}); "
      "scores must be finite."
    )
  prio = trees.score_tree(params, _priorities(*state, rounds), slots)
  if not return_stats:
    return prio
  kept = np.concatenate([[kept0], kept_after]).astype(np.int64)
  return prio, RoundStats(
    kept=kept,
    target=np.concatenate([kept_after, kept_after[-1:]]),
    zero_kept=ints[:, 0].astype(np.int64),
    min_positive_score=floats[:, 0],
    max_score=floats[:, 1],
    threshold=floats[:, 2],
    ties_split=ints[:, 2].astype(bool),
  )
