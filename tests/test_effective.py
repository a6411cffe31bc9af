"""Tests for sparsejax.effective against an independent brute-force reference.

The reference (tests/reference_graph.py) builds the unit-level graph of a small network
explicitly (convolutions unrolled over positions, zero padding not a unit, every pooling
position connected, residual adds, flatten in (H, W, C) order, global average pooling)
and searches it; no JAX autodiff. Compile caching: every architecture below is a fixed
module, so each compiles its connectivity sweep once and hypothesis only varies masks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsejax
from sparsejax import effective, models
from sparsejax import masks as masks_lib
from tests import reference_graph as ref

HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------- architectures


@dataclasses.dataclass(frozen=True)
class Arch:
  name: str
  input_shape: tuple
  spec: tuple
  full: bool = True  # the dense mask is fully active (no padding-only taps)
  cuts: tuple | None = None  # layers whose emptiness disconnects the net (None: all)


MLPS = (
  Arch("mlp_3_4_2", (3,), (("dense", 4), ("dense", 2))),
  Arch("mlp_5_8_6_3", (5,), (("dense", 8), ("dense", 6), ("dense", 3))),
  Arch("mlp_6_2_7_2", (6,), (("dense", 2), ("dense", 7), ("dense", 2))),
  Arch(
    "mlp_2x2x1_6_5_4_2",
    (2, 2, 1),
    (("flatten",), ("dense", 6), ("dense", 5), ("dense", 4), ("dense", 2)),
  ),
  Arch("mlp_4_3_8_5_7", (4,), (("dense", 3), ("dense", 8), ("dense", 5), ("dense", 7))),
)

CNNS = (
  # SAME stride 1, then SAME stride 2 on an odd size (5 -> 3), max pool with stride 1.
  Arch(
    "cnn_same_s2_odd",
    (5, 5, 2),
    (
      ("conv", 3, 3, 1, "SAME"),
      ("conv", 3, 3, 2, "SAME"),
      ("pool", "max", 2, 1),
      ("flatten",),
      ("dense", 3),
    ),
  ),
  # SAME stride 2 on an even size (6 -> 3, padding 0 low / 1 high), even kernel SAME,
  # avg pool 2.
  Arch(
    "cnn_same_s2_even",
    (6, 6, 2),
    (
      ("conv", 3, 3, 2, "SAME"),
      ("conv", 2, 2, 1, "SAME"),
      ("pool", "avg", 2, 2),
      ("flatten",),
      ("dense", 2),
    ),
  ),
  # VALID, max pool 2, VALID stride 2 (3 -> 1).
  Arch(
    "cnn_valid",
    (8, 8, 2),
    (
      ("conv", 3, 3, 1, "VALID"),
      ("pool", "max", 2, 2),
      ("conv", 4, 2, 2, "VALID"),
      ("flatten",),
      ("dense", 3),
    ),
  ),
  # VALID stride 2 on an odd size (7 -> 3), avg pool stride 1, SAME.
  Arch(
    "cnn_valid_s2_odd",
    (7, 7, 2),
    (
      ("conv", 3, 3, 2, "VALID"),
      ("pool", "avg", 2, 1),
      ("conv", 3, 3, 1, "SAME"),
      ("flatten",),
      ("dense", 2),
    ),
  ),
  # Two SAME stride-2 convs on even sizes (8 -> 4 -> 2), max pool 2.
  Arch(
    "cnn_same_s2_s2",
    (8, 8, 2),
    (
      ("conv", 2, 3, 2, "SAME"),
      ("conv", 3, 3, 2, "SAME"),
      ("pool", "max", 2, 2),
      ("flatten",),
      ("dense", 2),
    ),
  ),
  # A pool whose stride skips a row and column (window 2, stride 3 on 5).
  Arch(
    "cnn_pool_gap_rows",
    (5, 5, 1),
    (("conv", 2, 3, 1, "SAME"), ("pool", "avg", 2, 3), ("flatten",), ("dense", 2)),
  ),
)

RESNETS = (
  # stem, stride-2 block with a 1x1 stride-2 shortcut conv, identity block, GAP, head.
  Arch(
    "res_6x6",
    (6, 6, 2),
    (("conv", 3, 3, 1, "SAME"), ("res", 4, 2), ("res", 4, 1), ("gap",), ("dense", 3)),
    cuts=(0, 6),
  ),
  # identity block first, then a stride-2 block on an odd size (5 -> 3).
  Arch("res_5x5", (5, 5, 3), (("res", 3, 1), ("res", 4, 2), ("gap",), ("dense", 2)), cuts=(5,)),
)

# Kernel taps that only ever touch zero padding: the dense mask is not fully active.
PADDING = (
  Arch(
    "pad_3x3_on_1x1", (1, 1, 2), (("conv", 2, 3, 1, "SAME"), ("flatten",), ("dense", 2)), full=False
  ),
  Arch(
    "pad_3x3_s2_on_2x2",
    (2, 2, 1),
    (("conv", 2, 3, 2, "SAME"), ("flatten",), ("dense", 2)),
    full=False,
  ),
  Arch(
    "pad_2x2_on_1x1",
    (1, 1, 1),
    (("conv", 3, 2, 1, "SAME"), ("conv", 2, 3, 1, "SAME"), ("gap",), ("dense", 2)),
    full=False,
  ),
)

CONV_ARCHS = CNNS + RESNETS + PADDING
ALL_ARCHS = MLPS + CONV_ARCHS
LEVELS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 0.99, 1.0)


@functools.cache
def setup(arch: Arch):
  """(model, params shape tree, reference graph); one model object per arch."""
  model = ref.make_model(arch.spec)
  return (
    model,
    ref.param_shapes(model, arch.input_shape),
    ref.build_graph(arch.spec, arch.input_shape),
  )


def _path(p) -> str:
  return "/".join(str(k.key) for k in p)


def _is_none(x):
  return x is None


def to_tree(shapes, by_layer: dict):
  """Mask tree like ``shapes``: by_layer['op00_conv'] at 'op00_conv/kernel', None elsewhere."""

  def leaf(p, s):
    name = _path(p)
    if name.endswith("/kernel") and name[: -len("/kernel")] in by_layer:
      return by_layer[name[: -len("/kernel")]]
    return None

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def from_tree(tree) -> dict:
  """{layer path: np bool array} of a mask tree's non-None leaves."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]
  return {_path(p)[: -len("/kernel")]: np.asarray(m) for p, m in flat if m is not None}


def random_masks(graph, rng, sparsities) -> dict:
  """Bernoulli masks: each weight of layer l kept with probability 1 - sparsities[l]."""
  return {l.path: rng.random(l.kernel_shape) >= s for l, s in zip(graph.layers, sparsities)}


def run(arch: Arch, by_layer: dict):
  """(library Connectivity, reference Result) for the masks ``by_layer``."""
  model, shapes, graph = setup(arch)
  conn = effective.connectivity(model, to_tree(shapes, by_layer), arch.input_shape)
  want = ref.reference(graph, [by_layer[p] for p in graph.paths])
  return conn, want


def assert_matches(arch, by_layer):
  conn, want = run(arch, by_layer)
  _, _, graph = setup(arch)
  got = from_tree(conn.masks)
  assert list(got) == graph.paths
  for path, w in zip(graph.paths, want.masks):
    assert got[path].dtype == np.bool_
    np.testing.assert_array_equal(got[path], w, err_msg=f"{arch.name} {path}")
  assert conn.active_units == want.active_units, arch.name
  assert list(conn.active_units) == graph.paths
  assert dict(conn.total_units) == want.total_units
  assert conn.active_inputs == want.active_inputs
  assert conn.total_inputs == math.prod(arch.input_shape)
  return conn, want


@st.composite
def masks_for(draw, archs, levels=LEVELS):
  arch = draw(st.sampled_from(archs))
  _, _, graph = setup(arch)
  seed = draw(st.integers(0, 2**32 - 1))
  sparsities = draw(
    st.lists(st.sampled_from(levels), min_size=len(graph.layers), max_size=len(graph.layers))
  )
  return arch, random_masks(graph, np.random.default_rng(seed), sparsities)


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("arch", ALL_ARCHS, ids=lambda a: a.name)
def test_reference_layers_match_the_params_tree(arch):
  model, shapes, graph = setup(arch)
  # prunable kernels in sorted-key (= call) order, of the shapes the graph labels
  traced = sparsejax.trace(model, arch.input_shape)
  dense = traced.ones()
  masks_lib.validate(dense, shapes)
  assert [p[: -len("/kernel")] for p in masks_lib.paths(dense)] == graph.paths
  assert [p[: -len("/kernel")] for p in traced.prunable_paths] == graph.paths
  assert [m.shape for m in masks_lib.mask_leaves(dense)] == [l.kernel_shape for l in graph.layers]
  out = jax.eval_shape(
    model.init_with_output, jax.random.key(0), jnp.zeros((1,) + arch.input_shape)
  )[0]
  assert out.shape == (1,) + graph.output_ids.shape


@pytest.mark.parametrize(
  "shape,features,k,s,padding",
  [
    ((5, 5, 2), 3, 3, 1, "SAME"),
    ((5, 5, 2), 3, 3, 2, "SAME"),
    ((6, 6, 2), 2, 3, 2, "SAME"),
    ((6, 7, 1), 2, 4, 1, "SAME"),
    ((2, 2, 1), 2, 3, 2, "SAME"),
    ((1, 1, 2), 2, 3, 1, "SAME"),
    ((7, 7, 2), 3, 3, 2, "VALID"),
    ((8, 8, 2), 2, 2, 2, "VALID"),
    ((6, 6, 3), 2, 1, 2, "SAME"),
  ],
)
def test_reference_conv_edges_are_xla_convolution(shape, features, k, s, padding):
  """The labelled edges, read as a linear map, are lax's convolution ('SAME' as in XLA)."""
  graph = ref.build_graph((("conv", features, k, s, padding),), shape)
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=shape), rng.normal(size=(k, k, shape[-1], features))
  values = np.zeros(graph.num_units)
  values[graph.input_ids] = x
  y = np.zeros(graph.num_units)
  np.add.at(y, graph.dst, w.ravel()[graph.entry] * values[graph.src])
  want = jax.lax.conv_general_dilated(
    jnp.asarray(x[None], jnp.float32),
    jnp.asarray(w, jnp.float32),
    (s, s),
    padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )[0]
  assert want.shape == graph.output_ids.shape
  np.testing.assert_allclose(y[graph.output_ids], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "shape,window,stride",
  [((5, 5, 2), 2, 1), ((6, 6, 1), 2, 2), ((5, 5, 1), 2, 3), ((7, 7, 2), 3, 2)],
)
def test_reference_pool_edges_are_the_pooling_windows(shape, window, stride):
  graph = ref.build_graph((("pool", "avg", window, stride),), shape)
  x = np.random.default_rng(1).normal(size=shape)
  values = np.zeros(graph.num_units)
  values[graph.input_ids] = x
  y = np.zeros(graph.num_units)
  np.add.at(y, graph.dst, values[graph.src])
  want = jax.lax.reduce_window(
    jnp.asarray(x, jnp.float32), 0.0, jax.lax.add, (window, window, 1), (stride, stride, 1), "VALID"
  )
  assert want.shape == graph.output_ids.shape
  np.testing.assert_allclose(y[graph.output_ids], want, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, **HYP)
@given(masks_for(CNNS + RESNETS + PADDING[:1] + MLPS[:1]))
def test_reference_bfs_equals_fixpoint(arch_masks):
  arch, by_layer = arch_masks
  _, _, graph = setup(arch)
  ms = [by_layer[p] for p in graph.paths]
  a, b = ref.reference(graph, ms, "fixpoint"), ref.reference(graph, ms, "bfs")
  np.testing.assert_array_equal(a.reach, b.reach)
  np.testing.assert_array_equal(a.coreach, b.coreach)
  for x, y in zip(a.masks, b.masks):
    np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- exact equality


@settings(max_examples=40, **HYP)
@given(masks_for(MLPS))
def test_mlp_matches_reference(arch_masks):
  arch, by_layer = arch_masks
  conn, _ = assert_matches(arch, by_layer)
  # and the plain boolean-matrix MLP reference
  eff, units, inputs = ref.mlp_reference(list(by_layer.values()))
  for got, w in zip(from_tree(conn.masks).values(), eff):
    np.testing.assert_array_equal(got, w)
  assert list(conn.active_units.values()) == units
  assert conn.active_inputs == inputs


@settings(max_examples=60, **HYP)
@given(masks_for(CNNS + PADDING))
def test_cnn_matches_reference(arch_masks):
  assert_matches(*arch_masks)


@settings(max_examples=30, **HYP)
@given(masks_for(RESNETS))
def test_resnet_matches_reference(arch_masks):
  assert_matches(*arch_masks)


@settings(max_examples=20, **HYP)
@given(masks_for(CONV_ARCHS, levels=(0.9, 0.95, 0.97, 0.99)))
def test_very_sparse_matches_reference(arch_masks):
  assert_matches(*arch_masks)


# --------------------------------------------------------------------------- hand-computed


MLP_2_2_1 = Arch("mlp_2_2_1", (2,), (("dense", 2), ("dense", 1)))


def test_hand_mlp_single_path():
  # input0 -> hidden0 -> out is the only path; input0 -> hidden1 is a dead end.
  w0 = np.array([[True, True], [False, False]])
  w1 = np.array([[True], [False]])
  conn, _ = assert_matches(MLP_2_2_1, {"op00_dense": w0, "op01_dense": w1})
  got = from_tree(conn.masks)
  np.testing.assert_array_equal(got["op00_dense"], [[True, False], [False, False]])
  np.testing.assert_array_equal(got["op01_dense"], [[True], [False]])
  assert conn.active_units == {"op00_dense": 1, "op01_dense": 1}
  assert conn.active_inputs == 1
  model, shapes, _ = setup(MLP_2_2_1)
  tree = to_tree(shapes, {"op00_dense": w0, "op01_dense": w1})
  assert effective.effective_sparsity(model, tree, (2,)) == pytest.approx(1 - 2 / 6)
  assert effective.effective_compression(model, tree, (2,)) == pytest.approx(3.0)
  assert effective.active_units(model, tree, (2,)) == {"op00_dense": (1, 2), "op01_dense": (1, 1)}


def test_hand_mlp_no_path():
  # input0 -> hidden0, but only hidden1 -> out: no input-output path at all.
  w0 = np.array([[True, False], [False, False]])
  w1 = np.array([[False], [True]])
  conn, _ = assert_matches(MLP_2_2_1, {"op00_dense": w0, "op01_dense": w1})
  assert not any(m.any() for m in from_tree(conn.masks).values())
  assert conn.active_units == {"op00_dense": 0, "op01_dense": 0}
  assert conn.active_inputs == 0


def _dense_layers(arch):
  _, _, graph = setup(arch)
  return {l.path: np.ones(l.kernel_shape, bool) for l in graph.layers}


@pytest.mark.parametrize(
  "arch,active_taps",
  [
    # 3x3 SAME on 1x1: only the centre tap ever sees a real input.
    (PADDING[0], [(1, 1)]),
    # 3x3 SAME stride 2 on 2x2: one output, padding 0 low / 1 high (XLA), so rows and
    # columns 0 and 1 of the kernel see inputs, row and column 2 only padding.
    (PADDING[1], [(0, 0), (0, 1), (1, 0), (1, 1)]),
    # 2x2 SAME on 1x1: padding 0 low / 1 high: only tap (0, 0).
    (PADDING[2], [(0, 0)]),
  ],
  ids=lambda a: getattr(a, "name", ""),
)
def test_padding_only_taps_are_inactive(arch, active_taps):
  by_layer = _dense_layers(arch)
  conn, want = assert_matches(arch, by_layer)
  k = arch.spec[0][2]
  expected = np.zeros((k, k) + by_layer["op00_conv"].shape[2:], bool)
  for tap in active_taps:
    expected[tap] = True
  np.testing.assert_array_equal(want.masks[0], expected)  # the reference
  np.testing.assert_array_equal(from_tree(conn.masks)["op00_conv"], expected)
  model, shapes, _ = setup(arch)
  s = effective.effective_sparsity(model, to_tree(shapes, by_layer), arch.input_shape)
  assert 0.0 < s < 1.0


def test_hand_padding_convention_and_flatten_order():
  """2x2 input, 2x2 SAME conv (padding 0 low, 1 high) keeping only tap (1, 1): output
  position (i, j) reads input (i + 1, j + 1), real only for (0, 0). Flatten (H, W, C)
  puts (0, 0, c) at rows c = 0, 1 of the dense kernel: only those rows are active."""
  arch = Arch(
    "flatten_order", (2, 2, 1), (("conv", 2, 2, 1, "SAME"), ("flatten",), ("dense", 1)), full=False
  )
  conv = np.zeros((2, 2, 1, 2), bool)
  conv[1, 1] = True
  dense = np.ones((8, 1), bool)
  conn, _ = assert_matches(arch, {"op00_conv": conv, "op02_dense": dense})
  got = from_tree(conn.masks)
  np.testing.assert_array_equal(got["op00_conv"], conv)
  np.testing.assert_array_equal(got["op02_dense"][:, 0], [1, 1, 0, 0, 0, 0, 0, 0])
  assert conn.active_units == {"op00_conv": 2, "op02_dense": 1}
  assert conn.active_inputs == 1  # input (1, 1)


def test_hand_gap_connects_every_position():
  """Channel 0 of a 2x2 SAME conv keeping only tap (1, 1) is reachable at position
  (0, 0) alone; global average pooling still connects it to its channel's output, so
  the head's row 0 is active. Channel 1 keeps nothing: row 1 is inactive."""
  arch = Arch(
    "gap_hand", (2, 2, 1), (("conv", 2, 2, 1, "SAME"), ("gap",), ("dense", 1)), full=False
  )
  conv = np.zeros((2, 2, 1, 2), bool)
  conv[1, 1, 0, 0] = True
  head = np.ones((2, 1), bool)
  conn, _ = assert_matches(arch, {"op00_conv": conv, "op02_dense": head})
  got = from_tree(conn.masks)
  np.testing.assert_array_equal(got["op00_conv"], conv)
  np.testing.assert_array_equal(got["op02_dense"][:, 0], [True, False])
  assert conn.active_units == {"op00_conv": 1, "op02_dense": 1}
  assert conn.active_inputs == 1


# --------------------------------------------------------------------------- invariants


def _eff(arch, by_layer):
  model, shapes, _ = setup(arch)
  return from_tree(effective.effective_masks(model, to_tree(shapes, by_layer), arch.input_shape))


@settings(max_examples=30, **HYP)
@given(masks_for(ALL_ARCHS), st.integers(0, 2**32 - 1))
def test_subset_fixed_point_monotone_deterministic(arch_masks, seed):
  arch, m1 = arch_masks
  e1 = _eff(arch, m1)
  for p in m1:
    assert not (e1[p] & ~m1[p]).any()  # subset of the mask
  e11 = _eff(arch, e1)
  for p in m1:
    np.testing.assert_array_equal(e11[p], e1[p])  # fixed point
  rng = np.random.default_rng(seed)
  m2 = {p: m | (rng.random(m.shape) < rng.choice([0.0, 0.1, 0.5])) for p, m in m1.items()}
  e2 = _eff(arch, m2)
  for p in m1:
    assert not (e1[p] & ~e2[p]).any()  # monotone
  # deterministic: same call, and an equal but distinct module object
  again = _eff(arch, m1)
  _, shapes, _ = setup(arch)
  other = from_tree(
    effective.effective_masks(ref.make_model(arch.spec), to_tree(shapes, m1), arch.input_shape)
  )
  for p in m1:
    np.testing.assert_array_equal(again[p], e1[p])
    np.testing.assert_array_equal(other[p], e1[p])


@pytest.mark.parametrize("arch", ALL_ARCHS, ids=lambda a: a.name)
def test_dense_mask(arch):
  by_layer = _dense_layers(arch)
  conn, want = assert_matches(arch, by_layer)
  if arch.full:
    for p, m in from_tree(conn.masks).items():
      assert m.all(), p
    model, shapes, _ = setup(arch)
    assert effective.effective_sparsity(model, to_tree(shapes, by_layer), arch.input_shape) == 0.0


@settings(max_examples=25, **HYP)
@given(st.data())
def test_an_empty_layer_disconnects_everything(data):
  arch, by_layer = data.draw(masks_for(ALL_ARCHS, levels=(0.0, 0.3, 0.6)))
  model, shapes, graph = setup(arch)
  cuts = range(len(graph.layers)) if arch.cuts is None else arch.cuts
  cut = graph.paths[data.draw(st.sampled_from(list(cuts)))]
  by_layer = dict(by_layer, **{cut: np.zeros_like(by_layer[cut])})
  conn, want = assert_matches(arch, by_layer)
  assert not any(m.any() for m in from_tree(conn.masks).values())
  assert set(conn.active_units.values()) == {0}
  assert conn.active_inputs == 0
  tree = to_tree(shapes, by_layer)
  s = effective.effective_sparsity(model, tree, arch.input_shape)
  assert s == 1.0 and not math.isnan(s)
  assert effective.effective_compression(model, tree, arch.input_shape) == math.inf


def test_bypassed_empty_layers_do_not_disconnect():
  """Emptying a residual branch leaves the identity shortcut; emptying the shortcut
  conv leaves the main branch."""
  arch = RESNETS[0]
  for empty in (
    ["op02_res/conv_1"],
    ["op01_res/shortcut_conv"],
    ["op02_res/conv_1", "op02_res/conv_2"],
  ):
    by_layer = _dense_layers(arch)
    for p in empty:
      by_layer[p] = np.zeros_like(by_layer[p])
    conn, want = assert_matches(arch, by_layer)
    got = from_tree(conn.masks)
    assert got["op04_dense"].all() and got["op00_conv"].all(), empty
    for p in empty:
      assert not got[p].any()


@settings(max_examples=10, **HYP)
@given(masks_for((CNNS[0], CNNS[2])))
def test_max_and_avg_pooling_connect_alike(arch_masks):
  arch, by_layer = arch_masks
  swapped = dataclasses.replace(
    arch,
    name=arch.name + "_swapped",
    spec=tuple(
      ("pool", "avg" if op[1] == "max" else "max") + op[2:] if op[0] == "pool" else op
      for op in arch.spec
    ),
  )
  a, b = _eff(arch, by_layer), _eff(swapped, by_layer)
  for p in a:
    np.testing.assert_array_equal(a[p], b[p])


# --------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99, 0.999])
def test_lenet300100_matches_mlp_reference(sparsity):
  model = models.create("lenet300100")
  shape = models.input_shape("lenet300100")
  m = masks_lib.random(jax.random.key(3), sparsejax.trace(model, shape).ones(), sparsity)
  conn = effective.connectivity(model, m, shape)
  kernels = [np.asarray(k) for k in masks_lib.mask_leaves(m)]
  eff, units, inputs = ref.mlp_reference(kernels)
  for got, want in zip(masks_lib.mask_leaves(conn.masks), eff):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert list(conn.active_units) == ["dense_0", "dense_1", "dense_2"]
  assert list(conn.active_units.values()) == units
  assert conn.active_inputs == inputs


LENET5_SPEC = (
  ("conv", 6, 5, 1, "VALID"),
  ("pool", "avg", 2, 2),
  ("conv", 16, 5, 1, "VALID"),
  ("pool", "avg", 2, 2),
  ("flatten",),
  ("dense", 120),
  ("dense", 84),
  ("dense", 10),
)


@functools.cache
def _lenet5_graph():
  return ref.build_graph(LENET5_SPEC, (32, 32, 3))


@pytest.mark.parametrize("sparsity", [0.9, 0.98, 0.995])
def test_lenet5_matches_reference_graph(sparsity):
  model = models.create("lenet5")
  shape = models.input_shape("lenet5")
  graph = _lenet5_graph()
  dense = sparsejax.trace(model, shape).ones()
  assert [m.shape for m in masks_lib.mask_leaves(dense)] == [l.kernel_shape for l in graph.layers]
  m = masks_lib.random(jax.random.key(int(sparsity * 1000)), dense, sparsity)
  conn = effective.connectivity(model, m, shape)
  want = ref.reference(graph, [np.asarray(k) for k in masks_lib.mask_leaves(m)])
  for got, w in zip(masks_lib.mask_leaves(conn.masks), want.masks):
    np.testing.assert_array_equal(np.asarray(got), w)
  assert list(conn.active_units.values()) == list(want.active_units.values())
  assert list(conn.total_units.values()) == list(want.total_units.values())
  assert conn.active_inputs == want.active_inputs


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def mlp():
  arch = MLPS[1]
  model, _, _ = setup(arch)
  return model, sparsejax.trace(model, arch.input_shape).ones(), arch.input_shape


def _raises(model, tree, shape):
  with pytest.raises(ValueError):
    effective.effective_masks(model, tree, shape)
  with pytest.raises(ValueError):
    effective.connectivity(model, tree, shape)


def test_bad_masks_raise(mlp):
  model, good, shape = mlp
  effective.effective_masks(model, good, shape)  # the good one works
  missing = {k: v for k, v in good.items() if k != "op01_dense"}
  _raises(model, missing, shape)
  missing_leaf = dict(good, op01_dense={"kernel": good["op01_dense"]["kernel"]})
  _raises(model, missing_leaf, shape)
  extra = dict(good, op09_dense={"kernel": jnp.ones((3, 3), bool), "bias": None})
  _raises(model, extra, shape)
  extra_leaf = dict(good, op00_dense=dict(good["op00_dense"], extra=jnp.ones((5, 8), bool)))
  _raises(model, extra_leaf, shape)
  wrong_shape = dict(good, op00_dense=dict(good["op00_dense"], kernel=jnp.ones((8, 5), bool)))
  _raises(model, wrong_shape, shape)
  for dtype in (jnp.float32, jnp.int32, np.uint8):
    bad = dict(good, op00_dense=dict(good["op00_dense"], kernel=jnp.ones((5, 8), dtype)))
    _raises(model, bad, shape)
  bias_mask = dict(good, op00_dense=dict(good["op00_dense"], bias=jnp.ones((8,), bool)))
  _raises(model, bias_mask, shape)
  with pytest.raises(ValueError, match=r"\['op00_dense/bias'\].*enter no linear op"):
    effective.effective_masks(model, bias_mask, shape)
  as_list = dict(good, op00_dense=dict(good["op00_dense"], kernel=np.ones((5, 8), bool).tolist()))
  _raises(model, as_list, shape)


@pytest.mark.parametrize("bad_shape", [(), (0,), (-5,), (5, 0), None, 5, (4,), (5, 1)])
def test_bad_input_shape_raises(mlp, bad_shape):
  model, good, _ = mlp
  _raises(model, good, bad_shape)


def test_non_integer_input_shape_raises(mlp):
  model, good, _ = mlp
  _raises(model, good, (5.5,))


def test_a_none_kernel_mask_is_not_pruned_nor_counted(mlp):
  # the mask tree is the prunable set: a weight left None is simply not pruned and not
  # counted (it was an error while the name rule decided the prunable set)
  model, good, shape = mlp
  rng = np.random.default_rng(0)
  sparse = masks_lib.map_masks(lambda m: jnp.asarray(rng.random(m.shape) < 0.4), good)
  none_kernel = dict(sparse, op00_dense=dict(sparse["op00_dense"], kernel=None))
  unmasked = dict(
    sparse, op00_dense=dict(sparse["op00_dense"], kernel=good["op00_dense"]["kernel"])
  )
  got = effective.connectivity(model, none_kernel, shape)
  want = effective.connectivity(model, unmasked, shape)
  assert got.masks["op00_dense"]["kernel"] is None
  # an unpruned layer conducts like an all-True mask: the same units are active
  assert got.active_units == want.active_units
  assert got.active_inputs == want.active_inputs
  assert masks_lib.paths(got.masks) == ["op01_dense/kernel", "op02_dense/kernel"]
  for layer in ("op01_dense", "op02_dense"):
    np.testing.assert_array_equal(got.masks[layer]["kernel"], want.masks[layer]["kernel"])
  kept = sum(int(np.sum(np.asarray(want.masks[l]["kernel"]))) for l in ("op01_dense", "op02_dense"))
  assert effective.effective_sparsity(model, none_kernel, shape) == pytest.approx(
    1 - kept / (8 * 6 + 6 * 3)
  )


def test_a_mask_structure_is_checked_once_and_a_bad_one_always(monkeypatch):
  """Traced.masked checks a mask tree's structure (tree, shapes, dtypes) once per model:
  the same structure with other values is not checked again (and gives the same
  answers as a fresh check), another structure is, and a bad one raises every time."""
  traced = sparsejax.trace(models.create("lenet300100"), (28, 28, 1))
  calls = []
  real = masks_lib.validate
  monkeypatch.setattr(masks_lib, "validate", lambda *a, **k: calls.append(1) or real(*a, **k))
  m1 = masks_lib.random(jax.random.key(0), traced.ones(), 0.9)
  m2 = masks_lib.random(jax.random.key(1), traced.ones(), 0.99)
  e1 = effective.effective_masks(traced, m1)
  e2 = effective.effective_masks(traced, m2)
  assert len(calls) <= 1
  assert effective.effective_compression(traced, m2) == masks_lib.compression(e2)
  assert masks_lib.count(e1) != masks_lib.count(e2)
  narrowed = dict(m1, dense_2=dict(m1["dense_2"], kernel=None))
  before = len(calls)
  effective.effective_masks(traced, narrowed)  # a new structure: checked
  assert len(calls) == before + 1
  bad = dict(m1, dense_2=dict(m1["dense_2"], kernel=m1["dense_2"]["kernel"].astype(jnp.int32)))
  for _ in range(2):
    with pytest.raises(ValueError, match="must be bool"):
      effective.effective_masks(traced, bad)
