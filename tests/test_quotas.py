"""Tests for sparsejax.quotas: layerwise sparsity allocation (method.md section 3)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsejax import quotas
from sparsejax.quotas import QUOTAS, get_quota, layer_densities, layer_kept_counts

# --------------------------------------------------------------------------- networks


def _vgg(widths, classes):
  shapes, cin = [], 3
  for width in widths:
    shapes.append((3, 3, cin, width))
    cin = width
  return tuple(shapes) + ((512, classes),)


def _resnet18(classes):
  shapes, cin = [(3, 3, 3, 64)], 64
  for stage, width in enumerate([64, 128, 256, 512]):
    for block in range(2):
      shapes.append((3, 3, cin, width))  # conv1
      shapes.append((3, 3, width, width))  # conv2
      if block == 0 and stage > 0:
        shapes.append((1, 1, cin, width))  # 1x1 shortcut
      cin = width
  return tuple(shapes) + ((512, classes),)


NETWORKS = {
  "lenet300": ((784, 300), (300, 100), (100, 10)),
  "lenet5": ((5, 5, 3, 6), (5, 5, 6, 16), (400, 120), (120, 84), (84, 10)),
  "vgg16": _vgg([64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512], 10),
  "vgg19": _vgg([64, 64, 128, 128] + [256] * 4 + [512] * 8, 100),
  "resnet18": _resnet18(200),
}
TOTALS = {
  "lenet300": 266_200,
  "lenet5": 61_770,
  "vgg16": 14_715_584,
  "vgg19": 20_070_080,
  "resnet18": 11_261_632,
}
CONV_NETS = ["lenet5", "vgg16", "vgg19", "resnet18"]
# The paper's compression levels 10**(0.2 i) up to 1000x, and a few more.
SPARSITIES = [1.0 - 10.0 ** (-0.2 * i) for i in range(16)] + [0.05, 0.5, 0.95, 0.9999]


def _sizes(shapes):
  return np.array([math.prod(s) for s in shapes], dtype=np.float64)


def _ratios(shapes):
  return np.array([sum(s) for s in shapes], dtype=np.float64) / _sizes(shapes)


def _reachable(name, shapes, s):
  if name != "uniform_plus":
    return True
  if not any(len(x) == 4 for x in shapes):
    return False
  return s <= quotas.uniform_plus_max_sparsity(shapes)


# --------------------------------------------------------------------------- references
# Independent float64 solutions of the quota equations, written the way the method
# doc states them.


def _erk_reference(density, shapes):
  """Make layers dense whose density would exceed 1 and re-solve the others."""
  n, r = _sizes(shapes), _ratios(shapes)
  dense = np.zeros(len(n), bool)
  while not dense.all():
    eps = (density * n.sum() - n[dense].sum()) / (n[~dense] * r[~dense]).sum()
    dens = np.where(dense, 1.0, eps * r)
    grown = (dens > 1.0) & ~dense
    if not grown.any():
      return dens
    dense |= grown
  return np.ones(len(n))


def _igq_reference(density, shapes):
  n = _sizes(shapes)
  target = density * n.sum()
  lo, hi = 0.0, 1.0
  while (n / (1 + hi * n)).sum() > target:
    hi *= 2
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if (n / (1 + mid * n)).sum() > target:
      lo = mid
    else:
      hi = mid
  return 1.0 / (1.0 + hi * n)


def _uniform_plus_reference(density, shapes):
  n = _sizes(shapes)
  target = density * n.sum()
  if len(n) == 1:
    return np.ones(1)
  middle = n[1:-1].sum()
  dm = (target - n[0]) / (middle + n[-1])  # last layer shares d_m
  if dm < 0.2:  # last layer capped at 80% sparsity
    dm = max((target - n[0] - 0.2 * n[-1]) / middle, 0.0) if middle else 0.0
    last = 0.2 if middle else (target - n[0]) / n[-1]
  else:
    last = dm
  return np.concatenate([[1.0], np.full(len(n) - 2, dm), [last]])


REFERENCES = {
  "uniform": lambda d, shapes: np.full(len(shapes), d),
  "uniform_plus": _uniform_plus_reference,
  "erk": _erk_reference,
  "igq": _igq_reference,
}

# --------------------------------------------------------------------------- strategies

_dense = st.tuples(st.integers(1, 300), st.integers(1, 300))
_conv = st.builds(
  lambda k, cin, cout: (k, k, cin, cout),
  st.sampled_from([1, 3, 5]),
  st.integers(1, 64),
  st.integers(1, 64),
)
SHAPES = st.lists(st.one_of(_dense, _conv), min_size=1, max_size=8).map(tuple)
CONV_SHAPES = st.tuples(_conv, st.lists(st.one_of(_dense, _conv), min_size=1, max_size=7)).map(
  lambda t: (t[0],) + tuple(t[1])
)
SPARSITY = st.one_of(st.floats(0.0, 0.999), st.sampled_from([0.0, 0.5, 0.9, 0.99]))
HYP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- checks


def _check_valid_and_total(name, s, shapes):
  sp = QUOTAS[name](s, shapes)
  assert sp.dtype == jnp.float32 and sp.shape == (len(shapes),)
  quota_sp = np.asarray(sp)
  assert np.all(np.isfinite(quota_sp))
  assert np.all((quota_sp >= 0) & (quota_sp <= 1))

  n = _sizes(shapes)
  kept = np.asarray(layer_kept_counts(name, 1.0 - s, shapes))
  assert kept.dtype == np.int32
  assert np.all((kept >= 0) & (kept <= n))
  assert abs(int(kept.sum()) - round((1.0 - s) * n.sum())) <= len(shapes)
  # The counts follow the quota's own sparsities (up to the float32 round trip).
  assert np.all(np.abs(kept - n * (1.0 - quota_sp.astype(np.float64))) <= 0.5 + 1e-6 * n + 1e-9)


def _check_matches_reference(name, s, shapes):
  n = _sizes(shapes)
  density = np.float32(1.0 - s)
  dens = np.asarray(layer_densities(name, density, shapes), np.float64)
  ref = REFERENCES[name](np.float64(density), shapes)
  # Compare kept amounts (in weights): float32 relative error plus the fixed-point
  # resolution of the solver.
  np.testing.assert_allclose(n * dens, n * ref, rtol=2e-6, atol=1e-3)


def _check_igq_closed_form(s, shapes):
  n = _sizes(shapes)
  dens = np.asarray(layer_densities("igq", 1.0 - s, shapes), np.float64)
  assert np.all(dens > 0) and np.all(dens <= 1)
  # Recover F from the best-conditioned layer, then every layer must follow it.
  best = np.argmax(dens * (1 - dens))
  force = (1.0 / dens[best] - 1.0) / n[best]
  assert force >= 0
  np.testing.assert_allclose(dens, 1.0 / (1.0 + force * n), rtol=1e-6, atol=1e-6)
  # Smaller layers are pruned less.
  order = np.argsort(n, kind="stable")
  assert np.all(np.diff(dens[order]) <= 0)


def _check_erk_structure(s, shapes):
  dens = np.asarray(layer_densities("erk", 1.0 - s, shapes), np.float64)
  r = _ratios(shapes)
  capped = dens == 1.0
  assert np.all(dens <= 1.0)
  free = ~capped
  if free.any():
    eps = dens[free] / r[free]
    np.testing.assert_allclose(eps, eps[0], rtol=1e-6)
    # Caps go to the layers with the largest sum/prod ratio first.
    if capped.any():
      assert r[capped].min() >= r[free].max()
  return capped


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("net", NETWORKS)
def test_network_totals(net):
  shapes = NETWORKS[net]
  assert sum(math.prod(s) for s in shapes) == TOTALS[net]
  if net == "resnet18":
    assert len(shapes) == 21


@pytest.mark.parametrize("name", QUOTAS)
@pytest.mark.parametrize("net", NETWORKS)
def test_networks_valid_total_and_reference(name, net):
  shapes = NETWORKS[net]
  if name == "uniform_plus" and net == "lenet300":
    pytest.skip("uniform_plus needs a convolutional network")
  for s in SPARSITIES:
    if not _reachable(name, shapes, s):
      continue
    _check_valid_and_total(name, s, shapes)
    _check_matches_reference(name, s, shapes)


@pytest.mark.parametrize("name", QUOTAS)
@HYP
@given(shapes=SHAPES, s=SPARSITY)
def test_hypothesis_valid_total_and_reference(name, shapes, s):
  if name == "uniform_plus":
    shapes = ((3, 3, 3, 8),) + shapes  # needs a conv, and a reachable target
    s = min(s, quotas.uniform_plus_max_sparsity(shapes))
  _check_valid_and_total(name, s, shapes)
  _check_matches_reference(name, s, shapes)


def test_uniform_is_exactly_uniform():
  for s in [0.0, 0.3, 0.9, 0.999]:
    sp = np.asarray(quotas.uniform(s, NETWORKS["vgg16"]))
    assert np.all(sp == np.float32(s))


@pytest.mark.parametrize("net", NETWORKS)
def test_igq_closed_form_networks(net):
  shapes = NETWORKS[net]
  n = _sizes(shapes)
  for s in SPARSITIES:
    _check_igq_closed_form(s, shapes)
  dens = np.asarray(layer_densities("igq", 0.1, shapes))
  assert dens[np.argmin(n)] > dens[np.argmax(n)]
  assert np.all(np.asarray(layer_densities("igq", 1.0, shapes)) == 1.0)


@HYP
@given(shapes=SHAPES, s=SPARSITY)
def test_igq_closed_form_hypothesis(shapes, s):
  _check_igq_closed_form(s, shapes)


@pytest.mark.parametrize("net", NETWORKS)
def test_erk_proportional_and_capped_networks(net):
  shapes = NETWORKS[net]
  for s in SPARSITIES:
    _check_erk_structure(s, shapes)
  # Dense ERK is exactly dense.
  assert np.all(np.asarray(layer_densities("erk", 1.0, shapes)) == 1.0)


def test_erk_caps_small_layers_at_moderate_sparsity():
  lenet5 = NETWORKS["lenet5"]
  capped = _check_erk_structure(0.5, lenet5)
  assert capped[0] and capped[-1] and not capped[1:-1].any()
  assert np.asarray(quotas.erk(0.5, lenet5))[0] == 0.0
  for net in ["vgg16", "vgg19", "resnet18"]:  # small first convs
    capped = _check_erk_structure(0.9, NETWORKS[net])
    assert capped[0]
    assert not _check_erk_structure(0.999, NETWORKS[net]).any()


@HYP
@given(shapes=SHAPES, s=SPARSITY)
def test_erk_structure_hypothesis(shapes, s):
  _check_erk_structure(s, shapes)


def _check_uniform_plus(s, shapes):
  sp = np.asarray(quotas.uniform_plus(s, shapes))
  assert sp[0] == 0.0
  if len(shapes) == 1:
    return
  assert sp[-1] <= np.float32(0.8)
  if len(shapes) > 2:
    middle = sp[1:-1]
    assert np.all(middle == middle[0])
    if middle[0] <= np.float32(0.8):
      assert sp[-1] == middle[0]  # not capped: shares the middle sparsity
    else:
      assert sp[-1] == np.float32(1.0) - np.float32(0.2)


@pytest.mark.parametrize("net", CONV_NETS)
def test_uniform_plus_networks(net):
  shapes = NETWORKS[net]
  s_max = quotas.uniform_plus_max_sparsity(shapes)
  n = _sizes(shapes)
  assert s_max == pytest.approx(1 - (n[0] + 0.2 * n[-1]) / n.sum())
  for s in SPARSITIES + [s_max]:
    if s <= s_max:
      _check_uniform_plus(s, shapes)
  # At the limit: middle layers empty, last layer 20% dense.
  kept = np.asarray(layer_kept_counts("uniform_plus", 1.0 - s_max, shapes))
  assert kept[0] == n[0] and kept[-1] == round(0.2 * n[-1])
  assert np.all(kept[1:-1] <= 1)
  with pytest.raises(ValueError, match="largest reachable sparsity"):
    quotas.uniform_plus(min(s_max + 1e-3, 0.99999), shapes)
  with pytest.raises(ValueError, match="largest reachable sparsity"):
    layer_kept_counts("uniform_plus", (1.0 - s_max) / 2, shapes)


@HYP
@given(shapes=CONV_SHAPES, s=SPARSITY)
def test_uniform_plus_hypothesis(shapes, s):
  s = min(s, quotas.uniform_plus_max_sparsity(shapes))
  _check_uniform_plus(s, shapes)


def test_uniform_plus_rejects_mlps():
  mlp = NETWORKS["lenet300"]
  for call in (
    lambda: quotas.uniform_plus(0.5, mlp),
    lambda: layer_kept_counts("uniform_plus", 0.5, mlp),
    lambda: quotas.uniform_plus_max_sparsity(mlp),
  ):
    with pytest.raises(ValueError, match="shapes") as info:
      call()
    assert "convolutional" in str(info.value)


# --------------------------------------------------------------------------- monotone


def _float32_run(start, count):
  out = [np.float32(start)]
  for _ in range(count - 1):
    out.append(np.nextafter(out[-1], np.float32(2)))
  return out


def _density_grid(lowest, points=300):
  grid = np.concatenate(
    [
      np.geomspace(max(lowest, 1e-5), 1.0, points),
      np.linspace(lowest, 1.0, points // 2),
      [lowest, 1.0],
    ]
  )
  runs = [_float32_run(x, 40) for x in (0.01, 0.1, 0.5, 0.9) if x >= lowest]
  grid = np.concatenate([grid.astype(np.float32)] + [np.array(r) for r in runs])
  grid = np.unique(grid[(grid >= lowest) & (grid <= 1.0)])
  return grid


def _lowest_density(name, shapes):
  if name == "uniform_plus":
    return np.float32(1.0 - quotas.uniform_plus_max_sparsity(shapes)) * (1 + 1e-6)
  return 0.0


def _eager_counts(name, grid, shapes):
  return np.stack([np.asarray(layer_kept_counts(name, d, shapes)) for d in grid])


def _assert_monotone(counts, grid):
  steps = np.diff(counts.astype(np.int64), axis=0)
  bad = np.argwhere(steps < 0)
  assert bad.size == 0, f"counts drop between densities {grid[bad[0][0]]!r} and next"


@pytest.mark.parametrize("name", QUOTAS)
@pytest.mark.parametrize("net", NETWORKS)
def test_monotone_and_jit_equals_eager_networks(name, net):
  shapes = NETWORKS[net]
  if name == "uniform_plus" and net == "lenet300":
    pytest.skip("uniform_plus needs a convolutional network")
  grid = _density_grid(_lowest_density(name, shapes))
  counts = _eager_counts(name, grid, shapes)
  _assert_monotone(counts, grid)
  assert np.all(counts[-1] == _sizes(shapes))  # density 1 keeps everything

  # Under jit with a traced density (the effective-sparsity search's setting), in a
  # loop like the search's: the same counts.
  traced = jax.jit(lambda ds: jax.lax.map(lambda d: layer_kept_counts(name, d, shapes), ds))
  np.testing.assert_array_equal(np.asarray(traced(jnp.asarray(grid))), counts)


@pytest.mark.parametrize("name", QUOTAS)
@pytest.mark.parametrize("net", ["lenet5", "resnet18"])
def test_quota_jit_equals_eager(name, net):
  shapes = NETWORKS[net]
  grid = _density_grid(_lowest_density(name, shapes), points=30)
  sparsities = (np.float32(1.0) - grid).astype(np.float32)
  sparsities = sparsities[sparsities < 1.0]
  eager = np.stack([np.asarray(QUOTAS[name](s, shapes)) for s in sparsities])
  traced = jax.jit(lambda ss: jax.lax.map(lambda s: QUOTAS[name](s, shapes), ss))
  np.testing.assert_array_equal(np.asarray(traced(jnp.asarray(sparsities))), eager)


@pytest.mark.parametrize("name", QUOTAS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=SHAPES)
def test_monotone_hypothesis(name, shapes):
  if name == "uniform_plus":
    shapes = ((3, 3, 3, 8),) + shapes
  grid = _density_grid(_lowest_density(name, shapes), points=40)
  _assert_monotone(_eager_counts(name, grid, shapes), grid)


@pytest.mark.parametrize("name", QUOTAS)
def test_jit_equals_eager_small_shapes(name):
  shapes = ((3, 3, 3, 8), (7, 5), (5, 5, 8, 3), (1, 1))
  grid = _density_grid(_lowest_density(name, shapes), points=30)
  counts = _eager_counts(name, grid, shapes)
  jitted = jax.jit(jax.vmap(lambda d: layer_kept_counts(name, d, shapes)))
  np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(grid))), counts)


def test_traced_out_of_range_is_clamped_not_nan():
  shapes = NETWORKS["lenet5"]
  n = _sizes(shapes)
  values = jnp.array([-0.5, 1.0, 1.5], jnp.float32)
  for name, fn in QUOTAS.items():
    traced = jax.jit(
      jax.vmap(lambda v, fn=fn, name=name: (fn(v, shapes), layer_kept_counts(name, v, shapes)))
    )
    sp, counts = (np.asarray(x) for x in traced(values))
    assert np.all(np.isfinite(sp)) and np.all((sp >= 0) & (sp <= 1))
    np.testing.assert_array_equal(counts[2], n)  # density 1.5 -> 1
    assert np.all(counts[0] >= 0)  # density -0.5 -> 0 (uniform+: its minimum)
    if name != "uniform_plus":
      assert np.all(counts[0] == 0)


def test_custom_quota_function_and_get_quota():
  shapes = NETWORKS["lenet300"]
  for name, fn in QUOTAS.items():
    assert get_quota(name) is fn
    assert get_quota(fn) is fn
  custom = lambda s, shapes: quotas.igq(s, shapes)  # noqa: E731
  np.testing.assert_array_equal(
    np.asarray(layer_kept_counts(custom, 0.3, shapes)),
    np.asarray(layer_kept_counts("igq", 0.3, shapes)),
  )


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", QUOTAS)
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), np.float32(2.0)])
def test_bad_sparsity(name, bad):
  with pytest.raises(ValueError, match="sparsity") as info:
    QUOTAS[name](bad, NETWORKS["lenet5"])
  assert "[0, 1)" in str(info.value)


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), [0.1, 0.2], "half"])
def test_bad_density(bad):
  with pytest.raises(ValueError, match="density"):
    layer_kept_counts("igq", bad, NETWORKS["lenet5"])


def test_bad_sparsity_not_scalar():
  with pytest.raises(ValueError, match="sparsity"):
    quotas.erk(np.array([0.1, 0.2]), NETWORKS["lenet5"])


@pytest.mark.parametrize("bad", [(), [], ((3, 0),), ((3, -2),), ((),), ((3.5, 2),), "abc", None])
def test_bad_shapes(bad):
  for fn in QUOTAS.values():
    with pytest.raises(ValueError, match="shapes"):
      fn(0.5, bad)
  with pytest.raises(ValueError, match="shapes"):
    layer_kept_counts("igq", 0.5, bad)


def test_unknown_quota_name():
  with pytest.raises(ValueError, match="name") as info:
    get_quota("erdos")
  message = str(info.value)
  assert "'erdos'" in message
  assert all(name in message for name in QUOTAS)
  with pytest.raises(ValueError, match="quota"):
    layer_kept_counts("erdos", 0.5, NETWORKS["lenet5"])


@pytest.mark.parametrize("name", quotas.GROUP_QUOTAS)
@HYP
@given(
  sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
  ratio_seed=st.integers(0, 2**16),
  d=st.floats(0.0, 1.0),
  e=st.floats(0.0, 1.0),
)
def test_group_kept_counts_monotone_bounded_and_on_budget(name, sizes, ratio_seed, d, e):
  # channel quotas (sparsejax.structured): counts of units per group
  ratios = np.random.default_rng(ratio_seed).uniform(0.01, 2.0, len(sizes))
  lo, hi = sorted((d, e))
  k_lo = quotas.group_kept_counts(name, lo, sizes, ratios)
  k_hi = quotas.group_kept_counts(name, hi, sizes, ratios)
  assert np.all(k_lo <= k_hi)  # nested in the density
  assert np.all((1 <= k_lo) & (k_hi <= np.asarray(sizes)))
  # round(n_l d_l) is within 1/2 of n_l d_l; the floor of 1 adds at most 1 per group
  assert abs(int(k_hi.sum()) - hi * sum(sizes)) <= 1.5 * len(sizes) + 1e-3
  if name == "uniform":
    np.testing.assert_array_equal(
      k_hi, np.clip(np.round(np.float32(hi) * np.asarray(sizes, np.float32)), 1, None)
    )
