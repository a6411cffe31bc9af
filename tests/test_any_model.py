"""Effective masks of plain Flax models (no sparsejax layers) against a brute-force graph.

Random networks written as Flax users write them (tests/reference_graph.py, PlainNet)
go through sparsejax.effective (the connectivity transform of their traced program);
their unit-level graphs are built independently (build_plain_graph) and searched.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsejax
from sparsejax import connectivity, effective
from sparsejax import masks as masks_lib
from tests import reference_graph as ref

HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LEVELS = (0.0, 0.2, 0.5, 0.7, 0.85, 0.95, 1.0)


def _out(n, k, s, d, p):
  return ref._geometry(n, k, s, d, p)[0]


def _ops(shape0):
  @st.composite
  def inner(draw):
    shape, ops = shape0, []
    for _ in range(draw(st.integers(1, 4))):
      h, w, c = shape
      kind = draw(st.sampled_from(("conv", "conv", "pool", "bn", "ln", "res", "concat")))
      if kind == "conv":
        groups = draw(st.sampled_from(sorted({g for g in (1, 2, c) if c % g == 0})))
        f = groups * draw(st.integers(1, 2))
        k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        s = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        mode = draw(st.sampled_from(("SAME", "VALID", "explicit")))
        if mode == "explicit":
          pad = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2))
          per_axis = pad
        else:
          pad, per_axis = mode, (mode, mode)
        try:
          shape = (
            _out(h, k[0], s[0], d[0], per_axis[0]),
            _out(w, k[1], s[1], d[1], per_axis[1]),
            f,
          )
        except ValueError:
          continue
        ops.append(
          ("conv", f, k, s, pad, d, groups, draw(st.sampled_from((None, "relu", "tanh", "gelu"))))
        )
      elif kind == "pool":
        win = (draw(st.integers(1, min(3, h))), draw(st.integers(1, min(3, w))))
        s = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        mode = draw(st.sampled_from(("SAME", "VALID", "explicit")))
        if mode == "explicit":
          pad = tuple(
            (draw(st.integers(0, win[i] - 1)), draw(st.integers(0, win[i] - 1))) for i in range(2)
          )
          per_axis = pad
        else:
          pad, per_axis = mode, (mode, mode)
        shape = (_out(h, win[0], s[0], 1, per_axis[0]), _out(w, win[1], s[1], 1, per_axis[1]), c)
        ops.append(("pool", draw(st.sampled_from(("max", "avg"))), win, s, pad))
      elif kind == "bn":
        ops.append(("bn", draw(st.booleans())))
      elif kind == "ln":
        ops.append(("ln",))
      elif kind == "res":
        f, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        ops.append(("res", f, stride))
        shape = (-(-h // stride), -(-w // stride), f)
      else:
        f = draw(st.integers(1, 2))
        ops.append(("concat", f))
        shape = (h, w, 2 * f)
    head = draw(st.sampled_from(("flatten", "gap", "tokens")))
    if head == "tokens":
      ops += [
        ("tokens",),
        ("mix", draw(st.integers(1, 3))),
        ("dense", draw(st.integers(1, 3)), None),
      ]
    else:
      ops += [(head,), ("dense", draw(st.integers(1, 3)), None)]
    return tuple(ops)

  return inner()


@st.composite
def mlp_archs(draw):
  n = draw(st.integers(1, 6))
  ops = tuple(
    ("dense", draw(st.integers(1, 6)), draw(st.sampled_from(("tanh", "gelu", None))))
    for _ in range(draw(st.integers(1, 4)))
  )
  return ops, (n,)


def _masks(draw, graph, params):
  """Random masks (mask tree, per graph layer list)."""
  by_path = {}
  for layer in graph.layers:
    density = 1 - draw(st.sampled_from(LEVELS))
    seed = draw(st.integers(0, 2**31 - 1))
    by_path[layer.path] = np.random.default_rng(seed).random(layer.kernel_shape) < density
  tree = jax.tree_util.tree_map_with_path(
    lambda p, s: (
      jnp.asarray(by_path[masks_lib.path_str(p[:-1])])
      if masks_lib.path_str(p[-1:]) == "kernel"
      else None
    ),
    params,
  )
  return tree, [by_path[l.path] for l in graph.layers]


def check(draw, spec, input_shape, rounds=2):
  model = ref.PlainNet(spec)
  x = jnp.ones((1,) + tuple(input_shape))
  variables = model.init(jax.random.key(0), x)
  graph = ref.build_plain_graph(spec, input_shape)
  for _ in range(rounds):
    tree, per_layer = _masks(draw, graph, variables["params"])
    want = ref.reference(graph, per_layer)
    got = effective.connectivity(model, tree, x, variables=variables)
    eff = {
      masks_lib.path_str(p[:-1]): np.asarray(m)
      for p, m in jax.tree_util.tree_leaves_with_path(got.masks, is_leaf=lambda v: v is None)
      if m is not None
    }
    for layer, w in zip(graph.layers, want.masks):
      np.testing.assert_array_equal(eff[layer.path], w, err_msg=f"{layer.path} in {spec}")
    assert got.active_units == want.active_units, spec
    assert dict(got.total_units) == want.total_units, spec
    assert got.active_inputs == want.active_inputs, spec


@settings(max_examples=12, **HYP)
@given(st.data(), mlp_archs())
def test_plain_mlp_matches_reference(data, arch):
  check(data.draw, *arch)


@settings(max_examples=30, **HYP)
@given(st.data(), st.integers(2, 6), st.integers(2, 6), st.integers(1, 3))
def test_plain_cnn_matches_reference(data, h, w, c):
  spec = data.draw(_ops((h, w, c)))
  check(data.draw, spec, (h, w, c))


# --------------------------------------------------------------------------- functions, errors


def _mlp_fn(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"]


def _mlp_params():
  return {"w1": jnp.ones((3, 4)), "b1": jnp.zeros(4), "w2": jnp.ones((4, 2))}


def test_apply_function_matches_mlp_reference():
  params = _mlp_params()
  rng = np.random.default_rng(0)
  for _ in range(5):
    k1, k2 = rng.random((3, 4)) < 0.5, rng.random((4, 2)) < 0.5
    masks = {"w1": jnp.asarray(k1), "b1": None, "w2": jnp.asarray(k2)}
    got = effective.connectivity(_mlp_fn, masks, (3,), params=params)
    eff, units, inputs = ref.mlp_reference([k1, k2])
    np.testing.assert_array_equal(got.masks["w1"], eff[0])
    np.testing.assert_array_equal(got.masks["w2"], eff[1])
    assert list(got.active_units.values()) == units
    assert got.active_inputs == inputs


def test_default_prunable_leaves_are_linear_weights_in_data_flow_order():
  params = {"b_first": {"kernel": jnp.ones((3, 4))}, "a_last": {"kernel": jnp.ones((4, 2))}}
  fn = lambda p, x: jnp.tanh(x @ p["b_first"]["kernel"]) @ p["a_last"]["kernel"]
  traced = sparsejax.trace(fn, (3,), params=params)
  assert traced.prunable_paths == ["b_first/kernel", "a_last/kernel"]
  assert effective.prunable_paths(fn, (3,), params=params) == traced.prunable_paths  # the alias
  only = lambda path: path.startswith("a_")
  assert sparsejax.trace(fn, (3,), params=params, prunable=only).prunable_paths == ["a_last/kernel"]
  assert traced.narrow(only).prunable_paths == ["a_last/kernel"]
  with pytest.raises(ValueError, match="prunable selects.*enter no linear op"):
    sparsejax.trace(_mlp_fn, (3,), params=_mlp_params(), prunable=lambda p: p == "b1")


def test_masked_kernel_inside_the_model_and_weight_tying():
  # the kernel passes through casts, reshapes and a product with a constant mask
  const_mask = np.array([[1, 0], [1, 1], [0, 0]], np.float32)

  def fn(p, x):
    w = (p["w"].astype(jnp.bfloat16).reshape(3, 2) * const_mask).astype(jnp.float32)
    return (x @ w) @ p["w"].reshape(3, 2).T[:, :3]

  params = {"w": jnp.ones((6,))}
  masks = {"w": jnp.ones((6,), bool)}
  got = effective.connectivity(fn, masks, (3,), params=params)
  assert got.masks["w"].shape == (6,)
  assert bool(got.masks["w"].any())


def test_unsupported_primitive_names_it_and_the_source_line():
  def data_loop(p, x):  # a trip count that depends on the input: no single graph
    return jax.lax.while_loop(
      lambda c: jnp.sum(c) < 3.0, lambda c: jnp.tanh(c @ p["w"]) + 1.0, x @ p["w"]
    )

  params = {"w": jnp.ones((3, 3))}
  with pytest.raises(
    ValueError, match=r"primitive 'while' at .*test_any_model.py:\d+.*depends on the input"
  ):
    effective.connectivity(data_loop, {"w": jnp.ones((3, 3), bool)}, (3,), params=params)

  def eigen(p, x):  # a primitive without a connectivity rule
    h = x @ p["w"]
    return jnp.linalg.eigh(h[:, None] * h[None, :])[0]

  with pytest.raises(ValueError, match=r"primitive 'eigh' at .*test_any_model.py:\d+"):
    effective.connectivity(eigen, {"w": jnp.ones((3, 3), bool)}, (3,), params=params)

  def counted(p, x):  # a loop whose trip count is a constant: unrolled, supported
    return jax.lax.while_loop(
      lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])), (0, x)
    )[1]

  got = effective.connectivity(counted, {"w": jnp.ones((3, 3), bool)}, (3,), params=params)
  assert got.active_inputs == 3


def test_input_dependent_cond_raises():
  def fn(p, x):
    h = x @ p["w"]
    return jax.lax.cond(h.sum() > 0, lambda h: h, lambda h: -h, h)

  params = {"w": jnp.ones((3, 3))}
  with pytest.raises(
    ValueError,
    match=r"primitive 'cond' at .*test_any_model.py:\d+.*"
    "branches on a value that depends on the input",
  ):
    effective.connectivity(fn, {"w": jnp.ones((3, 3), bool)}, (3,), params=params)


def test_constant_cond_is_resolved():
  def fn(p, x):
    return jax.lax.cond(p["flag"] > 0, lambda h: h @ p["w"], lambda h: h * 0, x)

  params = {"w": jnp.ones((3, 3)), "flag": 1}
  with pytest.raises(ValueError, match="primitive 'cond'"):  # a parameter: not constant
    effective.connectivity(fn, {"w": jnp.ones((3, 3), bool), "flag": None}, (3,), params=params)
  fn2 = lambda p, x: jax.lax.cond(True, lambda h: h @ p["w"], lambda h: h * 0, x)
  got = effective.connectivity(
    fn2, {"w": jnp.ones((3, 3), bool)}, (3,), params={"w": jnp.ones((3, 3))}
  )
  assert bool(got.masks["w"].all())


def test_bad_input():
  params = _mlp_params()
  good = {"w1": jnp.ones((3, 4), bool), "b1": None, "w2": jnp.ones((4, 2), bool)}
  with pytest.raises(ValueError, match="does not depend on its input"):
    effective.connectivity(lambda p, x: p["w1"] @ p["w2"], good, (3,), params=params)
  with pytest.raises(ValueError, match="cannot be applied"):
    effective.connectivity(_mlp_fn, good, jnp.ones((1, 4)), params=params)
  cnn = ref.PlainNet(
    (("conv", 2, (3, 3), (1, 1), "SAME", (1, 1), 1, "relu"), ("gap",), ("dense", 2, None))
  )
  v = cnn.init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))
  dense = sparsejax.trace(cnn, (4, 4, 1), variables=v).ones()
  with pytest.raises(ValueError, match="cannot be applied"):  # wrong rank
    effective.connectivity(cnn, dense, jnp.ones((4, 1)), variables=v)
  with pytest.raises(ValueError, match=r"example input of shape \(\)"):
    effective.connectivity(_mlp_fn, good, jnp.ones(()), params=params)
  with pytest.raises(ValueError, match="dtype int32; masks must be bool"):
    effective.connectivity(_mlp_fn, dict(good, w1=jnp.ones((3, 4), jnp.int32)), (3,), params=params)
  with pytest.raises(ValueError, match="does not match the parameter tree"):
    effective.connectivity(_mlp_fn, {"w1": good["w1"]}, (3,), params=params)
  with pytest.raises(ValueError, match="is a function: pass its params"):
    effective.connectivity(_mlp_fn, good, (3,))
  # a mask on a leaf that is no linear-op weight (the bias) is refused
  with pytest.raises(ValueError, match=r"prunable selects \['b1'\].*enter no linear op"):
    effective.connectivity(_mlp_fn, dict(good, b1=jnp.ones(4, bool)), (3,), params=params)


def test_attention_like_products_count_a_factor_only_where_the_other_can_be_nonzero():
  def fn(p, x):  # x: [T, D]; scores = q k^T mixes all tokens
    q, k = x @ p["wq"], x @ p["wk"]
    return jax.nn.softmax(q @ k.T, axis=-1) @ x

  params = {"wq": jnp.ones((2, 2)), "wk": jnp.ones((2, 2))}
  masks = {"wq": jnp.array([[True, False], [False, False]]), "wk": jnp.zeros((2, 2), bool)}
  got = effective.connectivity(fn, masks, jnp.ones((3, 2)), params=params)
  # wk empty: k is 0 for every input, so q k^T is 0 whatever q is; the softmax is then
  # uniform and the output (the mean of x) does not depend on wq at all.
  np.testing.assert_array_equal(got.masks["wq"], np.zeros((2, 2), bool))
  assert got.active_inputs == 6  # x itself still reaches the output
  # with one key weight kept, the query's live entry is on a path again
  masks["wk"] = jnp.array([[True, False], [False, False]])
  got = effective.connectivity(fn, masks, jnp.ones((3, 2)), params=params)
  np.testing.assert_array_equal(got.masks["wq"], masks["wq"])


def test_placement_and_barriers_are_identities():
  def fn(p, x):
    h = jax.device_put(jnp.tanh(x @ p["a"]))
    h, w = jax.lax.optimization_barrier((h, p["b"]))
    return h @ w

  params = {"a": jnp.ones((3, 4)), "b": jnp.ones((4, 2))}
  rng = np.random.default_rng(5)
  k1, k2 = rng.random((3, 4)) < 0.5, rng.random((4, 2)) < 0.5
  got = effective.connectivity(
    fn, {"a": jnp.asarray(k1), "b": jnp.asarray(k2)}, (3,), params=params
  )
  eff, _, _ = ref.mlp_reference([k1, k2])
  np.testing.assert_array_equal(got.masks["a"], eff[0])
  np.testing.assert_array_equal(got.masks["b"], eff[1])


def test_supported_primitives_listed():
  names = connectivity.supported_primitives()
  for p in (
    "dot_general",
    "conv_general_dilated",
    "reduce_window_max",
    "custom_jvp_call",
    "pjit",
    "concatenate",
    "gather",
  ):
    assert p in names


# --------------------------------------------------------------------------- SynFlow


class PlainBlock(nn.Module):
  """ResNet basic block as the Flax examples write it (names as the zoo's)."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    s = (self.stride, self.stride)
    bn = lambda name: nn.BatchNorm(use_running_average=True, momentum=0.99, epsilon=1e-5, name=name)
    y = nn.Conv(self.features, (3, 3), s, padding="SAME", use_bias=False, name="conv_1")(x)
    y = nn.relu(bn("norm_1")(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv_2")(y)
    y = bn("norm_2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), s, padding="SAME", use_bias=False, name="shortcut_conv")(x)
      x = bn("shortcut_norm")(x)
    return nn.relu(y + x)


class PlainResNet18(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (3, 3), padding="SAME", use_bias=False, name="stage0_conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="stage0_norm")(x))
    for stage, f in enumerate((64, 128, 256, 512), start=1):
      for block in range(2):
        x = PlainBlock(f, 2 if stage > 1 and block == 0 else 1, name=f"stage{stage}_block{block}")(
          x
        )
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=False, name="stage5_dense")(x)


# An acceptance check (about 80 s): the plain ResNet's SynFlow equals the zoo's; the
# reference comparisons of the plain CNN and MLP run by default.
@pytest.mark.exhaustive
def test_synflow_plain_resnet_equals_the_zoo_resnet():
  """Bit-equal scores. 32x32 inputs keep every conv input larger than its padding (4x4
  in stage 4), where the zoo's Conv is plain nn.Conv (layers.conv_general_dilated)."""
  from sparsejax import models, scores

  shape = (32, 32, 3)
  zoo = models.create("resnet18", num_classes=10)
  plain = PlainResNet18(10)
  params = plain.init(jax.random.key(0), jnp.ones((1,) + shape))["params"]
  zoo_shapes = jax.eval_shape(zoo.init, jax.random.key(0), jnp.ones((1,) + shape))["params"]
  assert jax.tree.structure(zoo_shapes) == jax.tree.structure(params)
  rng = np.random.default_rng(0)
  prunable = sparsejax.trace(plain, shape).prunable_paths
  assert prunable == sparsejax.trace(zoo, shape).prunable_paths
  masks = masks_lib.map_prunable(
    lambda w: jnp.asarray(rng.random(w.shape) < 0.3), params, prunable=prunable
  )
  a = scores.synflow_scores(plain, params, input_shape=shape, masks=masks)
  b = scores.synflow_scores(zoo, params, input_shape=shape, masks=masks)
  for x, y in zip(masks_lib.mask_leaves(a), masks_lib.mask_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in masks_lib.mask_leaves(a))
  pa = scores.synflow(plain, params, sparsity=0.99, input_shape=shape, rounds=4)
  pb = scores.synflow(zoo, params, sparsity=0.99, input_shape=shape, rounds=4)
  for x, y in zip(masks_lib.mask_leaves(pa), masks_lib.mask_leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_synflow_on_a_gelu_mlp_is_path_counting():
  from sparsejax import scores

  rng = np.random.default_rng(1)
  params = {
    "l1": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bias": jnp.ones(4)},
    "l2": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
  }
  fn = lambda p, x: jax.nn.gelu(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"]
  got = scores.synflow_scores(fn, params, input_shape=(3,))
  got = {"w1": got["l1"]["kernel"], "w2": got["l2"]["kernel"]}
  a1, a2 = np.abs(np.asarray(params["l1"]["kernel"])), np.abs(np.asarray(params["l2"]["kernel"]))
  want1 = a1 * (a2 @ np.ones(2))[None, :]
  want2 = a2 * (np.ones(3) @ a1)[:, None]
  factor = float(np.sum(got["w1"]) / np.sum(want1))
  np.testing.assert_allclose(got["w1"], factor * want1, rtol=1e-5)
  np.testing.assert_allclose(got["w2"], factor * want2, rtol=1e-5)


def test_synflow_linearizes_normalization_gating_and_attention_and_refuses_the_rest():
  from sparsejax import scores

  finite = lambda tree: all(
    bool(jnp.all(jnp.isfinite(x)) & jnp.all(x >= 0)) for x in masks_lib.mask_leaves(tree)
  )
  ln = ref.PlainNet((("dense", 4, None), ("ln",), ("dense", 2, None)))
  params = ln.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  assert finite(scores.synflow_scores(ln, params, input_shape=(3,)))

  def gating(p, x):
    return (x @ p["a"]["kernel"]) * jnp.tanh(x @ p["b"]["kernel"])

  params = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"kernel": jnp.ones((3, 2))}}
  got = scores.synflow_scores(gating, params, input_shape=(3,))
  assert finite(got)  # the product of the two flows: 3 * 3 paths into each output
  np.testing.assert_allclose(got["a"]["kernel"], got["b"]["kernel"])

  def attention(p, x):  # x: [T, D]
    return jax.nn.softmax((x @ p["a"]["kernel"]) @ (x @ p["b"]["kernel"]).T) @ x

  assert finite(scores.synflow_scores(attention, params, input_shape=jnp.ones((4, 3))))

  def difference(p, x):  # two different tensors subtracted: no faithful linearization
    return (x @ p["a"]["kernel"]) - (x @ p["b"]["kernel"])

  with pytest.raises(ValueError, match="not faithful"):
    scores.synflow_scores(difference, params, input_shape=(3,))


def test_constant_index_gather_and_scatter_add():
  idx = np.array([2, 0, 2])

  def fn(p, x):  # x: [4]; gather positions 2, 0, 2; scatter-add them into 2 slots
    h = jnp.tanh(x @ p["a"])[idx]  # [3]
    s = jnp.zeros(2).at[np.array([0, 0, 1])].add(h)  # slot 0 <- h0 + h1, slot 1 <- h2
    return s @ p["b"]

  params = {"a": jnp.ones((4, 3)), "b": jnp.ones((2, 2))}
  a = np.zeros((4, 3), bool)
  a[:, 1] = True  # only hidden unit 1 is fed; it is never gathered
  a[0, 0] = True  # hidden unit 0 (gathered once, into slot 0)
  masks = {"a": jnp.asarray(a), "b": jnp.ones((2, 2), bool)}
  got = effective.connectivity(fn, masks, jnp.ones(4), params=params)  # unbatched
  want_a = np.zeros((4, 3), bool)
  want_a[0, 0] = True
  np.testing.assert_array_equal(got.masks["a"], want_a)
  want_b = np.array([[True, True], [False, False]])  # slot 1 holds unit 2: unreachable
  np.testing.assert_array_equal(got.masks["b"], want_b)
