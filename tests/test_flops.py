"""Tests for sparsejax.flops against hand-computed counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import sparsejax
from sparsejax import effective, flops, models
from sparsejax import masks as masks_lib
from tests import reference_graph as ref


def test_lenet300100_counts():
  model = models.create("lenet300100")
  v = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
  dense = flops.costs(model, None, (28, 28, 1))
  assert [c.flops_dense for c in dense.values()] == [
    2 * 784 * 300,
    2 * 300 * 100,
    2 * 100 * 10,
    2 * 266200,
  ]
  assert dense["total"].params_effective == 266200
  assert dense["total"].bytes_dense == 4 * 266200
  m = masks_lib.random(
    jax.random.key(1), sparsejax.trace(model, (28, 28, 1), variables=v).ones(), 0.99
  )
  c = flops.costs(model, m, (28, 28, 1))
  eff = effective.effective_masks(model, m, (28, 28, 1))
  for i in range(3):
    k = f"dense_{i}"
    assert c[k].flops_direct == 2 * int(m[k]["kernel"].sum())
    assert c[k].params_effective == int(eff[k]["kernel"].sum())
    assert c[k].flops_effective == 2 * c[k].params_effective  # one position
  assert c["total"].params_direct == masks_lib.count(m)[0]


def _tiny(spec, shape):
  model = ref.make_model(spec)
  v = model.init(jax.random.key(0), jnp.ones((1,) + shape))
  return model, v


def test_same_conv_padding_taps_cost_nothing_effectively():
  """3x3 'SAME' conv on 3x3: tap (dh, dw) reads a real pixel at (3 - |dh - 1|) x
  (3 - |dw - 1|) of the 9 positions, 49 in all per (in, out) pair."""
  model, v = _tiny((("conv", 2, 3, 1, "SAME"), ("flatten",), ("dense", 3)), (3, 3, 1))
  c = flops.costs(model, sparsejax.trace(model, (3, 3, 1), variables=v).ones(), (3, 3, 1))
  conv, dense = c["op00_conv"], c["op02_dense"]
  assert conv.positions == 9 and dense.positions == 1
  assert (conv.flops_dense, conv.flops_direct, conv.flops_effective) == (324, 324, 2 * 49 * 2)
  assert (dense.flops_dense, dense.flops_effective) == (2 * 18 * 3, 2 * 18 * 3)
  assert c["total"].flops_effective == 196 + 108


def test_valid_conv_with_a_dead_channel():
  model, v = _tiny((("conv", 2, 3, 1, "VALID"), ("flatten",), ("dense", 3)), (5, 5, 1))
  m = sparsejax.trace(model, (5, 5, 1), variables=v).ones()
  m["op00_conv"]["kernel"] = m["op00_conv"]["kernel"].at[..., 1].set(False)
  c = flops.costs(model, m, (5, 5, 1))
  conv, dense = c["op00_conv"], c["op02_dense"]
  assert (conv.flops_dense, conv.flops_direct, conv.flops_effective) == (324, 162, 162)
  # the Dense rows reading channel 1 (every other input feature) are inactive
  assert (dense.params_direct, dense.params_effective) == (54, 27)
  assert dense.flops_effective == 54


def test_strided_conv_positions_and_example_input():
  model, v = _tiny((("conv", 4, 3, 2, "SAME"), ("gap",), ("dense", 2)), (6, 6, 2))
  c = flops.costs(model, None, jnp.ones((3, 6, 6, 2)))  # batch 3: counts per example
  assert c["op00_conv"].positions == 9
  assert c["op00_conv"].flops_dense == 2 * 3 * 3 * 2 * 4 * 9
  one = flops.costs(model, None, (6, 6, 2))
  assert c["total"] == one["total"]


def test_bad_masks():
  model = models.create("lenet300100")
  other = models.create("lenet5")
  v = other.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
  theirs = sparsejax.trace(other, (32, 32, 3), variables=v).ones()
  with pytest.raises(ValueError):
    flops.costs(model, theirs, (28, 28, 1))
