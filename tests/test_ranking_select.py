"""Rankings by selection (sparsejax.selection) against a brute-force sort, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsejax
from sparsejax import masks, pruning, quotas, search, selection
from tests import test_pruning as TP

QUOTAS = [None, "uniform", "erk", "igq"]


def leaves(tree):
  return [np.asarray(m) for m in masks.mask_leaves(tree)]


def assert_same_masks(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def reference_order(values: np.ndarray) -> np.ndarray:
  """Descending value (compared in float64), ties by position."""
  v = np.asarray(values, np.float64).reshape(-1)
  return np.lexsort((np.arange(v.size), -v)).astype(np.int32)


def tied_scores(like, seed, levels, dtype):
  """Scores at the leaves of the mask tree ``like`` with only ``levels`` distinct values
  (1: all equal), signed zeros too."""
  rng = np.random.default_rng(seed)
  values = np.array([-0.0, 0.0, 1.5, -2.0, 3.0, 1e-3, -1e-30, 7.0])[: max(levels, 1)]

  def one(w):
    x = values[rng.integers(0, len(values), w.shape)]
    if jnp.issubdtype(dtype, jnp.integer):
      x = np.round(x * 100)
    return jnp.asarray(x, dtype)

  return masks.map_masks(one, like)


def reference_masks(scores, quota, k):
  """Brute force: the mask keeping k weights along the scores (descending value in
  float64, ties by position), per layer by the quota's counts or globally."""
  values = [np.asarray(s).astype(np.float64).reshape(-1) for s in masks.mask_leaves(scores)]
  sizes = [v.size for v in values]
  if quota is None:
    order = reference_order(np.concatenate(values))[:k]
    flat = np.zeros(sum(sizes), bool)
    flat[order] = True
    return np.split(flat, np.cumsum(sizes)[:-1])
  counts = np.asarray(reference_counts(quota, k, [m.shape for m in masks.mask_leaves(scores)]))
  kept = []
  for v, c in zip(values, counts):
    m = np.zeros(v.size, bool)
    m[reference_order(v)[:c]] = True
    kept.append(m)
  return kept


def reference_counts(quota, k, shapes):
  total = sum(int(np.prod(s)) for s in shapes)
  return quotas.layer_kept_counts(quota, np.float32(k) / np.float32(total), shapes)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_keys_order_like_float64(dtype):
  rng = np.random.default_rng(0)
  x = np.concatenate(
    [
      rng.normal(size=500) * 10.0 ** rng.integers(-3, 4, 500),
      [0.0, -0.0, 1.0, 1.0, -1.0, 65000.0, -65000.0],
    ]
  )
  x = np.asarray(jnp.asarray(x, dtype))  # rounded to dtype: many ties in bfloat16
  order = selection.full_order(selection.descending_keys(x))
  np.testing.assert_array_equal(order, reference_order(x.astype(np.float32)))


@pytest.mark.parametrize("quota", [None, "igq"])
def test_bfloat16_scores_rank_like_a_float64_reference(quota):
  rng = np.random.default_rng(1)
  # Values between consecutive integers: a cast to int32 would tie them all.
  scores = masks.map_masks(
    lambda m: jnp.asarray(rng.uniform(-3, 3, m.shape), jnp.bfloat16), TP.dense("mlp")
  )
  ranking = pruning.rank_scores(scores, quota)
  values = [np.asarray(s).astype(np.float64) for s in masks.mask_leaves(scores)]
  if quota is None:
    flat = reference_order(np.concatenate([v.reshape(-1) for v in values]))
    offsets = np.cumsum([0] + [v.size for v in values])
    for l in range(len(values)):
      mine = flat[(flat >= offsets[l]) & (flat < offsets[l + 1])] - offsets[l]
      np.testing.assert_array_equal(np.asarray(ranking.order[l]), mine)
      ranks = np.empty(flat.size, np.int32)
      ranks[flat] = np.arange(flat.size)
      np.testing.assert_array_equal(
        np.asarray(ranking.cutoffs[l]), np.sort(ranks[offsets[l] : offsets[l + 1]])
      )
  else:
    for l, v in enumerate(values):
      np.testing.assert_array_equal(np.asarray(ranking.order[l]), reference_order(v))


@settings(max_examples=30, deadline=None)
@given(
  seed=st.integers(0, 2**20),
  levels=st.integers(1, 8),
  quota=st.sampled_from(QUOTAS),
  name=st.sampled_from(sorted(TP.SMALL)),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.int32]),
  fracs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
)
def test_selection_masks_equal_a_brute_force(seed, levels, quota, name, dtype, fracs):
  scores = tied_scores(TP.dense(name), seed, levels, dtype)
  ranking = pruning.rank_scores(scores, quota)
  assert ranking.concrete
  total = ranking.total
  for k in [0, total, 1, total - 1] + [int(round(f * total)) for f in fracs]:
    want = reference_masks(scores, quota, k)
    got = [m.reshape(-1) for m in leaves(pruning.masks_at(ranking, k))]
    for x, y in zip(got, want, strict=True):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(np.asarray(ranking.counts(k)), [int(m.sum()) for m in want])
  for s in (0.0, 0.5, 0.9):
    want = reference_masks(scores, quota, pruning.kept_for_sparsity(s, total))
    for x, y in zip(leaves(pruning.masks_from_ranking(ranking, s)), want, strict=True):
      np.testing.assert_array_equal(x.reshape(-1), y)


@pytest.mark.parametrize("quota", [None, "igq"])
def test_traced_ranking_sorts_its_keys_in_the_program(quota):
  scores = tied_scores(TP.dense("cnn"), 11, 3, jnp.float32)
  select = pruning.rank_scores(scores, quota)
  assert len(jax.tree.leaves(select)) == (1 if quota else 2)  # the keys, no order
  traced = jax.jit(lambda r: (r.order, r.ranks, r.cutoffs))(select)
  host = pruning.rank_scores(scores, quota)  # its arrays: tests/test_pruning.py's brute force
  for x, y in zip(
    jax.tree.leaves(traced), jax.tree.leaves((host.order, host.ranks, host.cutoffs)), strict=True
  ):
    np.testing.assert_array_equal(x, y)
  k = jnp.int32(select.total // 3)  # a traced count takes the sorted arrays
  got = leaves(jax.jit(pruning.masks_at)(select, k))
  for x, y in zip(got, reference_masks(scores, quota, int(k)), strict=True):
    np.testing.assert_array_equal(x.reshape(-1), y)


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(
  seed=st.integers(0, 2**20),
  levels=st.sampled_from([1, 2, 3, 8]),
  quota=st.sampled_from(QUOTAS),
  name=st.sampled_from(sorted(TP.SMALL)),
  frac=st.floats(0.0, 1.0),
)
def test_search_on_tied_scores_equals_a_brute_force(seed, levels, quota, name, frac):
  model, _, input_shape = TP.small(name)
  scores = tied_scores(TP.dense(name), seed, levels, jnp.float32)
  ranking = pruning.rank_scores(scores, quota)
  target = int(round(frac * ranking.total))
  traced = sparsejax.trace(model, input_shape)
  host = search.effective_kept(ranking, target, traced, loop="host")
  want, e = TP.brute_force(model, ranking, target, input_shape)
  assert host[:2] == (want, int(e[want]))
  device = search.effective_kept(ranking, target, traced, loop="device")
  assert device == host


# The tied-scores search above checks both loops against a brute force by default.
@pytest.mark.exhaustive
def test_effective_masks_of_the_host_and_device_loops_are_equal_on_lenet300100():
  from sparsejax import models

  traced = sparsejax.trace(models.create("lenet300100"), (28, 28, 1))
  for quota, s in ((None, 0.99), ("uniform", 0.999)):
    scores = TP.random_scores(traced.ones(), 5, distinct=quota is None)  # uniform: many ties
    ranking = pruning.rank_scores(scores, quota)
    assert_same_masks(
      pruning.masks_from_ranking(ranking, s, "effective", model=traced, loop="host"),
      pruning.masks_from_ranking(ranking, s, "effective", model=traced, loop="device"),
    )


def test_window_counts_and_quota_from_rankings():
  like = TP.dense("cnn")
  global_scores = tied_scores(like, 3, 3, jnp.float32)
  within_scores = tied_scores(like, 4, 2, jnp.float32)
  g = pruning.rank_scores(global_scores)
  total = g.total
  ks = np.array([-5, 0, 1, 7, total // 2, total - 1, total, total + 9])
  want = np.stack(
    [[m.sum() for m in reference_masks(global_scores, None, int(np.clip(k, 0, total)))] for k in ks]
  )
  np.testing.assert_array_equal(g.window_counts(ks), want)
  # quota_from: counts from one global ranking, order within layers from another
  mixed = pruning.rank_scores(within_scores, "uniform").with_counts_from(g)
  within = [np.asarray(s).astype(np.float64).reshape(-1) for s in leaves(within_scores)]
  for k in range(0, total + 1, 5):
    counts = [int(m.sum()) for m in reference_masks(global_scores, None, k)]
    for m, v, c in zip(leaves(pruning.masks_at(mixed, k)), within, counts, strict=True):
      want = np.zeros(v.size, bool)
      want[reference_order(v)[:c]] = True
      np.testing.assert_array_equal(m.reshape(-1), want)


def test_selection_is_deterministic_whatever_was_asked_before():
  scores = tied_scores(TP.dense("cnn"), 9, 2, jnp.float32)
  for quota in (None, "igq"):
    fresh = lambda: pruning.rank_scores(scores, quota)
    used = fresh()
    used.window_counts(np.arange(0, used.total, 3))  # grows the prefixes
    used.order_windows([0] * len(used.shapes), [5] * len(used.shapes))
    for k in (0, 3, used.total // 3, used.total):
      assert_same_masks(pruning.masks_at(used, k), pruning.masks_at(fresh(), k))


def test_threshold_and_prefix_edges():
  d = np.array([3, 1, 1, 2, 1, 0], np.uint32)
  assert selection.threshold(d, 0) == (0, 0)
  assert selection.threshold(d, 6) == (0xFFFFFFFF, 6)
  assert selection.threshold(d, 2) == (1, 2)  # 0 at 5, then the first tie (1 at 1)
  prefix = selection.Prefix(d)
  np.testing.assert_array_equal(prefix.order(4)[:4], [5, 1, 2, 4])
  assert prefix.threshold(2) == (1, 2)
  with pytest.raises(ValueError, match="c=7"):
    selection.threshold(d, 7)


#: Array sizes of the top-k examples: a few fixed sets, so the jitted select compiles
#: once per set rather than once per example (one entry, several with one of size 1, two).
TOP_K_SIZES = ((1,), (7, 1, 33), (20, 40))


@settings(max_examples=40, deadline=None)
@given(
  sizes=st.sampled_from(TOP_K_SIZES),
  levels=st.integers(1, 7),
  seed=st.integers(0, 2**20),
  frac=st.floats(0.0, 1.0),
)
def test_top_k_in_a_program_equals_a_brute_force(sizes, levels, seed, frac):
  """selection.top_k (the radix select of iterative pruners and dynamic updates) keeps
  the best k alive keys over all arrays, ties by position."""
  rng = np.random.default_rng(seed)
  values = np.array([0.0, -0.0, 1.5, 3.0, 7.0, -2.0, 1e-30], np.float32)[:levels]
  scores = [values[rng.integers(0, levels, n)] for n in sizes]
  alive = [rng.random(n) < 0.7 for n in sizes]
  flat, flat_alive = np.concatenate(scores), np.concatenate(alive)
  order = [i for i in reference_order(flat) if flat_alive[i]]
  k = int(round(frac * len(order)))
  want = np.zeros(flat.size, bool)
  want[order[:k]] = True
  keys = [jnp.asarray(selection.descending_keys(x)) for x in scores]
  top = jax.jit(lambda ks, k, al: selection.top_k(ks, k, al)[0])
  got = top(keys, jnp.int32(k), [jnp.asarray(a) for a in alive])
  np.testing.assert_array_equal(np.concatenate([np.asarray(g) for g in got]), want)


def test_exact_keys_of_float64_scores():
  x = np.array([1.0, 1.0 + 2**-40, -0.0, 0.0, -3.0, 1e300])
  np.testing.assert_array_equal(
    selection.full_order(selection.descending_keys(x)), reference_order(x)
  )
  assert selection.descending_keys(x).dtype == np.uint64


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32])
def test_device_keys_equal_host_keys_subnormals_and_signed_zeros(dtype):
  tiny = float(jnp.finfo(jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32).tiny)
  x = np.array([0.0, -0.0, tiny / 4, -tiny / 4, tiny / 2, 1.0, -1.0, 3e4, -3e4, 2.5])
  leaf = jnp.asarray(x * (1e4 if dtype == jnp.int32 else 1.0), dtype)
  got, bad = selection.flat_keys([leaf, leaf[::-1]])
  want = np.concatenate(
    [selection.descending_keys(np.asarray(leaf)), selection.descending_keys(np.asarray(leaf[::-1]))]
  )
  np.testing.assert_array_equal(np.asarray(got), want)
  assert list(bad) == [0, 0]
  if dtype in (jnp.float32, jnp.bfloat16):  # subnormals stay apart, signed zeros tie
    keys = want[: x.size]
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3], keys[4]}) == 4
