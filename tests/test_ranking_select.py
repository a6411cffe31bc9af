"""Rankings by selection (sparsejax.selection) give the full sort's masks, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import masks, pruning, selection
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


def tied_scores(params, seed, levels, dtype):
  """Scores with only ``levels`` distinct values (1: all equal), signed zeros too."""
  rng = np.random.default_rng(seed)
  values = np.array([-0.0, 0.0, 1.5, -2.0, 3.0, 1e-3, -1e-30, 7.0])[: max(levels, 1)]

  def one(w):
    x = values[rng.integers(0, len(values), w.shape)]
    if jnp.issubdtype(dtype, jnp.integer):
      x = np.round(x * 100)
    return jnp.asarray(x, dtype)

  return masks.map_prunable(one, params)


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
@pytest.mark.parametrize("sort", ["select", "host", "device"])
def test_bfloat16_scores_rank_like_a_float64_reference(sort, quota):
  _, params, _ = TP.small("mlp")
  rng = np.random.default_rng(1)
  # Values between consecutive integers: a cast to int32 would tie them all.
  scores = masks.map_prunable(
    lambda w: jnp.asarray(rng.uniform(-3, 3, w.shape), jnp.bfloat16), params
  )
  ranking = pruning.rank_scores(scores, quota, sort=sort)
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
def test_selection_masks_equal_full_sort_masks(seed, levels, quota, name, dtype, fracs):
  _, params, _ = TP.small(name)
  scores = tied_scores(params, seed, levels, dtype)
  select = pruning.rank_scores(scores, quota)
  full = pruning.rank_scores(scores, quota, sort="host")
  assert select.selects and not full.selects
  total = select.total
  for k in [0, total, 1, total - 1] + [int(round(f * total)) for f in fracs]:
    assert_same_masks(pruning.masks_at(select, k), pruning.masks_at(full, k))
    np.testing.assert_array_equal(np.asarray(select.counts(k)), np.asarray(full.counts(k)))
  for s in (0.0, 0.5, 0.9):
    assert_same_masks(pruning.masks_from_ranking(select, s), pruning.masks_from_ranking(full, s))
  # The lazily computed arrays are the full sort's.
  for x, y in zip(
    jax.tree.leaves((select.order, select.ranks, select.cutoffs)),
    jax.tree.leaves((full.order, full.ranks, full.cutoffs)),
    strict=True,
  ):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("quota", [None, "igq"])
def test_traced_ranking_sorts_its_keys_in_the_program(quota):
  _, params, _ = TP.small("cnn")
  scores = tied_scores(params, 11, 3, jnp.float32)
  select = pruning.rank_scores(scores, quota)
  full = pruning.rank_scores(scores, quota, sort="host")
  assert len(jax.tree.leaves(select)) == (1 if quota else 2)  # the keys, no order
  traced = jax.jit(lambda r: (r.order, r.ranks, r.cutoffs))(select)
  for x, y in zip(
    jax.tree.leaves(traced), jax.tree.leaves((full.order, full.ranks, full.cutoffs)), strict=True
  ):
    np.testing.assert_array_equal(x, y)
  k = jnp.int32(select.total // 3)  # a traced count takes the sorted arrays
  assert_same_masks(jax.jit(pruning.masks_at)(select, k), pruning.masks_at(full, int(k)))


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(
  seed=st.integers(0, 2**20),
  levels=st.sampled_from([1, 2, 3, 8]),
  quota=st.sampled_from(QUOTAS),
  name=st.sampled_from(sorted(TP.SMALL)),
  frac=st.floats(0.0, 1.0),
)
def test_selection_search_equals_full_sort_search(seed, levels, quota, name, frac):
  model, params, input_shape = TP.small(name)
  scores = tied_scores(params, seed, levels, jnp.float32)
  select = pruning.rank_scores(scores, quota)
  full = pruning.rank_scores(scores, quota, sort="host")
  target = int(round(frac * select.total))
  got = pruning.effective_kept(model, select, target, input_shape, loop="host")
  want = pruning.effective_kept(model, full, target, input_shape, loop="host")
  assert got == want
  device = pruning.effective_kept(model, select, target, input_shape, loop="device")
  assert device == want


@pytest.mark.slow
def test_effective_masks_equal_on_lenet300100():
  from sparsejax import models

  model = models.create("lenet300100")
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 28, 28, 1)))["params"]
  for quota, s in ((None, 0.99), ("uniform", 0.999)):
    scores = TP.random_scores(params, 5, distinct=quota is None)  # uniform: many ties
    select = pruning.rank_scores(scores, quota)
    full = pruning.rank_scores(scores, quota, sort="host")
    kw = dict(model=model, input_shape=(28, 28, 1))
    assert_same_masks(
      pruning.masks_from_ranking(select, s, "effective", **kw),
      pruning.masks_from_ranking(full, s, "effective", **kw),
    )


def test_window_counts_and_quota_from_rankings():
  _, params, _ = TP.small("cnn")
  global_scores = tied_scores(params, 3, 3, jnp.float32)
  within_scores = tied_scores(params, 4, 2, jnp.float32)
  g_sel, g_full = (pruning.rank_scores(global_scores, sort=s) for s in ("select", "host"))
  total = g_sel.total
  ks = np.array([-5, 0, 1, 7, total // 2, total - 1, total, total + 9])
  want = np.stack([np.asarray(g_full.counts(int(np.clip(k, 0, total)))) for k in ks])
  np.testing.assert_array_equal(g_sel.window_counts(ks), want)
  # quota_from: counts from one global ranking, order within layers from another
  w_sel, w_full = (
    pruning.rank_scores(within_scores, "uniform", sort=s) for s in ("select", "host")
  )
  mixed_sel = pruning.Ranking(
    None,
    None,
    None,
    None,
    w_sel.shapes,
    w_sel.treedef,
    w_sel.slots,
    keys=w_sel.keys,
    count_keys=g_sel.count_keys,
  )
  mixed_full = pruning.Ranking(
    w_full.order, w_full.ranks, g_full.cutoffs, None, w_full.shapes, w_full.treedef, w_full.slots
  )
  for k in range(0, total + 1, 5):
    assert_same_masks(pruning.masks_at(mixed_sel, k), pruning.masks_at(mixed_full, k))


def test_selection_is_deterministic_whatever_was_asked_before():
  _, params, _ = TP.small("cnn")
  scores = tied_scores(params, 9, 2, jnp.float32)
  for quota in (None, "igq"):
    fresh = lambda: pruning.rank_scores(scores, quota)
    used = fresh()
    used.window_counts(np.arange(0, used.total, 3))  # grows the prefixes
    used.order_windows([0] * len(used.shapes), [5] * len(used.shapes))
    for k in (0, 3, used.total // 3, used.total):
      assert_same_masks(pruning.masks_at(used, k), pruning.masks_at(fresh(), k))


def test_threshold_and_top_edges():
  d = np.array([3, 1, 1, 2, 1, 0], np.uint32)
  assert selection.threshold(d, 0) == (0, 0)
  assert selection.threshold(d, 6) == (0xFFFFFFFF, 6)
  assert selection.threshold(d, 2) == (1, 2)  # 0 at 5, then the first tie (1 at 1)
  np.testing.assert_array_equal(selection.top(d, 4), [5, 1, 2, 4])
  np.testing.assert_array_equal(selection.mask_of(d, 1, 2), [0, 1, 0, 0, 0, 1])
  with pytest.raises(ValueError, match="c=7"):
    selection.threshold(d, 7)


def test_bad_sort():
  _, params, _ = TP.small("mlp")
  with pytest.raises(ValueError, match="sort='gpu'.*select"):
    pruning.rank_scores(TP.random_scores(params, 0), sort="gpu")


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
