"""Pruning after training on calibration data (issue 27): the capture against explicit
activations, SparseGPT against the least-squares optimum over its mask and against the
reference algorithm, Wanda against a brute force, N:M patterns (selection, checks,
training with masks, effective sparsity), the registry and the bad input."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from benchmarks import calibration as bench
from sparsejax import calibration, effective, layouts, optim, patterns, pruning
from sparsejax import masks as masks_lib
from sparsejax.scores import calibration as cs

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def lenet():
  """The zoo's LeNet-300-100 (batch norm) and its variables at KEY, initialized once for
  the module (its initialization is a few seconds of op-by-op compiles)."""
  model = sparsejax.models.create("lenet300100")
  return model, model.init(KEY, jnp.ones((1, 28, 28, 1)))


def _normal(seed, shape, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# ------------------------------------------------------------------ hand-written models


def mlp(params, x):
  """16 -> 32 -> 16 -> 8, ReLU, biases on the first layer."""
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  h = jax.nn.relu(h @ params["w2"])
  return h @ params["w3"]


def mlp_params(seed=0):
  return {
    "w1": jnp.asarray(_normal(seed, (16, 32), 0.4)),
    "b1": jnp.asarray(_normal(seed + 1, (32,), 0.1)),
    "w2": jnp.asarray(_normal(seed + 2, (32, 16), 0.3)),
    "w3": jnp.asarray(_normal(seed + 3, (16, 8), 0.3)),
  }


def mlp_activations(params, x):
  """The inputs of each layer, by hand (float64)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64)
  h1 = np.maximum(x @ p["w1"] + p["b1"], 0)
  h2 = np.maximum(h1 @ p["w2"], 0)
  return {"w1": x, "w2": h1, "w3": h2}


def cnn(params, x):
  """Conv 3x3 stride 2 'SAME' (NHWC/HWIO, 3 -> 4 channels), ReLU, Dense to 5."""
  y = jax.lax.conv_general_dilated(
    x, params["conv"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  y = jax.nn.relu(y)
  return y.reshape(y.shape[0], -1) @ params["dense"]


def cnn_params(seed=0):
  return {
    "conv": jnp.asarray(_normal(seed, (3, 3, 3, 4), 0.3)),
    "dense": jnp.asarray(_normal(seed + 1, (64, 5), 0.2)),
  }


def cnn_patches(x):
  """Explicit patches [N * 4 * 4, 27] of an 8x8x3 input for the 3x3 stride-2 'SAME'
  convolution (padding 0 before, 1 after: XLA's SAME), columns (ky, kx, c)."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  padded = np.zeros((n, 9, 9, 3))
  padded[:, :8, :8] = x
  rows = []
  for b in range(n):
    for oy in range(4):
      for ox in range(4):
        rows.append(padded[b, 2 * oy : 2 * oy + 3, 2 * ox : 2 * ox + 3, :].reshape(-1))
  return np.stack(rows)


# ------------------------------------------------------------------ capture


def test_capture_equals_the_explicit_activations_of_a_hand_written_mlp():
  params = mlp_params()
  xs = [jnp.asarray(_normal(10, (5, 16))), jnp.asarray(_normal(11, (3, 16)))]
  stats = calibration.capture(mlp, params, xs)
  full = calibration.capture(mlp, params, xs, stat="diag")
  acts = [mlp_activations(params, x) for x in xs]
  assert set(stats) == {"w1", "w2", "w3"}
  for name in stats:
    x = np.concatenate([a[name] for a in acts])
    np.testing.assert_allclose(np.asarray(stats[name].hessian), x.T @ x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(full[name].diag), (x * x).sum(0), rtol=1e-5, atol=1e-4)
    assert full[name].hessian is None
    assert stats[name].rows == full[name].rows == 8


def test_capture_equals_the_explicit_patches_of_a_hand_written_cnn():
  params = cnn_params()
  x = jnp.asarray(_normal(3, (2, 8, 8, 3)))
  stats = calibration.capture(cnn, params, [x])
  p = cnn_patches(x)
  np.testing.assert_allclose(np.asarray(stats["conv"].hessian), p.T @ p, rtol=1e-5, atol=1e-4)
  assert stats["conv"].rows == 2 * 16
  h = jax.nn.relu(
    jax.lax.conv_general_dilated(
      x, params["conv"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  d = np.asarray(h, np.float64).reshape(2, -1)
  np.testing.assert_allclose(np.asarray(stats["dense"].hessian), d.T @ d, rtol=1e-5, atol=1e-4)


def test_capture_of_a_flax_module_with_batch_norm_reads_its_running_statistics(lenet):
  model, variables = lenet
  stats_tree = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])  # not the init's
  variables = {"params": variables["params"], "batch_stats": stats_tree}
  x = jnp.asarray(_normal(4, (6, 28, 28, 1)))
  stats = calibration.capture(model, variables, [{"image": x, "label": jnp.zeros(6, int)}])
  _, inter = model.apply(variables, x, capture_intermediates=True)
  norm_0 = np.asarray(inter["intermediates"]["norm_0"]["__call__"][0], np.float64)
  h1 = np.maximum(norm_0, 0)
  np.testing.assert_allclose(
    np.asarray(stats["dense_1/kernel"].hessian), h1.T @ h1, rtol=1e-4, atol=1e-3
  )


def test_views_multiply_their_input_rows_to_the_ops_output():
  """X @ W.T is the op's output for Dense, convolution (HWIO and OIHW), a transposed
  weight (x @ w.T) and a DenseGeneral with two contracted axes."""

  def model(p, x):
    y = jax.lax.conv_general_dilated(
      x, p["oihw"], (1, 1), ((1, 0), (2, 1)), dimension_numbers=("NHWC", "OIHW", "NHWC")
    )
    y = jax.nn.relu(y).reshape(x.shape[0], 4, -1)  # [N, 4, 14 * 2]
    z = jnp.einsum("nab,abo->no", y, p["general"])
    return jax.nn.relu(z) @ p["transposed"].T

  params = {
    "oihw": jnp.asarray(_normal(0, (2, 3, 2, 3), 0.3)),
    "general": jnp.asarray(_normal(1, (4, 28, 6), 0.2)),
    "transposed": jnp.asarray(_normal(2, (5, 6), 0.3)),
  }
  x = jnp.asarray(_normal(5, (2, 4, 13, 3)))
  traced = sparsejax.trace(model, x, variables=params)
  views = layouts.of(traced).views
  assert {p: (v.outputs, v.inputs) for p, v in views.items()} == {
    "oihw": (2, 18),
    "general": (6, 112),
    "transposed": (5, 6),
  }
  prog = traced.program
  env = dict(zip(prog.param_ids, jax.tree.leaves(params)))
  env[prog.x_ids[0]] = x
  get = lambda i: env[i] if i in env else prog.consts[i]
  seen = set()
  for k, e in enumerate(prog.eqns):
    vals = [get(i) for i in e.ins]
    outs = sparsejax.connectivity.program.bind(e, *vals)
    env.update(zip(e.outs, outs))
    for path, view in views.items():
      for site in view.sites:
        if site.eqn != k:
          continue
        rows = layouts.input_rows(e, site, vals[site.x_operand])
        y = outs[0]
        if e.prim.name == "conv_general_dilated":
          spec = e.params["dimension_numbers"][2]
          y = jnp.transpose(y, (spec[0], *spec[2:], spec[1]))
        got = rows @ view.to_matrix(params[path]).T
        np.testing.assert_allclose(got, np.asarray(y).reshape(got.shape), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(view.from_matrix(view.to_matrix(params[path])), params[path])
        seen.add(path)
  assert seen == set(views)


def test_layerwise_capture_sees_the_earlier_layers_pruned():
  """Each layer's statistics come from inputs computed with the earlier layers already
  pruned (the pruned first layer's zeros change the second layer's inputs)."""
  params = mlp_params()
  xs = [jnp.asarray(_normal(12, (8, 16)))]
  seen = {}

  def prune_layer(path, w, stats):
    seen[path] = np.asarray(stats.hessian)
    keep = jnp.arange(w.shape[1])[None, :] % 2 == 0  # every other input
    keep = jnp.broadcast_to(keep, w.shape)
    return w * 1.5, keep, jnp.abs(w)

  result = calibration.layerwise(mlp, params, xs, prune_layer)
  pruned = {k: np.asarray(v) for k, v in result.params.items()}
  for name in ("w1", "w2", "w3"):
    w = np.asarray(params[name]).T
    keep = np.arange(w.shape[1])[None, :] % 2 == 0
    np.testing.assert_allclose(pruned[name].T, np.where(keep, 1.5 * w, 0.0), rtol=1e-6)
    assert np.array_equal(np.asarray(result.masks[name]).T, np.broadcast_to(keep, w.shape))
  acts = mlp_activations({**params, **result.params}, xs[0])
  for name in ("w1", "w2", "w3"):
    x = acts[name]
    np.testing.assert_allclose(seen[name], x.T @ x, rtol=1e-4, atol=1e-3)
  assert result.masks["b1"] is None and np.array_equal(result.params["b1"], params["b1"])


def test_layers_fed_by_one_input_are_one_stage():
  """q, k, v-like projections of one input are captured in one pass; what they feed
  comes after."""

  def model(p, x):
    q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
    return (q * k + v) @ p["o"]

  params = {n: jnp.asarray(_normal(i, (8, 8))) for i, n in enumerate("qkvo")}
  traced = sparsejax.trace(model, (8,), variables=params)
  assert calibration._stages(traced, traced.prunable_paths, True) == [("q", "k", "v"), ("o",)]
  assert calibration._stages(traced, traced.prunable_paths, False) == [("q", "k", "v", "o")]
  traced_mlp = sparsejax.trace(mlp, (16,), variables=mlp_params())
  assert calibration._stages(traced_mlp, traced_mlp.prunable_paths, True) == [
    ("w1",),
    ("w2",),
    ("w3",),
  ]


def test_traced_at_another_batch_is_the_same_model_and_cached():
  traced = sparsejax.trace(mlp, (16,), variables=mlp_params(), prunable=["w2", "w3"])
  at = traced.at(jnp.ones((7, 16)))
  assert at.input.shape == (7, 16) and at.prunable_paths == ["w2", "w3"]
  assert traced.at(jnp.ones((7, 16))) is at and at.at(jnp.ones((1, 16))) is traced


# ------------------------------------------------------------------ SparseGPT


def _layer_problem(seed, rows=24, cols=64, n=400):
  """A layer W [rows, cols] and correlated calibration inputs X [n, cols] (float64)."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(cols, cols)) / np.sqrt(cols)
  x = rng.normal(size=(n, cols)) @ mix + 0.3 * rng.normal(size=(n, cols))
  x = x * np.exp(0.5 * rng.normal(size=cols))  # features of different scales
  return rng.normal(size=(rows, cols)), x


def _error(w, w_new, x):
  return float(np.sum((x @ (w - w_new).T) ** 2))


def _least_squares(w, x, keep):
  """The optimum over the mask: per row, argmin ||x (w - v)||^2 with v zero off keep."""
  h = x.T @ x
  out = np.zeros_like(w)
  for r in range(w.shape[0]):
    s = np.flatnonzero(keep[r])
    if s.size:
      out[r, s] = np.linalg.solve(h[np.ix_(s, s)], (h @ w[r])[s])
  return out


def _one_layer(p, x):
  return x @ p["w"]


#: SparseGPT's reconstruction error over the least-squares optimum of the mask it chose,
#: at most (measured on seeds 0-5 of these layers: 1.12-1.43, highest at 2:4; its sweep
#: never revisits the kept weights left of a pruned one, and it inverts a dampened H).
SPARSEGPT_FACTOR = 1.75


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"sparsity": 0.75}, {"pattern": "2:4"}])
def test_sparsegpt_is_near_the_optimum_of_its_mask_and_beats_wanda_and_magnitude(seed, target):
  w, x = _layer_problem(seed)
  params = {"w": jnp.asarray(w.T, jnp.float32)}
  batches = [jnp.asarray(x[:250], jnp.float32), jnp.asarray(x[250:], jnp.float32)]
  common = dict(key=KEY, model=_one_layer, variables=params, trained_params=params, batches=batches)
  common["input_shape"] = (64,)
  sgpt = pruning.prune_with_params("sparsegpt", **common, **target)
  new = np.asarray(sgpt.params["w"], np.float64).T
  keep = np.asarray(sgpt.masks["w"]).T
  assert np.all(new[~keep] == 0)
  optimum = _error(w, _least_squares(w, x, keep), x)
  err = _error(w, new, x)
  assert optimum <= err <= SPARSEGPT_FACTOR * optimum
  for other in ("wanda", "magnitude/uniform"):
    res = pruning.prune_with_params(other, **common, **target)
    assert np.sum(res.masks["w"]) == np.sum(keep)  # the same count
    assert err < _error(w, np.asarray(res.params["w"], np.float64).T, x), other


@pytest.mark.parametrize("kw", [{"prunen": 2, "prunem": 4}, {"prunen": 4, "prunem": 8}])
def test_sparsegpt_equals_the_reference_algorithm_at_n_m(kw):
  """At N:M (no count conventions differ) the weights and masks are the reference's
  (the NumPy port of IST-DASLab/sparsegpt's fasterprune), with dead inputs."""
  w, x = _layer_problem(3, rows=16, cols=48)
  x[:, 5] = 0.0  # a dead input: the reference zeroes its column and sets H_jj = 1
  h = (x.T @ x).astype(np.float32)
  ref = bench.reference_fasterprune(w, h, 0.5, blocksize=16, **kw)
  new, keep, _ = cs.sparsegpt_layer(
    w, h, pattern=(kw["prunem"] - kw["prunen"], kw["prunem"]), blocksize=16
  )
  np.testing.assert_array_equal(np.asarray(keep), ref != 0)
  np.testing.assert_allclose(np.asarray(new), ref, rtol=1e-4, atol=1e-5)


def test_sparsegpt_unstructured_differs_from_the_reference_only_by_its_exact_count():
  """Unstructured, the reference's `<=` threshold prunes one weight more per block; with
  that count the masks and weights are the reference's."""
  w, x = _layer_problem(4, rows=8, cols=40)
  h = (x.T @ x).astype(np.float32)
  ref = bench.reference_fasterprune(w, h, 0.5, blocksize=16)
  blocks = [(0, 16), (16, 32), (32, 40)]
  assert np.count_nonzero(ref) == 8 * 40 - sum(int(8 * (b - a) * 0.5) + 1 for a, b in blocks)
  new, keep, _ = cs.sparsegpt_layer(w, h, kept=8 * 40 // 2, blocksize=16)
  assert int(np.sum(keep)) == 160
  # the reference's counts, as our per-block shares, give the reference's result
  counts = np.array([8 * (b - a) - int(8 * (b - a) * 0.5) - 1 for a, b in blocks], np.int32)
  new, keep, _, ok = cs._sparsegpt(
    jnp.asarray(w, jnp.float32),
    jnp.asarray(h),
    jnp.asarray(counts),
    jnp.float32(0.01),
    blocksize=16,
    n=None,
    m=None,
  )
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(keep), ref != 0)
  np.testing.assert_allclose(np.asarray(new), ref, rtol=1e-4, atol=1e-5)


def test_inverse_cholesky_is_the_upper_factor_of_the_inverse():
  _, x = _layer_problem(5, cols=32)
  h = x.T @ x + np.eye(32)
  u = np.asarray(cs.inverse_cholesky(jnp.asarray(h, jnp.float32)), np.float64)
  assert np.allclose(u, np.triu(u)) and np.all(np.diag(u) > 0)
  np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=2e-3, atol=1e-6)


def test_block_counts_share_the_layer_count():
  for rows, cols, kept, size in [(8, 40, 160, 16), (300, 784, 94080, 128), (3, 5, 7, 2)]:
    c = cs.block_counts(rows, cols, kept, size)
    widths = np.diff(np.minimum(np.arange(0, cols + size, size), cols))[: len(c)]
    assert c.sum() == kept and np.all((0 <= c) & (c <= rows * widths))
    assert np.all(np.abs(c - kept * widths / cols) <= 1)


# ------------------------------------------------------------------ Wanda


def _brute_wanda(params, xs, sparsity=None, pattern=None, compare="row", sequential=True):
  """Wanda on the MLP by hand: each layer's input norms with the earlier layers pruned
  (sequential) or dense, |W| * norm, the best per row (counts as the uniform quota,
  spread over rows, the first rows one more), per layer, or per group of M."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = np.concatenate([np.asarray(b, np.float64) for b in xs])
  masks = {}
  for name in ("w1", "w2", "w3"):
    source = p if sequential else {k: np.asarray(v, np.float64) for k, v in params.items()}
    acts = mlp_activations(source, x)[name]
    w = p[name].T  # [out, in]
    score = np.abs(w) * np.sqrt((acts**2).sum(0))[None, :]
    out, width = w.shape
    order = np.argsort(-score, axis=1, kind="stable")
    rank = np.argsort(order, axis=1, kind="stable")
    if pattern is not None:
      n, m = pattern
      g = score.reshape(out, -1, m)
      gr = np.argsort(np.argsort(-g, axis=-1, kind="stable"), axis=-1, kind="stable")
      keep = (gr < n).reshape(out, width)
    elif compare == "row":
      kept = cs.kept_count(w.shape, sparsity)
      per_row = kept // out + (np.arange(out) < kept % out)
      keep = rank < per_row[:, None]
    else:
      kept = cs.kept_count(w.shape, sparsity)
      flat = np.argsort(-score.reshape(-1), kind="stable")[:kept]
      keep = np.zeros(w.size, bool)
      keep[flat] = True
      keep = keep.reshape(w.shape)
    masks[name] = keep.T
    p[name] = np.where(keep, w, 0).T
  return masks


@pytest.mark.parametrize(
  "kw",
  [
    {"sparsity": 0.6},
    {"sparsity": 0.5, "compare": "layer"},
    {"pattern": (2, 4)},
    {"sparsity": 0.7, "sequential": False},
  ],
)
def test_wanda_masks_equal_a_brute_force(kw):
  params = mlp_params(7)
  xs = [jnp.asarray(_normal(20, (12, 16))), jnp.asarray(_normal(21, (9, 16)))]
  got = cs.wanda(mlp, params, xs, **kw)
  want = _brute_wanda(params, xs, **kw)
  for name in want:
    np.testing.assert_array_equal(np.asarray(got.masks[name]), want[name])
    np.testing.assert_array_equal(
      np.asarray(got.params[name]), np.where(want[name], params[name], 0)
    )


def test_obd_is_half_the_squared_wanda_score_and_taylor_is_snip_on_trained_weights():
  params = mlp_params(8)
  xs = [jnp.asarray(_normal(22, (10, 16)))]
  scores = cs.obd(mlp, params, xs)
  acts = mlp_activations(params, xs[0])
  for name in ("w1", "w2", "w3"):
    norms = (acts[name] ** 2).sum(0)
    want = 0.5 * np.asarray(params[name], np.float64) ** 2 * norms[:, None]
    np.testing.assert_allclose(np.asarray(scores[name]), want, rtol=1e-4, atol=1e-6)
  batch = [{"x": xs[0], "y": jnp.arange(10) % 8}]
  loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(mlp(p, b["x"]), b["y"]).mean()
  taylor = cs.taylor(mlp, params, batch, loss=loss, prunable=["w1", "w2", "w3"])
  g = jax.grad(loss)(params, batch[0])
  for name in ("w1", "w2", "w3"):
    np.testing.assert_allclose(
      np.asarray(taylor[name]), np.abs(np.asarray(g[name]) * np.asarray(params[name])), rtol=1e-5
    )


# ------------------------------------------------------------------ N:M patterns


@pytest.mark.parametrize("pruner", ["magnitude/uniform", "wanda", "sparsegpt", "obd", "random/erk"])
@pytest.mark.parametrize("pattern", ["2:4", "1:8", "3:4"])
def test_n_m_masks_keep_exactly_n_of_every_m(pruner, pattern):
  params = mlp_params(9)
  xs = [jnp.asarray(_normal(23, (40, 16)))]
  r = pruning.prune_with_params(
    pruner,
    key=KEY,
    model=mlp,
    variables=params,
    trained_params=params,
    batches=xs,
    input_shape=(16,),
    pattern=pattern,
    prunable=["w1", "w2", "w3"],
  )
  n, m = patterns.parse(pattern)
  for name in ("w1", "w2", "w3"):
    groups = np.asarray(r.masks[name]).T.reshape(params[name].shape[1], -1, m).sum(-1)
    assert np.all(groups == n), (name, groups)
    assert np.all(np.asarray(r.params[name])[~np.asarray(r.masks[name])] == 0)
  traced = sparsejax.trace(mlp, (16,), variables=params, prunable=["w1", "w2", "w3"])
  patterns.check(traced, r.masks, pattern)
  assert masks_lib.direct_sparsity(r.masks) == pytest.approx(1 - n / m)


def test_n_m_on_a_convolution_groups_its_patch():
  params = cnn_params(2)
  params["conv"] = jnp.asarray(_normal(2, (3, 3, 4, 4)))  # 4 input channels
  model = lambda p, x: cnn(p, x)
  x = jnp.asarray(_normal(6, (2, 8, 8, 4)))
  r = pruning.prune_with_params(
    "sparsegpt",
    key=KEY,
    model=model,
    variables=params,
    trained_params=params,
    batches=[x],
    input_shape=(8, 8, 4),
    pattern="2:4",
    prunable=["conv"],
  )
  # the patch's columns are (ky, kx, c): groups of 4 are the input channels of one offset
  assert np.all(np.asarray(r.masks["conv"]).sum(axis=2) == 2)


def test_check_refuses_a_group_with_more_than_n():
  params = mlp_params()
  traced = sparsejax.trace(mlp, (16,), variables=params)
  good = patterns.n_m_masks(traced, masks_lib.map_masks(jnp.abs, params | {"b1": None}), "2:4")
  good = {**good, "b1": None}
  patterns.check(traced, good, "2:4")
  patterns.check(traced, good, "3:4")  # at most N
  bad = dict(good, w2=good["w2"].at[0, 0].set(True).at[1, 0].set(True).at[2, 0].set(True))
  with pytest.raises(ValueError, match=r"masks\['w2'\] breaks pattern='2:4'.*output unit 0"):
    patterns.check(traced, bad, "2:4")


def test_n_m_pattern_survives_training_with_masks():
  params = mlp_params(11)
  xs = jnp.asarray(_normal(24, (64, 16)))
  labels = jnp.arange(64) % 8
  r = pruning.prune_with_params(
    "wanda",
    key=KEY,
    model=mlp,
    variables=params,
    trained_params=params,
    batches=[xs],
    input_shape=(16,),
    pattern="2:4",
    prunable=["w1", "w2", "w3"],
  )
  tx = optim.with_masks(optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, 0.9)), r.masks)
  p, state = r.params, None
  state = tx.init(p)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(mlp(p, xs), labels).mean()
  for _ in range(20):
    g = jax.grad(loss)(p)
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  assert loss(p) < loss(r.params)  # it trained
  nonzero = masks_lib.map_masks(lambda m, w: w != 0, r.masks, p)
  traced = sparsejax.trace(mlp, (16,), variables=params, prunable=["w1", "w2", "w3"])
  patterns.check(traced, nonzero, "2:4")
  for name in ("w1", "w2", "w3"):
    assert np.array_equal(np.asarray(nonzero[name]), np.asarray(r.masks[name]))


def test_an_n_m_mask_can_lose_whole_units_and_effective_sparsity_counts_them():
  """2:4 where every output row of the second layer drops hidden units 2 and 3: they
  are dead, and so are the first layer's (2:4) weights into them."""

  def model(p, x):
    return jax.nn.relu(x @ p["a"]) @ p["b"]

  params = {"a": jnp.ones((8, 4)), "b": jnp.ones((4, 2))}
  traced = sparsejax.trace(model, (8,), variables=params)
  scores = {"a": jnp.ones((8, 4)), "b": jnp.asarray([[4.0, 4.0], [3.0, 3.0], [1, 1], [0, 0]])}
  m = patterns.n_m_masks(traced, scores, "2:4")
  patterns.check(traced, m, "2:4")
  assert np.asarray(m["b"]).tolist() == [[True, True], [True, True], [False, False]] + [
    [False, False]
  ]
  assert masks_lib.direct_sparsity(m) == pytest.approx(20 / 40)
  eff = effective.effective_masks(traced, m)
  assert not np.asarray(eff["a"])[:, 2:].any() and np.asarray(m["a"])[:, 2:].sum() == 8
  assert effective.effective_sparsity(traced, m) == pytest.approx(28 / 40)


# ------------------------------------------------------------------ the registry, prune


def test_the_calibration_pruners_are_registered_after_training():
  for name in ("wanda", "wanda/layer", "sparsegpt", "obd", "taylor"):
    p = pruning.get_pruner(name)
    assert p.after_training and p.needs_data, name
  assert pruning.get_pruner("sparsegpt").updates_weights
  assert pruning.get_pruner("wanda").layerwise and not pruning.get_pruner("wanda").updates_weights
  assert pruning.get_pruner("obd").quota is None and not pruning.get_pruner("obd").layerwise


def test_a_layerwise_ranking_keeps_its_masks_at_the_target():
  params = mlp_params(12)
  xs = [jnp.asarray(_normal(25, (30, 16)))]
  kw = dict(key=KEY, model=mlp, variables=params, trained_params=params, batches=xs)
  kw["input_shape"] = (16,)
  for name in ("wanda", "sparsegpt"):
    direct = pruning.prune(name, sparsity=0.5, **kw)
    ranking = pruning.ranking_for(name, sparsity=0.5, **kw)
    again = pruning.masks_from_ranking(ranking, 0.5)
    for leaf in ("w1", "w2", "w3"):
      np.testing.assert_array_equal(np.asarray(again[leaf]), np.asarray(direct[leaf]))
    eff = pruning.prune(name, sparsity=0.7, pruning_type="effective", **kw)
    traced = sparsejax.trace(mlp, (16,), variables=params)
    assert effective.effective_sparsity(traced, eff) >= 0.7 - 1e-9


def test_prune_with_params_of_a_ranking_pruner_masks_the_scored_params():
  params = mlp_params(13)
  trained = jax.tree.map(lambda w: w * 2, params)
  r = pruning.prune_with_params(
    "magnitude/global",
    key=KEY,
    model=mlp,
    variables=params,
    trained_params=trained,
    sparsity=0.5,
    input_shape=(16,),
  )
  want = pruning.prune(
    "magnitude/global",
    key=KEY,
    model=mlp,
    variables=params,
    trained_params=trained,
    sparsity=0.5,
    input_shape=(16,),
  )
  assert jax.tree.all(jax.tree.map(np.array_equal, r.masks, want))
  assert jax.tree.all(jax.tree.map(np.array_equal, r.params, masks_lib.apply(trained, want)))


def test_sparsegpt_on_a_trained_flax_model_with_image_batches(lenet):
  """The zoo's LeNet-300-100 with batch norm, pruned from image/label batches; the
  result is a valid mask at the exact per-layer counts and SparseGPT's outputs stay
  closer to the dense model's than magnitude's."""
  model, variables = lenet
  x = jnp.asarray(_normal(30, (64, 28, 28, 1)))
  batches = [{"image": x[:32], "label": jnp.zeros(32, int)}, {"image": x[32:]}]
  traced = sparsejax.trace(model, (28, 28, 1), variables=variables)
  kw = dict(key=KEY, model=traced, variables=variables, trained_params=variables["params"])
  sgpt = pruning.prune_with_params("sparsegpt", sparsity=0.8, batches=batches, **kw)
  mag = pruning.prune_with_params("magnitude/uniform", sparsity=0.8, **kw)
  for m in (sgpt.masks, mag.masks):
    assert masks_lib.layer_sparsities(m) == pytest.approx(
      {"dense_0/kernel": 0.8, "dense_1/kernel": 0.8, "dense_2/kernel": 0.8}
    )
  dense = model.apply(variables, x)
  err = lambda p: float(jnp.mean((model.apply({**variables, "params": p}, x) - dense) ** 2))
  assert err(sgpt.params) < err(mag.params)


# ------------------------------------------------------------------ bad input


def _kw(**over):
  params = mlp_params()
  kw = dict(
    key=KEY,
    model=mlp,
    variables=params,
    trained_params=params,
    batches=[jnp.asarray(_normal(0, (8, 16)))],
    input_shape=(16,),
    sparsity=0.5,
  )
  kw.update(over)
  return kw


@pytest.mark.parametrize(
  "over, match",
  [
    ({"sparsity": None, "pattern": "4:2"}, r"pattern='4:2': N=4 is larger than M=2"),
    ({"sparsity": None, "pattern": "0:4"}, r"pattern='0:4': N and M must be positive"),
    ({"sparsity": None, "pattern": "2-4"}, r"pattern='2-4' must be 'N:M'"),
    ({"sparsity": None, "pattern": "2:32"}, r"pattern='2:32': M=32 does not divide .*'w1' \(16\)"),
    ({"pattern": "2:4", "sparsity": 0.6}, r"sparsity=0.6 contradicts pattern='2:4'"),
    ({"sparsity": None}, r"sparsity=None and pattern=None"),
    ({"batches": None}, r"pruner='sparsegpt' scores weights on calibration data: pass batches="),
    ({"batches": []}, r"pass batches="),
    ({"batches": iter([])}, r"batches is empty"),
    ({"batches": [{"x": np.ones((2, 16))}]}, r"batches\[0\] has no 'image' entry"),
    ({"pruning_type": "effective", "sparsity": None, "pattern": "2:4"}, r"pruning_type='eff"),
    ({"score_kwargs": {"damp": -1}}, r"damp=-1 must be a finite number >= 0"),
    ({"score_kwargs": {"blocksize": 6}, "sparsity": None, "pattern": "2:4"}, r"blocksize=6 must"),
  ],
)
def test_bad_input_is_named(over, match):
  with pytest.raises(ValueError, match=match):
    pruning.prune_with_params("sparsegpt", **_kw(**over))


def test_a_singular_hessian_without_dampening_is_named():
  # 8 calibration rows for 16 inputs: H = X^T X has rank 8
  with pytest.raises(ValueError, match=r"Hessian of 'w1' .* not positive definite with damp=0"):
    pruning.prune_with_params("sparsegpt", **_kw(score_kwargs={"damp": 0.0}))
  pruning.prune_with_params("sparsegpt", **_kw())  # the reference's dampening: fine


def test_sparsegpt_effective_with_params_and_lookups_are_refused():
  with pytest.raises(ValueError, match=r"pruning_type='effective': pruner 'sparsegpt' updates"):
    pruning.prune_with_params("sparsegpt", **_kw(pruning_type="effective"))
  with pytest.raises(ValueError, match=r"compare='col' is not allowed"):
    cs.wanda(mlp, mlp_params(), _kw()["batches"], sparsity=0.5, compare="col")

  class Embedder(nn.Module):
    @nn.compact
    def __call__(self, ids):
      return nn.Dense(4, name="head")(nn.Embed(10, 8, name="embed")(ids))

  model = Embedder()
  ids = jnp.zeros((2, 5), jnp.int32)
  variables = model.init(KEY, ids)
  with pytest.raises(ValueError, match=r"'embed/embedding' is only looked up.*prunable="):
    cs.wanda(model, variables, [ids], sparsity=0.5)
  r = cs.wanda(model, variables, [ids], sparsity=0.5, prunable=lambda p: "embed" not in p)
  assert r.masks["embed"]["embedding"] is None and r.masks["head"]["kernel"] is not None


def test_readme_calibration_example_runs():
  """The README's SparseGPT-to-2:4 example runs on this checkout as printed."""
  import os
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  readme = open(os.path.join(repo, "README.md")).read()
  section = readme.split("### Pruning a trained model with calibration data", 1)[1]
  code = section.split("```python", 1)[1].split("```", 1)[0]
  assert "sparsegpt" in code and 'pattern="2:4"' in code
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    cwd="/",
    timeout=600,
    env={**os.environ, "PYTHONPATH": repo},
  )
  assert out.returncode == 0, out.stderr[-3000:]
  direct, eff = (float(v) for v in out.stdout.split()[-2:])
  assert direct == 0.5 and eff >= direct
