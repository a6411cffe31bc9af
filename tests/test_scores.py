"""Tests for sparsejax.scores against closed forms and explicit references.

References are independent of the code under test: numpy formulas (magnitude, LAMP by
brute force), hand-written backprop (SNIP), jax.hessian on flattened kernels (GraSP),
path counting with |W| products (SynFlow), a plain Python loop of SNIP + sort
(iterative SNIP), and numpy stable sorts (exact top-k).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsejax import effective, models, pruning, scores, selection
from sparsejax import masks as masks_lib
from sparsejax.models import layers as L
from sparsejax.scores import data as score_data

HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------- networks


class MLP(nn.Module):
  """Dense layers with ReLU between them (no normalization)."""

  widths: tuple = (5, 4, 3)
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = L.flatten(x)
    for i, w in enumerate(self.widths):
      x = L.Dense(w, use_bias=self.use_bias, name=f"dense_{i}")(x)
      if i < len(self.widths) - 1:
        x = nn.relu(x)
    return x


class CNN(nn.Module):
  """Conv + batch norm + ReLU + avg pool, then Dense: exercises batch_stats."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = L.Conv(4, (3, 3), padding="SAME", name="conv_0")(x)
    x = L.Norm(name="norm_0")(x, train)
    x = nn.relu(x)
    x = L.pool(x, "avg", 2)
    x = L.flatten(x)
    return L.Dense(3, name="dense_1")(x)


def init(model, shape, seed=0):
  return model.init(jax.random.key(seed), jnp.ones((1,) + tuple(shape)))


def is_kernel(path, leaf) -> bool:
  """The test networks' linear-op weights: their Dense/Conv kernels."""
  return masks_lib.path_str(path[-1:]) == "kernel" and np.ndim(leaf) >= 2


def kernel_paths(params) -> list[str]:
  return [
    masks_lib.path_str(p)
    for p, leaf in jax.tree_util.tree_leaves_with_path(params)
    if is_kernel(p, leaf)
  ]


def kernel_leaves(params) -> list:
  return [leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params) if is_kernel(p, leaf)]


def replace_kernels(params, new):
  it = iter(new)
  return jax.tree_util.tree_map_with_path(
    lambda p, leaf: next(it) if is_kernel(p, leaf) else leaf, params
  )


def fast_params(model, shape, seed=0):
  """Params without running ``model.init`` (slow to compile for VGG-19): kernels
  normal with the zoo's variance (scale 2, fan_avg), everything else 0 or 1."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1,) + tuple(shape)))

  def fill(path, s):
    name = masks_lib.path_str(path[-1:])
    if is_kernel(path, s):
      fan_in = int(np.prod(s.shape[:-1]))
      fan_out = int(np.prod(s.shape[:-2])) * s.shape[-1]
      std = np.sqrt(2.0 / ((fan_in + fan_out) / 2))
      # float64 draws: float32 ones hit exact zeros (score 0 without being inactive).
      return jnp.asarray((rng.standard_normal(s.shape) * std).astype(np.float32))
    fill_value = 1 if name in ("scale", "var") else 0
    return jnp.full(s.shape, fill_value, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes["params"])


def batch(seed, n, shape, classes=3):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "image": jax.random.normal(k1, (n,) + tuple(shape)),
    "label": jax.random.randint(k2, (n,), 0, classes),
  }


def leaves(tree):
  return [
    np.asarray(x) for x in jax.tree.leaves(tree, is_leaf=lambda v: v is None) if x is not None
  ]


def random_masks(params, seed, density):
  rng = np.random.default_rng(seed)
  return masks_lib.map_prunable(
    lambda w: jnp.asarray(rng.random(w.shape) < density), params, prunable=kernel_paths(params)
  )


# --------------------------------------------------------------------------- magnitude, LAMP


HAND = {
  "a": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.0]]), "bias": jnp.array([5.0, -5.0])},
  "b": {"kernel": jnp.array([[-0.5], [0.25], [-0.5]])},
}


def test_magnitude_closed_form():
  s = scores.magnitude(HAND, prunable=kernel_paths(HAND))
  assert s["a"]["bias"] is None
  np.testing.assert_array_equal(s["a"]["kernel"], [[1.0, 2.0], [3.0, 0.0]])
  np.testing.assert_array_equal(s["b"]["kernel"], [[0.5], [0.25], [0.5]])
  assert s["a"]["kernel"].dtype == jnp.float32


def lamp_reference(w):
  """Brute force: the sum runs over the weights at or after u in ascending |w| order,
  ties ordered by position descending (u itself included)."""
  a = np.abs(np.asarray(w, np.float64)).ravel()
  pos = np.arange(a.size)
  out = np.zeros(a.size)
  for u in range(a.size):
    after = (a > a[u]) | ((a == a[u]) & (pos <= u))
    denom = np.sum(a[after] ** 2)
    out[u] = a[u] ** 2 / denom if denom > 0 else 0.0
  return out.reshape(np.shape(w))


def test_lamp_hand_made():
  s = scores.lamp(HAND, prunable=kernel_paths(HAND))
  assert s["a"]["bias"] is None
  # |w| sorted ascending: 0, 1, 2, 3 -> 0/14, 1/14, 4/13, 9/9.
  np.testing.assert_allclose(s["a"]["kernel"], [[1 / 14, 4 / 13], [1.0, 0.0]], rtol=1e-6)
  # Ties 0.5 at positions 0 and 2: position 2 comes first in ascending order.
  # Order: 0.25 (pos 1), 0.5 (pos 2), 0.5 (pos 0).
  np.testing.assert_allclose(s["b"]["kernel"][:, 0], [1.0, 0.0625 / 0.5625, 0.5], rtol=1e-6)


@settings(max_examples=40, **HYP)
@given(st.lists(st.integers(-4, 4), min_size=1, max_size=30), st.integers(0, 3))
def test_lamp_matches_reference(values, scale_exp):
  w = np.asarray(values, np.float32).reshape(-1, 1) * np.float32(10.0**-scale_exp)
  if w.shape[0] < 2:
    w = np.concatenate([w, w])
  got = scores.lamp({"l": {"kernel": jnp.asarray(w)}}, prunable=["l/kernel"])["l"]["kernel"]
  np.testing.assert_allclose(got, lamp_reference(w), rtol=1e-5, atol=1e-7)
  if np.any(w != 0):
    assert np.max(np.asarray(got)) == 1.0  # the largest weight of the layer scores 1
    assert np.sum(np.asarray(got) == 1.0) == 1


def test_lamp_global_topk_never_empties_a_layer():
  rng = np.random.default_rng(0)
  params = {
    f"l{i}": {"kernel": jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)}
    for i, (shape, scale) in enumerate(
      [((30, 20), 1.0), ((20, 10), 1e-3), ((10, 5), 1e2), ((5, 2), 1e-6)]
    )
  }
  ranking = pruning.rank_scores(scores.lamp(params, prunable=kernel_paths(params)))
  n_layers = len(ranking.shapes)
  for k in (n_layers, n_layers + 1, 10, 50, 200):
    counts = [int(np.sum(m)) for m in leaves(pruning.masks_at(ranking, k))]
    assert min(counts) >= 1, (k, counts)
    assert sum(counts) == k
  # Magnitude pruning at the same k empties the small layers.
  mag = [
    int(np.sum(m))
    for m in leaves(
      pruning.masks_at(
        pruning.rank_scores(scores.magnitude(params, prunable=kernel_paths(params))), 50
      )
    )
  ]
  assert min(mag) == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_lamp_rejects_non_finite_weights_like_magnitude(bad):
  w = np.random.default_rng(0).normal(size=(300, 100)).astype(np.float32)
  w[3, 7] = bad
  params = {
    "dense_0": {"kernel": jnp.asarray(w)},
    "dense_1": {"kernel": jnp.ones((100, 10), jnp.float32)},
  }
  with pytest.raises(ValueError, match="NaN or infinite"):
    scores.magnitude(params, prunable=kernel_paths(params))
  with pytest.raises(ValueError, match="lamp got 1 NaN or infinite weights.*dense_0"):
    scores.lamp(params, prunable=kernel_paths(params))


# --------------------------------------------------------------------------- random


def test_random_uniform_int_scores_deterministic():
  params = init(MLP(widths=(300, 50, 3)), (40,))["params"]
  a = scores.random(params, key=jax.random.key(1), prunable=kernel_paths(params))
  b = scores.random(params, key=jax.random.key(1), prunable=kernel_paths(params))
  c = scores.random(params, key=jax.random.key(2), prunable=kernel_paths(params))
  assert a["dense_0"]["bias"] is None
  flat = np.concatenate([x.ravel() for x in leaves(a)])
  assert flat.dtype == np.int32 and flat.min() >= 0
  assert len(np.unique(flat)) >= flat.size - 5  # ties are rare
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert any(np.any(x != y) for x, y in zip(leaves(a), leaves(c)))
  # A global top-k keeps about the same fraction of every layer.
  masks = pruning.masks_at(pruning.rank_scores(a), flat.size // 10)
  fractions = [float(np.mean(m)) for m in leaves(masks)]
  np.testing.assert_allclose(fractions[:2], 0.1, atol=0.03)


# --------------------------------------------------------------------------- exact top-k


TOPK_SHAPES = ((7, 2), (1, 2), (20, 3))  # fixed: one compilation for all examples


@settings(max_examples=60, **HYP)
@given(st.data())
def test_select_top_matches_stable_sort(data):
  pool = [0.0, 1e-40, 3e-39, 1e-20, 0.5, 0.5000001, 1.0, 7.0, 1e30, 3.4e38]
  n = sum(int(np.prod(s)) for s in TOPK_SHAPES)
  flat_s = np.asarray(
    data.draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)), np.float32
  )
  flat_a = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
  splits = np.cumsum([int(np.prod(s)) for s in TOPK_SHAPES])[:-1]
  tree = {
    f"l{i}": {"kernel": jnp.asarray(v.reshape(s))}
    for i, (v, s) in enumerate(zip(np.split(flat_s, splits), TOPK_SHAPES))
  }
  alive = {
    f"l{i}": {"kernel": jnp.asarray(v.reshape(s))}
    for i, (v, s) in enumerate(zip(np.split(flat_a, splits), TOPK_SHAPES))
  }
  k = data.draw(st.integers(0, int(flat_a.sum())))
  got = selection.select_top(leaves(tree), k, [jnp.asarray(a) for a in leaves(alive)])
  got = np.concatenate([np.asarray(m).ravel() for m in got])
  key = np.where(flat_a, flat_s.astype(np.float64), -1.0)
  want = np.zeros(n, bool)
  want[np.argsort(-key, kind="stable")[:k]] = True
  np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- SNIP


def mlp_loss_grads_numpy(params, x, y, masks=None):
  """Explicit backprop of mean cross-entropy for Dense-ReLU-Dense (float64)."""
  w1 = np.asarray(params["dense_0"]["kernel"], np.float64)
  b1 = np.asarray(params["dense_0"]["bias"], np.float64)
  w2 = np.asarray(params["dense_1"]["kernel"], np.float64)
  b2 = np.asarray(params["dense_1"]["bias"], np.float64)
  if masks is not None:
    w1 = w1 * np.asarray(masks["dense_0"]["kernel"])
    w2 = w2 * np.asarray(masks["dense_1"]["kernel"])
  x = np.asarray(x, np.float64).reshape(len(y), -1)
  z1 = x @ w1 + b1
  h = np.maximum(z1, 0)
  z2 = h @ w2 + b2
  p = np.exp(z2 - z2.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d2 = p.copy()
  d2[np.arange(len(y)), np.asarray(y)] -= 1
  d2 /= len(y)
  g2 = h.T @ d2
  d1 = (d2 @ w2.T) * (z1 > 0)
  g1 = x.T @ d1
  return (g1, w1), (g2, w2)


def test_snip_matches_explicit_gradient_averaged_over_batches():
  model = MLP(widths=(7, 3))
  variables = init(model, (5,))
  b1, b2 = batch(1, 6, (5,)), batch(2, 10, (5,))
  got = scores.snip(model, variables, [b1, b2])
  assert got["dense_0"]["bias"] is None
  # Size-weighted mean of per-batch mean gradients = gradient of the mean over all
  # 16 examples (no batch norm here).
  x = np.concatenate([b1["image"], b2["image"]])
  y = np.concatenate([b1["label"], b2["label"]])
  (g1, w1), (g2, w2) = mlp_loss_grads_numpy(variables["params"], x, y)
  np.testing.assert_allclose(got["dense_0"]["kernel"], np.abs(g1 * w1), rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(got["dense_1"]["kernel"], np.abs(g2 * w2), rtol=2e-4, atol=1e-7)


def test_snip_with_masks():
  model = MLP(widths=(7, 3))
  variables = init(model, (5,))
  masks = random_masks(variables["params"], 3, 0.5)
  b = batch(4, 8, (5,))
  got = scores.snip(model, variables, [b], masks=masks)
  (g1, w1), (g2, w2) = mlp_loss_grads_numpy(variables["params"], b["image"], b["label"], masks)
  np.testing.assert_allclose(got["dense_0"]["kernel"], np.abs(g1 * w1), rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(got["dense_1"]["kernel"], np.abs(g2 * w2), rtol=2e-4, atol=1e-7)
  for s, m in zip(leaves(got), leaves(masks)):
    assert np.all(s[~m] == 0)


def test_snip_custom_loss_and_compiled_once():
  model = MLP(widths=(7, 2))
  variables = init(model, (5,))
  b = batch(5, 8, (5,), classes=2)  # the labels of the model's 2 outputs
  double = lambda logits, labels: 2.0 * scores.cross_entropy(logits, labels)
  one = scores.snip(model, variables, [b])
  two = scores.snip(model, variables, [b], loss_fn=double)
  for x, y in zip(leaves(one), leaves(two)):
    np.testing.assert_allclose(y, 2 * x, rtol=1e-5, atol=1e-8)
  params = variables["params"]
  slots = tuple(
    i
    for i, (p, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(params))
    if is_kernel(p, leaf)
  )
  accumulate, _, _ = score_data._snip_fns(model, scores.cross_entropy, None, slots)
  compiled = accumulate._cache_size()
  scores.snip(model, variables, [batch(6, 8, (5,), classes=2), batch(7, 8, (5,), classes=2)])
  assert accumulate._cache_size() == compiled


def test_snip_on_batchnorm_cnn_runs_and_is_finite():
  model = CNN()
  variables = init(model, (6, 6, 2))
  assert "batch_stats" in variables
  got = scores.snip(model, variables, [batch(7, 4, (6, 6, 2))])
  assert all(np.all(np.isfinite(s)) and np.any(s > 0) for s in leaves(got))


# --------------------------------------------------------------------------- GraSP


def test_grasp_hessian_gradient_matches_explicit_hessian():
  model = MLP(widths=(4, 3))
  variables = init(model, (3,))
  params = variables["params"]
  batches = [batch(8, 5, (3,)), batch(9, 5, (3,))]
  temperature = 2.0
  kernels = [params["dense_0"]["kernel"], params["dense_1"]["kernel"]]
  sizes = [k.size for k in kernels]

  def unflatten(flat):
    k0 = flat[: sizes[0]].reshape(kernels[0].shape)
    k1 = flat[sizes[0] :].reshape(kernels[1].shape)
    return {
      "dense_0": {**params["dense_0"], "kernel": k0},
      "dense_1": {**params["dense_1"], "kernel": k1},
    }

  def loss(flat, b):
    logits = model.apply({"params": unflatten(flat)}, b["image"]) / temperature
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()

  flat = jnp.concatenate([k.ravel() for k in kernels])
  grad, hessian = jax.jit(jax.grad(loss)), jax.jit(jax.hessian(loss))
  g = np.mean([np.asarray(grad(flat, b)) for b in batches], axis=0)
  hg = np.mean([np.asarray(hessian(flat, b)) @ g for b in batches], axis=0)

  got_g, got_hg = scores.grasp_hessian_gradient(model, variables, batches, temperature=temperature)
  np.testing.assert_allclose(np.concatenate([x.ravel() for x in got_g]), g, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.concatenate([x.ravel() for x in got_hg]), hg, rtol=1e-3, atol=1e-6)
  keep = scores.grasp(model, variables, batches, temperature=temperature)
  assert keep["dense_0"]["bias"] is None
  # GraSP removes the highest -w * Hg: the keep-score is w * Hg.
  np.testing.assert_allclose(
    np.concatenate([x.ravel() for x in leaves(keep)]), np.asarray(flat) * hg, rtol=1e-3, atol=1e-7
  )


def test_grasp_default_temperature_finite():
  model = CNN()
  variables = init(model, (6, 6, 2))
  got = scores.grasp(model, variables, [batch(10, 4, (6, 6, 2))])
  assert all(np.all(np.isfinite(s)) for s in leaves(got))
  assert any(np.any(s != 0) for s in leaves(got))


# --------------------------------------------------------------------------- SynFlow


def path_count_scores(params, masks=None):
  """Closed form for a linear MLP without biases, float64: with A_l = |W_l| * m_l,
  left = 1^T A_1 ... A_{l-1}, right = A_{l+1} ... A_L 1, score_ij = A_l[i,j] left_i right_j."""
  names = sorted(params)
  mats = [np.abs(np.asarray(params[n]["kernel"], np.float64)) for n in names]
  if masks is not None:
    mats = [a * np.asarray(masks[n]["kernel"]) for a, n in zip(mats, names)]
  out = []
  for l, a in enumerate(mats):
    left = np.ones(mats[0].shape[0])
    for b in mats[:l]:
      left = left @ b
    right = np.ones(mats[-1].shape[1])
    for b in reversed(mats[l + 1 :]):
      right = b @ right
    out.append(a * left[:, None] * right[None, :])
  return out


@pytest.mark.parametrize("with_masks", [False, True])
def test_synflow_one_round_matches_path_counts(with_masks):
  model = MLP(widths=(6, 5, 4, 3), use_bias=False)
  params = init(model, (7,))["params"]
  masks = random_masks(params, 11, 0.6) if with_masks else None
  got = [
    np.asarray(x, np.float64)
    for x in leaves(scores.synflow_scores(model, params, input_shape=(7,), masks=masks))
  ]
  want = path_count_scores(params, masks)
  # One common positive factor for all layers (the linear mode's rescaling).
  factor = np.sum(got[0]) / np.sum(want[0])
  assert factor > 0
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, factor * w, rtol=1e-5, atol=1e-12 * np.max(w) * factor)
  # Conservation: every layer's scores sum to R.
  sums = [np.sum(g) for g in got]
  np.testing.assert_allclose(sums, sums[0], rtol=1e-5)
  # Rankings unchanged by the rescaling (where the reference has no near-ties).
  g_all = np.concatenate([g.ravel() for g in got])
  w_all = np.concatenate([w.ravel() for w in want])
  w_sorted = np.sort(w_all)
  gaps = np.diff(w_sorted) > 1e-4 * w_sorted[1:]
  order = np.argsort(w_all, kind="stable")
  rank_g = np.argsort(np.argsort(g_all, kind="stable"), kind="stable")
  sep = np.concatenate([[True], gaps]) & np.concatenate([gaps, [True]])
  assert np.all(np.diff(rank_g[order][sep]) > 0)


def test_synflow_rescaling_is_common_factor_with_biases_and_pooling():
  """On a conv net (biases present but zeroed, BN identity, avg pool) the scores match
  the same linear network without the per-layer rescaling, up to one factor."""
  model = CNN()
  params = init(model, (6, 6, 2))["params"]
  got = [
    np.asarray(x, np.float64)
    for x in leaves(scores.synflow_scores(model, params, input_shape=(6, 6, 2)))
  ]
  x = jnp.ones((1, 6, 6, 2))

  def plain(kernels):
    h = jax.lax.conv_general_dilated(
      x, kernels[0], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = nn.avg_pool(h, (2, 2), (2, 2))
    return jnp.sum(h.reshape(1, -1) @ kernels[1])

  ks = [jnp.abs(params["conv_0"]["kernel"]), jnp.abs(params["dense_1"]["kernel"])]
  want = [np.asarray(g * k, np.float64) for g, k in zip(jax.grad(plain)(ks), ks)]
  factor = np.sum(got[0]) / np.sum(want[0])
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, factor * w, rtol=1e-5)


class TinyResNet(nn.Module):
  """Stem conv, one zoo BasicBlock (identity skip), global average pool, Dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    from sparsejax.models.resnet import BasicBlock

    x = L.Conv(3, (3, 3), padding="SAME", use_bias=False, name="stage0_conv")(x)
    x = nn.relu(x)
    x = BasicBlock(3, 1, name="stage1_block0")(x, train)
    x = L.global_avg_pool(x)
    return L.Dense(2, use_bias=False, name="stage2_dense")(x)


def test_synflow_rescaling_is_common_factor_on_residual_networks():
  model = TinyResNet()
  shape = (5, 5, 2)
  params = init(model, shape)["params"]
  got = [
    np.asarray(x, np.float64)
    for x in leaves(scores.synflow_scores(model, params, input_shape=shape))
  ]
  k = [jnp.abs(w) for w in kernel_leaves(params)]  # stem, conv_1, conv_2, dense
  x = jnp.ones((1,) + shape)
  conv = lambda h, w: jax.lax.conv_general_dilated(
    h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )

  def plain(k):
    h = conv(x, k[0])
    h = conv(conv(h, k[1]), k[2]) + h
    return jnp.sum(jnp.mean(h, axis=(1, 2)) @ k[3])

  want = [np.asarray(g * w, np.float64) for g, w in zip(jax.grad(plain)(k), k)]
  factor = np.sum(got[0]) / np.sum(want[0])
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, factor * w, rtol=1e-4)


def final_masks(priorities, sparsity):
  total = sum(x.size for x in leaves(priorities))
  kept = pruning.kept_for_sparsity(sparsity, total)
  return pruning.masks_at(pruning.rank_scores(priorities), kept), kept, total


def check_iterative_result(prio, stats, sparsity, rounds, big=False):
  flat = np.concatenate([x.ravel() for x in leaves(prio)])
  assert flat.dtype == np.int32
  seen = np.zeros(flat.size, bool)
  seen[flat] = True
  assert seen.all()  # a permutation of 0..N-1
  total = flat.size
  kept = pruning.kept_for_sparsity(sparsity, total)
  top = jax.tree.map(
    lambda p: None if p is None else jnp.asarray(p) >= total - kept,
    prio,
    is_leaf=lambda v: v is None,
  )
  if big:  # rank_scores sorts all N weights twice: skip it on VGG-19
    masks = top
  else:
    masks, _, _ = final_masks(prio, sparsity)
    for m, t in zip(leaves(masks), leaves(top)):
      np.testing.assert_array_equal(m, t)  # the survivors carry the top priorities
  assert masks_lib.count(masks) == (kept, total)
  assert len(stats.kept) == rounds + 1
  # Entry t: round t; the last entry: the scoring pass on the final mask.
  np.testing.assert_array_equal(stats.kept[1:], stats.target[:-1])
  assert stats.target[-1] == stats.kept[-1] == kept
  return masks


@pytest.mark.parametrize("compression", [100, 1000])
def test_synflow_lenet_100_rounds(compression):
  model = models.create("lenet300100")
  shape = models.input_shape("lenet300100")
  params = init(model, shape)["params"]
  sparsity = 1 - 1 / compression
  prio, stats = scores.synflow(
    model, params, input_shape=shape, sparsity=sparsity, return_stats=True
  )
  masks = check_iterative_result(prio, stats, sparsity, 100)
  # Density after round t is (1 - s)^(t / 100).
  n = sum(x.size for x in leaves(prio))
  np.testing.assert_allclose(
    stats.target[:-1] / n, (1 - sparsity) ** (np.arange(1, 101) / 100), rtol=0, atol=1 / n
  )
  # No overflow or underflow: every positive path keeps a normal float32 score.
  assert np.all(stats.min_positive_score > 1e-30)
  assert np.all(stats.max_score < 1e30)
  eff = effective.effective_masks(model, masks, shape)
  kept = masks_lib.count(masks)[0]
  active = masks_lib.count(eff)[0]
  # Zero scores are exactly the weights without a path (nothing underflowed); the only
  # inactive weights of the final mask are those its last round cut off (SynFlow does
  # not remove them: a unit can lose all inputs while an output edge, carrying the
  # unit's whole flow, stays above the threshold). They are rare.
  assert stats.zero_kept[-1] == kept - active
  assert kept - active <= 0.01 * kept
  # Ordered by their final score, inactive survivors go first below the final count.
  below = pruning.masks_at(pruning.rank_scores(prio), active)
  for e, b in zip(leaves(eff), leaves(below)):
    np.testing.assert_array_equal(e, b)


def test_synflow_vgg19_no_overflow_few_rounds():
  model = models.create("vgg19")
  shape = models.input_shape("vgg19")
  params = fast_params(model, shape)
  sparsity = 1 - 1 / 1000
  # 5 rounds of 4x each (3 rounds of 10x collapse layers: a genuine SynFlow failure with
  # too few rounds, every score of the middle layers falling below the threshold).
  prio, stats = scores.synflow(
    model, params, input_shape=shape, sparsity=sparsity, rounds=5, return_stats=True
  )
  masks = check_iterative_result(prio, stats, sparsity, 5, big=True)
  assert np.all(stats.min_positive_score > 1e-30)
  assert np.all(np.isfinite(stats.max_score)) and np.all(stats.max_score < 1e30)
  assert stats.zero_kept[0] == 0  # the dense network: every weight on a path
  eff = effective.effective_masks(model, masks, shape)
  # Zero-score survivors are exactly the inactive ones: no positive path underflowed.
  assert stats.zero_kept[-1] == masks_lib.count(masks)[0] - masks_lib.count(eff)[0]


def test_synflow_deterministic_and_masks_start():
  model = MLP(widths=(20, 10, 4), use_bias=False)
  params = init(model, (8,))["params"]
  a = scores.synflow(model, params, input_shape=(8,), sparsity=0.9, rounds=7)
  b = scores.synflow(model, params, input_shape=(8,), sparsity=0.9, rounds=7)
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y)
  start = random_masks(params, 0, 0.5)
  prio = scores.synflow(model, params, input_shape=(8,), sparsity=0.9, rounds=7, masks=start)
  final, _, total = final_masks(prio, 0.9)
  n_start = masks_lib.count(start)[0]
  for f, s, p in zip(leaves(final), leaves(start), leaves(prio)):
    assert not np.any(f & ~s)  # only removes weights
    assert np.all(p[~s] < total - n_start)  # initially masked: lowest priorities


# --------------------------------------------------------------------------- iterative SNIP


def reference_iterative_snip(model, variables, batches, sparsity, rounds):
  """Plain loop: SNIP on the masked network, stable sort of the alive weights."""
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  names = kernel_paths(params)
  kernels = [np.asarray(x) for x in kernel_leaves(params)]
  n = sum(k.size for k in kernels)
  alive = np.ones(n, bool)
  splits = np.cumsum([k.size for k in kernels])[:-1]

  def loss(p, b):
    logits, _ = model.apply({"params": p, **rest}, b["image"], train=True, mutable=["batch_stats"])
    return scores.cross_entropy(logits, b["label"])

  grad = jax.jit(jax.grad(loss))
  last_scores, last_alive = None, None
  for t in range(rounds):
    k = int(round(n * (1 - sparsity) ** ((t + 1) / rounds)))
    m = [a.reshape(w.shape) for a, w in zip(np.split(alive, splits), kernels)]
    masked = replace_kernels(params, [jnp.asarray(w * mm) for w, mm in zip(kernels, m)])
    g = kernel_leaves(grad(masked, batches[t % len(batches)]))
    s = np.concatenate(
      [np.abs(np.asarray(gi) * w * mm).ravel() for gi, w, mm in zip(g, kernels, m)]
    )
    key = np.where(alive, s, -1.0)
    order = np.argsort(-key, kind="stable")
    new = np.zeros(n, bool)
    new[order[:k]] = True
    last_scores, last_alive = key, alive
    alive = new
  return alive, last_scores, last_alive, names


def test_iterative_snip_matches_reference_loop():
  model = CNN()
  shape = (6, 6, 2)
  variables = init(model, shape)
  batches = [batch(20 + i, 8, shape) for i in range(3)]
  sparsity, rounds = 0.9, 6
  prio, stats = scores.iterative_snip(
    model, variables, batches, sparsity=sparsity, rounds=rounds, return_stats=True
  )
  masks = check_iterative_result(prio, stats, sparsity, rounds)
  want, last_scores, last_alive, _ = reference_iterative_snip(
    model, variables, batches, sparsity, rounds
  )
  got = np.concatenate([m.ravel() for m in leaves(masks)])
  np.testing.assert_array_equal(got, want)
  # Keeping a few more re-adds the last-eliminated weights, best last-round score first.
  flat = np.concatenate([p.ravel() for p in leaves(prio)])
  kept = int(want.sum())
  pruned_last = last_alive & ~want
  order = np.argsort(-np.where(pruned_last, last_scores, -1.0), kind="stable")
  extra = 5
  np.testing.assert_array_equal(np.argsort(-flat)[kept : kept + extra], order[:extra])
  # Deterministic.
  again = scores.iterative_snip(model, variables, batches, sparsity=sparsity, rounds=rounds)
  for x, y in zip(leaves(prio), leaves(again)):
    np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- errors


def test_errors():
  model = MLP(widths=(4, 3))
  variables = init(model, (3,))
  params = variables["params"]
  b = batch(0, 4, (3,))
  for bad in (-0.1, 1.0, float("nan")):
    with pytest.raises(ValueError, match="sparsity"):
      scores.synflow(model, params, input_shape=(3,), sparsity=bad)
    with pytest.raises(ValueError, match="sparsity"):
      scores.iterative_snip(model, variables, [b], sparsity=bad)
  with pytest.raises(ValueError, match="rounds"):
    scores.synflow(model, params, input_shape=(3,), sparsity=0.5, rounds=0)
  for fn, name in ((scores.snip, "snip"), (scores.grasp, "grasp")):
    for empty in (None, []):
      with pytest.raises(ValueError, match=f"{name} needs data"):
        fn(model, variables, empty)
  for empty in (None, [], iter([])):
    with pytest.raises(ValueError, match="iterative_snip needs data"):
      scores.iterative_snip(model, variables, empty, sparsity=0.5)
  with pytest.raises(ValueError, match="preprocess"):
    scores.snip(
      model, variables, [{"image": jnp.zeros((2, 3), jnp.uint8), "label": jnp.zeros(2, jnp.int32)}]
    )
  with pytest.raises(ValueError, match="temperature"):
    scores.grasp(model, variables, [b], temperature=0.0)
  with pytest.raises(ValueError, match="input_shape"):
    scores.synflow_scores(model, params, input_shape=(0, 3))
  nan_params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), params)
  nan_vars = {"params": nan_params}
  with pytest.raises(ValueError, match="NaN"):
    scores.snip(model, nan_vars, [b])
  with pytest.raises(ValueError, match="NaN"):
    scores.grasp(model, nan_vars, [b])
  with pytest.raises(ValueError, match="NaN"):
    scores.synflow_scores(model, nan_params, input_shape=(3,))
  with pytest.raises(ValueError, match="NaN"):
    scores.synflow(model, nan_params, input_shape=(3,), sparsity=0.5, rounds=2)
  with pytest.raises(ValueError, match="NaN"):
    scores.iterative_snip(model, nan_vars, [b], sparsity=0.5, rounds=2)
  inf_params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), params)
  with pytest.raises(ValueError, match="infinite"):
    scores.synflow_scores(model, inf_params, input_shape=(3,))
  start = masks_lib.map_prunable(
    lambda w: jnp.zeros(w.shape, bool), params, prunable=kernel_paths(params)
  )
  with pytest.raises(ValueError, match="sparsity"):
    scores.synflow(model, params, input_shape=(3,), sparsity=0.5, masks=start)
