"""Tests for sparsejax.structured: channel/neuron pruning as weight masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import compact, effective, structured
from sparsejax import masks as masks_lib
from sparsejax.models import LeNet5, LeNet300100, ResNet18

SHAPE = (28, 28, 1)


@functools.lru_cache(maxsize=None)
def lenet5():
  model = LeNet5(channels=(4, 6), hidden=(12, 8))
  return model, model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))


def test_l1_removes_the_smallest_filters_per_layer():
  model, v = lenet5()
  m = structured.prune("channel/l1", key=jax.random.key(0), model=model, variables=v,
                       fraction=0.5, input_shape=SHAPE)
  for i, size in enumerate((4, 6)):
    k = np.asarray(v["params"][f"conv_{i}"]["kernel"])
    norms = np.abs(k).reshape(-1, size).sum(0)
    want = np.sort(np.argsort(norms)[size // 2:])
    kept = np.flatnonzero(np.asarray(m[f"conv_{i}"]["kernel"]).any((0, 1, 2)))
    np.testing.assert_array_equal(kept, want)
  # the filters and the readers' input slices of removed channels are masked, nothing else
  k1 = np.asarray(m["conv_1"]["kernel"])
  kept0 = np.asarray(m["conv_0"]["kernel"]).any((0, 1, 2))
  assert np.all(k1[:, :, ~kept0, :] == 0)
  kept1 = k1.any((0, 1, 2))
  d = np.asarray(m["dense_2"]["kernel"]).reshape(-1, 6, 12)
  assert np.all(d[:, ~kept1] == 0) and np.all(d[:, kept1])
  assert np.all(k1[:, :, kept0][..., kept1])


@pytest.mark.parametrize("name,quota", [("channel/l1", "uniform"), ("channel/random", "global"),
                                        ("neuron/magnitude", "uniform"),
                                        ("neuron/synflow", "global")])
def test_compacts_to_a_dense_smaller_network(name, quota):
  model, v = lenet5()
  m = structured.prune(name, key=jax.random.key(1), model=model, variables=v, fraction=0.5,
                       quota=quota, input_shape=SHAPE)
  new_model, new_v, new_m = compact.compact(model, v, m, input_shape=SHAPE, verify=True)
  assert all(bool(jnp.all(k)) for k in masks_lib.mask_leaves(new_m))  # dense
  kind = name.split("/")[0]
  sizes = [s.size for s in structured.spaces_of(model, v, kind)]
  new_sizes = [s.size for s in structured.spaces_of(new_model, new_v, kind)]
  if quota == "uniform":
    assert new_sizes == [n - round(0.5 * n) for n in sizes]
  else:
    assert sum(sizes) - sum(new_sizes) == round(0.5 * sum(sizes)) and min(new_sizes) >= 1
  # effective = direct for structured masks: the readers' slices are masked already
  assert effective.effective_compression(model, m, SHAPE) == pytest.approx(
      masks_lib.compression(m))


def test_neuron_magnitude_is_the_sum_over_in_and_out_weights():
  model = LeNet300100(hidden=(10, 6))
  v = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  sc = structured.channel_scores("neuron/magnitude", key=jax.random.key(0), model=model,
                                 variables=v)
  p = v["params"]
  for i in range(2):
    want = (np.abs(np.asarray(p[f"dense_{i}"]["kernel"])).sum(0)
            + np.abs(np.asarray(p[f"dense_{i + 1}"]["kernel"])).sum(1))
    np.testing.assert_allclose(sc[f"dense_{i}"], want, rtol=1e-5)


def test_bn_scale_keeps_the_largest_scales_and_residual_streams_as_groups():
  model = ResNet18(num_classes=3, widths=(4, 4, 4, 4))
  v = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  v = jax.tree.map(lambda a: a, v)
  g = np.array([3.0, 0.1, 2.0, 0.2], np.float32)
  v["params"]["stage0_norm"]["scale"] = jnp.asarray(g)
  sc = structured.channel_scores("channel/bn_scale", key=jax.random.key(0), model=model,
                                 variables=v)
  # stream 1 = the stem and both blocks' norm_2: 1 + 1 at init, plus the stem's
  np.testing.assert_allclose(sc["stream1"], g + 2.0)
  keep = structured.keep_from_scores(sc, 0.5, "uniform")
  np.testing.assert_array_equal(keep["stream1"], [0, 2])
  m = structured.masks_for(model, v, keep)
  new_model, _, _ = compact.compact(model, v, m, input_shape=(8, 8, 3), verify=True)
  assert new_model.widths == (2, 2, 2, 2)


def test_bad_input():
  model, v = lenet5()
  kw = dict(key=jax.random.key(0), model=model, variables=v, input_shape=SHAPE)
  with pytest.raises(ValueError, match="name="):
    structured.prune("channel/l2", fraction=0.5, **kw)
  with pytest.raises(ValueError, match="fraction="):
    structured.prune("channel/l1", fraction=1.0, **kw)
  with pytest.raises(ValueError, match="quota="):
    structured.prune("channel/l1", fraction=0.5, quota="erk", **kw)
  with pytest.raises(ValueError, match="batches="):
    structured.prune("channel/snip", fraction=0.5, **kw)
  mlp = LeNet300100(hidden=(10, 6))
  vm = mlp.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  with pytest.raises(ValueError, match="no channels"):
    structured.prune("channel/l1", key=jax.random.key(0), model=mlp, variables=vm,
                     fraction=0.5)
