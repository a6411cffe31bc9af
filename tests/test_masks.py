"""Masks: construction, counts, sparsity, validation, npz round trip."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import masks, models


@pytest.fixture(scope="module")
def params():
  return models.create("lenet5").init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"]


def test_prunable_leaves_are_kernels_only(params):
  m = masks.ones(params)
  assert m["conv_0"]["kernel"].dtype == bool and m["conv_0"]["bias"] is None
  assert m["norm_0"]["scale"] is None
  assert masks.prunable_paths(params) == [
    "conv_0/kernel",
    "conv_1/kernel",
    "dense_2/kernel",
    "dense_3/kernel",
    "dense_4/kernel",
  ]
  assert masks.count(m) == (61_770, 61_770)
  assert masks.direct_sparsity(m) == 0.0 and masks.compression(m) == 1.0


@settings(max_examples=20, deadline=None)
@given(sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 2**31 - 1))
def test_random_masks_have_exact_layer_counts(params, sparsity, seed):
  m = masks.random(jax.random.key(seed), params, sparsity)
  for leaf in masks.mask_leaves(m):
    assert int(leaf.sum()) == round((1 - sparsity) * leaf.size)


def test_random_masks_are_nested_and_deterministic(params):
  key = jax.random.key(3)
  a, b = masks.random(key, params, 0.9), masks.random(key, params, 0.99)
  for la, lb in zip(masks.mask_leaves(a), masks.mask_leaves(b)):
    assert not np.any(lb & ~la)
  c = masks.random(key, params, 0.9)
  for la, lc in zip(masks.mask_leaves(a), masks.mask_leaves(c)):
    np.testing.assert_array_equal(la, lc)


def test_per_layer_sparsities_and_report_order(params):
  sp = [0.0, 0.5, 0.9, 0.99, 0.5]
  m = masks.random(jax.random.key(0), params, sp)
  report = masks.layer_sparsities(m)
  assert list(report) == masks.prunable_paths(params)
  np.testing.assert_allclose(list(report.values()), sp, atol=1e-3)
  with pytest.raises(ValueError, match="sparsity has 2 entries"):
    masks.random(jax.random.key(0), params, [0.1, 0.2])


def test_apply_zeroes_exactly_the_masked_weights(params):
  m = masks.random(jax.random.key(1), params, 0.7)
  pruned = masks.apply(params, m)
  for w, p, k in zip(
    masks.mask_leaves(masks.map_prunable(lambda x: x, params)),
    masks.mask_leaves(masks.map_prunable(lambda x: x, pruned)),
    masks.mask_leaves(m),
  ):
    np.testing.assert_array_equal(np.asarray(p)[~np.asarray(k)], 0.0)
    np.testing.assert_array_equal(np.asarray(p)[np.asarray(k)], np.asarray(w)[np.asarray(k)])
  np.testing.assert_array_equal(pruned["conv_0"]["bias"], params["conv_0"]["bias"])


def test_compression_of_an_empty_mask_is_infinite(params):
  m = masks.map_masks(jnp.zeros_like, masks.ones(params))
  assert masks.direct_sparsity(m) == 1.0 and masks.compression(m) == math.inf


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(params, bad):
  with pytest.raises(ValueError, match=r"sparsity=.*outside the allowed range \[0, 1\)"):
    masks.random(jax.random.key(0), params, bad)


def test_validate_names_what_is_wrong(params):
  good = masks.ones(params)
  masks.validate(good, params)
  missing = dict(good)
  del missing["dense_4"]
  with pytest.raises(ValueError, match="missing.*dense_4"):
    masks.validate(missing, params)
  extra = dict(good, extra={"kernel": jnp.ones((2, 2), bool)})
  with pytest.raises(ValueError, match="unexpected.*extra"):
    masks.validate(extra, params)
  wrong_shape = jax.tree.map(lambda x: x, good, is_leaf=lambda x: x is None)
  wrong_shape["conv_0"] = dict(good["conv_0"], kernel=jnp.ones((3, 3), bool))
  with pytest.raises(ValueError, match=r"conv_0/kernel.*shape \(3, 3\)"):
    masks.validate(wrong_shape, params)
  as_float = masks.map_masks(lambda m: m.astype(jnp.float32), good)
  with pytest.raises(ValueError, match="dtype float32; masks must be bool"):
    masks.validate(as_float, params)
  on_bias = dict(good, conv_0=dict(good["conv_0"], bias=jnp.ones(6, bool)))
  with pytest.raises(ValueError, match="conv_0/bias.*must be None"):
    masks.validate(on_bias, params)


def test_npz_round_trip(params, tmp_path):
  m = masks.random(jax.random.key(5), params, 0.95)
  path = tmp_path / "sub" / "masks.npz"
  masks.save(path, m)
  with np.load(path) as data:
    assert sorted(data.files) == sorted(masks.prunable_paths(params))
  back = masks.load(path, params)
  for a, b in zip(masks.mask_leaves(m), masks.mask_leaves(back)):
    np.testing.assert_array_equal(a, b)
  assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp file


def test_load_rejects_foreign_masks(params, tmp_path):
  other = models.create("lenet300100").init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))["params"]
  path = tmp_path / "m.npz"
  masks.save(path, masks.ones(other))
  with pytest.raises(ValueError, match="not prunable kernels"):
    masks.load(path, params)


def test_apply_and_counts_refuse_masks_that_do_not_fit(params):
  good = masks.ones(params)
  # A (1, n) mask broadcasts against an (m, n) kernel: refused, not broadcast.
  row = dict(
    good,
    dense_2=dict(
      good["dense_2"], kernel=jnp.zeros((1,) + params["dense_2"]["kernel"].shape[1:], bool)
    ),
  )
  with pytest.raises(ValueError, match=r"masks\['dense_2/kernel'\] has shape"):
    masks.apply(params, row)
  with pytest.raises(ValueError, match=r"has shape"):
    masks.compression(row, params)
  half = masks.map_masks(lambda m: jnp.full(m.shape, 0.5, jnp.float32), good)
  for fn in (masks.compression, masks.count, masks.direct_sparsity, masks.layer_sparsities):
    with pytest.raises(ValueError, match="masks must be bool"):
      fn(half)
  with pytest.raises(ValueError, match="does not match the parameter tree"):
    masks.apply(params, {"conv_0": good["conv_0"]})
  assert masks.compression(good, params) == 1.0


def test_selector_chooses_leaves_by_rule_predicate_or_paths(params):
  assert masks.prunable_paths(params, lambda p: p.startswith("dense")) == [
    "dense_2/kernel",
    "dense_3/kernel",
    "dense_4/kernel",
  ]
  assert masks.prunable_paths(params, {"conv_1/kernel", "dense_4/kernel"}) == [
    "conv_1/kernel",
    "dense_4/kernel",
  ]
  m = masks.ones(params, lambda p: p != "conv_0/kernel")
  assert m["conv_0"]["kernel"] is None and masks.count(m)[1] == 61_770 - 450
  masks.validate(m, params)  # a None at a kernel: that kernel is not pruned
  with pytest.raises(ValueError, match=r"masks\['conv_0/kernel'\]=None: expected a bool"):
    masks.validate(m, params, prunable=None or masks.prunable_paths(params))
  for bad in (3, "conv_0/kernel", [1, 2]):
    with pytest.raises(ValueError, match="prunable=.* must be None"):
      masks.ones(params, bad)
  r = masks.random(jax.random.key(0), params, 0.5, prunable={"dense_2/kernel"})
  assert masks.count(r) == (24_000, 48_000)
