"""Masks: construction, counts, sparsity, validation, npz round trip."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsejax
from sparsejax import effective, masks, models

LENET5 = ["conv_0/kernel", "conv_1/kernel", "dense_2/kernel", "dense_3/kernel", "dense_4/kernel"]


@pytest.fixture(scope="module")
def traced():
  model = models.create("lenet5")
  variables = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
  return sparsejax.trace(model, (32, 32, 3), variables=variables), variables


@pytest.fixture(scope="module")
def params(traced):
  return traced[1]["params"]


@pytest.fixture(scope="module")
def dense(traced):
  return traced[0].ones()


def test_prunable_leaves_are_the_linear_op_weights(traced, params, dense):
  m = dense
  assert m["conv_0"]["kernel"].dtype == bool and m["conv_0"]["bias"] is None
  assert m["norm_0"]["scale"] is None
  assert traced[0].prunable_paths == LENET5 == masks.paths(m)
  assert masks.count(m) == (61_770, 61_770)
  same = masks.ones(params, LENET5)  # without the model: the set as paths
  assert jax.tree.structure(same, is_leaf=lambda x: x is None) == jax.tree.structure(
    m, is_leaf=lambda x: x is None
  )
  assert masks.direct_sparsity(m) == 0.0 and masks.compression(m) == 1.0


@settings(max_examples=20, deadline=None)
@given(sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 2**31 - 1))
def test_random_masks_have_exact_layer_counts(dense, sparsity, seed):
  m = masks.random(jax.random.key(seed), dense, sparsity)
  for leaf in masks.mask_leaves(m):
    assert int(leaf.sum()) == round((1 - sparsity) * leaf.size)


def test_random_masks_are_nested_and_deterministic(dense):
  key = jax.random.key(3)
  a, b = masks.random(key, dense, 0.9), masks.random(key, dense, 0.99)
  for la, lb in zip(masks.mask_leaves(a), masks.mask_leaves(b)):
    assert not np.any(lb & ~la)
  c = masks.random(key, dense, 0.9)
  for la, lc in zip(masks.mask_leaves(a), masks.mask_leaves(c)):
    np.testing.assert_array_equal(la, lc)


def test_per_layer_sparsities_and_report_order(dense):
  sp = [0.0, 0.5, 0.9, 0.99, 0.5]
  m = masks.random(jax.random.key(0), dense, sp)
  report = masks.layer_sparsities(m)
  assert list(report) == LENET5
  np.testing.assert_allclose(list(report.values()), sp, atol=1e-3)
  with pytest.raises(ValueError, match="sparsity has 2 entries"):
    masks.random(jax.random.key(0), dense, [0.1, 0.2])


def test_apply_zeroes_exactly_the_masked_weights(params, dense):
  m = masks.random(jax.random.key(1), dense, 0.7)
  pruned = masks.apply(params, m)
  for w, p, k in zip(
    masks.mask_leaves(masks.map_prunable(lambda x: x, params, prunable=LENET5)),
    masks.mask_leaves(masks.map_prunable(lambda x: x, pruned, prunable=LENET5)),
    masks.mask_leaves(m),
  ):
    np.testing.assert_array_equal(np.asarray(p)[~np.asarray(k)], 0.0)
    np.testing.assert_array_equal(np.asarray(p)[np.asarray(k)], np.asarray(w)[np.asarray(k)])
  np.testing.assert_array_equal(pruned["conv_0"]["bias"], params["conv_0"]["bias"])


def test_compression_of_an_empty_mask_is_infinite(dense):
  m = masks.map_masks(jnp.zeros_like, dense)
  assert masks.direct_sparsity(m) == 1.0 and masks.compression(m) == math.inf


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(dense, bad):
  with pytest.raises(ValueError, match=r"sparsity=.*outside the allowed range \[0, 1\)"):
    masks.random(jax.random.key(0), dense, bad)


def test_validate_names_what_is_wrong(traced, params, dense):
  good = dense
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
    masks.validate(on_bias, params, prunable=LENET5)
  # With the model, a mask on a weight that is no linear op's is refused by name.
  with pytest.raises(ValueError, match=r"conv_0/bias.*enter no linear op"):
    effective.effective_masks(traced[0], on_bias)


def test_npz_round_trip(params, dense, tmp_path):
  m = masks.random(jax.random.key(5), dense, 0.95)
  path = tmp_path / "sub" / "masks.npz"
  masks.save(path, m)
  with np.load(path) as data:
    assert sorted(data.files) == sorted(LENET5)
  back = masks.load(path, params)
  for a, b in zip(masks.mask_leaves(m), masks.mask_leaves(back)):
    np.testing.assert_array_equal(a, b)
  assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp file


def test_load_rejects_foreign_masks(params, tmp_path):
  other = sparsejax.trace(models.create("lenet300100"), (28, 28, 1))
  path = tmp_path / "m.npz"
  masks.save(path, other.ones())
  with pytest.raises(ValueError, match="not prunable kernels"):
    masks.load(path, params)


def test_apply_and_counts_refuse_masks_that_do_not_fit(params, dense):
  good = dense
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


def test_the_prunable_set_is_the_traced_rule_or_paths(traced, params):
  model = models.create("lenet5")
  narrowed = sparsejax.trace(model, (32, 32, 3), prunable=lambda p: p.startswith("dense"))
  assert narrowed.prunable_paths == ["dense_2/kernel", "dense_3/kernel", "dense_4/kernel"]
  assert masks.paths(masks.ones(params, {"conv_1/kernel", "dense_4/kernel"})) == [
    "conv_1/kernel",
    "dense_4/kernel",
  ]
  m = masks.ones(params, [p for p in LENET5 if p != "conv_0/kernel"])
  assert m["conv_0"]["kernel"] is None and masks.count(m)[1] == 61_770 - 450
  masks.validate(m, params)  # a None at a kernel: that kernel is not pruned
  with pytest.raises(ValueError, match=r"masks\['conv_0/kernel'\]=None: expected a bool"):
    masks.validate(m, params, prunable=LENET5)
  # The mask tree is the prunable set: effective sparsity counts its leaves only.
  assert effective.effective_compression(traced[0], m) == 1.0
  for bad in (None, lambda p: True):  # no rule without a model
    with pytest.raises(ValueError, match=r"sparsejax.trace\(model, input_shape\).prunable_paths"):
      masks.ones(params, bad)
  for bad in (3, "conv_0/kernel", [1, 2]):
    with pytest.raises(ValueError, match="prunable=.* must be a collection of '/'-joined"):
      masks.ones(params, bad)
  with pytest.raises(ValueError, match="not leaves of params"):
    masks.ones(params, {"conv_9/kernel"})
  r = masks.random(jax.random.key(0), masks.ones(params, {"dense_2/kernel"}), 0.5)
  assert masks.count(r) == (24_000, 48_000)
