"""Rankings, nested masks and the effective-target search against a brute-force scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsejax
from sparsejax import effective, masks, models, pruning, quotas, search
from tests import reference_graph as R

SMALL = {
  "mlp": (((("dense", 8), ("dense", 6), ("dense", 3)), (5,))),
  "cnn": (
    (
      ("conv", 3, 3, 1, "SAME"),
      ("conv", 4, 3, 2, "SAME"),
      ("pool", "max", 2, 2),
      ("flatten",),
      ("dense", 3),
    ),
    (6, 6, 2),
  ),
}


@functools.cache
def small(name):
  spec, input_shape = SMALL[name]
  model = R.make_model(spec)
  params = R.param_shapes(model, input_shape)
  return model, params, input_shape


def dense(name):
  """The dense mask of SMALL[name] (its traced prunable set)."""
  model, _, input_shape = small(name)
  return sparsejax.trace(model, input_shape).ones()


def random_scores(like, seed, distinct=True):
  """Scores at the leaves of the mask tree ``like`` (e.g. :func:`dense`)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  if distinct:
    return masks.map_masks(lambda m: jax.random.uniform(next(keys), m.shape), like)
  # Few distinct values: many ties.
  return masks.map_masks(
    lambda m: jax.random.randint(next(keys), m.shape, 0, 3).astype(jnp.float32), like
  )


@functools.cache
def _all_counts(model, input_shape):
  sweep = effective.connectivity_sweep(model, input_shape, units=False)

  def active(masks_k):
    return sum(jnp.sum(m, dtype=jnp.int32) for m in masks.mask_leaves(sweep(masks_k).masks))

  @jax.jit
  def scan(ranking):
    ks = jnp.arange(ranking.total + 1)
    return jax.vmap(lambda k: active(pruning.masks_at(ranking, k)))(ks)

  return scan


def brute_force(model, ranking, target, input_shape):
  """E(k) for every k, and the largest k with E(k) <= target."""
  e = np.asarray(_all_counts(model, tuple(input_shape))(ranking))
  assert np.all(np.diff(e) >= 0), "E(k) must be monotone for nested masks"
  return int(np.nonzero(e <= target)[0].max()), e


def test_ties_are_broken_by_position():
  scores = masks.map_masks(lambda m: jnp.ones(m.shape), dense("mlp"))
  ranking = pruning.rank_scores(scores)
  kept = masks.mask_leaves(pruning.masks_at(ranking, 45))
  first = np.asarray(kept[0]).reshape(-1)
  assert first.sum() == 40 and first.all()  # layer 0 (5x8) first, row-major
  assert np.asarray(kept[1]).reshape(-1)[:5].all() and np.asarray(kept[1]).sum() == 5


def reference_order(values) -> np.ndarray:
  """Brute force: flat positions by descending value (compared in float64, -0.0 == 0.0),
  ties by position."""
  v = np.asarray(values, np.float64).reshape(-1)
  return np.lexsort((np.arange(v.size), -v)).astype(np.int32)


@settings(max_examples=15, deadline=None)
@given(
  seed=st.integers(0, 2**20),
  ties=st.booleans(),
  quota=st.sampled_from([None, "igq"]),
  integer=st.booleans(),
)
def test_orders_equal_a_brute_force_sort(seed, ties, quota, integer):
  scores = random_scores(dense("cnn"), seed, distinct=not ties)
  if integer:
    scores = masks.map_masks(lambda s: (s * 1000).astype(jnp.int32) - 500, scores)
  else:  # signed zeros and negatives sort as numbers
    scores = masks.map_masks(lambda s: jnp.where(s > 1.5, -0.0, s - 0.5), scores)
  ranking = pruning.rank_scores(scores, quota)
  values = [np.asarray(s) for s in masks.mask_leaves(scores)]
  for l, v in enumerate(values):
    want = reference_order(v)
    np.testing.assert_array_equal(np.asarray(ranking.order[l]), want)
    np.testing.assert_array_equal(np.asarray(ranking.ranks[l])[want], np.arange(v.size))
  if quota is None:
    flat = reference_order(np.concatenate([v.reshape(-1) for v in values]))
    ranks = np.empty(flat.size, np.int64)
    ranks[flat] = np.arange(flat.size)
    offsets = np.cumsum([0] + [v.size for v in values])
    for l in range(len(values)):
      np.testing.assert_array_equal(
        np.asarray(ranking.cutoffs[l]), np.sort(ranks[offsets[l] : offsets[l + 1]])
      )


def test_integer_scores_rank_exactly():
  like = dense("mlp")
  shapes = [m.shape for m in masks.mask_leaves(like)]
  n = [int(np.prod(s)) for s in shapes]
  big = 2**30  # beyond float32's exact integers
  starts = np.cumsum([0] + n[:-1])
  it = iter(
    [
      jnp.arange(big + a, big + a + k, dtype=jnp.int32).reshape(s)
      for a, k, s in zip(starts, n, shapes)
    ]
  )
  ranking = pruning.rank_scores(masks.map_masks(lambda m: next(it), like))
  last = masks.mask_leaves(pruning.masks_at(ranking, 1))
  assert np.asarray(last[-1]).reshape(-1)[-1] and sum(int(m.sum()) for m in last) == 1


@pytest.mark.parametrize("quota", [None, "uniform", "igq", "erk"])
def test_masks_are_nested_with_exact_counts(quota):
  ranking = pruning.rank_scores(random_scores(dense("mlp"), 0), quota)
  prev = None
  for k in range(0, ranking.total + 1, 7):
    leaves = [np.asarray(m) for m in masks.mask_leaves(pruning.masks_at(ranking, k))]
    counts = [int(m.sum()) for m in leaves]
    if quota is None:
      assert sum(counts) == k
    else:
      want = quotas.layer_kept_counts(quota, k / ranking.total, ranking.shapes)
      assert counts == [int(c) for c in want]
    if prev is not None:
      assert all(not np.any(p & ~m) for p, m in zip(prev, leaves))
    prev = leaves


def test_direct_masks_hit_the_count():
  model = models.create("lenet300100")
  scores = random_scores(sparsejax.trace(model, (28, 28, 1)).ones(), 1)
  for s in (0.5, 0.99, 0.999):
    m = pruning.masks_from_ranking(pruning.rank_scores(scores), s)
    assert masks.count(m)[0] == round((1 - s) * 266_200)
    m = pruning.masks_from_ranking(pruning.rank_scores(scores, "igq"), s)
    assert abs(masks.count(m)[0] - round((1 - s) * 266_200)) <= 3


@settings(max_examples=25, deadline=None)
@given(
  name=st.sampled_from(sorted(SMALL)),
  quota=st.sampled_from([None, "uniform", "igq"]),
  seed=st.integers(0, 2**20),
  ties=st.booleans(),
  frac=st.floats(0.0, 1.0),
)
def test_search_equals_brute_force(name, quota, seed, ties, frac):
  model, _, input_shape = small(name)
  ranking = pruning.rank_scores(random_scores(dense(name), seed, distinct=not ties), quota)
  target = int(round(frac * ranking.total))
  want, e = brute_force(model, ranking, target, input_shape)
  traced = sparsejax.trace(model, input_shape)
  got = {}
  for loop in ("host", "device"):
    k, ek, sweeps = search.effective_kept(ranking, target, traced, loop=loop)
    assert (k, ek) == (want, int(e[want])), loop
    got[loop] = sweeps
  assert got["host"] == got["device"]  # one loop: the same steps on either side


def test_search_on_lenet300100_hits_the_target_closely():
  model = models.create("lenet300100")
  traced = sparsejax.trace(model, (28, 28, 1))
  sweep = jax.jit(effective.connectivity_sweep(traced, units=False))
  for quota in (None, "uniform", "igq"):
    ranking = pruning.rank_scores(random_scores(traced.ones(), 2), quota)
    for compression in (10, 100):
      target = pruning.kept_for_sparsity(1 - 1 / compression, ranking.total)
      k, e, _ = search.effective_kept(ranking, target, traced)
      count = lambda kk: int(
        sum(m.sum() for m in masks.mask_leaves(sweep(pruning.masks_at(ranking, kk)).masks))
      )
      assert count(k) == e <= target < count(k + 1)
      assert e >= 0.99 * target  # effective compression within 1% of the target
      assert k >= target  # effective pruning keeps more weights than direct


def test_unreachable_target_names_the_largest_reachable():
  model, _, input_shape = small("mlp")
  ranking = pruning.rank_scores(random_scores(dense("mlp"), 3))
  with pytest.raises(
    ValueError,
    match=r"cannot be reached.*largest reachable effective "
    r"sparsity is 0\.\d+",
  ):
    pruning.masks_from_ranking(ranking, 0.999, "effective", model=model, input_shape=input_shape)


def test_bad_arguments():
  model, _, input_shape = small("mlp")
  ranking = pruning.rank_scores(random_scores(dense("mlp"), 0))
  with pytest.raises(ValueError, match="pruning_type='both'"):
    pruning.masks_from_ranking(ranking, 0.5, "both")
  with pytest.raises(ValueError, match="sparsity=1.5"):
    pruning.masks_from_ranking(ranking, 1.5)
  with pytest.raises(ValueError, match="needs model= and input_shape="):
    pruning.masks_from_ranking(ranking, 0.5, "effective")
  with pytest.raises(ValueError, match="loop='gpu'"):
    search.effective_kept(ranking, 10, sparsejax.trace(model, input_shape), loop="gpu")
  nan = masks.map_masks(lambda m: jnp.full(m.shape, jnp.nan), dense("mlp"))
  with pytest.raises(ValueError, match="NaN or infinite"):
    pruning.rank_scores(nan)
